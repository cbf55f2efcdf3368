//! Test fixtures: an in-process HTTP origin with fault injection, a small
//! async NBD client built on lazybd's own wire codec, and server start-up.
#![allow(dead_code)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazybd::block::BlockSize;
use lazybd::daemon::{self, ExportConfig, Running, ServeConfig};
use lazybd::nbd::wire::{
    self, chunk, opt, rep, InfoRequest, MetaContextRequest, OptionHeader, Request,
};
use lazybd::origin::OriginOptions;
use lazybd::server::{Limits, ListenAddr};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Deterministic pseudo-random image with a zero region at [1 MiB, 2 MiB).
pub fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
    if len >= 2 << 20 {
        v[1 << 20..2 << 20].fill(0);
    }
    v
}

/// Faults the test origin injects; counters say how often they fired.
#[derive(Default)]
pub struct Faults {
    /// Added before every response.
    pub latency_ms: AtomicU64,
    /// The next N ranged GETs answer 500.
    pub fail_next: AtomicU64,
    /// The next N ranged GETs send a body shorter than announced, then close.
    pub truncate_next: AtomicU64,
    /// The next N ranged GETs answer with a Content-Range for another range.
    pub wrong_range_next: AtomicU64,
    /// Ignore Range and answer 200 with the whole object.
    pub no_range: AtomicBool,
    /// Requests answered with a redirect (paths under /redirect).
    pub redirects: AtomicU64,
    /// Required request header (name, value), 403 without it.
    pub require_header: Mutex<Option<(String, String)>>,
    /// The next N ranged GETs wait `stall_ms` before answering.
    pub stall_next: AtomicU64,
    pub stall_ms: AtomicU64,
    /// The next N ranged GETs send half their body, then wait `stall_ms`
    /// before the rest (the connection open, silent).
    pub stall_body_next: AtomicU64,
    /// The next N ranged GETs get the connection closed, no answer.
    pub reset_next: AtomicU64,
    /// The next N ranged GETs send more body than the range asked (with a
    /// Content-Length to match, so only the length check can catch it).
    pub long_body_next: AtomicU64,
    /// The next N ranged GETs answer this status, no body: (status, N).
    pub status_next: Mutex<Option<(u16, u64)>>,
    /// Send no ETag (nor Last-Modified): an origin without validators.
    pub no_validator: AtomicBool,
}

/// Bodies by a part of the request target (see `TestOrigin::objects`).
pub type Objects = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

pub struct TestOrigin {
    pub url: String,
    pub data: Arc<Mutex<Vec<u8>>>,
    pub etag: Arc<Mutex<String>>,
    pub faults: Arc<Faults>,
    /// Ranged GETs answered (all statuses).
    pub requests: Arc<AtomicU64>,
    /// Other objects: a request whose target (path and query) contains the
    /// key gets that body instead of `data` (the first match wins).
    pub objects: Objects,
}

