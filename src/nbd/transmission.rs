//! The transmission phase: requests in, replies out, concurrently.
//!
//! ```text
//!             +------------- connection loop (one task) --------------+
//!   socket -->| decode + validate -> local? answer now -> outbox      |--> socket
//!             |                   \-> may wait? spawn handler task    |
//!             |   outbox <- replies of finished handlers (channel)    |
//!             +-------------------------------------------------------+
//! ```
//!
//! Requests are validated once, here, before any layer sees them
//! (flags, ranges, read-only, payload size). A request that needs only
//! local I/O (a cached read, an overlay write) is answered inside the loop,
//! with no task or wake-up; one that may wait (an origin fetch, a flush)
//! runs in its own task, so a cache hit is never queued behind a miss.
//! Replies go out in completion order, every ready one in one write. A
//! per-connection cap on requests in flight bounds what a client can pin;
//! at the cap the loop stops reading the socket and TCP pushes back.
//!
//! Memory is bounded at two levels. Each connection may hold at most
//! [`MAX_IN_FLIGHT_BYTES`] of payload (write data read in, read data not yet
//! sent). Read replies are what a client can make the server produce without
//! sending anything, so they also draw on one server-wide [`Budget`]; a
//! client that stops taking its replies is dropped after the budget's send
//! timeout, which returns what it held.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::handshake::Negotiated;
use super::wire::{self, chunk, cmd, cmdflag, errno, state, Request};
use crate::block::ByteRange;
use crate::error::{Error, ErrorKind, Result};
use crate::export::{Export, ReadData, ZeroFlags};
use crate::stats::Stats;

/// Requests one connection may have in flight.
pub const MAX_IN_FLIGHT: usize = 128;
/// Read payload bytes one connection may have in flight (buffers pinned
/// until the client takes the reply). Without it, 128 reads of 64 MiB from
/// a client that never reads its socket would pin 8 GiB.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
// A request is taken only when its payload fits what its connection holds
// (`Conn::room`) and, for a READ, the server-wide budget (never below this
// cap, see `Budget::new`). So that the largest request is taken at all,
// once everything before it is answered, both must hold it alone; a request
// larger than them would wait for ever, and its connection with it.
const _: () = assert!(wire::MAX_PAYLOAD as usize <= MAX_IN_FLIGHT_BYTES);
/// Granularity of the byte budget.
const BUDGET_UNIT: u32 = 4096;
/// Most extents returned by one BLOCK_STATUS (the spec allows fewer than
/// asked; this bounds reply size for huge requests).
const MAX_EXTENTS: usize = 1 << 14;

/// One reply: buffers written back to back, in order.
type Reply = Vec<Bytes>;

/// Bounds shared by every connection of a server (cheap to clone).
#[derive(Debug, Clone)]
pub struct Budget {
    /// Read-reply payload all connections together may hold, in
    /// `BUDGET_UNIT`s.
    replies: Arc<Semaphore>,
    /// A client that takes no reply bytes for this long while replies wait
    /// is dropped (its buffers freed).
    send_timeout: Duration,
}

impl Budget {
    /// `max_bytes` of read replies in memory across connections (at least
    /// one connection's worth, so any single request can proceed).
    pub fn new(max_bytes: u64, send_timeout: Duration) -> Budget {
        let units = max_bytes.max(MAX_IN_FLIGHT_BYTES as u64) / BUDGET_UNIT as u64;
        Budget {
            replies: Arc::new(Semaphore::new(
                units.min(Semaphore::MAX_PERMITS as u64) as usize
            )),
            send_timeout,
        }
    }

    /// Bytes of read replies not currently held by any connection.
    pub fn available(&self) -> u64 {
        self.replies.available_permits() as u64 * BUDGET_UNIT as u64
    }
}

/// What a request holds until its reply has been handed to the socket:
/// its bytes of the connection's budget (counted by the connection loop)
/// and, for reads, its permit of the server-wide one.
struct Held {
    units: u32,
    shared: Option<OwnedSemaphorePermit>,
}

impl Held {
    fn none() -> Held {
        Held {
            units: 0,
            shared: None,
        }
    }
}

/// The reply of a request that ran in its own task, with what it holds.
struct Outgoing {
    reply: Reply,
    held: Held,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy)]
enum Command {
    Read {
        range: ByteRange,
        df: bool,
    },
    /// The payload travels beside the command (it is read after validation).
    Write {
        range: ByteRange,
        fua: bool,
    },
    Trim {
        range: ByteRange,
        fua: bool,
    },
    Zero {
        range: ByteRange,
        flags: ZeroFlags,
    },
    Flush,
    Cache {
        range: ByteRange,
    },
    BlockStatus {
        range: ByteRange,
        req_one: bool,
    },
}

