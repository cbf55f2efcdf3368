//! `lazybd copy` as a library call: HTTP -> file, NBD -> file, file -> NBD,
//! holes, SHA-256 checks, a server that sends wrong bytes.

mod common;

use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering::Relaxed;

use common::*;
use lazybd::copy::{self, CopySpec};
use lazybd::error::ErrorKind;
use sha2::{Digest, Sha256};

const MIB: usize = 1 << 20;
const BS: u64 = 64 << 10;

fn sha(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_to_file_is_exact_sparse_and_checked() {
    let img = image(12 * MIB + 4096 + 7, 11); // zero MiB at [1, 2) MiB, odd tail
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");
    let mut spec = CopySpec::new(&o.url, out.display().to_string());
    spec.chunk = 1 << 20;
    spec.sha256 = Some(sha(&img));
    let task = copy::start(spec);
    let p = task.progress.clone();
    let rep = task.wait().await.unwrap();
    assert_eq!(rep.sha256, sha(&img));
    assert_eq!(rep.bytes, img.len() as u64);
    assert_eq!(p.done.load(Relaxed), img.len() as u64);
    assert!(rep.zero_bytes >= MIB as u64, "{rep:?}");
    assert!(std::fs::read(&out).unwrap() == img);
    // The zero MiB was not written: the file is sparse.
    let m = std::fs::metadata(&out).unwrap();
    assert!(
        m.blocks() * 512 < img.len() as u64,
        "{} allocated",
        m.blocks() * 512
    );

    // A wrong expected digest fails the copy and says so.
    let mut spec = CopySpec::new(&o.url, dir.path().join("bad.raw").display().to_string());
    spec.sha256 = Some([7u8; 32]);
    let e = copy::start(spec).wait().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(e.to_string().contains("SHA-256 mismatch"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbd_source_holes_and_nbd_destination() {
    let img = image(8 * MIB, 12);
    // Source: a lazybd export, warmed so its zero blocks are known holes.
    let (_o, _d, src, addr) = serve_image(&img, BS).await;
    let mut c = Client::connect(&addr, Opts::default()).await;
    assert!(c.read(0, 8 << 20).await.unwrap().data == img);
    let src_uri = format!("nbd://{addr}/disk");

    // Destination: a writable export over a blank image.
    let files = tempfile::tempdir().unwrap();
    let blank = files.path().join("blank.raw");
    std::fs::write(&blank, vec![0xAAu8; img.len()]).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let mut cfg = config(&blank.display().to_string(), cache.path(), BS);
    cfg.exports[0].writable = true;
    let (dst, dst_addr) = start(cfg).await;
    let dst_uri = format!("nbd://{dst_addr}/disk");

    let mut spec = CopySpec::new(&src_uri, &dst_uri);
    spec.sha256 = Some(sha(&img));
    let rep = copy::start(spec).wait().await.unwrap();
    assert!(
        rep.zero_bytes >= MIB as u64,
        "holes were not skipped: {rep:?}"
    );
    // The destination's old 0xAA bytes under the holes became zeroes.
    let mut d = Client::connect(&dst_addr, Opts::default()).await;
    assert!(d.read(0, 8 << 20).await.unwrap().data == img);

    // And back out to a file, by NBD.
    let out = files.path().join("out.raw");
    let mut spec = CopySpec::new(&dst_uri, out.display().to_string());
    spec.sha256 = Some(sha(&img));
    copy::start(spec).wait().await.unwrap();
    assert!(std::fs::read(&out).unwrap() == img);
    stop(dst).await;
    stop(src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lying_origin_fails_the_copy() {
    let img = image(4 * MIB, 13);
    let o = TestOrigin::start(img.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    o.faults
        .wrong_range_next
        .store(100, std::sync::atomic::Ordering::SeqCst);
    let mut spec = CopySpec::new(&o.url, dir.path().join("x.raw").display().to_string());
    spec.origin_options.retries = 1;
    let e = copy::start(spec).wait().await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::Origin | ErrorKind::OriginRefused),
        "{e}"
    );
}
