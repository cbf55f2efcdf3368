//! The qcow2 layout, decoded: the header (what an image is and whether
//! lazybd can serve it) and the table entries (where a guest cluster's bytes
//! are). Pure functions over bytes, no I/O, fuzzed through the whole decoder
//! (`fuzz/fuzz_targets/qcow2.rs`).
//!
//! Everything in a template is untrusted input: every field is checked here,
//! once, against the image file's size and qemu's own limits, so the reader
//! (`super`) never computes an offset that overflows or reaches outside
//! the file, and a damaged or hostile image is refused with an error that
//! names what is wrong, never decoded into wrong bytes.
//!
//! Decoded read-only: refcounts, snapshots and bitmaps do not change what the
//! active disk reads, so they are not read at all.

use crate::error::{Error, ErrorKind, Result};

/// The first four bytes of every qcow2 image.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Bytes of the header that must be read to decode it (v3 with the
/// compression type; v2 headers are shorter).
pub const HEADER_LEN: usize = 112;

/// qemu's cluster size limits: 512 B to 2 MiB.
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// qemu refuses L1 tables larger than this (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Extended L2 entries need clusters of at least 16 KiB (32 subclusters of
/// at least 512 bytes).
const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// Bits 9..=55: an L1 or L2 entry's host offset (cluster aligned).
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 entry: the cluster is compressed.
const COMPRESSED: u64 = 1 << 62;
/// Standard L2 entry (not extended): the cluster reads as zeroes.
const ZERO: u64 = 1;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = INCOMPAT_DIRTY
    | INCOMPAT_CORRUPT
    | INCOMPAT_DATA_FILE
    | INCOMPAT_COMPRESSION
    | INCOMPAT_EXTENDED_L2;

/// How compressed clusters are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (no zlib header), qemu's default.
    Zlib,
    /// Zstandard (qcow2 v3, `compression_type=zstd`).
    Zstd,
}

/// What lazybd needs of a qcow2 image, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    /// The guest disk's size in bytes.
    pub size: u64,
    pub l1_entries: u32,
    pub l1_offset: u64,
    pub compression: Compression,
    /// 128-bit L2 entries with 32 subclusters per cluster.
    pub extended_l2: bool,
    /// The dirty bit: refcounts may be stale. Reads do not use them.
    pub dirty: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn bad(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Corrupt, msg)
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unsupported, msg)
}

/// True if `head` starts like a qcow2 image.
pub fn looks_like_qcow2(head: &[u8]) -> bool {
    head.len() >= 4 && head[..4] == MAGIC
}

