//! The overlay keeps its disk I/O off the async workers. Each test runs on
//! a current-thread runtime, so the one worker is the test's own thread,
//! and watches every blocking call the store makes through a [`Spy`]
//! directory: none may come from that thread.

use std::sync::Mutex as StdMutex;
use std::thread::{self, ThreadId};

use super::disk::{Dir, DiskFile, OsDir};
use super::*;

/// Blocking calls made through the directory, by thread.
#[derive(Default)]
struct Log(
    StdMutex<Vec<(ThreadId, &'static str)>>,
    /// Set: every no-wait read finds its pages out of the page cache.
    std::sync::atomic::AtomicBool,
);

impl Log {
    /// Make the no-wait reads miss (`true`), as the kernel's do for pages
    /// not in the page cache, or let them through to the file again.
    fn set_cold(&self, cold: bool) {
        self.1.store(cold, std::sync::atomic::Ordering::Relaxed);
    }
    fn note(&self, what: &'static str) {
        self.0.lock().unwrap().push((thread::current().id(), what));
    }
    /// The blocking calls made on `t`.
    fn on(&self, t: ThreadId) -> Vec<&'static str> {
        let l = self.0.lock().unwrap();
        l.iter()
            .filter(|(id, _)| *id == t)
            .map(|(_, w)| *w)
            .collect()
    }
    fn count(&self, what: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, w)| *w == what)
            .count()
    }
}

/// The OS directory, noting every call that may wait for the disk.
struct Spy {
    os: OsDir,
    log: Arc<Log>,
}

struct SpyFile {
    f: Arc<dyn DiskFile>,
    log: Arc<Log>,
}

impl DiskFile for SpyFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<usize> {
        self.log.note("read");
        self.f.read_at(buf, off)
    }
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> std::io::Result<Option<usize>> {
        // Never waits: allowed anywhere, not noted.
        if self.log.1.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        self.f.read_at_nowait(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.log.note("write");
        self.f.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.log.note("sync");
        self.f.sync()
    }
    fn file_len(&self) -> std::io::Result<u64> {
        self.f.file_len()
    }
    fn punch(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.log.note("punch");
        self.f.punch(off, len)
    }
    fn allocate(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.log.note("allocate");
        self.f.allocate(off, len)
    }
}

impl Dir for Spy {
    fn open(&self, name: &str, create: bool) -> std::io::Result<Option<Arc<dyn DiskFile>>> {
        Ok(self.os.open(name, create)?.map(|f| {
            Arc::new(SpyFile {
                f,
                log: self.log.clone(),
            }) as Arc<dyn DiskFile>
        }))
    }
    fn rename(&self, from: &str, to: &str) -> std::io::Result<()> {
        self.os.rename(from, to)
    }
    fn remove(&self, name: &str) -> std::io::Result<()> {
        self.os.remove(name)
    }
    fn exists(&self, name: &str) -> bool {
        self.os.exists(name)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.os.sync()
    }
    fn free_space(&self) -> std::io::Result<u64> {
        self.os.free_space()
    }
    fn path_of(&self, name: &str) -> PathBuf {
        self.os.path_of(name)
    }
}

/// A base that is all 0x5a and always local.
struct Base(u64);

impl BlockDevice for Base {
    fn size(&self) -> u64 {
        self.0
    }
    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        let rd = self.read_now(r).expect("always local");
        Box::pin(async move { rd })
    }
    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        Ok(vec![Extent {
            len: r.len,
            zero: false,
        }])
    }
    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        Some(Ok(ReadData {
            data: Bytes::from(vec![0x5a; r.len as usize]),
            zero: Vec::new(),
        }))
    }
    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

const SIZE: u64 = 1 << 20;

