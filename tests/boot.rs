//! Boot acceleration and hydration against a real server: sequential
//! readahead, boot profile record / publish / replay, background hydration
//! with its rate limit and resume after a restart.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::*;
use lazybd::block::ByteRange;
use lazybd::cache::CacheDir;
use lazybd::prefetch::hydrate::Progress;
use lazybd::prefetch::profile::{Profile, SIDECAR_SUFFIX};
use lazybd::stats::Stats;

const MIB: usize = 1 << 20;
const BS: u64 = 64 << 10;

/// The only image directory in a cache directory.
fn image_dir(cache: &Path) -> PathBuf {
    let images = CacheDir::new(cache).unwrap().images().unwrap();
    assert_eq!(images.len(), 1, "{images:?}");
    images[0].clone()
}

/// Poll `f` every 20 ms until true or 20 s (then panic with `what`).
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_reads_are_read_ahead_in_growing_requests() {
    let img = image(16 * MIB, 3);
    let o = TestOrigin::start(img.clone()).await;
    o.faults.latency_ms.store(5, SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let (srv, addr) = start(config(&o.url, dir.path(), BS)).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    let before = o.requests();
    // One request at a time, like a booting guest: 128 reads of 128 KiB.
    for i in 0..128u64 {
        let off = i * (128 << 10);
        let r = c.read(off, 128 << 10).await.unwrap();
        assert!(
            r.data == img[off as usize..off as usize + (128 << 10)],
            "read {i}"
        );
    }
    let requests = o.requests() - before;
    let st = stop(srv).await;
    assert!(Stats::get(&st.readahead_bytes) >= 8 << 20, "{st}");
    // Without readahead: one request per read (128). The window grows to
    // MAX_WINDOW, so a few dozen requests carry the image.
    assert!(
        requests <= 40,
        "{requests} origin requests for 128 sequential reads"
    );
    // Every block came once: readahead never fetches a block twice.
    assert_eq!(Stats::get(&st.origin_bytes), img.len() as u64, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_reads_do_not_trigger_readahead() {
    let img = image(8 * MIB, 4);
    let (_o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    for b in [90u64, 3, 57, 12, 100, 41, 7, 66, 23, 115] {
        let off = b * BS;
        assert!(c.read(off, 4096).await.unwrap().data == img[off as usize..off as usize + 4096]);
    }
    let st = stop(srv).await;
    assert_eq!(Stats::get(&st.readahead_bytes), 0, "{st}");
}

/// With the default 4 KiB block, a miss fetches what it reads: scattered
/// 4 KiB reads cost 4 KiB of origin bytes each. A miss next to a recent
/// miss fetches the 64 KiB neighbourhood around it, so the reads that
/// follow there are hits; sequential reads still become large requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_misses_fetch_what_they_read_and_clustered_ones_their_neighbourhood() {
    const CELL: u64 = 64 << 10;
    let img = image(64 * MIB, 9);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.block_size = None; // the default
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    let check = |r: &Reply, off: u64, len: u64| {
        assert!(
            r.data == img[off as usize..(off + len) as usize],
            "read at {off}"
        );
    };
    let cache = srv.cache(&o.url).await.unwrap();
    assert_eq!(cache.block_size().bytes(), 4096, "the default block");
    let fetched = || Stats::get(&cache.stats().origin_bytes);
    // 1. Scattered reads, one cell (64 KiB) in every 17 MiB-ish apart.
    let base = fetched();
    let spots: Vec<u64> = (0..40u64)
        .map(|i| (i * 1_573_000 + 8192) / 4096 * 4096)
        .collect();
    for &off in &spots {
        check(&c.read(off, 4096).await.unwrap(), off, 4096);
    }
    assert_eq!(
        fetched() - base,
        40 * 4096,
        "isolated misses fetch 4 KiB each"
    );
    // 2. A second miss in the cell of a recent one: the cell comes whole,
    //    and the rest of it is served locally.
    let cell = 5 * CELL * 100;
    check(&c.read(cell + 4096, 4096).await.unwrap(), cell + 4096, 4096);
    let before = fetched();
    check(
        &c.read(cell + 40960, 4096).await.unwrap(),
        cell + 40960,
        4096,
    );
    // The neighbourhood comes in the background: the read does not wait.
    let cell_present = || (0..CELL / 4096).all(|k| !cache.is_missing((cell + k * 4096) / 4096));
    until("the neighbourhood is stored", cell_present).await;
    assert_eq!(
        fetched() - before,
        CELL - 4096,
        "the neighbourhood, less what was there"
    );
    // 3. A sequential run still becomes large requests.
    let (start_off, n) = (32 * MIB as u64, 64u64);
    let requests = o.requests();
    for i in 0..n {
        let off = start_off + i * (128 << 10);
        check(&c.read(off, 128 << 10).await.unwrap(), off, 128 << 10);
    }
    // Readahead windows grow from 256 KiB: most reads are served by them.
    assert!(
        o.requests() - requests <= n / 3,
        "{} requests for {n} sequential reads",
        o.requests() - requests
    );
    drop(c);
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_profile_is_published_and_replayed_on_a_cold_start() {
    let img = image(8 * MIB, 5);
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("base.img");
    std::fs::write(&path, &img).unwrap();
    let spec = path.display().to_string();

    // 1. Record: the first reads, in order, until shutdown.
    let cache1 = tempfile::tempdir().unwrap();
    let mut cfg = config(&spec, cache1.path(), BS);
    cfg.boot.record_profile = Some(None);
    cfg.boot.readahead = false;
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    for (off, len) in [
        (10 * BS + 5, 100u32),
        (3 * BS, 4096),
        (50 * BS, 3 * BS as u32),
        (10 * BS, 10),
    ] {
        assert!(
            c.read(off, len).await.unwrap().data == img[off as usize..(off + len as u64) as usize]
        );
    }
    drop(c);
    stop(srv).await;
    let p = Profile::load(&image_dir(cache1.path()))
        .unwrap()
        .expect("profile saved at shutdown");
    let br = |b: u64, n: u64| ByteRange {
        offset: b * BS,
        len: n * BS,
    };
    assert_eq!(p.ranges, vec![br(10, 1), br(3, 1), br(50, 3)]);
    assert_eq!(p.image_size, img.len() as u64);

    // 2. Publish it beside the image; a cold cache elsewhere replays it
    //    before any client reads.
    std::fs::write(format!("{spec}{SIDECAR_SUFFIX}"), p.encode()).unwrap();
    let cache2 = tempfile::tempdir().unwrap();
    let mut cfg = config(&spec, cache2.path(), BS);
    cfg.boot.replay_profile = true;
    let (srv, _addr) = start(cfg).await;
    let cache = srv.cache(&spec).await.unwrap();
    // The five profile blocks, and block 0, which the format rule reads at
    // open (unobserved: it is in no profile).
    until("profile replay", || cache.counts().0 == 6).await;
    for b in [0, 10, 3, 50, 51, 52] {
        assert!(!cache.is_missing(b), "block {b} not replayed");
    }
    let st = stop(srv).await;
    assert_eq!(Stats::get(&st.profile_bytes), 5 * BS, "{st}");
    assert_eq!(Stats::get(&st.reads), 0);
    // The published profile is kept with the cache.
    assert_eq!(Profile::load(&image_dir(cache2.path())).unwrap(), Some(p));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_published_profile_is_ignored() {
    let img = image(4 * MIB, 6);
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("base.img");
    std::fs::write(&path, &img).unwrap();
    let spec = path.display().to_string();
    std::fs::write(
        format!("{spec}{SIDECAR_SUFFIX}"),
        b"LBDPROF1 garbage garbage garbage",
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&spec, dir.path(), BS);
    cfg.boot.replay_profile = true;
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(BS, 4096).await.unwrap().data == img[BS as usize..BS as usize + 4096]);
    let st = stop(srv).await;
    assert_eq!(Stats::get(&st.profile_bytes), 0);
    assert_eq!(Profile::load(&image_dir(dir.path())).unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_is_rate_limited_resumes_and_fetches_each_block_once() {
    let img = image(16 * MIB, 7); // has a zero MiB at [1, 2) MiB
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();

    // Rate-limited: 4 MiB/s cannot have fetched the image in one second
    // (one second of tokens, one burst, fetches in flight: < 16 MiB).
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.boot.hydrate = true;
    cfg.boot.hydrate_rate = Some(4 << 20);
    let (srv, _addr) = start(cfg).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = stop(srv).await;
    let first = Stats::get(&st.hydrate_bytes);
    assert!(
        first > 0 && first < img.len() as u64,
        "hydrated {first} bytes"
    );
    let p = Progress::load(&image_dir(dir.path())).expect("status file");
    assert!(!p.complete && p.done_blocks > 0, "{p:?}");

    // Restarted without a limit: it finishes where it stopped.
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.boot.hydrate = true;
    let (srv, addr) = start(cfg).await;
    let cache = srv.cache(&o.url).await.unwrap();
    until("hydration complete", || {
        let (p, z, t) = cache.counts();
        p + z == t
    })
    .await;
    let before = o.requests();
    let mut c = Client::connect(&addr, Opts::default()).await;
    let r = c.read(0, 16 << 20).await.unwrap();
    assert!(r.data == img);
    assert_eq!(
        o.requests(),
        before,
        "a hydrated image reads without the origin"
    );
    let st2 = stop(srv).await;
    // Each block came from the origin once over both runs.
    assert_eq!(
        Stats::get(&st.origin_bytes) + Stats::get(&st2.origin_bytes),
        img.len() as u64
    );
    let p = Progress::load(&image_dir(dir.path())).expect("status file");
    assert!(p.complete && p.done_blocks == p.total_blocks, "{p:?}");
}