impl Header {
    /// Decode and check the header in `head` (the image's first bytes, at
    /// least [`HEADER_LEN`] of them unless the file is shorter) of an image
    /// file of `file_size` bytes. Errors say what is wrong: a damaged
    /// header is `Corrupt`; a valid image lazybd cannot serve (a backing
    /// file, encryption, an external data file, an unknown feature) is
    /// `Unsupported`, with what to do about it.
    pub fn parse(head: &[u8], file_size: u64) -> Result<Header> {
        if !looks_like_qcow2(head) {
            return Err(bad("not a qcow2 image (no QFI\\xfb magic)"));
        }
        if head.len() < 72 {
            return Err(bad(format!(
                "qcow2 header truncated ({} bytes, at least 72 needed)",
                head.len()
            )));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
                "qcow2 version {version} (lazybd reads versions 2 and 3)"
            )));
        }
        let cluster_bits = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(bad(format!(
                "qcow2 cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster = 1u64 << cluster_bits;
        let (incompat, header_len) = if version == 3 {
            if head.len() < 104 {
                return Err(bad(format!(
                    "qcow2 v3 header truncated ({} bytes, at least 104 needed)",
                    head.len()
                )));
            }
            let header_len = be32(head, 100);
            if header_len < 104 || u64::from(header_len) > cluster {
                return Err(bad(format!(
                    "qcow2 header_length {header_len} outside 104..={cluster}"
                )));
            }
            (be64(head, 72), header_len)
        } else {
            (0, 72)
        };
        if incompat & INCOMPAT_CORRUPT != 0 {
            return Err(bad(
                "the image is marked corrupt (qcow2 incompatible feature bit 1); \
                 repair it with `qemu-img check -r all` before serving it",
            ));
        }
        if incompat & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported(
                "the image keeps its data in an external data file (qcow2 data-file), \
                 which lazybd does not read; convert it with `qemu-img convert -O qcow2`",
            ));
        }
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(unsupported(format!(
                "the image needs qcow2 features lazybd does not know \
                 (incompatible feature bits {unknown:#x})"
            )));
        }
        let compression =
            if header_len >= 105 && head.len() >= 105 {
                match (head[104], incompat & INCOMPAT_COMPRESSION != 0) {
                    (0, _) => Compression::Zlib,
                    (1, true) => Compression::Zstd,
                    (1, false) => return Err(bad(
                        "qcow2 compression_type is zstd but its incompatible feature bit is clear",
                    )),
                    (t, _) => {
                        return Err(unsupported(format!(
                            "qcow2 compression_type {t} (lazybd knows 0 = zlib, 1 = zstd)"
                        )))
                    }
                }
            } else if incompat & INCOMPAT_COMPRESSION != 0 {
                return Err(bad(
                "qcow2 compression type feature set but the header has no compression_type field",
            ));
            } else {
                Compression::Zlib
            };
        let extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(bad(format!(
                "qcow2 extended L2 entries with {cluster} B clusters (at least 16 KiB needed)"
            )));
        }
        let backing_offset = be64(head, 8);
        if backing_offset != 0 {
            let len = be32(head, 16) as usize;
            let name = usize::try_from(backing_offset)
                .ok()
                .and_then(|o| head.get(o..o.checked_add(len)?))
                .map(|n| format!(" ({:?})", String::from_utf8_lossy(n)))
                .unwrap_or_default();
            return Err(unsupported(format!(
                "the image has a backing file{name}; lazybd does not serve layered qcow2 \
                 images yet: flatten it with `qemu-img convert -O qcow2 IMAGE FLAT`"
            )));
        }
        match be32(head, 32) {
            0 => {}
            m => {
                return Err(unsupported(format!(
                "the image is encrypted (qcow2 crypt_method {m}: {}), which lazybd does not serve",
                if m == 1 {
                    "AES"
                } else if m == 2 {
                    "LUKS"
                } else {
                    "unknown"
                }
            )))
            }
        }
        let size = be64(head, 24);
        if size > i64::MAX as u64 {
            return Err(bad(format!("qcow2 virtual size {size} too large")));
        }
        let l1_entries = be32(head, 36);
        let l1_offset = be64(head, 40);
        let l1_bytes = u64::from(l1_entries) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!(
                "qcow2 L1 table of {l1_entries} entries (at most {} allowed)",
                MAX_L1_BYTES / 8
            )));
        }
        let entry = if extended_l2 { 16 } else { 8 };
        // Guest bytes one L1 entry (one L2 table) maps.
        let per_l2 = (cluster / entry) * cluster;
        let needed = size.div_ceil(per_l2);
        if u64::from(l1_entries) < needed {
            return Err(bad(format!(
                "qcow2 L1 table of {l1_entries} entries is too small for a {size} B disk \
                 ({needed} needed)"
            )));
        }
        if l1_entries > 0 {
            if l1_offset % cluster != 0 {
                return Err(bad(format!(
                    "qcow2 L1 table offset {l1_offset} is not cluster aligned"
                )));
            }
            if l1_offset
                .checked_add(l1_bytes)
                .map_or(true, |end| end > file_size)
            {
                return Err(bad(format!(
                    "qcow2 L1 table ({l1_bytes} B at {l1_offset}) reaches past the end of \
                     the {file_size} B image file"
                )));
            }
        }
        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_entries,
            l1_offset,
            compression,
            extended_l2,
            dirty: incompat & INCOMPAT_DIRTY != 0,
        })
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes per L2 entry.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table (a table is one cluster).
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }

    /// The L1 index and L2 index of guest offset `off`.
    pub fn indices(&self, off: u64) -> (u64, u64) {
        let cluster = off >> self.cluster_bits;
        let per = self.l2_entries();
        (cluster / per, cluster % per)
    }

    /// The unit a mapping covers: a subcluster with extended L2 entries,
    /// else a cluster.
    pub fn unit_bits(&self) -> u32 {
        if self.extended_l2 {
            self.cluster_bits - SUBCLUSTERS.trailing_zeros()
        } else {
            self.cluster_bits
        }
    }

    /// Decode an L1 entry: the host offset of its L2 table, or `None` if
    /// the table is unallocated (every cluster it maps reads as zeroes).
    pub fn l2_table(&self, l1_entry: u64, file_size: u64) -> Result<Option<u64>> {
        let off = l1_entry & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cluster_size() != 0 {
            return Err(bad(format!(
                "qcow2 L2 table offset {off:#x} is not cluster aligned"
            )));
        }
        if off
            .checked_add(self.cluster_size())
            .map_or(true, |end| end > file_size)
        {
            return Err(bad(format!(
                "qcow2 L2 table at {off:#x} reaches past the end of the {file_size} B image file"
            )));
        }
        Ok(Some(off))
    }

    /// Where the bytes of guest unit `unit` (a subcluster index within its
    /// cluster with extended L2 entries, else 0) of the cluster described by
    /// L2 entry `e` (and `bitmap`, the second word of an extended entry)
    /// are.
    pub fn map(&self, e: u64, bitmap: u64, unit: u32, file_size: u64) -> Result<Mapping> {
        if e & COMPRESSED != 0 {
            return self.compressed(e, file_size);
        }
        let host = e & OFFSET_MASK;
        if host != 0 && host % self.cluster_size() != 0 {
            return Err(bad(format!(
                "qcow2 data cluster offset {host:#x} is not cluster aligned"
            )));
        }
        if self.extended_l2 {
            let alloc = bitmap as u32;
            let zero = (bitmap >> 32) as u32;
            if alloc & zero != 0 {
                return Err(bad(format!(
                    "qcow2 extended L2 bitmap {bitmap:#x} marks subclusters both allocated \
                     and zero"
                )));
            }
            let bit = 1u32 << unit;
            if zero & bit != 0 {
                return Ok(Mapping::Zero);
            }
            if alloc & bit == 0 {
                return Ok(Mapping::Unallocated);
            }
            if host == 0 {
                return Err(bad(
                    "qcow2 extended L2 entry has allocated subclusters but no host cluster",
                ));
            }
            let sub = self.cluster_size() / u64::from(SUBCLUSTERS);
            return Ok(Mapping::Data {
                host: host + u64::from(unit) * sub,
            });
        }
        if e & ZERO != 0 {
            if self.version == 2 {
                return Err(bad("qcow2 v2 image has a zero cluster (a v3 feature)"));
            }
            return Ok(Mapping::Zero);
        }
        if host == 0 {
            return Ok(Mapping::Unallocated);
        }
        Ok(Mapping::Data { host })
    }

    /// A compressed cluster's descriptor: bits `0..x` its byte offset,
    /// bits `x..62` the count of 512-byte sectors it spans beyond the one
    /// holding its first byte, where `x = 62 - (cluster_bits - 8)`.
    fn compressed(&self, e: u64, file_size: u64) -> Result<Mapping> {
        let x = 62 - (self.cluster_bits - 8);
        let host = e & ((1u64 << x) - 1);
        let sectors = ((e >> x) & ((1u64 << (62 - x)) - 1)) + 1;
        // From the first byte to the end of the last sector it names.
        let len = sectors * 512 - (host & 511);
        if host >= file_size {
            return Err(bad(format!(
                "qcow2 compressed cluster at {host:#x} lies past the end of the \
                 {file_size} B image file"
            )));
        }
        // The last sector may reach past the end of the file: the file ends
        // where the compressed stream does.
        let len = len.min(file_size - host);
        Ok(Mapping::Compressed { host, len })
    }
}

