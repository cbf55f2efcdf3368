//! NBD over TLS: the STARTTLS rules of the NBD specification's TLS section
//! for the three modes (off is in tests/protocol.rs), client certificates,
//! and start-up errors for bad certificate files. Certificates are made at
//! test time with the openssl command, as an operator would.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::*;
use lazybd::daemon::{self, Running};
use lazybd::nbd::wire::{self, cmd, errno, opt, rep, tflag, InfoRequest, MetaContextRequest};
use lazybd::server::ListenAddr;
use lazybd::tls::{TlsMode, TlsOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

const MIB: usize = 1 << 20;
const BS: u64 = 64 << 10;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA in `dir` (ca-cert.pem, ca-key.pem) and leaf certificates signed by
/// it: `server-*` for localhost and 127.0.0.1, `client-*` for a client.
fn make_certs(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("ca.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = v3_ca\n\
         [dn]\nCN = lazybd test CA\n\
         [v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n",
    )
    .unwrap();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];
    let mut ca = vec!["req", "-x509", "-new", "-nodes", "-days", "30"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-config",
        "ca.cnf",
    ]);
    openssl(dir, &ca);
    for (who, usage, san) in [
        (
            "server",
            "serverAuth",
            "subjectAltName = DNS:localhost,IP:127.0.0.1\n",
        ),
        ("client", "clientAuth", ""),
    ] {
        let ext = format!(
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = {usage}\n{san}"
        );
        std::fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        let key = format!("{who}-key.pem");
        let csr = format!("{who}.csr");
        let cert = format!("{who}-cert.pem");
        let subj = format!("/CN=lazybd test {who}");
        let mut req = vec!["req", "-new", "-nodes", "-subj", &subj];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr]);
        openssl(dir, &req);
        let extfile = format!("{who}.ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &cert,
                "-extfile",
                &extfile,
            ],
        );
    }
}

fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(&std::fs::read(path).unwrap())
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// A client trusting `dir/ca-cert.pem`, presenting `client/client-*.pem`
/// when given; `versions` limits the TLS versions.
fn connector(
    dir: &Path,
    client: Option<&Path>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for c in pem_certs(&dir.join("ca-cert.pem")) {
        roots.add(c).unwrap();
    }
    let b = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let cfg = match client {
        Some(c) => {
            let chain = pem_certs(&c.join("client-cert.pem"));
            let key = PrivateKeyDer::from_pem_file(c.join("client-key.pem")).unwrap();
            b.with_client_auth_cert(chain, key).unwrap()
        }
        None => b.with_no_client_auth(),
    };
    TlsConnector::from(Arc::new(cfg))
}

fn default_connector(dir: &Path) -> TlsConnector {
    connector(dir, None, rustls::DEFAULT_VERSIONS)
}

/// A server over a 4 MiB image with TLS `mode`.
struct Env {
    _origin: TestOrigin,
    dir: tempfile::TempDir,
    srv: Running,
    addr: String,
    img: Vec<u8>,
}

impl Env {
    async fn start(mode: TlsMode, verify_peer: bool) -> Env {
        let dir = tempfile::tempdir().unwrap();
        make_certs(&dir.path().join("pki"));
        let img = image(4 * MIB, 0x715);
        let origin = TestOrigin::start(img.clone()).await;
        let mut cfg = config(&origin.url, &dir.path().join("cache"), BS);
        cfg.tls = TlsOptions {
            mode,
            certificates: Some(dir.path().join("pki")),
            verify_peer,
        };
        let (srv, addr) = start(cfg).await;
        Env {
            _origin: origin,
            dir,
            srv,
            addr,
            img,
        }
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    /// STARTTLS, ACK, TLS handshake: options go on over TLS.
    async fn starttls(&self, tls: &TlsConnector) -> tokio_rustls::client::TlsStream<TcpStream> {
        let mut s = greet(&self.addr).await;
        assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
        within(tls.connect(ServerName::try_from("localhost").unwrap(), s))
            .await
            .expect("TLS handshake")
    }

    /// A plaintext client and a TLS client are both served (when the mode
    /// allows plaintext).
    async fn others_ok(&self) {
        let t = self.starttls(&default_connector(&self.pki())).await;
        let mut c = within(Client::go(t, Opts::default())).await;
        let r = within(c.read(4096, 4096)).await.unwrap();
        assert!(r.data == self.img[4096..8192]);
    }

    async fn stop(self) {
        self.others_ok().await;
        within(stop(self.srv)).await;
    }
}

/// Send an option, read replies to the final one; returns their types.
async fn option<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, o: u32, data: &[u8]) -> Vec<u32> {
    common::option(s, o, data)
        .await
        .into_iter()
        .map(|(t, _)| t)
        .collect()
}

