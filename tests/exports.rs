//! Many exports, one cache; writable exports over NBD; runtime management
//! through the control socket.

mod common;

use std::time::Duration;

use common::*;
use lazybd::daemon::control::{self, Request};
use lazybd::daemon::ExportConfig;
use lazybd::nbd::wire::{cmd, cmdflag, errno};
use tokio::io::AsyncWriteExt;

const MIB: usize = 1 << 20;
const BS: u64 = 64 << 10;

fn export(name: &str, image: &str, writable: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        image: image.into(),
        writable,
        overlay_dir: None,
        description: None,
        hydrate: false,
        format: None,
    }
}

async fn write(c: &mut Client, flags: u16, off: u64, data: &[u8]) -> u32 {
    let id = c.send(cmd::WRITE, flags, off, data.len() as u32).await;
    c.s.write_all(data).await.unwrap();
    let (cookie, r) = c.recv(None).await.unwrap();
    assert_eq!(cookie, id);
    r.error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_exports_share_one_cache() {
    let img = image(4 * MIB, 71);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.exports = (0..8)
        .map(|i| export(&format!("vm{i}"), &o.url, i % 2 == 1))
        .collect();
    let (srv, addr) = start(cfg).await;
    let before = o.requests();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (addr, img) = (addr.clone(), img.clone());
        tasks.push(tokio::spawn(async move {
            let name: &'static str = Box::leak(format!("vm{i}").into_boxed_str());
            let mut c = Client::to_export(&addr, name).await;
            let r = c.read(0, 4 * MIB as u32).await.unwrap();
            assert!(r.data == img, "export vm{i}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 4 MiB in at most 4 MiB fetches: far fewer requests than 8 full reads,
    // and never more than the blocks in the image.
    let n = o.requests() - before;
    assert!(
        n <= 4 * MIB as u64 / BS,
        "8 readers of one image fetched {n} times"
    );
    let blocks_fetched = lazybd::stats::Stats::get(&stop(srv).await.origin_bytes);
    assert_eq!(
        blocks_fetched,
        4 * MIB as u64,
        "every byte fetched exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writable_exports_are_isolated_and_durable() {
    let img = image(2 * MIB, 81);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.exports = vec![
        export("a", &o.url, true),
        export("b", &o.url, true),
        export("ro", &o.url, false),
    ];
    let (srv, addr) = start(cfg.clone()).await;
    let mut a = Client::to_export(&addr, "a").await;
    let mut b = Client::to_export(&addr, "b").await;
    assert_eq!(write(&mut a, 0, 1000, &[0xAA; 5000]).await, 0);
    assert_eq!(write(&mut b, cmdflag::FUA, 70000, &[0xBB; 100]).await, 0);
    // Past the end: ENOSPC, as the spec asks.
    assert_eq!(
        write(&mut a, 0, 2 * MIB as u64 - 10, &[1; 20]).await,
        errno::ENOSPC
    );
    // WRITE_ZEROES with FAST_ZERO on an unaligned range: ENOTSUP, not slow.
    a.send(cmd::WRITE_ZEROES, cmdflag::FAST_ZERO, 10, 100).await;
    assert_eq!(a.recv(None).await.unwrap().1.error, errno::ENOTSUP);
    a.send(cmd::WRITE_ZEROES, 0, BS, 2 * BS as u32).await;
    assert_eq!(a.recv(None).await.unwrap().1.error, 0);
    // NO_HOLE: allocated zeroes, reported as data, not as a hole.
    a.send(cmd::WRITE_ZEROES, cmdflag::NO_HOLE, 4 * BS, BS as u32)
        .await;
    assert_eq!(a.recv(None).await.unwrap().1.error, 0);
    a.send(cmd::BLOCK_STATUS, 0, 0, 5 * BS as u32).await;
    let (_, st) = a.recv(None).await.unwrap();
    let z = lazybd::nbd::wire::state::HOLE | lazybd::nbd::wire::state::ZERO;
    assert_eq!(
        st.extents,
        vec![(BS as u32, 0), (2 * BS as u32, z), (2 * BS as u32, 0)]
    );
    a.send(
        cmd::WRITE_ZEROES,
        cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        0,
        BS as u32,
    )
    .await;
    assert_eq!(a.recv(None).await.unwrap().1.error, errno::ENOTSUP);
    a.send(cmd::FLUSH, 0, 0, 0).await;
    assert_eq!(a.recv(None).await.unwrap().1.error, 0);
    let mut want_a = img.clone();
    want_a[4 * BS as usize..5 * BS as usize].fill(0);
    want_a[1000..6000].fill(0xAA);
    want_a[BS as usize..3 * BS as usize].fill(0);
    let mut want_b = img.clone();
    want_b[70000..70100].fill(0xBB);
    assert!(a.read(0, 2 * MIB as u32).await.unwrap().data == want_a);
    assert!(b.read(0, 2 * MIB as u32).await.unwrap().data == want_b);
    let mut ro = Client::to_export(&addr, "ro").await;
    assert!(
        ro.read(0, 2 * MIB as u32).await.unwrap().data == img,
        "the template never changes"
    );
    assert_eq!(write(&mut ro, 0, 0, &[1; 10]).await, errno::EPERM);
    drop((a, b, ro));
    stop(srv).await;
    // After a restart every flushed write reads back.
    let (srv, addr) = start(cfg).await;
    let mut a = Client::to_export(&addr, "a").await;
    let mut b = Client::to_export(&addr, "b").await;
    assert!(a.read(0, 2 * MIB as u32).await.unwrap().data == want_a);
    assert!(b.read(0, 2 * MIB as u32).await.unwrap().data == want_b);
    drop((a, b));
    stop(srv).await;
    assert!(*o.data.lock().unwrap() == img, "the origin never changes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_socket_adds_lists_and_removes_exports() {
    let img = image(MIB, 91);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.control = Some(sock.clone());
    let (srv, addr) = start(cfg).await;
    let mode = std::fs::metadata(&sock)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
        .unwrap();
    assert_eq!(mode & 0o777, 0o600, "control socket must be owner-only");
    control::call(
        &sock,
        &Request::Add {
            export: export("vm1", &o.url, true),
        },
    )
    .await
    .unwrap();
    assert!(
        control::call(
            &sock,
            &Request::Add {
                export: export("vm1", &o.url, false)
            }
        )
        .await
        .is_err(),
        "duplicate name"
    );
    assert!(
        control::call(
            &sock,
            &Request::Add {
                export: export("../x", &o.url, false)
            }
        )
        .await
        .is_err(),
        "bad name"
    );
    let mut c = Client::to_export(&addr, "vm1").await;
    assert_eq!(write(&mut c, 0, 0, &[7u8; 4096]).await, 0);
    // Reading "disk" is undisturbed while exports come and go.
    let mut d = Client::connect(&addr, Opts::default()).await;
    let list = control::call(&sock, &Request::List).await.unwrap().exports;
    let vm1 = list.iter().find(|e| e.name == "vm1").unwrap();
    assert!(
        vm1.writable && vm1.clients == 1 && vm1.overlay_bytes >= 4096,
        "{vm1:?}"
    );
    // Refused with a client connected, unless forced.
    let e = control::call(
        &sock,
        &Request::Remove {
            name: "vm1".into(),
            force: false,
            delete_overlay: false,
        },
    )
    .await;
    assert!(e.unwrap_err().to_string().contains("connected"));
    control::call(
        &sock,
        &Request::Remove {
            name: "vm1".into(),
            force: true,
            delete_overlay: false,
        },
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut c.s, &mut buf),
    )
    .await
    .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "forced removal disconnects the client"
    );
    assert!(d.read(0, 4096).await.unwrap().data == img[..4096]);
    // Re-adding finds the overlay kept; removing with delete_overlay drops it.
    control::call(
        &sock,
        &Request::Add {
            export: export("vm1", &o.url, true),
        },
    )
    .await
    .unwrap();
    let mut c = Client::to_export(&addr, "vm1").await;
    assert!(c.read(0, 4096).await.unwrap().data == [7u8; 4096]);
    drop(c);
    tokio::time::sleep(Duration::from_millis(100)).await;
    control::call(
        &sock,
        &Request::Remove {
            name: "vm1".into(),
            force: false,
            delete_overlay: true,
        },
    )
    .await
    .unwrap();
    assert!(!dir.path().join("overlays/vm1").exists());
    control::call(
        &sock,
        &Request::Add {
            export: export("vm1", &o.url, true),
        },
    )
    .await
    .unwrap();
    let mut c = Client::to_export(&addr, "vm1").await;
    assert!(
        c.read(0, 4096).await.unwrap().data == img[..4096],
        "a deleted overlay starts fresh"
    );
    drop((c, d));
    stop(srv).await;
    assert!(!sock.exists(), "control socket removed at shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_reports_counters() {
    let img = image(MIB, 95);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.metrics = Some(format!("127.0.0.1:{port}"));
    cfg.exports.push(export("vm", &o.url, true));
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(0, MIB as u32).await.unwrap().data == img);
    let mut w = Client::to_export(&addr, "vm").await;
    assert_eq!(write(&mut w, 0, 0, &[1u8; 65536]).await, 0);
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut body)
        .await
        .unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    let metric = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in:\n{body}"))
    };
    assert_eq!(metric("lazybd_origin_bytes_total{"), MIB as f64);
    assert_eq!(metric("lazybd_read_bytes_total{"), MIB as f64);
    assert_eq!(metric("lazybd_export_clients{export=\"vm\""), 1.0);
    assert_eq!(metric("lazybd_overlay_bytes{export=\"vm\""), BS as f64);
    let count = metric("lazybd_origin_request_seconds_count{");
    assert!(count >= 1.0);
    assert_eq!(
        metric("lazybd_origin_request_seconds_bucket{le=\"+Inf\""),
        count,
        "cumulative buckets end at count"
    );
    drop((c, w));
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_cache_evicts_cold_blocks_and_stays_correct() {
    let img = image(8 * MIB, 97);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&o.url, dir.path(), BS);
    let limit = 2 * MIB as u64;
    cfg.cache_size = Some(limit);
    cfg.exports.push(export("vm", &o.url, true));
    let (srv, addr) = start(cfg).await;
    let mut w = Client::to_export(&addr, "vm").await;
    assert_eq!(write(&mut w, 0, 0, &[9u8; 65536]).await, 0);
    let mut c = Client::connect(&addr, Opts::default()).await;
    // Sweep the whole image three times (4x the limit each), with one
    // block read between every MiB.
    for round in 0..3 {
        for off in (0..8 * MIB as u64).step_by(MIB) {
            let r = c.read(off, MIB as u32).await.unwrap();
            assert!(
                r.data == img[off as usize..off as usize + MIB],
                "round {round} at {off}"
            );
            assert!(
                c.read(7 * MIB as u64 + 4096, 4096).await.unwrap().data
                    == img[7 * MIB + 4096..7 * MIB + 8192]
            );
        }
    }
    let cache = srv.cache(&o.url).await.unwrap();
    let mut present = cache.present_bytes();
    for _ in 0..50 {
        if present <= (limit as f64 * lazybd::daemon::HIGH_WATERMARK) as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        present = cache.present_bytes();
    }
    assert!(
        present <= (limit as f64 * lazybd::daemon::HIGH_WATERMARK) as u64,
        "cache holds {present} bytes over a {limit} limit"
    );
    // Evicted blocks come back from the origin, correct; the overlay's
    // write was never evicted.
    assert!(c.read(0, 8 * MIB as u32).await.unwrap().data == img);
    let r = w.read(0, 65536).await.unwrap();
    assert!(r.data == [9u8; 65536]);
    let stats = stop(srv).await;
    assert!(lazybd::stats::Stats::get(&stats.evictions) > 0);
    // And the cache left behind verifies clean.
    let d = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.path().join("data").exists() && e.path().join("origin").exists())
        .unwrap()
        .path();
    let rep = lazybd::cache::verify::verify_image(&d, false, |_, _| {}).unwrap();
    assert!(rep.damaged_blocks.is_empty());
}

/// One origin whose probe hangs must not stall the server: exports of
/// other images are added, read and removed meanwhile, the periodic sync
/// and the metrics' view of images go on, and adds of the stalled image
/// share its one probe and end up on one cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_origin_probe_stalls_no_other_image() {
    use std::sync::atomic::Ordering::SeqCst;
    use std::time::Instant;
    let fast_img = image(2 * MIB, 101);
    let slow_img = image(MIB, 102);
    let fast = TestOrigin::start(fast_img.clone()).await;
    let slow = TestOrigin::start(slow_img.clone()).await;
    // The probe is the first ranged GET.
    slow.faults.stall_ms.store(20_000, SeqCst);
    slow.faults.stall_next.store(1, SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("control.sock");
    let mut cfg = config(&fast.url, dir.path(), BS);
    cfg.control = Some(sock.clone());
    cfg.origin_options.request_timeout = Duration::from_secs(40);
    let (srv, addr) = start(cfg).await;
    let add = |name: &str, url: &str| {
        let (sock, e) = (sock.clone(), export(name, url, false));
        tokio::spawn(async move { control::call(&sock, &Request::Add { export: e }).await })
    };
    let slow1 = add("slow1", &slow.url);
    while slow.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slow2 = add("slow2", &slow.url);
    let quick = Duration::from_secs(5);
    let timed = |what: String, t: Instant| {
        assert!(t.elapsed() < quick, "{what} took {:?}", t.elapsed());
    };
    for i in 0..3 {
        let name: &'static str = Box::leak(format!("fast{i}").into_boxed_str());
        let t = Instant::now();
        tokio::time::timeout(quick, add(name, &fast.url))
            .await
            .unwrap_or_else(|_| panic!("adding {name} waits for another image's probe"))
            .unwrap()
            .unwrap();
        timed(format!("adding {name}"), t);
        let t = Instant::now();
        let mut c = tokio::time::timeout(
            quick,
            Client::connect(
                &addr,
                Opts {
                    name,
                    ..Opts::default()
                },
            ),
        )
        .await
        .expect("connect");
        let off = i as u64 * 512 * 1024;
        let r = tokio::time::timeout(quick, c.read(off, 256 * 1024))
            .await
            .expect("read")
            .unwrap();
        assert!(r.data == fast_img[off as usize..off as usize + 256 * 1024]);
        drop(c);
        timed(format!("reading {name}"), t);
        let t = Instant::now();
        tokio::time::timeout(
            quick,
            control::call(
                &sock,
                &Request::Remove {
                    name: name.into(),
                    force: true,
                    delete_overlay: false,
                },
            ),
        )
        .await
        .expect("remove")
        .unwrap();
        timed(format!("removing {name}"), t);
        let t = Instant::now();
        tokio::time::timeout(quick, srv.daemon.sync_all())
            .await
            .expect("sync")
            .unwrap();
        timed("syncing".into(), t);
        let t = Instant::now();
        tokio::time::timeout(quick, srv.cache(&fast.url))
            .await
            .expect("cache lookup")
            .unwrap();
        timed("looking up a cache".into(), t);
    }
    assert!(!slow1.is_finished() && !slow2.is_finished());
    // The stalled probe ends (the origin answers after 20 s); both adds
    // succeed on one probe and one cache.
    let t = Instant::now();
    tokio::time::timeout(Duration::from_secs(40), slow1)
        .await
        .expect("the stalled add ends")
        .unwrap()
        .unwrap();
    tokio::time::timeout(quick, slow2)
        .await
        .expect("the joined add ends with it")
        .unwrap()
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(25));
    // One probe, one look for a manifest published beside the image, and
    // one read of the first block (the format rule looks at the image's
    // first bytes), for both adds.
    assert_eq!(
        slow.requests(),
        3,
        "one probe, one manifest lookup and one head read for two adds"
    );
    assert_eq!(srv.daemon.image_stats_now().len(), 2, "one cache per image");
    for name in ["slow1", "slow2"] {
        let mut c = Client::to_export(&addr, name).await;
        assert!(c.read(0, 65536).await.unwrap().data == slow_img[..65536]);
    }
    stop(srv).await;
}

/// An add whose probe is under way and is cancelled (its caller went
/// away) hands the image over: an add waiting on it probes again and
/// succeeds, and nothing is left half-open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_add_cancelled_during_its_probe_hands_over_to_the_next() {
    use std::sync::atomic::Ordering::SeqCst;
    let img = image(MIB, 103);
    let fast = TestOrigin::start(image(MIB, 104)).await;
    let slow = TestOrigin::start(img.clone()).await;
    slow.faults.stall_ms.store(20_000, SeqCst);
    slow.faults.stall_next.store(1, SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&fast.url, dir.path(), BS);
    cfg.origin_options.request_timeout = Duration::from_secs(40);
    let (srv, addr) = start(cfg).await;
    let add = |name: &str| {
        let (d, e) = (srv.daemon.clone(), export(name, &slow.url, false));
        tokio::spawn(async move { d.add_export(&e).await })
    };
    let first = add("a");
    while slow.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let second = add("b");
    tokio::time::sleep(Duration::from_millis(100)).await;
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("the waiting add takes over")
        .unwrap()
        .unwrap();
    assert_eq!(
        slow.requests(),
        4,
        "the cancelled probe, then one more, a manifest lookup, then the first block (the format rule)"
    );
    assert_eq!(srv.daemon.image_stats_now().len(), 2);
    let mut c = Client::to_export(&addr, "b").await;
    assert!(c.read(0, 65536).await.unwrap().data == img[..65536]);
    assert!(srv.daemon.list().iter().all(|e| e.name != "a"));
    stop(srv).await;
}
