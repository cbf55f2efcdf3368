//! Digests of whole images as their origins publish them (Glance's
//! `os_hash_algo`/`os_hash_value`, or its older md5 `checksum`), for a
//! reader that saw every byte (a completed hydration, a copy) to check
//! that what it got is what was published.

use md5::Md5;
use sha2::{Digest, Sha256, Sha384, Sha512};

use crate::error::{Error, ErrorKind, Result};

/// A digest of a whole image: `algo` as its publisher names it (`sha512`,
/// `sha256`, `md5`), `hex` lower-case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentDigest {
    pub algo: String,
    pub hex: String,
}

/// A running digest of one of the algorithms images are published with.
pub enum Hasher {
    Sha256(Sha256),
    Sha384(Sha384),
    Sha512(Sha512),
    Md5(Md5),
}

impl ContentDigest {
    /// A hasher for this digest's algorithm; an algorithm lazybd does not
    /// know is an error naming it (the check is not silently skipped).
    pub fn hasher(&self) -> Result<Hasher> {
        Ok(match self.algo.as_str() {
            "sha256" => Hasher::Sha256(Sha256::new()),
            "sha384" => Hasher::Sha384(Sha384::new()),
            "sha512" => Hasher::Sha512(Sha512::new()),
            "md5" => Hasher::Md5(Md5::new()),
            a => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!(
                        "image digest algorithm {a:?} (lazybd checks sha256, sha384, sha512, md5)"
                    ),
                ))
            }
        })
    }

    /// `Ok` if `got` (the hex of what was read) is this digest; else the
    /// error that reports the image as changed.
    pub fn check(&self, got: &str, image: &str) -> Result<()> {
        if got == self.hex {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::OriginChanged,
            format!(
                "{image}: the image's bytes have {} {got}, its origin publishes {}: they are \
                 not the image that was published",
                self.algo, self.hex
            ),
        ))
    }
}

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha384(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
            Hasher::Md5(h) => h.update(data),
        }
    }

    pub fn finish_hex(self) -> String {
        let bytes: Vec<u8> = match self {
            Hasher::Sha256(h) => h.finalize().to_vec(),
            Hasher::Sha384(h) => h.finalize().to_vec(),
            Hasher::Sha512(h) => h.finalize().to_vec(),
            Hasher::Md5(h) => h.finalize().to_vec(),
        };
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests_and_mismatches() {
        let d = |algo: &str, hex: &str| ContentDigest {
            algo: algo.into(),
            hex: hex.into(),
        };
        for (algo, hex) in [
            ("md5", "900150983cd24fb0d6963f7d28e17f72"),
            (
                "sha256",
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
        ] {
            let want = d(algo, hex);
            let mut h = want.hasher().unwrap();
            h.update(b"a");
            h.update(b"bc");
            want.check(&h.finish_hex(), "img").unwrap();
        }
        let e = d("sha256", "00").check("ff", "glance://i").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OriginChanged);
        assert!(e.to_string().contains("glance://i") && e.to_string().contains("publishes 00"));
        assert!(d("crc32", "0").hasher().is_err());
        let mut h = d("sha512", "").hasher().unwrap();
        h.update(b"abc");
        assert!(h.finish_hex().starts_with("ddaf35a193617aba"));
    }
}
