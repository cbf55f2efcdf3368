//! The decoder against a model: a small qcow2 writer (below) lays out
//! random images — data, zero, unallocated and compressed clusters,
//! subclusters, zlib and zstd, any cluster size — beside the raw disk they
//! mean; every read, read_now and block status of the decoder must agree
//! with the raw disk. Real qemu-img images are compared in
//! qemu-tests/t-55-qcow2.sh.

use std::sync::Arc;

use proptest::prelude::*;

use super::layout::{Compression, MAGIC};
use super::*;
use crate::device::BlockDevice;

/// An image file in memory (reads outside it panic).
use crate::device::testing::MemDevice as File;

/// What one guest cluster is in a generated image.
#[derive(Debug, Clone)]
enum Kind {
    Unallocated,
    Zero,
    /// Preallocated but reading as zeroes (zero flag with an offset).
    ZeroAlloc,
    Data,
    Compressed,
    /// Extended L2 only: per subcluster 0 unallocated, 1 zero, 2 data.
    Sub([u8; 32]),
}

#[derive(Debug, Clone)]
struct Spec {
    cluster_bits: u32,
    extended: bool,
    compression: Compression,
    /// Guest size: `kinds.len()` clusters minus `tail` bytes.
    tail: u64,
    kinds: Vec<Kind>,
    /// Truncate the file this many bytes (cuts a trailing compressed
    /// cluster's sector padding, as real files end).
    seed: u8,
}

