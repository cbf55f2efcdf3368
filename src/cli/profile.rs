//! `lazybd profile show|export|import|stop`: an image's boot profile in a
//! cache directory; `stop` asks a recording server to save now.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use lazybd::daemon::control;
use lazybd::util::human_bytes;

use super::settings::{client_cache_dir, client_control_socket};
use super::{ImageArg, ProfileCmd};

pub fn run(c: ProfileCmd) -> anyhow::Result<ExitCode> {
    use lazybd::prefetch::profile::Profile;
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
            println!(
                "profile: {}",
                dir.join(lazybd::prefetch::profile::FILE).display()
            );
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
                lazybd::prefetch::profile::SIDECAR_SUFFIX
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
            let path = client_control_socket(control.control);
            super::export::call(&path, &control::Request::ProfileStop)?;
            println!("ok: profiles saved");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The cache directory of `--image` (or the only image) in a cache.
fn image_dir(a: &ImageArg) -> anyhow::Result<(PathBuf, lazybd::cache::dir::Recorded)> {
    let root = client_cache_dir(a.cache_dir.clone());
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
                .or_else(|| lazybd::origin::url_locator(want))
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