fn every_option() -> Vec<(u32, Vec<u8>)> {
    let info = InfoRequest {
        name: "disk".into(),
        requests: vec![],
    }
    .encode();
    let meta = MetaContextRequest {
        name: "disk".into(),
        queries: vec!["base:allocation".into()],
    }
    .encode();
    vec![
        (opt::LIST, vec![]),
        (opt::INFO, info.clone()),
        (opt::STRUCTURED_REPLY, vec![]),
        (opt::LIST_META_CONTEXT, meta.clone()),
        (opt::SET_META_CONTEXT, meta),
        (opt::EXTENDED_HEADERS, vec![]),
        (4242, b"junk".to_vec()),
        (opt::GO, info),
    ]
}

/// spec: FORCEDTLS: before TLS every option other than STARTTLS and ABORT,
/// INFO, GO and unsupported ones included, MUST get NBD_REP_ERR_TLS_REQD
/// (and no NBD_REP_INFO); STARTTLS MUST get NBD_REP_ACK, or ERR_INVALID
/// when it carries data; after the ACK everything is over TLS; once TLS is
/// up the server MUST NOT send ERR_TLS_REQD and a second STARTTLS MUST get
/// NBD_REP_ERR_INVALID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_refuses_everything_but_starttls_before_tls() {
    let env = Env::start(TlsMode::Require, false).await;
    let mut s = greet(&env.addr).await;
    for (o, d) in every_option() {
        assert_eq!(
            option(&mut s, o, &d).await,
            vec![rep::ERR_TLS_REQD],
            "option {o}"
        );
    }
    assert_eq!(
        option(&mut s, opt::STARTTLS, b"x").await,
        vec![rep::ERR_INVALID]
    );
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    let mut t = within(
        default_connector(&env.pki()).connect(ServerName::try_from("localhost").unwrap(), s),
    )
    .await
    .unwrap();
    for (o, d) in every_option() {
        if o == opt::GO {
            continue;
        }
        let r = option(&mut t, o, &d).await;
        assert!(
            !r.contains(&rep::ERR_TLS_REQD),
            "option {o} over TLS: {r:?}"
        );
    }
    for d in [&b""[..], b"x"] {
        assert_eq!(
            option(&mut t, opt::STARTTLS, d).await,
            vec![rep::ERR_INVALID]
        );
    }
    // Structured replies and base:allocation were negotiated over TLS above.
    let mut c = within(Client::go(t, Opts::default())).await;
    assert_ne!(c.flags & tflag::SEND_DF, 0);
    let r = c.read(MIB as u64 - 10, 20_000).await.unwrap();
    assert!(r.data == env.img[MIB - 10..MIB + 19_990]);
    c.send(cmd::BLOCK_STATUS, 0, 0, 4 * MIB as u32).await;
    let (_, r) = c.recv(None).await.unwrap();
    assert_eq!(r.error, 0);
    assert!(!r.extents.is_empty());
    env.stop().await;
}

