//! A failing origin, one fault class at a time: what the client sees, what
//! the cache keeps. Never a wrong byte; EIO only when retrying cannot help
//! or the deadline has passed, with the reason in the log.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::*;
use lazybd::nbd::wire::errno;
use lazybd::origin::{Hedge, OriginOptions};
use lazybd::stats::Stats;

const MIB: usize = 1 << 20;
const BS: u64 = 64 << 10;

/// A read of block `b` (4 KiB at its start) that must return the image's bytes.
async fn read_ok(c: &mut Client, img: &[u8], b: u64) {
    let off = b * BS;
    let r = c.read(off, 4096).await.unwrap();
    assert_eq!(r.error, 0, "block {b}");
    assert!(
        r.data == img[off as usize..off as usize + 4096],
        "block {b}: wrong bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_are_retried_and_never_served() {
    let img = image(4 * MIB, 31);
    let (o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    // Blocks far apart: no readahead between them.
    o.faults.reset_next.store(2, SeqCst);
    read_ok(&mut c, &img, 2).await;
    o.faults.long_body_next.store(1, SeqCst);
    read_ok(&mut c, &img, 20).await;
    *o.faults.status_next.lock().unwrap() = Some((503, 2));
    read_ok(&mut c, &img, 40).await;
    *o.faults.status_next.lock().unwrap() = Some((502, 1));
    read_ok(&mut c, &img, 60).await;
    let st = stop(srv).await;
    assert!(Stats::get(&st.origin_errors) >= 6, "{st}");
    assert_eq!(Stats::get(&st.crc_failures), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_object_fails_reads_at_once_and_says_why() {
    let img = image(4 * MIB, 32);
    let (o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    read_ok(&mut c, &img, 1).await;
    for code in [404u16, 416, 410] {
        *o.faults.status_next.lock().unwrap() = Some((code, 1000));
        let t = Instant::now();
        let r = c.read(30 * BS + code as u64 * 4096, 100).await.unwrap();
        assert_eq!(r.error, errno::EIO, "HTTP {code}");
        // Not retried for the whole deadline: the object is gone.
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "HTTP {code} was retried"
        );
    }
    *o.faults.status_next.lock().unwrap() = None;
    // Cached blocks are still served.
    read_ok(&mut c, &img, 1).await;
    stop(srv).await;
}

/// An origin that stops honouring Range mid-run (200 with the whole
/// object): reads it would serve fail with EIO at once, the body is never
/// read into the cache, cached blocks are still served, and once Range is
/// back the same blocks read correctly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_support_withdrawn_mid_run_is_eio_never_the_whole_object() {
    let img = image(4 * MIB, 35);
    let (o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    read_ok(&mut c, &img, 1).await;
    o.faults.no_range.store(true, SeqCst);
    let t = Instant::now();
    let r = c.read(40 * BS, 4096).await.unwrap();
    assert_eq!(r.error, errno::EIO);
    assert!(t.elapsed() < Duration::from_secs(5), "a 200 was retried");
    read_ok(&mut c, &img, 1).await;
    o.faults.no_range.store(false, SeqCst);
    read_ok(&mut c, &img, 40).await;
    let st = stop(srv).await;
    assert!(
        Stats::get(&st.origin_bytes) < img.len() as u64,
        "a whole-object body was read: {st}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_is_hedged() {
    let img = image(4 * MIB, 33);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.origin_options.hedge = Hedge::After(Duration::from_millis(100));
    cfg.origin_options.request_timeout = Duration::from_secs(20);
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    o.faults.stall_ms.store(10_000, SeqCst);
    o.faults.stall_next.store(1, SeqCst);
    let t = Instant::now();
    read_ok(&mut c, &img, 5).await;
    // The twin answered; the stalled request was not waited for.
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    let st = stop(srv).await;
    assert!(Stats::get(&st.origin_hedges) >= 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_hedging_a_stall_is_timed_out_and_retried() {
    let img = image(4 * MIB, 34);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.origin_options.hedge = Hedge::Off;
    cfg.origin_options.request_timeout = Duration::from_millis(500);
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    o.faults.stall_ms.store(5_000, SeqCst);
    o.faults.stall_next.store(1, SeqCst);
    read_ok(&mut c, &img, 7).await;
    let st = stop(srv).await;
    assert!(Stats::get(&st.origin_errors) >= 1, "{st}");
    assert_eq!(Stats::get(&st.origin_hedges), 0);
}

/// With the default timeouts (30 s per request, 30 s deadline) and no
/// hedging, a response that goes silent mid-body is abandoned after the
/// stall timeout and retried: the read succeeds long before the deadline
/// (before, the one stalled request used all of it and the read was EIO).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_that_goes_silent_is_retried_before_the_deadline() {
    let img = image(4 * MIB, 36);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.origin_options.hedge = Hedge::Off;
    cfg.origin_options.request_timeout = OriginOptions::default().request_timeout;
    cfg.origin_options.deadline = OriginOptions::default().deadline;
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    o.faults.stall_ms.store(60_000, SeqCst);
    o.faults.stall_body_next.store(1, SeqCst);
    let t = Instant::now();
    read_ok(&mut c, &img, 11).await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let st = stop(srv).await;
    assert!(Stats::get(&st.origin_errors) >= 1, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eio_comes_only_after_the_deadline() {
    let img = image(4 * MIB, 35);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.origin_options.retries = u32::MAX;
    cfg.origin_options.deadline = Duration::from_millis(1500);
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    o.faults.fail_next.store(1_000_000, SeqCst);
    let t = Instant::now();
    let r = c.read(9 * BS, 4096).await.unwrap();
    let took = t.elapsed();
    assert_eq!(r.error, errno::EIO);
    // Kept trying until (about) the deadline, not longer.
    assert!(
        took >= Duration::from_millis(1000),
        "gave up after {took:?}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The origin recovers: the next read works, nothing bad was cached.
    o.faults.fail_next.store(0, SeqCst);
    read_ok(&mut c, &img, 9).await;
    let st = stop(srv).await;
    assert!(Stats::get(&st.origin_errors) >= 4, "{st}");
}
