//! Extra request headers of HTTP origins (an auth token, a tenant id), from
//! where an operator keeps secrets rather than on a command line (visible
//! to every user in `/proc/PID/cmdline`):
//!
//! - `--header 'Name: value'` and `[origin] headers`: fixed for the run;
//! - `LAZYBD_HEADERS`: the same lines in the environment (read at start);
//! - `--header-file FILE` and `[origin] header_file`: `Name: value` lines
//!   (blank lines and `#` comments skipped), read at start and again on
//!   every reload (SIGHUP, `lazybd reload`), so a token that a sidecar
//!   rotates in the file is picked up without a restart.
//!
//! One parser ([`parse_line`]) for all of them. Requests take the current
//! set for each request ([`LiveHeaders::current`]); a reload that fails (a
//! missing file, a bad line) keeps the previous set and says why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use crate::error::{Error, ErrorKind, Result};

/// Where an origin's extra headers come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderSource {
    /// `Name: value` pairs fixed for the run (flags, config, environment).
    pub fixed: Vec<(String, String)>,
    /// Files of `Name: value` lines, re-read on reload.
    pub files: Vec<PathBuf>,
}

/// One `Name: value` line, its name and value checked. An error never
/// shows the line (a line without a colon is likely all value, a name
/// with a space likely holds part of one): the caller names where the
/// line came from (the flag and which one, the file and line number).
pub fn parse_line(line: &str) -> Result<(String, String)> {
    let Some((n, v)) = line.split_once(':') else {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "expected 'Name: value' (no ':' found)",
        ));
    };
    let (n, v) = (n.trim(), v.trim());
    if HeaderName::from_bytes(n.as_bytes()).is_err() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "expected 'Name: value' (the name before ':' is not a header name)",
        ));
    }
    if HeaderValue::from_str(v).is_err() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("header {n}: the value is not a valid header value"),
        ));
    }
    Ok((n.to_string(), v.to_string()))
}

/// Every `Name: value` line of `text`, skipping blank lines and `#`
/// comments; an error names the line (never its text: it may be a secret).
pub fn parse_lines(text: &str) -> Result<Vec<(String, String)>> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| parse_line(l).map_err(|e| e.context_prefix(format!("line {}", i + 1))))
        .collect()
}

fn read_file(path: &Path) -> Result<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("reading header file {}", path.display()), e))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(),
                    "header file is readable by other users (chmod 600 it): it may hold a secret");
            }
        }
    }
    parse_lines(&text).map_err(|e| e.context_prefix(format!("header file {}", path.display())))
}

fn to_map(pairs: &[(String, String)]) -> Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        // Not shown: a name that is not one may hold part of a value.
        // (Lines are checked by `parse_line`; this is for pairs given.)
        let n = HeaderName::from_bytes(name.as_bytes()).map_err(|e| {
            Error::with_source(ErrorKind::InvalidInput, "a header name is not valid", e)
        })?;
        let mut v = HeaderValue::from_str(value).map_err(|e| {
            Error::with_source(ErrorKind::InvalidInput, format!("header {name} value"), e)
        })?;
        // Kept out of any debug output of requests.
        v.set_sensitive(true);
        map.append(n, v);
    }
    Ok(map)
}

impl HeaderSource {
    /// The headers now: the fixed ones, then each file's.
    pub fn load(&self) -> Result<HeaderMap> {
        let mut pairs = self.fixed.clone();
        for f in &self.files {
            pairs.extend(read_file(f)?);
        }
        to_map(&pairs)
    }

    pub fn is_empty(&self) -> bool {
        self.fixed.is_empty() && self.files.is_empty()
    }
}

/// An origin's headers, swapped whole by a reload.
pub(crate) struct LiveHeaders {
    source: HeaderSource,
    current: RwLock<Arc<HeaderMap>>,
}

impl LiveHeaders {
    /// Load `source`; an error here (at open) fails the open.
    pub(crate) fn new(source: HeaderSource) -> Result<LiveHeaders> {
        let current = RwLock::new(Arc::new(source.load()?));
        Ok(LiveHeaders { source, current })
    }

    /// The headers for a request made now.
    pub(crate) fn current(&self) -> Arc<HeaderMap> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-read the files. On error the previous headers stay in use.
    /// Returns whether anything was re-read.
    pub(crate) fn reload(&self) -> Result<bool> {
        if self.source.files.is_empty() {
            return Ok(false);
        }
        let fresh = self.source.load()?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_comments_and_errors_never_show_values() {
        let p = parse_lines("# token\n\nX-Auth-Token:  abc:def \n  X-Tenant: t1\n").unwrap();
        assert_eq!(
            p,
            [
                ("X-Auth-Token".to_string(), "abc:def".to_string()),
                ("X-Tenant".to_string(), "t1".to_string())
            ]
        );
        let e = parse_lines("A: b\nsecret-without-colon\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: expected 'Name: value' (no ':' found)"
        );
        // Never the text of a bad line, whatever is wrong with it.
        for line in [
            "s3cr3t-token-without-any-colon",
            "X-Auth-Token s3cr3t: x",
            "X-Auth-Token: s3cr3t\u{7f}",
        ] {
            let e = parse_line(line).unwrap_err().to_string();
            assert!(!e.contains("s3cr3t"), "{line:?}: {e}");
            let e = parse_lines(&format!("# c\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("line 2: ") && !e.contains("s3cr3t"), "{e}");
        }
    }

    #[test]
    fn a_reload_rereads_files_and_keeps_the_old_headers_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("h");
        std::fs::write(&f, "X-Auth-Token: one\n").unwrap();
        let live = LiveHeaders::new(HeaderSource {
            fixed: vec![("X-Fixed".into(), "1".into())],
            files: vec![f.clone()],
        })
        .unwrap();
        let now = live.current();
        assert_eq!(now["x-auth-token"], "one");
        assert_eq!(now["x-fixed"], "1");
        assert!(now["x-auth-token"].is_sensitive());
        std::fs::write(&f, "X-Auth-Token: two\n").unwrap();
        assert!(live.reload().unwrap());
        assert_eq!(live.current()["x-auth-token"], "two");
        std::fs::write(&f, "broken\n").unwrap();
        let e = live.reload().unwrap_err();
        assert!(
            e.to_string().contains("header file") && e.to_string().contains("line 1"),
            "{e}"
        );
        assert_eq!(
            live.current()["x-auth-token"],
            "two",
            "kept after a failed reload"
        );
        std::fs::remove_file(&f).unwrap();
        assert!(live.reload().is_err());
        // Nothing to re-read: a no-op.
        let fixed = LiveHeaders::new(HeaderSource {
            fixed: vec![("A".into(), "b".into())],
            files: vec![],
        })
        .unwrap();
        assert!(!fixed.reload().unwrap());
    }
}
