//! `lazybd serve` as a library call: open images and their shared caches,
//! compose exports, bind listeners and the control socket, serve until told
//! to stop, persist, report. The binary only parses arguments and calls
//! [`start`]; tests call it too.
//!
//! - `state`         the serving state ([`Daemon`]): images, exports, per-image work
//! - `run`           [`start`] and [`Running::shutdown`]: listeners, tasks, persistence
//! - `maintenance`   evictor, periodic sync, retries of exports
//! - [`control`]     the control socket (JSON lines) behind `lazybd export ...`
//! - `metrics`       the Prometheus endpoint, reading counters at scrape time
//! - [`notify`]      readiness for systemd (`Type=notify`: READY, RELOADING, STOPPING)
//!
//! `control` and `metrics` depend on the state only; `run` wires them in.

pub mod control;
mod maintenance;
pub(crate) mod metrics;
pub mod notify;
mod run;
mod state;

pub use maintenance::HIGH_WATERMARK;
pub use run::{start, Running, ServeConfig};
pub use state::{BootOptions, Daemon, ExportConfig, ExportInfo};
