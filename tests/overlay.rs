//! Property test: the copy-on-write overlay against a plain byte-vector
//! model, under random writes, trims, zeroes, reads, flushes and reopens at
//! random alignments. The base never changes.

use std::sync::Arc;

use bytes::Bytes;
use lazybd::block::ByteRange;
use lazybd::device::{BlockDevice, BoxFuture, Extent, ReadData, Writable, ZeroFlags};
use lazybd::error::Result;
use lazybd::overlay::Overlay;
use proptest::prelude::*;

struct MemBase(Vec<u8>);

impl BlockDevice for MemBase {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        let d = Bytes::copy_from_slice(&self.0[r.offset as usize..r.end() as usize]);
        Box::pin(async move {
            Ok(ReadData {
                data: d,
                zero: vec![],
            })
        })
    }
    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            len: r.len,
            zero: false,
        }])
    }
    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        // Local for some ranges only, so the overlay's fast paths meet both
        // answers.
        (r.offset % 3 != 0).then(|| {
            Ok(ReadData {
                data: Bytes::copy_from_slice(&self.0[r.offset as usize..r.end() as usize]),
                zero: vec![],
            })
        })
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// offset, length, pattern, through the inline fast path first
    Write(u64, u64, u8, bool),
    Trim(u64, u64),
    Zero(u64, u64, bool),
    Read(u64, u64, bool),
    Flush,
    Reopen,
}

const SIZE: u64 = 300_000; // not a multiple of the block size
/// The overlay's granularity: 4 KiB pages (whatever the cache's block).
fn block_size() -> impl Strategy<Value = u64> {
    Just(4096u64)
}

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SIZE).prop_flat_map(|o| (Just(o), 0..=(SIZE - o).min(70_000)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), any::<u8>(), any::<bool>()).prop_map(|((o, l), v, n)| Op::Write(o, l, v, n)),
        1 => range().prop_map(|(o, l)| Op::Trim(o, l)),
        1 => (range(), any::<bool>()).prop_map(|((o, l), nh)| Op::Zero(o, l, nh)),
        3 => (range(), any::<bool>()).prop_map(|((o, l), n)| Op::Read(o, l, n)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn pattern(len: u64, v: u8, off: u64) -> Vec<u8> {
    (0..len)
        .map(|i| v.wrapping_add(((off + i) % 251) as u8))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn overlay_matches_model(bs in block_size(), ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let dir = tempfile::tempdir().unwrap();
            let base_bytes: Vec<u8> = (0..SIZE).map(|i| (i * 7 % 256) as u8 | 1).collect();
            let base: Arc<dyn BlockDevice> = Arc::new(MemBase(base_bytes.clone()));
            let block = bs;
            let open = || Overlay::open(dir.path(), base.clone(), "membase").unwrap();
            let mut ov = open();
            let mut model = base_bytes.clone();
            for o in ops {
                match o {
                    Op::Write(off, len, v, now) => {
                        let d = pattern(len, v, off);
                        match now.then(|| ov.write_now(off, &d, false)).flatten() {
                            Some(res) => res.unwrap(),
                            None => ov.write(off, Bytes::from(d.clone()), false).await.unwrap(),
                        }
                        model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    }
                    Op::Zero(off, len, no_hole) => {
                        let f = ZeroFlags { no_hole, ..ZeroFlags::default() };
                        ov.write_zeroes(ByteRange { offset: off, len }, f).await.unwrap();
                        model[off as usize..(off + len) as usize].fill(0);
                    }
                    Op::Trim(off, len) => {
                        ov.trim(ByteRange { offset: off, len }, false).await.unwrap();
                        // Whole overlay blocks inside the range read as zero;
                        // partial edges keep their bytes.
                        let first = off.div_ceil(block);
                        let end = off + len;
                        let mut b = first;
                        while (b + 1) * block <= end || (b * block < end && end == SIZE) {
                            let e = ((b + 1) * block).min(SIZE);
                            model[(b * block) as usize..e as usize].fill(0);
                            b += 1;
                        }
                    }
                    Op::Read(off, len, now) => {
                        let r = ByteRange { offset: off, len };
                        let r = match now.then(|| ov.read_now(r)).flatten() {
                            Some(res) => res.unwrap(),
                            None => ov.read(r).await.unwrap(),
                        };
                        prop_assert!(r.data[..] == model[off as usize..(off + len) as usize], "read {}+{}", off, len);
                        for z in r.zero {
                            prop_assert!(model[z.offset as usize..z.end() as usize].iter().all(|&b| b == 0));
                        }
                    }
                    Op::Flush => ov.flush().await.unwrap(),
                    Op::Reopen => {
                        drop(ov);
                        ov = open();
                    }
                }
            }
            // Everything, once more, after a final reopen; extents agree.
            drop(ov);
            let ov = open();
            let r = ov.read(ByteRange { offset: 0, len: SIZE }).await.unwrap();
            prop_assert!(r.data[..] == model[..]);
            let ext = ov.extents(ByteRange { offset: 0, len: SIZE }).unwrap();
            prop_assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), SIZE);
            let mut pos = 0usize;
            for e in ext {
                if e.zero {
                    prop_assert!(model[pos..pos + e.len as usize].iter().all(|&b| b == 0));
                }
                pos += e.len as usize;
            }
            Ok(())
        })?;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlay_refuses_another_base() {
    let dir = tempfile::tempdir().unwrap();
    let base: Arc<dyn BlockDevice> = Arc::new(MemBase(vec![1u8; 100_000]));
    let ov = Overlay::open(dir.path(), base.clone(), "image-v1").unwrap();
    ov.write(10, Bytes::from_static(b"hello"), true)
        .await
        .unwrap();
    // Two users of one overlay at once: refused.
    assert!(Overlay::open(dir.path(), base.clone(), "image-v1").is_err());
    drop(ov);
    let err = Overlay::open(dir.path(), base.clone(), "image-v2")
        .err()
        .unwrap();
    assert!(err.to_string().contains("another image"), "{err}");
    // The original base still opens and the write is there.
    let ov = Overlay::open(dir.path(), base, "image-v1").unwrap();
    let r = ov.read(ByteRange { offset: 8, len: 9 }).await.unwrap();
    assert_eq!(&r.data[..], b"\x01\x01hello\x01\x01");
}

