//! The `lazybd` command: parse arguments, set up logging, call the library.
//! anyhow lives only here; the library has its own error type.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use lazybd::block::{parse_size, BlockSize};
use lazybd::cache::verify;
use lazybd::config::FileConfig;
use lazybd::control;
use lazybd::daemon::{self, BootOptions, ExportConfig, ServeConfig};
use lazybd::origin::OriginOptions;
use lazybd::server::{Limits, ListenAddr};
use lazybd::util::human_bytes;

const ABOUT: &str =
    "Copy-on-demand NBD block server: boot VMs from a remote image without downloading it first.";

const SERVE_EXAMPLES: &str = "\
Examples:
  # Try it: serve the built-in sample image on 127.0.0.1:10809
  lazybd serve
  nbdinfo nbd://127.0.0.1/disk

  # Serve a remote template; qemu reads it lazily
  lazybd serve https://images.example/debian-12.raw --cache-dir /var/cache/lazybd
  qemu-system-x86_64 -drive file=nbd://127.0.0.1:10809/disk,format=raw,if=virtio ...

  # A VM disk: writes go to a persistent copy-on-write overlay
  lazybd serve https://images.example/debian-12.raw --writable --name vm1 \
      --overlay-dir /var/lib/lazybd/vm1

  # TCP and a Unix socket at once, an auth header for Glance/Swift
  lazybd serve https://swift.example/v1/AUTH_x/images/base.raw \\
      --listen 0.0.0.0:10809 --listen unix:/run/lazybd.sock \\
      --header 'X-Auth-Token: $TOKEN' --name base

  # TLS only (certificates as for qemu's tls-creds-x509 / nbdkit)
  lazybd serve IMAGE --tls require --tls-certificates /etc/pki/lazybd
  nbdinfo 'nbds://127.0.0.1/disk?tls-certificates=/etc/pki/qemu'

Reads of blocks not yet cached are fetched with ranged GETs (adjacent blocks
coalesced, concurrent readers of one block share one fetch), stored in
--cache-dir with a CRC32 per 4 KiB page, and served locally from then on,
also after a restart. A changed origin (size, ETag or Last-Modified) gets a
fresh cache. Stop with Ctrl-C or SIGTERM: in-flight requests are answered,
the cache is persisted, counters are logged.";

#[derive(Parser)]
#[command(name = "lazybd", version, about = ABOUT, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info", env = "LAZYBD_LOG_LEVEL")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Export an image over NBD, fetching blocks on demand.
    #[command(after_help = SERVE_EXAMPLES)]
    Serve(Box<ServeArgs>),
    /// Inspect or check a cache directory.
    #[command(subcommand)]
    Cache(CacheCmd),
    /// Add, remove or list exports of a running server (control socket).
    #[command(subcommand, after_help = EXPORT_EXAMPLES)]
    Export(ExportCmd),
    /// Check (and repair) a writable export's overlay directory.
    #[command(subcommand, after_help = OVERLAY_EXAMPLES)]
    Overlay(OverlayCmd),
    /// Copy a whole image (HTTP(S), file or NBD) to a file or an NBD export,
    /// in parallel, verified.
    #[command(after_help = COPY_EXAMPLES)]
    Copy(CopyArgs),
    /// Show, export, import boot profiles; stop a recording.
    #[command(subcommand, after_help = PROFILE_EXAMPLES)]
    Profile(ProfileCmd),
}

const COPY_EXAMPLES: &str = "\
SOURCE: http://, https://, file:// or a path, nbd://HOST[:PORT]/EXPORT,
nbd+unix:///EXPORT?socket=PATH. DEST: a path (created or truncated; a block
device is written in place) or an NBD URI (a writable export at least as
large as the image).

Every chunk's CRC32 is checked against the destination read back after
writing; --sha256 checks the whole image. Holes an NBD source reports are
not read; zero chunks are not written to a new file (it stays sparse).

Examples:
  lazybd copy https://images.example/debian-12.raw /var/lib/images/debian-12.raw \\
      --sha256 5f2c...e1
  lazybd copy nbd://127.0.0.1/disk disk.raw
  lazybd copy base.raw 'nbd+unix:///vm1?socket=/run/lazybd.sock'";