/// Where one guest cluster's (or subcluster's) bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not allocated: reads as zeroes (lazybd serves no backing files).
    Unallocated,
    /// Explicitly zero.
    Zero,
    /// Stored as is at host offset `host` (of this unit).
    Data { host: u64 },
    /// Compressed: `len` bytes at `host` hold the whole cluster.
    Compressed { host: u64, len: u64 },
}

impl Mapping {
    pub fn reads_zero(&self) -> bool {
        matches!(self, Mapping::Unallocated | Mapping::Zero)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header with 64 KiB clusters for a `size` B disk, L1 at 192 KiB.
    fn v3(size: u64) -> Vec<u8> {
        let mut h = vec![0u8; 512];
        h[..4].copy_from_slice(&MAGIC);
        h[4..8].copy_from_slice(&3u32.to_be_bytes());
        h[20..24].copy_from_slice(&16u32.to_be_bytes());
        h[24..32].copy_from_slice(&size.to_be_bytes());
        let l1 = size.div_ceil(8192 * 65536).max(1) as u32;
        h[36..40].copy_from_slice(&l1.to_be_bytes());
        h[40..48].copy_from_slice(&(3u64 << 16).to_be_bytes());
        h[96..100].copy_from_slice(&4u32.to_be_bytes());
        h[100..104].copy_from_slice(&112u32.to_be_bytes());
        h
    }

    const FILE: u64 = 1 << 30;

    #[test]
    fn a_plain_v3_header_decodes() {
        let h = Header::parse(&v3(10 << 30), FILE).unwrap();
        assert_eq!(h.size, 10 << 30);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.l1_entries, 20);
        assert_eq!(h.compression, Compression::Zlib);
        assert!(!h.extended_l2 && !h.dirty);
        assert_eq!(h.indices((512 << 20) + 65536 * 3 + 5), (1, 3));
    }