impl TestOrigin {
    pub async fn start(data: Vec<u8>) -> TestOrigin {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/image.raw", l.local_addr().unwrap());
        let data = Arc::new(Mutex::new(data));
        let etag = Arc::new(Mutex::new("\"v1\"".to_string()));
        let faults = Arc::new(Faults::default());
        let requests = Arc::new(AtomicU64::new(0));
        let objects = Arc::new(Mutex::new(Vec::new()));
        let (d, e, f, r) = (data.clone(), etag.clone(), faults.clone(), requests.clone());
        let objs = objects.clone();
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = l.accept().await else { return };
                let (d, e, f, r) = (d.clone(), e.clone(), f.clone(), r.clone());
                let o = objs.clone();
                tokio::spawn(async move {
                    let _ = serve_http(s, d, o, e, f, r).await;
                });
            }
        });
        TestOrigin {
            url,
            data,
            etag,
            faults,
            requests,
            objects,
        }
    }

    /// Replace the content and the ETag (a new version of the object).
    pub fn replace(&self, data: Vec<u8>, etag: &str) {
        *self.data.lock().unwrap() = data;
        *self.etag.lock().unwrap() = etag.to_string();
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

fn take_one(a: &AtomicU64) -> bool {
    a.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
        .is_ok()
}

async fn serve_http(
    s: TcpStream,
    data: Arc<Mutex<Vec<u8>>>,
    objects: Objects,
    etag: Arc<Mutex<String>>,
    faults: Arc<Faults>,
    requests: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut range = None;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h).await?;
            let h = h.trim_end().to_string();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let (n, v) = (n.trim().to_ascii_lowercase(), v.trim().to_string());
                if n == "range" {
                    range = v.strip_prefix("bytes=").and_then(|x| {
                        let (a, b) = x.split_once('-')?;
                        Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?))
                    });
                }
                headers.push((n, v));
            }
        }
        // /redirect/...: a permanent redirect to the image itself, as a CDN
        // or an object store front end would send. Not a range request.
        if line
            .split_whitespace()
            .nth(1)
            .is_some_and(|p| p.starts_with("/redirect"))
        {
            faults.redirects.fetch_add(1, Ordering::SeqCst);
            r.get_mut()
                .write_all(
                    b"HTTP/1.1 302 Found\r\nlocation: /image.raw\r\ncontent-length: 0\r\n\r\n",
                )
                .await?;
            continue;
        }
        requests.fetch_add(1, Ordering::SeqCst);
        let lat = faults.latency_ms.load(Ordering::SeqCst);
        if lat > 0 {
            tokio::time::sleep(Duration::from_millis(lat)).await;
        }
        let target = line.split_whitespace().nth(1).unwrap_or("");
        let other = objects
            .lock()
            .unwrap()
            .iter()
            .find(|(k, _)| target.contains(k.as_str()))
            .map(|(_, b)| b.clone());
        let body = other.unwrap_or_else(|| data.lock().unwrap().clone());
        // The header line, or nothing for an origin without validators.
        let tag = if faults.no_validator.load(Ordering::SeqCst) {
            String::new()
        } else {
            format!("etag: {}\r\n", etag.lock().unwrap())
        };
        let w = r.get_mut();
        let required = faults.require_header.lock().unwrap().clone();
        if let Some((n, v)) = required {
            if !headers
                .iter()
                .any(|(hn, hv)| *hn == n.to_ascii_lowercase() && *hv == v)
            {
                w.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
                    .await?;
                continue;
            }
        }
        let size = body.len() as u64;
        if range.is_some() {
            if take_one(&faults.stall_next) {
                let ms = faults.stall_ms.load(Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if take_one(&faults.reset_next) {
                return Ok(()); // close without a word
            }
            let status = {
                let mut st = faults.status_next.lock().unwrap();
                match st.as_mut() {
                    Some((code, n)) if *n > 0 => {
                        *n -= 1;
                        Some(*code)
                    }
                    _ => None,
                }
            };
            if let Some(code) = status {
                let head = format!("HTTP/1.1 {code} Injected\r\ncontent-length: 0\r\n\r\n");
                w.write_all(head.as_bytes()).await?;
                continue;
            }
        }
        match range {
            Some((a, b)) if !faults.no_range.load(Ordering::SeqCst) && a < size => {
                let b = b.min(size - 1);
                if take_one(&faults.long_body_next) {
                    let extra = (b - a + 1 + 10).min(size - a);
                    let head = format!(
                        "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{b}/{size}\r\n\
                         content-length: {extra}\r\n{tag}\r\n"
                    );
                    w.write_all(head.as_bytes()).await?;
                    w.write_all(&body[a as usize..(a + extra) as usize]).await?;
                    continue;
                }
                if take_one(&faults.fail_next) {
                    w.write_all(b"HTTP/1.1 500 Oops\r\ncontent-length: 0\r\n\r\n")
                        .await?;
                    continue;
                }
                let (ca, cb) = if take_one(&faults.wrong_range_next) {
                    (a + 1, b + 1)
                } else {
                    (a, b)
                };
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {ca}-{cb}/{size}\r\n\
                     content-length: {}\r\n{tag}\r\n",
                    b - a + 1
                );
                w.write_all(head.as_bytes()).await?;
                let part = &body[a as usize..=b as usize];
                if take_one(&faults.truncate_next) {
                    w.write_all(&part[..part.len() / 2]).await?;
                    return Ok(()); // close mid-body
                }
                if take_one(&faults.stall_body_next) {
                    w.write_all(&part[..part.len() / 2]).await?;
                    w.flush().await?;
                    let ms = faults.stall_ms.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    w.write_all(&part[part.len() / 2..]).await?;
                    continue;
                }
                w.write_all(part).await?;
            }
            Some(_) if !faults.no_range.load(Ordering::SeqCst) => {
                let head = format!("HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */{size}\r\ncontent-length: 0\r\n\r\n");
                w.write_all(head.as_bytes()).await?;
            }
            _ => {
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n{tag}\r\n");
                w.write_all(head.as_bytes()).await?;
                w.write_all(&body).await?;
            }
        }
    }
}