/// spec: FORCEDTLS: NBD_OPT_EXPORT_NAME before TLS cannot be answered with
/// an error, so the server MUST terminate the session; NBD_OPT_ABORT still
/// gets NBD_REP_ACK; and TLS needs fixed newstyle, so a client without
/// NBD_FLAG_C_FIXED_NEWSTYLE cannot be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_ends_plaintext_sessions_that_cannot_be_refused() {
    let env = Env::start(TlsMode::Require, false).await;
    let mut s = greet(&env.addr).await;
    let _ = try_send_option(&mut s, opt::EXPORT_NAME, b"disk").await;
    assert!(closed(&mut s).await.is_empty());
    let mut s = greet(&env.addr).await;
    assert_eq!(option(&mut s, opt::ABORT, &[]).await, vec![rep::ACK]);
    assert!(closed(&mut s).await.is_empty());
    for flags in [0u32, 2] {
        let mut s = TcpStream::connect(&env.addr).await.unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).await.unwrap();
        s.write_u32(flags).await.unwrap();
        // Without fixed newstyle the server may hang up at once (a reset
        // if our bytes are still unread): the write may fail.
        let _ = try_send_option(&mut s, opt::EXPORT_NAME, b"disk").await;
        assert!(closed(&mut s).await.is_empty(), "client flags {flags}");
    }
    env.stop().await;
}

/// spec: SELECTIVETLS (every export available in plaintext): STARTTLS MUST
/// get NBD_REP_ACK before TLS and NBD_REP_ERR_INVALID after; the server
/// MUST NOT send NBD_REP_ERR_TLS_REQD for any option (no export is
/// TLS-only); plaintext and EXPORT_NAME clients are served. A client
/// without fixed newstyle is a NOTLS session: STARTTLS is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_serves_plaintext_and_tls_clients() {
    let env = Env::start(TlsMode::On, false).await;
    let mut s = greet(&env.addr).await;
    for (o, d) in every_option() {
        if o != opt::GO {
            let r = option(&mut s, o, &d).await;
            assert!(!r.contains(&rep::ERR_TLS_REQD), "option {o}: {r:?}");
        }
    }
    let mut c = within(Client::go(s, Opts::default())).await;
    assert!(c.read(0, 65536).await.unwrap().data == env.img[..65536]);
    // The legacy path, in plaintext.
    let addr = env.addr.clone();
    let img = env.img.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let e = nbd::client::handshake(&mut s, b"disk").unwrap();
        let mut c = nbd::client::NbdClient::new(&mut s, &e);
        let mut buf = vec![0u8; 10_000];
        c.read_exact(&mut buf).unwrap();
        assert!(buf == img[..10_000]);
    })
    .await
    .unwrap();
    // Not fixed newstyle (flags 0): no TLS for this session.
    let mut s = TcpStream::connect(&env.addr).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_u32(0).await.unwrap();
    let r = option(&mut s, opt::STARTTLS, &[]).await;
    assert_eq!(r, vec![rep::ERR_POLICY]);
    drop(s);
    // And TLS.
    let mut t = env.starttls(&default_connector(&env.pki())).await;
    assert_eq!(
        option(&mut t, opt::STARTTLS, &[]).await,
        vec![rep::ERR_INVALID]
    );
    let mut c = within(Client::go(t, Opts::default())).await;
    assert!(c.read(MIB as u64, 4096).await.unwrap().data == env.img[MIB..MIB + 4096]);
    env.stop().await;
}

/// spec: NBD_OPT_STARTTLS: when it succeeds the server MUST NOT keep any
/// negotiation state from before (structured replies, metadata contexts):
/// after the upgrade SEND_DF is clear, READ gets simple replies and
/// BLOCK_STATUS has no context.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_forgets_what_was_negotiated_in_plaintext() {
    let env = Env::start(TlsMode::On, false).await;
    let mut s = greet(&env.addr).await;
    assert_eq!(
        option(&mut s, opt::STRUCTURED_REPLY, &[]).await,
        vec![rep::ACK]
    );
    let meta = MetaContextRequest {
        name: "disk".into(),
        queries: vec!["base:allocation".into()],
    };
    let r = option(&mut s, opt::SET_META_CONTEXT, &meta.encode()).await;
    assert_eq!(r, vec![rep::META_CONTEXT, rep::ACK]);
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    let t = within(
        default_connector(&env.pki()).connect(ServerName::try_from("localhost").unwrap(), s),
    )
    .await
    .unwrap();
    let mut c = within(Client::go(
        t,
        Opts {
            structured: false,
            meta: false,
            ..Opts::default()
        },
    ))
    .await;
    assert_eq!(
        c.flags & tflag::SEND_DF,
        0,
        "structured replies carried over"
    );
    let id = c.send(cmd::READ, 0, 0, 100).await;
    match within(c.recv_message()).await.unwrap() {
        Message::Simple { error: 0, cookie } => assert_eq!(cookie, id),
        m => panic!("READ after STARTTLS: {m:?}"),
    }
    let mut d = [0u8; 100];
    c.s.read_exact(&mut d).await.unwrap();
    assert_eq!(d, env.img[..100]);
    c.send(cmd::BLOCK_STATUS, 0, 0, 4096).await;
    let (_, r) = c.recv(None).await.unwrap();
    assert_eq!(r.error, errno::EINVAL, "base:allocation carried over");
    env.stop().await;
}