    #[test]
    fn refusals_name_the_problem() {
        type Edit = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(Edit, &str, ErrorKind)> = vec![
            (Box::new(|h| h[0] = b'X'), "magic", ErrorKind::Corrupt),
            (
                Box::new(|h| h[4..8].copy_from_slice(&4u32.to_be_bytes())),
                "version 4",
                ErrorKind::Unsupported,
            ),
            (
                Box::new(|h| h[20..24].copy_from_slice(&22u32.to_be_bytes())),
                "cluster_bits 22",
                ErrorKind::Corrupt,
            ),
            (
                Box::new(|h| {
                    h[8..16].copy_from_slice(&300u64.to_be_bytes());
                    h[16..20].copy_from_slice(&4u32.to_be_bytes());
                    h[300..304].copy_from_slice(b"base");
                }),
                "backing file (\"base\")",
                ErrorKind::Unsupported,
            ),
            (
                Box::new(|h| h[32..36].copy_from_slice(&2u32.to_be_bytes())),
                "LUKS",
                ErrorKind::Unsupported,
            ),
            (
                Box::new(|h| h[79] = 2),
                "marked corrupt",
                ErrorKind::Corrupt,
            ),
            (
                Box::new(|h| h[79] = 4),
                "external data file",
                ErrorKind::Unsupported,
            ),
            (
                Box::new(|h| h[79] = 0x20),
                "bits 0x20",
                ErrorKind::Unsupported,
            ),
            (Box::new(|h| h[104] = 1), "bit is clear", ErrorKind::Corrupt),
            (
                Box::new(|h| {
                    h[79] = 8;
                    h[104] = 7
                }),
                "compression_type 7",
                ErrorKind::Unsupported,
            ),
            (
                Box::new(|h| h[36..40].copy_from_slice(&1u32.to_be_bytes())),
                "too small",
                ErrorKind::Corrupt,
            ),
            (
                Box::new(|h| h[40..48].copy_from_slice(&(FILE - 8).to_be_bytes())),
                "not cluster aligned",
                ErrorKind::Corrupt,
            ),
            (
                Box::new(|h| h[40..48].copy_from_slice(&FILE.to_be_bytes())),
                "past the end",
                ErrorKind::Corrupt,
            ),
            (
                Box::new(|h| h[100..104].copy_from_slice(&90u32.to_be_bytes())),
                "header_length 90",
                ErrorKind::Corrupt,
            ),
            (
                Box::new(|h| {
                    h[79] = 0x10;
                    h[20..24].copy_from_slice(&12u32.to_be_bytes());
                    h[36..40].copy_from_slice(&10000u32.to_be_bytes());
                    h[40..48].copy_from_slice(&4096u64.to_be_bytes());
                }),
                "extended L2",
                ErrorKind::Corrupt,
            ),
        ];
        for (edit, want, kind) in cases {
            let mut h = v3(10 << 30);
            edit(&mut h);
            let e = Header::parse(&h, FILE).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
            assert_eq!(e.kind(), kind, "{e}");
        }
    }

