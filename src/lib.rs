//! lazybd: a copy-on-demand NBD block server.
//!
//! A VM reads its disk over NBD; lazybd fetches each block from the origin
//! (HTTP(S) or a file) on first use, keeps it in a local persistent cache
//! checked by CRC32 per 4 KiB page, and serves it locally from then on.
//! A writable export puts a copy-on-write overlay (the VM's own disk) over
//! the shared cache.
//!
//! Read path: `nbd::transmission -> export -> [overlay ->] format ->
//! prefetch::readahead -> cache -> store | origin`. Write path:
//! `nbd::transmission -> export -> overlay -> overlay::store`.
//!
//! Module map, by layer from the protocol down (each folder's `mod.rs` says
//! what its files own):
//! - [`server`]   TCP/Unix listeners, connection limits, graceful shutdown
//! - [`tls`]      NBD over TLS: modes (off/on/require), certificates, acceptor
//! - [`nbd`]      the NBD protocol: `wire` (pure codec, fuzzed), `handshake`,
//!   `transmission` (validate, reply, outbox, budget, conn), `client` (for `copy`)
//! - [`export`]   named exports and their registry; `stack` is the one place layers compose
//! - [`device`]   the NBD-facing traits every layer implements (a leaf)
//! - [`overlay`]  copy-on-write layer of a writable export; writes never reach the base:
//!   `store` (pages + journal, crash contract), `format` (v2, fuzzed), `disk` (the I/O
//!   interface, with a simulated disk for power-loss tests), `migrate` (v1 -> v2)
//! - [`format`]   image formats: guest offsets -> image bytes (`raw`; `qcow2`:
//!   `layout` decodes and checks the header and table entries, `decompress`
//!   zlib/zstd clusters); the rule that never guesses a format
//! - [`prefetch`] work ahead of the guest, above the cache: `readahead`, `profile`
//!   (boot profiles), `hydrate` (the whole image in the background)
//! - [`cache`]    the verified cache of an origin: single-flight fetches, eviction,
//!   a read observer and background fetches for prefetch; `dir`, `verify`
//! - [`store`]    the cache's block store: data file + sparse `map` (state + CRCs)
//! - [`manifest`] per-block SHA-256 of an image (the trust root): the file format
//!   (fuzzed), `build`, and `Verified`, the origin wrapper under the cache that
//!   checks every block against it
//! - [`peer`]     hosts sharing their caches' blocks: `client` (each unit fetched from
//!   its owner first, checked, the origin on any failure), `server` (`--peer-listen`)
//! - [`origin`]   where bytes live: `http` (ranged GETs), `s3` (presigned GETs through
//!   `http`; credentials from `aws`), `swift` and `glance` (tokens from `openstack`),
//!   `file`; `stream` (origins read only from their start); `headers` (extra headers,
//!   reloadable), `digest` (published digests)
//! - [`copy`]     `lazybd copy`: a whole image from HTTP/file/NBD to a file or NBD
//! - [`daemon`]   `serve` as a library call: `state` (images, exports), `run` (start,
//!   shutdown), `maintenance` (evictor, sync, retries), `control` (the control
//!   socket), `metrics` (Prometheus), `notify` (systemd readiness)
//! - [`config`]   the TOML configuration file
//! - [`sample`]   the built-in sample image used when no origin is given
//! - [`stats`]    counters and the origin latency histogram
//! - [`block`]    units: byte ranges, block sizes and indices, the range split
//! - [`error`]    the one error type (kind + context + source) and its NBD errno (a leaf)
//! - [`util`]     small helpers (sizes, stable hash, jitter)
//!
//! The binary (`src/main.rs`) parses arguments and dispatches to its own
//! `cli` module (`src/cli/`: the clap types, one file per subcommand, and
//! `settings`, where every option is resolved flag > config file > default).
//!
//! The public API is what an embedding program, the binary, the integration
//! tests and the fuzz targets use: serving ([`daemon::start`] with a
//! [`daemon::ServeConfig`], the [`daemon::control`] client), [`copy`],
//! origins ([`origin::Origin`], [`origin::open`]), the [`device`] traits,
//! [`error`], the [`block`] units, [`stats::Stats`], [`config`],
//! [`server::Limits`] and [`server::ListenAddr`], [`tls`] options, and the
//! offline tools (cache info and verify, overlay check, boot profiles).
//! Everything else is `pub(crate)`; a few decoders are public only for the
//! fuzz targets, and their modules say so.

pub mod block;
pub mod cache;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod device;
pub mod error;
pub mod export;
pub mod format;
pub mod manifest;
pub mod nbd;
pub mod origin;
pub mod overlay;
pub mod peer;
pub mod prefetch;
pub mod sample;
pub mod server;
pub mod stats;
pub mod store;
pub mod tls;
pub mod util;
