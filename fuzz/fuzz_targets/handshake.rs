//! `lazybd::nbd::handshake::negotiate` against a hostile client (TLS off:
//! tests/tls.rs covers the TLS modes).
//!
//! Input layout: the first byte picks the mode and the export's flags.
//! - mode bit (0x01) clear: the rest of the input IS the client's byte stream
//!   (the seeds in `fuzz/seeds/handshake/` are real clients' streams in this
//!   mode, see `fuzz/gen_seeds.py`);
//! - mode bit set: the rest is decoded with `arbitrary` into a [`Session`]
//!   (client flags + a list of options, valid-ish or malformed) that is
//!   serialized into the client's byte stream.
//!
//! The stream is an in-memory duplex that serves the client bytes and then
//! EOF, and records what the server writes. Properties checked:
//! - no panic; errors are fine;
//! - negotiate finishes (the client stream always ends, so it must: a future
//!   that stays pending on an always-ready stream is a hang);
//! - the server's output is well framed: the 18-byte greeting, then option
//!   replies only (magic, known reply type, length matching), then, after an
//!   EXPORT_NAME success, exactly the 10 or 134 byte export block;
//! - replies pair with requests: every option the server read (re-parsed
//!   from the client stream by the same framing rules) gets replies echoing
//!   its number, closed by exactly one ACK or error, and no reply is extra;
//!   an ACKed INFO/GO carried NBD_INFO_EXPORT with the device size and the
//!   right read-only flag; ABORT is ACKed and closes; an ACKed GO enters
//!   transmission; a stream without an ending option is an error;
//! - an agreed `base:allocation` implies structured replies were agreed.

#![no_main]

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use lazybd::block::ByteRange;
use lazybd::error::Result as LResult;
use lazybd::device::{BlockDevice, BoxFuture, Extent, ReadData, Writable, ZeroFlags};
use lazybd::export::{Export, Exports};
use lazybd::nbd::handshake::{negotiate, Outcome};
use lazybd::nbd::wire::{self, cflag, opt, rep, tflag, OptionHeader};
use lazybd::stats::Stats;
use lazybd::tls::TlsMode;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const EXPORT: &str = "disk";
const SIZE: u64 = 1 << 20;

/// A 1 MiB device of zeroes; the handshake only asks for its size.
struct ZeroDevice;

impl BlockDevice for ZeroDevice {
    fn size(&self) -> u64 {
        SIZE
    }
    fn read(&self, r: ByteRange) -> BoxFuture<'_, LResult<ReadData>> {
        Box::pin(async move {
            Ok(ReadData {
                data: Bytes::from(vec![0u8; r.len as usize]),
                zero: vec![r],
            })
        })
    }
    fn extents(&self, r: ByteRange) -> LResult<Vec<Extent>> {
        Ok(vec![Extent {
            len: r.len,
            zero: true,
        }])
    }
    fn flush(&self) -> BoxFuture<'_, LResult<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// The write side of a writable export; the handshake never calls it.
struct NullWrites;

impl Writable for NullWrites {
    fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> BoxFuture<'_, LResult<()>> {
        Box::pin(async { Ok(()) })
    }
    fn trim(&self, _r: ByteRange, _fua: bool) -> BoxFuture<'_, LResult<()>> {
        Box::pin(async { Ok(()) })
    }
    fn write_zeroes(&self, _r: ByteRange, _flags: ZeroFlags) -> BoxFuture<'_, LResult<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Client bytes in, server bytes recorded. Never pending; short reads (at
/// most `chunk` bytes each) so the server's read loops are exercised.
struct FuzzStream<'a> {
    input: &'a [u8],
    chunk: usize,
    out: Vec<u8>,
}

impl AsyncRead for FuzzStream<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.input.len().min(buf.remaining()).min(self.chunk);
        let (now, rest) = self.input.split_at(n);
        buf.put_slice(now);
        self.input = rest;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for FuzzStream<'_> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Polls `inner`, yielding to the runtime when it is pending, but panics if
/// it stays pending for long: with an always-ready stream nothing can wake
/// it, so that would be a hang.
struct MustFinish<F> {
    inner: Pin<Box<F>>,
    polls: u32,
}