/// spec: NBD_CMD_DISC: the server MUST shut down the TLS session, then
/// close; likewise after NBD_OPT_ABORT over TLS. The client sees a clean
/// close_notify (rustls reports a TCP close without it as an error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disc_and_abort_close_tls_cleanly() {
    let env = Env::start(TlsMode::Require, false).await;
    let tls = default_connector(&env.pki());
    let t = env.starttls(&tls).await;
    let mut c = within(Client::go(t, Opts::default())).await;
    let id = c.send(cmd::READ, 0, 0, 4096).await;
    c.send(cmd::DISC, 0, 0, 0).await;
    let (cookie, r) = within(c.recv(Some(4096))).await.unwrap();
    assert_eq!((cookie, r.error), (id, 0));
    let mut b = [0u8; 1];
    assert_eq!(within(c.s.read(&mut b)).await.unwrap(), 0, "close_notify");
    let mut t = env.starttls(&tls).await;
    assert_eq!(option(&mut t, opt::ABORT, &[]).await, vec![rep::ACK]);
    assert_eq!(within(t.read(&mut b)).await.unwrap(), 0, "close_notify");
    env.stop().await;
}

/// spec: a failed TLS handshake after the ACK MUST terminate the session
/// (too late for plaintext); other clients are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tls_handshake_ends_only_that_session() {
    let env = Env::start(TlsMode::Require, false).await;
    let mut s = greet(&env.addr).await;
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    // Plaintext where a ClientHello belongs.
    // The server may close (even reset) before all of it is written.
    let _ = try_send_option(&mut s, opt::GO, &[0; 206]).await;
    closed(&mut s).await;
    env.others_ok().await;
    // A client that trusts another CA gives up; the server drops it.
    let other = env.dir.path().join("other");
    make_certs(&other);
    let mut s = greet(&env.addr).await;
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    let r =
        within(default_connector(&other).connect(ServerName::try_from("localhost").unwrap(), s))
            .await;
    assert!(r.is_err(), "the server's certificate is not from that CA");
    env.stop().await;
}

/// Over TLS with `tls`: GO and the first option reply, as an io::Result
/// (a refused client certificate may show at the handshake or at the first
/// read, depending on the TLS version).
async fn try_go(env: &Env, tls: &TlsConnector) -> std::io::Result<u32> {
    let mut s = greet(&env.addr).await;
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    let mut t = tls
        .connect(ServerName::try_from("localhost").unwrap(), s)
        .await?;
    let go = InfoRequest {
        name: "disk".into(),
        requests: vec![],
    }
    .encode();
    t.write_all(
        &wire::OptionHeader {
            option: opt::GO,
            len: go.len() as u32,
        }
        .encode(),
    )
    .await?;
    t.write_all(&go).await?;
    t.flush().await?;
    Ok(within(read_option_reply(&mut t)).await?.1)
}

