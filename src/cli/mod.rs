//! The command line of `lazybd`: the clap types (this file) and one file per
//! subcommand. `main.rs` parses, sets up logging and calls the subcommand's
//! `run`; the library does the work (used as `lazybd::...`).
//!
//! - `mod.rs`      `Cli`, `Cmd`, every subcommand's arguments and help texts
//! - `settings.rs` how `serve` resolves each option: the flag, else the
//!   config file, else the default (one function, unit-tested per option);
//!   the default cache directory and control socket
//! - `serve.rs`    `lazybd serve`: resolve the settings, run the daemon until
//!   SIGTERM/SIGINT
//! - `export.rs`   `lazybd export add|remove|list`: requests to a running
//!   server's control socket
//! - `copy.rs`     `lazybd copy`: a whole image, with a progress bar
//! - `manifest.rs` `lazybd manifest build|show`: an image's per-block digests
//! - `progress.rs` the progress bar (or log lines) of `copy` and `manifest build`
//! - `profile.rs`  `lazybd profile show|export|import|stop`: boot profiles
//! - `cache.rs`    `lazybd cache info|verify`: inspect and check a cache directory
//! - `overlay.rs`  `lazybd overlay check`: verify (and repair) an overlay

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub mod cache;
pub mod copy;
pub mod export;
pub mod manifest;
pub mod overlay;
pub mod profile;
pub mod progress;
pub mod serve;
pub mod settings;

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
  lazybd serve https://images.example/debian-12.raw --writable --name vm1 \\
      --overlay-dir /var/lib/lazybd/vm1

  # TCP and a Unix socket at once, a Glance/Swift token from a file (not the
  # command line, which every user sees); after rotating it: lazybd reload
  printf 'X-Auth-Token: %s\\n' \"$TOKEN\" > /run/lazybd/auth.headers
  lazybd serve https://swift.example/v1/AUTH_x/images/base.raw \\
      --listen 0.0.0.0:10809 --listen unix:/run/lazybd.sock \\
      --header-file /run/lazybd/auth.headers --name base

  # An S3 object (keys from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE
  # or ~/.aws/credentials; anonymous without any); an S3-compatible server
  AWS_REGION=eu-west-1 lazybd serve s3://images/debian-12.raw
  lazybd serve s3://images/debian-12.raw --s3-endpoint http://127.0.0.1:8333

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
pub struct Cli {
    /// Log level: error, warn, info, debug, trace (RUST_LOG overrides).
    #[arg(long, global = true, default_value = "info", env = "LAZYBD_LOG_LEVEL")]
    pub log_level: String,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// Build or show an image's manifest: the SHA-256 of every block, which
    /// servers check each block from the origin (or a peer) against.
    #[command(subcommand, after_help = MANIFEST_EXAMPLES)]
    Manifest(ManifestCmd),
    /// Show, export, import boot profiles; stop a recording.
    #[command(subcommand, after_help = PROFILE_EXAMPLES)]
    Profile(ProfileCmd),
    /// Make a running server re-read its origins' header files
    /// (--header-file) and credentials files (~/.aws/credentials), as
    /// SIGHUP does. Exports and connections are not disturbed; an origin
    /// whose files cannot be read keeps what it had, and the command
    /// exits 1 naming it.
    #[command(after_help = RELOAD_EXAMPLES)]
    Reload {
        #[command(flatten)]
        control: ControlArg,
    },
}

const RELOAD_EXAMPLES: &str = "\
Examples (a token rotated by a sidecar, then picked up):
  printf 'X-Auth-Token: %s\\n' \"$TOKEN\" > /run/lazybd/auth.headers
  lazybd reload                      # or: systemctl reload lazybd (SIGHUP)";

const COPY_EXAMPLES: &str = "\
SOURCE: http://, https://, s3://BUCKET/KEY, swift://CONTAINER/OBJECT, glance://IMAGE_ID,
file:// or a path, nbd://HOST[:PORT]/EXPORT,
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