fn open(dir: &Path) -> (Overlay, Arc<Log>) {
    let log = Arc::new(Log::default());
    let spy = Spy {
        os: OsDir::new(dir),
        log: log.clone(),
    };
    let ov = Overlay::open_on(dir, Arc::new(spy), Arc::new(Base(SIZE)), "base").unwrap();
    // Opening is a blocking call (replay, syncs): what follows is watched.
    log.0.lock().unwrap().clear();
    (ov, log)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

fn range(offset: u64, len: u64) -> ByteRange {
    ByteRange { offset, len }
}

/// Pages that are not in the page cache are not read inline (that would
/// block the worker on the disk): `read_now` declines, `read` reads them
/// on the blocking pool, and once they are back it serves them inline.
///
/// "Not in the page cache" is what the no-wait read reports (the spy's
/// cold switch), not a real eviction: a real `RWF_NOWAIT` read of an
/// evicted page starts readahead and, when its thread is preempted long
/// enough for that read to finish (seen under CPU load), returns the
/// bytes without having waited, so a test on real evictions cannot tell
/// a correct decline from a lucky hit.
#[tokio::test]
async fn pages_not_in_the_page_cache_are_read_off_the_workers() {
    let dir = tempfile::tempdir().unwrap();
    let (ov, log) = open(dir.path());
    let worker = thread::current().id();
    let data = pattern(64 << 10, 1);
    ov.write(0, Bytes::from(data.clone()), false).await.unwrap();
    ov.flush().await.unwrap();
    assert!(
        ov.read_now(range(8192, 4096)).is_some(),
        "cached after writing"
    );
    log.set_cold(true);
    assert!(
        ov.read_now(range(8192, 4096)).is_none(),
        "the inline path would have waited for the disk"
    );
    // Unaligned, over data pages and the base beyond them.
    let mut want = data[8092..].to_vec();
    want.resize(64 << 10, 0x5a);
    let reads = log.count("read");
    let r = ov.read(range(8192 - 100, 64 << 10)).await.unwrap();
    assert!(r.data == want);
    assert!(log.count("read") > reads, "never read from the disk");
    log.set_cold(false);
    let r = ov
        .read_now(range(8192, 4096))
        .expect("in the page cache now")
        .unwrap();
    assert!(r.data == data[8192..12288]);
    assert_eq!(
        log.on(worker),
        Vec::<&str>::new(),
        "blocking calls on the worker"
    );
}

/// `write_now` accepts a write without any blocking call (nothing is
/// written, synced or reserved on the worker): the bytes are read back at
/// once from memory, a drain on the blocking pool puts them on file, and
/// they survive a flush and a reopen. The blocking path (`write`, TRIM,
/// WRITE_ZEROES, FUA) runs its disk I/O off the worker too.
#[tokio::test]
async fn writes_make_no_blocking_call_on_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let (ov, log) = open(dir.path());
    let worker = thread::current().id();
    let a = pattern(4096, 2);
    let b = pattern(3000, 3);
    // A fresh overlay has reserved nothing: its first write waits for
    // that, on the blocking pool.
    assert!(ov.write_now(64 * 4096, &a, false).is_none());
    ov.write(64 * 4096, Bytes::from(a.clone()), false)
        .await
        .unwrap();
    // Aligned, and partial (the edge page comes from the base, local).
    ov.write_now(4096, &a, false)
        .expect("accepted without waiting")
        .unwrap();
    ov.write_now(3 * 4096 + 500, &b, false)
        .expect("accepted without waiting")
        .unwrap();
    assert!(ov.write_now(0, &a, true).is_none(), "FUA waits for a sync");
    assert_eq!(
        log.on(worker),
        Vec::<&str>::new(),
        "blocking calls on the worker"
    );
    let r = ov.read_now(range(4096, 4096)).unwrap().unwrap();
    assert!(r.data == a);
    let mut page = vec![0x5a; 4096];
    page[500..3500].copy_from_slice(&b);
    let r = ov.read(range(3 * 4096, 4096)).await.unwrap();
    assert!(r.data == page);
    ov.write(8 * 4096 + 1, Bytes::from(a.clone()), true)
        .await
        .unwrap();
    ov.trim(range(4096, 4096), false).await.unwrap();
    ov.write_zeroes(range(100, 20_000), ZeroFlags::default())
        .await
        .unwrap();
    ov.write_zeroes(
        range(20 * 4096, 8192),
        ZeroFlags {
            no_hole: true,
            ..ZeroFlags::default()
        },
    )
    .await
    .unwrap();
    ov.flush().await.unwrap();
    assert!(log.count("write") > 0 && log.count("sync") > 0);
    assert_eq!(
        log.on(worker),
        Vec::<&str>::new(),
        "blocking calls on the worker"
    );
    // What was written reads back after a reopen.
    let mut model = vec![0x5a; SIZE as usize];
    model[64 * 4096..65 * 4096].copy_from_slice(&a);
    model[4096..8192].copy_from_slice(&a);
    model[3 * 4096 + 500..3 * 4096 + 3500].copy_from_slice(&b);
    model[8 * 4096 + 1..9 * 4096 + 1].copy_from_slice(&a);
    model[4096..8192].fill(0);
    model[100..20_100].fill(0);
    model[20 * 4096..22 * 4096].fill(0);
    drop(ov);
    let (ov, _) = open(dir.path());
    let r = ov.read(range(0, SIZE)).await.unwrap();
    assert!(r.data == model);
}
