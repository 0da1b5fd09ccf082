//! The token file: the refresh token, the cached access token and their
//! ages, as JSON, mode 0600. It is replaced whole (a new file, fsynced, then
//! renamed over the old one, then the directory fsynced), so a process
//! killed at any moment leaves the old file or the new one, never a part.
//! A lock file beside it keeps two processes (a daemon and `check`) from
//! refreshing at once, which would spend a rotated refresh token twice.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// What the token file holds. `Debug` shows no token ([`Secret`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub version: u32,
    /// The application the tokens were issued to: another `client_id` in
    /// the config means the file is not this account's any more.
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_token: Option<Secret>,
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// When the user authorised (`imapull oauth2 authorize`), or the first
    /// client-credentials token: what a refresh token's lifetime counts from.
    pub authorized_at: i64,
    /// The last refresh, or client-credentials token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refreshed_at: Option<i64>,
    /// When the provider last handed out a new refresh token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<i64>,
    /// The provider refused the refresh token: only a new authorisation
    /// helps, so it is not asked again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<Refused>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub at: i64,
    /// The provider's error code and description (never a token).
    pub error: String,
}

pub const VERSION: u32 = 1;

/// The file, or `None` when there is none yet.
pub fn load(path: &Path) -> Result<Option<Stored>> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    // serde_json's errors give a line and column, never the text.
    let s: Stored = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not an imapull token file", path.display()))?;
    if s.version != VERSION {
        anyhow::bail!(
            "{}: token file version {} (this imapull reads {VERSION})",
            path.display(),
            s.version
        );
    }
    Ok(Some(s))
}

/// Replaces the file atomically and durably, mode 0600 (its directory
/// 0700 when it is created here).
pub fn save(path: &Path, s: &Stored) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    make_dir(dir)?;
    let tmp = tmp_path(path);
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(s).map_err(std::io::Error::other)?)?;
        f.write_all(b"\n")?;
        adopt(&tmp, dir)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing the token file {}", path.display()))
    })
}

/// The token's directory, 0700 when it is made here.
fn make_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    match dir.parent() {
        Some(parent) => adopt(dir, parent).with_context(|| format!("chown {}", dir.display())),
        None => Ok(()),
    }
}

/// Run as root (`imapull oauth2 authorize` for a systemd unit's dynamic
/// user), a file or directory made here takes the owner of the directory
/// it is in, so that the service can still read and replace it.
fn adopt(path: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(());
    }
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let owner = std::fs::metadata(dir)?;
    if owner.uid() == 0 {
        return Ok(());
    }
    std::os::unix::fs::chown(path, Some(owner.uid()), Some(owner.gid()))
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// An exclusive lock on the token file's lock file, held while it lives.
pub struct FileLock(#[allow(dead_code)] std::fs::File);

/// Waits for the lock (blocking: call it off the async threads).
pub fn lock(path: &Path) -> Result<FileLock> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    let lock_path = path.with_file_name(name);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        make_dir(dir)?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("opening {}", lock_path.display()))?;
    if let Some(dir) = lock_path.parent() {
        adopt(&lock_path, dir).with_context(|| format!("chown {}", lock_path.display()))?;
    }
    use std::os::fd::AsRawFd as _;
    loop {
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(FileLock(f));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e).with_context(|| format!("locking {}", lock_path.display()));
        }
    }
}

/// Whether the file is readable by others than its owner.
pub fn too_open(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Stored {
        Stored {
            version: VERSION,
            client_id: "c".into(),
            refresh_token: Some(Secret::new("rt-secret".into())),
            access_token: Some(Secret::new("at-secret".into())),
            expires_at: Some(100),
            authorized_at: 10,
            refreshed_at: None,
            rotated_at: None,
            refused: None,
        }
    }

    #[test]
    fn saved_whole_0600_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("a.json");
        assert_eq!(load(&p).unwrap(), None);
        save(&p, &stored()).unwrap();
        assert_eq!(load(&p).unwrap(), Some(stored()));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        assert!(!too_open(&p));
        assert!(!tmp_path(&p).exists());
        // No token in what Debug shows.
        let shown = format!("{:?}", load(&p).unwrap());
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn made_by_root_it_takes_the_owner_of_its_directory() {
        use std::os::unix::fs::MetadataExt as _;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        std::os::unix::fs::chown(&state, Some(4242), Some(4343)).unwrap();
        let p = state.join("oauth2").join("a.json");
        let _lock = lock(&p).unwrap();
        save(&p, &stored()).unwrap();
        for made in [
            p.parent().unwrap().to_path_buf(),
            p.clone(),
            state.join("oauth2/a.json.lock"),
        ] {
            let m = std::fs::metadata(&made).unwrap();
            assert_eq!((m.uid(), m.gid()), (4242, 4343), "{}", made.display());
        }
    }

    #[test]
    fn a_damaged_file_is_an_error_that_shows_none_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        std::fs::write(
            &p,
            "{\"version\":1,\"client_id\":\"c\",\"refresh_token\":\"rt-se",
        )
        .unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("not an imapull token file"), "{e}");
        assert!(!e.contains("rt-se"), "{e}");
    }
}