/// Lay out `s`: header, L1, L2 tables, data clusters, then compressed
/// clusters packed byte after byte (as qemu packs them). Returns the file
/// and the raw disk it holds.
fn build(s: &Spec) -> (Vec<u8>, Vec<u8>) {
    let cb = s.cluster_bits;
    let cluster = 1usize << cb;
    let entry = if s.extended { 16 } else { 8 };
    let per_l2 = cluster / entry;
    let n = s.kinds.len();
    let size = (n * cluster) as u64 - s.tail;
    let l1_entries = n.div_ceil(per_l2).max(1);
    let l1_clusters = (l1_entries * 8).div_ceil(cluster);
    let mut file = vec![0u8; cluster * (1 + l1_clusters)];
    let mut disk = vec![0u8; n * cluster];
    let h = &mut file[..112];
    h[..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cb.to_be_bytes());
    h[24..32].copy_from_slice(&size.to_be_bytes());
    h[36..40].copy_from_slice(&(l1_entries as u32).to_be_bytes());
    h[40..48].copy_from_slice(&(cluster as u64).to_be_bytes());
    let mut incompat = 0u64;
    if s.extended {
        incompat |= 1 << 4;
    }
    if s.compression == Compression::Zstd {
        incompat |= 1 << 3;
        h[104] = 1;
    }
    h[72..80].copy_from_slice(&incompat.to_be_bytes());
    h[96..100].copy_from_slice(&4u32.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    let pattern = |i: usize| -> Vec<u8> {
        (0..cluster)
            .map(|b| ((b * 31 + i * 7 + s.seed as usize) % 251) as u8 | 1)
            .collect()
    };
    // L2 tables, allocated for tables that map anything.
    let mut l2_at = vec![0usize; l1_entries];
    for (t, at) in l2_at.iter_mut().enumerate() {
        let kinds = &s.kinds[t * per_l2..((t + 1) * per_l2).min(n)];
        if kinds.iter().all(|k| matches!(k, Kind::Unallocated)) && t % 2 == 0 {
            continue;
        }
        *at = file.len();
        file.extend(std::iter::repeat_n(0, cluster));
        let l1 = (1u64 << 63) | *at as u64;
        file[cluster + t * 8..cluster + t * 8 + 8].copy_from_slice(&l1.to_be_bytes());
    }
    let mut compressed = Vec::new();
    for (i, k) in s.kinds.iter().enumerate() {
        let slot = l2_at[i / per_l2] + (i % per_l2) * entry;
        let (mut e, mut bitmap) = (0u64, 0u64);
        let data = pattern(i);
        match k {
            Kind::Unallocated => {}
            Kind::Zero => e = if s.extended { 0 } else { 1 },
            Kind::ZeroAlloc if s.extended => {
                e = file.len() as u64;
                bitmap = 0xffff_ffff << 32;
                file.extend(std::iter::repeat_n(0xEE, cluster));
            }
            Kind::ZeroAlloc => {
                e = file.len() as u64 | 1;
                file.extend(std::iter::repeat_n(0xEE, cluster));
            }
            Kind::Data => {
                e = file.len() as u64;
                if s.extended {
                    bitmap = 0xffff_ffff;
                }
                file.extend_from_slice(&data);
                disk[i * cluster..(i + 1) * cluster].copy_from_slice(&data);
            }
            Kind::Compressed => {
                compressed.push((i, slot));
                disk[i * cluster..(i + 1) * cluster].copy_from_slice(&data);
            }
            Kind::Sub(states) => {
                e = file.len() as u64;
                let sub = cluster / 32;
                let mut host = vec![0xEE; cluster];
                for (j, st) in states.iter().enumerate() {
                    let span = j * sub..(j + 1) * sub;
                    match st {
                        1 => bitmap |= 1 << (32 + j),
                        2 => {
                            bitmap |= 1 << j;
                            host[span.clone()].copy_from_slice(&data[span.clone()]);
                            disk[i * cluster..][span.clone()].copy_from_slice(&data[span]);
                        }
                        _ => {}
                    }
                }
                file.extend_from_slice(&host);
            }
        }
        // (An unallocated table has no slots: every entry in it is 0.)
        if !matches!(k, Kind::Compressed) && l2_at[i / per_l2] != 0 {
            file[slot..slot + 8].copy_from_slice(&e.to_be_bytes());
            if s.extended {
                file[slot + 8..slot + 16].copy_from_slice(&bitmap.to_be_bytes());
            }
        }
    }
    // Compressed clusters, packed.
    let x = 70 - cb;
    for (i, slot) in compressed {
        let data = pattern(i);
        let z = match s.compression {
            Compression::Zlib => {
                let mut c = flate2::Compress::new(flate2::Compression::default(), false);
                let mut out = vec![0u8; cluster + 1024];
                c.compress(&data, &mut out, flate2::FlushCompress::Finish)
                    .unwrap();
                out.truncate(c.total_out() as usize);
                out
            }
            Compression::Zstd => ruzstd::encoding::compress_to_vec(
                &data[..],
                ruzstd::encoding::CompressionLevel::Fastest,
            ),
        };
        let at = file.len() as u64;
        let last = (at + z.len() as u64 - 1) / 512;
        let e = (1u64 << 62) | ((last - at / 512) << x) | at;
        file.extend_from_slice(&z);
        file[slot..slot + 8].copy_from_slice(&e.to_be_bytes());
    }
    disk.truncate(size as usize);
    (file, disk)
}

fn kind(extended: bool) -> impl Strategy<Value = Kind> {
    let sub = proptest::array::uniform32(0u8..3).prop_map(Kind::Sub);
    prop_oneof![
        2 => Just(Kind::Unallocated),
        1 => Just(Kind::Zero),
        1 => Just(Kind::ZeroAlloc),
        3 => Just(Kind::Data),
        3 => Just(Kind::Compressed),
        if extended { 3 } else { 0 } => sub,
    ]
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![Just(9u32), Just(12), Just(14), Just(16)],
        any::<bool>(),
    )
        .prop_flat_map(|(cb, ext)| {
            let extended = ext && cb >= 14;
            (
                Just(cb),
                Just(extended),
                prop_oneof![Just(Compression::Zlib), Just(Compression::Zstd)],
                0u64..(1 << cb),
                proptest::collection::vec(kind(extended), 1..40),
                any::<u8>(),
            )
        })
        .prop_map(
            |(cluster_bits, extended, compression, tail, kinds, seed)| Spec {
                cluster_bits,
                extended,
                compression,
                tail,
                kinds,
                seed,
            },
        )
        .prop_filter("a disk of at least one byte", |s| {
            (s.kinds.len() as u64) << s.cluster_bits > s.tail
        })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every read agrees with the disk, and its zero ranges read as zero.
async fn check_reads(dev: &Arc<dyn BlockDevice>, disk: &[u8], reads: &[(u64, u64)]) {
    let size = disk.len() as u64;
    assert_eq!(dev.size(), size);
    for &(a, b) in reads {
        let off = a % size;
        let len = (b % (size - off)).max(1);
        let r = ByteRange::new(off, len).unwrap();
        let d = dev.read(r).await.unwrap();
        assert_eq!(
            &d.data[..],
            &disk[off as usize..(off + len) as usize],
            "read {r:?}"
        );
        for z in &d.zero {
            assert!(
                z.offset >= off && z.end() <= off + len,
                "{z:?} outside {r:?}"
            );
            assert!(disk[z.offset as usize..z.end() as usize]
                .iter()
                .all(|&b| b == 0));
        }
        // Once read, the same range is local: read_now must agree.
        if let Some(now) = dev.read_now(r) {
            assert_eq!(&now.unwrap().data[..], &d.data[..], "read_now {r:?}");
        }
        let ext = dev.extents(r).unwrap();
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), len);
        let mut at = off;
        for e in ext {
            if e.zero {
                assert!(disk[at as usize..(at + e.len) as usize]
                    .iter()
                    .all(|&b| b == 0));
            }
            at += e.len;
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn reads_agree_with_the_raw_disk(
        s in spec(),
        reads in proptest::collection::vec((any::<u64>(), any::<u64>()), 1..20),
    ) {
        let (file, disk) = build(&s);
        rt().block_on(async {
            let dev = open(Arc::new(File(file.into())), "test").await.unwrap();
            check_reads(&dev, &disk, &reads).await;
            // The whole disk in one read.
            let all = dev.read(ByteRange::new(0, disk.len() as u64).unwrap()).await.unwrap();
            assert!(all.data[..] == disk[..], "whole-disk read differs");
        });
    }
}

#[test]
fn holes_are_reported_once_tables_are_known() {
    let s = Spec {
        cluster_bits: 16,
        extended: false,
        compression: Compression::Zlib,
        tail: 0,
        kinds: vec![Kind::Data, Kind::Unallocated, Kind::Zero, Kind::Compressed],
        seed: 1,
    };
    let (file, _) = build(&s);
    rt().block_on(async {
        let dev = open(Arc::new(File(file.into())), "test").await.unwrap();
        // Reading warms the table the background task may not have yet.
        dev.read(ByteRange::new(0, 512).unwrap()).await.unwrap();
        let ext = dev.extents(ByteRange::new(0, 4 << 16).unwrap()).unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    len: 1 << 16,
                    zero: false
                },
                Extent {
                    len: 2 << 16,
                    zero: true
                },
                Extent {
                    len: 1 << 16,
                    zero: false
                },
            ]
        );
    });
}

