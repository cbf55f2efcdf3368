//! qcow2 templates served as raw disks, decoded lazily: a guest read maps
//! through the image's L1 and L2 tables to bytes of the image file, which
//! come through the readahead and the cache below like any raw read, so
//! the first read of a table or a data cluster fetches it from the origin
//! and every later one is local. Nothing is converted up front.
//!
//! ```text
//!   guest range -> clusters -> L2 entries -> { hole | zero | host range | compressed range }
//!                                             -> image (readahead -> cache -> origin)
//! ```
//!
//! - The header and the L1 table are read at open ([`open`]); L2 tables at
//!   open for the first [`EAGER_TABLES`], on the first read that needs them
//!   for the others, kept in memory (bounded, [`L2_CACHE`]). Block status
//!   (`base:allocation`, which `qemu-img convert` and `nbdcopy` use to skip
//!   holes) knows the holes of unallocated L2 tables at once and
//!   of the others once read; until then their range is reported as data,
//!   which is always a correct answer. (No background warm-up: its reads
//!   would look like a guest's to readahead and boot profiles.)
//! - Unallocated and zero clusters read as zeroes without touching the
//!   image, and are reported as holes.
//! - Data clusters that are adjacent in the file are read with one request;
//!   compressed clusters (zlib or zstd) are fetched together when adjacent
//!   in the file (as `qemu-img convert -c` packs them) and decompressed
//!   once: a small cache keeps the latest clusters, because a guest reads a
//!   64 KiB cluster 4 KiB at a time.
//! - Read-only: a writable export puts its overlay above this layer, so
//!   the template is never written and refcounts never matter.
//!
//! Backing files, encryption and external data files are refused at open
//! ([`layout::Header::parse`]); a damaged table is an error on the reads it
//! affects, never wrong bytes.

pub mod layout;

mod decompress;

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::{Bytes, BytesMut};

use self::layout::{Header, Mapping};
use crate::block::{merge_adjacent, ByteRange};
use crate::device::{BlockDevice, BoxFuture, Extent, ReadData};
use crate::error::{Error, ErrorKind, Result};

/// Bytes of L2 tables kept in memory per image (shared by its exports): 32 MiB maps 256 GiB of
/// guest disk with 64 KiB clusters (qemu's own default bound).
const L2_CACHE: u64 = 32 << 20;
/// Bytes of decompressed clusters kept per image.
const CLUSTER_CACHE: u64 = 4 << 20;
/// Compressed clusters this close in the file are fetched with one read.
const GROUP_GAP: u64 = 4096;
/// Largest read of compressed clusters.
const GROUP_MAX: u64 = 4 << 20;
/// L2 tables read at open (see [`open`]).
const EAGER_TABLES: usize = 16;
/// Most extents one block-status answer builds (a reply carries fewer).
const MAX_EXTENTS: usize = 16384;
/// Most of an advisory prefetch that is planned.
const PREFETCH_MAX: u64 = 64 << 20;
/// Most decompressed clusters kept, whatever their size.
const CLUSTER_CACHE_ENTRIES: usize = 256;
/// Host reads of one guest read in flight at once.
const READ_BATCH: usize = 64;
/// Decompress inline up to this many clusters; more go to the blocking
/// pool, so a big read of a compressed image never stalls other I/O.
const INLINE_CLUSTERS: usize = 2;

/// The guest disk stored in the qcow2 image `image` (whose bytes are the
/// image file) named `name` in errors and logs, decoded for this device
/// alone.
pub async fn open(image: Arc<dyn BlockDevice>, name: &str) -> Result<Arc<dyn BlockDevice>> {
    let d = Arc::new(Decoded::open(&image, name).await?);
    Ok(over(image, d))
}

/// The guest disk of `image` with the tables `d` decoded already (shared by
/// every export of one image: see [`Decoded::open`]).
pub fn over(image: Arc<dyn BlockDevice>, d: Arc<Decoded>) -> Arc<dyn BlockDevice> {
    Arc::new(Qcow2 {
        q: Arc::new(Inner { image, d }),
    })
}

struct Qcow2 {
    q: Arc<Inner>,
}

/// One export's view: its own image device (its readahead) over the
/// image's shared decoded state.
struct Inner {
    image: Arc<dyn BlockDevice>,
    d: Arc<Decoded>,
}