#[derive(Args)]
struct CopyArgs {
    /// What to copy: URL, path or NBD URI.
    source: String,
    /// Where to: path or NBD URI.
    dest: String,
    /// Chunks in flight (parallel requests / NBD connections).
    #[arg(long, short = 'j', default_value_t = 8)]
    jobs: usize,
    /// Bytes per request (at most 32M).
    #[arg(long, default_value = "4M", value_name = "SIZE")]
    chunk_size: String,
    /// Expected SHA-256 of the image (64 hex digits); a mismatch fails the copy.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Skip reading each chunk back from DEST to check its CRC32.
    #[arg(long)]
    no_verify: bool,
    /// Extra HTTP header for the source, 'Name: value'. Repeatable.
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    headers: Vec<String>,
    /// PEM file of extra CA certificates for an https:// source.
    #[arg(long, value_name = "PEM")]
    origin_ca: Option<PathBuf>,
    /// No progress bar even on a terminal (log lines instead).
    #[arg(long)]
    no_progress: bool,
}

const PROFILE_EXAMPLES: &str = "\
A boot profile lists the parts of an image a boot reads, in order. Replayed
on a cold start, they are fetched in parallel before the guest asks.

Examples:
  # Record the first 60 s of reads of each image while a VM boots
  lazybd serve https://images.example/base.raw --record-profile 60
  # ...or until told to stop
  lazybd serve https://images.example/base.raw --record-profile 0
  lazybd profile stop

  # Publish it beside the image: every host's cold start uses it
  lazybd profile export --image https://images.example/base.raw base.raw.lazybd-profile
  (upload base.raw.lazybd-profile next to base.raw on the origin)

  # Or install it into another host's cache
  lazybd profile import --image https://images.example/base.raw base.raw.lazybd-profile";

#[derive(Args)]
struct ImageArg {
    /// Cache directory [default: $XDG_CACHE_HOME/lazybd or ~/.cache/lazybd].
    #[arg(long, env = "LAZYBD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// The image (URL or path, as served); may be omitted when the cache
    /// holds a single image.
    #[arg(long)]
    image: Option<String>,
}

#[derive(Subcommand)]
enum ProfileCmd {
    /// Print an image's profile: ranges in replay order and totals.
    Show {
        #[command(flatten)]
        image: ImageArg,
        /// Print every range, not only the first 20.
        #[arg(long)]
        all: bool,
    },
    /// Write an image's profile to FILE (e.g. to publish it as IMAGE.lazybd-profile).
    Export {
        #[command(flatten)]
        image: ImageArg,
        file: PathBuf,
    },
    /// Install FILE as an image's profile (the image must have been served
    /// once from this cache, so its size is known and checked).
    Import {
        #[command(flatten)]
        image: ImageArg,
        file: PathBuf,
    },
    /// Stop recording now (a server started with --record-profile) and save.
    Stop {
        #[command(flatten)]
        control: ControlArg,
    },
}

const EXPORT_EXAMPLES: &str = "\
Examples (a compute agent attaching a VM disk):
  lazybd export add vm1 --image https://images.example/base.raw --writable
  virsh attach-device vm1 disk-vm1.xml        # <source protocol='nbd' name='vm1'>
  virsh detach-device vm1 disk-vm1.xml
  lazybd export remove vm1 --delete-overlay
  lazybd export list";

#[derive(Args)]
struct ControlArg {
    /// The server's control socket [default: the default cache dir's control.sock].
    #[arg(long, env = "LAZYBD_CONTROL", value_name = "PATH")]
    control: Option<PathBuf>,
}

