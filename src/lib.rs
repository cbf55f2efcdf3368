//! lazybd: a copy-on-demand NBD block server.
//!
//! A VM reads its disk over NBD; lazybd fetches each block from the origin
//! (HTTP(S) or a file) on first use, keeps it in a local persistent cache
//! checked by CRC32 per 4 KiB page, and serves it locally from then on.
//!
//! Module map (read path: `nbd::transmission -> export -> [overlay ->] cache -> origin`):
//! - [`block`]   units: byte ranges, block sizes and indices, the range split
//! - [`error`]   the one error type (kind + context + source) and its NBD errno
//! - [`nbd`]     the NBD protocol: `wire` (pure codec), `handshake`, `transmission`,
//!   `client` (the in-house client of `lazybd copy`)
//! - [`server`]  TCP/Unix listeners, connection limits, graceful shutdown
//! - [`tls`]     NBD over TLS: modes (off/on/require), certificates, acceptor
//! - [`export`]  the NBD-facing device trait, exports registry, `stack` (composition)
//! - [`cache`]   the verified cache of an origin: single-flight fetches, `dir`, `verify`
//! - [`store`]   the cache's block store: data file + sparse `map` (state + CRCs)
//! - [`overlay`] copy-on-write layer of a writable export; writes never reach the base:
//!   `store` (pages + journal, crash contract), `format` (v2, fuzzed), `disk` (the I/O
//!   interface, with a simulated disk for power-loss tests), `migrate` (v1 -> v2)
//! - [`readahead`] per-export adaptive sequential readahead into the cache (before the
//!   cache in the read path: `nbd::transmission -> export -> [overlay ->] readahead -> cache`)
//! - [`profile`] boot profiles: record the first reads, replay them on a cold start
//! - [`hydrate`] background fetch of a whole image, rate-limited, yielding to guests
//! - [`copy`]    `lazybd copy`: a whole image from HTTP/file/NBD to a file or NBD
//! - [`origin`]  where bytes live: `http` (ranged GETs), `file`
//! - [`daemon`]  `serve` as a library call: images, exports, add/remove at run time
//! - [`control`] the control socket (JSON lines) behind `lazybd export ...`
//! - [`config`]  the TOML configuration file
//! - [`sample`]  the built-in sample image used when no origin is given
//! - [`stats`]   counters and the origin latency histogram
//! - [`metrics`] Prometheus endpoint reading those counters at scrape time
//! - [`util`]    small helpers (sizes, stable hash, jitter)

pub mod block;
pub mod cache;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod device;
pub mod error;
pub mod export;
pub mod nbd;
pub mod origin;
pub mod overlay;
pub mod prefetch;
pub mod sample;
pub mod server;
pub mod stats;
pub mod store;
pub mod tls;
pub mod util;

// Old paths, until the binary names `prefetch` (its CLI is being split).
pub use daemon::{control, metrics};
pub use prefetch::{hydrate, profile};