    #[test]
    fn dirty_zstd_and_v2_headers_decode() {
        let mut h = v3(1 << 20);
        h[79] = 8 | 1;
        h[104] = 1;
        let d = Header::parse(&h, FILE).unwrap();
        assert_eq!(d.compression, Compression::Zstd);
        assert!(d.dirty);
        let mut h = v3(1 << 20);
        h[4..8].copy_from_slice(&2u32.to_be_bytes());
        h[72..].fill(0xee); // v2 has no fields past 72: ignored.
        let d = Header::parse(&h[..72], FILE).unwrap();
        assert_eq!((d.version, d.compression), (2, Compression::Zlib));
    }

    #[test]
    fn entries_map_to_data_zero_holes_and_compressed_ranges() {
        let h = Header::parse(&v3(1 << 30), FILE).unwrap();
        assert_eq!(h.map(0, 0, 0, FILE).unwrap(), Mapping::Unallocated);
        assert_eq!(h.map(1, 0, 0, FILE).unwrap(), Mapping::Zero);
        // A preallocated zero cluster still reads as zero.
        assert_eq!(h.map((5 << 16) | 1, 0, 0, FILE).unwrap(), Mapping::Zero);
        let copied = 1u64 << 63;
        assert_eq!(
            h.map(copied | (5 << 16), 0, 0, FILE).unwrap(),
            Mapping::Data { host: 5 << 16 }
        );
        assert!(
            h.map(5 << 12, 0, 0, FILE).is_err(),
            "unaligned data cluster"
        );
        // 64 KiB clusters: x = 54; 2 more sectors beyond the first, at
        // offset 1000 (488 bytes left in its sector).
        let e = COMPRESSED | (2 << 54) | 1000;
        assert_eq!(
            h.map(e, 0, 0, FILE).unwrap(),
            Mapping::Compressed {
                host: 1000,
                len: 3 * 512 - 488
            }
        );
        // Clamped to the end of the file.
        assert_eq!(
            h.map(e, 0, 0, 1100).unwrap(),
            Mapping::Compressed {
                host: 1000,
                len: 100
            }
        );
        assert!(h.map(e, 0, 0, 1000).is_err());
        assert_eq!(h.l2_table(0, FILE).unwrap(), None);
        assert_eq!(h.l2_table(copied | (7 << 16), FILE).unwrap(), Some(7 << 16));
        assert!(h.l2_table(7 << 15, FILE).is_err());
        assert!(h.l2_table(FILE, FILE).is_err());
    }

    #[test]
    fn extended_entries_map_subclusters() {
        let mut raw = v3(1 << 30);
        raw[79] = 0x10;
        raw[36..40].copy_from_slice(&4u32.to_be_bytes());
        let h = Header::parse(&raw, FILE).unwrap();
        assert_eq!(h.l2_entries(), 4096);
        assert_eq!(h.unit_bits(), 11);
        let e = 9u64 << 16;
        let bitmap = 0b0101 | (0b0010u64 << 32);
        assert_eq!(
            h.map(e, bitmap, 0, FILE).unwrap(),
            Mapping::Data { host: 9 << 16 }
        );
        assert_eq!(h.map(e, bitmap, 1, FILE).unwrap(), Mapping::Zero);
        assert_eq!(
            h.map(e, bitmap, 2, FILE).unwrap(),
            Mapping::Data {
                host: (9 << 16) + 2 * 2048
            }
        );
        assert_eq!(h.map(e, bitmap, 3, FILE).unwrap(), Mapping::Unallocated);
        assert!(h.map(e, 1 | (1 << 32), 0, FILE).is_err(), "both bits");
        assert!(h.map(0, 1, 0, FILE).is_err(), "allocated without a cluster");
    }
}
