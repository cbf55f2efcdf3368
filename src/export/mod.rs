//! Exports: what an NBD client sees. The NBD-facing device trait, the export
//! description (name, flags, block sizes) and the registry of named exports.
//!
//! [`stack`] is the one place where layers are composed into a device.

pub mod stack;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use tokio::sync::watch;

use crate::block::ByteRange;
use crate::error::{Error, ErrorKind, Result};
use crate::origin::BoxFuture;
use crate::overlay::Overlay;
use crate::stats::Stats;

/// The bytes of a read plus what is known to be zero inside it.
#[derive(Debug, Clone)]
pub struct ReadData {
    /// Exactly the requested length; zero ranges are zero-filled here too,
    /// so a simple reply can send `data` as is.
    pub data: Bytes,
    /// Sorted, non-overlapping absolute ranges inside the request known to
    /// read as zero (structured replies send them as holes).
    pub zero: Vec<ByteRange>,
}

/// One `base:allocation` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    /// Known to read as zeroes (reported as HOLE|ZERO).
    pub zero: bool,
}

/// The NBD-facing device: mirrors the NBD read-side commands.
///
/// Contract: the protocol edge has validated every request, so callers
/// guarantee `r` lies within `[0, size())` and is at most the maximum
/// payload for reads. Implementations may `debug_assert!` that.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes; constant for the device's lifetime.
    fn size(&self) -> u64;

    /// Read `r`. On success `data.len() == r.len`.
    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>>;

    /// Allocation status of `r`: consecutive extents starting at
    /// `r.offset`, summing to `r.len`.
    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>>;

    /// Advisory: start bringing `r` close (NBD_CMD_CACHE). Returns at once.
    fn prefetch(&self, _r: ByteRange) {}

    /// Fast path: serve `r` without waiting if everything it needs is local,
    /// else `None` (the caller then uses [`BlockDevice::read`]). Must return
    /// the same bytes `read` would. The protocol edge calls it inline, so an
    /// implementation MUST NOT block on anything but local page-cache I/O.
    /// The default (always `None`) is correct for any layer, only slower.
    fn read_now(&self, _r: ByteRange) -> Option<Result<ReadData>> {
        None
    }

    /// Make everything the client wrote and saw acknowledged durable.
    fn flush(&self) -> BoxFuture<'_, Result<()>>;
}

/// Flags of NBD_CMD_WRITE_ZEROES that change what the device must do.
#[derive(Debug, Clone, Copy, Default)]
pub struct ZeroFlags {
    /// Durable before the reply.
    pub fua: bool,
    /// The client wants allocated zeroes, not a hole.
    pub no_hole: bool,
    /// Fail with `ErrorKind::Unsupported` rather than zero slowly.
    pub fast: bool,
}

/// The write side of a device: only writable exports have one, so a
/// read-only export cannot be written through a stubbed method.
///
/// Contract: ranges are validated by the protocol edge; with `fua` the
/// effect is durable (as after FLUSH) before the future resolves.
pub trait Writable: Send + Sync + 'static {
    /// Write `data` at `offset`.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<()>>;
    /// Fast path: do the write without waiting if nothing it needs can
    /// block (no lock held by another writer, base bytes local), else
    /// `None` and the caller uses [`Writable::write`]. Giving up may leave
    /// part of `data` written; `write` then writes it again. Same rules as
    /// [`BlockDevice::read_now`]: called inline by the protocol edge.
    fn write_now(&self, _offset: u64, _data: &[u8], _fua: bool) -> Option<Result<()>> {
        None
    }
    /// The client no longer needs `r`; its content becomes unspecified.
    fn trim(&self, r: ByteRange, fua: bool) -> BoxFuture<'_, Result<()>>;
    /// `r` reads as zeroes afterwards.
    fn write_zeroes(&self, r: ByteRange, flags: ZeroFlags) -> BoxFuture<'_, Result<()>>;
}

/// A named export and how it is advertised.
pub struct Export {
    pub name: String,
    pub description: String,
    /// The image's locator, for listings.
    pub image: String,
    pub device: Arc<dyn BlockDevice>,
    /// The write side; `None` for a read-only export.
    pub writable: Option<Arc<dyn Writable>>,
    /// The overlay behind `writable`, for listings and removal.
    pub overlay: Option<Arc<Overlay>>,
    /// True when all connections see one consistent device (shared cache,
    /// flush covers all): advertised as NBD_FLAG_CAN_MULTI_CONN.
    pub multi_conn: bool,
    /// Preferred I/O size advertised in NBD_INFO_BLOCK_SIZE.
    pub preferred_block: u32,
    /// Counters of the image this export serves.
    pub stats: Arc<Stats>,
    /// Connections in transmission on this export.
    pub clients: AtomicUsize,
    /// Turned true when the export is removed: its connections finish their
    /// in-flight requests and close.
    pub closing: watch::Sender<bool>,
}

impl Export {
    pub fn read_only(&self) -> bool {
        self.writable.is_none()
    }

    pub fn clients(&self) -> usize {
        self.clients.load(Ordering::Relaxed)
    }
}

/// Named exports, looked up at handshake time. The empty name reaches the
/// default export.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<Export>>>,
    default: RwLock<Option<String>>,
}

impl Exports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add an export; the first one added becomes the default. Refuses a
    /// name already in use.
    pub fn add(&self, e: Export) -> Result<Arc<Export>> {
        let name = e.name.clone();
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&name) {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("an export named {name:?} exists already"),
            ));
        }
        let e = Arc::new(e);
        map.insert(name.clone(), e.clone());
        let mut d = self.default.write().unwrap_or_else(|p| p.into_inner());
        if d.is_none() {
            *d = Some(name);
        }
        Ok(e)
    }

    /// Take an export out of the registry: new clients can no longer reach
    /// it; connected ones are the caller's business.
    pub fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let e = map.remove(name)?;
        let mut d = self.default.write().unwrap_or_else(|p| p.into_inner());
        if d.as_deref() == Some(name) {
            *d = map.keys().next().cloned();
        }
        Some(e)
    }

    /// Every export, by name.
    pub fn all(&self) -> Vec<Arc<Export>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        if name.is_empty() {
            if let Some(e) = map.get("") {
                return Some(e.clone());
            }
            let d = self.default.read().unwrap_or_else(|p| p.into_inner());
            return d.as_ref().and_then(|n| map.get(n).cloned());
        }
        map.get(name).cloned()
    }

    /// (name, description) of every export, for NBD_OPT_LIST.
    pub fn list(&self) -> Vec<(String, String)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}
