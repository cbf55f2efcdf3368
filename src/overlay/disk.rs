//! The narrow file interface the overlay does all its I/O through: a
//! directory of named files with positional reads and writes, sync, hole
//! punching and atomic rename. The real implementation is the OS; tests
//! swap in `sim::SimDir`, which records every write and sync and can lose
//! power (drop or tear unsynced writes) or fail a write, so crash safety
//! is proven against the same code that runs in production.
//!
//! Every call may block on the disk except [`DiskFile::read_at_nowait`],
//! the one the async workers may make: the overlay runs all the others on
//! the blocking pool.
//!
//! [`Dir`], [`DiskFile`] and [`sim::SimDir`] are public for the fuzz target
//! `overlay_journal`; the simulated disk's fault injection is for the unit
//! tests only.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// One file. Offsets are absolute; a write past the end extends the file
/// (the gap reads as zeroes).
pub trait DiskFile: Send + Sync {
    /// Read up to `buf.len()` bytes at `off`; fewer only at end of file.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    /// [`DiskFile::read_at`] without waiting for the disk: only what is in
    /// memory (the page cache), `Ok(None)` when the read would have to
    /// wait or the file system cannot read without waiting. A prefix may
    /// be returned when only that much is cached. Never blocks, so async
    /// workers may call it.
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<Option<usize>>;
    /// Write all of `buf` at `off`. On error any prefix may have landed.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every write so far durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// The file's length in bytes.
    fn file_len(&self) -> io::Result<u64>;
    /// Give back the space of `[off, off + len)`; it reads as zeroes after.
    fn punch(&self, off: u64, len: u64) -> io::Result<()>;
    /// Reserve disk space for `[off, off + len)` without changing the
    /// file's length, so later writes there cannot fail with ENOSPC.
    /// EOPNOTSUPP when the file system cannot.
    fn allocate(&self, off: u64, len: u64) -> io::Result<()>;
}

/// A directory of files.
pub trait Dir: Send + Sync {
    /// Open `name`; `None` when it does not exist and `create` is false.
    fn open(&self, name: &str, create: bool) -> io::Result<Option<Arc<dyn DiskFile>>>;
    /// Replace `to` with `from` atomically (durable after [`Dir::sync`]).
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, name: &str) -> io::Result<()>;
    fn exists(&self, name: &str) -> bool;
    /// Make renames, creations and removals durable (fsync of the directory).
    fn sync(&self) -> io::Result<()>;
    /// Bytes free for this process on the directory's file system.
    fn free_space(&self) -> io::Result<u64>;
    /// For messages.
    fn path_of(&self, name: &str) -> PathBuf;
}

/// Read exactly `buf.len()` bytes; end of file reads as zeroes (sparse
/// files and files being extended).
pub(crate) fn read_full(f: &dyn DiskFile, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], off + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}

/// [`read_full`] without waiting: `Ok(false)` as soon as the rest would
/// have to come from the disk (`buf` is then partly written).
pub(crate) fn read_full_nowait(f: &dyn DiskFile, buf: &mut [u8], off: u64) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at_nowait(&mut buf[done..], off + done as u64)? {
            None => return Ok(false),
            Some(0) => {
                buf[done..].fill(0);
                break;
            }
            Some(n) => done += n,
        }
    }
    Ok(true)
}

/// The real thing: a directory on disk.
pub(crate) struct OsDir {
    root: PathBuf,
}

impl OsDir {
    pub(crate) fn new(root: &Path) -> OsDir {
        OsDir {
            root: root.to_path_buf(),
        }
    }
}

struct OsFile {
    file: File,
    /// Set once `preadv2(RWF_NOWAIT)` said the file system cannot do it
    /// (EOPNOTSUPP) or the kernel is too old for preadv2 (ENOSYS): later
    /// no-wait reads decline without a system call.
    no_nowait: AtomicBool,
}

impl DiskFile for OsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        loop {
            match self.file.read_at(buf, off) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r,
            }
        }
    }
    fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<Option<usize>> {
        use std::os::unix::io::AsRawFd;
        if self.no_nowait.load(Ordering::Relaxed) {
            return Ok(None);
        }
        loop {
            let iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: one iovec over `buf`, writable and alive for the
            // call; the descriptor is owned and open.
            let n = unsafe {
                libc::preadv2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    off as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            if n >= 0 {
                return Ok(Some(n as usize));
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                    self.no_nowait.store(true, Ordering::Relaxed);
                    return Ok(None);
                }
                _ => return Err(e),
            }
        }
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn file_len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }
    fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(libc::FALLOC_FL_KEEP_SIZE, off, len)
    }
}

