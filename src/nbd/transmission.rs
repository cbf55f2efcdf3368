//! The transmission phase: requests in, replies out, concurrently.
//!
//! ```text
//!   socket --read--> [reader loop: decode + validate] --spawn--> handler tasks
//!                                                                  |
//!   socket <--write-- [writer task: batches replies] <---mpsc------+
//! ```
//!
//! Requests are validated once, here, before any layer sees them
//! (flags, ranges, read-only, payload size). Each valid request runs in its
//! own task, so a cache hit is never queued behind an origin miss; replies
//! go out in completion order. A per-connection semaphore caps requests in
//! flight (and so the memory a client can pin); when it is exhausted the
//! reader stops reading the socket and TCP pushes back on the client.
//!
//! Memory is bounded at two levels. Each connection may hold at most
//! [`MAX_IN_FLIGHT_BYTES`] of payload (write data read in, read data not yet
//! sent). Read replies are what a client can make the server produce without
//! sending anything, so they also draw on one server-wide [`Budget`]; a
//! client that stops taking its replies is dropped after the budget's send
//! timeout, which returns what it held.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{
    AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
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
/// until the client takes the reply). Without it, 128 reads of 32 MiB from
/// a client that never reads its socket would pin 4 GiB.
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
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

/// What a request holds until its reply has been handed to the socket: its
/// in-flight slot, its bytes of the connection's budget and, for reads, of
/// the server-wide one.
struct Held {
    _slot: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
    _shared: Option<OwnedSemaphorePermit>,
}