/// Why a request is refused: NBD errno + message for structured errors.
#[derive(Debug)]
struct Refusal {
    errno: u32,
    msg: String,
    /// The connection cannot go on after this request: answer, then close.
    fatal: bool,
}

fn refuse(errno: u32, msg: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        msg: msg.into(),
        fatal: false,
    }
}

/// Per-connection facts validation depends on.
struct Ctx {
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
}

/// Validate a request header. This is the only place requests are checked;
/// the layers below rely on it (see `BlockDevice`).
fn validate(req: &Request, ctx: &Ctx) -> std::result::Result<Command, Refusal> {
    let size = ctx.export.device.size();
    if req.typ == cmd::WRITE && req.len > wire::MAX_PAYLOAD {
        // Checked first: any other refusal would have to skip the payload,
        // and staying in step would mean reading up to 4 GiB. The spec lets
        // a server hard-disconnect on a payload over its advertised maximum.
        return Err(Refusal {
            fatal: true,
            ..refuse(
                errno::EINVAL,
                format!(
                    "write of {} bytes exceeds the {} byte maximum payload",
                    req.len,
                    wire::MAX_PAYLOAD
                ),
            )
        });
    }
    let allowed = match req.typ {
        cmd::READ => cmdflag::FUA | cmdflag::DF,
        cmd::WRITE | cmd::TRIM => cmdflag::FUA,
        cmd::WRITE_ZEROES => cmdflag::FUA | cmdflag::NO_HOLE | cmdflag::FAST_ZERO,
        cmd::BLOCK_STATUS => cmdflag::FUA | cmdflag::REQ_ONE,
        cmd::FLUSH | cmd::CACHE | cmd::DISC => cmdflag::FUA,
        t => return Err(refuse(errno::EINVAL, format!("unknown command {t}"))),
    };
    if req.flags & !allowed != 0 {
        return Err(refuse(
            errno::EINVAL,
            format!("flags {:#x} not valid for command {}", req.flags, req.typ),
        ));
    }
    if req.flags & cmdflag::DF != 0 && !ctx.structured {
        return Err(refuse(errno::EINVAL, "DF needs structured replies"));
    }
    let range = ByteRange::new(req.offset, req.len as u64)
        .map_err(|_| refuse(errno::EINVAL, "offset + length overflows"))?;
    let in_range = || {
        if range.within(size) {
            Ok(range)
        } else {
            Err(refuse(
                errno::EINVAL,
                format!("request {range} beyond the export size {size}"),
            ))
        }
    };
    match req.typ {
        cmd::READ => {
            if req.len > wire::MAX_PAYLOAD {
                return Err(refuse(
                    errno::EINVAL,
                    format!(
                        "read of {} bytes exceeds the {} byte maximum",
                        req.len,
                        wire::MAX_PAYLOAD
                    ),
                ));
            }
            Ok(Command::Read {
                range: in_range()?,
                df: req.flags & cmdflag::DF != 0,
            })
        }
        cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES => {
            if ctx.export.read_only() {
                return Err(refuse(errno::EPERM, "export is read-only"));
            }
            if !range.within(size) {
                // The spec asks for ENOSPC when a write runs past the end.
                let e = if req.typ == cmd::TRIM {
                    errno::EINVAL
                } else {
                    errno::ENOSPC
                };
                return Err(refuse(
                    e,
                    format!("request {range} beyond the export size {size}"),
                ));
            }
            let fua = req.flags & cmdflag::FUA != 0;
            Ok(match req.typ {
                cmd::WRITE => Command::Write { range, fua },
                cmd::TRIM => Command::Trim { range, fua },
                _ => Command::Zero {
                    range,
                    flags: ZeroFlags {
                        fua,
                        no_hole: req.flags & cmdflag::NO_HOLE != 0,
                        fast: req.flags & cmdflag::FAST_ZERO != 0,
                    },
                },
            })
        }
        cmd::FLUSH => {
            if req.offset != 0 || req.len != 0 {
                return Err(refuse(
                    errno::EINVAL,
                    "FLUSH offset and length must be zero",
                ));
            }
            Ok(Command::Flush)
        }
        cmd::CACHE => Ok(Command::Cache { range: in_range()? }),
        cmd::BLOCK_STATUS => {
            if !ctx.base_allocation {
                return Err(refuse(errno::EINVAL, "no metadata context was negotiated"));
            }
            if req.len == 0 {
                return Err(refuse(errno::EINVAL, "BLOCK_STATUS of zero length"));
            }
            Ok(Command::BlockStatus {
                range: in_range()?,
                req_one: req.flags & cmdflag::REQ_ONE != 0,
            })
        }
        // DISC is handled by the reader loop before validation.
        _ => Err(refuse(errno::EINVAL, "unexpected command")),
    }
}