/// What lazybd knows of one qcow2 image's layout: header, L1 table, the
/// L2 tables and decompressed clusters read so far. One per image, shared
/// by its exports (tables are the same for all, and 50 VMs of one template
/// should not hold 50 copies).
pub struct Decoded {
    h: Header,
    file_size: u64,
    name: String,
    /// The L1 table: one entry per L2 table.
    l1: Box<[u64]>,
    /// L2 tables by L1 index, decoded to native-endian words (two per
    /// entry with extended L2 entries).
    l2: Mutex<Tables>,
    /// Recently decompressed clusters by host offset.
    clusters: Mutex<VecDeque<(u64, Bytes)>>,
}

#[derive(Default)]
struct Tables {
    by_index: HashMap<u64, Arc<[u64]>>,
    /// Insertion order, for eviction.
    order: VecDeque<u64>,
}

/// One piece of a guest read: where `len` bytes at `at` (from the start of
/// the read) come from.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Zero,
    Host {
        host: u64,
    },
    /// `skip` bytes into the cluster decompressed from `len` bytes at `host`.
    Compressed {
        host: u64,
        clen: u64,
        skip: u64,
    },
}

/// Bytes read from the image file, with the zero ranges it knows of
/// (relative to the start of the read).
type HostBytes = (Bytes, Vec<ByteRange>);
/// Decompressed clusters by host offset.
type Clusters = Vec<(u64, Bytes)>;

/// Compressed clusters read together: bytes `start..end` of the file hold
/// every member (host offset, compressed length).
struct Group {
    start: u64,
    end: u64,
    members: Vec<(u64, u64)>,
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    at: u64,
    len: u64,
    piece: Piece,
}

impl Decoded {
    /// Read and check the header and the L1 table of `image`, and the
    /// first [`EAGER_TABLES`] L2 tables: block status is then exact from
    /// the start for images up to that many tables (8 GiB of guest disk at
    /// 64 KiB clusters; a boot reads them anyway); the rest as reads need
    /// them.
    pub async fn open(image: &Arc<dyn BlockDevice>, name: &str) -> Result<Decoded> {
        let file_size = image.size();
        let named = |e: Error| e.context_prefix(format_args!("{name}: qcow2"));
        // The first block is what the cache fetches anyway: enough for the
        // header and a backing file's name (for the error refusing it).
        let head = image
            .read(ByteRange::new(0, file_size.min(64 << 10))?)
            .await
            .map_err(named)?;
        let h = Header::parse(&head.data, file_size).map_err(named)?;
        let l1_bytes = u64::from(h.l1_entries) * 8;
        let l1 = if l1_bytes == 0 {
            Box::default()
        } else {
            let raw = image
                .read(ByteRange::new(h.l1_offset, l1_bytes)?)
                .await
                .map_err(named)?;
            be_words(&raw.data)
        };
        let d = Arc::new(Decoded {
            h,
            file_size,
            name: name.to_string(),
            l1,
            l2: Mutex::new(Tables::default()),
            clusters: Mutex::new(VecDeque::new()),
        });
        let q = Inner {
            image: image.clone(),
            d: d.clone(),
        };
        let first: Vec<u64> = (0..d.l1.len() as u64)
            .filter(|&i| matches!(q.table_now(i), Ok(None)))
            .take(EAGER_TABLES)
            .collect();
        let inner = &q;
        let loads: Vec<BoxFuture<'_, Result<()>>> = first
            .iter()
            .map(|&i| Box::pin(async move { inner.table(i).await.map(|_| ()) }) as BoxFuture<'_, _>)
            .collect();
        for r in join_batched(loads).await {
            r?;
        }
        drop(q);
        tracing::info!(
            image = %name,
            version = d.h.version,
            virtual_size = d.h.size,
            cluster = d.h.cluster_size(),
            compression = ?d.h.compression,
            extended_l2 = d.h.extended_l2,
            "qcow2 image decoded as the guest's disk"
        );
        if d.h.dirty {
            tracing::info!(image = %name, "qcow2 image is marked dirty (refcounts stale): reads do not use them");
        }
        Ok(Arc::into_inner(d).expect("the loads above are done"))
    }
}

impl Inner {
    fn err(&self, e: Error) -> Error {
        e.context_prefix(format_args!("{}: qcow2", self.d.name))
    }