impl<F: Future> Future for MustFinish<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.inner.as_mut().poll(cx) {
            Poll::Ready(v) => Poll::Ready(v),
            Poll::Pending => {
                self.polls += 1;
                assert!(
                    self.polls < 1000,
                    "negotiate is pending on an always-ready stream"
                );
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Name {
    /// "" reaches the default export.
    Default,
    Export,
    Other(String),
    Raw(Vec<u8>),
}

impl Name {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Name::Default => Vec::new(),
            Name::Export => EXPORT.as_bytes().to_vec(),
            Name::Other(s) => s.as_bytes().to_vec(),
            Name::Raw(b) => b.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Query {
    BaseAllocation,
    /// "base:" (LIST only).
    BasePrefix,
    Other(String),
    Raw(Vec<u8>),
}

impl Query {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Query::BaseAllocation => wire::BASE_ALLOCATION.as_bytes().to_vec(),
            Query::BasePrefix => b"base:".to_vec(),
            Query::Other(s) => s.as_bytes().to_vec(),
            Query::Raw(b) => b.clone(),
        }
    }
}

/// A u32 length that is usually right and sometimes lies.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Len {
    Right,
    Delta(i16),
    Exactly(u32),
}

impl Len {
    fn of(self, real: usize) -> u32 {
        match self {
            Len::Right => real as u32,
            Len::Delta(d) => (real as i64 + d as i64).clamp(0, u32::MAX as i64) as u32,
            Len::Exactly(n) => n,
        }
    }
}

fn put_string(v: &mut Vec<u8>, s: &[u8], len: Len) {
    v.extend_from_slice(&len.of(s.len()).to_be_bytes());
    v.extend_from_slice(s);
}

#[derive(Arbitrary, Debug)]
enum Msg {
    ExportName(Name),
    Abort,
    List,
    StartTls,
    Info {
        name: Name,
        name_len: Len,
        requests: Vec<u16>,
        count: Option<u16>,
    },
    Go {
        name: Name,
        name_len: Len,
        requests: Vec<u16>,
        count: Option<u16>,
    },
    StructuredReply,
    ListMetaContext {
        name: Name,
        queries: Vec<Query>,
        count: Option<u32>,
    },
    SetMetaContext {
        name: Name,
        queries: Vec<Query>,
        count: Option<u32>,
    },
    ExtendedHeaders,
    /// Any option number with any payload (also: known options with junk).
    Payload {
        option: u32,
        data: Vec<u8>,
    },
    /// An option header whose length field may lie about the payload.
    Header {
        option: u32,
        len: Len,
        data: Vec<u8>,
    },
    /// Bytes on the wire, no framing at all.
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
enum Flags {
    Fixed,
    FixedNoZeroes,
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
struct Session {
    flags: Flags,
    msgs: Vec<Msg>,
}

fn option(v: &mut Vec<u8>, option: u32, data: &[u8]) {
    v.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
}

fn info_payload(name: &Name, name_len: Len, requests: &[u16], count: Option<u16>) -> Vec<u8> {
    let mut d = Vec::new();
    put_string(&mut d, &name.bytes(), name_len);
    d.extend_from_slice(&count.unwrap_or(requests.len() as u16).to_be_bytes());
    for r in requests {
        d.extend_from_slice(&r.to_be_bytes());
    }
    d
}

fn meta_payload(name: &Name, queries: &[Query], count: Option<u32>) -> Vec<u8> {
    let mut d = Vec::new();
    put_string(&mut d, &name.bytes(), Len::Right);
    d.extend_from_slice(&count.unwrap_or(queries.len() as u32).to_be_bytes());
    for q in queries {
        put_string(&mut d, &q.bytes(), Len::Right);
    }
    d
}

impl Session {
    fn serialize(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let flags = match self.flags {
            Flags::Fixed => cflag::FIXED_NEWSTYLE,
            Flags::FixedNoZeroes => cflag::FIXED_NEWSTYLE | cflag::NO_ZEROES,
            Flags::Raw(f) => f,
        };
        v.extend_from_slice(&flags.to_be_bytes());
        for m in &self.msgs {
            match m {
                Msg::ExportName(n) => option(&mut v, opt::EXPORT_NAME, &n.bytes()),
                Msg::Abort => option(&mut v, opt::ABORT, &[]),
                Msg::List => option(&mut v, opt::LIST, &[]),
                Msg::StartTls => option(&mut v, opt::STARTTLS, &[]),
                Msg::Info {
                    name,
                    name_len,
                    requests,
                    count,
                } => option(
                    &mut v,
                    opt::INFO,
                    &info_payload(name, *name_len, requests, *count),
                ),
                Msg::Go {
                    name,
                    name_len,
                    requests,
                    count,
                } => option(
                    &mut v,
                    opt::GO,
                    &info_payload(name, *name_len, requests, *count),
                ),
                Msg::StructuredReply => option(&mut v, opt::STRUCTURED_REPLY, &[]),
                Msg::ListMetaContext {
                    name,
                    queries,
                    count,
                } => option(
                    &mut v,
                    opt::LIST_META_CONTEXT,
                    &meta_payload(name, queries, *count),
                ),
                Msg::SetMetaContext {
                    name,
                    queries,
                    count,
                } => option(
                    &mut v,
                    opt::SET_META_CONTEXT,
                    &meta_payload(name, queries, *count),
                ),
                Msg::ExtendedHeaders => option(&mut v, opt::EXTENDED_HEADERS, &[]),
                Msg::Payload { option: o, data } => option(&mut v, *o, data),
                Msg::Header {
                    option: o,
                    len,
                    data,
                } => {
                    v.extend_from_slice(&wire::IHAVEOPT.to_be_bytes());
                    v.extend_from_slice(&o.to_be_bytes());
                    v.extend_from_slice(&len.of(data.len()).to_be_bytes());
                    v.extend_from_slice(data);
                }
                Msg::Raw(b) => v.extend_from_slice(b),
            }
        }
        v
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("current-thread runtime")
    })
}

const REPLY_TYPES: &[u32] = &[
    rep::ACK,
    rep::SERVER,
    rep::INFO,
    rep::META_CONTEXT,
    rep::ERR_UNSUP,
    rep::ERR_POLICY,
    rep::ERR_INVALID,
    rep::ERR_TLS_REQD,
    rep::ERR_UNKNOWN,
    rep::ERR_SHUTDOWN,
    rep::ERR_TOO_BIG,
];

/// One option reply the server sent.
struct Reply<'a> {
    option: u32,
    typ: u32,
    data: &'a [u8],
}