pub fn config(origin: &str, cache_dir: &Path, block_size: u64) -> ServeConfig {
    ServeConfig {
        cache_dir: cache_dir.to_path_buf(),
        listen: vec![ListenAddr::Tcp("127.0.0.1:0".into())],
        block_size: Some(BlockSize::new(block_size).unwrap()),
        origin_options: OriginOptions {
            retries: 3,
            request_timeout: Duration::from_secs(5),
            ..OriginOptions::default()
        },
        manifest: Default::default(),
        peers: Default::default(),
        limits: Limits::default(),
        exports: vec![ExportConfig {
            name: "disk".into(),
            image: origin.to_string(),
            writable: false,
            overlay_dir: None,
            description: None,
            hydrate: false,
            format: None,
        }],
        control: None,
        metrics: None,
        cache_size: None,
        // Tests count origin requests: a profile lookup would be one more.
        // Readahead stays on, as in production.
        boot: lazybd::daemon::BootOptions {
            replay_profile: false,
            ..Default::default()
        },
        tls: Default::default(),
    }
}

/// The usual fixture: a test origin serving `img` and a server with one
/// read-only export `disk` over it, on a fresh cache directory.
pub async fn serve_image(
    img: &[u8],
    block_size: u64,
) -> (TestOrigin, tempfile::TempDir, Running, String) {
    let o = TestOrigin::start(img.to_vec()).await;
    let dir = tempfile::tempdir().unwrap();
    let (srv, addr) = start(config(&o.url, dir.path(), block_size)).await;
    (o, dir, srv, addr)
}

/// Stop the server and return the counters of its (single) image.
pub async fn stop(r: Running) -> Arc<lazybd::stats::Stats> {
    r.shutdown()
        .await
        .expect("clean shutdown")
        .into_iter()
        .next()
        .expect("one image")
        .1
}

pub async fn start(cfg: ServeConfig) -> (Running, String) {
    let r = daemon::start(cfg).await.expect("server starts");
    let addr = r.tcp_addrs[0].to_string();
    (r, addr)
}

/// A reply as the test client sees it.
#[derive(Debug, Default)]
pub struct Reply {
    pub error: u32,
    pub data: Vec<u8>,
    /// (offset, len) of hole chunks.
    pub holes: Vec<(u64, u32)>,
    /// Chunk types in order (structured only).
    pub chunks: Vec<u16>,
    /// BLOCK_STATUS descriptors (len, flags).
    pub extents: Vec<(u32, u32)>,
}

/// One structured reply chunk, undecoded.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// One transmission-phase message from the server.
#[derive(Debug)]
pub enum Message {
    Simple { error: u32, cookie: u64 },
    Chunk(Chunk),
}

/// A minimal NBD client over lazybd's wire codec, on a TCP stream or any
/// other byte stream (a TLS session in tests/tls.rs).
pub struct Client<S = TcpStream> {
    pub s: S,
    pub size: u64,
    pub flags: u16,
    pub structured: bool,
    next: u64,
}

pub struct Opts {
    pub structured: bool,
    pub meta: bool,
    pub name: &'static str,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            structured: true,
            meta: true,
            name: "disk",
        }
    }
}

