//! The cache directory: one subdirectory per origin image.
//!
//! ```text
//! CACHE_DIR/
//!   disk.img-3f2a9c0d1e4b5a69/   <slug of the URL>-<FNV-64 of the locator>
//!     origin    text: locator, size, validator, block_size (what the blocks are)
//!     meta      block map (state + CRCs), see map.rs; flock'ed while served
//!     data      sparse file, image offsets
//! ```
//!
//! The directory is keyed by locator; the identity (size, validator) is in
//! `origin`. When a locator's identity changes, its old blocks are discarded
//! (with a warning) before anything is served: old and new are never mixed.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ImageCache;
use crate::block::BlockSize;
use crate::error::{Error, Result};
use crate::origin::{Origin, OriginIdentity};
use crate::stats::Stats;
use crate::store::map::Geometry;
use crate::store::BlockStore;
use crate::util::fnv64;

#[derive(Debug, Clone)]
pub struct CacheDir {
    root: PathBuf,
}

/// What `origin` records about a cached image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub identity: OriginIdentity,
    pub block_size: BlockSize,
}

impl Recorded {
    fn encode(&self) -> String {
        format!(
            "locator={}\nsize={}\nvalidator={}\nblock_size={}\n",
            self.identity.locator,
            self.identity.size,
            self.identity.validator.as_deref().unwrap_or(""),
            self.block_size.bytes()
        )
    }

    fn decode(s: &str) -> Option<Recorded> {
        let mut locator = None;
        let mut size = None;
        let mut validator = None;
        let mut bs = None;
        for line in s.lines() {
            let (k, v) = line.split_once('=')?;
            match k {
                "locator" => locator = Some(v.to_owned()),
                "size" => size = v.parse().ok(),
                "validator" => validator = Some((!v.is_empty()).then(|| v.to_owned())),
                "block_size" => bs = BlockSize::new(v.parse().ok()?).ok(),
                _ => {}
            }
        }
        Some(Recorded {
            identity: OriginIdentity {
                locator: locator?,
                size: size?,
                validator: validator?,
            },
            block_size: bs?,
        })
    }

    pub fn read(dir: &Path) -> Option<Recorded> {
        Recorded::decode(&fs::read_to_string(dir.join("origin")).ok()?)
    }
}

/// Hash of everything that makes blocks valid, stored in the map header.
pub(crate) fn identity_hash(id: &OriginIdentity) -> u64 {
    fnv64(format!("{}\n{}\n{:?}", id.locator, id.size, id.validator).as_bytes())
}

fn slug(locator: &str) -> String {
    let last = locator
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or("");
    let s: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    if s.is_empty() {
        "image".into()
    } else {
        s
    }
}

impl CacheDir {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root)
            .map_err(|e| Error::io(format!("creating cache directory {}", root.display()), e))?;
        Ok(CacheDir { root })
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn image_dir(&self, id: &OriginIdentity) -> PathBuf {
        self.root.join(format!(
            "{}-{:016x}",
            slug(&id.locator),
            fnv64(id.locator.as_bytes())
        ))
    }

    /// Every image directory (those with an `origin` file).
    pub fn images(&self) -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        let rd = fs::read_dir(&self.root)
            .map_err(|e| Error::io(format!("listing {}", self.root.display()), e))?;
        for ent in rd.flatten() {
            let p = ent.path();
            if p.join("origin").is_file() && p.join("meta").is_file() {
                v.push(p);
            }
        }
        v.sort();
        Ok(v)
    }

    /// Open (or create) the cache for `origin`. `block_size` None keeps the
    /// existing cache's block size (or the default for a new one).
    pub(crate) fn open_image(
        &self,
        origin: Arc<dyn Origin>,
        block_size: Option<BlockSize>,
        stats: Arc<Stats>,
    ) -> Result<ImageCache> {
        let id = origin.identity().clone();
        let dir = self.image_dir(&id);
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let previous = Recorded::read(&dir);
        let bs = block_size
            .or(previous.as_ref().map(|p| p.block_size))
            .unwrap_or(BlockSize::DEFAULT);
        let want = Recorded {
            identity: id.clone(),
            block_size: bs,
        };
        let mut discard = false;
        if let Some(prev) = &previous {
            if prev.identity != id {
                tracing::warn!(
                    origin = %id.locator,
                    was_size = prev.identity.size,
                    was_validator = prev.identity.validator.as_deref().unwrap_or("none"),
                    now_size = id.size,
                    now_validator = id.validator.as_deref().unwrap_or("none"),
                    "origin changed since it was cached: discarding the old cache and starting fresh"
                );
                discard = true;
            } else if prev.block_size != bs {
                tracing::warn!(origin = %id.locator, was = %prev.block_size, now = %bs,
                    "block size changed: discarding the old cache");
                discard = true;
            }
        }
        // Lock before touching anything: two servers on one cache would
        // corrupt each other's view of the map.
        let lock = crate::store::lock_dir(&dir, "cache")?;
        if discard {
            let _ = fs::remove_file(dir.join("meta"));
            let _ = fs::remove_file(dir.join("data"));
        }
        if previous.as_ref() != Some(&want) {
            // `origin` is always whole.
            crate::util::write_atomic(&dir.join("origin"), want.encode().as_bytes())?;
        }
        let geometry = Geometry {
            block_size: bs,
            image_size: id.size,
            identity_hash: identity_hash(&id),
            crc_slots: 1,
        };
        let (store, fresh) = BlockStore::open(&dir, geometry)?;
        let cache = ImageCache::new(origin, store, stats, lock, dir.clone());
        let (present, zero, total) = cache.counts();
        tracing::info!(origin = %id.locator, dir = %dir.display(), block_size = %bs,
            present, zero, total, fresh, "cache opened");
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_round_trip() {
        let r = Recorded {
            identity: OriginIdentity {
                locator: "http://h/x.img".into(),
                size: 123,
                validator: Some("\"abc\"".into()),
            },
            block_size: BlockSize::DEFAULT,
        };
        assert_eq!(Recorded::decode(&r.encode()), Some(r.clone()));
        let none = Recorded {
            identity: OriginIdentity {
                validator: None,
                ..r.identity.clone()
            },
            ..r
        };
        assert_eq!(Recorded::decode(&none.encode()), Some(none));
    }

    #[test]
    fn slugs() {
        assert_eq!(slug("http://h:1/a/b/disk.img?sig=1"), "disk.img");
        assert_eq!(slug("http://h/"), "h");
        assert_eq!(slug("file:///x y"), "x_y");
    }
}