fn simple(cookie: u64, err: u32) -> Reply {
    vec![Bytes::copy_from_slice(&wire::simple_reply(cookie, err))]
}

fn error_reply(structured: bool, cookie: u64, r: &Refusal) -> Reply {
    if !structured {
        return simple(cookie, r.errno);
    }
    // A human-readable string: short, and never a character cut in half.
    let msg = wire::truncate_str(&r.msg, 1024).as_bytes();
    let mut b = BytesMut::with_capacity(20 + 6 + msg.len());
    b.put_slice(&wire::chunk_header(
        chunk::FLAG_DONE,
        chunk::ERROR,
        cookie,
        6 + msg.len() as u32,
    ));
    b.put_u32(r.errno);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    vec![b.freeze()]
}

/// Success without a payload. A simple reply even when structured replies
/// were negotiated: the spec allows it for every command but READ, and
/// clients read it in one go (16 bytes, no chunk header to parse), as
/// nbdkit and qemu-nbd answer too.
fn ok_reply(cookie: u64) -> Reply {
    simple(cookie, 0)
}

/// Structured read reply: data chunks, holes where known zero (unless DF).
fn read_reply(structured: bool, cookie: u64, range: ByteRange, rd: ReadData, df: bool) -> Reply {
    if !structured {
        return vec![
            Bytes::copy_from_slice(&wire::simple_reply(cookie, 0)),
            rd.data,
        ];
    }
    if range.is_empty() {
        // READ must be answered with chunks once they are negotiated.
        return vec![Bytes::copy_from_slice(&wire::chunk_header(
            chunk::FLAG_DONE,
            chunk::NONE,
            cookie,
            0,
        ))];
    }
    let data_chunk = |flags: u16, off: u64, data: Bytes| -> [Bytes; 2] {
        let mut h = BytesMut::with_capacity(28);
        h.put_slice(&wire::chunk_header(
            flags,
            chunk::OFFSET_DATA,
            cookie,
            8 + data.len() as u32,
        ));
        h.put_u64(off);
        [h.freeze(), data]
    };
    if df || rd.zero.is_empty() {
        return data_chunk(chunk::FLAG_DONE, range.offset, rd.data).to_vec();
    }
    // Segments alternate data / hole; the last one carries DONE.
    let mut segs: Vec<(bool, ByteRange)> = Vec::new();
    let mut pos = range.offset;
    for z in &rd.zero {
        if z.offset > pos {
            segs.push((
                false,
                ByteRange {
                    offset: pos,
                    len: z.offset - pos,
                },
            ));
        }
        segs.push((true, *z));
        pos = z.end();
    }
    if pos < range.end() {
        segs.push((
            false,
            ByteRange {
                offset: pos,
                len: range.end() - pos,
            },
        ));
    }
    let mut out = Vec::with_capacity(segs.len() * 2);
    let n = segs.len();
    for (i, (hole, s)) in segs.into_iter().enumerate() {
        let flags = if i + 1 == n { chunk::FLAG_DONE } else { 0 };
        if hole {
            let mut h = BytesMut::with_capacity(32);
            h.put_slice(&wire::chunk_header(flags, chunk::OFFSET_HOLE, cookie, 12));
            h.put_u64(s.offset);
            h.put_u32(s.len as u32);
            out.push(h.freeze());
        } else {
            let a = (s.offset - range.offset) as usize;
            out.extend(data_chunk(
                flags,
                s.offset,
                rd.data.slice(a..a + s.len as usize),
            ));
        }
    }
    out
}

/// The reply to a READ, from the device's answer.
fn read_result(
    ctx: &Ctx,
    req: Request,
    range: ByteRange,
    df: bool,
    res: Result<ReadData>,
) -> Reply {
    match res {
        Ok(rd) => {
            Stats::add(&ctx.export.stats.reads, 1);
            Stats::add(&ctx.export.stats.bytes_served, range.len);
            read_reply(ctx.structured, req.cookie, range, rd, df)
        }
        Err(e) => failed(ctx, &req, e),
    }
}

fn failed(ctx: &Ctx, req: &Request, e: Error) -> Reply {
    tracing::warn!(export = %ctx.export.name, cookie = req.cookie, typ = req.typ,
        offset = req.offset, len = req.len, error = %e, "request failed");
    error_reply(
        ctx.structured,
        req.cookie,
        &refuse(e.nbd_errno(), e.to_string()),
    )
}