/// How a one-shot command (`copy`, `manifest build`) reaches an HTTP(S)
/// source; S3 and OpenStack credentials come from their environment.
#[derive(Args)]
pub struct OriginAccess {
    /// Extra HTTP header for the source, 'Name: value'. Repeatable.
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    pub headers: Vec<String>,
    /// File of 'Name: value' lines for the source (as `serve
    /// --header-file`); LAZYBD_HEADERS in the environment is read too.
    #[arg(long = "header-file", value_name = "FILE")]
    pub header_files: Vec<PathBuf>,
    /// PEM file of extra CA certificates for an https:// source.
    #[arg(long, value_name = "PEM")]
    pub origin_ca: Option<PathBuf>,
}

#[derive(Args)]
pub struct CopyArgs {
    /// What to copy: URL, path or NBD URI.
    pub source: String,
    /// Where to: path or NBD URI.
    pub dest: String,
    /// Chunks in flight (parallel requests / NBD connections).
    #[arg(long, short = 'j', default_value_t = 8)]
    pub jobs: usize,
    /// Bytes per request (at most 32M).
    #[arg(long, default_value = "4M", value_name = "SIZE")]
    pub chunk_size: String,
    /// Expected SHA-256 of the image (64 hex digits); a mismatch fails the copy.
    #[arg(long, value_name = "HEX")]
    sha256: Option<String>,
    /// Skip reading each chunk back from DEST to check its CRC32.
    #[arg(long)]
    pub no_verify: bool,
    #[command(flatten)]
    pub access: OriginAccess,
    /// No progress bar even on a terminal (log lines instead).
    #[arg(long)]
    pub no_progress: bool,
}

const MANIFEST_EXAMPLES: &str = "\
A manifest pins an image: its size and validator (ETag) and the SHA-256 of
each block. A server finds it published beside the image (IMAGE.lazybd-manifest)
or is given it (serve --manifest PATH), refuses it if the image has changed
since, and never serves a block that does not match it.

Examples:
  # Build it from the origin and publish it beside the image
  lazybd manifest build https://images.example/base.raw          # writes base.raw.lazybd-manifest
  (upload base.raw.lazybd-manifest next to base.raw on the origin)
  lazybd manifest build s3://images/debian-12.raw -o /srv/manifests/debian-12.lazybd-manifest
  lazybd manifest show base.raw.lazybd-manifest";

#[derive(Subcommand)]
pub enum ManifestCmd {
    /// Read the whole image from its origin and write its manifest.
    Build(ManifestBuildArgs),
    /// Print what a manifest file pins (image, size, validator, blocks).
    Show {
        /// The manifest file.
        file: PathBuf,
    },
}

