//! The `lazybd` command: parse arguments, set up logging, call the library.
//! anyhow lives only here; the library has its own error type.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};

use lazybd::block::{parse_size, BlockSize};
use lazybd::cache::verify;
use lazybd::daemon::{self, ServeConfig};
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
}

#[derive(Args)]
struct ServeArgs {
    /// The image: http://, https://, file:// or a path. Omitted: a built-in
    /// 64 MiB sample image (created in the cache directory).
    origin: Option<String>,
    /// Where cached blocks live; persistent across restarts.
    #[arg(long, env = "LAZYBD_CACHE_DIR", default_value_os_t = default_cache_dir())]
    cache_dir: PathBuf,
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
    /// Most parallel requests to the origin.
    #[arg(long, default_value_t = 16)]
    origin_connections: usize,
    /// Deadline for one origin request, in seconds.
    #[arg(long, default_value_t = 30)]
    origin_timeout: u64,
    /// Retries of a failed origin request (with exponential backoff).
    #[arg(long, default_value_t = 4)]
    origin_retries: u32,
    /// PEM file of extra CA certificates to trust for an https:// origin.
    #[arg(long, value_name = "PEM")]
    origin_ca: Option<PathBuf>,
    /// Most simultaneous client connections.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cached images: origin, size, block size, blocks present, bytes.
    Info {
        /// Cache directory.
        dir: PathBuf,
    },
    /// Check every CRC of every cached block. Exits 1 if anything is damaged.
    Verify {
        /// Cache directory.
        dir: PathBuf,
        /// Mark damaged blocks missing (they are refetched on next read).
        #[arg(long)]
        repair: bool,
    },
}

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
    let origin = match a.origin {
        Some(o) => o,
        None => {
            let p = lazybd::sample::ensure(&a.cache_dir).context("creating the sample image")?;
            tracing::info!(path = %p.display(), "no origin given: serving the built-in sample image");
            p.display().to_string()
        }
    };
    let mut listen = Vec::new();
    for l in if a.listen.is_empty() {
        vec!["127.0.0.1:10809".to_string()]
    } else {
        a.listen
    } {
        listen.push(l.parse::<ListenAddr>()?);
    }
    let block_size = match a.block_size {
        Some(s) => Some(BlockSize::new(parse_size(&s)?)?),
        None => None,
    };
    let mut headers = Vec::new();
    for h in a.headers {
        let Some((n, v)) = h.split_once(':') else {
            bail!("--header {h:?}: expected 'Name: value'");
        };
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let cfg = ServeConfig {
        origin,
        cache_dir: a.cache_dir,
        listen,
        name: a.name,
        description: a.description,
        block_size,
        origin_options: OriginOptions {
            headers,
            connections: a.origin_connections.max(1),
            request_timeout: Duration::from_secs(a.origin_timeout.max(1)),
            retries: a.origin_retries,
            ca_file: a.origin_ca,
        },
        limits: Limits {
            max_connections: a.max_connections.max(1),
            ..Limits::default()
        },
        writable: a.writable,
        overlay_dir: a.overlay_dir,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(async move {
        let running = daemon::start(cfg).await?;
        wait_for_signal().await;
        tracing::info!("signal received: stopping (answering in-flight requests)");
        let stats = running.shutdown().await?;
        tracing::info!("summary: {stats}");
        Ok::<_, anyhow::Error>(())
    })?;
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
    }
    Ok(ExitCode::SUCCESS)
}

fn cache_verify(dir: &std::path::Path, repair: bool) -> anyhow::Result<ExitCode> {
    let cd = lazybd::cache::CacheDir::new(dir)?;
    let images = cd.images()?;
    if images.is_empty() {
        println!("{}: no cached images", dir.display());
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