/// Split what the server wrote into the greeting, option replies and the
/// bytes after the last reply, checking their framing.
fn parse_output(out: &[u8]) -> (Vec<Reply<'_>>, &[u8]) {
    assert!(out.len() >= 18, "server greeting missing: {out:02x?}");
    assert_eq!(out[..8], wire::NBDMAGIC.to_be_bytes());
    assert_eq!(out[8..16], wire::IHAVEOPT.to_be_bytes());
    let mut replies = Vec::new();
    let mut rest = &out[18..];
    while rest.len() >= 20 && rest[..8] == wire::OPT_REPLY_MAGIC.to_be_bytes() {
        let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
        assert!(REPLY_TYPES.contains(&typ), "unknown reply type {typ:#x}");
        assert!(
            rest.len() >= 20 + len,
            "option reply shorter than its length"
        );
        if typ == rep::ACK {
            assert_eq!(len, 0, "ACK with data");
        }
        replies.push(Reply {
            option,
            typ,
            data: &rest[20..20 + len],
        });
        rest = &rest[20 + len..];
    }
    (replies, rest)
}

/// The options the server can have read from `client`, following the same
/// framing rules as the server (flags, then 16-byte headers + payloads; bad
/// magic, an over-long option or EOF end the stream).
fn parse_client(client: &[u8]) -> Option<Vec<(u32, &[u8])>> {
    let flags = u32::from_be_bytes(client.get(..4)?.try_into().unwrap());
    if flags & !cflag::KNOWN != 0 {
        return None;
    }
    let mut opts = Vec::new();
    let mut rest = &client[4..];
    while let Some(hb) = rest.get(..OptionHeader::SIZE) {
        let Ok(h) = OptionHeader::decode(hb.try_into().unwrap()) else {
            break;
        };
        if h.len > wire::MAX_OPTION_LEN {
            break;
        }
        let Some(data) = rest[OptionHeader::SIZE..].get(..h.len as usize) else {
            break;
        };
        opts.push((h.option, data));
        rest = &rest[OptionHeader::SIZE + h.len as usize..];
    }
    Some(opts)
}

