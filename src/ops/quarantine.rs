//! `imapull quarantine list|retry|drop`: the rejected messages stay on the
//! server until the operator decides. `retry` makes them deferred, so that
//! the account's next pass tries them again, and wakes a running daemon
//! (SIGUSR1: the daemon holds the account's lock, so this command never
//! delivers by itself); `drop` stops trying, and lets retention remove
//! them like delivered mail.

use std::collections::BTreeSet;
use std::io::Write;

use anyhow::Result;

use crate::config::Config;
use crate::ledger::{Ledger, Quarantined, Which};
use crate::lock;

/// One line per quarantined message.
pub fn print_list(out: &mut impl Write, rows: &[Quarantined]) -> std::io::Result<()> {
    if rows.is_empty() {
        return writeln!(out, "the quarantine is empty");
    }
    writeln!(
        out,
        "{:>6}  {:<20} {:<12} {:<16} {:>7} {:>9}  reply / Message-ID",
        "ID", "rejected at (UTC)", "account", "mailbox", "uid", "bytes"
    )?;
    for r in rows {
        writeln!(
            out,
            "{:>6}  {:<20} {:<12} {:<16} {:>7} {:>9}  {} {}",
            r.id,
            super::status::rfc3339(r.at),
            r.account,
            r.mailbox,
            r.uid,
            r.size.map_or("-".to_string(), |s| s.to_string()),
            r.reply.as_deref().unwrap_or("-"),
            r.message_id.as_deref().unwrap_or("(no Message-ID)")
        )?;
    }
    Ok(())
}

/// Wakes the daemon that holds each of these accounts, if one does.
/// Returns the lines to print.
fn wake_daemons(config: &Config, accounts: &BTreeSet<&str>) -> Vec<String> {
    let mut said = Vec::new();
    let mut woken = BTreeSet::new();
    for a in accounts {
        match lock::holder(&config.ledger, a) {
            Some(h) if h.daemon => {
                if woken.insert(h.pid) {
                    // SAFETY: kill(2) with a PID and a signal number.
                    let r = unsafe { libc::kill(h.pid as libc::pid_t, libc::SIGUSR1) };
                    said.push(if r == 0 {
                        format!("woke the daemon (pid {}): it pulls {a} now", h.pid)
                    } else {
                        format!(
                            "could not wake the daemon (pid {}): {}; it retries at its next pass",
                            h.pid,
                            std::io::Error::last_os_error()
                        )
                    });
                }
            }
            Some(h) => said.push(format!(
                "{a} is being pulled now (pid {}); the next pass tries them",
                h.pid
            )),
            None => said.push(format!(
                "the next `imapull run {a}` (or the daemon) tries them"
            )),
        }
    }
    said
}

/// `quarantine retry`: prints what it did.
pub fn retry(
    out: &mut impl Write,
    config: &Config,
    ledger: &mut Ledger,
    which: &Which<'_>,
    now: i64,
) -> Result<usize> {
    let rows = ledger.retry_quarantined(which, now)?;
    report_missing(out, which, &rows)?;
    for r in &rows {
        writeln!(
            out,
            "{}: {}/{} uid {}: will be tried again",
            r.id, r.account, r.mailbox, r.uid
        )?;
    }
    let accounts: BTreeSet<&str> = rows.iter().map(|r| r.account.as_str()).collect();
    for line in wake_daemons(config, &accounts) {
        writeln!(out, "{line}")?;
    }
    Ok(rows.len())
}

/// `quarantine drop`: prints what it did, and what retention will do.
pub fn drop(
    out: &mut impl Write,
    config: &Config,
    ledger: &mut Ledger,
    which: &Which<'_>,
    now: i64,
) -> Result<usize> {
    let rows = ledger.drop_quarantined(which, now)?;
    report_missing(out, which, &rows)?;
    for r in &rows {
        let purge = config
            .account(&r.account)
            .and_then(|a| a.mailboxes.iter().find(|m| m.name == r.mailbox))
            .and_then(|m| m.purge_after);
        let then = match purge {
            Some(after) => format!(
                "retention removes it from the server after {}",
                humantime::format_duration(after)
            ),
            None => "it stays on the server (no purge_after)".to_string(),
        };
        writeln!(
            out,
            "{}: {}/{} uid {}: dropped, not tried again; {then}",
            r.id, r.account, r.mailbox, r.uid
        )?;
    }
    Ok(rows.len())
}

/// Names the IDs asked for that are not in the quarantine.
fn report_missing(
    out: &mut impl Write,
    which: &Which<'_>,
    done: &[Quarantined],
) -> std::io::Result<()> {
    if let Which::Ids(ids) = which {
        for id in *ids {
            if !done.iter().any(|r| r.id == *id) {
                writeln!(
                    out,
                    "{id}: not in the quarantine (see `imapull quarantine list`)"
                )?;
            }
        }
    }
    Ok(())
}