    /// The L2 table of L1 index `i` if known in memory: `Some(None)` for an
    /// unallocated table, `None` if it has to be read.
    fn table_now(&self, i: u64) -> Result<Option<Option<Arc<[u64]>>>> {
        if self
            .d
            .h
            .l2_table(self.d.l1[i as usize], self.d.file_size)?
            .is_none()
        {
            return Ok(Some(None));
        }
        Ok(self
            .d
            .l2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_index
            .get(&i)
            .map(|t| Some(t.clone())))
    }

    /// The L2 table of L1 index `i`, read through the image on first use.
    async fn table(&self, i: u64) -> Result<Option<Arc<[u64]>>> {
        if let Some(t) = self.table_now(i).map_err(|e| self.err(e))? {
            return Ok(t);
        }
        let off = self
            .d
            .h
            .l2_table(self.d.l1[i as usize], self.d.file_size)
            .map_err(|e| self.err(e))?
            .expect("table_now answered for unallocated tables");
        let raw = self
            .image
            .read(ByteRange::new(off, self.d.h.cluster_size())?)
            .await
            .map_err(|e| self.err(e.context_prefix(format_args!("L2 table at {off:#x}"))))?;
        let t: Arc<[u64]> = be_words(&raw.data).into();
        let mut tables = self.d.l2.lock().unwrap_or_else(|p| p.into_inner());
        if tables.by_index.insert(i, t.clone()).is_none() {
            tables.order.push_back(i);
            let max = (L2_CACHE / self.d.h.cluster_size()).max(1) as usize;
            while tables.by_index.len() > max {
                let Some(old) = tables.order.pop_front() else {
                    break;
                };
                tables.by_index.remove(&old);
            }
        }
        Ok(Some(t))
    }

    /// The L1 indices a guest range spans.
    fn table_indices(&self, r: ByteRange) -> std::ops::RangeInclusive<u64> {
        debug_assert!(!r.is_empty(), "callers return early on empty ranges");
        let first = self.d.h.indices(r.offset).0;
        let last = self.d.h.indices(r.end() - 1).0;
        first..=last
    }

    /// Where each byte of guest range `r` comes from, given the L2 tables
    /// of the L1 indices it spans (`tables[k]` for the `k`-th), as pieces
    /// in guest order with adjacent holes and adjacent host ranges merged.
    fn plan(&self, r: ByteRange, tables: &[Option<Arc<[u64]>>]) -> Result<Vec<Planned>> {
        let h = &self.d.h;
        let cluster = h.cluster_size();
        let unit_bits = h.unit_bits();
        let first_table = self.table_indices(r).start().to_owned();
        let mut out: Vec<Planned> = Vec::new();
        let mut off = r.offset;
        while off < r.end() {
            let (l1i, l2i) = h.indices(off);
            let cluster_start = off & !(cluster - 1);
            let unit = ((off - cluster_start) >> unit_bits) as u32;
            let unit_start = cluster_start + (u64::from(unit) << unit_bits);
            let mapping = match &tables[(l1i - first_table) as usize] {
                None => Mapping::Unallocated,
                Some(t) => {
                    let (e, bitmap) = if h.extended_l2 {
                        (t[2 * l2i as usize], t[2 * l2i as usize + 1])
                    } else {
                        (t[l2i as usize], 0)
                    };
                    h.map(e, bitmap, unit, self.d.file_size).map_err(|e| {
                        self.err(e.context_prefix(format_args!("guest offset {off:#x}")))
                    })?
                }
            };
            let piece_end = match mapping {
                Mapping::Compressed { .. } => cluster_start + cluster,
                _ => unit_start + (1 << unit_bits),
            }
            .min(r.end());
            let len = piece_end - off;
            let piece = match mapping {
                Mapping::Unallocated | Mapping::Zero => Piece::Zero,
                Mapping::Data { host } => Piece::Host {
                    host: host + (off - unit_start),
                },
                Mapping::Compressed { host, len } => Piece::Compressed {
                    host,
                    clen: len,
                    skip: off - cluster_start,
                },
            };
            let at = off - r.offset;
            match (out.last_mut(), piece) {
                (
                    Some(Planned {
                        piece: Piece::Zero,
                        len: l,
                        ..
                    }),
                    Piece::Zero,
                ) => *l += len,
                (
                    Some(Planned {
                        piece: Piece::Host { host: prev },
                        len: l,
                        ..
                    }),
                    Piece::Host { host },
                ) if *prev + *l == host => *l += len,
                _ => out.push(Planned { at, len, piece }),
            }
            off = piece_end;
        }
        Ok(out)
    }

