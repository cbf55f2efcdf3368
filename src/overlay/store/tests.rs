//! The page store against a model, under simulated power loss.
//!
//! Each run drives random writes, zeroes, flushes, injected write and sync
//! failures, process kills and power cuts through a [`SimDir`], reopening
//! after every crash, and checks the crash contract page by page:
//! after a cut a page reads as a content it held since the last completed
//! flush (exactly its flushed content if it was not written since), never
//! EIO; after a kill, as its last acknowledged content, unless a write of
//! it was accepted without waiting and not drained yet (then as one it
//! held since the last flush). Half the writes and zeroes are offered to
//! the no-wait path first; drains run at random moments.

use super::*;
use crate::overlay::disk::sim::SimDir;

/// A page's content as the model knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum C {
    Base,
    Zero,
    Data(u64),
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const NPAGES: u64 = 24;
/// Not a multiple of a page: the last page is short.
const SIZE: u64 = NPAGES * PAGE - 1000;
const IDENTITY: u64 = 0x1234;

fn page_len(p: u64) -> usize {
    PAGE.min(SIZE - p * PAGE) as usize
}

fn fill(id: u64, p: u64) -> Vec<u8> {
    let mut v = vec![0u8; page_len(p)];
    for (i, c) in v.chunks_mut(8).enumerate() {
        let w = (id << 8 | (i as u64 & 0xff)).to_le_bytes();
        c.copy_from_slice(&w[..c.len()]);
    }
    v
}

