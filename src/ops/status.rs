//! `imapull status`: per account and mailbox, what the ledger says of how
//! it goes, readable in a terminal, exact in JSON (schema in
//! docs/operations.md). Read-only, and safe while the daemon runs.

use std::io::Write;

use anyhow::Result;
use serde::Serialize;

use crate::config::{Account, Config, MailboxConfig};
use crate::ledger::{Health, Ledger, MailboxRow, Summary};
use crate::lock;

/// The JSON document's version: bumped on any change that is not a new
/// field.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Serialize)]
pub struct Report {
    pub schema: u32,
    pub generated_at: String,
    pub accounts: Vec<AccountStatus>,
}

#[derive(Debug, Serialize)]
pub struct AccountStatus {
    pub name: String,
    /// The process pulling the account now, if any.
    pub held_by: Option<HeldBy>,
    /// The built-in OAuth2 source's authorisation, if the account has one.
    pub oauth2: Option<OAuth2Status>,
    pub mailboxes: Vec<MailboxStatus>,
}

/// What the token file says (never a token).
#[derive(Debug, Serialize, PartialEq)]
pub struct OAuth2Status {
    pub flow: &'static str,
    pub token_file: String,
    pub authorized_at: Option<String>,
    pub refreshed_at: Option<String>,
    pub access_token_expires_at: Option<String>,
    /// By the config's `refresh_token_lifetime`.
    pub refresh_token_expires_at: Option<String>,
    /// What needs the operator (a refused refresh token, one about to
    /// expire, no authorisation yet), with the command that helps.
    pub attention: Option<String>,
}

fn oauth2_status(a: &Account, now: i64) -> Option<OAuth2Status> {
    let crate::config::Auth::OAuth2 {
        source: crate::config::TokenSource::Builtin(o),
        ..
    } = &a.auth
    else {
        return None;
    };
    let r = crate::oauth::report(&a.name, o, now);
    Some(OAuth2Status {
        flow: o.flow.as_str(),
        token_file: r.token_file.display().to_string(),
        authorized_at: r.authorized_at.map(rfc3339),
        refreshed_at: r.refreshed_at.map(rfc3339),
        access_token_expires_at: r.access_expires_at.map(rfc3339),
        refresh_token_expires_at: r.refresh_expires_at.map(rfc3339),
        attention: r.attention,
    })
}

