//! The NBD protocol, server side: wire format, handshake, transmission.

pub mod handshake;
pub mod transmission;
pub mod wire;
