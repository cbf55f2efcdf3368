//! `lazybd export add|remove|list`: requests to a running server's control
//! socket. [`call`] is also what `lazybd profile stop` sends with.

use std::path::Path;
use std::process::ExitCode;

use lazybd::daemon::control::{self, Request, Response};
use lazybd::daemon::ExportConfig;
use lazybd::util::human_bytes;

use super::settings::client_control_socket;
use super::{ControlArg, ExportCmd};

pub fn run(c: ExportCmd) -> anyhow::Result<ExitCode> {
    let (path, req) = match c {
        ExportCmd::Add {
            name,
            image,
            writable,
            overlay_dir,
            hydrate,
            format,
            control,
        } => (
            client_control_socket(control.control),
            Request::Add {
                export: ExportConfig {
                    name,
                    image,
                    writable,
                    overlay_dir,
                    description: None,
                    hydrate,
                    format,
                },
            },
        ),
        ExportCmd::Remove {
            name,
            force,
            delete_overlay,
            control,
        } => (
            client_control_socket(control.control),
            Request::Remove {
                name,
                force,
                delete_overlay,
            },
        ),
        ExportCmd::List { json, control } => {
            let resp = call(&client_control_socket(control.control), &Request::List)?;
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
    call(&path, &req)?;
    println!("ok");
    Ok(ExitCode::SUCCESS)
}

/// `lazybd reload`.
pub fn reload(control: ControlArg) -> anyhow::Result<ExitCode> {
    let resp = call(&client_control_socket(control.control), &Request::Reload)?;
    println!(
        "ok: {} origin(s) re-read their files",
        resp.reloaded.unwrap_or(0)
    );
    Ok(ExitCode::SUCCESS)
}

/// One request to the control socket at `path`, and its answer.
pub fn call(path: &Path, req: &Request) -> anyhow::Result<Response> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(control::call(path, req))?)
}