fn decode(b: &[u8]) -> C {
    if crate::block::is_zero(b) {
        return C::Zero;
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    C::Data(u64::from_le_bytes(w) >> 8)
}

/// Read every page; `Err` names a page that failed its CRC.
fn read_all(s: &PageStore) -> std::result::Result<Vec<C>, String> {
    let mut out = Vec::new();
    for (first, count, piece) in s.lookup(0, NPAGES) {
        match piece {
            Piece::Base => out.extend(std::iter::repeat_n(C::Base, count as usize)),
            Piece::Zero => out.extend(std::iter::repeat_n(C::Zero, count as usize)),
            Piece::Data(slots) => {
                let bytes: usize = (first..first + count).map(page_len).sum();
                let mut buf = vec![0u8; bytes];
                let bad = s
                    .read_slots(first, &slots, &mut buf)
                    .map_err(|e| e.to_string())?;
                if let Some(p) = bad.first() {
                    return Err(format!("page {p} fails its CRC"));
                }
                let mut at = 0;
                for p in first..first + count {
                    out.push(decode(&buf[at..at + page_len(p)]));
                    at += page_len(p);
                }
            }
        }
    }
    Ok(out)
}

fn open(d: &SimDir) -> PageStore {
    PageStore::open(Arc::new(d.clone()), SIZE, IDENTITY)
        .expect("a crashed overlay must always reopen")
        .0
}

/// One random run; returns the number of power cuts it made and of
/// writes and zeroes accepted without waiting.
fn run(seed: u64, steps: usize) -> (u64, u64) {
    let mut rng = Rng(seed);
    let d = SimDir::new();
    let mut s = open(&d);
    // What a read may return now / after a power cut.
    let mut now: Vec<Vec<C>> = vec![vec![C::Base]; NPAGES as usize];
    let mut since: Vec<Vec<C>> = now.clone();
    // Contents of writes that failed since the last flush, and what their
    // pages held before: a kill may bring either back (a record may have
    // landed, or not), reads until then may show either.
    let mut failed: Vec<Vec<C>> = vec![Vec::new(); NPAGES as usize];
    // Pages written without waiting since the last complete drain: a kill
    // may lose those writes.
    let mut undrained = vec![false; NPAGES as usize];
    let mut id = 1u64;
    let mut cuts = 0;
    let mut accepted = 0;
    let add = |v: &mut Vec<C>, c: C| {
        if !v.contains(&c) {
            v.push(c);
        }
    };
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        let op = rng.below(100);
        if std::env::var("TRACE").is_ok() {
            eprintln!("step {step} op {op}");
        }
        match op {
            0..=44 => {
                let first = rng.below(NPAGES);
                let n = 1 + rng.below((NPAGES - first).min(6));
                let keep_zeros = rng.below(4) == 0;
                let mut data = Vec::new();
                let mut contents = Vec::new();
                for p in first..first + n {
                    if rng.below(5) == 0 {
                        data.extend(vec![0u8; page_len(p)]);
                        contents.push(C::Zero);
                    } else {
                        data.extend(fill(id, p));
                        contents.push(C::Data(id));
                        id += 1;
                    }
                }
                let now_res = (rng.below(2) == 0)
                    .then(|| s.write_now(first, &data, keep_zeros))
                    .flatten();
                let staged = now_res.as_ref().is_some_and(|r| r.is_ok());
                accepted += staged as u64;
                let ok = match now_res {
                    Some(r) => r.is_ok(),
                    None => s.write(first, &data, keep_zeros).is_ok(),
                };
                for (i, c) in contents.into_iter().enumerate() {
                    let p = (first + i as u64) as usize;
                    undrained[p] |= staged;
                    if ok {
                        now[p] = vec![c];
                    } else {
                        for &old in &now[p] {
                            add(&mut failed[p], old);
                        }
                        add(&mut now[p], c);
                        add(&mut failed[p], c);
                    }
                    add(&mut since[p], c);
                }
            }
            45..=54 => {
                let first = rng.below(NPAGES);
                let n = 1 + rng.below(NPAGES - first);
                let now_res = (rng.below(2) == 0).then(|| s.zero_now(first, n)).flatten();
                let staged = now_res.as_ref().is_some_and(|r| r.is_ok());
                accepted += staged as u64;
                let ok = match now_res {
                    Some(r) => r.is_ok(),
                    None => s.zero(first, n).is_ok(),
                };
                for p in first..first + n {
                    undrained[p as usize] |= staged;
                    if ok {
                        now[p as usize] = vec![C::Zero];
                    } else {
                        for &old in &now[p as usize] {
                            add(&mut failed[p as usize], old);
                        }
                        add(&mut now[p as usize], C::Zero);
                        add(&mut failed[p as usize], C::Zero);
                    }
                    add(&mut since[p as usize], C::Zero);
                }
            }
            55..=64 => {
                if s.flush().is_ok() {
                    since = now.clone();
                    failed.iter_mut().for_each(Vec::clear);
                    undrained.fill(false);
                }
            }
            65..=69 => {
                // A background drain, or one a flush would do.
                if rng.below(2) == 0 {
                    if s.claim_drain() {
                        s.drain(true);
                    }
                } else {
                    s.drain(false);
                }
                if s.check_poison().is_ok() {
                    undrained.fill(false);
                }
            }
            70..=74 => d.fail_write(
                rng.below(4),
                if rng.below(2) == 0 {
                    libc::ENOSPC
                } else {
                    libc::EIO
                },
            ),
            75..=76 => d.fail_sync(rng.below(3)),
            77..=84 => {
                let got = read_all(&s).unwrap_or_else(|e| panic!("{ctx}: read: {e}"));
                for (p, c) in got.into_iter().enumerate() {
                    assert!(
                        now[p].contains(&c),
                        "{ctx}: page {p} read {c:?}, allowed {:?}",
                        now[p]
                    );
                    now[p] = vec![c];
                }
            }
            85..=89 => {
                // kill -9: the page cache survives, what was not drained
                // does not.
                s.abandon();
                drop(s);
                d.kill();
                s = open(&d);
                let got = read_all(&s).unwrap_or_else(|e| panic!("{ctx}: after kill: {e}"));
                for (p, c) in got.into_iter().enumerate() {
                    let ok = if undrained[p] {
                        since[p].contains(&c)
                    } else {
                        now[p].contains(&c) || failed[p].contains(&c)
                    };
                    assert!(
                        ok,
                        "{ctx}: after kill page {p} read {c:?}, allowed {:?} or {:?} (undrained: {})",
                        now[p],
                        failed[p],
                        undrained[p]
                    );
                    now[p] = vec![c];
                }
                since = now.clone();
                failed.iter_mut().for_each(Vec::clear);
                undrained.fill(false);
            }
            _ => {
                s.abandon();
                drop(s);
                d.power_cut(&mut |n| rng.below(n as u64 + 1) as usize);
                cuts += 1;
                s = open(&d);
                let got = read_all(&s).unwrap_or_else(|e| panic!("{ctx}: after power cut: {e}"));
                for (p, c) in got.into_iter().enumerate() {
                    assert!(
                        since[p].contains(&c),
                        "{ctx}: after power cut page {p} read {c:?}, allowed {:?}",
                        since[p]
                    );
                    now[p] = vec![c];
                }
                since = now.clone();
                failed.iter_mut().for_each(Vec::clear);
                undrained.fill(false);
            }
        }
    }
    (cuts, accepted)
}

