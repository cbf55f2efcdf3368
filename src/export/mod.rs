//! Exports: what an NBD client sees. The export description (name, flags,
//! block sizes, the device behind it) and the registry of named exports.
//!
//! `stack` is the one place where layers are composed into a device.
//!
//! [`Export`] (every field) and [`Exports::add`] are public for the fuzz
//! target `handshake`, which builds an export over a stub device by hand.

pub(crate) mod stack;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::device::{BlockDevice, Writable};
use crate::error::{Error, ErrorKind, Result};
use crate::overlay::Overlay;
use crate::stats::Stats;

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
    pub(crate) fn read_only(&self) -> bool {
        self.writable.is_none()
    }

    pub(crate) fn clients(&self) -> usize {
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
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<Export>> {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        let e = map.remove(name)?;
        let mut d = self.default.write().unwrap_or_else(|p| p.into_inner());
        if d.as_deref() == Some(name) {
            *d = map.keys().next().cloned();
        }
        Some(e)
    }

    /// Every export, by name.
    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().cloned().collect()
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<Export>> {
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
    pub(crate) fn list(&self) -> Vec<(String, String)> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values()
            .map(|e| (e.name.clone(), e.description.clone()))
            .collect()
    }
}
