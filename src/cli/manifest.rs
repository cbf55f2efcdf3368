//! `lazybd manifest build|show`: an image's per-block digests, built by
//! reading the whole image from its origin (a progress bar on a terminal,
//! log lines otherwise).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use anyhow::{bail, Context};
use lazybd::block::parse_size;
use lazybd::manifest::{self, Manifest};
use lazybd::origin::{self, OriginOptions};
use lazybd::stats::Stats;
use lazybd::util::human_bytes;

use super::settings::header_source;
use super::{ManifestBuildArgs, ManifestCmd};

pub fn run(c: ManifestCmd) -> anyhow::Result<ExitCode> {
    match c {
        ManifestCmd::Build(a) => build(a),
        ManifestCmd::Show { file } => {
            let m = manifest::read_file(&file)?;
            println!("image:      {}", m.locator);
            println!(
                "size:       {} ({})",
                m.image_size,
                human_bytes(m.image_size)
            );
            println!(
                "validator:  {}",
                m.validator
                    .as_deref()
                    .unwrap_or("none (the origin gives none)")
            );
            println!(
                "blocks:     {} of {}, SHA-256",
                m.digests.len(),
                human_bytes(m.block_size)
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The default output: the image's last path segment + the suffix.
fn default_output(origin: &str) -> PathBuf {
    let path = origin.split(['?', '#']).next().unwrap_or(origin);
    let name = path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && !n.ends_with(':'))
        .unwrap_or("image");
    PathBuf::from(format!("{name}{}", manifest::SIDECAR_SUFFIX))
}

fn build(a: ManifestBuildArgs) -> anyhow::Result<ExitCode> {
    let block_size = parse_size(&a.block_size)?;
    if !Manifest::valid_block_size(block_size) {
        bail!(
            "--block-size {}: a power of two from 4K to 16M",
            a.block_size
        );
    }
    let output = a
        .output
        .clone()
        .unwrap_or_else(|| default_output(&a.origin));
    let env = std::env::var("LAZYBD_HEADERS").ok();
    let opts = OriginOptions {
        headers: header_source(&a.access.headers, env.as_deref(), &a.access.header_files)?,
        ca_file: a.access.origin_ca.clone(),
        ..OriginOptions::default()
    };
    let bar = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let started = std::time::Instant::now();
    let m = rt.block_on(async {
        let o = origin::open(&a.origin, &opts, Arc::new(Stats::default())).await?;
        let total = o.identity().size;
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        let ticker = super::progress::spawn(bar, "read", move || (d.load(Relaxed), total));
        let r = manifest::build(o, block_size, a.jobs.max(1), 4 << 20, done).await;
        ticker.abort();
        r
    })?;
    let bytes = m.encode();
    lazybd::util::write_atomic(&output, &bytes)
        .with_context(|| format!("writing {}", output.display()))?;
    println!(
        "manifest of {} ({}, validator {}): {} blocks of {} in {:.1}s -> {}",
        m.locator,
        human_bytes(m.image_size),
        m.validator.as_deref().unwrap_or("none"),
        m.digests.len(),
        human_bytes(m.block_size),
        started.elapsed().as_secs_f64(),
        output.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_output_is_the_image_name() {
        assert_eq!(
            default_output("https://h/x/base.raw?sig=1"),
            PathBuf::from("base.raw.lazybd-manifest")
        );
        assert_eq!(
            default_output("s3://b/k/debian.qcow2"),
            PathBuf::from("debian.qcow2.lazybd-manifest")
        );
        assert_eq!(
            default_output("/srv/img.raw"),
            PathBuf::from("img.raw.lazybd-manifest")
        );
        assert_eq!(
            default_output("glance://0b1c-9f"),
            PathBuf::from("0b1c-9f.lazybd-manifest")
        );
    }
}
