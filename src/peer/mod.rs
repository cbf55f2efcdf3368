//! Peers: hosts that share the blocks of their verified caches, so that a
//! cluster booting one template costs its origin about one host's fetches.
//!
//! ```text
//!   cache -> Peered: owner of each 1 MiB unit? --self--> [Verified] -> origin
//!                         |--other host--> GET /v1/images/KEY (Range) -> check -> bytes
//!                                          (a miss, timeout, bad answer or digest:
//!                                           the origin instead, the peer avoided)
//! ```
//!
//! - `client`: [`Peered`](client::Peered), the origin layer above the
//!   manifest check: each unit of the image has one owner among the peers
//!   (rendezvous hashing, so a host joining or leaving moves only its own
//!   share); the owner fetches it from the origin once and the others from
//!   the owner. Every byte from a peer is checked against the image's
//!   manifest before it goes up; without a manifest peers are used only if
//!   the operator says so (`--peer-trust`).
//! - `server`: the HTTP endpoint (`--peer-listen`) serving ranges of the
//!   images this host caches, read through its cache (so the owner fetches
//!   what it is asked for once), behind a shared bearer token.

pub mod client;
pub mod server;

use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::origin::OriginIdentity;

/// Bytes of an image one owner is chosen for: large enough that a boot's
/// reads make few peer requests, small enough to spread a boot's working
/// set over the hosts.
pub const UNIT: u64 = 1 << 20;

/// How this host takes part in peer sharing; from the CLI or config.
#[derive(Debug, Clone, Default)]
pub struct PeerOptions {
    /// Serve this host's cached images to peers here.
    pub listen: Option<String>,
    /// This host's URL as the peers list names it [default: http://LISTEN].
    pub advertise: Option<String>,
    /// Peers' base URLs (this host's own URL may be among them).
    pub peers: Vec<String>,
    /// A file of peer URLs, one per line (`#` comments), re-read on reload.
    pub peers_file: Option<PathBuf>,
    /// The shared bearer token peers send and check.
    pub token: Option<String>,
    /// Use peers for images without a manifest (their bytes are then
    /// trusted as the origin's).
    pub trust_unverified: bool,
    /// One peer request's deadline.
    pub timeout: Duration,
}

impl PeerOptions {
    /// Whether this host fetches from peers at all.
    pub fn fetches(&self) -> bool {
        !self.peers.is_empty() || self.peers_file.is_some()
    }

    /// This host's own URL in peers lists, if it serves.
    pub fn own_url(&self) -> Option<String> {
        self.advertise
            .clone()
            .or_else(|| self.listen.as_ref().map(|l| format!("http://{l}")))
            .map(|u| normalize(&u))
    }
}

/// The default peer request deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A peer URL as compared and hashed: no trailing '/'.
pub fn normalize(url: &str) -> String {
    url.trim().trim_end_matches('/').to_string()
}

/// The name peers give an image: a digest of its identity, so two hosts
/// agree on it only for the same bytes (same size and validator).
pub fn image_key(id: &OriginIdentity) -> String {
    let mut h = Sha256::new();
    h.update(id.locator.as_bytes());
    h.update(b"\n");
    h.update(id.size.to_le_bytes());
    h.update(b"\n");
    h.update(id.validator.as_deref().unwrap_or("").as_bytes());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rendezvous (highest random weight) score of `peer` for unit `unit` of
/// the image `key`: every host computes the same owner from the same list,
/// and removing a peer moves only the units it owned.
pub fn score(peer: &str, key: &str, unit: u64) -> u64 {
    let mut h =
        crate::util::fnv64(peer.as_bytes()) ^ crate::util::fnv64(key.as_bytes()).rotate_left(17);
    h ^= unit.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    // splitmix64's finalizer: every input bit moves every output bit.
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The owner of `unit` among `peers`.
pub fn owner<'a>(peers: &'a [String], key: &str, unit: u64) -> Option<&'a str> {
    peers
        .iter()
        .max_by_key(|p| score(p, key, unit))
        .map(String::as_str)
}

/// Peer URLs from a peers file's text.
pub fn parse_peers_file(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(normalize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_and_move_only_their_share() {
        let peers: Vec<String> = (1..=8).map(|i| format!("http://10.0.0.{i}:7000")).collect();
        let key = "abc";
        let mut counts = std::collections::HashMap::new();
        for u in 0..8000 {
            *counts.entry(owner(&peers, key, u).unwrap()).or_insert(0) += 1;
        }
        // Every host owns about an eighth.
        for (p, n) in &counts {
            assert!((800..1200).contains(n), "{p} owns {n} of 8000");
        }
        // Losing one host moves only the units it owned.
        let fewer: Vec<String> = peers[1..].to_vec();
        for u in 0..8000 {
            let before = owner(&peers, key, u).unwrap();
            let after = owner(&fewer, key, u).unwrap();
            if before != peers[0] {
                assert_eq!(before, after, "unit {u} moved though its owner stayed");
            }
        }
    }

    #[test]
    fn keys_and_files() {
        let id = OriginIdentity {
            locator: "s3://b/k".into(),
            size: 10,
            validator: Some("\"e\"".into()),
        };
        let other = OriginIdentity {
            validator: Some("\"f\"".into()),
            ..id.clone()
        };
        assert_eq!(image_key(&id).len(), 32);
        assert_ne!(image_key(&id), image_key(&other));
        assert_eq!(
            parse_peers_file("# hosts\nhttp://a:1/\n\n  http://b:2 # rack 2\n"),
            ["http://a:1", "http://b:2"]
        );
    }
}