async fn handle(ctx: Arc<Ctx>, req: Request, c: Command, payload: Bytes) -> Reply {
    let dev = &ctx.export.device;
    let ok = || ok_reply(req.cookie);
    let writer = || {
        ctx.export
            .writable
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::ReadOnly, "export is read-only"))
    };
    let result: Result<Reply> = match c {
        Command::Write { range, fua } => match writer() {
            Ok(w) => w.write(range.offset, payload, fua).await.map(|_| ok()),
            Err(e) => Err(e),
        },
        Command::Trim { range, fua } => match writer() {
            Ok(w) => w.trim(range, fua).await.map(|_| ok()),
            Err(e) => Err(e),
        },
        Command::Zero { range, flags } => match writer() {
            Ok(w) => w.write_zeroes(range, flags).await.map(|_| ok()),
            Err(e) => Err(e),
        },
        Command::Read { range, df } => {
            return read_result(&ctx, req, range, df, dev.read(range).await)
        }
        Command::Flush => dev.flush().await.map(|_| ok_reply(req.cookie)),
        Command::Cache { range } => {
            dev.prefetch(range);
            Ok(ok_reply(req.cookie))
        }
        Command::BlockStatus { range, req_one } => dev.extents(range).map(|ext| {
            let take = if req_one { 1 } else { MAX_EXTENTS };
            let ext: Vec<_> = ext.into_iter().filter(|e| e.len > 0).take(take).collect();
            let mut b = BytesMut::with_capacity(24 + ext.len() * 8);
            b.put_slice(&wire::chunk_header(
                chunk::FLAG_DONE,
                chunk::BLOCK_STATUS,
                req.cookie,
                4 + 8 * ext.len() as u32,
            ));
            b.put_u32(wire::BASE_ALLOCATION_ID);
            for e in ext {
                b.put_u32(e.len as u32);
                b.put_u32(if e.zero { state::HOLE | state::ZERO } else { 0 });
            }
            vec![b.freeze()]
        }),
    };
    match result {
        Ok(r) => r,
        Err(e) => failed(&ctx, &req, e),
    }
}

/// Replies on their way to the socket, in order, with what each holds.
///
/// Small buffers (headers, short replies) are copied into one coalescing
/// buffer so that a batch of replies leaves in one system call; payloads
/// stay as they are and go out through vectored writes.
#[derive(Default)]
struct Outbox {
    /// Segments in send order; `head_sent` bytes of the first are sent.
    segs: VecDeque<Bytes>,
    head_sent: usize,
    /// Small buffers not yet moved to `segs`.
    small: BytesMut,
    /// Stream positions: bytes ever queued, bytes ever sent.
    queued: u64,
    sent: u64,
    /// Bytes were written and the stream not flushed since (TLS keeps
    /// records in its own buffer until flushed).
    unflushed: bool,
    /// Per reply, the position of its last byte and what it holds.
    held: VecDeque<(u64, Held)>,
    /// Totals over `held`, so the budgets are checked without a walk.
    replies: usize,
    units: u32,
}

/// Buffers up to this size are copied into the coalescing buffer.
const SMALL: usize = 512;
/// Most buffers one vectored write takes.
const MAX_IOV: usize = 64;

impl Outbox {
    fn push(&mut self, reply: Reply, held: Held) {
        for b in reply {
            self.queued += b.len() as u64;
            if b.len() <= SMALL {
                self.small.extend_from_slice(&b);
            } else {
                self.seal();
                self.segs.push_back(b);
            }
        }
        self.replies += 1;
        self.units += held.units;
        self.held.push_back((self.queued, held));
    }