fn run(first: u8, client: &[u8], chunk: usize) {
    let read_only = first & 0x04 != 0;
    let exports = Exports::new();
    // Every field spelled out: lazybd has no Export constructor that works
    // without a real image cache (see export::stack).
    exports
        .add(Export {
            name: EXPORT.to_string(),
            description: if first & 0x02 != 0 {
                "a fuzzing disk".to_string()
            } else {
                String::new()
            },
            image: "fuzz:zeroes".to_string(),
            device: Arc::new(ZeroDevice),
            writable: if read_only {
                None
            } else {
                Some(Arc::new(NullWrites))
            },
            overlay: None,
            multi_conn: first & 0x08 != 0,
            preferred_block: 64 << 10,
            stats: Arc::new(Stats::default()),
            clients: Default::default(),
            closing: tokio::sync::watch::channel(false).0,
        })
        .expect("the only export");
    let mut s = FuzzStream {
        input: client,
        chunk,
        out: Vec::new(),
    };
    let result = runtime().block_on(MustFinish {
        inner: Box::pin(negotiate(&mut s, &exports, TlsMode::Off)),
        polls: 0,
    });
    let (replies, tail) = parse_output(&s.out);
    if let Ok(Outcome::Transmission(n)) = &result {
        assert_eq!(n.export.name, EXPORT);
        assert!(
            !n.base_allocation || n.structured,
            "base:allocation without structured replies"
        );
    }

    // Pair the client's options with the server's reply groups: every option
    // before the one that ends the handshake gets replies echoing its number,
    // closed by exactly one ACK or error.
    let opts = parse_client(client).unwrap_or_default();
    let mut replies = replies.iter().peekable();
    let mut ended = false;
    for &(option, data) in &opts {
        if option == opt::EXPORT_NAME {
            // No option reply: the export block, or the connection closes.
            match &result {
                Ok(Outcome::Transmission(_)) => assert!(
                    tail.len() == 10 || tail.len() == 134,
                    "EXPORT_NAME answered with {} bytes",
                    tail.len()
                ),
                Ok(Outcome::Closed) => panic!("EXPORT_NAME ended in Closed"),
                Ok(Outcome::StartTls(_)) => panic!("STARTTLS accepted with TLS off"),
                Err(_) => assert!(
                    tail.is_empty(),
                    "{} bytes after a refused EXPORT_NAME",
                    tail.len()
                ),
            }
            if tail.len() >= 10 {
                assert_eq!(tail[..8], SIZE.to_be_bytes());
                let flags = u16::from_be_bytes(tail[8..10].try_into().unwrap());
                assert_eq!(flags & tflag::READ_ONLY != 0, read_only);
            }
            ended = true;
            break;
        }
        let mut export_info = false;
        let last = loop {
            let r = replies
                .next()
                .unwrap_or_else(|| panic!("option {option} got no final reply"));
            assert_eq!(r.option, option, "reply for the wrong option");
            if r.typ == rep::INFO && r.data.len() == 12 && r.data[..2] == [0, 0] {
                assert_eq!(r.data[2..10], SIZE.to_be_bytes());
                let flags = u16::from_be_bytes(r.data[10..12].try_into().unwrap());
                assert_eq!(flags & tflag::READ_ONLY != 0, read_only);
                export_info = true;
            }
            if r.typ == rep::ACK || r.typ & 0x8000_0000 != 0 {
                break r;
            }
        };
        if option == opt::ABORT {
            assert_eq!(last.typ, rep::ACK);
            assert!(matches!(result, Ok(Outcome::Closed)), "ABORT did not close");
            ended = true;
            break;
        }
        if (option == opt::INFO || option == opt::GO) && last.typ == rep::ACK {
            assert!(export_info, "INFO/GO acknowledged without NBD_INFO_EXPORT");
        }
        if option == opt::STRUCTURED_REPLY {
            assert_eq!(last.typ == rep::ACK, data.is_empty());
        }
        if option == opt::GO && last.typ == rep::ACK {
            assert!(
                matches!(result, Ok(Outcome::Transmission(_))),
                "GO acknowledged but no transmission"
            );
            ended = true;
            break;
        }
    }
    assert!(replies.next().is_none(), "replies to options never sent");
    if !ended {
        // The client ran out of valid options: the server must fail.
        assert!(result.is_err(), "handshake ended without an ending option");
        assert!(
            tail.is_empty(),
            "{} stray bytes after the replies",
            tail.len()
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // Bits 4..=7 pick the read size: 1..=15 bytes or unlimited (0).
    let chunk = match first >> 4 {
        0 => usize::MAX,
        n => n as usize,
    };
    if first & 0x01 == 0 {
        run(first, rest, chunk);
    } else if let Ok(session) = Session::arbitrary_take_rest(Unstructured::new(rest)) {
        run(first, &session.serialize(), chunk);
    }
});
