//! Prefetch: work that brings blocks into the cache before a guest asks,
//! above the cache, which knows none of it. Each part uses what the cache
//! exposes for it: a background fetch of a range (joining fetches already
//! in flight, counted per `stats::Work`), and a read observer that
//! sees the guest reads it serves.
//!
//! - `readahead`   per-export adaptive sequential readahead (a device layer
//!   between the export or its overlay and the shared cache)
//! - [`profile`]   boot profiles: record the first reads (a read observer),
//!   replay them on a cold start
//! - [`hydrate`]   background fetch of a whole image, rate-limited, yielding
//!   to guests

pub mod hydrate;
pub mod profile;
pub(crate) mod readahead;
