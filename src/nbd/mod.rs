//! The NBD protocol: wire format, server handshake and transmission, and a
//! small client (`lazybd copy`).
//!
//! [`wire`] and [`handshake`] are public for the integration tests and the
//! fuzz targets; `transmission` and `client` are crate-private.

pub(crate) mod client;
pub mod handshake;
pub(crate) mod transmission;
pub mod wire;