/// --tls-verify-peer: only clients with a certificate issued by
/// ca-cert.pem are served; no certificate, or one from another CA, ends
/// the session during the TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_peer_requires_a_client_certificate_from_the_ca() {
    let env = Env::start(TlsMode::Require, true).await;
    let pki = env.pki();
    let v = rustls::DEFAULT_VERSIONS;
    assert!(
        try_go(&env, &connector(&pki, None, v)).await.is_err(),
        "no certificate"
    );
    let other = env.dir.path().join("other");
    make_certs(&other);
    // Trusts the right server CA, presents a client certificate of another.
    std::fs::copy(pki.join("ca-cert.pem"), other.join("ca-cert.pem")).unwrap();
    let r = try_go(&env, &connector(&other, Some(&other), v)).await;
    assert!(r.is_err(), "a certificate from another CA: {r:?}");
    let ok = connector(&pki, Some(&pki), v);
    assert_eq!(try_go(&env, &ok).await.unwrap(), rep::INFO);
    let t = env.starttls(&ok).await;
    let mut c = within(Client::go(t, Opts::default())).await;
    assert!(c.read(0, 4096).await.unwrap().data == env.img[..4096]);
    within(stop(env.srv)).await;
}

/// spec: TLS versions: implementations MUST support TLS 1.2 (and SHOULD
/// support later ones).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_and_1_3_both_work() {
    let env = Env::start(TlsMode::Require, false).await;
    for v in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let t = env.starttls(&connector(&env.pki(), None, &[v])).await;
        assert_eq!(t.get_ref().1.protocol_version(), Some(v.version));
        let mut c = within(Client::go(t, Opts::default())).await;
        let r = c.read(MIB as u64 - 3, 7).await.unwrap();
        assert!(r.data == env.img[MIB - 3..MIB + 4]);
    }
    env.stop().await;
}

/// TLS on a Unix socket too (qemu: tls-creds with server.type=unix).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_over_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    make_certs(&dir.path().join("pki"));
    let img = image(2 * MIB, 8);
    let o = TestOrigin::start(img.clone()).await;
    let mut cfg = config(&o.url, &dir.path().join("cache"), BS);
    let sock = dir.path().join("nbd.sock");
    cfg.listen = vec![ListenAddr::Unix(sock.clone())];
    cfg.tls = TlsOptions {
        mode: TlsMode::Require,
        certificates: Some(dir.path().join("pki")),
        verify_peer: false,
    };
    let srv = daemon::start(cfg).await.unwrap();
    let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    s.write_u32(3).await.unwrap();
    assert_eq!(
        option(&mut s, opt::GO, &[0; 6]).await,
        vec![rep::ERR_TLS_REQD]
    );
    assert_eq!(option(&mut s, opt::STARTTLS, &[]).await, vec![rep::ACK]);
    let tls = default_connector(&dir.path().join("pki"));
    let t = within(tls.connect(ServerName::try_from("localhost").unwrap(), s))
        .await
        .unwrap();
    let mut c = within(Client::go(t, Opts::default())).await;
    assert!(c.read(0, 2 * MIB as u32).await.unwrap().data == img);
    drop(c);
    within(stop(srv)).await;
}

/// Bad TLS settings fail the start with a message naming the file (or the
/// missing option), before anything is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificate_files_are_start_up_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    make_certs(&good);
    let o = TestOrigin::start(image(MIB, 1)).await;
    let variant = |name: &str, edit: &dyn Fn(&Path)| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["ca-cert.pem", "server-cert.pem", "server-key.pem"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        edit(&d);
        d
    };
    let cases: Vec<(Option<PathBuf>, bool, &str)> = vec![
        (None, false, "--tls-certificates"),
        (
            Some(dir.path().join("missing")),
            false,
            "missing/server-cert.pem",
        ),
        (
            Some(variant("nokey", &|d| {
                std::fs::remove_file(d.join("server-key.pem")).unwrap()
            })),
            false,
            "nokey/server-key.pem",
        ),
        (
            Some(variant("garbage", &|d| {
                std::fs::write(d.join("server-cert.pem"), "not a certificate\n").unwrap()
            })),
            false,
            "garbage/server-cert.pem",
        ),
        (
            Some(variant("certaskey", &|d| {
                std::fs::copy(d.join("server-cert.pem"), d.join("server-key.pem")).unwrap();
            })),
            false,
            "certaskey/server-key.pem",
        ),
        (
            Some(variant("mismatch", &|d| {
                std::fs::copy(good.join("client-key.pem"), d.join("server-key.pem")).unwrap();
            })),
            false,
            "mismatch/server-key.pem",
        ),
        (
            Some(variant("noca", &|d| {
                std::fs::remove_file(d.join("ca-cert.pem")).unwrap()
            })),
            true,
            "noca/ca-cert.pem",
        ),
    ];
    for (certificates, verify_peer, want) in cases {
        let mut cfg = config(&o.url, &dir.path().join("cache"), BS);
        cfg.tls = TlsOptions {
            mode: TlsMode::On,
            certificates,
            verify_peer,
        };
        let e = daemon::start(cfg).await.err().expect("start must fail");
        assert!(e.to_string().contains(want), "want {want:?} in: {e}");
    }
    // The CA is only needed to verify clients.
    let mut cfg = config(&o.url, &dir.path().join("cache"), BS);
    cfg.tls = TlsOptions {
        mode: TlsMode::On,
        certificates: Some(dir.path().join("noca")),
        verify_peer: false,
    };
    let (srv, _) = start(cfg).await;
    stop(srv).await;
}