/// Write `msg` and flush it: the server sees it before we wait for an
/// answer, on every kind of stream.
///
/// A write to a TLS stream (tokio-rustls) can return `Ready(n)` with the
/// record still in the TLS layer's buffer: the plaintext was taken and
/// encrypted, and the socket write behind it returned `Pending`. Only a
/// later write or a flush sends it; a read never does. The socket write
/// returns `Pending` not only when the socket is full but whenever the
/// task's cooperative budget (128 I/O operations per poll) is spent, so a
/// client that sends several requests and then only reads keeps the tail
/// of its requests whenever the budget runs out among the sends, and waits
/// for replies the server was never asked for (`within` fails after
/// 20 s; about one run in five of the pipelined TLS test, whose 24 sends
/// are a fifth of the budget). On a plain socket the flush costs nothing.
pub async fn write_flushed<S: AsyncWrite + Unpin>(s: &mut S, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(msg).await?;
    s.flush().await
}

/// Send one option (header and data in one write); an error is returned,
/// not a panic, for tests where the server may already have hung up.
pub async fn try_send_option<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> std::io::Result<()> {
    write_flushed(s, &OptionHeader::message(option, data)).await
}

pub async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, option: u32, data: &[u8]) {
    try_send_option(s, option, data).await.unwrap();
}

/// Read one option reply: (option, type, data).
pub async fn read_option_reply<S: AsyncRead + Unpin>(
    s: &mut S,
) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let magic = s.read_u64().await?;
    assert_eq!(magic, wire::OPT_REPLY_MAGIC);
    let option = s.read_u32().await?;
    let typ = s.read_u32().await?;
    let len = s.read_u32().await?;
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await?;
    Ok((option, typ, d))
}

/// Connect and do the initial greeting; returns the stream ready for options.
pub async fn greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_eq!(s.read_u64().await.unwrap(), wire::NBDMAGIC);
    assert_eq!(s.read_u64().await.unwrap(), wire::IHAVEOPT);
    let hf = s.read_u16().await.unwrap();
    assert_eq!(hf & 3, 3, "fixed newstyle + no zeroes");
    s.write_u32(3).await.unwrap();
    s
}

impl Client {
    pub async fn connect(addr: &str, o: Opts) -> Client {
        Client::go(greet(addr).await, o).await
    }

    /// A client of the export `name`, with the default options.
    pub async fn to_export(addr: &str, name: &'static str) -> Client {
        Client::connect(
            addr,
            Opts {
                name,
                ..Opts::default()
            },
        )
        .await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    /// A client on a stream already in transmission (a hand-made handshake).
    pub fn new(s: S, size: u64, flags: u16, structured: bool) -> Client<S> {
        Client {
            s,
            size,
            flags,
            structured,
            next: 1,
        }
    }

    /// Option haggling on a greeted stream, up to a successful GO.
    pub async fn go(mut s: S, o: Opts) -> Client<S> {
        if o.structured {
            send_option(&mut s, opt::STRUCTURED_REPLY, &[]).await;
            let (_, t, _) = read_option_reply(&mut s).await.unwrap();
            assert_eq!(t, rep::ACK);
        }
        if o.meta {
            let q = MetaContextRequest {
                name: o.name.into(),
                queries: vec!["base:allocation".into()],
            };
            send_option(&mut s, opt::SET_META_CONTEXT, &q.encode()).await;
            loop {
                let (_, t, d) = read_option_reply(&mut s).await.unwrap();
                if t == rep::ACK {
                    break;
                }
                assert_eq!(t, rep::META_CONTEXT);
                assert_eq!(&d[4..], b"base:allocation");
            }
        }
        let go = InfoRequest {
            name: o.name.into(),
            requests: vec![wire::info::BLOCK_SIZE],
        };
        send_option(&mut s, opt::GO, &go.encode()).await;
        let (mut size, mut flags) = (0, 0);
        loop {
            let (_, t, d) = read_option_reply(&mut s).await.unwrap();
            match t {
                rep::ACK => break,
                rep::INFO => {
                    if u16::from_be_bytes([d[0], d[1]]) == wire::info::EXPORT {
                        size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                    }
                }
                t => panic!("GO failed: reply {t:#x} {:?}", String::from_utf8_lossy(&d)),
            }
        }
        Client {
            s,
            size,
            flags,
            structured: o.structured,
            next: 1,
        }
    }

    /// Send a request (flushed, see [`write_flushed`]); returns its cookie.
    pub async fn send(&mut self, typ: u16, flags: u16, offset: u64, len: u32) -> u64 {
        let cookie = self.next;
        self.next += 1;
        let r = Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        };
        write_flushed(&mut self.s, &r.encode()).await.unwrap();
        cookie
    }

