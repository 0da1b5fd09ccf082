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

/// Who holds an account's lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    /// The holder is `imapull daemon` (else a one-shot `run` or `purge`).
    pub daemon: bool,
}

/// The process that holds `account`'s lock now, if any. Read from the
/// kernel's list of locks (/proc/locks), so that asking takes no lock of
/// its own: a `status` at the moment a run or the daemon starts can never
/// make it fail as "locked by another process".
pub fn holder(ledger: &Path, account: &str) -> Option<Holder> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(lock_path(ledger, account)).ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = flock_holder(&locks, meta.dev(), meta.ino())?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    Some(Holder {
        pid,
        daemon: is_daemon(&cmdline),
    })
}

/// Whether a command line (NUL-separated, as /proc has it) runs `imapull
/// daemon`: its subcommand, the first argument that is neither an option
/// nor an option's value, is `daemon`. (`imapull run daemon` pulls an
/// account called "daemon", and has no SIGUSR1 handler: it must not be
/// taken for the daemon and signalled.)
pub fn is_daemon(cmdline: &[u8]) -> bool {
    let mut args = cmdline.split(|b| *b == 0).skip(1);
    while let Some(arg) = args.next() {
        match arg {
            b"-c" | b"--config" | b"--metrics-file" => {
                args.next();
            }
            a if a.starts_with(b"-") => {}
            a => return a == b"daemon",
        }
    }
    false
}

/// The PID of the flock on the file `dev`:`ino` in a /proc/locks listing
/// (`1: FLOCK  ADVISORY  WRITE 1234 fe:00:10010654 0 EOF`; waiters are
/// marked `->` and are no holders). The device is matched when the kernel
/// names it as stat does; some file systems (btrfs subvolumes, overlayfs)
/// name another device there, so an inode alone still matches.
pub fn flock_holder(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let mut by_inode = None;
    for line in locks.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[1] != "FLOCK" {
            continue;
        }
        let Ok(pid) = f[4].parse::<u32>() else {
            continue;
        };
        let mut id = f[5].rsplitn(2, ':');
        let (Some(i), Some(d)) = (id.next(), id.next()) else {
            continue;
        };
        if i.parse::<u64>().ok() != Some(ino) {
            continue;
        }
        if d == format!("{major:02x}:{minor:02x}") {
            return Some(pid);
        }
        by_inode.get_or_insert(pid);
    }
    by_inode
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: POSIX  ADVISORY  WRITE 77 fe:00:42 0 EOF\n\
                     2: FLOCK  ADVISORY  WRITE 1234 fe:00:42 0 EOF\n\
                     2: -> FLOCK  ADVISORY  WRITE 999 fe:00:42 0 EOF\n\
                     3: FLOCK  ADVISORY  WRITE 555 00:2f:43 0 EOF\n";
        assert_eq!(super::flock_holder(locks, 0xfe00, 42), Some(1234));
        // Another device named by the kernel (btrfs, overlayfs): the inode.
        assert_eq!(super::flock_holder(locks, 0x0801, 43), Some(555));
        assert_eq!(super::flock_holder(locks, 0xfe00, 44), None);
    }

    #[test]
    fn only_the_daemon_subcommand_is_the_daemon() {
        let cmd = |args: &[&str]| args.join("\0").into_bytes();
        assert!(super::is_daemon(&cmd(&[
            "imapull", "--config", "/x", "-v", "daemon"
        ])));
        assert!(super::is_daemon(&cmd(&[
            "imapull",
            "--config=/x",
            "daemon"
        ])));
        assert!(super::is_daemon(&cmd(&[
            "/usr/bin/imapull",
            "-c",
            "daemon.toml",
            "daemon"
        ])));
        assert!(!super::is_daemon(&cmd(&["imapull", "run", "daemon"])));
        assert!(!super::is_daemon(&cmd(&["imapull", "-c", "daemon", "run"])));
        assert!(!super::is_daemon(&cmd(&[
            "imapull",
            "--metrics-file",
            "daemon",
            "purge"
        ])));
        assert!(!super::is_daemon(b""));
    }

    #[test]
    fn a_held_lock_is_seen_without_taking_it() {
        let dir = tempfile::Builder::new()
            .prefix("imapull-lock-")
            .tempdir()
            .unwrap();
        let ledger = dir.path().join("ledger.sqlite3");
        assert_eq!(super::holder(&ledger, "a"), None);
        let lock = super::try_lock(&ledger, "a").unwrap();
        let h = super::holder(&ledger, "a").expect("held");
        assert_eq!(h.pid, std::process::id());
        // Asking took no lock: the holder's lock is still the only one.
        drop(lock);
        assert_eq!(super::holder(&ledger, "a"), None);
        assert!(super::try_lock(&ledger, "a").is_ok());
    }

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