#[derive(Subcommand)]
enum ExportCmd {
    /// Export an image under a new name. Other exports are not disturbed.
    Add {
        name: String,
        /// The image: URL or path. Exports of one image share its cache.
        #[arg(long)]
        image: String,
        /// Writable, with a persistent copy-on-write overlay.
        #[arg(long)]
        writable: bool,
        /// Overlay directory [default: CACHE_DIR/overlays/NAME].
        #[arg(long, requires = "writable")]
        overlay_dir: Option<PathBuf>,
        /// Fetch the whole image in the background.
        #[arg(long)]
        hydrate: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// Remove an export. Refuses while clients are connected unless --force.
    Remove {
        name: String,
        /// Disconnect connected clients (after their in-flight requests).
        #[arg(long)]
        force: bool,
        /// Also delete the overlay's data (otherwise it stays for re-adding).
        #[arg(long)]
        delete_overlay: bool,
        #[command(flatten)]
        control: ControlArg,
    },
    /// List exports: name, image, writable, clients, bytes in overlay.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        control: ControlArg,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// The image: http://, https://, file:// or a path. Omitted (and no
    /// --config): a built-in 64 MiB sample image (made in the cache directory).
    origin: Option<String>,
    /// TOML file with listeners, cache, origin settings and any number of
    /// exports (see ARCHITECTURE.md / config.rs); flags given here override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where cached blocks live; persistent across restarts
    /// [default: $XDG_CACHE_HOME/lazybd or ~/.cache/lazybd].
    #[arg(long, env = "LAZYBD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Control socket for `lazybd export add|remove|list` (owner-only);
    /// 'none' disables it [default: CACHE_DIR/control.sock].
    #[arg(long, env = "LAZYBD_CONTROL", value_name = "PATH")]
    control: Option<String>,
    /// Listen address: HOST:PORT or unix:PATH. Repeat for several.
    #[arg(long = "listen", short = 'l', value_name = "ADDR")]
    listen: Vec<String>,
    /// Export name (also reachable as the empty/default name).
    #[arg(long, default_value = "disk")]
    name: String,
    /// Export description shown by `nbdinfo`.
    #[arg(long)]
    description: Option<String>,
    /// Cache block size: the unit fetched and tracked (power of two, 4k..16M).
    /// Default 64k for a new cache; an existing cache keeps its own.
    #[arg(long, value_name = "SIZE")]
    block_size: Option<String>,
    /// Limit on cached data across all images (e.g. 50G): least recently
    /// used blocks are evicted above 95%, down to 90%. Overlays never count.
    #[arg(long, value_name = "SIZE")]
    cache_size: Option<String>,
    /// Serve Prometheus metrics on HOST:PORT (GET /metrics).
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// Make the export writable: writes, TRIM and WRITE_ZEROES go to a
    /// persistent copy-on-write overlay; the image and cache never change.
    #[arg(long)]
    writable: bool,
    /// Overlay directory of a --writable export (default CACHE_DIR/overlays/NAME).
    #[arg(long, value_name = "DIR", requires = "writable")]
    overlay_dir: Option<PathBuf>,
    /// Extra HTTP header sent to the origin, 'Name: value'. Repeatable.
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    headers: Vec<String>,
    /// Most parallel requests to the origin [default: 16].
    #[arg(long)]
    origin_connections: Option<usize>,
    /// Deadline for one origin request, in seconds [default: 30].
    #[arg(long)]
    origin_timeout: Option<u64>,
    /// Most retries of a failed origin request, with exponential backoff
    /// and jitter [default: as many as --origin-deadline allows].
    #[arg(long)]
    origin_retries: Option<u32>,
    /// Seconds one read may keep trying the origin (retries, hedges)
    /// before the client gets EIO [default: 30].
    #[arg(long, value_name = "SECS")]
    origin_deadline: Option<u64>,
    /// Send a second copy of an origin request still unanswered after MS
    /// milliseconds: 'auto' (twice the recent p95 latency), 'off', or MS
    /// [default: auto].
    #[arg(long, value_name = "MS|auto|off")]
    origin_hedge: Option<lazybd::origin::Hedge>,
    /// PEM file of extra CA certificates to trust for an https:// origin.
    #[arg(long, value_name = "PEM")]
    origin_ca: Option<PathBuf>,
    /// Most simultaneous client connections [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Read-reply bytes all clients together may hold in memory; each
    /// client is also held to 64 MiB. Reads wait while it is spent
    /// [default: 1G; at least 64M].
    #[arg(long, value_name = "SIZE")]
    max_buffered: Option<String>,
    /// Drop a client that takes no reply bytes for SECS seconds while
    /// replies wait for it (frees what it held) [default: 120].
    #[arg(long, value_name = "SECS")]
    send_timeout: Option<u64>,
    /// Record a boot profile: which blocks each image reads during SECS
    /// seconds after its first read (0: until `lazybd profile stop` or
    /// shutdown). Saved in the image's cache directory; replayed on the
    /// next cold start, or publish it with `lazybd profile export`.
    #[arg(long, value_name = "SECS")]
    record_profile: Option<u64>,
    /// Do not replay boot profiles (neither the cache's nor one published
    /// beside the image as IMAGE.lazybd-profile).
    #[arg(long)]
    no_profile: bool,
    /// Do not read ahead of sequential streams.
    #[arg(long)]
    no_readahead: bool,
    /// Fetch every image's missing blocks in the background until it is
    /// fully cached (resumes after a restart; progress in `cache info`).
    #[arg(long)]
    hydrate: bool,
    /// Hydration rate limit in bytes per second (e.g. 100M) [default: none].
    #[arg(long, value_name = "RATE")]
    hydrate_rate: Option<String>,
    /// TLS for NBD clients (NBD_OPT_STARTTLS): 'off'; 'on': clients may
    /// upgrade, plaintext is still served; 'require': a client must upgrade
    /// before anything else (qemu: tls-creds=...; nbdinfo: nbds://)
    /// [default: off].
    #[arg(long, value_name = "off|on|require")]
    tls: Option<lazybd::tls::TlsMode>,
    /// Directory with server-cert.pem, server-key.pem and (for
    /// --tls-verify-peer) ca-cert.pem: the layout of qemu's tls-creds-x509
    /// and nbdkit's --tls-certificates.
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Accept only clients with a certificate issued by DIR/ca-cert.pem.
    #[arg(long)]
    tls_verify_peer: bool,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cached images: origin, size, block size, blocks present, bytes.
    Info {
        /// Cache directory.
        dir: PathBuf,
    },
    /// Check every CRC of every cached block. Exits 1 if anything is damaged.
    ///
    /// Takes no lock, so it can run beside a server, but then the result is
    /// a snapshot: blocks the server fetches or evicts during the check may
    /// go unchecked or show as damaged.
    Verify {
        /// Cache directory.
        dir: PathBuf,
        /// Mark damaged blocks missing (they are refetched on next read).
        /// Takes each image's lock: refused while a server uses the cache.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand)]
enum OverlayCmd {
    /// Verify every page of an overlay against its CRC; exit 1 if any is
    /// damaged. The overlay must not be in use (its export removed or the
    /// server stopped). A version-1 overlay is migrated first.
    Check {
        /// Overlay directory (default for an export: CACHE_DIR/overlays/NAME).
        dir: PathBuf,
        /// Keep every page that verifies; pages that do not read as zeroes
        /// from then on (their content is lost either way; they are listed).
        #[arg(long)]
        repair: bool,
    },
}

const OVERLAY_EXAMPLES: &str = "Examples:
  lazybd overlay check /var/cache/lazybd/overlays/vm1
  lazybd overlay check --repair /var/cache/lazybd/overlays/vm1";

fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("lazybd");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/lazybd");
    }
    PathBuf::from("/var/cache/lazybd")
}

fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("lazybd={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    let r = match cli.cmd {
        Cmd::Serve(a) => serve(*a),
        Cmd::Cache(CacheCmd::Info { dir }) => cache_info(&dir),
        Cmd::Cache(CacheCmd::Verify { dir, repair }) => cache_verify(&dir, repair),
        Cmd::Export(c) => export_cmd(c),
        Cmd::Overlay(OverlayCmd::Check { dir, repair }) => overlay_check(&dir, repair),
        Cmd::Profile(c) => profile_cmd(c),
        Cmd::Copy(a) => copy_cmd(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lazybd: error: {}", chain(&e));
            ExitCode::from(2)
        }
    }
}