#[test]
fn a_compressed_cluster_is_fetched_and_decompressed_once_for_many_small_reads() {
    let s = Spec {
        cluster_bits: 16,
        extended: false,
        compression: Compression::Zstd,
        tail: 0,
        kinds: vec![Kind::Compressed, Kind::Compressed],
        seed: 2,
    };
    let (file, disk) = build(&s);
    rt().block_on(async {
        let dev = open(Arc::new(File(file.into())), "test").await.unwrap();
        dev.read(ByteRange::new(0, 4096).unwrap()).await.unwrap();
        // Every other 4 KiB of the cluster is now served without waiting.
        for k in 1..16u64 {
            let r = ByteRange::new(k * 4096, 4096).unwrap();
            let d = dev.read_now(r).expect("decompressed cluster kept").unwrap();
            assert_eq!(&d.data[..], &disk[r.offset as usize..r.end() as usize]);
        }
    });
}

#[test]
fn damaged_tables_fail_the_reads_they_affect_and_only_those() {
    let s = Spec {
        cluster_bits: 12,
        extended: false,
        compression: Compression::Zlib,
        tail: 0,
        kinds: vec![Kind::Data, Kind::Compressed, Kind::Data],
        seed: 3,
    };
    let (mut file, disk) = build(&s);
    // L2 table of the first 512 clusters: the one after the L1 (cluster 2).
    let l2 = 2 * 4096;
    // Cluster 0: unaligned offset. Cluster 1: compressed bytes garbled.
    let e0 = u64::from_be_bytes(file[l2..l2 + 8].try_into().unwrap());
    file[l2..l2 + 8].copy_from_slice(&(e0 + 512).to_be_bytes());
    let e1 = u64::from_be_bytes(file[l2 + 8..l2 + 16].try_into().unwrap());
    let c1 = (e1 & ((1 << 58) - 1)) as usize;
    file[c1..c1 + 64].fill(0xFF);
    rt().block_on(async {
        let dev = open(Arc::new(File(file.into())), "img.qcow2")
            .await
            .unwrap();
        let e = dev.read(ByteRange::new(0, 10).unwrap()).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(
            e.to_string().contains("img.qcow2") && e.to_string().contains("not cluster aligned"),
            "{e}"
        );
        let e = dev
            .read(ByteRange::new(4096, 10).unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("decompress"), "{e}");
        let d = dev.read(ByteRange::new(8192, 4096).unwrap()).await.unwrap();
        assert_eq!(&d.data[..], &disk[8192..]);
    });
}

#[test]
fn a_backing_file_is_refused_naming_it() {
    let s = Spec {
        cluster_bits: 16,
        extended: false,
        compression: Compression::Zlib,
        tail: 0,
        kinds: vec![Kind::Data],
        seed: 0,
    };
    let (mut file, _) = build(&s);
    file[8..16].copy_from_slice(&512u64.to_be_bytes());
    file[16..20].copy_from_slice(&9u32.to_be_bytes());
    file[512..521].copy_from_slice(b"base.qcow");
    rt().block_on(async {
        let e = match open(Arc::new(File(file.into())), "vm.qcow2").await {
            Err(e) => e,
            Ok(_) => panic!("a layered image opened"),
        };
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        let m = e.to_string();
        assert!(
            m.contains("vm.qcow2") && m.contains("\"base.qcow\"") && m.contains("qemu-img convert"),
            "{m}"
        );
    });
}