/// How many runs: `LAZYBD_POWER_CUT_RUNS` (the bench script raises it).
fn runs() -> u64 {
    std::env::var("LAZYBD_POWER_CUT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400)
}

#[test]
fn power_cuts_never_lose_flushed_writes_or_brick_a_page() {
    let (mut cuts, mut accepted) = (0, 0);
    let n = runs();
    let from: u64 = std::env::var("SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    for seed in from..from + n {
        let (c, a) = run(seed, 150);
        cuts += c;
        accepted += a;
    }
    eprintln!(
        "power-loss simulation: {n} runs, {cuts} power cuts, {accepted} writes accepted without waiting, contract held"
    );
    assert!(cuts > n, "the runs must cut power many times");
    assert!(accepted > 10 * n, "the runs must use the no-wait path");
}

#[test]
fn metadata_grows_with_what_is_written() {
    let d = SimDir::new();
    // A 1 TiB image: nothing is preallocated.
    let size = 1u64 << 40;
    let (s, _) = PageStore::open(Arc::new(d.clone()), size, 1).unwrap();
    let meta = |d: &SimDir| d.contents(JOURNAL).unwrap().len() + d.contents(PAGES).unwrap().len();
    assert!(
        meta(&d) <= 2 * PAGE as usize,
        "untouched: {} bytes",
        meta(&d)
    );
    // 4 MiB written in 4 KiB pages spread over the image.
    let page = vec![7u8; PAGE as usize];
    for i in 0..1024u64 {
        s.write(i * 999_983 % (size / PAGE), &page, false).unwrap();
    }
    s.flush().unwrap();
    let j = d.contents(JOURNAL).unwrap().len();
    assert!(j < 64 << 10, "journal {j} bytes for 1024 pages");
    assert_eq!(s.data_pages(), 1024);
    // A TRIM of the whole image is one record.
    s.zero(0, size / PAGE).unwrap();
    s.flush().unwrap();
    assert_eq!(s.data_pages(), 0);
    drop(s);
    let (s, _) = PageStore::open(Arc::new(d.clone()), size, 1).unwrap();
    assert_eq!(
        s.lookup(0, size / PAGE),
        vec![(0, size / PAGE, Piece::Zero)]
    );
}

#[test]
fn rewrites_are_compacted() {
    let d = SimDir::new();
    let (s, _) = PageStore::open(Arc::new(d.clone()), 64 * PAGE, 1).unwrap();
    for i in 0..200_000u64 {
        s.write(i % 64, &fill(i + 1, 0)[..], false).unwrap();
        if i % 100 == 0 {
            s.flush().unwrap();
        }
    }
    s.flush().unwrap();
    let j = d.contents(JOURNAL).unwrap().len();
    assert!(
        j < 2 << 20,
        "journal {j} bytes after 200,000 rewrites of 64 pages"
    );
    let p = d.contents(PAGES).unwrap().len() as u64;
    assert!(p <= (1 + 64 + 101) * PAGE * 2, "pages file {p} bytes");
    drop(s);
    let s = open_sized(&d, 64 * PAGE);
    assert_eq!(read_page(&s, 63), fill(200_000, 0));
}

fn open_sized(d: &SimDir, size: u64) -> PageStore {
    PageStore::open(Arc::new(d.clone()), size, 1).unwrap().0
}

fn read_page(s: &PageStore, p: u64) -> Vec<u8> {
    let l = s.lookup(p, p + 1);
    let Piece::Data(slots) = &l[0].2 else {
        panic!("page {p} holds no data: {l:?}")
    };
    let mut b = vec![0u8; PAGE as usize];
    assert!(s.read_slots(p, slots, &mut b).unwrap().is_empty());
    b
}

#[test]
fn a_damaged_or_newer_header_is_refused_and_left_untouched() {
    let d = SimDir::new();
    let (s, _) = PageStore::open(Arc::new(d.clone()), 8 * PAGE, 1).unwrap();
    s.write(0, &[0x5a; PAGE as usize], false).unwrap();
    s.flush().unwrap();
    drop(s);
    for (name, off, what) in [
        (JOURNAL, 8, "newer lazybd"),
        (PAGES, 8, "newer lazybd"),
        (JOURNAL, 20, "checksum"),
        (PAGES, 0, "not a lazybd overlay"),
    ] {
        let before_j = d.contents(JOURNAL).unwrap();
        let before_p = d.contents(PAGES).unwrap();
        let orig = d.contents(name).unwrap()[off];
        d.damage(name, off as u64, &[if off == 8 { 3 } else { orig ^ 2 }]);
        let damaged = d.contents(name).unwrap();
        let err = PageStore::open(Arc::new(d.clone()), 8 * PAGE, 1)
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(msg.contains(what) && msg.contains(name), "{msg}");
        assert_eq!(d.contents(name).unwrap(), damaged, "{name} was changed");
        d.damage(name, off as u64, &[orig]);
        assert_eq!(d.contents(JOURNAL).unwrap(), before_j);
        assert_eq!(d.contents(PAGES).unwrap(), before_p);
    }
    // Another image's overlay is refused too.
    let err = PageStore::open(Arc::new(d.clone()), 9 * PAGE, 1)
        .err()
        .expect("refused");
    assert!(err.to_string().contains("another image"), "{err}");
    let s = open_sized(&d, 8 * PAGE);
    assert_eq!(read_page(&s, 0), vec![0x5a; PAGE as usize]);
}

#[test]
fn check_finds_damage_and_repair_keeps_the_rest() {
    let d = SimDir::new();
    let s = open_sized(&d, 8 * PAGE);
    for p in 0..8 {
        s.write(p, &fill(p + 1, 0), false).unwrap();
    }
    s.flush().unwrap();
    assert!(s.check().unwrap().is_empty());
    // Flip a byte of page 3's slot.
    let Piece::Data(slots) = s.lookup(3, 4).remove(0).2 else {
        panic!()
    };
    d.damage(PAGES, slots[0].0 * PAGE + 10, &[0xff]);
    assert_eq!(s.check().unwrap(), vec![3]);
    s.repair(&[3]).unwrap();
    drop(s);
    let s = open_sized(&d, 8 * PAGE);
    assert!(s.check().unwrap().is_empty());
    assert_eq!(s.lookup(3, 4), vec![(3, 1, Piece::Zero)]);
    for p in [0, 1, 2, 4, 5, 6, 7] {
        assert_eq!(read_page(&s, p), fill(p + 1, 0));
    }
}

#[test]
fn a_failed_sync_refuses_writes_until_reopened() {
    let d = SimDir::new();
    let s = open_sized(&d, 8 * PAGE);
    s.write(0, &fill(1, 0), false).unwrap();
    d.fail_sync(0);
    assert!(s.flush().is_err());
    let e = s.write(1, &fill(2, 0), false).unwrap_err();
    assert!(e.to_string().contains("refused"), "{e}");
    drop(s);
    d.kill();
    let s = open_sized(&d, 8 * PAGE);
    s.write(1, &fill(2, 0), false).unwrap();
    s.flush().unwrap();
}

#[test]
fn a_full_disk_fails_the_write_and_loses_nothing() {
    let d = SimDir::new();
    let s = open_sized(&d, 8 * PAGE);
    s.write(0, &fill(1, 0), false).unwrap();
    s.flush().unwrap();
    d.fail_write(0, libc::ENOSPC);
    let e = s.write(0, &fill(2, 0), false).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpace, "{e}");
    assert_eq!(read_page(&s, 0), fill(1, 0));
    // Space is back: writing works again.
    s.write(0, &fill(3, 0), false).unwrap();
    s.flush().unwrap();
    assert_eq!(read_page(&s, 0), fill(3, 0));
}