/// Many large reads in flight over TLS, the client reading nothing until
/// all are sent: the server's socket fills, so TLS records wait in the TLS
/// layer's buffer and must be flushed as the socket drains. Every byte
/// arrives, in structured and simple replies alike. (qemu-tests t-44 runs
/// nbdcopy over TLS, which caught a loop that did not flush.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_large_reads_over_tls_arrive_whole() {
    let env = Env::start(TlsMode::Require, false).await;
    for structured in [false, true] {
        let t = env.starttls(&default_connector(&env.pki())).await;
        let o = Opts {
            structured,
            meta: structured,
            ..Opts::default()
        };
        let mut c = within(Client::go(t, o)).await;
        let mut want = std::collections::HashMap::new();
        for i in 0..24u64 {
            let off = (i % 3) * MIB as u64 + i * 4096;
            let len = MIB as u32 - 8192;
            want.insert(c.send(cmd::READ, 0, off, len).await, (off, len));
        }
        // Let the server fill the socket and block before anything is read.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        for _ in 0..want.len() {
            let (cookie, r) = within(c.recv(Some(MIB as u32 - 8192))).await.unwrap();
            let (off, len) = want[&cookie];
            assert_eq!(r.error, 0);
            let got = if structured {
                assembled(&r, off, len)
            } else {
                r.data
            };
            assert!(got == env.img[off as usize..off as usize + len as usize]);
        }
    }
    env.stop().await;
}

/// The exact interleaving behind a stall of the test above (about one run
/// in five): the client's task has spent its cooperative budget when it
/// sends, so each socket write returns `Pending` and the TLS layer keeps the
/// encrypted request (its write still reports the bytes as taken). A
/// client that then only reads never sends them; the test client flushes
/// what it sends, and the requests are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_with_the_task_budget_spent_are_answered() {
    let env = Env::start(TlsMode::Require, false).await;
    let t = env.starttls(&default_connector(&env.pki())).await;
    let mut c = within(Client::go(t, Opts::default())).await;
    let img = env.img.clone();
    // A task of its own, on a worker thread, where every poll starts with
    // tokio's full budget (the loop below checks that it spends it).
    let client = tokio::spawn(async move {
        // Spend the budget without yielding: until this task yields, every
        // socket operation returns Pending.
        let mut units = 0;
        while tokio::task::coop::has_budget_remaining() {
            assert!(units < 1000, "the task has a budget to spend");
            tokio::task::consume_budget().await;
            units += 1;
        }
        let mut want = std::collections::HashMap::new();
        for off in [0u64, 8192, 3 * MIB as u64] {
            want.insert(c.send(cmd::READ, 0, off, 4096).await, off);
        }
        for _ in 0..want.len() {
            let (cookie, r) = within(c.recv(Some(4096))).await.unwrap();
            assert_eq!(r.error, 0);
            let off = want.remove(&cookie).expect("a cookie we sent, once");
            let o = off as usize;
            assert!(assembled(&r, off, 4096) == img[o..o + 4096]);
        }
    });
    client.await.unwrap();
    env.stop().await;
}
