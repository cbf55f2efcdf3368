//! The overlay's on-disk format (version 2): pure encoding and decoding,
//! no I/O, fuzzed (`fuzz/fuzz_targets/overlay_journal.rs`, for which the
//! encoders and decoders here are public).
//!
//! An overlay directory holds `base` (what it was made over), `lock`, and:
//!
//! ```text
//! pages    slot 0: header; slot n >= 1: one 4 KiB page of guest data
//! journal  0..4096: header; then 32-byte records, appended
//!
//! header (first 64 bytes of a 4 KiB page, the rest zero)
//!   0  magic "LAZYBDOJ" (journal) / "LAZYBDOP" (pages)
//!   8  version u32 = 2          12 header length u32 = 64
//!  16  generation u64 (journal: bumped by every compaction)
//!  24  image size u64           32 page size u32 = 4096
//!  36  reserved u32             40 identity hash u64 (of `base`)
//!  48  reserved [12]            60 crc32 of bytes 0..60
//!
//! record (32 bytes, little endian)
//!   0 kind u8 (1 data, 2 zero, 3 flush)   1 reserved [3]
//!   4 generation u32 (low bits of the journal's)
//!   8 page u64                             16 arg u64
//!  24 data crc32 (kind 1)                  28 crc32 of bytes 0..28
//!   data:  page `page` lives in slot `arg`, its bytes have crc `data crc`
//!   zero:  pages [page, page + arg) read as zeroes
//!   flush: every record before journal offset `arg` has its data durable
//! ```
//!
//! Version 1 (`meta` + `data`, a block map preallocated for the whole
//! image) is migrated by `migrate.rs`. A file of a newer version is
//! refused, never rewritten.

use crate::block::PAGE;

pub(crate) const VERSION: u32 = 2;
pub const JOURNAL_MAGIC: &[u8; 8] = b"LAZYBDOJ";
pub const PAGES_MAGIC: &[u8; 8] = b"LAZYBDOP";
const HEADER_LEN: usize = 64;
/// Records start after the header page.
pub(crate) const RECORDS_START: u64 = PAGE;
pub const RECORD: usize = 32;
/// Slots are below this (4 PiB of pages): a record naming a larger one is
/// not a record any writer produced.
const MAX_SLOT: u64 = 1 << 40;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: [u8; 8],
    pub generation: u64,
    pub image_size: u64,
    pub identity: u64,
}

/// Why a header could not be used; each names what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderError {
    /// Not a lazybd overlay file at all (magic differs), or too short.
    NotOverlay,
    /// Written by a newer lazybd.
    Newer(u32),
    /// An older version this code does not read in place.
    Older(u32),
    /// The header's checksum does not match its bytes.
    Checksum { stored: u32, computed: u32 },
    /// A field has a value this version never writes.
    Field(&'static str, u64),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::NotOverlay => write!(f, "not a lazybd overlay file (bad magic)"),
            HeaderError::Newer(v) => write!(
                f,
                "format version {v}, written by a newer lazybd (this one reads version {VERSION})"
            ),
            HeaderError::Older(v) => write!(f, "format version {v} (expected {VERSION})"),
            HeaderError::Checksum { stored, computed } => write!(
                f,
                "header checksum mismatch (stored {stored:08x}, computed {computed:08x}): damaged header"
            ),
            HeaderError::Field(name, v) => write!(f, "header field {name} = {v} is invalid"),
        }
    }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// The full 4 KiB header page.
    pub fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; PAGE as usize];
        h[..8].copy_from_slice(&self.magic);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.generation.to_le_bytes());
        h[24..32].copy_from_slice(&self.image_size.to_le_bytes());
        h[32..36].copy_from_slice(&(PAGE as u32).to_le_bytes());
        h[40..48].copy_from_slice(&self.identity.to_le_bytes());
        let crc = crc32fast::hash(&h[..60]);
        h[60..64].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Decode a header with the given magic. The version is checked before
    /// the checksum, so a file from a newer lazybd is reported as such
    /// even if its header layout changed.
    pub fn decode(b: &[u8], magic: &[u8; 8]) -> Result<Header, HeaderError> {
        if b.len() < HEADER_LEN || &b[..8] != magic {
            return Err(HeaderError::NotOverlay);
        }
        let version = u32_at(b, 8);
        if version > VERSION {
            return Err(HeaderError::Newer(version));
        }
        if version < VERSION {
            return Err(HeaderError::Older(version));
        }
        let stored = u32_at(b, 60);
        let computed = crc32fast::hash(&b[..60]);
        if stored != computed {
            return Err(HeaderError::Checksum { stored, computed });
        }
        let len = u32_at(b, 12);
        if len as usize != HEADER_LEN {
            return Err(HeaderError::Field("header length", len as u64));
        }
        let page = u32_at(b, 32);
        if page as u64 != PAGE {
            return Err(HeaderError::Field("page size", page as u64));
        }
        let mut m = [0u8; 8];
        m.copy_from_slice(&b[..8]);
        Ok(Header {
            magic: m,
            generation: u64_at(b, 16),
            image_size: u64_at(b, 24),
            identity: u64_at(b, 40),
        })
    }
}

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `page` lives in `slot`; its bytes hash to `crc`.
    Data { page: u64, slot: u64, crc: u32 },
    /// `[page, page + count)` read as zeroes.
    Zero { page: u64, count: u64 },
    /// Every record before journal offset `covered` has durable data.
    Flush { covered: u64 },
}