/// A partial write over a page that fails its CRC is refused: merging new
/// bytes into damaged ones and storing a fresh CRC over the mix would make
/// the damage look valid. Every other page is untouched and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_write_over_a_damaged_page_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base: Arc<dyn BlockDevice> = Arc::new(MemBase(vec![1u8; 64 * 4096]));
    let ov = Overlay::open(dir.path(), base.clone(), "image").unwrap();
    ov.write(0, Bytes::from(vec![0x11u8; 4096]), false)
        .await
        .unwrap();
    ov.write(4096, Bytes::from(vec![0x22u8; 4096]), true)
        .await
        .unwrap();
    drop(ov);
    // Slot 1 holds page 0 (slot 0 is the header): damage one byte of it.
    use std::os::unix::fs::FileExt;
    let pages = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("pages"))
        .unwrap();
    pages.write_all_at(&[0xee], 4096 + 300).unwrap();
    drop(pages);
    let ov = Overlay::open(dir.path(), base, "image").unwrap();
    let e = ov
        .write(100, Bytes::from_static(b"new bytes"), false)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("fails its checksum"), "{e}");
    assert!(ov
        .write_now(100, b"new bytes", false)
        .is_none_or(|r| r.is_err()));
    // Still damaged (not papered over), and the neighbour is intact.
    assert!(ov
        .read(ByteRange {
            offset: 0,
            len: 4096
        })
        .await
        .is_err());
    let r = ov
        .read(ByteRange {
            offset: 4096,
            len: 4096,
        })
        .await
        .unwrap();
    assert_eq!(&r.data[..], &[0x22u8; 4096][..]);
    // A whole-page write replaces the damaged page (nothing to merge).
    ov.write(0, Bytes::from(vec![0x33u8; 4096]), true)
        .await
        .unwrap();
    let r = ov
        .read(ByteRange {
            offset: 0,
            len: 4096,
        })
        .await
        .unwrap();
    assert_eq!(&r.data[..], &[0x33u8; 4096][..]);
}
