//! `lazybd copy`: a whole image from HTTP(S), a file or NBD to a file or an
//! NBD export, with a progress bar on a terminal (log lines otherwise).

use std::process::ExitCode;

use anyhow::Context;
use lazybd::block::parse_size;
use lazybd::util::human_bytes;

use super::settings::header_source;
use super::CopyArgs;

pub fn run(a: CopyArgs) -> anyhow::Result<ExitCode> {
    use lazybd::copy::{self, CopySpec};
    use std::sync::atomic::Ordering::Relaxed;
    let mut spec = CopySpec::new(&a.source, &a.dest);
    spec.jobs = a.jobs.max(1);
    spec.chunk = parse_size(&a.chunk_size)?;
    spec.verify = !a.no_verify;
    spec.sha256 = a.sha256.as_deref().map(copy::parse_sha256).transpose()?;
    let env = std::env::var("LAZYBD_HEADERS").ok();
    spec.origin_options.headers =
        header_source(&a.access.headers, env.as_deref(), &a.access.header_files)?;
    spec.origin_options.ca_file = a.access.origin_ca;
    let bar = !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = rt.block_on(async move {
        let task = copy::start(spec);
        let p = task.progress.clone();
        let ticker = super::progress::spawn(bar, "copied", move || {
            (p.done.load(Relaxed), p.total.load(Relaxed))
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
