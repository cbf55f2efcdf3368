//! Units: byte ranges, block sizes and block indices, the split of a byte
//! range over the blocks it touches (head / body / tail), and the two rules
//! every layer applies to ranges and bytes (merging adjacent ranges, finding
//! all-zero bytes), written once.
//!
//! Every size that crosses a module boundary is one of these types, so a block
//! number is never confused with a byte offset.

use std::fmt;
use std::ops::Range;

use crate::error::{Error, ErrorKind, Result};

/// Merge ranges sorted by offset where one ends at the next's start (zero
/// ranges of a read, for structured-reply holes). The one implementation.
pub(crate) fn merge_adjacent(v: Vec<ByteRange>) -> Vec<ByteRange> {
    let mut out: Vec<ByteRange> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(m) if m.end() == r.offset => m.len += r.len,
            _ => out.push(r),
        }
    }
    out
}

/// A half-open byte range `[offset, offset + len)` of an image.
///
/// Invariant: `offset + len` does not overflow (checked by [`ByteRange::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

impl ByteRange {
    /// A range, refusing one whose end overflows `u64`.
    pub fn new(offset: u64, len: u64) -> Result<Self> {
        offset.checked_add(len).ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfRange,
                format!("offset {offset} + length {len} overflows"),
            )
        })?;
        Ok(ByteRange { offset, len })
    }

    pub fn end(&self) -> u64 {
        self.offset + self.len
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The overlap of two ranges, if any byte is shared.
    pub(crate) fn intersect(&self, other: &ByteRange) -> Option<ByteRange> {
        let start = self.offset.max(other.offset);
        let end = self.end().min(other.end());
        (start < end).then(|| ByteRange {
            offset: start,
            len: end - start,
        })
    }

    /// True when the whole range lies inside `[0, size)`.
    pub(crate) fn within(&self, size: u64) -> bool {
        self.end() <= size
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}+{}]", self.offset, self.len)
    }
}

/// The index of a cache block: byte offset / block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockIndex(pub u64);

impl fmt::Display for BlockIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// The unit of fetching and presence tracking. A power of two between
/// [`BlockSize::MIN`] and [`BlockSize::MAX`]; always a multiple of the 4 KiB
/// checksum page, so a page never straddles two blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSize(u32);

impl BlockSize {
    pub const MIN: u32 = 4096;
    pub const MAX: u32 = 16 << 20;
    /// 4 KiB, one checksum page: a cold random read fetches what it reads
    /// (bench/RESULTS.md: bytes fetched per 4K read bound cold random IOPS),
    /// while coalescing, readahead, neighbourhood fetches of clustered
    /// misses and profile replay make the fetches of sequential and boot
    /// reads large regardless (see ARCHITECTURE.md, "Block size").
    pub(crate) const DEFAULT: BlockSize = BlockSize(4 << 10);

    pub fn new(bytes: u64) -> Result<Self> {
        if !bytes.is_power_of_two() || bytes < Self::MIN as u64 || bytes > Self::MAX as u64 {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "block size {bytes} must be a power of two between {} and {}",
                    Self::MIN,
                    Self::MAX
                ),
            ));
        }
        Ok(BlockSize(bytes as u32))
    }

    pub fn bytes(self) -> u64 {
        self.0 as u64
    }

    pub(crate) fn get(self) -> u32 {
        self.0
    }

    /// The block holding byte `offset`.
    fn block_of(self, offset: u64) -> BlockIndex {
        BlockIndex(offset >> self.0.trailing_zeros())
    }

    /// Number of blocks needed for an image of `size` bytes (last may be short).
    pub fn count(self, size: u64) -> u64 {
        size.div_ceil(self.bytes())
    }

    /// Blocks touched by a non-empty range.
    pub(crate) fn covering(self, r: ByteRange) -> Range<u64> {
        if r.is_empty() {
            return 0..0;
        }
        self.block_of(r.offset).0..self.block_of(r.end() - 1).0 + 1
    }

    /// The bytes of block `b` in an image of `size` bytes (the last block is
    /// clipped to the image end).
    pub(crate) fn range_of(self, b: BlockIndex, size: u64) -> ByteRange {
        let offset = b.0 * self.bytes();
        ByteRange {
            offset,
            len: self.bytes().min(size.saturating_sub(offset)),
        }
    }

    /// Split `r` into (block, the part of `r` inside that block) pairs: the
    /// head and tail pieces may be partial blocks, the body pieces are whole.
    pub(crate) fn split(
        self,
        r: ByteRange,
        size: u64,
    ) -> impl Iterator<Item = (BlockIndex, ByteRange)> {
        self.covering(r).map(move |b| {
            let br = self.range_of(BlockIndex(b), size);
            let piece = br.intersect(&r).unwrap_or(ByteRange {
                offset: br.offset,
                len: 0,
            });
            (BlockIndex(b), piece)
        })
    }
}

impl fmt::Display for BlockSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", crate::util::human_bytes(self.bytes()))
    }
}

/// The checksum unit: one CRC32 per 4 KiB page of the image. Small enough
/// that a 4 KiB read verifies exactly what it serves, large enough that the
/// metadata is 0.1% of the image.
pub(crate) const PAGE: u64 = 4096;

/// Parse sizes like `65536`, `64k`, `64KiB`, `1M`, `1MiB`, `2g`.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| Error::new(ErrorKind::InvalidInput, format!("invalid size {s:?}")))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidInput,
                format!("invalid size unit in {s:?} (use k, M, G or T)"),
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::new(ErrorKind::InvalidInput, format!("size {s:?} too large")))
}

/// True when every byte is zero.
pub(crate) fn is_zero(data: &[u8]) -> bool {
    // SAFETY: u64 has no invalid bit patterns, so viewing aligned bytes as
    // u64 is sound; `align_to` leaves the unaligned ends as bytes.
    let (head, body, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&x| x == 0) && body.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12q").is_err());
        assert!(parse_size("").is_err());
        assert!(BlockSize::new(3000).is_err());
        assert!(BlockSize::new(1024).is_err());
        assert!(BlockSize::new(65536).is_ok());
    }

    #[test]
    fn overflow_is_refused() {
        assert!(ByteRange::new(u64::MAX, 1).is_err());
        assert!(ByteRange::new(u64::MAX - 1, 1).is_ok());
    }

    proptest! {
        /// The split covers the range exactly, in order, each piece inside its block.
        #[test]
        fn split_covers_range(shift in 12u32..20, size in 1u64..10_000_000, a in any::<u64>(), l in 0u64..3_000_000) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let offset = a % size;
            let len = l.min(size - offset);
            let r = ByteRange::new(offset, len).unwrap();
            let mut next = offset;
            let mut n = 0;
            for (b, piece) in bs.split(r, size) {
                prop_assert_eq!(piece.offset, next);
                prop_assert!(piece.len > 0);
                let br = bs.range_of(b, size);
                prop_assert!(br.offset <= piece.offset && piece.end() <= br.end());
                next = piece.end();
                n += 1;
            }
            prop_assert_eq!(next, r.end());
            prop_assert_eq!(n, bs.covering(r).count());
            prop_assert!(bs.count(size) * bs.bytes() >= size);
        }
    }
}