#[derive(Debug, Serialize)]
pub struct HeldBy {
    pub pid: u32,
    /// "daemon", or "run" for a one-shot run or purge.
    pub mode: &'static str,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct MailboxStatus {
    pub name: String,
    pub uidvalidity: Option<u32>,
    pub watermark: Option<u32>,
    pub last_ok_at: Option<String>,
    pub last_delivery_at: Option<String>,
    pub delivered_today: i64,
    pub delivered_total: i64,
    pub deferred: i64,
    pub oldest_deferred_at: Option<String>,
    pub next_retry_at: Option<String>,
    pub quarantined: i64,
    /// `purge_after`, as the config writes durations; None: never.
    pub purge_after: Option<String>,
    pub next_purge_at: Option<String>,
    pub next_removal_at: Option<String>,
    pub last_error: Option<ErrorStatus>,
    /// The first failure since the last pass that went through.
    pub failing_since: Option<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ErrorStatus {
    pub at: String,
    pub message: String,
}

/// RFC 3339, UTC, to the second.
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The start of today, local time, in seconds since the epoch.
pub fn start_of_today(now: i64) -> i64 {
    use chrono::TimeZone as _;
    let local = chrono::Local
        .timestamp_opt(now, 0)
        .single()
        .unwrap_or_else(chrono::Local::now);
    local
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .and_then(|m| chrono::Local.from_local_datetime(&m).earliest())
        .map_or(now - now.rem_euclid(86400), |m| m.timestamp())
}

/// What the ledger says of the accounts named (all when `only` is empty).
pub fn gather(config: &Config, ledger: &Ledger, only: &[String], now: i64) -> Result<Report> {
    let today = start_of_today(now);
    let mut accounts = Vec::new();
    for a in config
        .accounts
        .iter()
        .filter(|a| only.is_empty() || only.contains(&a.name))
    {
        let held_by = lock::holder(&config.ledger, &a.name).map(|h| HeldBy {
            pid: h.pid,
            mode: if h.daemon { "daemon" } else { "run" },
        });
        let mut mailboxes = Vec::new();
        for mb in &a.mailboxes {
            let row = ledger.mailbox_row(&a.name, &mb.name)?;
            let summary = ledger.summary(&a.name, &mb.name, today)?;
            let health = ledger.health(&a.name, &mb.name)?;
            mailboxes.push(mailbox(a, mb, row, summary, health, now));
        }
        accounts.push(AccountStatus {
            name: a.name.clone(),
            held_by,
            oauth2: oauth2_status(a, now),
            mailboxes,
        });
    }
    Ok(Report {
        schema: SCHEMA,
        generated_at: rfc3339(now),
        accounts,
    })
}

/// One mailbox's status, from its ledger rows and its config. Pure.
pub fn mailbox(
    a: &Account,
    mb: &MailboxConfig,
    row: Option<MailboxRow>,
    s: Summary,
    h: Health,
    now: i64,
) -> MailboxStatus {
    let time = |t: Option<i64>| t.map(rfc3339);
    let (next_purge_at, next_removal_at) = match mb.purge_after {
        None => (None, None),
        Some(after) => {
            let last = row.as_ref().and_then(|r| r.last_purge_at);
            let interval = if after.is_zero() {
                0
            } else {
                a.purge_interval.as_secs() as i64
            };
            let purge = last.map_or(now, |l| (l + interval).max(now));
            let removal = s
                .oldest_unpurged_at
                .map(|d| (d + after.as_secs() as i64).max(purge));
            (Some(purge), removal)
        }
    };
    MailboxStatus {
        name: mb.name.clone(),
        uidvalidity: row.as_ref().map(|r| r.uidvalidity),
        watermark: row.as_ref().map(|r| r.watermark),
        last_ok_at: time(h.last_ok_at),
        last_delivery_at: time(s.last_delivery_at),
        delivered_today: s.delivered_since,
        delivered_total: s.delivered_total,
        deferred: s.deferred,
        oldest_deferred_at: time(s.oldest_deferred_at),
        next_retry_at: time(row.as_ref().and_then(|r| r.retry_at)).filter(|_| s.deferred > 0),
        quarantined: s.rejected,
        purge_after: mb
            .purge_after
            .map(|d| humantime::format_duration(d).to_string()),
        next_purge_at: time(next_purge_at),
        next_removal_at: time(next_removal_at),
        last_error: h
            .last_error
            .zip(h.last_error_at)
            .map(|(message, at)| ErrorStatus {
                at: rfc3339(at),
                message,
            }),
        failing_since: time(h.failing_since),
    }
}

/// How long ago `t` (RFC 3339) was, roughly: "3m", "2h 5m", "4d".
fn ago(t: &str, now: i64) -> String {
    let Ok(t) = chrono::DateTime::parse_from_rfc3339(t) else {
        return "?".into();
    };
    let secs = (now - t.timestamp()).max(0);
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// A time for a terminal: local, to the second, and how long ago.
fn when(t: &Option<String>, now: i64) -> String {
    let Some(t) = t else {
        return "never".into();
    };
    let local = chrono::DateTime::parse_from_rfc3339(t)
        .map(|d| {
            d.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S %z")
                .to_string()
        })
        .unwrap_or_else(|_| t.clone());
    let n = chrono::DateTime::parse_from_rfc3339(t).map_or(0, |d| d.timestamp());
    if n > now {
        format!("{local} (in {})", ago(&rfc3339(now), n))
    } else {
        format!("{local} ({} ago)", ago(t, now))
    }
}

/// The report for a terminal.
pub fn print(out: &mut impl Write, r: &Report, now: i64) -> std::io::Result<()> {
    for a in &r.accounts {
        match &a.held_by {
            Some(h) if h.mode == "daemon" => {
                writeln!(out, "{}: watched by the daemon (pid {})", a.name, h.pid)?
            }
            Some(h) => writeln!(out, "{}: being pulled now (pid {})", a.name, h.pid)?,
            None => writeln!(out, "{}: no imapull process holds it now", a.name)?,
        }
        if let Some(o) = &a.oauth2 {
            let mut line = format!(
                "  oauth2: {} flow, authorised {}, refreshed {}",
                o.flow,
                when(&o.authorized_at, now),
                when(&o.refreshed_at, now)
            );
            if o.refresh_token_expires_at.is_some() {
                line.push_str(&format!(
                    ", refresh token until {}",
                    when(&o.refresh_token_expires_at, now)
                ));
            }
            writeln!(out, "{line}")?;
            if let Some(w) = &o.attention {
                writeln!(out, "  oauth2 NEEDS YOU: {w}")?;
            }
        }
        for m in &a.mailboxes {
            print_mailbox(out, &a.name, m, now)?;
        }
    }
    Ok(())
}

fn print_mailbox(
    out: &mut impl Write,
    account: &str,
    m: &MailboxStatus,
    now: i64,
) -> std::io::Result<()> {
    writeln!(out, "  {}", m.name)?;
    let line = |out: &mut dyn Write, k: &str, v: String| writeln!(out, "    {k:<15}{v}");
    if let Some(since) = &m.failing_since {
        line(
            out,
            "FAILING",
            format!("since {}", when(&Some(since.clone()), now)),
        )?;
    }
    line(out, "last pass", when(&m.last_ok_at, now))?;
    line(out, "last delivery", when(&m.last_delivery_at, now))?;
    line(
        out,
        "delivered",
        format!("{} today, {} in all", m.delivered_today, m.delivered_total),
    )?;
    let deferred = if m.deferred == 0 {
        "none".to_string()
    } else {
        let mut s = format!(
            "{}, the oldest since {}",
            m.deferred,
            when(&m.oldest_deferred_at, now)
        );
        if m.next_retry_at.is_some() {
            s.push_str(&format!(
                "; the daemon retries at {}",
                when(&m.next_retry_at, now)
            ));
        }
        s
    };
    line(out, "deferred", deferred)?;
    let quarantined = if m.quarantined == 0 {
        "none".to_string()
    } else {
        format!("{} (imapull quarantine list {account})", m.quarantined)
    };
    line(out, "quarantined", quarantined)?;
    let retention = match &m.purge_after {
        None => "never removes (no purge_after)".to_string(),
        Some(after) => {
            let mut s = format!("{after}; next purge {}", when(&m.next_purge_at, now));
            if m.next_removal_at.is_some() {
                s.push_str(&format!(
                    "; first removal {}",
                    when(&m.next_removal_at, now)
                ));
            }
            s
        }
    };
    line(out, "retention", retention)?;
    if let Some(e) = &m.last_error {
        line(
            out,
            "last error",
            format!("{}: {}", when(&Some(e.at.clone()), now), e.message),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(purge: &str) -> Account {
        let text = format!(
            "[accounts.t]\nhost = \"127.0.0.1\"\ntls = \"none\"\nusername = \"u\"\npassword = \"p\"\n\
             deliver = \"smtp://127.0.0.1:25\"\nrecipients = [\"me@example.org\"]\n\
             purge_interval = \"1h\"\n{purge}"
        );
        crate::config::one_account(&text)
    }

    #[test]
    fn a_mailbox_from_its_rows() {
        let a = account("purge_after = \"1d\"");
        let row = MailboxRow {
            uidvalidity: 7,
            watermark: 20,
            skipped_below: 1,
            last_purge_at: Some(1000),
            retry_at: Some(5000),
        };
        let s = Summary {
            delivered_total: 10,
            delivered_since: 2,
            last_delivery_at: Some(4000),
            deferred: 1,
            oldest_deferred_at: Some(3000),
            rejected: 1,
            oldest_unpurged_at: Some(2000),
        };
        let h = Health {
            last_ok_at: Some(4500),
            last_error: Some("login refused".into()),
            last_error_at: Some(4600),
            failing_since: Some(4600),
        };
        let m = mailbox(&a, &a.mailboxes[0], Some(row), s, h, 4700);
        assert_eq!(m.uidvalidity, Some(7));
        assert_eq!(m.next_retry_at.as_deref(), Some("1970-01-01T01:23:20Z"));
        // The next purge an interval after the last; the first removal a
        // day after the oldest delivery still on the server.
        assert_eq!(m.next_purge_at.as_deref(), Some(rfc3339(4700)).as_deref());
        assert_eq!(m.next_removal_at, Some(rfc3339(2000 + 86400)));
        assert_eq!(m.failing_since, Some(rfc3339(4600)));
        assert_eq!(m.last_error.unwrap().message, "login refused");
        // A mailbox never pulled, without retention: nothing made up.
        let a = account("");
        let m = mailbox(
            &a,
            &a.mailboxes[0],
            None,
            Summary::default(),
            Health::default(),
            0,
        );
        assert_eq!(
            (m.uidvalidity, m.last_ok_at, m.next_purge_at),
            (None, None, None)
        );
        assert_eq!(m.purge_after, None);
    }

    #[test]
    fn no_retry_time_without_deferred_mail() {
        let a = account("");
        let row = MailboxRow {
            uidvalidity: 7,
            watermark: 20,
            skipped_below: 1,
            last_purge_at: None,
            retry_at: Some(5000),
        };
        let m = mailbox(
            &a,
            &a.mailboxes[0],
            Some(row),
            Summary::default(),
            Health::default(),
            0,
        );
        assert_eq!(m.next_retry_at, None);
    }
}
