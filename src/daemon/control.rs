//! The control socket: runtime export management for operators and compute
//! agents (`lazybd export add|remove|list`). A Unix socket, owner-only
//! (0600), one JSON request per line, one JSON response per line:
//!
//! ```text
//! {"op":"add","export":{"name":"vm1","image":"http://h/base.raw","writable":true}}
//! {"op":"remove","name":"vm1","force":false,"delete_overlay":false}
//! {"op":"list"}
//! -> {"ok":true,"exports":[...]}   or   {"ok":false,"error":"..."}
//! ```

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::state::{Daemon, ExportConfig, ExportInfo};
use crate::error::{Error, ErrorKind, Result};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Add {
        export: ExportConfig,
    },
    Remove {
        name: String,
        #[serde(default)]
        force: bool,
        #[serde(default)]
        delete_overlay: bool,
    },
    List,
    /// Stop recording boot profiles now and save them.
    ProfileStop,
    /// Re-read origins' header files and credentials.
    Reload,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Response {
    pub(crate) ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exports: Vec<ExportInfo>,
    /// Reload: how many origins re-read something.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reloaded: Option<usize>,
}

/// Longest request line accepted (a request is a few hundred bytes).
const MAX_LINE: usize = 64 << 10;

/// Bind the control socket and serve it until `stop`.
pub(crate) fn serve(
    path: &Path,
    daemon: Arc<Daemon>,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>> {
    let l = crate::util::bind_unix(path, "control socket")?;
    // Owner only: whoever can talk here can expose and delete disks.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    tracing::info!(control = %path.display(), "control socket listening");
    let path = path.to_path_buf();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                r = l.accept() => match r {
                    Ok((s, _)) => {
                        let d = daemon.clone();
                        tokio::spawn(async move {
                            if let Err(e) = session(s, d).await {
                                tracing::debug!(error = %e, "control session ended");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "control accept failed"),
                },
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let _ = std::fs::remove_file(&path);
    }))
}

async fn session(s: UnixStream, daemon: Arc<Daemon>) -> std::io::Result<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE as u64).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let resp = match serde_json::from_str::<Request>(line.trim()) {
            Err(e) => Response {
                ok: false,
                error: Some(format!("bad request: {e}")),
                ..Default::default()
            },
            Ok(req) => handle(&daemon, req).await,
        };
        let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

async fn handle(d: &Daemon, req: Request) -> Response {
    let r = match req {
        Request::Add { export } => d.add_export(&export).await.map(|_| Vec::new()),
        Request::Remove {
            name,
            force,
            delete_overlay,
        } => d
            .remove_export(&name, force, delete_overlay)
            .await
            .map(|_| Vec::new()),
        Request::List => Ok(d.list()),
        Request::ProfileStop => d.finish_profiles().map(|_| Vec::new()),
        Request::Reload => {
            return match d.reload() {
                Ok(n) => Response {
                    ok: true,
                    reloaded: Some(n),
                    ..Default::default()
                },
                Err(e) => Response {
                    ok: false,
                    error: Some(e.to_string()),
                    ..Default::default()
                },
            }
        }
    };
    match r {
        Ok(exports) => Response {
            ok: true,
            exports,
            ..Default::default()
        },
        Err(e) => Response {
            ok: false,
            error: Some(e.to_string()),
            ..Default::default()
        },
    }
}

/// Client side: send one request, return the response (or its error).
pub async fn call(path: &Path, req: &Request) -> Result<Response> {
    let s = UnixStream::connect(path).await.map_err(|e| {
        Error::io(
            format!(
                "connecting to the control socket {} (is `lazybd serve` running with it?)",
                path.display()
            ),
            e,
        )
    })?;
    let (r, mut w) = s.into_split();
    let mut msg = serde_json::to_vec(req)
        .map_err(|e| Error::with_source(ErrorKind::InvalidInput, "encoding request", e))?;
    msg.push(b'\n');
    w.write_all(&msg)
        .await
        .map_err(|e| Error::io("sending control request", e))?;
    let mut line = String::new();
    BufReader::new(r)
        .read_line(&mut line)
        .await
        .map_err(|e| Error::io("reading control response", e))?;
    let resp: Response = serde_json::from_str(line.trim())
        .map_err(|e| Error::with_source(ErrorKind::Protocol, "control response", e))?;
    if !resp.ok {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            resp.error.unwrap_or_else(|| "request failed".into()),
        ));
    }
    Ok(resp)
}
