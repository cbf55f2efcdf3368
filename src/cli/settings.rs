//! How `lazybd serve` resolves its settings, in one place.
//!
//! Every option that has a flag, a config-file key and a default is chosen
//! by [`pick`] (or [`first`], when its default is "not set"): the flag wins
//! over the config file, the file over the default. A value given as text
//! (a size, a hedge delay) counts only where it is chosen: a bad file value
//! that a flag overrides is no error, and a parse error names the option as
//! it was given (`--block-size: ...`, `config FILE: server.block_size:
//! ...`). [`resolve`] builds the whole
//! [`ServeConfig`] this way; the tests below check the precedence of each
//! option. The defaults are the library's (`OriginOptions`, `Limits`,
//! `BootOptions`, `TlsOptions`); the default cache directory and control
//! socket are defined here, once.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::anyhow;
use lazybd::block::{parse_size, BlockSize};
use lazybd::config::FileConfig;
use lazybd::daemon::{BootOptions, ExportConfig, ServeConfig};
use lazybd::origin::headers::{self, HeaderSource};
use lazybd::origin::{Given, OriginOptions, Region, S3Endpoint, S3Options};
use lazybd::server::{Limits, ListenAddr};
use lazybd::tls::TlsOptions;

use super::ServeArgs;

/// Where `serve` listens without `--listen` or `[server] listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

/// The flag's value, else the config file's: the one precedence rule.
pub fn first<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

/// [`first`], else the default.
pub fn pick<T>(flag: Option<T>, file: Option<T>, default: impl FnOnce() -> T) -> T {
    first(flag, file).unwrap_or_else(default)
}

/// A switch (a flag without a value) as an option: given, it means `value`;
/// absent, it leaves the choice to the file (so a switch can only move a
/// setting one way: `--no-readahead` turns readahead off, nothing turns a
/// file's `readahead = false` back on).
fn switch(given: bool, value: bool) -> Option<bool> {
    given.then_some(value)
}

/// A repeatable flag or a list key: given when not empty.
fn list(v: &[String]) -> Option<&[String]> {
    (!v.is_empty()).then_some(v)
}

/// `$XDG_CACHE_HOME/lazybd`, else `~/.cache/lazybd`, else `/var/cache/lazybd`.
pub fn default_cache_dir() -> PathBuf {
    cache_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// As the XDG base directory specification says, a variable that is empty
/// or holds a relative path counts as unset (else the cache, and the
/// control socket in it, would depend on the working directory).
fn cache_dir_from(xdg_cache_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    let absolute = |v: Option<OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(x) = absolute(xdg_cache_home) {
        return x.join("lazybd");
    }
    if let Some(h) = absolute(home) {
        return h.join(".cache/lazybd");
    }
    PathBuf::from("/var/cache/lazybd")
}

/// The control socket of a server using `cache_dir`, unless told otherwise.
pub fn control_socket_in(cache_dir: &Path) -> PathBuf {
    cache_dir.join("control.sock")
}

/// The control socket `lazybd export ...` and `lazybd profile stop` talk to:
/// `--control` (or `LAZYBD_CONTROL`), else that of a server started in the
/// same environment: in `LAZYBD_CACHE_DIR` when set (as `serve` uses it),
/// else in the default cache dir.
pub fn client_control_socket(flag: Option<PathBuf>) -> PathBuf {
    client_control_from(flag, std::env::var_os("LAZYBD_CACHE_DIR"))
}

fn client_control_from(flag: Option<PathBuf>, env_cache_dir: Option<OsString>) -> PathBuf {
    let env_dir = env_cache_dir.filter(|v| !v.is_empty()).map(PathBuf::from);
    pick(flag, None, || {
        control_socket_in(&env_dir.unwrap_or_else(default_cache_dir))
    })
}

/// The cache directory the `profile` subcommands read: `--cache-dir` (or
/// `LAZYBD_CACHE_DIR`), else the default.
pub fn client_cache_dir(flag: Option<PathBuf>) -> PathBuf {
    pick(flag, None, default_cache_dir)
}

/// `serve`'s control socket: `--control`, else `[server] control`, else
/// `CACHE_DIR/control.sock`; "none" (where it was chosen) turns it off.
fn control_socket(flag: Option<&str>, file: Option<&Path>, cache_dir: &Path) -> Option<PathBuf> {
    let chosen = pick(flag.map(PathBuf::from), file.map(Path::to_path_buf), || {
        control_socket_in(cache_dir)
    });
    (chosen.as_os_str() != "none").then_some(chosen)
}

/// Extra HTTP headers of a one-shot command (`copy`): `--header`s,
/// `LAZYBD_HEADERS` lines (`env`), `--header-file`s.
pub fn header_source(
    flags: &[String],
    env: Option<&str>,
    files: &[PathBuf],
) -> anyhow::Result<HeaderSource> {
    let mut fixed = env_headers(env)?;
    fixed.extend(parse_headers("--header", flags)?);
    Ok(HeaderSource {
        fixed,
        files: files.to_vec(),
    })
}

/// `LAZYBD_HEADERS`: `Name: value` lines, like a header file.
fn env_headers(env: Option<&str>) -> anyhow::Result<Vec<(String, String)>> {
    match env {
        Some(text) => {
            headers::parse_lines(text).map_err(|e| anyhow!("LAZYBD_HEADERS: {}", e.context()))
        }
        None => Ok(Vec::new()),
    }
}

/// `Name: value` entries (the origin's parser): an error names the option
/// `name` and which entry (1 the first), never the entry's text, which may
/// be a secret.
fn parse_headers(name: &str, list: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, h)| {
            headers::parse_line(h).map_err(|e| anyhow!("{name}: entry {}: {}", i + 1, e.context()))
        })
        .collect()
}

/// How errors name a config-file key: `config PATH: section.key`.
fn in_file(config: Option<&Path>, key: &str) -> String {
    match config {
        Some(p) => format!("config {}: {key}", p.display()),
        None => key.to_string(),
    }
}

