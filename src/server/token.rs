//! The server's bearer token: the configured one (at least 32 characters,
//! checked with the configuration), or one generated at start that only its
//! user can learn — printed to an interactive terminal, or written to
//! `server.token_file` with mode 0600. A generated token that would go
//! nowhere (no terminal, no file) is refused, as is listening on a
//! non-loopback address without a configured token.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::ServerConfig;
use crate::error::{Error, Result};

/// Where the token came from, i.e. what to tell the user at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Origin {
    /// `server.token` / `FLUXCAP_SERVER_TOKEN`.
    Configured,
    /// Generated; printed on the terminal.
    Terminal,
    /// Generated; written to this file.
    File(PathBuf),
}

/// The token, and where it came from.
pub(crate) fn resolve(cfg: &ServerConfig, addr: SocketAddr) -> Result<(String, Origin)> {
    if let Some(t) = &cfg.token {
        return Ok((t.trim().to_string(), Origin::Configured));
    }
    if !addr.ip().is_loopback() {
        return Err(Error::Usage(format!(
            "refusing to listen on {addr} (not loopback) without a configured token: \
             set server.token or FLUXCAP_SERVER_TOKEN"
        )));
    }
    let token = generate();
    if let Some(file) = &cfg.token_file {
        let path = PathBuf::from(file);
        write_private(&path, &token)?;
        return Ok((token, Origin::File(path)));
    }
    if std::io::stdout().is_terminal() {
        return Ok((token, Origin::Terminal));
    }
    Err(Error::Usage(
        "no token configured and standard output is not a terminal, so a generated token \
         could not be shown: set server.token (or FLUXCAP_SERVER_TOKEN), or server.token_file"
            .into(),
    ))
}

/// 32 random bytes as 64 hex digits.
pub(crate) fn generate() -> String {
    (0..32)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// Write `token` to `path`, readable and writable by the user only.
fn write_private(path: &Path, token: &str) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(0o600);
        // An existing file keeps its mode on open: narrow it first.
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        }
    }
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(format!("{token}\n").as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t = generate();
        assert_eq!(t.len(), 64);
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(t, generate());
        assert!(same(t.as_bytes(), t.clone().as_bytes()));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }

    #[cfg(unix)]
    #[test]
    fn token_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&path, "abc").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abc\n");
    }
}
