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
use lazybd::daemon::{self, ExportConfig, ServeConfig};
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
    /// Add, remove or list exports of a running server (control socket).
    #[command(subcommand, after_help = EXPORT_EXAMPLES)]
    Export(ExportCmd),
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
    /// Retries of a failed origin request, with exponential backoff [default: 4].
    #[arg(long)]
    origin_retries: Option<u32>,
    /// PEM file of extra CA certificates to trust for an https:// origin.
    #[arg(long, value_name = "PEM")]
    origin_ca: Option<PathBuf>,
    /// Most simultaneous client connections [default: 1024].
    #[arg(long)]
    max_connections: Option<usize>,
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
        Cmd::Export(c) => export_cmd(c),
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
    let mut headers = Vec::new();
    for h in file.origin.headers.iter().chain(a.headers.iter()) {
        let Some((n, v)) = h.split_once(':') else {
            bail!("header {h:?}: expected 'Name: value'");
        };
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let control = match a.control {
        Some(c) if c == "none" => None,
        Some(c) => Some(PathBuf::from(c)),
        None => Some(
            file.server
                .control
                .clone()
                .unwrap_or_else(|| cache_dir.join("control.sock")),
        ),
    };
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
        },
        limits: Limits {
            max_connections: a
                .max_connections
                .or(file.server.max_connections)
                .unwrap_or(Limits::default().max_connections)
                .max(1),
            ..Limits::default()
        },
        exports,
        control,
        metrics: a.metrics.or(file.server.metrics.clone()),
        cache_size: match a.cache_size.or(file.server.cache_size.clone()) {
            Some(s) => Some(parse_size(&s)?),
            None => None,
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