    /// Move the coalesced small buffers into the send queue.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.segs.push_back(self.small.split().freeze());
        }
    }

    /// Nothing left to send or flush.
    fn is_empty(&self) -> bool {
        self.queued == self.sent && !self.unflushed
    }

    /// Account `n` more bytes as sent; release what fully sent replies held.
    fn advance(&mut self, mut n: usize) {
        self.sent += n as u64;
        self.unflushed = true;
        while n > 0 {
            let head = self.segs[0].len() - self.head_sent;
            if n < head {
                self.head_sent += n;
                break;
            }
            n -= head;
            self.segs.pop_front();
            self.head_sent = 0;
        }
        while let Some((end, _)) = self.held.front() {
            if *end > self.sent {
                break;
            }
            let (_, h) = self.held.pop_front().expect("front exists");
            self.replies -= 1;
            self.units -= h.units;
        }
    }

    /// Write as much as the socket takes. `Ready(Ok)` once everything queued
    /// is sent and flushed; `Pending` when the socket is full. Progress made
    /// before `Pending` is kept (see `sent`).
    fn poll_send<W: AsyncWrite + Unpin>(
        &mut self,
        w: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.seal();
        while !self.segs.is_empty() {
            let n = if w.is_write_vectored() && self.segs.len() > 1 {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let mut k = 0;
                for (i, s) in self.segs.iter().take(MAX_IOV).enumerate() {
                    let from = if i == 0 { self.head_sent } else { 0 };
                    iov[i] = IoSlice::new(&s[from..]);
                    k = i + 1;
                }
                ready!(Pin::new(&mut *w).poll_write_vectored(cx, &iov[..k]))?
            } else {
                ready!(Pin::new(&mut *w).poll_write(cx, &self.segs[0][self.head_sent..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        if self.unflushed {
            ready!(Pin::new(w).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

/// What woke the connection loop.
enum Event {
    /// Request bytes arrived (0: end of stream).
    Read(std::io::Result<usize>),
    /// A handler task finished.
    Reply(Outgoing),
    /// The server-wide reply budget granted what a read waits for.
    Granted(OwnedSemaphorePermit),
    /// Everything queued was sent: budgets may allow more requests now.
    Sent,
    SendFailed(std::io::Error),
    /// Server stop or export removal.
    Stop,
}

/// Read buffer size: room for a burst of pipelined 4 KiB writes.
const READ_CHUNK: usize = 128 << 10;

/// The state of one connection's loop, besides the socket and the event
/// sources.
struct Conn {
    ctx: Arc<Ctx>,
    /// Request bytes read and not yet consumed.
    inbuf: BytesMut,
    /// The next request is incomplete in `inbuf`: read the socket. False
    /// while a budget holds the next request back, so that a client cannot
    /// make the buffer grow by sending while it is not being served.
    starved: bool,
    /// Payload bytes of a refused write still to be skipped.
    skip: u64,
    /// Still taking requests (false after DISC, end of stream, a stop or a
    /// fatal protocol error: in-flight requests are still answered).
    reading: bool,
    out: Outbox,
    /// Handler tasks running, and the budget units they hold.
    running: usize,
    running_units: u32,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// A read waits for the server-wide budget (nothing else is taken
    /// until it is granted), or the grant waiting for that read.
    waiting: Option<Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>>,
    granted: Option<OwnedSemaphorePermit>,
    shared: Budget,
    outcome: Result<()>,
}

impl Conn {
    /// May one more request with `units` of payload be taken?
    fn room(&self, units: u32) -> bool {
        self.running + self.out.replies < MAX_IN_FLIGHT
            && self.running_units + self.out.units + units
                <= (MAX_IN_FLIGHT_BYTES / BUDGET_UNIT as usize) as u32
    }

    /// Whether the loop should read the socket now.
    fn wants_bytes(&self) -> bool {
        self.reading && self.starved
    }

    fn stop_reading(&mut self, outcome: Result<()>) {
        self.reading = false;
        if self.outcome.is_ok() {
            self.outcome = outcome;
        }
    }

    /// Take every complete request in the buffer, as long as the budgets
    /// allow. Cheap requests are answered right here; the rest go to tasks.
    fn take_requests(&mut self) {
        self.starved = false;
        while self.reading {
            if self.skip > 0 {
                let n = self.skip.min(self.inbuf.len() as u64) as usize;
                self.inbuf.advance(n);
                self.skip -= n as u64;
                if self.skip > 0 {
                    self.starved = true;
                    return;
                }
            }
            if self.waiting.is_some() {
                return;
            }
            if self.inbuf.len() < Request::SIZE {
                self.starved = true;
                return;
            }
            let hb: &[u8; Request::SIZE] = self.inbuf[..Request::SIZE].try_into().expect("sized");
            let req = match Request::decode(hb) {
                Ok(r) => r,
                Err(e) => {
                    return self.stop_reading(Err(Error::new(
                        ErrorKind::Protocol,
                        format!("request: {e}; closing connection"),
                    )))
                }
            };
            if req.typ == cmd::DISC {
                self.inbuf.clear();
                return self.stop_reading(Ok(()));
            }
            // Every reply counts against the in-flight cap, refusals too: a
            // client that sends garbage and reads nothing is stopped by it.
            if !self.room(0) {
                return;
            }
            let checked = validate(&req, &self.ctx);
            let cmd = match checked {
                Err(r) if r.fatal => {
                    self.out.push(
                        error_reply(self.ctx.structured, req.cookie, &r),
                        Held::none(),
                    );
                    return self.stop_reading(Err(Error::new(
                        ErrorKind::Protocol,
                        format!("{}; closing connection", r.msg),
                    )));
                }
                Err(r) => {
                    tracing::debug!(?req, errno = r.errno, msg = %r.msg, "request refused");
                    self.inbuf.advance(Request::SIZE);
                    if req.typ == cmd::WRITE {
                        // The payload follows whatever we think of the
                        // request; skip it to stay in step.
                        self.skip = req.len as u64;
                    }
                    self.out.push(
                        error_reply(self.ctx.structured, req.cookie, &r),
                        Held::none(),
                    );
                    continue;
                }
                Ok(c) => c,
            };
            let units = match cmd {
                Command::Write { range, .. } | Command::Read { range, .. } => {
                    (range.len as u32).div_ceil(BUDGET_UNIT)
                }
                _ => 0,
            };
            if !self.room(units) {
                return; // answered replies free the budget
            }
            let mut held = Held {
                units,
                shared: None,
            };
            let mut payload: &[u8] = &[];
            if let Command::Write { range, .. } = cmd {
                let need = Request::SIZE + range.len as usize;
                if self.inbuf.len() < need {
                    self.inbuf.reserve(need - self.inbuf.len());
                    self.starved = true; // the rest of the payload is on its way
                    return;
                }
                payload = &self.inbuf[Request::SIZE..need];
            }
            if let Command::Read { .. } = cmd {
                // Read replies also draw on the server-wide budget.
                let permit = match self.granted.take() {
                    Some(p) if p.num_permits() == units as usize => p,
                    _ => match self.shared.replies.clone().try_acquire_many_owned(units) {
                        Ok(p) => p,
                        Err(_) => {
                            let sem = self.shared.replies.clone();
                            self.waiting =
                                Some(Box::pin(
                                    async move { sem.acquire_many_owned(units).await.ok() },
                                ));
                            return;
                        }
                    },
                };
                held.shared = Some(permit);
            }
            let done = Request::SIZE + payload.len();
            if let Some(reply) = self.run_now(req, cmd, payload) {
                self.out.push(reply, held);
            } else {
                let bytes = Bytes::copy_from_slice(payload);
                self.spawn(req, cmd, bytes, held);
            }
            self.inbuf.advance(done);
        }
    }

    /// The reply, when the request needs nothing but local I/O.
    fn run_now(&self, req: Request, cmd: Command, payload: &[u8]) -> Option<Reply> {
        let ctx = &self.ctx;
        match cmd {
            Command::Read { range, df } => {
                let res = ctx.export.device.read_now(range)?;
                Some(read_result(ctx, req, range, df, res))
            }
            Command::Write { range, fua } => {
                let w = ctx.export.writable.as_ref()?;
                if range.is_empty() {
                    // Every write passes here first; nothing to store.
                    return Some(ok_reply(req.cookie));
                }
                Some(match w.write_now(range.offset, payload, fua)? {
                    Ok(()) => ok_reply(req.cookie),
                    Err(e) => failed(ctx, &req, e),
                })
            }
            _ => None,
        }
    }

    fn spawn(&mut self, req: Request, cmd: Command, payload: Bytes, held: Held) {
        self.running += 1;
        self.running_units += held.units;
        let (ctx, tx) = (self.ctx.clone(), self.tx.clone());
        tokio::spawn(async move {
            let reply = handle(ctx, req, cmd, payload).await;
            // The connection may be gone; its reply with it.
            let _ = tx.send(Outgoing { reply, held });
        });
    }

    fn finished(&mut self, o: Outgoing) {
        self.running -= 1;
        self.running_units -= o.held.units;
        self.out.push(o.reply, o.held);
    }
}

/// Serve requests on an established connection until the client
/// disconnects, breaks the protocol, `shutdown` turns true (server stop) or
/// the export is removed. In-flight requests are always answered first.
///
/// One task does it all: it reads requests, answers those that need only
/// local I/O on the spot, and writes every reply; handler tasks hand back
/// only the replies of requests that had to wait. Each wake-up takes all
/// the requests that arrived and sends all the replies that are ready.
pub async fn serve<S>(
    mut stream: S,
    neg: Negotiated,
    mut shutdown: watch::Receiver<bool>,
    shared: Budget,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        export: neg.export,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
    });
    let mut closing = ctx.export.closing.subscribe();
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    let send_timeout = shared.send_timeout;
    let mut c = Conn {
        ctx,
        inbuf: BytesMut::with_capacity(READ_CHUNK),
        starved: true,
        skip: 0,
        reading: true,
        out: Outbox::default(),
        running: 0,
        running_units: 0,
        tx,
        waiting: None,
        granted: None,
        shared,
        outcome: Ok(()),
    };
    // Armed once; polled only when the loop is about to wait.
    let mut stop = std::pin::pin!(async move {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => {}
            _ = closing.wait_for(|s| *s) => {}
        }
    });
    // Set while replies wait for a client that takes no bytes.
    let mut stalled: Option<Pin<Box<tokio::time::Sleep>>> = None;
    loop {
        c.take_requests();
        if !c.reading && c.running == 0 && c.out.is_empty() {
            break;
        }
        let ev = std::future::poll_fn(|cx| {
            if !c.out.is_empty() {
                let before = c.out.sent;
                match c.out.poll_send(&mut stream, cx) {
                    Poll::Ready(Ok(())) => {
                        stalled = None;
                        return Poll::Ready(Event::Sent);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Event::SendFailed(e)),
                    Poll::Pending => {
                        if c.out.sent != before {
                            stalled = None;
                        }
                        let timer = stalled
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Event::SendFailed(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!(
                                    "the client took no reply bytes for {} s",
                                    send_timeout.as_secs_f64()
                                ),
                            )));
                        }
                    }
                }
            }
            if c.running > 0 {
                if let Poll::Ready(Some(o)) = rx.poll_recv(cx) {
                    return Poll::Ready(Event::Reply(o));
                }
            }
            if let Some(w) = c.waiting.as_mut() {
                if let Poll::Ready(p) = w.as_mut().poll(cx) {
                    c.waiting = None;
                    // Closed only if the server is going away.
                    return match p {
                        Some(p) => Poll::Ready(Event::Granted(p)),
                        None => Poll::Ready(Event::Stop),
                    };
                }
            }
            if c.reading && stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            if c.wants_bytes() {
                // Room for a burst, so that a 4 KiB write is rarely read
                // in two pieces (reclaims the consumed front in place).
                if c.inbuf.capacity() - c.inbuf.len() < READ_CHUNK / 8 {
                    c.inbuf.reserve(READ_CHUNK);
                }
                let read = std::pin::pin!(stream.read_buf(&mut c.inbuf));
                if let Poll::Ready(r) = read.poll(cx) {
                    return Poll::Ready(Event::Read(r));
                }
            }
            Poll::Pending
        })
        .await;
        match ev {
            Event::Read(Ok(0)) => {
                // A client may hang up without DISC between requests; in
                // the middle of one, it broke the protocol.
                let partial = !c.inbuf.is_empty() || c.skip > 0;
                c.stop_reading(if partial {
                    Err(Error::new(
                        ErrorKind::Protocol,
                        "the client hung up in the middle of a request",
                    ))
                } else {
                    Ok(())
                });
            }
            Event::Read(Ok(_)) => {}
            Event::Read(Err(e)) => {
                c.stop_reading(Err(Error::with_source(
                    ErrorKind::Protocol,
                    "reading request",
                    e,
                )));
            }
            Event::Reply(o) => {
                c.finished(o);
                // Take every other finished reply too: one send for all.
                while let Ok(o) = rx.try_recv() {
                    c.finished(o);
                }
            }
            Event::Granted(p) => c.granted = Some(p),
            Event::Sent => {}
            Event::Stop => c.stop_reading(Ok(())),
            Event::SendFailed(e) => {
                use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
                // A client that hangs up while we answer is not an error
                // worth a warning.
                if c.outcome.is_ok() && !matches!(e.kind(), BrokenPipe | ConnectionReset) {
                    c.outcome = Err(Error::with_source(
                        ErrorKind::Protocol,
                        "writing replies",
                        e,
                    ));
                }
                // Replies of requests still running are dropped with `rx`.
                return c.outcome;
            }
        }
    }
    let _ = tokio::time::timeout(send_timeout, stream.shutdown()).await;
    c.outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(data: &[u8], zero: Vec<ByteRange>) -> ReadData {
        ReadData {
            data: Bytes::copy_from_slice(data),
            zero,
        }
    }

    /// Parse structured chunks back and check they tile the request.
    fn tiles(reply: &Reply, range: ByteRange) -> Vec<u8> {
        let all: Vec<u8> = reply.iter().flat_map(|b| b.iter().copied()).collect();
        let mut out = vec![0xAAu8; range.len as usize];
        let mut p = 0;
        let mut done = false;
        while p < all.len() {
            assert!(!done, "chunk after DONE");
            let h = wire::ChunkHeader::decode(all[p..p + 20].try_into().unwrap()).unwrap();
            let payload = &all[p + 20..p + 20 + h.len as usize];
            done = h.flags & chunk::FLAG_DONE != 0;
            let off = u64::from_be_bytes(payload[..8].try_into().unwrap());
            let s = (off - range.offset) as usize;
            match h.typ {
                chunk::OFFSET_DATA => out[s..s + payload.len() - 8].copy_from_slice(&payload[8..]),
                chunk::OFFSET_HOLE => {
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    out[s..s + n].fill(0);
                }
                t => panic!("unexpected chunk {t}"),
            }
            p += 20 + h.len as usize;
        }
        assert!(done);
        out
    }

    /// An image in memory; reads are answered inline (`read_now`).
    struct Mem(Bytes);

    impl Mem {
        fn slice(&self, r: ByteRange) -> ReadData {
            ReadData {
                data: self.0.slice(r.offset as usize..r.end() as usize),
                zero: Vec::new(),
            }
        }
    }

    impl crate::export::BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, r: ByteRange) -> crate::origin::BoxFuture<'_, Result<ReadData>> {
            let d = self.slice(r);
            Box::pin(async move { Ok(d) })
        }
        fn extents(&self, r: ByteRange) -> Result<Vec<crate::export::Extent>> {
            Ok(vec![crate::export::Extent {
                len: r.len,
                zero: false,
            }])
        }
        fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
            Some(Ok(self.slice(r)))
        }
        fn flush(&self) -> crate::origin::BoxFuture<'_, Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A stream that keeps what is written until it is flushed, as a TLS
    /// stream keeps records whose socket write returned `Pending` while
    /// reporting the bytes as taken: every reply still reaches the client,
    /// because the loop flushes before it waits. (Without the flush, only
    /// a later write would push them out; a client waiting for its last
    /// reply sends none.)
    #[tokio::test]
    async fn replies_reach_a_stream_that_holds_writes_until_flushed() {
        let img: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let export = Arc::new(Export {
            name: "disk".into(),
            description: String::new(),
            image: "memory".into(),
            device: Arc::new(Mem(Bytes::from(img.clone()))),
            writable: None,
            overlay: None,
            multi_conn: true,
            preferred_block: 4096,
            stats: Arc::new(Stats::default()),
            clients: Default::default(),
            closing: watch::channel(false).0,
        });
        let neg = Negotiated {
            export,
            structured: false,
            base_allocation: false,
        };
        let (mut client, server) = tokio::io::duplex(4 << 20);
        // Holds up to 2 MiB: every reply below fits and waits for a flush.
        let server = tokio::io::BufWriter::with_capacity(2 << 20, server);
        let (_stop, shutdown) = watch::channel(false);
        let budget = Budget::new(0, Duration::from_secs(5));
        let task = tokio::spawn(serve(server, neg, shutdown, budget));
        let within = Duration::from_secs(5);
        for (cookie, off, len) in [(1u64, 0u64, 100u32), (2, 4096, 65536), (3, 1000, 300_000)] {
            let req = Request {
                flags: 0,
                typ: cmd::READ,
                cookie,
                offset: off,
                len,
            };
            client.write_all(&req.encode()).await.unwrap();
            let mut head = [0u8; 16];
            tokio::time::timeout(within, client.read_exact(&mut head))
                .await
                .expect("the reply was left in the stream's buffer")
                .unwrap();
            assert_eq!(head[..16], wire::simple_reply(cookie, 0));
            let mut data = vec![0u8; len as usize];
            client.read_exact(&mut data).await.unwrap();
            assert!(data[..] == img[off as usize..(off + len as u64) as usize]);
        }
        let disc = Request {
            flags: 0,
            typ: cmd::DISC,
            cookie: 9,
            offset: 0,
            len: 0,
        };
        client.write_all(&disc.encode()).await.unwrap();
        let r = tokio::time::timeout(within, task)
            .await
            .expect("serve ends");
        assert!(r.unwrap().is_ok());
    }

    #[test]
    fn error_chunk_messages_are_strings() {
        let r = refuse(errno::EIO, "€".repeat(1000)); // 3 bytes each
        let b = &error_reply(true, 1, &r)[0];
        let h = wire::ChunkHeader::decode(b[..20].try_into().unwrap()).unwrap();
        let n = u16::from_be_bytes([b[24], b[25]]) as usize;
        assert_eq!(h.len as usize, 6 + n);
        assert!(n <= 1024);
        assert!(std::str::from_utf8(&b[26..26 + n]).is_ok());
    }

    #[test]
    fn holes_and_data_tile_the_read() {
        let range = ByteRange {
            offset: 100,
            len: 40,
        };
        let mut data = vec![7u8; 40];
        data[10..20].fill(0);
        data[30..40].fill(0);
        let z = vec![
            ByteRange {
                offset: 110,
                len: 10,
            },
            ByteRange {
                offset: 130,
                len: 10,
            },
        ];
        let r = read_reply(true, 5, range, rd(&data, z.clone()), false);
        assert_eq!(tiles(&r, range), data);
        // DF: exactly one data chunk.
        let r = read_reply(true, 5, range, rd(&data, z), true);
        assert_eq!(r.len(), 2);
        assert_eq!(tiles(&r, range), data);
    }
}