/// A write accepted without waiting does no I/O: it only takes slots and
/// journal room reserved before, and declines, changing nothing, when it
/// would have to reserve. Near a full disk nothing is reserved ahead, so
/// new pages go the blocking way and meet ENOSPC there.
#[test]
fn writes_accepted_without_waiting_do_no_io_and_decline_without_reserved_space() {
    const N: u64 = 4096;
    let d = SimDir::new();
    let (s, _) = PageStore::open(Arc::new(d.clone()), N * PAGE, IDENTITY).unwrap();
    let page = |id: u64| {
        let mut v = fill(id, 0);
        v.resize(PAGE as usize, 7);
        v
    };
    // An overlay nothing was written to reserves nothing at open (every
    // untouched VM disk would cost megabytes): its first no-wait write
    // declines, and the blocking one reserves ahead.
    assert!(
        s.write_now(0, &page(1), false).is_none(),
        "nothing reserved"
    );
    s.write(N - 1, &page(N - 1), false).unwrap();
    let counts = d.counts();
    s.write_now(0, &page(1), false)
        .expect("room reserved by the first write")
        .unwrap();
    s.zero_now(1, 2).expect("journal room").unwrap();
    assert_eq!(d.counts(), counts, "no write, no sync");
    assert_eq!(read_page(&s, 0), page(1), "read from memory");
    s.drain(false);
    assert_eq!(
        d.counts().0,
        counts.0 + 2,
        "one page write, one journal write"
    );
    assert_eq!(read_page(&s, 0), page(1), "read from the file");
    // Little space left: reservations stay exact, so the no-wait path runs
    // out of reserved slots and declines, and declining leaves no trace.
    d.set_free_space(1 << 20);
    let mut p = 3;
    while s.write_now(p, &page(p), false).is_some() {
        p += 1;
        assert!(p < N, "never declined");
    }
    s.drain(false);
    let (lookup, pages, counts) = (s.lookup(0, N), s.data_pages(), d.counts());
    assert!(s.write_now(p, &page(p), false).is_none());
    assert_eq!(s.lookup(0, N), lookup);
    assert_eq!(s.data_pages(), pages);
    assert_eq!(d.counts(), counts);
    // The blocking write reserves what it needs.
    s.write(p, &page(p), false).unwrap();
    s.flush().unwrap();
    drop(s);
    d.kill();
    let (s, _) = PageStore::open(Arc::new(d.clone()), N * PAGE, IDENTITY).unwrap();
    for q in (3..=p).step_by(97).chain([p]) {
        assert_eq!(read_page(&s, q), page(q), "page {q}");
    }
}

/// A compaction writes a journal that trusts every map entry, so the
/// pages of writes accepted but not drained go on file before its sync.
#[test]
fn a_compaction_puts_accepted_writes_on_file_first() {
    let d = SimDir::new();
    let s = open(&d);
    s.write(0, &fill(1, 0), false).unwrap();
    for p in 1..4 {
        s.write_now(p, &fill(p + 1, p), false)
            .expect("room reserved")
            .unwrap();
    }
    s.compact().unwrap();
    s.abandon();
    drop(s);
    d.power_cut(&mut |_| 0);
    let s = open(&d);
    for p in 0..4 {
        assert_eq!(read_page(&s, p), fill(p + 1, p), "page {p}");
    }
}

#[test]
fn rewrites_without_flushes_ask_for_one() {
    let d = SimDir::new();
    let s = open_sized(&d, 8 * PAGE);
    // 8 new pages, then FLUSH_AFTER rewrites (each holds a replaced slot).
    for i in 0..FLUSH_AFTER as u64 + 8 {
        assert!(!s.wants_flush(), "after {i} writes");
        s.write(i % 8, &fill(i + 1, 0), false).unwrap();
    }
    assert!(s.wants_flush());
    s.flush().unwrap();
    assert!(!s.wants_flush());
}