    /// Send a request with a cookie of the caller's choosing.
    pub async fn send_cookie(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            typ,
            cookie,
            offset,
            len,
        };
        write_flushed(&mut self.s, &r.encode()).await.unwrap();
    }

    /// Read the next message exactly as sent: a simple reply header (a
    /// READ's data, if any, is left for the caller) or one structured chunk.
    pub async fn recv_message(&mut self) -> std::io::Result<Message> {
        let magic = self.s.read_u32().await?;
        if magic == wire::SIMPLE_REPLY_MAGIC {
            let error = self.s.read_u32().await?;
            let cookie = self.s.read_u64().await?;
            return Ok(Message::Simple { error, cookie });
        }
        assert_eq!(magic, wire::STRUCTURED_REPLY_MAGIC, "reply magic");
        let flags = self.s.read_u16().await?;
        let typ = self.s.read_u16().await?;
        let cookie = self.s.read_u64().await?;
        let len = self.s.read_u32().await?;
        let mut payload = vec![0u8; len as usize];
        self.s.read_exact(&mut payload).await?;
        Ok(Message::Chunk(Chunk {
            flags,
            typ,
            cookie,
            payload,
        }))
    }

    /// Read one complete reply (all chunks of one cookie; assumes replies
    /// of different cookies are not interleaved, true for one request at a time).
    pub async fn recv(&mut self, read_len: Option<u32>) -> std::io::Result<(u64, Reply)> {
        let magic = self.s.read_u32().await?;
        let mut reply = Reply::default();
        if magic == wire::SIMPLE_REPLY_MAGIC {
            reply.error = self.s.read_u32().await?;
            let cookie = self.s.read_u64().await?;
            if reply.error == 0 {
                if let Some(n) = read_len {
                    reply.data = vec![0u8; n as usize];
                    self.s.read_exact(&mut reply.data).await?;
                }
            }
            return Ok((cookie, reply));
        }
        assert_eq!(magic, wire::STRUCTURED_REPLY_MAGIC, "reply magic");
        let mut first = true;
        let mut base = 0u64;
        loop {
            if !first {
                assert_eq!(self.s.read_u32().await?, wire::STRUCTURED_REPLY_MAGIC);
            }
            let flags = self.s.read_u16().await?;
            let typ = self.s.read_u16().await?;
            let cookie = self.s.read_u64().await?;
            let len = self.s.read_u32().await?;
            let mut p = vec![0u8; len as usize];
            self.s.read_exact(&mut p).await?;
            reply.chunks.push(typ);
            match typ {
                chunk::OFFSET_DATA => {
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap());
                    if first {
                        base = off;
                    }
                    reply.data.push_pending(off, &p[8..], &mut base);
                }
                chunk::OFFSET_HOLE => {
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(p[8..12].try_into().unwrap());
                    reply.holes.push((off, n));
                }
                chunk::BLOCK_STATUS => {
                    for d in p[4..].chunks(8) {
                        reply.extents.push((
                            u32::from_be_bytes(d[..4].try_into().unwrap()),
                            u32::from_be_bytes(d[4..].try_into().unwrap()),
                        ));
                    }
                }
                chunk::ERROR | chunk::ERROR_OFFSET => {
                    reply.error = u32::from_be_bytes(p[..4].try_into().unwrap());
                }
                chunk::NONE => {}
                t => panic!("unknown chunk type {t}"),
            }
            first = false;
            if flags & chunk::FLAG_DONE != 0 {
                return Ok((cookie, reply));
            }
        }
    }

    /// READ and reassemble data + holes into bytes.
    pub async fn read(&mut self, offset: u64, len: u32) -> std::io::Result<Reply> {
        let c = self.send(wire::cmd::READ, 0, offset, len).await;
        let (cookie, mut r) = self.recv(Some(len)).await?;
        assert_eq!(cookie, c);
        if self.structured && r.error == 0 {
            r.data = r.data.assemble(offset, len, &r.holes);
        }
        Ok(r)
    }
}