impl Record {
    pub fn encode(&self, generation: u64) -> [u8; RECORD] {
        let mut r = [0u8; RECORD];
        let (kind, page, arg, crc) = match *self {
            Record::Data { page, slot, crc } => (1u8, page, slot, crc),
            Record::Zero { page, count } => (2, page, count, 0),
            Record::Flush { covered } => (3, 0, covered, 0),
        };
        r[0] = kind;
        r[4..8].copy_from_slice(&(generation as u32).to_le_bytes());
        r[8..16].copy_from_slice(&page.to_le_bytes());
        r[16..24].copy_from_slice(&arg.to_le_bytes());
        r[24..28].copy_from_slice(&crc.to_le_bytes());
        let c = crc32fast::hash(&r[..28]);
        r[28..32].copy_from_slice(&c.to_le_bytes());
        r
    }

    /// Decode a record of journal generation `generation`; `None` for
    /// anything else (torn, never written, from another generation, or a
    /// value no writer produces for an image of `pages` pages).
    pub fn decode(b: &[u8], generation: u64, pages: u64) -> Option<Record> {
        if b.len() < RECORD {
            return None;
        }
        if u32_at(b, 28) != crc32fast::hash(&b[..28]) || u32_at(b, 4) != generation as u32 {
            return None;
        }
        if b[1..4] != [0, 0, 0] {
            return None;
        }
        let page = u64_at(b, 8);
        let arg = u64_at(b, 16);
        let crc = u32_at(b, 24);
        match b[0] {
            1 if page < pages && (1..MAX_SLOT).contains(&arg) => Some(Record::Data {
                page,
                slot: arg,
                crc,
            }),
            2 if arg >= 1 && page < pages && arg <= pages - page && crc == 0 => {
                Some(Record::Zero { page, count: arg })
            }
            3 if page == 0 && crc == 0 && arg >= RECORDS_START => {
                Some(Record::Flush { covered: arg })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> Header {
        Header {
            magic: *JOURNAL_MAGIC,
            generation: 7,
            image_size: 1 << 30,
            identity: 0xdead_beef,
        }
    }

    #[test]
    fn header_round_trips_and_names_what_is_wrong() {
        let h = header();
        let b = h.encode();
        assert_eq!(Header::decode(&b, JOURNAL_MAGIC), Ok(h));
        assert_eq!(
            Header::decode(&b, PAGES_MAGIC),
            Err(HeaderError::NotOverlay)
        );
        let mut newer = b.clone();
        newer[8] = 3;
        assert_eq!(
            Header::decode(&newer, JOURNAL_MAGIC),
            Err(HeaderError::Newer(3))
        );
        let mut older = b.clone();
        older[8] = 1;
        assert_eq!(
            Header::decode(&older, JOURNAL_MAGIC),
            Err(HeaderError::Older(1))
        );
        let mut flipped = b.clone();
        flipped[30] ^= 1;
        assert!(matches!(
            Header::decode(&flipped, JOURNAL_MAGIC),
            Err(HeaderError::Checksum { .. })
        ));
    }

    #[test]
    fn a_zeroed_record_is_not_a_record() {
        assert_eq!(Record::decode(&[0u8; RECORD], 0, 100), None);
        assert_eq!(Record::decode(&[0u8; RECORD], 1, 100), None);
    }

    proptest! {
        #[test]
        fn records_round_trip(kind in 0u8..3, page in 0u64..1000, arg in 1u64..1000,
                              crc in any::<u32>(), generation in any::<u64>()) {
            let pages = 2000;
            let r = match kind {
                0 => Record::Data { page, slot: arg, crc },
                1 => Record::Zero { page, count: arg },
                _ => Record::Flush { covered: arg + RECORDS_START },
            };
            let b = r.encode(generation);
            prop_assert_eq!(Record::decode(&b, generation, pages), Some(r));
            prop_assert_eq!(Record::decode(&b, generation.wrapping_add(1), pages), None);
        }

        #[test]
        fn any_bit_flip_is_caught(i in 0usize..RECORD * 8, page in 0u64..1000) {
            let r = Record::Data { page, slot: 5, crc: 9 };
            let mut b = r.encode(1);
            b[i / 8] ^= 1 << (i % 8);
            prop_assert_eq!(Record::decode(&b, 1, 2000), None);
        }

        #[test]
        fn decoding_never_panics(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Record::decode(&b, 1, 10);
            let _ = Header::decode(&b, JOURNAL_MAGIC);
        }
    }
}