/// The error chain on one line. lazybd's own errors already print their
/// sources, so a cause whose text the line already holds is not repeated.
fn chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn serve(a: ServeArgs) -> anyhow::Result<ExitCode> {
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let cache_dir = a
        .cache_dir
        .or(file.server.cache_dir.clone())
        .unwrap_or_else(default_cache_dir);
    let mut exports: Vec<ExportConfig> = file
        .exports
        .iter()
        .map(|e| ExportConfig {
            name: e.name.clone(),
            image: e.image.clone(),
            writable: e.writable,
            overlay_dir: e.overlay_dir.clone(),
            description: e.description.clone(),
            hydrate: e.hydrate,
        })
        .collect();
    let origin = match a.origin {
        Some(o) => Some(o),
        None if a.config.is_none() => {
            let p = lazybd::sample::ensure(&cache_dir).context("creating the sample image")?;
            tracing::info!(path = %p.display(), "no origin given: serving the built-in sample image");
            Some(p.display().to_string())
        }
        None => None,
    };
    if let Some(image) = origin {
        exports.insert(
            0,
            ExportConfig {
                name: a.name,
                image,
                writable: a.writable,
                overlay_dir: a.overlay_dir,
                description: a.description,
                hydrate: false,
            },
        );
    }
    let mut listen = Vec::new();
    let addrs = if !a.listen.is_empty() {
        a.listen
    } else if !file.server.listen.is_empty() {
        file.server.listen.clone()
    } else {
        vec!["127.0.0.1:10809".to_string()]
    };
    for l in addrs {
        listen.push(l.parse::<ListenAddr>()?);
    }
    let block_size = match a.block_size.or(file.server.block_size.clone()) {
        Some(s) => Some(BlockSize::new(parse_size(&s)?)?),
        None => None,
    };
    let all: Vec<String> = file
        .origin
        .headers
        .iter()
        .chain(a.headers.iter())
        .cloned()
        .collect();
    let headers = parse_headers(&all)?;
    let control = lazybd::config::control_socket(
        a.control.as_deref(),
        file.server.control.as_deref(),
        &cache_dir,
    );
    let defaults = OriginOptions::default();
    let cfg = ServeConfig {
        cache_dir,
        listen,
        block_size,
        origin_options: OriginOptions {
            headers,
            connections: a
                .origin_connections
                .or(file.origin.connections)
                .unwrap_or(defaults.connections)
                .max(1),
            request_timeout: Duration::from_secs(
                a.origin_timeout
                    .or(file.origin.timeout_secs)
                    .unwrap_or(defaults.request_timeout.as_secs())
                    .max(1),
            ),
            retries: a
                .origin_retries
                .or(file.origin.retries)
                .unwrap_or(defaults.retries),
            ca_file: a.origin_ca.or(file.origin.ca_file.clone()),
            deadline: Duration::from_secs(
                a.origin_deadline
                    .or(file.origin.deadline_secs)
                    .unwrap_or(defaults.deadline.as_secs())
                    .max(1),
            ),
            hedge: match (a.origin_hedge, &file.origin.hedge) {
                (Some(h), _) => h,
                (None, Some(h)) => h.parse().map_err(anyhow::Error::msg)?,
                (None, None) => defaults.hedge,
            },
        },
        limits: Limits {
            max_connections: a
                .max_connections
                .or(file.server.max_connections)
                .unwrap_or(Limits::default().max_connections)
                .max(1),
            max_buffered: match a
                .max_buffered
                .as_deref()
                .or(file.server.max_buffered.as_deref())
            {
                Some(v) => lazybd::block::parse_size(v)
                    .map_err(|e| anyhow::anyhow!("max_buffered: {e}"))?,
                None => Limits::default().max_buffered,
            },
            send_timeout: a
                .send_timeout
                .or(file.server.send_timeout_secs)
                .map(|s| Duration::from_secs(s.max(1)))
                .unwrap_or(Limits::default().send_timeout),
            ..Limits::default()
        },
        exports,
        control,
        tls: lazybd::tls::TlsOptions {
            mode: a.tls.or(file.server.tls).unwrap_or_default(),
            certificates: a.tls_certificates.or(file.server.tls_certificates.clone()),
            verify_peer: a.tls_verify_peer || file.server.tls_verify_peer.unwrap_or(false),
        },
        metrics: a.metrics.or(file.server.metrics.clone()),
        cache_size: match a.cache_size.or(file.server.cache_size.clone()) {
            Some(s) => Some(parse_size(&s)?),
            None => None,
        },
        boot: BootOptions {
            record_profile: a
                .record_profile
                .or(file.boot.record_profile)
                .map(|s| (s > 0).then(|| Duration::from_secs(s))),
            replay_profile: !a.no_profile && file.boot.profile.unwrap_or(true),
            readahead: !a.no_readahead && file.boot.readahead.unwrap_or(true),
            hydrate: a.hydrate || file.boot.hydrate.unwrap_or(false),
            hydrate_rate: match a.hydrate_rate.or(file.boot.hydrate_rate.clone()) {
                Some(s) => Some(parse_size(&s).context("--hydrate-rate")?.max(1)),
                None => None,
            },
        },
    };
    if cfg.exports.is_empty() {
        tracing::warn!("no exports configured: add them with `lazybd export add`");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let running = daemon::start(cfg).await?;
        wait_for_signal().await;
        tracing::info!("signal received: stopping (answering in-flight requests)");
        for (image, stats) in running.shutdown().await? {
            tracing::info!(%image, "summary: {stats}");
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

fn export_cmd(c: ExportCmd) -> anyhow::Result<ExitCode> {
    let sock = |c: ControlArg| {
        c.control
            .unwrap_or_else(|| default_cache_dir().join("control.sock"))
    };
    let (path, req) = match c {
        ExportCmd::Add {
            name,
            image,
            writable,
            overlay_dir,
            hydrate,
            control,
        } => (
            sock(control),
            control::Request::Add {
                export: ExportConfig {
                    name,
                    image,
                    writable,
                    overlay_dir,
                    description: None,
                    hydrate,
                },
            },
        ),
        ExportCmd::Remove {
            name,
            force,
            delete_overlay,
            control,
        } => (
            sock(control),
            control::Request::Remove {
                name,
                force,
                delete_overlay,
            },
        ),
        ExportCmd::List { json, control } => {
            let path = sock(control);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let resp = rt.block_on(control::call(&path, &control::Request::List))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&resp.exports)?);
            } else {
                println!(
                    "{:<20} {:<8} {:>7} {:>12}  IMAGE",
                    "NAME", "MODE", "CLIENTS", "OVERLAY"
                );
                for e in resp.exports {
                    let mode = if e.writable { "rw" } else { "ro" };
                    println!(
                        "{:<20} {:<8} {:>7} {:>12}  {}",
                        e.name,
                        mode,
                        e.clients,
                        human_bytes(e.overlay_bytes),
                        e.image
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(control::call(&path, &req))?;
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

fn parse_headers(list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    for h in list {
        let Some((n, v)) = h.split_once(':') else {
            bail!("header {h:?}: expected 'Name: value'");
        };
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Ok(headers)
}

fn copy_cmd(a: CopyArgs) -> anyhow::Result<ExitCode> {
    use lazybd::copy::{self, CopySpec};
    use std::sync::atomic::Ordering::Relaxed;
    let mut spec = CopySpec::new(&a.source, &a.dest);
    spec.jobs = a.jobs.max(1);
    spec.chunk = parse_size(&a.chunk_size)?;
    spec.verify = !a.no_verify;
    spec.sha256 = a.sha256.as_deref().map(copy::parse_sha256).transpose()?;
    spec.origin_options.headers = parse_headers(&a.headers)?;
    spec.origin_options.ca_file = a.origin_ca;
    let bar = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = rt.block_on(async move {
        let task = copy::start(spec);
        let p = task.progress.clone();
        let pb = bar.then(|| {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .expect("valid template"),
            );
            pb
        });
        let ticker = tokio::spawn(async move {
            let mut last_log = std::time::Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let (done, total) = (p.done.load(Relaxed), p.total.load(Relaxed));
                if let Some(pb) = &pb {
                    pb.set_length(total);
                    pb.set_position(done);
                    if total > 0 && done == total {
                        pb.finish();
                        return;
                    }
                } else if last_log.elapsed() >= Duration::from_secs(5) && total > 0 {
                    tracing::info!(
                        "copied {} of {} ({:.1}%)",
                        human_bytes(done),
                        human_bytes(total),
                        100.0 * done as f64 / total as f64
                    );
                    last_log = std::time::Instant::now();
                }
            }
        });
        let r = task.wait().await;
        ticker.abort();
        r
    })?;
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "copied {} ({} zero/holes) in {:.1}s, {}/s; sha256 {}",
        human_bytes(report.bytes),
        human_bytes(report.zero_bytes),
        secs,
        human_bytes((report.bytes as f64 / secs) as u64),
        copy::hex(&report.sha256)
    );
    Ok(ExitCode::SUCCESS)
}

/// The cache directory of `--image` (or the only image) in a cache.
fn image_dir(a: &ImageArg) -> anyhow::Result<(PathBuf, lazybd::cache::dir::Recorded)> {
    let root = a.cache_dir.clone().unwrap_or_else(default_cache_dir);
    let cd = lazybd::cache::CacheDir::new(&root)?;
    let mut found = Vec::new();
    for d in cd.images()? {
        if let Some(r) = lazybd::cache::dir::Recorded::read(&d) {
            found.push((d, r));
        }
    }
    let names = |v: &[(PathBuf, lazybd::cache::dir::Recorded)]| {
        v.iter()
            .map(|(_, r)| r.identity.locator.clone())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &a.image {
        None if found.len() == 1 => Ok(found.remove(0)),
        None if found.is_empty() => bail!("{}: no cached images", root.display()),
        None => bail!(
            "{} holds several images ({}); choose one with --image",
            root.display(),
            names(&found)
        ),
        Some(want) => {
            // As given, or as the server recorded it (file:// + canonical
            // path; a URL's locator, which leaves out signing parameters).
            let canon = std::fs::canonicalize(want)
                .map(|p| format!("file://{}", p.display()))
                .ok()
                .or_else(|| lazybd::origin::http_locator(want))
                .unwrap_or_default();
            let all = names(&found);
            found
                .into_iter()
                .find(|(_, r)| r.identity.locator == *want || r.identity.locator == canon)
                .with_context(|| {
                    format!("{want}: not in cache {} (it holds: {all})", root.display())
                })
        }
    }
}

fn profile_cmd(c: ProfileCmd) -> anyhow::Result<ExitCode> {
    use lazybd::profile::Profile;
    match c {
        ProfileCmd::Show { image, all } => {
            let (dir, rec) = image_dir(&image)?;
            let Some(p) = Profile::load(&dir)? else {
                bail!(
                    "{}: no boot profile (record one with `serve --record-profile`)",
                    rec.identity.locator
                );
            };
            println!("image:   {}", rec.identity.locator);
            println!("profile: {}", dir.join(lazybd::profile::FILE).display());
            println!(
                "ranges:  {} covering {} of {}",
                p.ranges.len(),
                human_bytes(p.bytes()),
                human_bytes(p.image_size)
            );
            let shown = if all { p.ranges.len() } else { 20 };
            for (i, r) in p.ranges.iter().take(shown).enumerate() {
                println!("  {i:>5}  {r}");
            }
            if p.ranges.len() > shown {
                println!("  ... ({} more; --all shows them)", p.ranges.len() - shown);
            }
        }
        ProfileCmd::Export { image, file } => {
            let (dir, rec) = image_dir(&image)?;
            let Some(p) = Profile::load(&dir)? else {
                bail!("{}: no boot profile to export", rec.identity.locator);
            };
            std::fs::write(&file, p.encode())
                .with_context(|| format!("writing {}", file.display()))?;
            println!(
                "{}: {} ranges, {} (publish it beside the image as <image>{})",
                file.display(),
                p.ranges.len(),
                human_bytes(p.bytes()),
                lazybd::profile::SIDECAR_SUFFIX
            );
        }
        ProfileCmd::Import { image, file } => {
            let (dir, rec) = image_dir(&image)?;
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let p = Profile::decode(&bytes).with_context(|| file.display().to_string())?;
            p.check_image(rec.identity.size)?;
            p.save(&dir)?;
            println!(
                "{}: profile installed ({} ranges, {})",
                rec.identity.locator,
                p.ranges.len(),
                human_bytes(p.bytes())
            );
        }
        ProfileCmd::Stop { control } => {
            let path = control
                .control
                .unwrap_or_else(|| default_cache_dir().join("control.sock"));
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(control::call(&path, &control::Request::ProfileStop))?;
            println!("ok: profiles saved");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn cache_info(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let images = verify::info(dir)?;
    if images.is_empty() {
        println!("{}: no cached images", dir.display());
    }
    for i in images {
        let id = &i.recorded.identity;
        let pct = if i.blocks > 0 {
            100.0 * (i.present + i.zero) as f64 / i.blocks as f64
        } else {
            100.0
        };
        println!("image:       {}", id.locator);
        println!("  directory: {}", i.dir.display());
        println!("  size:      {} ({} bytes)", human_bytes(id.size), id.size);
        println!("  validator: {}", id.validator.as_deref().unwrap_or("none"));
        println!("  block:     {}", i.recorded.block_size);
        println!(
            "  blocks:    {} present, {} zero, {} total ({pct:.1}% known)",
            i.present, i.zero, i.blocks
        );
        println!(
            "  cached:    {} ({} on disk)",
            human_bytes(i.cached_bytes),
            human_bytes(i.disk_bytes)
        );
        if let Ok(Some(p)) = lazybd::profile::Profile::load(&i.dir) {
            println!(
                "  profile:   {} ranges, {}",
                p.ranges.len(),
                human_bytes(p.bytes())
            );
        }
        if let Some(h) = lazybd::hydrate::Progress::load(&i.dir) {
            let bs = i.recorded.block_size.bytes();
            let pct = 100.0 * h.done_blocks as f64 / h.total_blocks.max(1) as f64;
            let age = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().saturating_sub(h.updated))
                .unwrap_or(0);
            if h.complete {
                println!("  hydration: complete");
            } else {
                println!(
                    "  hydration: {pct:.1}% ({} of {} blocks, {} of {}), {}/s, ETA {} (as of {age} s ago)",
                    h.done_blocks,
                    h.total_blocks,
                    human_bytes(h.done_blocks * bs),
                    human_bytes(h.total_blocks * bs),
                    human_bytes(h.rate),
                    h.eta_secs
                        .map(|s| format!("{s} s"))
                        .unwrap_or_else(|| "unknown".into())
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn overlay_check(dir: &std::path::Path, repair: bool) -> anyhow::Result<ExitCode> {
    let start = std::time::Instant::now();
    let rep = lazybd::overlay::check_dir(dir, repair)?;
    let list = |v: &[u64]| {
        let shown: Vec<String> = v.iter().take(20).map(|p| (p * 4096).to_string()).collect();
        format!(
            "{}{}",
            shown.join(", "),
            if v.len() > 20 { ", ..." } else { "" }
        )
    };
    if rep.migrated {
        println!("{}: migrated from format version 1", dir.display());
    }
    if !rep.migrate_lost.is_empty() {
        println!(
            "  {} page(s) failed both CRCs and were not kept (now zero), at byte offsets: {}",
            rep.migrate_lost.len(),
            list(&rep.migrate_lost)
        );
    }
    let state = match (rep.bad.is_empty(), rep.repaired) {
        (true, _) => "ok",
        (false, true) => "REPAIRED",
        (false, false) => "DAMAGED",
    };
    println!(
        "{state}: {} — {} data pages ({}) checked, {} damaged ({:.1}s)",
        dir.display(),
        rep.data_pages,
        lazybd::util::human_bytes(rep.data_pages * 4096),
        rep.bad.len(),
        start.elapsed().as_secs_f64()
    );
    if !rep.bad.is_empty() {
        println!(
            "  damaged pages at byte offsets: {}{}",
            list(&rep.bad),
            if rep.repaired {
                " (now zero: their content could not be kept)"
            } else {
                " (run with --repair to keep every other page)"
            }
        );
    }
    Ok(if rep.bad.is_empty() || rep.repaired {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn cache_verify(dir: &std::path::Path, repair: bool) -> anyhow::Result<ExitCode> {
    let cd = lazybd::cache::CacheDir::new(dir)?;
    let images = cd.images()?;
    if images.is_empty() {
        println!("{}: no cached images", dir.display());
    } else if !repair {
        eprintln!(
            "note: {} is read without its lock: if a server is using it, this is a snapshot \
             (blocks fetched or evicted meanwhile may go unchecked or show as damaged); \
             --repair takes the lock",
            dir.display()
        );
    }
    let mut damaged = 0;
    for d in images {
        let start = std::time::Instant::now();
        let mut last = std::time::Instant::now();
        let rep = verify::verify_image(&d, repair, |done, total| {
            if last.elapsed() > Duration::from_secs(2) {
                eprintln!("  {}: {done}/{total} blocks", d.display());
                last = std::time::Instant::now();
            }
        })?;
        let state = if rep.damaged_blocks.is_empty() {
            "ok"
        } else if rep.repaired {
            "REPAIRED"
        } else {
            "DAMAGED"
        };
        println!(
            "{state}: {} — {} blocks checked, {} damaged ({:.1}s)",
            d.display(),
            rep.checked_blocks,
            rep.damaged_blocks.len(),
            start.elapsed().as_secs_f64()
        );
        if !rep.damaged_blocks.is_empty() {
            let shown: Vec<String> = rep
                .damaged_blocks
                .iter()
                .take(20)
                .map(|b| b.to_string())
                .collect();
            println!(
                "  damaged blocks: {}{}",
                shown.join(", "),
                if rep.damaged_blocks.len() > 20 {
                    ", ..."
                } else {
                    ""
                }
            );
            if !rep.repaired {
                damaged += rep.damaged_blocks.len();
            }
        }
    }
    Ok(if damaged > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
