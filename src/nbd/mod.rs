//! The NBD protocol: wire format, server handshake and transmission, and a
//! small client (`lazybd copy`).

pub mod client;
pub mod handshake;
pub mod transmission;
pub mod wire;