/// A reply on its way to the socket, with the in-flight permits it holds:
/// they are released only once the writer has taken the bytes, so the
/// budgets bound queued replies too, not just running handlers.
struct Outgoing {
    reply: Reply,
    _held: Option<Held>,
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

fn ok_reply(structured: bool, cookie: u64) -> Reply {
    if structured {
        vec![Bytes::copy_from_slice(&wire::chunk_header(
            chunk::FLAG_DONE,
            chunk::NONE,
            cookie,
            0,
        ))]
    } else {
        simple(cookie, 0)
    }
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
        return ok_reply(true, cookie);
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
    let ok = || ok_reply(ctx.structured, req.cookie);
    let writer = || {
        ctx.export
            .writable
            .as_ref()
            .ok_or_else(|| Error::new(ErrorKind::ReadOnly, "export is read-only"))
    };
    let result: Result<Reply> = match c {
        Command::Write { range, fua } => match writer() {
            Ok(_) if range.is_empty() => Ok(ok()),
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
        Command::Flush => dev
            .flush()
            .await
            .map(|_| ok_reply(ctx.structured, req.cookie)),
        Command::Cache { range } => {
            dev.prefetch(range);
            Ok(ok_reply(ctx.structured, req.cookie))
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

/// Write replies, batching whatever is ready before each flush.
async fn writer<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<Outgoing>,
    send_timeout: Duration,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    // Every step that waits for the client to take bytes has a deadline: a
    // client that stops reading must not pin its buffers forever.
    let stalled = || {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "the client took no reply bytes for {} s",
                send_timeout.as_secs_f64()
            ),
        )
    };
    while let Some(out) = rx.recv().await {
        let mut batch = vec![out];
        while let Ok(out) = rx.try_recv() {
            batch.push(out);
        }
        let put = async {
            for out in &batch {
                for b in &out.reply {
                    w.write_all(b).await?;
                }
            }
            w.flush().await
        };
        tokio::time::timeout(send_timeout, put)
            .await
            .map_err(|_| stalled())??;
    }
    w.shutdown().await
}

/// Read exactly `n` bytes of write payload into a fresh buffer (not
/// zeroed first: every byte is overwritten by the socket's).
async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, n: usize) -> std::io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(n);
    while buf.len() < n {
        let want = (n - buf.len()) as u64;
        if (&mut *r).take(want).read_buf(&mut buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

/// Discard `n` bytes of payload we will not use, keeping the stream in sync.
async fn discard<R: AsyncRead + Unpin>(r: &mut R, n: u64) -> std::io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(n), &mut tokio::io::sink()).await?;
    if copied != n {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Serve requests on an established connection until the client
/// disconnects, breaks the protocol, `shutdown` turns true (server stop) or
/// the export is removed. In-flight requests are always answered first.
pub async fn serve<S>(
    stream: S,
    neg: Negotiated,
    mut shutdown: watch::Receiver<bool>,
    shared: Budget,
) -> Result<()>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(128 << 10, rd);
    let (tx, rx) = mpsc::channel::<Outgoing>(MAX_IN_FLIGHT + 8);
    // When the writer gives up (the client stopped reading, or hung up),
    // the reader stops too instead of waiting for a request forever.
    let (writer_done, mut writer_gone) = watch::channel(false);
    let send_timeout = shared.send_timeout;
    let writer = tokio::spawn(async move {
        let r = writer(wr, rx, send_timeout).await;
        let _ = writer_done.send(true);
        r
    });
    let ctx = Arc::new(Ctx {
        export: neg.export,
        structured: neg.structured,
        base_allocation: neg.base_allocation,
    });
    let mut closing = ctx.export.closing.subscribe();
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let budget = Arc::new(Semaphore::new(MAX_IN_FLIGHT_BYTES / BUDGET_UNIT as usize));
    let mut outcome = Ok(());
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let mut hb = [0u8; Request::SIZE];
        let stop = || *shutdown.borrow() || *closing.borrow() || *writer_gone.borrow();
        let read = if rd.buffer().len() >= Request::SIZE {
            // A pipelining client's next request is usually buffered
            // already: take it without arming the wake-ups below.
            if stop() {
                break;
            }
            hb.copy_from_slice(&rd.buffer()[..Request::SIZE]);
            std::pin::Pin::new(&mut rd).consume(Request::SIZE);
            Ok(Request::SIZE)
        } else {
            tokio::select! {
                r = rd.read_exact(&mut hb) => r,
                _ = shutdown.wait_for(|s| *s) => break,
                _ = closing.wait_for(|s| *s) => break,
                _ = writer_gone.wait_for(|s| *s) => break,
            }
        };
        if let Err(e) = read {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                outcome = Err(Error::with_source(
                    ErrorKind::Protocol,
                    "reading request",
                    e,
                ));
            }
            break; // EOF: client hung up without DISC
        }
        let req = match Request::decode(&hb) {
            Ok(r) => r,
            Err(e) => {
                outcome = Err(Error::new(
                    ErrorKind::Protocol,
                    format!("request: {e}; closing connection"),
                ));
                break;
            }
        };
        if req.typ == cmd::DISC {
            break;
        }
        let checked = validate(&req, &ctx);
        if let Err(r) = &checked {
            if r.fatal {
                let reply = error_reply(ctx.structured, req.cookie, r);
                let _ = tx.send(Outgoing { reply, _held: None }).await;
                outcome = Err(Error::new(
                    ErrorKind::Protocol,
                    format!("{}; closing connection", r.msg),
                ));
                break;
            }
        }
        let mut payload = Bytes::new();
        let mut bytes_held = None;
        if req.typ == cmd::WRITE {
            // The payload follows the header whatever we think of the
            // request: read it for a valid write (within the byte budget),
            // skip it otherwise, so the stream stays in step.
            let read = if let Ok(Command::Write { .. }) = checked {
                let units = req.len.div_ceil(BUDGET_UNIT);
                let Ok(held) = budget.clone().acquire_many_owned(units).await else {
                    break;
                };
                bytes_held = Some(held);
                let r = read_payload(&mut rd, req.len as usize).await;
                match r {
                    Ok(buf) => {
                        payload = buf;
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            } else {
                discard(&mut rd, req.len as u64).await
            };
            if let Err(e) = read {
                outcome = Err(Error::with_source(
                    ErrorKind::Protocol,
                    "reading write payload",
                    e,
                ));
                break;
            }
        }
        match checked {
            Err(r) => {
                tracing::debug!(?req, errno = r.errno, msg = %r.msg, "request refused");
                let reply = error_reply(ctx.structured, req.cookie, &r);
                drop(permit);
                if tx.send(Outgoing { reply, _held: None }).await.is_err() {
                    break;
                }
            }
            Ok(c) => {
                // Reads reserve their payload from the connection's byte
                // budget (a 32 MiB read takes half of it), then from the
                // server's; the reader waits while either is spent.
                let held = match (c, bytes_held) {
                    (_, Some(bytes)) => Held {
                        _slot: permit,
                        _bytes: bytes,
                        _shared: None,
                    },
                    (Command::Read { range, .. }, None) => {
                        let units = (range.len as u32).div_ceil(BUDGET_UNIT);
                        let Ok(bytes) = budget.clone().acquire_many_owned(units).await else {
                            break;
                        };
                        let all = tokio::select! {
                            p = shared.replies.clone().acquire_many_owned(units) => p,
                            _ = writer_gone.wait_for(|s| *s) => break,
                        };
                        let Ok(all) = all else { break };
                        Held {
                            _slot: permit,
                            _bytes: bytes,
                            _shared: Some(all),
                        }
                    }
                    _ => match budget.clone().acquire_many_owned(0).await {
                        Ok(bytes) => Held {
                            _slot: permit,
                            _bytes: bytes,
                            _shared: None,
                        },
                        Err(_) => break,
                    },
                };
                // A read whose blocks are all local is answered right here:
                // no task, no wake-up; anything that may wait goes to a task.
                if let Command::Read { range, df } = c {
                    if let Some(res) = ctx.export.device.read_now(range) {
                        let reply = read_result(&ctx, req, range, df, res);
                        let out = Outgoing {
                            reply,
                            _held: Some(held),
                        };
                        if tx.send(out).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                // Likewise a write that needs nothing but local I/O.
                if let (Command::Write { range, fua }, Some(w)) = (c, &ctx.export.writable) {
                    if let Some(res) = w.write_now(range.offset, &payload, fua) {
                        let reply = match res {
                            Ok(()) => ok_reply(ctx.structured, req.cookie),
                            Err(e) => failed(&ctx, &req, e),
                        };
                        let out = Outgoing {
                            reply,
                            _held: Some(held),
                        };
                        if tx.send(out).await.is_err() {
                            break;
                        }
                        continue;
                    }
                }
                let (ctx, tx) = (ctx.clone(), tx.clone());
                tokio::spawn(async move {
                    let reply = handle(ctx, req, c, payload).await;
                    let _ = tx
                        .send(Outgoing {
                            reply,
                            _held: Some(held),
                        })
                        .await;
                });
            }
        }
    }
    // Every handler holds a sender: the writer finishes once the last
    // in-flight request has been answered.
    drop(tx);
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    match writer.await {
        // A client that hangs up while we answer is not an error worth a warning.
        Ok(Err(e)) if outcome.is_ok() && !matches!(e.kind(), BrokenPipe | ConnectionReset) => {
            outcome = Err(Error::with_source(
                ErrorKind::Protocol,
                "writing replies",
                e,
            ));
        }
        _ => {}
    }
    outcome
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