#[derive(Args)]
pub struct ManifestBuildArgs {
    /// The image: URL (http(s), s3, swift, glance) or path, as served.
    pub origin: String,
    /// Where to write it [default: the image's file name + .lazybd-manifest,
    /// in the current directory].
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Bytes per digest: a power of two from 4K to 16M. Servers fetch whole
    /// manifest blocks, so keep it at their cache block size.
    #[arg(long, default_value = "64K", value_name = "SIZE")]
    pub block_size: String,
    /// Requests in flight.
    #[arg(long, short = 'j', default_value_t = 8)]
    pub jobs: usize,
    #[command(flatten)]
    pub access: OriginAccess,
    /// No progress bar even on a terminal (log lines instead).
    #[arg(long)]
    pub no_progress: bool,
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
pub struct ImageArg {
    /// Cache directory [default: $XDG_CACHE_HOME/lazybd or ~/.cache/lazybd].
    #[arg(long, env = "LAZYBD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The image (URL or path, as served); may be omitted when the cache
    /// holds a single image.
    #[arg(long)]
    pub image: Option<String>,
}

#[derive(Subcommand)]
pub enum ProfileCmd {
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
pub struct ControlArg {
    /// The server's control socket [default: control.sock in $LAZYBD_CACHE_DIR if set, else in the default cache dir].
    #[arg(long, env = "LAZYBD_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
}

#[derive(Subcommand)]
pub enum ExportCmd {
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
        /// The image's format: raw, qcow2 or auto (as `serve --format`).
        #[arg(long, value_name = "raw|qcow2|auto")]
        format: Option<lazybd::format::Format>,
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
pub struct ServeArgs {
    /// The image: http://, https://, s3://BUCKET/KEY, swift://CONTAINER/OBJECT
    /// (ST_AUTH/ST_USER/ST_KEY or OS_* as python-swiftclient takes them),
    /// glance://IMAGE_ID (OS_IMAGE_URL or the Keystone catalog), file:// or a path.
    /// Omitted (and no --config): a built-in 64 MiB sample image (made in
    /// the cache directory).
    pub origin: Option<String>,
    /// TOML file with listeners, cache, origin settings and any number of
    /// exports (see ARCHITECTURE.md / config.rs); flags given here override it.
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where cached blocks live; persistent across restarts
    /// [default: $XDG_CACHE_HOME/lazybd or ~/.cache/lazybd].
    #[arg(long, env = "LAZYBD_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Control socket for `lazybd export add|remove|list` (owner-only);
    /// 'none' disables it [default: CACHE_DIR/control.sock].
    #[arg(long, env = "LAZYBD_CONTROL", value_name = "PATH")]
    pub control: Option<String>,
    /// Listen address: HOST:PORT or unix:PATH. Repeat for several.
    #[arg(long = "listen", short = 'l', value_name = "ADDR")]
    pub listen: Vec<String>,
    /// Export name (also reachable as the empty/default name).
    #[arg(long, default_value = "disk")]
    pub name: String,
    /// Export description shown by `nbdinfo`.
    #[arg(long)]
    pub description: Option<String>,
    /// The image's format: 'raw' (its bytes are the disk), 'qcow2' (serve
    /// the disk a qcow2 image holds, decoded as it is read) or 'auto'
    /// (qcow2 if the image starts like one). Not given: raw, but an image
    /// that starts like qcow2 is refused rather than guessed.
    #[arg(long, value_name = "raw|qcow2|auto")]
    pub format: Option<lazybd::format::Format>,
    /// Cache block size: the unit fetched and tracked (power of two, 4k..16M).
    /// Default 4k for a new cache (a miss still fetches more when reads are
    /// sequential or clustered); an existing cache keeps its own.
    #[arg(long, value_name = "SIZE")]
    pub block_size: Option<String>,
    /// Limit on cached data across all images (e.g. 50G): least recently
    /// used blocks are evicted above 95%, down to 90%. Overlays never count.
    #[arg(long, value_name = "SIZE")]
    pub cache_size: Option<String>,
    /// Serve Prometheus metrics on HOST:PORT (GET /metrics).
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: Option<String>,
    /// Make the export writable: writes, TRIM and WRITE_ZEROES go to a
    /// persistent copy-on-write overlay; the image and cache never change.
    #[arg(long)]
    pub writable: bool,
    /// Overlay directory of a --writable export (default CACHE_DIR/overlays/NAME).
    #[arg(long, value_name = "DIR", requires = "writable")]
    pub overlay_dir: Option<PathBuf>,
    /// Extra HTTP header sent to the origin, 'Name: value'. Repeatable.
    /// Visible to every user in the process list: put secrets (a token) in
    /// --header-file or LAZYBD_HEADERS instead.
    #[arg(long = "header", short = 'H', value_name = "HEADER")]
    pub headers: Vec<String>,
    /// File of 'Name: value' lines (blank lines and # comments skipped)
    /// sent to the origin, re-read on SIGHUP and `lazybd reload`, so a
    /// rotated token is used without a restart. Repeatable. LAZYBD_HEADERS
    /// in the environment holds the same lines (read at start).
    #[arg(long = "header-file", value_name = "FILE")]
    pub header_files: Vec<PathBuf>,
    /// LAZYBD_HEADERS, read by `serve` itself (not a flag: a command line
    /// is what it keeps secrets out of).
    #[arg(skip)]
    pub env_headers: Option<String>,
    /// Most parallel requests to the origin [default: 16].
    #[arg(long)]
    pub origin_connections: Option<usize>,
    /// Deadline for one origin request, body included, in seconds [default: 30]; a request
    /// that receives nothing for 5 s (or this, if shorter) is abandoned and retried.
    #[arg(long)]
    pub origin_timeout: Option<u64>,
    /// Most retries of a failed origin request, with exponential backoff
    /// and jitter [default: as many as --origin-deadline allows].
    #[arg(long)]
    pub origin_retries: Option<u32>,
    /// Seconds one read may keep trying the origin (retries, hedges)
    /// before the client gets EIO [default: 30].
    #[arg(long, value_name = "SECS")]
    pub origin_deadline: Option<u64>,
    /// Send a second copy of an origin request still unanswered after MS
    /// milliseconds: 'auto' (twice the recent p95 latency, plus the body's
    /// time at 100 Mbit/s), 'off', or MS [default: auto].
    #[arg(long, value_name = "MS|auto|off")]
    pub origin_hedge: Option<lazybd::origin::Hedge>,
    /// PEM file of extra CA certificates to trust for an https:// origin.
    #[arg(long, value_name = "PEM")]
    pub origin_ca: Option<PathBuf>,
    /// Send origin requests through this HTTP proxy (a caching proxy, a
    /// P2P engine's proxy); 'none': direct, whatever the environment says.
    /// Every answer is checked as a direct one is [default: [origin] proxy,
    /// else HTTPS_PROXY/HTTP_PROXY/ALL_PROXY by the origin's scheme, with
    /// NO_PROXY honoured].
    #[arg(long, value_name = "URL|none")]
    pub origin_proxy: Option<lazybd::origin::ProxySetting>,
    /// Check every block from the origin against a manifest (`lazybd
    /// manifest build`): 'auto' uses IMAGE.lazybd-manifest when the origin
    /// publishes one beside the image, 'none' checks none, a PATH is used
    /// for the image it was built from. A manifest that is damaged or was
    /// built from another version of the image is refused; a block that
    /// does not match is never served [default: [origin] manifest, else auto].
    #[arg(long, value_name = "auto|none|PATH")]
    pub manifest: Option<lazybd::manifest::ManifestSetting>,
    /// Serve this host's cached images to peers at ADDR (HTTP range
    /// requests, bearer token required) [default: [peers] listen].
    #[arg(long, value_name = "ADDR", help_heading = "Peers")]
    pub peer_listen: Option<String>,
    /// This host's URL in the peers list, when it is not http://ADDR of
    /// --peer-listen (a wildcard address, NAT) [default: [peers] advertise].
    #[arg(long, value_name = "URL", help_heading = "Peers")]
    pub peer_advertise: Option<String>,
    /// Fetch blocks from these peers first (comma-separated base URLs; may
    /// include this host). Each 1 MiB unit of an image has one owner among
    /// them; the others fetch it from the owner, the owner from the origin.
    #[arg(
        long,
        value_name = "URL,...",
        value_delimiter = ',',
        help_heading = "Peers"
    )]
    pub peers: Vec<String>,
    /// A file of peer URLs, one per line, re-read on reload (SIGHUP,
    /// `lazybd reload`) [default: [peers] peers_file].
    #[arg(long, value_name = "FILE", help_heading = "Peers")]
    pub peers_file: Option<PathBuf>,
    /// File holding the token peers share (also LAZYBD_PEER_TOKEN)
    /// [default: [peers] token_file].
    #[arg(long, value_name = "FILE", help_heading = "Peers")]
    pub peer_token_file: Option<PathBuf>,
    /// Use peers also for images without a manifest. Their bytes are then
    /// trusted as if the origin sent them: any peer holding the token can
    /// make this host serve anything. Without it, only images with a
    /// manifest use peers, and every peer byte is checked against it.
    #[arg(long, help_heading = "Peers")]
    pub peer_trust: bool,
    /// Deadline of one peer request in milliseconds; then the origin is
    /// read [default: 5000].
    #[arg(long, value_name = "MS", help_heading = "Peers")]
    pub peer_timeout: Option<u64>,
    /// S3 endpoint of s3:// origins, e.g. http://127.0.0.1:8333 (buckets
    /// path-style there) [default: [s3] endpoint, AWS_ENDPOINT_URL_S3,
    /// AWS_ENDPOINT_URL, the profile's endpoint_url, else AWS's].
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Region of s3:// origins [default: [s3] region, AWS_REGION,
    /// AWS_DEFAULT_REGION, the profile's region, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Profile of ~/.aws/credentials (AWS_SHARED_CREDENTIALS_FILE) and
    /// ~/.aws/config to sign s3:// requests with, over AWS_ACCESS_KEY_ID.
    /// (Keys themselves only from the environment or the config file: a
    /// command line is visible to every user.)
    #[arg(long, value_name = "NAME")]
    pub s3_profile: Option<String>,
    /// Most simultaneous client connections [default: 1024].
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Read-reply bytes all clients together may hold in memory; each
    /// client is also held to 64 MiB. Reads wait while it is spent
    /// [default: 1G; at least 64M].
    #[arg(long, value_name = "SIZE")]
    pub max_buffered: Option<String>,
    /// Drop a client that takes no reply bytes for SECS seconds while
    /// replies wait for it (frees what it held) [default: 120].
    #[arg(long, value_name = "SECS")]
    pub send_timeout: Option<u64>,
    /// Record a boot profile: which blocks each image reads during SECS
    /// seconds after its first read (0: until `lazybd profile stop` or
    /// shutdown). Saved in the image's cache directory; replayed on the
    /// next cold start, or publish it with `lazybd profile export`.
    #[arg(long, value_name = "SECS")]
    pub record_profile: Option<u64>,
    /// Do not replay boot profiles (neither the cache's nor one published
    /// beside the image as IMAGE.lazybd-profile).
    #[arg(long)]
    pub no_profile: bool,
    /// Do not read ahead of sequential streams.
    #[arg(long)]
    pub no_readahead: bool,
    /// Fetch every image's missing blocks in the background until it is
    /// fully cached (resumes after a restart; progress in `cache info`).
    #[arg(long)]
    pub hydrate: bool,
    /// Hydration rate limit in bytes per second (e.g. 100M) [default: none].
    #[arg(long, value_name = "RATE")]
    pub hydrate_rate: Option<String>,
    /// TLS for NBD clients (NBD_OPT_STARTTLS): 'off'; 'on': clients may
    /// upgrade, plaintext is still served; 'require': a client must upgrade
    /// before anything else (qemu: tls-creds=...; nbdinfo: nbds://)
    /// [default: off].
    #[arg(long, value_name = "off|on|require")]
    pub tls: Option<lazybd::tls::TlsMode>,
    /// Directory with server-cert.pem, server-key.pem and (for
    /// --tls-verify-peer) ca-cert.pem: the layout of qemu's tls-creds-x509
    /// and nbdkit's --tls-certificates.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// Accept only clients with a certificate issued by DIR/ca-cert.pem.
    #[arg(long)]
    pub tls_verify_peer: bool,
}

#[derive(Subcommand)]
pub enum CacheCmd {
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
pub enum OverlayCmd {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// clap's own checks of the definitions above (conflicting names,
    /// `requires` naming an argument that exists, ...).
    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
