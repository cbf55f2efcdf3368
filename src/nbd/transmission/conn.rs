//! The connection loop: one task per connection reads requests, has them
//! validated, answers those that need only local I/O on the spot
//! (`Conn::run_now`), hands the rest to handler tasks (`handle`), and
//! writes every reply through the outbox. It keeps the caps of `budget`:
//! at a cap it stops taking requests, and stops reading the socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};

use super::budget::{Budget, Held, BUDGET_UNIT, MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES};
use super::outbox::Outbox;
use super::reply::{block_status_reply, error_reply, failed, ok_reply, read_result, Reply};
use super::validate::{validate, Command, Ctx};
use crate::error::{Error, ErrorKind, Result};
use crate::nbd::handshake::Negotiated;
use crate::nbd::wire::{cmd, Request};

/// The reply of a request that ran in its own task, with what it holds.
struct Outgoing {
    reply: Reply,
    held: Held,
}

/// Run a request that may wait (an origin fetch, a flush) in its own task;
/// the reply goes back to the loop, which sends it.
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
        Command::BlockStatus { range, req_one } => dev
            .extents(range)
            .map(|ext| block_status_reply(req.cookie, ext, req_one)),
    };
    match result {
        Ok(r) => r,
        Err(e) => failed(&ctx, &req, e),
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
pub(crate) async fn serve<S>(
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
    use std::time::Duration;

    use super::*;
    use crate::block::ByteRange;
    use crate::device::ReadData;
    use crate::export::Export;
    use crate::nbd::wire;
    use crate::stats::Stats;

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

    impl crate::device::BlockDevice for Mem {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read(&self, r: ByteRange) -> crate::device::BoxFuture<'_, Result<ReadData>> {
            let d = self.slice(r);
            Box::pin(async move { Ok(d) })
        }
        fn extents(&self, r: ByteRange) -> Result<Vec<crate::device::Extent>> {
            Ok(vec![crate::device::Extent {
                len: r.len,
                zero: false,
            }])
        }
        fn read_now(&self, r: ByteRange) -> Option<Result<ReadData>> {
            Some(Ok(self.slice(r)))
        }
        fn flush(&self) -> crate::device::BoxFuture<'_, Result<()>> {
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
}