    /// `len` bytes of the file at `host`, the part past the end of the
    /// file reading as zeroes (as qemu reads it), with the zero ranges the
    /// image knows of, relative to `host`.
    async fn host_read(&self, host: u64, len: u64) -> Result<HostBytes> {
        let inside = self.d.file_size.saturating_sub(host).min(len);
        let (mut data, mut zero) = if inside == 0 {
            (Bytes::new(), Vec::new())
        } else {
            let d = self.image.read(ByteRange::new(host, inside)?).await?;
            (d.data, d.zero)
        };
        for z in &mut zero {
            z.offset -= host;
        }
        if inside < len {
            let mut b = BytesMut::zeroed(len as usize);
            b[..data.len()].copy_from_slice(&data);
            zero.push(ByteRange {
                offset: inside,
                len: len - inside,
            });
            data = b.freeze();
        }
        Ok((data, zero))
    }

    fn cached_cluster(&self, host: u64) -> Option<Bytes> {
        let c = self.d.clusters.lock().unwrap_or_else(|p| p.into_inner());
        c.iter().find(|(h, _)| *h == host).map(|(_, b)| b.clone())
    }

    fn keep_cluster(&self, host: u64, data: Bytes) {
        let max =
            ((CLUSTER_CACHE / self.d.h.cluster_size()).max(2) as usize).min(CLUSTER_CACHE_ENTRIES);
        let mut c = self.d.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if c.iter().any(|(h, _)| *h == host) {
            return;
        }
        if c.len() >= max {
            c.pop_front();
        }
        c.push_back((host, data));
    }

    /// Decompress the clusters `want` (host offset, compressed length),
    /// whose compressed bytes lie in `group` read from `group_host`.
    async fn decompress_all(
        &self,
        group_host: u64,
        group: Bytes,
        want: Vec<(u64, u64)>,
    ) -> Result<Clusters> {
        let (c, cluster) = (self.d.h.compression, self.d.h.cluster_size() as usize);
        let inline = want.len() <= INLINE_CLUSTERS;
        let work = move || -> Result<Clusters> {
            want.iter()
                .map(|&(host, clen)| {
                    let from = (host - group_host) as usize;
                    let input = &group[from..from + clen as usize];
                    let mut out = BytesMut::zeroed(cluster);
                    decompress::decompress(c, input, &mut out).map_err(|e| {
                        e.context_prefix(format_args!("compressed cluster at {host:#x}"))
                    })?;
                    Ok((host, out.freeze()))
                })
                .collect()
        };
        let done = if inline {
            work()
        } else {
            tokio::task::spawn_blocking(work)
                .await
                .map_err(|e| Error::with_source(ErrorKind::Io, "qcow2 decompression task", e))?
        };
        let done = done.map_err(|e| self.err(e))?;
        for (host, data) in &done {
            self.keep_cluster(*host, data.clone());
        }
        Ok(done)
    }