/// The bytes of a structured READ reply of `[offset, offset + len)` that
/// [`Client::recv`] collected (data chunks and holes, in any order).
pub fn assembled(r: &Reply, offset: u64, len: u32) -> Vec<u8> {
    r.data.assemble(offset, len, &r.holes)
}

/// Data chunks are collected as (offset, bytes) records in a flat buffer and
/// assembled at the end, so chunk order does not matter.
trait Pending {
    fn push_pending(&mut self, off: u64, data: &[u8], base: &mut u64);
    fn assemble(&self, offset: u64, len: u32, holes: &[(u64, u32)]) -> Vec<u8>;
}

impl Pending for Vec<u8> {
    fn push_pending(&mut self, off: u64, data: &[u8], _base: &mut u64) {
        self.extend_from_slice(&off.to_be_bytes());
        self.extend_from_slice(&(data.len() as u64).to_be_bytes());
        self.extend_from_slice(data);
    }
    fn assemble(&self, offset: u64, len: u32, holes: &[(u64, u32)]) -> Vec<u8> {
        let mut out = vec![0xEEu8; len as usize];
        let mut covered = 0u64;
        let mut p = 0;
        while p < self.len() {
            let off = u64::from_be_bytes(self[p..p + 8].try_into().unwrap());
            let n = u64::from_be_bytes(self[p + 8..p + 16].try_into().unwrap()) as usize;
            let s = (off - offset) as usize;
            out[s..s + n].copy_from_slice(&self[p + 16..p + 16 + n]);
            covered += n as u64;
            p += 16 + n;
        }
        for &(off, n) in holes {
            let s = (off - offset) as usize;
            out[s..s + n as usize].fill(0);
            covered += n as u64;
        }
        assert_eq!(
            covered, len as u64,
            "chunks must cover the read exactly once"
        );
        out
    }
}

/// Await `f`, failing the test if the server takes more than 20 s.
pub async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("the server did not answer within 20 s")
}

/// The server ends the connection (EOF or reset) within 20 s. Returns what
/// it sent before.
pub async fn closed<S: AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match within(s.read(&mut buf)).await {
            Ok(0) | Err(_) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Spec: strings (names, error messages) are UTF-8 without NUL and MUST be
/// no longer than 4096 bytes.
pub fn check_string(b: &[u8], what: &str) {
    assert!(b.len() <= 4096, "{what}: {} bytes, over 4096", b.len());
    let s = std::str::from_utf8(b).unwrap_or_else(|_| panic!("{what}: not UTF-8"));
    assert!(!s.contains('\0'), "{what}: contains NUL");
}

/// Send one option and read its replies up to the final one (ACK or an
/// error). Checks what every option reply must be: it names the option it
/// answers (spec: fixed newstyle reply format) and error messages are
/// strings.
pub async fn option<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    data: &[u8],
) -> Vec<(u32, Vec<u8>)> {
    send_option(s, option, data).await;
    let mut out = Vec::new();
    loop {
        let (o, t, d) = within(read_option_reply(s)).await.unwrap();
        assert_eq!(o, option, "a reply names the option it answers");
        if t & 0x8000_0000 != 0 {
            check_string(&d, "option error message");
        }
        let last = t == rep::ACK || t & 0x8000_0000 != 0;
        out.push((t, d));
        if last {
            return out;
        }
    }
}
