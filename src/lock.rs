//! One lock per account, so two imapull processes never pull the same
//! account at once (a timer run overlapping a slow one, or a daemon and a
//! manual run). `flock` is released by the kernel when the process dies,
//! so a `kill -9` never leaves a stale lock behind.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

#[derive(Debug)]
pub struct AccountLock {
    _file: File,
    pub path: PathBuf,
}

/// The account is being pulled by another process.
#[derive(Debug, thiserror::Error)]
#[error(
    "account {account} is locked by another imapull process ({path}); not starting a second pull"
)]
pub struct Busy {
    pub account: String,
    pub path: PathBuf,
}

/// The lock file of `account`, beside the ledger.
pub fn lock_path(ledger: &Path, account: &str) -> PathBuf {
    let mut name = ledger.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{account}.lock"));
    ledger.with_file_name(name)
}

/// Takes the lock without waiting.
pub fn try_lock(ledger: &Path, account: &str) -> Result<AccountLock> {
    let path = lock_path(ledger, account);
    use std::os::unix::fs::OpenOptionsExt as _;
    // 0600: anyone who can open the file can flock it, and so stop pulls.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    // SAFETY: flock on a valid, open descriptor; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(Busy {
                account: account.to_string(),
                path,
            }
            .into());
        }
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    Ok(AccountLock { _file: file, path })
}

#[cfg(test)]
mod tests {
    #[test]
    fn second_lock_is_refused_until_released() {
        let dir = tempfile::Builder::new()
            .prefix("imapull-lock-")
            .tempdir()
            .unwrap();
        let ledger = dir.path().join("ledger.sqlite3");
        let first = super::try_lock(&ledger, "a").unwrap();
        let e = super::try_lock(&ledger, "a").unwrap_err();
        assert!(e.downcast_ref::<super::Busy>().is_some(), "{e}");
        assert!(super::try_lock(&ledger, "b").is_ok());
        drop(first);
        assert!(super::try_lock(&ledger, "a").is_ok());
    }
}
