//! In-process integration tests: the real server on port 0 against an
//! in-process HTTP origin that injects faults, driven by a small NBD client.

mod common;

use std::time::Duration;

use common::*;
use lazybd::nbd::wire::{
    cmd, cmdflag, errno, opt, rep, state, InfoRequest, MetaContextRequest, Request,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: usize = 1 << 20;
const BS: u64 = 64 << 10;

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unaligned_reads_match_origin() {
    let img = image(4 * MIB + 12345, 7); // size not a multiple of the block
    let (_o, _dir, srv, addr) = serve_image(&img, BS).await;
    for structured in [true, false] {
        let mut c = Client::connect(
            &addr,
            Opts {
                structured,
                meta: structured,
                ..Opts::default()
            },
        )
        .await;
        assert_eq!(c.size, img.len() as u64);
        let mut x = 99u64;
        let mut cases: Vec<(u64, u32)> = vec![
            (0, 1),
            (1, 511),
            (511, 2),
            (4095, 4098),
            (BS - 7, 14),
            (img.len() as u64 - 1, 1),
            (img.len() as u64 - 70000, 70000),
            (0, img.len() as u32),
        ];
        for _ in 0..200 {
            let off = xorshift(&mut x) % img.len() as u64;
            let len = (xorshift(&mut x) % 300_000).min(img.len() as u64 - off) as u32;
            cases.push((off, len));
        }
        for (off, len) in cases {
            let r = c.read(off, len).await.unwrap();
            assert_eq!(r.error, 0, "read {off}+{len}");
            assert!(
                r.data == img[off as usize..off as usize + len as usize],
                "bytes differ at {off}+{len} (structured={structured})"
            );
        }
    }
    let stats = stop(srv).await;
    assert_eq!(lazybd::stats::Stats::get(&stats.crc_failures), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_blocks_are_holes_and_block_status_reports_them() {
    let img = image(4 * MIB, 3);
    let (_o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    // Before anything is fetched nothing is known to be zero.
    let id = c.send(cmd::BLOCK_STATUS, 0, 0, 4 * MIB as u32).await;
    let (cookie, r) = c.recv(None).await.unwrap();
    assert_eq!((cookie, r.error), (id, 0));
    assert_eq!(r.extents, vec![(4 * MIB as u32, 0)]);
    // Fetch everything, then the zero MiB is a hole.
    let r = c.read(0, 4 * MIB as u32).await.unwrap();
    assert!(r.data == img);
    let r = c.read(MIB as u64 - 100, MIB as u32 + 200).await.unwrap();
    assert!(r.data == img[MIB - 100..2 * MIB + 100]);
    assert_eq!(r.holes, vec![(MIB as u64, MIB as u32)]);
    c.send(cmd::BLOCK_STATUS, 0, 0, 4 * MIB as u32).await;
    let (_, r) = c.recv(None).await.unwrap();
    let z = state::HOLE | state::ZERO;
    assert_eq!(
        r.extents,
        vec![(MIB as u32, 0), (MIB as u32, z), (2 * MIB as u32, 0)]
    );
    // REQ_ONE: a single descriptor.
    c.send(
        cmd::BLOCK_STATUS,
        cmdflag::REQ_ONE,
        MIB as u64 + 512,
        2 * MIB as u32,
    )
    .await;
    let (_, r) = c.recv(None).await.unwrap();
    assert_eq!(r.extents, vec![(MIB as u32 - 512, z)]);
    // DF: one data chunk, zeroes inline.
    let id = c.send(cmd::READ, cmdflag::DF, MIB as u64 - 10, 20).await;
    let (cookie, r) = c.recv(Some(20)).await.unwrap();
    assert_eq!(cookie, id);
    assert!(r.holes.is_empty());
    assert_eq!(r.chunks, vec![lazybd::nbd::wire::chunk::OFFSET_DATA]);
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_serves_everything_without_origin_traffic() {
    let img = image(3 * MIB, 11);
    let (o, dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(0, 3 * MIB as u32).await.unwrap().data == img);
    drop(c);
    stop(srv).await;
    let before = o.requests();
    let (srv, addr) = start(config(&o.url, dir.path(), BS)).await;
    assert_eq!(
        o.requests(),
        before + 2,
        "only the identity probe and the manifest lookup at open"
    );
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(0, 3 * MIB as u32).await.unwrap().data == img);
    assert!(c.read(12345, 777).await.unwrap().data == img[12345..12345 + 777]);
    assert_eq!(
        o.requests(),
        before + 2,
        "second full read must not touch the origin"
    );
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_share_one_fetch_and_reads_coalesce() {
    let img = image(4 * MIB, 5);
    let o = TestOrigin::start(img.clone()).await;
    o.faults
        .latency_ms
        .store(150, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let (srv, addr) = start(config(&o.url, dir.path(), BS)).await;
    let base = o.requests();
    let mut tasks = Vec::new();
    for i in 0..8u64 {
        let addr = addr.clone();
        let img = img.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(&addr, Opts::default()).await;
            let off = 3 * BS + i * 100;
            let r = c.read(off, 1000).await.unwrap();
            assert!(r.data == img[off as usize..off as usize + 1000]);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        o.requests() - base,
        1,
        "8 readers of one block: one origin request"
    );
    // One 1 MiB read over 16 missing blocks: one ranged GET.
    let mut c = Client::connect(&addr, Opts::default()).await;
    let before = o.requests();
    let r = c.read(2 * MIB as u64, MIB as u32).await.unwrap();
    assert!(r.data == img[2 * MIB..3 * MIB]);
    assert_eq!(o.requests() - before, 1, "adjacent missing blocks coalesce");
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_is_not_queued_behind_a_miss() {
    let img = image(2 * MIB, 9);
    let (o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    c.read(0, 4096).await.unwrap(); // block 0 cached
    o.faults
        .latency_ms
        .store(400, std::sync::atomic::Ordering::SeqCst);
    let slow = c.send(cmd::READ, 0, MIB as u64, 4096).await;
    let fast = c.send(cmd::READ, 0, 0, 4096).await;
    let (first, _) = c.recv(Some(4096)).await.unwrap();
    let (second, _) = c.recv(Some(4096)).await.unwrap();
    assert_eq!(
        (first, second),
        (fast, slow),
        "the cached read must be answered first"
    );
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_errors_are_answered_and_connection_survives() {
    let img = image(MIB, 1);
    let (_o, _dir, srv, addr) = serve_image(&img, BS).await;
    for structured in [true, false] {
        let mut c = Client::connect(
            &addr,
            Opts {
                structured,
                meta: structured,
                ..Opts::default()
            },
        )
        .await;
        let size = c.size;
        let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
            (cmd::READ, 0, size, 1, errno::EINVAL),       // past the end
            (cmd::READ, 0, size - 10, 11, errno::EINVAL), // straddles the end
            (cmd::READ, 0, u64::MAX - 5, 10, errno::EINVAL), // overflow
            (cmd::READ, 0, 0, (64 << 20) + 1, errno::EINVAL), // > 64 MiB payload
            (cmd::READ, 0x40, 0, 512, errno::EINVAL),     // unknown flag
            (cmd::READ, cmdflag::REQ_ONE, 0, 512, errno::EINVAL), // flag of another command
            (99, 0, 0, 0, errno::EINVAL),                 // unknown command
            (cmd::TRIM, 0, 0, 4096, errno::EPERM),        // read-only
            (cmd::WRITE_ZEROES, 0, 0, 4096, errno::EPERM),
            (cmd::FLUSH, 0, 1, 0, errno::EINVAL), // FLUSH with offset
            (cmd::CACHE, 0, size, 10, errno::EINVAL),
        ];
        for (typ, flags, off, len, want) in cases {
            let id = c.send(typ, flags, off, len).await;
            let (cookie, r) = c.recv(Some(len)).await.unwrap();
            assert_eq!(
                (cookie, r.error),
                (id, want),
                "typ {typ} flags {flags:#x} {off}+{len}"
            );
        }
        if !structured {
            // DF needs structured replies; BLOCK_STATUS needs a context.
            c.send(cmd::READ, cmdflag::DF, 0, 512).await;
            assert_eq!(c.recv(Some(512)).await.unwrap().1.error, errno::EINVAL);
            c.send(cmd::BLOCK_STATUS, 0, 0, 512).await;
            assert_eq!(c.recv(None).await.unwrap().1.error, errno::EINVAL);
        } else {
            c.send(cmd::BLOCK_STATUS, 0, 0, 0).await;
            assert_eq!(c.recv(None).await.unwrap().1.error, errno::EINVAL);
        }
        // WRITE on a read-only export: payload consumed, EPERM, stream in sync.
        let id = c.send(cmd::WRITE, 0, 0, 3000).await;
        c.s.write_all(&[0xAB; 3000]).await.unwrap();
        let (cookie, r) = c.recv(None).await.unwrap();
        assert_eq!((cookie, r.error), (id, errno::EPERM));
        // Zero-length read succeeds with no data; FLUSH and CACHE succeed.
        assert_eq!(c.read(100, 0).await.unwrap().error, 0);
        c.send(cmd::FLUSH, 0, 0, 0).await;
        assert_eq!(c.recv(None).await.unwrap().1.error, 0);
        c.send(cmd::CACHE, 0, 0, 8192).await;
        assert_eq!(c.recv(None).await.unwrap().1.error, 0);
        let r = c.read(5, 100).await.unwrap();
        assert!(r.error == 0 && r.data == img[5..105]);
    }
    // Bad magic: that connection is closed, others keep being served.
    let mut good = Client::connect(&addr, Opts::default()).await;
    let mut bad = Client::connect(&addr, Opts::default()).await;
    let mut req = Request {
        flags: 0,
        typ: cmd::READ,
        cookie: 1,
        offset: 0,
        len: 512,
    }
    .encode();
    req[0] ^= 0xff;
    bad.s.write_all(&req).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), bad.s.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "server must close after a bad magic"
    );
    assert!(good.read(0, 4096).await.unwrap().data == img[..4096]);
    // DISC with a request in flight: the reply still comes, then EOF.
    let id = good.send(cmd::READ, 0, 65536, 4096).await;
    good.send(cmd::DISC, 0, 0, 0).await;
    let (cookie, r) = good.recv(Some(4096)).await.unwrap();
    assert_eq!((cookie, r.error), (id, 0));
    assert!(matches!(good.s.read(&mut buf).await, Ok(0) | Err(_)));
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling_follows_the_spec() {
    let o = TestOrigin::start(image(MIB, 2)).await;
    let dir = tempfile::tempdir().unwrap();
    let (srv, addr) = start(config(&o.url, dir.path(), BS)).await;
    let mut s = greet(&addr).await;
    // Unknown option and EXTENDED_HEADERS: ERR_UNSUP, negotiation continues.
    send_option(&mut s, 4242, b"xyz").await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_UNSUP);
    send_option(&mut s, opt::EXTENDED_HEADERS, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_UNSUP);
    // STARTTLS without TLS configured: refused by policy.
    send_option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_POLICY);
    // LIST with data is invalid; without, lists "disk".
    send_option(&mut s, opt::LIST, b"x").await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_INVALID);
    send_option(&mut s, opt::LIST, &[]).await;
    let (_, t, d) = read_option_reply(&mut s).await.unwrap();
    assert_eq!(t, rep::SERVER);
    assert_eq!(&d[4..8], b"disk");
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ACK);
    // Meta contexts need structured replies first.
    let q = MetaContextRequest {
        name: "disk".into(),
        queries: vec!["base:allocation".into()],
    };
    send_option(&mut s, opt::SET_META_CONTEXT, &q.encode()).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_INVALID);
    send_option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ACK);
    // LIST_META_CONTEXT with no query lists base:allocation.
    let all = MetaContextRequest {
        name: "disk".into(),
        queries: vec![],
    };
    send_option(&mut s, opt::LIST_META_CONTEXT, &all.encode()).await;
    let (_, t, d) = read_option_reply(&mut s).await.unwrap();
    assert_eq!((t, &d[4..]), (rep::META_CONTEXT, &b"base:allocation"[..]));
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ACK);
    // Unknown export in INFO: ERR_UNKNOWN; malformed INFO: ERR_INVALID.
    let info = InfoRequest {
        name: "nope".into(),
        requests: vec![],
    };
    send_option(&mut s, opt::INFO, &info.encode()).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_UNKNOWN);
    send_option(&mut s, opt::INFO, &[0, 0, 0, 9, 1]).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ERR_INVALID);
    // INFO on the default (empty) name with NAME + DESCRIPTION requested.
    let info = InfoRequest {
        name: "".into(),
        requests: vec![1, 2, 3],
    };
    send_option(&mut s, opt::INFO, &info.encode()).await;
    let mut kinds = Vec::new();
    loop {
        let (_, t, d) = read_option_reply(&mut s).await.unwrap();
        if t == rep::ACK {
            break;
        }
        assert_eq!(t, rep::INFO);
        let k = u16::from_be_bytes([d[0], d[1]]);
        if k == 1 {
            assert_eq!(&d[2..], b"disk");
        }
        if k == 3 {
            let min = u32::from_be_bytes(d[2..6].try_into().unwrap());
            let pref = u32::from_be_bytes(d[6..10].try_into().unwrap());
            let max = u32::from_be_bytes(d[10..14].try_into().unwrap());
            assert_eq!((min, pref, max), (1, BS as u32, 64 << 20));
        }
        kinds.push(k);
    }
    kinds.sort();
    assert_eq!(kinds, vec![0, 1, 2, 3]);
    // ABORT: ACK then close.
    send_option(&mut s, opt::ABORT, &[]).await;
    assert_eq!(read_option_reply(&mut s).await.unwrap().1, rep::ACK);
    // Unknown client flags: dropped.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    s.write_u32(0x80).await.unwrap();
    let mut b = [0u8; 1];
    assert!(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
    // An option too long to be honest: dropped.
    let mut s = greet(&addr).await;
    s.write_all(
        &lazybd::nbd::wire::OptionHeader {
            option: opt::GO,
            len: 1 << 30,
        }
        .encode(),
    )
    .await
    .unwrap();
    assert!(matches!(s.read(&mut b).await, Ok(0) | Err(_)));
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_faults_are_retried_or_reported_never_served() {
    use std::sync::atomic::Ordering::SeqCst;
    let img = image(4 * MIB, 21);
    let (o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    // Transient faults are retried and the read succeeds with correct bytes.
    o.faults.fail_next.store(2, SeqCst);
    assert!(c.read(0, 8192).await.unwrap().data == img[..8192]);
    o.faults.truncate_next.store(1, SeqCst);
    assert!(c.read(BS, 8192).await.unwrap().data == img[BS as usize..BS as usize + 8192]);
    o.faults.wrong_range_next.store(1, SeqCst);
    assert!(c.read(2 * BS, 100).await.unwrap().data == img[2 * BS as usize..2 * BS as usize + 100]);
    // A persistent failure becomes EIO, and nothing is cached from it.
    // (Far from the reads above: their readahead may have cached nearby
    // blocks already.)
    o.faults.fail_next.store(1000, SeqCst);
    let r = c.read(40 * BS, 100).await.unwrap();
    assert_eq!(r.error, errno::EIO);
    o.faults.fail_next.store(0, SeqCst);
    assert!(
        c.read(40 * BS, 100).await.unwrap().data == img[40 * BS as usize..40 * BS as usize + 100]
    );
    // The object changes under the running export: EIO, never new or mixed bytes.
    let mut new = img.clone();
    new.iter_mut().for_each(|b| *b = b.wrapping_add(1));
    o.replace(new, "\"v2\"");
    let r = c.read(10 * BS, 4096).await.unwrap();
    assert_eq!(r.error, errno::EIO);
    // Cached blocks still read as the version they came from.
    assert!(c.read(0, 8192).await.unwrap().data == img[..8192]);
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_origin_gets_a_fresh_cache() {
    let img = image(2 * MIB, 31);
    let (o, dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(0, 2 * MIB as u32).await.unwrap().data == img);
    drop(c);
    stop(srv).await;
    let new = image(2 * MIB, 32);
    o.replace(new.clone(), "\"v2\"");
    let (srv, addr) = start(config(&o.url, dir.path(), BS)).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(
        c.read(0, 2 * MIB as u32).await.unwrap().data == new,
        "must serve the new version only"
    );
    stop(srv).await;
}

/// Serve `url` from the cache in `dir` as export `disk`, read it whole and
/// stop; returns the bytes and the origin requests the run made.
async fn serve_once(
    o: &TestOrigin,
    url: &str,
    dir: &std::path::Path,
    len: usize,
) -> (Vec<u8>, u64) {
    let before = o.requests();
    let (srv, addr) = start(config(url, dir, BS)).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    let r = c.read(0, len as u32).await.unwrap();
    assert_eq!(r.error, 0);
    drop(c);
    stop(srv).await;
    (r.data, o.requests() - before)
}

/// Two objects told apart only by the query (`?id=1`, `?id=2`), of one
/// size and without ETag or Last-Modified, are two images: neither may be
/// served from the other's cache. Signing parameters are not identity (a
/// re-signed URL keeps its cache), and no secret of the query reaches the
/// cache directory's names or its `origin` files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_told_apart_by_the_query_never_share_a_cache() {
    use std::sync::atomic::Ordering::SeqCst;
    let (one, two) = (image(2 * MIB, 51), image(2 * MIB, 52));
    let o = TestOrigin::start(Vec::new()).await;
    o.faults.no_validator.store(true, SeqCst);
    o.objects.lock().unwrap().extend([
        ("id=1".to_string(), one.clone()),
        ("id=2".to_string(), two.clone()),
    ]);
    let base = o.url.replace("/image.raw", "/get");
    let url = |id: u32, sig: &str| {
        format!(
            "{base}?id={id}&token=TOPSECRET{id}&X-Amz-Date=20261124T00{sig}Z&X-Amz-Expires=3600\
             &X-Amz-Credential=AKIDSECRET%2F20261124&X-Amz-Signature=SIGSECRET{sig}"
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (got, _) = serve_once(&o, &url(1, "a"), dir.path(), 2 * MIB).await;
    assert!(got == one, "id=1 serves object 1");
    let (got, _) = serve_once(&o, &url(2, "a"), dir.path(), 2 * MIB).await;
    assert!(got == two, "id=2 must not be served from the cache of id=1");
    // Re-signed (new date and signature): the same object, the same cache.
    let (got, requests) = serve_once(&o, &url(1, "b"), dir.path(), 2 * MIB).await;
    assert!(got == one);
    assert_eq!(
        requests, 2,
        "a re-signed URL is served from its cache (the probe and the manifest lookup only)"
    );
    // Both at once, as two exports of one server.
    let mut cfg = config(&url(1, "c"), dir.path(), BS);
    let mut second = cfg.exports[0].clone();
    second.name = "other".into();
    second.image = url(2, "c");
    cfg.exports.push(second);
    let (srv, addr) = start(cfg).await;
    for (name, want) in [("disk", &one), ("other", &two)] {
        let mut c = Client::to_export(&addr, name).await;
        assert!(
            c.read(0, 2 * MIB as u32).await.unwrap().data == *want,
            "export {name}"
        );
    }
    stop(srv).await;
    // Two image directories, and no secret in their names or records.
    let images = lazybd::cache::CacheDir::new(dir.path())
        .unwrap()
        .images()
        .unwrap();
    assert_eq!(images.len(), 2, "{images:?}");
    for d in images {
        let origin = std::fs::read_to_string(d.join("origin")).unwrap();
        let all = format!("{}\n{origin}", d.display());
        for secret in ["TOPSECRET", "AKIDSECRET", "SIGSECRET"] {
            assert!(!all.contains(secret), "{secret} leaked: {all}");
        }
        assert!(
            origin.contains("id="),
            "the query is part of the identity: {origin}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_cache_blocks_are_refetched() {
    let img = image(2 * MIB, 41);
    let (o, dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(0, 2 * MIB as u32).await.unwrap().data == img);
    // Flip bytes in the data file of block 3 (page 1 of it).
    let cache = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .find(|e| e.path().join("data").exists())
        .unwrap()
        .path();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(cache.join("data"))
            .unwrap();
        f.write_all_at(b"garbage!", 3 * BS + 5000).unwrap();
    }
    let before = o.requests();
    let r = c.read(3 * BS + 4000, 3000).await.unwrap();
    assert!(
        r.data == img[(3 * BS + 4000) as usize..(3 * BS + 7000) as usize],
        "never serve the damaged bytes"
    );
    assert_eq!(
        o.requests() - before,
        1,
        "the damaged block is refetched once"
    );
    let stats = stop(srv).await;
    assert_eq!(lazybd::stats::Stats::get(&stats.crc_failures), 1);
    // And `cache verify` finds the store clean again.
    let rep = lazybd::cache::verify::verify_image(&cache, false, |_, _| {}).unwrap();
    assert!(rep.damaged_blocks.is_empty());
    // 32 blocks; the second MiB is zero (metadata only), so 16 hold data.
    assert_eq!(rep.checked_blocks, 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_without_ranges_or_without_auth_is_refused_at_start() {
    use std::sync::atomic::Ordering::SeqCst;
    let o = TestOrigin::start(image(MIB, 4)).await;
    o.faults.no_range.store(true, SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let err = lazybd::daemon::start(config(&o.url, dir.path(), BS))
        .await
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("does not support byte ranges"),
        "{err}"
    );
    o.faults.no_range.store(false, SeqCst);
    *o.faults.require_header.lock().unwrap() = Some(("X-Auth-Token".into(), "s3cret".into()));
    let err = lazybd::daemon::start(config(&o.url, dir.path(), BS))
        .await
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("403"), "{err}");
    let mut cfg = config(&o.url, dir.path(), BS);
    cfg.origin_options.headers.fixed = vec![("X-Auth-Token".into(), "s3cret".into())];
    let (srv, addr) = start(cfg).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert_eq!(c.read(0, 512).await.unwrap().error, 0);
    stop(srv).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_command_prefetches() {
    let img = image(2 * MIB, 51);
    let (o, _dir, srv, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    let before = o.requests();
    c.send(cmd::CACHE, 0, 0, MIB as u32).await;
    assert_eq!(c.recv(None).await.unwrap().1.error, 0);
    // Wait for the prefetch to land, then the read is a pure hit.
    for _ in 0..100 {
        if srv.cache(&o.url).await.unwrap().counts().0 >= 16 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mid = o.requests();
    assert!(mid > before);
    assert!(c.read(0, MIB as u32).await.unwrap().data == img[..MIB]);
    assert_eq!(o.requests(), mid);
    stop(srv).await;
}

/// The legacy path: fixed newstyle with NBD_OPT_EXPORT_NAME, no NO_ZEROES,
/// simple replies, through the `nbd` crate's client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_export_name_client() {
    let img = image(2 * MIB, 61);
    let (_o, _dir, srv, addr) = serve_image(&img, BS).await;
    let img2 = img.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        for name in [&b"disk"[..], &b""[..]] {
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            let e = nbd::client::handshake(&mut s, name).unwrap();
            assert_eq!(e.size, img2.len() as u64);
            assert!(e.readonly);
            let mut c = nbd::client::NbdClient::new(&mut s, &e);
            c.seek(SeekFrom::Start(65536 + 512)).unwrap();
            let mut buf = vec![0u8; 100_000];
            c.read_exact(&mut buf).unwrap();
            assert!(buf == img2[65536 + 512..65536 + 512 + 100_000]);
        }
        // An unknown name: the server must just close (EXPORT_NAME cannot error).
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        assert!(nbd::client::handshake(&mut s, b"nope").is_err());
    })
    .await
    .unwrap();
    stop(srv).await;
}

/// A redirect is resolved once, when the origin is opened; block fetches go
/// straight to the final URL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_is_resolved_once() {
    use std::sync::atomic::Ordering::SeqCst;
    let img = image(2 * MIB, 71);
    let o = TestOrigin::start(img.clone()).await;
    let via = o.url.replace("/image.raw", "/redirect/image.raw");
    let dir = tempfile::tempdir().unwrap();
    let (srv, addr) = start(config(&via, dir.path(), BS)).await;
    assert_eq!(
        o.faults.redirects.load(SeqCst),
        1,
        "the probe follows the redirect"
    );
    let mut c = Client::connect(&addr, Opts::default()).await;
    for off in (0..2 * MIB as u64).step_by(BS as usize * 3) {
        let r = c.read(off, 1000).await.unwrap();
        assert!(r.data == img[off as usize..off as usize + 1000]);
    }
    assert!(o.requests() > 5, "blocks were fetched");
    assert_eq!(
        o.faults.redirects.load(SeqCst),
        1,
        "no block fetch went through the redirect"
    );
    stop(srv).await;
}