impl OsFile {
    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fallocate on an owned, open descriptor; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Dir for OsDir {
    fn open(&self, name: &str, create: bool) -> io::Result<Option<Arc<dyn DiskFile>>> {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(self.root.join(name))
        {
            Ok(file) => Ok(Some(Arc::new(OsFile {
                file,
                no_nowait: AtomicBool::new(false),
            }))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && !create => Ok(None),
            Err(e) => Err(e),
        }
    }
    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        std::fs::rename(self.root.join(from), self.root.join(to))
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.root.join(name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn exists(&self, name: &str) -> bool {
        self.root.join(name).exists()
    }
    fn sync(&self) -> io::Result<()> {
        File::open(&self.root)?.sync_all()
    }
    fn free_space(&self) -> io::Result<u64> {
        use std::os::unix::io::AsRawFd;
        let dir = File::open(&self.root)?;
        // SAFETY: all-zero bytes are a valid `statvfs` (integers only).
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatvfs on an owned, open descriptor writes only into
        // `st`, which lives across the call.
        if unsafe { libc::fstatvfs(dir.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st.f_bavail as u64 * st.f_frsize as u64)
    }
    fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// A simulated disk for crash tests, after SQLite's crash-test VFS.
///
/// Every file keeps its durable bytes and the writes made since its last
/// sync. A power cut keeps, for each 512-byte sector, the durable bytes
/// with some prefix of the unsynced writes that touched it applied (the
/// page cache may have written back any version of a sector, or none):
/// that covers lost writes, writes lost at 4 KiB granularity and writes
/// torn at sector boundaries. Directory changes not yet synced are kept or
/// lost as a whole. Writes and syncs can be made to fail.
pub mod sim {
    use super::*;

    #[cfg(test)]
    const SECTOR: usize = 512;

    #[derive(Default, Clone)]
    struct FileData {
        durable: Vec<u8>,
        current: Vec<u8>,
        /// Unsynced writes, in order.
        pending: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Default)]
    struct State {
        files: Vec<FileData>,
        /// Name -> file id as the directory is durable / as it is now.
        durable_names: HashMap<String, usize>,
        names: HashMap<String, usize>,
        /// Fail the write after this many more writes succeed.
        fail_write_in: Option<(u64, i32)>,
        fail_sync_in: Option<u64>,
        writes: u64,
        syncs: u64,
        /// What `free_space` says (`None`: plenty).
        free: Option<u64>,
    }

    /// A simulated directory; clone it to share the same disk.
    #[derive(Clone, Default)]
    pub struct SimDir {
        st: Arc<Mutex<State>>,
    }

    struct SimFile {
        st: Arc<Mutex<State>>,
        id: usize,
    }

    fn apply(buf: &mut Vec<u8>, off: u64, data: &[u8]) {
        let end = off as usize + data.len();
        if buf.len() < end {
            buf.resize(end, 0);
        }
        buf[off as usize..end].copy_from_slice(data);
    }

    impl SimDir {
        pub fn new() -> SimDir {
            SimDir::default()
        }
    }

    /// Fault injection, for the unit tests.
    #[cfg(test)]
    impl SimDir {
        /// The `n`-th write from now (0: the next) fails with `errno`,
        /// after writing a prefix of its buffer (half of it).
        pub(crate) fn fail_write(&self, n: u64, errno: i32) {
            self.st.lock().unwrap().fail_write_in = Some((n, errno));
        }

        /// What `free_space` reports from now on.
        pub(crate) fn set_free_space(&self, bytes: u64) {
            self.st.lock().unwrap().free = Some(bytes);
        }

        /// The `n`-th sync from now fails with EIO.
        pub(crate) fn fail_sync(&self, n: u64) {
            self.st.lock().unwrap().fail_sync_in = Some(n);
        }

        /// (writes, syncs) so far.
        pub(crate) fn counts(&self) -> (u64, u64) {
            let s = self.st.lock().unwrap();
            (s.writes, s.syncs)
        }

        /// Process death (kill -9): nothing written is lost; the page cache
        /// survives. Pending failures are cleared.
        pub(crate) fn kill(&self) {
            let mut s = self.st.lock().unwrap();
            s.fail_write_in = None;
            s.fail_sync_in = None;
        }

        /// Power cut. `pick(n)` chooses a number in `0..=n` (the test's
        /// random source): how many of the `n` unsynced writes touching a
        /// sector reached it, and (n = 1) whether unsynced directory
        /// changes survived.
        pub(crate) fn power_cut(&self, pick: &mut dyn FnMut(usize) -> usize) {
            let mut s = self.st.lock().unwrap();
            s.fail_write_in = None;
            s.fail_sync_in = None;
            if s.names != s.durable_names && pick(1) == 1 {
                s.durable_names = s.names.clone();
            }
            s.names = s.durable_names.clone();
            for f in s.files.iter_mut() {
                let mut out = f.durable.clone();
                // Sectors touched by pending writes, each with the writes
                // touching it in order.
                let mut touched: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
                for (i, (off, data)) in f.pending.iter().enumerate() {
                    if data.is_empty() {
                        continue;
                    }
                    let first = *off as usize / SECTOR;
                    let last = (*off as usize + data.len() - 1) / SECTOR;
                    for sec in first..=last {
                        touched.entry(sec).or_default().push(i);
                    }
                }
                for (sec, writes) in touched {
                    let k = pick(writes.len());
                    for &i in &writes[..k] {
                        let (off, data) = &f.pending[i];
                        let s0 = (sec * SECTOR).max(*off as usize);
                        let s1 = ((sec + 1) * SECTOR).min(*off as usize + data.len());
                        let src = &data[s0 - *off as usize..s1 - *off as usize];
                        apply(&mut out, s0 as u64, src);
                    }
                }
                f.durable = out.clone();
                f.current = out;
                f.pending.clear();
            }
        }

        /// The bytes of `name` as they are now (for tests that damage files).
        pub(crate) fn contents(&self, name: &str) -> Option<Vec<u8>> {
            let s = self.st.lock().unwrap();
            s.names.get(name).map(|&id| s.files[id].current.clone())
        }

        /// Overwrite bytes of `name` durably (simulated damage).
        pub(crate) fn damage(&self, name: &str, off: u64, bytes: &[u8]) {
            let mut s = self.st.lock().unwrap();
            let id = s.names[name];
            let f = &mut s.files[id];
            apply(&mut f.current, off, bytes);
            apply(&mut f.durable, off, bytes);
        }
    }

    impl DiskFile for SimFile {
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
            let s = self.st.lock().unwrap();
            let cur = &s.files[self.id].current;
            let off = off as usize;
            if off >= cur.len() {
                return Ok(0);
            }
            let n = buf.len().min(cur.len() - off);
            buf[..n].copy_from_slice(&cur[off..off + n]);
            Ok(n)
        }
        fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> io::Result<Option<usize>> {
            // All of it is in memory.
            self.read_at(buf, off).map(Some)
        }
        fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
            let mut s = self.st.lock().unwrap();
            s.writes += 1;
            let mut fail = None;
            if let Some((n, errno)) = s.fail_write_in {
                if n == 0 {
                    s.fail_write_in = None;
                    fail = Some(errno);
                } else {
                    s.fail_write_in = Some((n - 1, errno));
                }
            }
            let data = match fail {
                Some(_) => &buf[..buf.len() / 2],
                None => buf,
            };
            let f = &mut s.files[self.id];
            apply(&mut f.current, off, data);
            f.pending.push((off, data.to_vec()));
            match fail {
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
                None => Ok(()),
            }
        }
        fn sync(&self) -> io::Result<()> {
            let mut s = self.st.lock().unwrap();
            s.syncs += 1;
            if let Some(n) = s.fail_sync_in {
                if n == 0 {
                    // Like Linux: the failed sync may have written some of
                    // it back, and the rest is not retried by a later sync
                    // (the pages are marked clean). Here: nothing is lost
                    // yet, but nothing is durable either.
                    s.fail_sync_in = None;
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                s.fail_sync_in = Some(n - 1);
            }
            let f = &mut s.files[self.id];
            f.durable = f.current.clone();
            f.pending.clear();
            Ok(())
        }
        fn file_len(&self) -> io::Result<u64> {
            Ok(self.st.lock().unwrap().files[self.id].current.len() as u64)
        }
        fn punch(&self, off: u64, len: u64) -> io::Result<()> {
            let mut s = self.st.lock().unwrap();
            let f = &mut s.files[self.id];
            let end = (off + len).min(f.current.len() as u64);
            if off >= end {
                return Ok(());
            }
            let zeros = vec![0u8; (end - off) as usize];
            apply(&mut f.current, off, &zeros);
            f.pending.push((off, zeros));
            Ok(())
        }
        fn allocate(&self, _off: u64, _len: u64) -> io::Result<()> {
            Ok(())
        }
    }

    impl Dir for SimDir {
        fn open(&self, name: &str, create: bool) -> io::Result<Option<Arc<dyn DiskFile>>> {
            let mut s = self.st.lock().unwrap();
            let id = match s.names.get(name) {
                Some(&id) => id,
                None if create => {
                    s.files.push(FileData::default());
                    let id = s.files.len() - 1;
                    s.names.insert(name.to_string(), id);
                    id
                }
                None => return Ok(None),
            };
            Ok(Some(Arc::new(SimFile {
                st: self.st.clone(),
                id,
            })))
        }
        fn rename(&self, from: &str, to: &str) -> io::Result<()> {
            let mut s = self.st.lock().unwrap();
            let id = s
                .names
                .remove(from)
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
            s.names.insert(to.to_string(), id);
            Ok(())
        }
        fn remove(&self, name: &str) -> io::Result<()> {
            self.st.lock().unwrap().names.remove(name);
            Ok(())
        }
        fn exists(&self, name: &str) -> bool {
            self.st.lock().unwrap().names.contains_key(name)
        }
        fn sync(&self) -> io::Result<()> {
            let mut s = self.st.lock().unwrap();
            s.durable_names = s.names.clone();
            Ok(())
        }
        fn free_space(&self) -> io::Result<u64> {
            Ok(self.st.lock().unwrap().free.unwrap_or(u64::MAX))
        }
        fn path_of(&self, name: &str) -> PathBuf {
            PathBuf::from("sim").join(name)
        }
    }
}