    async fn read(&self, r: ByteRange) -> Result<ReadData> {
        if r.is_empty() {
            return Ok(ReadData {
                data: Bytes::new(),
                zero: Vec::new(),
            });
        }
        let mut tables = Vec::new();
        for i in self.table_indices(r) {
            tables.push(self.table(i).await?);
        }
        let plan = self.plan(r, &tables)?;
        // The common case: one host range, served as the image serves it.
        if let [Planned {
            piece: Piece::Host { host },
            len,
            ..
        }] = plan[..]
        {
            let (data, zero) = self.host_read(host, len).await.map_err(|e| self.err(e))?;
            return Ok(ReadData {
                data,
                zero: shift(zero, r.offset),
            });
        }
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero = Vec::new();
        // Host ranges: read concurrently.
        let mut reads: Vec<(Planned, BoxFuture<'_, Result<HostBytes>>)> = Vec::new();
        for p in &plan {
            match p.piece {
                Piece::Zero => zero.push(ByteRange {
                    offset: r.offset + p.at,
                    len: p.len,
                }),
                Piece::Host { host } => reads.push((*p, Box::pin(self.host_read(host, p.len)))),
                Piece::Compressed { .. } => {}
            }
        }
        // Compressed clusters not cached, grouped by nearness in the file.
        let mut groups: Vec<Group> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut have: HashMap<u64, Bytes> = HashMap::new();
        for p in &plan {
            let Piece::Compressed { host, clen, .. } = p.piece else {
                continue;
            };
            if have.contains_key(&host) {
                continue;
            }
            if let Some(c) = self.cached_cluster(host) {
                have.insert(host, c);
                continue;
            }
            match groups.last_mut() {
                Some(g)
                    if host >= g.start
                        && host <= g.end + GROUP_GAP
                        && (host + clen).max(g.end) - g.start <= GROUP_MAX =>
                {
                    if seen.insert(host) {
                        g.members.push((host, clen));
                    }
                    g.end = g.end.max(host + clen);
                }
                _ if !seen.insert(host) => {}
                _ => groups.push(Group {
                    start: host,
                    end: host + clen,
                    members: vec![(host, clen)],
                }),
            }
        }
        let fetches: Vec<BoxFuture<'_, Result<Clusters>>> = groups
            .into_iter()
            .map(|g| {
                Box::pin(async move {
                    let (data, _) = self.host_read(g.start, g.end - g.start).await?;
                    self.decompress_all(g.start, data, g.members).await
                }) as BoxFuture<'_, _>
            })
            .collect();
        let (planned, host_futs): (Vec<Planned>, Vec<_>) = reads.into_iter().unzip();
        let (host_done, clusters) = join(join_batched(host_futs), join_batched(fetches)).await;
        for (p, res) in planned.iter().zip(host_done) {
            let (data, z) = res.map_err(|e| self.err(e))?;
            out[p.at as usize..(p.at + p.len) as usize].copy_from_slice(&data);
            zero.extend(shift(z, r.offset + p.at));
        }
        for res in clusters {
            have.extend(res?);
        }
        for p in &plan {
            if let Piece::Compressed { host, skip, .. } = p.piece {
                let c = &have[&host];
                out[p.at as usize..(p.at + p.len) as usize]
                    .copy_from_slice(&c[skip as usize..(skip + p.len) as usize]);
            }
        }
        zero.sort_unstable_by_key(|z| z.offset);
        Ok(ReadData {
            data: out.freeze(),
            zero: merge_adjacent(zero),
        })
    }

    /// [`Inner::read`] without waiting: only when every table is in memory,
    /// every host range local and every compressed cluster decompressed.
    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        let mut tables = Vec::new();
        for i in self.table_indices(r) {
            match self.table_now(i) {
                Ok(Some(t)) => tables.push(t),
                Ok(None) => return None,
                Err(e) => return Some(Err(self.err(e))),
            }
        }
        let plan = match self.plan(r, &tables) {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        let local = |host: u64, len: u64| -> Option<Result<ReadData>> {
            // Past the end of the file needs the slow path's zero fill.
            if host.checked_add(len)? > self.d.file_size {
                return None;
            }
            let d = self.image.read_now(ByteRange { offset: host, len })?;
            Some(d.map(|mut d| {
                for z in &mut d.zero {
                    z.offset -= host;
                }
                d
            }))
        };
        if let [Planned {
            piece: Piece::Host { host },
            len,
            ..
        }] = plan[..]
        {
            return Some(local(host, len)?.map(|d| ReadData {
                data: d.data,
                zero: shift(d.zero, r.offset),
            }));
        }
        let mut out = BytesMut::zeroed(r.len as usize);
        let mut zero = Vec::new();
        for p in &plan {
            let span = p.at as usize..(p.at + p.len) as usize;
            match p.piece {
                Piece::Zero => zero.push(ByteRange {
                    offset: r.offset + p.at,
                    len: p.len,
                }),
                Piece::Host { host } => match local(host, p.len)? {
                    Ok(d) => {
                        out[span].copy_from_slice(&d.data);
                        zero.extend(shift(d.zero, r.offset + p.at));
                    }
                    Err(e) => return Some(Err(self.err(e))),
                },
                Piece::Compressed { host, skip, .. } => {
                    let c = self.cached_cluster(host)?;
                    out[span].copy_from_slice(&c[skip as usize..(skip + p.len) as usize]);
                }
            }
        }
        zero.sort_unstable_by_key(|z| z.offset);
        Some(Ok(ReadData {
            data: out.freeze(),
            zero: merge_adjacent(zero),
        }))
    }

    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        if r.is_empty() {
            return Ok(Vec::new());
        }
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, len: u64, zero: bool| match out.last_mut() {
            Some(e) if e.zero == zero => e.len += len,
            _ => out.push(Extent { len, zero }),
        };
        let per_table = self.d.h.l2_entries() * self.d.h.cluster_size();
        for i in self.table_indices(r) {
            let span = ByteRange {
                offset: i * per_table,
                len: per_table,
            }
            .intersect(&r)
            .expect("the table's range meets r");
            if out.len() >= MAX_EXTENTS {
                // Enough for a reply (NBD clients ask again from where it
                // ends); the rest is data, which is always a right answer.
                push(&mut out, r.end() - span.offset, false);
                return Ok(out);
            }
            match self.table_now(i).map_err(|e| self.err(e))? {
                // Not read yet: data, the answer that is always right.
                None => push(&mut out, span.len, false),
                Some(t) => {
                    for p in self.plan(span, &[t])? {
                        push(&mut out, p.len, matches!(p.piece, Piece::Zero));
                    }
                }
            }
        }
        Ok(out)
    }