/// A value given as text, chosen by [`first`] and then parsed. A parse
/// error names the option where the value was chosen: `--flag: ...`, or
/// `config PATH: section.key: ...`.
fn parse_text<T, E: std::fmt::Display>(
    (flag_name, flag): (&str, Option<&str>),
    (key, file): (&str, Option<&str>),
    config: Option<&Path>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> anyhow::Result<Option<T>> {
    let chosen = first(
        flag.map(|v| (flag_name.to_string(), v)),
        file.map(|v| (in_file(config, key), v)),
    );
    let Some((name, text)) = chosen else {
        return Ok(None);
    };
    parse(text).map(Some).map_err(|e| anyhow!("{name}: {e}"))
}

/// [`parse_text`], keeping where the value was chosen (for errors that
/// name the setting to change, e.g. a wrong S3 region).
fn parse_given<T, E: std::fmt::Display>(
    (flag_name, flag): (&str, Option<&str>),
    (key, file): (&str, Option<&str>),
    config: Option<&Path>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> anyhow::Result<Option<Given<T>>> {
    let chosen = first(
        flag.map(|v| (flag_name.to_string(), v)),
        file.map(|v| (in_file(config, key), v)),
    );
    let Some((name, text)) = chosen else {
        return Ok(None);
    };
    match parse(text) {
        Ok(v) => Ok(Some(Given::new(v, name))),
        Err(e) => Err(anyhow!("{name}: {e}")),
    }
}

/// The `s3://` settings: endpoint, region and profile flag > `[s3]` key;
/// keys only from the file (and a `--s3-profile` wins over them, as a flag
/// over the file). The AWS environment is looked at when an S3 origin
/// opens (`origin/aws.rs`), below both.
fn s3_options(a: &ServeArgs, file: &FileConfig) -> anyhow::Result<S3Options> {
    let (s3, cfg) = (&file.s3, a.config.as_deref());
    Ok(S3Options {
        endpoint: parse_given(
            ("--s3-endpoint", a.s3_endpoint.as_deref()),
            ("s3.endpoint", s3.endpoint.as_deref()),
            cfg,
            str::parse::<S3Endpoint>,
        )?,
        region: parse_given(
            ("--s3-region", a.s3_region.as_deref()),
            ("s3.region", s3.region.as_deref()),
            cfg,
            str::parse::<Region>,
        )?,
        profile: parse_given(
            ("--s3-profile", a.s3_profile.as_deref()),
            ("s3.profile", s3.profile.as_deref()),
            cfg,
            |p| Ok::<_, String>(p.to_string()),
        )?,
        keys: match a.s3_profile {
            Some(_) => None,
            None => s3
                .keys()
                .map(|k| Given::new(k, in_file(cfg, "s3.access_key_id"))),
        },
    })
}

/// [`parse_text`] for a list (`--listen`, `--header`): each entry parsed,
/// an error naming the option where the list was chosen.
fn parse_list<T, E: std::fmt::Display>(
    (flag_name, flag): (&str, Option<&[String]>),
    (key, file): (&str, Option<&[String]>),
    config: Option<&Path>,
    parse: impl Fn(&str) -> Result<T, E>,
) -> anyhow::Result<Option<Vec<T>>> {
    let chosen = first(
        flag.map(|v| (flag_name.to_string(), v)),
        file.map(|v| (in_file(config, key), v)),
    );
    let Some((name, list)) = chosen else {
        return Ok(None);
    };
    parse_each(&name, list, parse).map(Some)
}

/// Each entry of a list parsed, an error naming the option `name`.
fn parse_each<T, E: std::fmt::Display>(
    name: &str,
    list: &[String],
    parse: impl Fn(&str) -> Result<T, E>,
) -> anyhow::Result<Vec<T>> {
    list.iter()
        .map(|v| parse(v).map_err(|e| anyhow!("{name}: {e}")))
        .collect()
}

fn secs_at_least_1(s: u64) -> Duration {
    Duration::from_secs(s.max(1))
}

/// The whole configuration of `lazybd serve` from its arguments and the
/// config file (`FileConfig::default()` without `--config`).
///
/// Exports: the command line's (ORIGIN, `--name`, ...) first, then the
/// file's. With neither ORIGIN nor `--config`, ORIGIN is the built-in sample
/// image, which `sample` makes in the resolved cache directory. Headers are
/// not a choice: the file's and then the flags' are all sent.
/// The peer settings: flags over `[peers]`; the token from its file or
/// `LAZYBD_PEER_TOKEN` (never a flag: a command line is visible to all).
fn peer_options(
    a: &ServeArgs,
    f: &lazybd::config::PeersSection,
) -> anyhow::Result<lazybd::peer::PeerOptions> {
    let token_file = first(a.peer_token_file.clone(), f.token_file.clone());
    let token = match &token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| anyhow!("peer token file {}: {e}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("LAZYBD_PEER_TOKEN")
            .ok()
            .filter(|t| !t.is_empty()),
    };
    if token.as_deref() == Some("") {
        anyhow::bail!(
            "peer token file {}: empty",
            token_file.unwrap_or_default().display()
        );
    }
    Ok(lazybd::peer::PeerOptions {
        listen: first(a.peer_listen.clone(), f.listen.clone()),
        advertise: first(a.peer_advertise.clone(), f.advertise.clone()),
        peers: if a.peers.is_empty() {
            f.peers.clone()
        } else {
            a.peers.clone()
        },
        peers_file: first(a.peers_file.clone(), f.peers_file.clone()),
        token,
        trust_unverified: a.peer_trust || f.trust_unverified.unwrap_or(false),
        timeout: std::time::Duration::from_millis(
            pick(a.peer_timeout, f.timeout_ms, || {
                lazybd::peer::DEFAULT_TIMEOUT.as_millis() as u64
            })
            .max(1),
        ),
    })
}

pub fn resolve(
    a: &ServeArgs,
    file: &FileConfig,
    sample: impl FnOnce(&Path) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<ServeConfig> {
    let (server, origin, boot) = (&file.server, &file.origin, &file.boot);
    let cfg = a.config.as_deref();
    let cache_dir = pick(
        a.cache_dir.clone(),
        server.cache_dir.clone(),
        default_cache_dir,
    );

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
            format: e.format,
        })
        .collect();
    let image = match &a.origin {
        Some(o) => Some(o.clone()),
        None if a.config.is_none() => Some(sample(&cache_dir)?.display().to_string()),
        None => None,
    };
    if let Some(image) = image {
        exports.insert(
            0,
            ExportConfig {
                name: a.name.clone(),
                image,
                writable: a.writable,
                overlay_dir: a.overlay_dir.clone(),
                description: a.description.clone(),
                hydrate: false,
                format: a.format,
            },
        );
    }

    let listen = parse_list(
        ("--listen", list(&a.listen)),
        ("server.listen", list(&server.listen)),
        cfg,
        str::parse::<ListenAddr>,
    )?
    .unwrap_or_else(|| vec![ListenAddr::Tcp(DEFAULT_LISTEN.to_string())]);
    let block_size = parse_text(
        ("--block-size", a.block_size.as_deref()),
        ("server.block_size", server.block_size.as_deref()),
        cfg,
        |s| parse_size(s).and_then(BlockSize::new),
    )?;
    // Not a choice: the file's headers, the environment's and the flags'
    // are all sent; header files are re-read on reload.
    let mut fixed = parse_headers(&in_file(cfg, "origin.headers"), &origin.headers)?;
    fixed.extend(env_headers(a.env_headers.as_deref())?);
    fixed.extend(parse_headers("--header", &a.headers)?);
    let mut files: Vec<PathBuf> = origin.header_file.iter().cloned().collect();
    files.extend(a.header_files.iter().cloned());
    let headers = HeaderSource { fixed, files };
    let control = control_socket(a.control.as_deref(), server.control.as_deref(), &cache_dir);

    let od = OriginOptions::default();
    // The flag's value is parsed (and an error reported) by clap.
    let hedge = pick(
        a.origin_hedge.map(Ok),
        origin.hedge.as_deref().map(|h| {
            h.parse()
                .map_err(|e| anyhow!("{}: {e}", in_file(cfg, "origin.hedge")))
        }),
        || Ok(od.hedge),
    )?;
    let origin_options = OriginOptions {
        headers,
        connections: pick(a.origin_connections, origin.connections, || od.connections).max(1),
        request_timeout: pick(
            a.origin_timeout.map(secs_at_least_1),
            origin.timeout_secs.map(secs_at_least_1),
            || od.request_timeout,
        ),
        retries: pick(a.origin_retries, origin.retries, || od.retries),
        ca_file: first(a.origin_ca.clone(), origin.ca_file.clone()),
        deadline: pick(
            a.origin_deadline.map(secs_at_least_1),
            origin.deadline_secs.map(secs_at_least_1),
            || od.deadline,
        ),
        hedge,
        s3: s3_options(a, file)?,
        proxy: pick(
            a.origin_proxy.clone().map(Ok),
            origin.proxy.as_deref().map(|p| {
                p.parse()
                    .map_err(|e| anyhow!("{}: {e}", in_file(cfg, "origin.proxy")))
            }),
            || Ok(od.proxy.clone()),
        )?,
        spool_dir: Some(cache_dir.join("spool")),
    };

    let manifest = pick(
        a.manifest.clone().map(Ok),
        origin.manifest.as_deref().map(|m| {
            m.parse()
                .map_err(|e| anyhow!("{}: {e}", in_file(cfg, "origin.manifest")))
        }),
        || Ok(lazybd::manifest::ManifestSetting::Auto),
    )?;

    let peers = peer_options(a, &file.peers)?;

    let ld = Limits::default();
    let max_buffered = parse_text(
        ("--max-buffered", a.max_buffered.as_deref()),
        ("server.max_buffered", server.max_buffered.as_deref()),
        cfg,
        parse_size,
    )?
    .unwrap_or(ld.max_buffered);
    let limits = Limits {
        max_connections: pick(a.max_connections, server.max_connections, || {
            ld.max_connections
        })
        .max(1),
        max_buffered,
        send_timeout: pick(
            a.send_timeout.map(secs_at_least_1),
            server.send_timeout_secs.map(secs_at_least_1),
            || ld.send_timeout,
        ),
        ..ld
    };

    let td = TlsOptions::default();
    let tls = TlsOptions {
        mode: pick(a.tls, server.tls, || td.mode),
        certificates: first(a.tls_certificates.clone(), server.tls_certificates.clone()),
        verify_peer: pick(
            switch(a.tls_verify_peer, true),
            server.tls_verify_peer,
            || td.verify_peer,
        ),
    };
    let metrics = first(a.metrics.clone(), server.metrics.clone());
    let cache_size = parse_text(
        ("--cache-size", a.cache_size.as_deref()),
        ("server.cache_size", server.cache_size.as_deref()),
        cfg,
        parse_size,
    )?;

    let bd = BootOptions::default();
    let hydrate_rate = parse_text(
        ("--hydrate-rate", a.hydrate_rate.as_deref()),
        ("boot.hydrate_rate", boot.hydrate_rate.as_deref()),
        cfg,
        |s| parse_size(s).map(|r| r.max(1)),
    )?;
    let boot = BootOptions {
        record_profile: match first(a.record_profile, boot.record_profile) {
            Some(s) => Some((s > 0).then(|| Duration::from_secs(s))),
            None => bd.record_profile,
        },
        replay_profile: pick(switch(a.no_profile, false), boot.profile, || {
            bd.replay_profile
        }),
        readahead: pick(switch(a.no_readahead, false), boot.readahead, || {
            bd.readahead
        }),
        hydrate: pick(switch(a.hydrate, true), boot.hydrate, || bd.hydrate),
        hydrate_rate,
    };

    Ok(ServeConfig {
        cache_dir,
        listen,
        block_size,
        origin_options,
        manifest,
        peers,
        limits,
        exports,
        control,
        tls,
        metrics,
        cache_size,
        boot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Cmd};
    use clap::Parser;
    use lazybd::format::Format;
    use lazybd::origin::Hedge;
    use lazybd::tls::TlsMode;
    use std::fmt::Debug;

    const SAMPLE: &str = "/sample/sample.img";

    /// `lazybd serve FLAGS...`, parsed by clap as the command line is.
    /// `LAZYBD_CACHE_DIR` / `LAZYBD_CONTROL` in the environment running
    /// the tests would count as flags: they are dropped unless given here.
    fn args(flags: &[&str]) -> ServeArgs {
        let argv = ["lazybd", "serve"].iter().chain(flags);
        let Cmd::Serve(a) = Cli::try_parse_from(argv).expect("valid flags").cmd else {
            unreachable!("parsed as serve")
        };
        let mut a = *a;
        if !flags.contains(&"--cache-dir") {
            a.cache_dir = None;
        }
        if !flags.contains(&"--control") {
            a.control = None;
        }
        a
    }

    fn file(toml: &str) -> FileConfig {
        FileConfig::parse(toml).expect("valid config")
    }

    fn try_resolve(a: &ServeArgs, f: &FileConfig) -> anyhow::Result<ServeConfig> {
        resolve(a, f, |_| Ok(PathBuf::from(SAMPLE)))
    }

    fn resolved(flags: &[&str], toml: &str) -> ServeConfig {
        try_resolve(&args(flags), &file(toml)).expect("resolves")
    }

    /// The error resolving FLAGS with the config TOML (as if from
    /// `--config lazybd.toml`), on one line as `main` prints it.
    fn error(flags: &[&str], toml: &str) -> String {
        let mut a = args(flags);
        a.config = Some("lazybd.toml".into());
        let e = try_resolve(&a, &file(toml)).expect_err("an error");
        format!("{e:#}")
    }

    /// One option's precedence: FLAGS win over the file TOML, the file
    /// wins over the default, the default holds when neither is given.
    /// The three values must differ, so each rule is really tested.
    fn check<T: PartialEq + Debug>(
        flags: &[&str],
        toml: &str,
        get: impl Fn(&ServeConfig) -> T,
        (from_flag, from_file, default): (T, T, T),
    ) {
        assert!(
            from_flag != from_file && from_file != default && from_flag != default,
            "{flags:?} / {toml:?}: the three values must differ"
        );
        assert_eq!(
            get(&resolved(flags, toml)),
            from_flag,
            "{flags:?} over {toml:?}"
        );
        assert_eq!(get(&resolved(flags, "")), from_flag, "{flags:?} alone");
        assert_eq!(
            get(&resolved(&[], toml)),
            from_file,
            "{toml:?} over the default"
        );
        assert_eq!(get(&resolved(&[], "")), default, "the default");
    }

    /// A switch's precedence: given, FLAG wins over the file's opposite
    /// (TOML_OPPOSITE); the file's non-default value (TOML_OTHER) wins over
    /// the default; the default holds when neither is given.
    fn check_switch(
        flag: &str,
        toml_opposite: &str,
        toml_other: &str,
        get: impl Fn(&ServeConfig) -> bool,
        from_flag: bool,
    ) {
        let default = get(&resolved(&[], ""));
        assert_ne!(from_flag, default, "{flag} must change the default");
        assert_eq!(
            get(&resolved(&[flag], toml_opposite)),
            from_flag,
            "{flag} over {toml_opposite:?}"
        );
        assert_eq!(
            get(&resolved(&[], toml_opposite)),
            !from_flag,
            "{toml_opposite:?}"
        );
        assert_eq!(
            get(&resolved(&[], toml_other)),
            !default,
            "{toml_other:?} over the default"
        );
        assert_eq!(get(&resolved(&[flag], "")), from_flag, "{flag} alone");
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn pick_takes_the_flag_then_the_file_then_the_default() {
        assert_eq!(pick(Some(1), Some(2), || 3), 1);
        assert_eq!(pick(None, Some(2), || 3), 2);
        assert_eq!(pick(None, None, || 3), 3);
        assert_eq!(pick(Some(1), None, || 3), 1);
        assert_eq!(first(Some(1), Some(2)), Some(1));
        assert_eq!(first(None, Some(2)), Some(2));
        assert_eq!(first::<u8>(None, None), None);
        let mut called = false;
        assert_eq!(
            pick(Some(1), None, || {
                called = true;
                3
            }),
            1
        );
        assert!(!called, "the default is only computed when needed");
    }

    #[test]
    fn clients_find_the_control_socket_of_a_server_in_the_same_environment() {
        let flag = Some(PathBuf::from("/run/x.sock"));
        assert_eq!(
            client_control_from(flag, Some("/srv/c".into())),
            PathBuf::from("/run/x.sock"),
            "the flag wins"
        );
        assert_eq!(
            client_control_from(None, Some("/srv/c".into())),
            PathBuf::from("/srv/c/control.sock"),
            "LAZYBD_CACHE_DIR, as serve uses it"
        );
        assert_eq!(
            client_control_from(None, Some("".into())),
            control_socket_in(&default_cache_dir()),
            "empty is unset"
        );
        assert_eq!(
            client_control_from(None, None),
            control_socket_in(&default_cache_dir())
        );
    }

    #[test]
    fn default_cache_dir_follows_xdg_then_home() {
        let os = |s: &str| Some(OsString::from(s));
        assert_eq!(
            cache_dir_from(os("/x"), os("/h")),
            PathBuf::from("/x/lazybd")
        );
        assert_eq!(
            cache_dir_from(None, os("/h")),
            PathBuf::from("/h/.cache/lazybd")
        );
        assert_eq!(
            cache_dir_from(None, None),
            PathBuf::from("/var/cache/lazybd")
        );
        // Empty or relative: as if unset (not a directory in the cwd).
        assert_eq!(
            cache_dir_from(os(""), os("/h")),
            PathBuf::from("/h/.cache/lazybd")
        );
        assert_eq!(
            cache_dir_from(os("cache"), os("/h")),
            PathBuf::from("/h/.cache/lazybd")
        );
        assert_eq!(
            cache_dir_from(os(""), os("")),
            PathBuf::from("/var/cache/lazybd")
        );
        assert_eq!(
            cache_dir_from(None, os("home")),
            PathBuf::from("/var/cache/lazybd")
        );
    }

    #[test]
    fn cache_dir() {
        check(
            &["--cache-dir", "/flag"],
            "[server]\ncache_dir = \"/file\"\n",
            |c| c.cache_dir.clone(),
            ("/flag".into(), "/file".into(), default_cache_dir()),
        );
    }

    #[test]
    fn control_socket_path() {
        check(
            &["--control", "/flag.sock"],
            "[server]\ncontrol = \"/file.sock\"\n",
            |c| c.control.clone(),
            (
                Some("/flag.sock".into()),
                Some("/file.sock".into()),
                Some(control_socket_in(&default_cache_dir())),
            ),
        );
        // The default is in the cache directory chosen, from either place.
        let c = resolved(&["--cache-dir", "/c"], "[server]\ncache_dir = \"/f\"\n");
        assert_eq!(c.control, Some(PathBuf::from("/c/control.sock")));
        let c = resolved(&[], "[server]\ncache_dir = \"/f\"\n");
        assert_eq!(c.control, Some(PathBuf::from("/f/control.sock")));
    }

    #[test]
    fn control_socket_none_is_off_where_it_is_chosen() {
        let none = "[server]\ncontrol = \"none\"\n";
        assert_eq!(resolved(&[], none).control, None);
        assert_eq!(resolved(&["--control", "none"], "").control, None);
        assert_eq!(
            resolved(&["--control", "none"], "[server]\ncontrol = \"/f.sock\"\n").control,
            None
        );
        assert_eq!(
            resolved(&["--control", "/c.sock"], none).control,
            Some(PathBuf::from("/c.sock"))
        );
    }

    #[test]
    fn client_defaults_are_the_default_servers() {
        assert_eq!(
            client_control_socket(None),
            default_cache_dir().join("control.sock")
        );
        assert_eq!(
            client_control_socket(Some("/c.sock".into())),
            PathBuf::from("/c.sock")
        );
        assert_eq!(client_cache_dir(None), default_cache_dir());
        assert_eq!(client_cache_dir(Some("/c".into())), PathBuf::from("/c"));
    }

    #[test]
    fn listen() {
        check(
            &["--listen", "127.0.0.1:1", "-l", "unix:/flag.sock"],
            "[server]\nlisten = [\"127.0.0.1:2\"]\n",
            |c| c.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
            (
                vec!["127.0.0.1:1".into(), "unix:/flag.sock".into()],
                vec!["127.0.0.1:2".into()],
                vec![DEFAULT_LISTEN.to_string()],
            ),
        );
        // An empty list in the file is no choice.
        assert_eq!(resolved(&[], "[server]\nlisten = []\n").listen.len(), 1);
        let e = error(&["--listen", "127.0.0.1:1", "--listen", "nowhere"], "");
        assert_eq!(
            e,
            "--listen: listen address \"nowhere\": use HOST:PORT or unix:PATH"
        );
        let e = error(&[], "[server]\nlisten = [\"unix:\"]\n");
        assert_eq!(
            e,
            "config lazybd.toml: server.listen: unix: needs a socket path"
        );
        // A bad file value the flag overrides is not looked at.
        resolved(
            &["--listen", "127.0.0.1:1"],
            "[server]\nlisten = [\"nowhere\"]\n",
        );
    }

    #[test]
    fn block_size() {
        check(
            &["--block-size", "1M"],
            "[server]\nblock_size = \"4k\"\n",
            |c| c.block_size.map(|b| b.bytes()),
            (Some(1 << 20), Some(4096), None),
        );
        let e = error(&["--block-size", "12q"], "");
        assert_eq!(
            e,
            "--block-size: invalid size unit in \"12q\" (use k, M, G or T)"
        );
        let e = error(&[], "[server]\nblock_size = \"3000\"\n");
        assert!(
            e.starts_with("config lazybd.toml: server.block_size: block size 3000 must be"),
            "{e}"
        );
        resolved(&["--block-size", "64k"], "[server]\nblock_size = \"x\"\n");
    }

    #[test]
    fn cache_size() {
        check(
            &["--cache-size", "50G"],
            "[server]\ncache_size = \"10G\"\n",
            |c| c.cache_size,
            (Some(50 << 30), Some(10 << 30), None),
        );
        let e = error(&[], "[server]\ncache_size = \"lots\"\n");
        assert_eq!(
            e,
            "config lazybd.toml: server.cache_size: invalid size \"lots\""
        );
        resolved(&["--cache-size", "1G"], "[server]\ncache_size = \"lots\"\n");
    }

    #[test]
    fn metrics() {
        check(
            &["--metrics", "127.0.0.1:1"],
            "[server]\nmetrics = \"127.0.0.1:2\"\n",
            |c| c.metrics.clone(),
            (Some("127.0.0.1:1".into()), Some("127.0.0.1:2".into()), None),
        );
    }

    #[test]
    fn origin_connections() {
        check(
            &["--origin-connections", "4"],
            "[origin]\nconnections = 8\n",
            |c| c.origin_options.connections,
            (4, 8, OriginOptions::default().connections),
        );
        assert_eq!(
            resolved(&["--origin-connections", "0"], "")
                .origin_options
                .connections,
            1
        );
        assert_eq!(
            resolved(&[], "[origin]\nconnections = 0\n")
                .origin_options
                .connections,
            1
        );
    }

    #[test]
    fn origin_timeout() {
        check(
            &["--origin-timeout", "5"],
            "[origin]\ntimeout_secs = 10\n",
            |c| c.origin_options.request_timeout,
            (secs(5), secs(10), OriginOptions::default().request_timeout),
        );
        assert_eq!(
            resolved(&["--origin-timeout", "0"], "")
                .origin_options
                .request_timeout,
            secs(1)
        );
        assert_eq!(
            resolved(&[], "[origin]\ntimeout_secs = 0\n")
                .origin_options
                .request_timeout,
            secs(1)
        );
    }

    #[test]
    fn origin_retries() {
        check(
            &["--origin-retries", "1"],
            "[origin]\nretries = 2\n",
            |c| c.origin_options.retries,
            (1, 2, OriginOptions::default().retries),
        );
        assert_eq!(
            resolved(&["--origin-retries", "0"], "[origin]\nretries = 2\n")
                .origin_options
                .retries,
            0
        );
    }

    #[test]
    fn origin_deadline() {
        check(
            &["--origin-deadline", "7"],
            "[origin]\ndeadline_secs = 9\n",
            |c| c.origin_options.deadline,
            (secs(7), secs(9), OriginOptions::default().deadline),
        );
        assert_eq!(
            resolved(&["--origin-deadline", "0"], "")
                .origin_options
                .deadline,
            secs(1)
        );
    }

    #[test]
    fn origin_hedge() {
        check(
            &["--origin-hedge", "200"],
            "[origin]\nhedge = \"off\"\n",
            |c| c.origin_options.hedge,
            (
                Hedge::After(Duration::from_millis(200)),
                Hedge::Off,
                Hedge::Auto,
            ),
        );
        assert_eq!(
            resolved(&["--origin-hedge", "off"], "[origin]\nhedge = \"auto\"\n")
                .origin_options
                .hedge,
            Hedge::Off
        );
        let e = error(&[], "[origin]\nhedge = \"soon\"\n");
        assert_eq!(
            e,
            "config lazybd.toml: origin.hedge: \"soon\": expected auto, off or milliseconds"
        );
        resolved(&["--origin-hedge", "auto"], "[origin]\nhedge = \"soon\"\n");
        // The flag's value is checked by clap, naming the flag.
        let e = Cli::try_parse_from(["lazybd", "serve", "--origin-hedge", "soon"])
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("--origin-hedge"), "{e}");
    }

    #[test]
    fn origin_ca() {
        check(
            &["--origin-ca", "/flag.pem"],
            "[origin]\nca_file = \"/file.pem\"\n",
            |c| c.origin_options.ca_file.clone(),
            (Some("/flag.pem".into()), Some("/file.pem".into()), None),
        );
    }

    #[test]
    fn origin_proxy_flag_then_file_then_environment() {
        use lazybd::origin::ProxySetting;
        let url = |s: &str| ProxySetting::Url(s.to_string());
        check(
            &["--origin-proxy", "http://p1:3128"],
            "[origin]\nproxy = \"http://p2:3128\"\n",
            |c| c.origin_options.proxy.clone(),
            (
                url("http://p1:3128"),
                url("http://p2:3128"),
                ProxySetting::FromEnv,
            ),
        );
        assert_eq!(
            resolved(&["--origin-proxy", "none"], "")
                .origin_options
                .proxy,
            ProxySetting::Off
        );
        let e = error(&[], "[origin]\nproxy = \"ftp://u:secret@p\"\n");
        assert!(e.starts_with("config lazybd.toml: origin.proxy: "), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(Cli::try_parse_from(["lazybd", "serve", "--origin-proxy", "p:3128"]).is_err());
    }

    #[test]
    fn origin_headers_from_both_places() {
        let c = resolved(
            &["-H", "B: 2", "--header", "C:3"],
            "[origin]\nheaders = [\"A: 1\"]\n",
        );
        let pair = |n: &str, v: &str| (n.to_string(), v.to_string());
        assert_eq!(
            c.origin_options.headers.fixed,
            vec![pair("A", "1"), pair("B", "2"), pair("C", "3")]
        );
        assert!(c.origin_options.headers.files.is_empty());
        // Files and the environment count too (LAZYBD_HEADERS before flags).
        let mut a = args(&["-H", "B: 2", "--header-file", "/run/h1"]);
        a.env_headers = Some("# from the unit\nE: 5\n".into());
        a.config = Some("c.toml".into());
        let c = try_resolve(&a, &file("[origin]\nheader_file = \"/etc/h0\"\n")).unwrap();
        assert_eq!(
            c.origin_options.headers.fixed,
            vec![pair("E", "5"), pair("B", "2")]
        );
        assert_eq!(
            c.origin_options.headers.files,
            vec![PathBuf::from("/etc/h0"), PathBuf::from("/run/h1")]
        );
        a.env_headers = Some("E 5".into());
        let e = try_resolve(&a, &file("")).unwrap_err().to_string();
        assert_eq!(
            e,
            "LAZYBD_HEADERS: line 1: expected 'Name: value' (no ':' found)"
        );
        assert!(resolved(&[], "").origin_options.headers.is_empty());
        // Which entry, never its text (it may be a token).
        let e = error(&["-H", "A: 1", "-H", "nocolon"], "");
        assert_eq!(
            e,
            "--header: entry 2: expected 'Name: value' (no ':' found)"
        );
        let e = error(&[], "[origin]\nheaders = [\"bad\"]\n");
        assert_eq!(
            e,
            "config lazybd.toml: origin.headers: entry 1: expected 'Name: value' (no ':' found)"
        );
    }

    #[test]
    fn s3_endpoint_region_profile() {
        let given = |c: &ServeConfig| {
            let s = &c.origin_options.s3;
            (
                s.endpoint
                    .as_ref()
                    .map(|g| (g.value.url().to_string(), g.from.clone())),
                s.region
                    .as_ref()
                    .map(|g| (g.value.as_str().to_string(), g.from.clone())),
                s.profile
                    .as_ref()
                    .map(|g| (g.value.clone(), g.from.clone())),
            )
        };
        let flags = [
            "--s3-endpoint",
            "http://127.0.0.1:1",
            "--s3-region",
            "eu-west-1",
            "--s3-profile",
            "f",
        ];
        let toml = "[s3]\nendpoint = \"http://h:2/\"\nregion = \"us-west-2\"\nprofile = \"p\"\n";
        let pair = |v: &str, from: &str| Some((v.to_string(), from.to_string()));
        check(
            &flags,
            toml,
            given,
            (
                (
                    pair("http://127.0.0.1:1/", "--s3-endpoint"),
                    pair("eu-west-1", "--s3-region"),
                    pair("f", "--s3-profile"),
                ),
                (
                    pair("http://h:2/", "s3.endpoint"),
                    pair("us-west-2", "s3.region"),
                    pair("p", "s3.profile"),
                ),
                (None, None, None),
            ),
        );
        let e = error(&["--s3-region", "EU"], "");
        assert!(e.starts_with("--s3-region: region \"EU\""), "{e}");
        let e = error(&[], "[s3]\nendpoint = \"ftp://x\"\n");
        assert!(
            e.starts_with("config lazybd.toml: s3.endpoint: endpoint \"ftp://x\""),
            "{e}"
        );
        resolved(
            &["--s3-endpoint", "http://h"],
            "[s3]\nendpoint = \"ftp://x\"\n",
        );
    }

    #[test]
    fn s3_keys_from_the_file_unless_a_profile_flag() {
        let toml = "[s3]\naccess_key_id = \"AK\"\nsecret_access_key = \"SK\"\n";
        let keys = |c: &ServeConfig| {
            c.origin_options
                .s3
                .keys
                .as_ref()
                .map(|g| (g.value.access_key_id.clone(), g.from.clone()))
        };
        assert_eq!(
            keys(&resolved(&[], toml)),
            Some(("AK".into(), "s3.access_key_id".into()))
        );
        // The flag's profile wins over the file's keys.
        let c = resolved(&["--s3-profile", "ci"], toml);
        assert_eq!(keys(&c), None);
        assert_eq!(c.origin_options.s3.profile.as_ref().unwrap().value, "ci");
        assert_eq!(keys(&resolved(&[], "")), None);
        // Secrets are never shown, also not in the whole config's Debug.
        let shown = format!("{:?}", resolved(&[], toml));
        assert!(!shown.contains("\"SK\""), "{shown}");
    }

    #[test]
    fn max_connections() {
        check(
            &["--max-connections", "10"],
            "[server]\nmax_connections = 20\n",
            |c| c.limits.max_connections,
            (10, 20, Limits::default().max_connections),
        );
        assert_eq!(
            resolved(&["--max-connections", "0"], "")
                .limits
                .max_connections,
            1
        );
    }

    #[test]
    fn max_buffered() {
        check(
            &["--max-buffered", "2G"],
            "[server]\nmax_buffered = \"512M\"\n",
            |c| c.limits.max_buffered,
            (2 << 30, 512 << 20, Limits::default().max_buffered),
        );
        let e = error(&["--max-buffered", "much"], "");
        assert_eq!(e, "--max-buffered: invalid size \"much\"");
        let e = error(&[], "[server]\nmax_buffered = \"much\"\n");
        assert_eq!(
            e,
            "config lazybd.toml: server.max_buffered: invalid size \"much\""
        );
        resolved(
            &["--max-buffered", "1G"],
            "[server]\nmax_buffered = \"much\"\n",
        );
    }

    #[test]
    fn send_timeout() {
        check(
            &["--send-timeout", "30"],
            "[server]\nsend_timeout_secs = 60\n",
            |c| c.limits.send_timeout,
            (secs(30), secs(60), Limits::default().send_timeout),
        );
        assert_eq!(
            resolved(&["--send-timeout", "0"], "").limits.send_timeout,
            secs(1)
        );
        // What no option sets stays the library's.
        assert_eq!(
            resolved(&[], "").limits.handshake_timeout,
            Limits::default().handshake_timeout
        );
    }

    #[test]
    fn tls_mode() {
        check(
            &["--tls", "require"],
            "[server]\ntls = \"on\"\n",
            |c| c.tls.mode,
            (TlsMode::Require, TlsMode::On, TlsMode::Off),
        );
        assert_eq!(
            resolved(&["--tls", "off"], "[server]\ntls = \"on\"\n")
                .tls
                .mode,
            TlsMode::Off
        );
    }

    #[test]
    fn tls_certificates() {
        check(
            &["--tls-certificates", "/flag"],
            "[server]\ntls_certificates = \"/file\"\n",
            |c| c.tls.certificates.clone(),
            (Some("/flag".into()), Some("/file".into()), None),
        );
    }

    #[test]
    fn tls_verify_peer() {
        check_switch(
            "--tls-verify-peer",
            "[server]\ntls_verify_peer = false\n",
            "[server]\ntls_verify_peer = true\n",
            |c| c.tls.verify_peer,
            true,
        );
    }

    #[test]
    fn record_profile() {
        check(
            &["--record-profile", "60"],
            "[boot]\nrecord_profile = 0\n",
            |c| c.boot.record_profile,
            (Some(Some(secs(60))), Some(None), None),
        );
        assert_eq!(
            resolved(&["--record-profile", "0"], "[boot]\nrecord_profile = 30\n")
                .boot
                .record_profile,
            Some(None)
        );
    }

    #[test]
    fn replay_profile() {
        check_switch(
            "--no-profile",
            "[boot]\nprofile = true\n",
            "[boot]\nprofile = false\n",
            |c| c.boot.replay_profile,
            false,
        );
    }

    #[test]
    fn readahead() {
        check_switch(
            "--no-readahead",
            "[boot]\nreadahead = true\n",
            "[boot]\nreadahead = false\n",
            |c| c.boot.readahead,
            false,
        );
    }

    #[test]
    fn hydrate() {
        check_switch(
            "--hydrate",
            "[boot]\nhydrate = false\n",
            "[boot]\nhydrate = true\n",
            |c| c.boot.hydrate,
            true,
        );
    }

    #[test]
    fn hydrate_rate() {
        check(
            &["--hydrate-rate", "100M"],
            "[boot]\nhydrate_rate = \"200M\"\n",
            |c| c.boot.hydrate_rate,
            (Some(100 << 20), Some(200 << 20), None),
        );
        assert_eq!(
            resolved(&["--hydrate-rate", "0"], "").boot.hydrate_rate,
            Some(1)
        );
        let e = error(&["--hydrate-rate", "fast"], "");
        assert_eq!(e, "--hydrate-rate: invalid size \"fast\"");
        let e = error(&[], "[boot]\nhydrate_rate = \"fast\"\n");
        assert_eq!(
            e,
            "config lazybd.toml: boot.hydrate_rate: invalid size \"fast\""
        );
        resolved(
            &["--hydrate-rate", "1M"],
            "[boot]\nhydrate_rate = \"fast\"\n",
        );
    }

    /// Every option given as text names itself in a parse error, as it was
    /// chosen: the flag, or the config file and key. (Values clap or the
    /// TOML parser read are named by them: numbers, `--tls`, `tls`, ...)
    #[test]
    fn parse_errors_name_the_option_where_it_was_chosen() {
        let cases = [
            (
                "--listen",
                "nowhere",
                "server.listen",
                "listen = [\"nowhere\"]",
            ),
            (
                "--block-size",
                "3000",
                "server.block_size",
                "block_size = \"x\"",
            ),
            (
                "--cache-size",
                "x",
                "server.cache_size",
                "cache_size = \"x\"",
            ),
            (
                "--max-buffered",
                "x",
                "server.max_buffered",
                "max_buffered = \"x\"",
            ),
            ("--header", "x", "origin.headers", "headers = [\"x\"]"),
            (
                "--hydrate-rate",
                "x",
                "boot.hydrate_rate",
                "hydrate_rate = \"x\"",
            ),
            ("", "", "origin.hedge", "hedge = \"x\""),
        ];
        for (flag, value, key, line) in cases {
            let (section, _) = key.split_once('.').unwrap();
            let toml = format!("[{section}]\n{line}\n");
            let e = error(&[], &toml);
            let want = format!("config lazybd.toml: {key}: ");
            assert!(e.starts_with(&want), "{toml:?}: {e}");
            if flag.is_empty() {
                continue;
            }
            let e = error(&[flag, value], "");
            assert!(e.starts_with(&format!("{flag}: ")), "{flag} {value}: {e}");
            if key == "origin.headers" {
                continue; // not a choice: the file's and the flags' all count
            }
            // A bad file value the flag overrides is no error...
            let good = if flag == "--listen" {
                "127.0.0.1:1"
            } else {
                "64k"
            };
            resolved(&[flag, good], &toml);
            // ...and a bad flag is reported as the flag's, whatever the file says.
            let e = error(&[flag, value], &toml);
            assert!(
                e.starts_with(&format!("{flag}: ")),
                "{flag} {value} over {toml:?}: {e}"
            );
        }
        // Without --config (only in these tests) the key alone.
        let e = try_resolve(&args(&[]), &file("[server]\ncache_size = \"x\"\n")).unwrap_err();
        assert_eq!(e.to_string(), "server.cache_size: invalid size \"x\"");
    }

    #[test]
    fn exports_the_command_lines_first_then_the_files() {
        let toml = "[[export]]\nname = \"a\"\nimage = \"/a.img\"\nhydrate = true\nformat = \"auto\"\n\
                    [[export]]\nname = \"b\"\nimage = \"/b.img\"\nwritable = true\noverlay_dir = \"/o\"\n";
        let mut a = args(&[
            "/x.img",
            "--name",
            "x",
            "--writable",
            "--overlay-dir",
            "/ox",
            "--description",
            "d",
            "--format",
            "qcow2",
        ]);
        a.config = Some("c.toml".into());
        let c = try_resolve(&a, &file(toml)).unwrap();
        let names: Vec<_> = c.exports.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["x", "a", "b"]);
        let x = &c.exports[0];
        assert_eq!(
            (x.image.as_str(), x.writable, x.hydrate),
            ("/x.img", true, false)
        );
        assert_eq!(x.overlay_dir, Some(PathBuf::from("/ox")));
        assert_eq!(x.description.as_deref(), Some("d"));
        assert!(c.exports[1].hydrate && !c.exports[1].writable);
        assert!(c.exports[2].writable);
        assert_eq!(c.exports[2].overlay_dir, Some(PathBuf::from("/o")));
        let formats: Vec<_> = c.exports.iter().map(|e| e.format).collect();
        assert_eq!(formats, [Some(Format::Qcow2), Some(Format::Auto), None]);
        let e = Cli::try_parse_from(["lazybd", "serve", "/x.img", "--format", "vmdk"])
            .err()
            .expect("--format vmdk refused")
            .to_string();
        assert!(e.contains("raw, qcow2 or auto"), "{e}");
        let e = FileConfig::parse("[[export]]\nname = \"a\"\nimage = \"/a\"\nformat = \"vmdk\"\n")
            .expect_err("format = vmdk refused")
            .to_string();
        assert!(e.contains("vmdk"), "{e}");
    }

    #[test]
    fn the_sample_image_only_without_origin_and_config() {
        // Neither: the sample, made in the resolved cache directory.
        let mut asked = None;
        let c = resolve(&args(&["--cache-dir", "/c"]), &FileConfig::default(), |d| {
            asked = Some(d.to_path_buf());
            Ok(PathBuf::from(SAMPLE))
        })
        .unwrap();
        assert_eq!(asked, Some(PathBuf::from("/c")));
        assert_eq!(c.exports.len(), 1);
        assert_eq!(
            (c.exports[0].name.as_str(), c.exports[0].image.as_str()),
            ("disk", SAMPLE)
        );
        // --config without ORIGIN: the file's exports only (maybe none).
        let mut a = args(&[]);
        a.config = Some("c.toml".into());
        let c = resolve(&a, &FileConfig::default(), |_| {
            panic!("no sample with --config")
        })
        .unwrap();
        assert!(c.exports.is_empty());
        // ORIGIN: no sample.
        let c = resolve(&args(&["/x.img"]), &FileConfig::default(), |_| {
            panic!("no sample with ORIGIN")
        })
        .unwrap();
        assert_eq!(c.exports[0].image, "/x.img");
        // The sample's failure is the error.
        let e = resolve(&args(&[]), &FileConfig::default(), |_| {
            anyhow::bail!("disk full")
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }
}
