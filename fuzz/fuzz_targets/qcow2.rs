//! qcow2 templates (`format::qcow2`): images come from an origin, often
//! an image service anyone with an account uploads to, so every byte of
//! the header and the tables is hostile input.
//!
//! The input is the whole image file. It is opened through the decoder
//! over an in-memory file whose reads assert they stay inside it; when it
//! opens, the first 256 KiB and the last bytes of the disk are read in odd
//! pieces, with `read_now` and block status over each.
//!
//! Properties: no panic, no read outside the file; a read returns exactly
//! its length, with zero ranges inside it that read as zeroes; `read_now`,
//! when it answers, agrees with `read`; block status covers the range.

#![no_main]

use std::sync::Arc;

use bytes::Bytes;
use lazybd::block::ByteRange;
use lazybd::device::{BlockDevice, BoxFuture, Extent, ReadData};
use lazybd::error::Result;
use libfuzzer_sys::fuzz_target;

struct File(Bytes);

impl File {
    fn slice(&self, r: ByteRange) -> ReadData {
        assert!(
            r.end() <= self.0.len() as u64,
            "the decoder read {r:?} past the {} B file",
            self.0.len()
        );
        ReadData {
            data: self.0.slice(r.offset as usize..r.end() as usize),
            zero: Vec::new(),
        }
    }
}

impl BlockDevice for File {
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

const HEAD: u64 = 256 << 10;
const PIECE: u64 = 12_345;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let file = Arc::new(File(Bytes::copy_from_slice(data)));
        let Ok(dev) = lazybd::format::qcow2::open(file, "fuzz").await else {
            return;
        };
        let size = dev.size();
        let mut reads = Vec::new();
        let head = size.min(HEAD);
        let mut off = 0;
        while off < head {
            let len = (head - off).min(PIECE);
            reads.push((off, len));
            off += len;
        }
        if size > head {
            let len = (size - head).min(4096);
            reads.push((size - len, len));
        }
        for (off, len) in reads {
            let r = ByteRange::new(off, len).expect("inside the disk");
            if let Ok(d) = dev.read(r).await {
                assert_eq!(d.data.len() as u64, len, "read {r:?}");
                for z in &d.zero {
                    assert!(z.offset >= off && z.end() <= r.end(), "zero {z:?} outside {r:?}");
                    let at = (z.offset - off) as usize;
                    assert!(
                        d.data[at..at + z.len as usize].iter().all(|&b| b == 0),
                        "zero range {z:?} holds data"
                    );
                }
                if let Some(Ok(now)) = dev.read_now(r) {
                    assert_eq!(now.data, d.data, "read_now {r:?} differs from read");
                }
            }
            if let Ok(ext) = dev.extents(r) {
                assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), len, "extents of {r:?}");
            }
        }
    });
});