    fn prefetch(&self, r: ByteRange) {
        if r.is_empty() {
            return;
        }
        // Advisory and unbounded by the payload limit: plan a bounded part.
        let r = ByteRange {
            offset: r.offset,
            len: r.len.min(PREFETCH_MAX),
        };
        let mut tables = Vec::new();
        for i in self.table_indices(r) {
            match self.table_now(i) {
                Ok(Some(t)) => tables.push(t),
                _ => return,
            }
        }
        let Ok(plan) = self.plan(r, &tables) else {
            return;
        };
        for p in plan {
            let (host, len) = match p.piece {
                Piece::Zero => continue,
                Piece::Host { host } => (host, p.len),
                Piece::Compressed { host, clen, .. } => (host, clen),
            };
            let len = self.d.file_size.saturating_sub(host).min(len);
            if len > 0 {
                self.image.prefetch(ByteRange { offset: host, len });
            }
        }
    }
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.q.d.h.size
    }

    fn read(&self, r: ByteRange) -> BoxFuture<'_, Result<ReadData>> {
        Box::pin(self.q.read(r))
    }

    fn extents(&self, r: ByteRange) -> Result<Vec<Extent>> {
        self.q.extents(r)
    }

    fn prefetch(&self, r: ByteRange) {
        self.q.prefetch(r)
    }

    fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
        if r.is_empty() {
            return None;
        }
        self.q.read_now(r)
    }

    fn flush(&self) -> BoxFuture<'_, Result<()>> {
        // Nothing here is written.
        Box::pin(async { Ok(()) })
    }
}

/// Big-endian 64-bit words.
fn be_words(b: &[u8]) -> Box<[u64]> {
    b.chunks_exact(8)
        .map(|w| u64::from_be_bytes(w.try_into().expect("8 bytes")))
        .collect()
}

/// Ranges relative to a piece, made absolute.
fn shift(v: Vec<ByteRange>, by: u64) -> Vec<ByteRange> {
    v.into_iter()
        .map(|z| ByteRange {
            offset: z.offset + by,
            len: z.len,
        })
        .collect()
}

/// [`crate::util::join_all`] over batches of [`READ_BATCH`]: a read split into many
/// pieces (a hostile image of tiny clusters) costs linear polling, not
/// quadratic.
async fn join_batched<T>(futs: Vec<BoxFuture<'_, T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(futs.len());
    let mut futs = futs.into_iter().peekable();
    while futs.peek().is_some() {
        let batch: Vec<_> = futs.by_ref().take(READ_BATCH).collect();
        out.extend(crate::util::join_all(batch).await);
    }
    out
}

/// Both futures, concurrently.
async fn join<A, B>(a: impl Future<Output = A>, b: impl Future<Output = B>) -> (A, B) {
    let (mut a, mut b) = (Box::pin(a), Box::pin(b));
    let (mut ra, mut rb) = (None, None);
    std::future::poll_fn(|cx| {
        if ra.is_none() {
            if let Poll::Ready(v) = a.as_mut().poll(cx) {
                ra = Some(v);
            }
        }
        if rb.is_none() {
            if let Poll::Ready(v) = b.as_mut().poll(cx) {
                rb = Some(v);
            }
        }
        if ra.is_some() && rb.is_some() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    (ra.expect("done"), rb.expect("done"))
}

#[cfg(test)]
mod tests;
