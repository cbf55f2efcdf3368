//! `lazybd overlay check [--repair]`: verify every page of a writable
//! export's overlay (exit status 1 if any is damaged and not repaired).

use std::path::Path;
use std::process::ExitCode;

use super::OverlayCmd;

pub fn run(c: OverlayCmd) -> anyhow::Result<ExitCode> {
    match c {
        OverlayCmd::Check { dir, repair } => check(&dir, repair),
    }
}

fn check(dir: &Path, repair: bool) -> anyhow::Result<ExitCode> {
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
