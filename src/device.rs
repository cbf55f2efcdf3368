//! The NBD-facing device: the traits every layer of an export implements
//! (the read side, and the write side only writable exports have), and the
//! values they pass. A leaf: it knows units and errors, nothing above.
//!
//! Layers compose in one place, `export::stack`; the protocol edge
//! (`nbd::transmission`) has validated every request before it reaches a
//! device, so implementations only `debug_assert!` their contracts.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::block::ByteRange;
use crate::error::Result;

/// The future of an asynchronous device or origin operation.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

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

/// Devices for unit tests of the layers above a device.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An image in memory. Reads outside it panic: a layer above must
    /// never ask for one (the contract of [`BlockDevice::read`]).
    pub(crate) struct MemDevice(pub(crate) Bytes);

    impl MemDevice {
        fn slice(&self, r: ByteRange) -> ReadData {
            assert!(
                r.end() <= self.0.len() as u64,
                "read {r:?} past the {} B device",
                self.0.len()
            );
            ReadData {
                data: self.0.slice(r.offset as usize..r.end() as usize),
                zero: Vec::new(),
            }
        }
    }

    impl BlockDevice for MemDevice {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
            let d = self.slice(r);
            Box::pin(async move { Ok(d) })
        }
        fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
            Ok(vec![Extent {
                len: r.len,
                zero: false,
            }])
        }
        fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
            Some(Ok(self.slice(r)))
        }
        fn flush(&self) -> BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }
}
