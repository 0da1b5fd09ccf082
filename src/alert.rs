//! Alerts: one notice when something needs the operator (an account
//! failing for `alert_after`, mail deferred for `stuck_after`, a message
//! quarantined), one when it is over, and nothing in between, delivered
//! through the account's own local server to `alert_to` (or, without it,
//! logged once as a warning). The ledger's `notice` table remembers what
//! was told, so a restart tells nothing twice.
//!
//! When the local server refuses the notice itself, it is logged at error
//! level once, kept, and sent once the server takes mail again, saying how
//! long it was held back.
//!
//! [`reconcile`] and [`compose`] are pure; [`evaluate`] reads the ledger,
//! sends and records.

use std::time::Duration;

use anyhow::Result;

use crate::config::Account;
use crate::deliver::{Deliverer, Envelope, Outcome};
use crate::ledger::LedgerHandle;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Passes or connections have failed for `alert_after`.
    Failing,
    /// Mail has been deferred for `stuck_after`.
    Stuck,
    /// A message is in the quarantine (the subject is its ID).
    Quarantined,
    /// The built-in OAuth2 source needs a new authorisation: its refresh
    /// token was refused, or is about to expire by `refresh_token_lifetime`.
    Reauthorize,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Failing,
        Kind::Stuck,
        Kind::Quarantined,
        Kind::Reauthorize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Failing => "failing",
            Kind::Stuck => "stuck",
            Kind::Quarantined => "quarantined",
            Kind::Reauthorize => "oauth2",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Whether its end is told too (a quarantined message leaves the
    /// quarantine by the operator's own command).
    fn tells_its_end(self) -> bool {
        self != Kind::Quarantined
    }
}

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub kind: Kind,
    pub subject: String,
    /// What the notice says of it.
    pub detail: String,
}

/// A condition the operator is (to be) told about, as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub kind: Kind,
    pub subject: String,
    pub raised_at: i64,
    pub detail: String,
    /// When its notice was delivered (or logged).
    pub sent_at: Option<i64>,
    /// The first time the local server refused its notice, and its reply.
    pub held_since: Option<i64>,
    pub held_reply: Option<String>,
    /// When the condition ended.
    pub cleared_at: Option<i64>,
    /// When its end was told.
    pub clear_sent_at: Option<i64>,
}

impl Notice {
    fn new(c: &Condition, now: i64) -> Notice {
        Notice {
            kind: c.kind,
            subject: c.subject.clone(),
            raised_at: now,
            detail: c.detail.clone(),
            sent_at: None,
            held_since: None,
            held_reply: None,
            cleared_at: None,
            clear_sent_at: None,
        }
    }

    /// Something about it is still to be told.
    pub fn to_tell(&self) -> bool {
        self.sent_at.is_none() || (self.cleared_at.is_some() && self.clear_sent_at.is_none())
    }

    /// Told from start to end: nothing more to keep.
    fn finished(&self) -> bool {
        self.cleared_at.is_some() && !self.to_tell()
    }
}

/// The notices after looking at what holds `now`: a new condition is
/// raised, one that ended is cleared (told if it was raised, forgotten if
/// it never was and nobody waits for it), one that came back before its
/// end was told goes on as it was. Pure.
pub fn reconcile(rows: Vec<Notice>, now_true: &[Condition], now: i64) -> Vec<Notice> {
    let holds = |n: &Notice| {
        now_true
            .iter()
            .any(|c| c.kind == n.kind && c.subject == n.subject)
    };
    let mut out: Vec<Notice> = Vec::new();
    for mut n in rows {
        match (holds(&n), n.cleared_at) {
            // It came back before its end was told: as if it never ended.
            (true, Some(_)) if n.clear_sent_at.is_none() => n.cleared_at = None,
            // An old episode, told from start to end: a new one starts below.
            (true, Some(_)) => continue,
            (true, None) => {
                // The latest detail, for a notice still to be sent.
                if let Some(c) = now_true
                    .iter()
                    .find(|c| c.kind == n.kind && c.subject == n.subject)
                {
                    if n.sent_at.is_none() {
                        n.detail = c.detail.clone();
                    }
                }
            }
            (false, None) => {
                let announced = n.sent_at.is_some() || n.held_since.is_some();
                if !announced || !n.kind.tells_its_end() {
                    continue;
                }
                n.cleared_at = Some(now);
            }
            (false, Some(_)) => {}
        }
        if !n.finished() {
            out.push(n);
        }
    }
    for c in now_true {
        if !out
            .iter()
            .any(|n| n.kind == c.kind && n.subject == c.subject)
        {
            out.push(Notice::new(c, now));
        }
    }
    out.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
    out
}

/// A time for a notice: UTC, to the minute.
fn at(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M UTC")
        .to_string()
}

fn lasted(secs: i64) -> String {
    humantime::format_duration(Duration::from_secs((secs.max(0) as u64) / 60 * 60)).to_string()
}

/// The notice's subject line and text for what is to be told. Pure.
pub fn compose(a: &Account, rows: &[Notice], now: i64) -> (String, String) {
    let mut heads = Vec::new();
    let mut text = format!(
        "imapull, about the account {} ({} at {}):\n",
        a.name, a.username, a.host
    );
    let name = &a.name;
    let quarantined: Vec<&Notice> = rows
        .iter()
        .filter(|n| n.kind == Kind::Quarantined && n.sent_at.is_none())
        .collect();
    for n in rows
        .iter()
        .filter(|n| n.to_tell() && n.kind != Kind::Quarantined)
    {
        let (head, more) = match (n.kind, n.sent_at, n.cleared_at) {
            (Kind::Failing, None, None) => (
                format!("failing since {}", at(n.raised_at)),
                format!(
                    "imapull keeps trying; the mail stays on the server.\n  \
                     More: `imapull status {name}`; test the login: `imapull check {name}`."
                ),
            ),
            (Kind::Stuck, None, None) => (
                "mail stuck".to_string(),
                format!(
                    "The local server keeps deferring it; it stays on the IMAP server.\n  \
                     More: `imapull status --messages --state deferred {name}`."
                ),
            ),
            (Kind::Reauthorize, None, None) => (
                "OAuth2 needs a new authorisation".to_string(),
                format!(
                    "Without it imapull cannot log in, and the mail waits on the server.\n  \
                     Run `imapull oauth2 authorize {name}` on the imapull host, as the user \
                     imapull runs as, and follow what it prints."
                ),
            ),
            (kind, _, Some(end)) => (
                format!(
                    "{} again",
                    match kind {
                        Kind::Failing => "working",
                        Kind::Reauthorize => "authorised",
                        _ => "delivering",
                    }
                ),
                format!(
                    "Found {}, over {} ({} later).",
                    at(n.raised_at),
                    at(end),
                    lasted(end - n.raised_at)
                ),
            ),
            _ => continue,
        };
        text.push_str(&format!(
            "\n* {}: {}\n  {more}\n",
            head.to_uppercase(),
            n.detail
        ));
        heads.push(head);
    }
    if !quarantined.is_empty() {
        heads.push(format!("{} message(s) quarantined", quarantined.len()));
        text.push_str(
            "\n* QUARANTINED: the local server rejected these; they stay on the IMAP server \
             until you decide:\n",
        );
        for n in &quarantined {
            text.push_str(&format!("  ID {}: {}\n", n.subject, n.detail));
        }
        text.push_str(&format!(
            "  Retry: `imapull quarantine retry ID`; give up: `imapull quarantine drop ID`; \
             list: `imapull quarantine list {name}`.\n"
        ));
    }
    let held = rows
        .iter()
        .filter(|n| n.to_tell())
        .filter_map(|n| n.held_since.map(|h| (h, n.held_reply.clone())))
        .min_by_key(|(h, _)| *h);
    if let Some((since, reply)) = held {
        text.push_str(&format!(
            "\nThis notice was held back from {} to {} ({}): the local server refused it{}.\n",
            at(since),
            at(now),
            lasted(now - since),
            reply.map_or(String::new(), |r| format!(" ({r})"))
        ));
    }
    (format!("[imapull] {name}: {}", heads.join("; ")), text)
}

/// The notice as a message (RFC 5322, `Auto-Submitted`, RFC 3834).
pub fn message(a: &Account, to: &str, subject: &str, text: &str, now: i64) -> Vec<u8> {
    let date = chrono::DateTime::from_timestamp(now, 0)
        .unwrap_or_default()
        .to_rfc2822();
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    format!(
        "From: imapull <MAILER-DAEMON@{host}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\
         Date: {date}\r\nMessage-ID: <imapull.{now}.{pid}.{acct}@{host}>\r\n\
         Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n{body}",
        host = clean(&a.ehlo),
        subject = clean(subject),
        pid = std::process::id(),
        acct = a.name.replace(|c: char| !c.is_ascii_alphanumeric(), "-"),
        body = text.replace('\n', "\r\n"),
    )
    .into_bytes()
}

/// The accounts being looked at now: two tasks of one account must not
/// tell the same thing twice, so the second one skips its look (the first
/// sees the same). Per account, so that a local server that hangs on one
/// notice holds up no other account. (Another process cannot hold the
/// account: its lock.)
static EVALUATING: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Holds an account's place in [`EVALUATING`].
struct Looking(String);

impl Looking {
    fn take(account: &str) -> Option<Looking> {
        let mut busy = EVALUATING.lock().unwrap_or_else(|p| p.into_inner());
        if busy.iter().any(|a| a == account) {
            return None;
        }
        busy.push(account.to_string());
        Some(Looking(account.to_string()))
    }
}

impl Drop for Looking {
    fn drop(&mut self) {
        let mut busy = EVALUATING.lock().unwrap_or_else(|p| p.into_inner());
        busy.retain(|a| *a != self.0);
    }
}

/// Looks at the account, tells what is to be told, records it. Errors are
/// logged: an alert never stops a pass.
pub async fn evaluate(a: &Account, ledger: &LedgerHandle, now: i64) {
    if let Err(e) = try_evaluate(a, ledger, now).await {
        tracing::warn!(account = a.name, "checking for alerts: {e:#}");
    }
}

async fn try_evaluate(a: &Account, ledger: &LedgerHandle, now: i64) -> Result<()> {
    let Some(_looking) = Looking::take(&a.name) else {
        return Ok(());
    };
    let (acct, mailboxes) = (a.name.clone(), a.mailboxes.clone());
    let (after, stuck) = (
        a.alert_after.as_secs() as i64,
        a.stuck_after.as_secs() as i64,
    );
    let (rows, mut holds) = ledger
        .call(move |l| {
            let holds = l.alert_conditions(&acct, &mailboxes, now, after, stuck)?;
            Ok((l.notices(&acct)?, holds))
        })
        .await?;
    if let crate::config::Auth::OAuth2 {
        source: crate::config::TokenSource::Builtin(o),
        ..
    } = &a.auth
    {
        if let Some(detail) = crate::oauth::report(&a.name, o, now).attention {
            holds.push(Condition {
                kind: Kind::Reauthorize,
                subject: String::new(),
                detail,
            });
        }
    }
    let before = rows.clone();
    let mut rows = reconcile(rows, &holds, now);
    if rows.iter().any(Notice::to_tell) {
        tell(a, &mut rows, now).await;
    }
    if rows != before {
        let acct = a.name.clone();
        let keep = rows.clone();
        ledger.call(move |l| l.save_notices(&acct, &keep)).await?;
    }
    Ok(())
}

/// Sends (or logs) what is to be told, and marks it told; a refusal by the
/// local server marks it held, and is logged at error level once.
async fn tell(a: &Account, rows: &mut [Notice], now: i64) {
    let (subject, text) = compose(a, rows, now);
    let refused = match &a.alert_to {
        None => {
            tracing::warn!(account = a.name, "{subject}\n{text}");
            None
        }
        Some(to) => {
            let msg = message(a, to, &subject, &text, now);
            let mut d = Deliverer::new(a.deliver.clone(), a.ehlo.clone(), a.deliver_timeout);
            let env = Envelope {
                sender: String::new(),
                recipients: vec![to.clone()],
            };
            let r = d.deliver(&env, b"", &msg, None, None).await;
            d.quit().await;
            match r {
                Ok(got) if got.outcome == Outcome::Delivered => {
                    tracing::info!(account = a.name, to, "notice sent: {subject}");
                    None
                }
                Ok(got) => Some(got.reply),
                Err(e) => Some(e.to_string()),
            }
        }
    };
    for n in rows.iter_mut().filter(|n| n.to_tell()) {
        match &refused {
            None => {
                if n.sent_at.is_none() {
                    n.sent_at = Some(now);
                }
                if n.cleared_at.is_some() {
                    n.clear_sent_at = Some(now);
                }
            }
            Some(reply) => {
                if n.held_since.is_none() {
                    tracing::error!(
                        account = a.name,
                        "the local server refused a notice ({reply}); it is kept and sent \
                         once the server takes mail again: {subject}"
                    );
                    n.held_since = Some(now);
                    n.held_reply = Some(reply.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(kind: Kind, subject: &str) -> Condition {
        Condition {
            kind,
            subject: subject.into(),
            detail: format!("{kind:?} {subject}"),
        }
    }

    fn told(rows: &mut [Notice], now: i64) {
        for n in rows.iter_mut().filter(|n| n.to_tell()) {
            n.sent_at.get_or_insert(now);
            if n.cleared_at.is_some() {
                n.clear_sent_at = Some(now);
            }
        }
    }

    #[test]
    fn one_notice_when_it_starts_one_when_it_ends_nothing_between() {
        let failing = [c(Kind::Failing, "")];
        let mut rows = reconcile(vec![], &failing, 10);
        assert_eq!(rows.len(), 1);
        assert!(rows[0].to_tell());
        told(&mut rows, 10);
        // Still failing, at every later look: nothing to tell.
        for t in [20, 30, 40] {
            rows = reconcile(rows, &failing, t);
            assert!(!rows.iter().any(Notice::to_tell), "{t}: {rows:?}");
        }
        // Over: its end is told, once.
        rows = reconcile(rows, &[], 50);
        assert_eq!(rows[0].cleared_at, Some(50));
        assert!(rows[0].to_tell());
        told(&mut rows, 50);
        rows = reconcile(rows, &[], 60);
        assert!(rows.is_empty(), "{rows:?}");
        // A new failure later is a new notice.
        let rows = reconcile(rows, &failing, 70);
        assert_eq!((rows[0].raised_at, rows[0].to_tell()), (70, true));
    }

    #[test]
    fn a_condition_that_ends_before_it_was_told_is_forgotten() {
        let rows = reconcile(vec![], &[c(Kind::Stuck, "")], 10);
        assert!(reconcile(rows, &[], 20).is_empty());
    }

    #[test]
    fn a_held_notice_is_told_with_its_end() {
        let mut rows = reconcile(vec![], &[c(Kind::Stuck, "")], 10);
        rows[0].held_since = Some(10);
        // The local server takes mail again, and the stuck mail goes: the
        // notice still goes out, saying both.
        let rows = reconcile(rows, &[], 20);
        assert_eq!((rows[0].sent_at, rows[0].cleared_at), (None, Some(20)));
        assert!(rows[0].to_tell());
    }

    #[test]
    fn a_condition_back_before_its_end_was_told_goes_on() {
        let mut rows = reconcile(vec![], &[c(Kind::Failing, "")], 10);
        told(&mut rows, 10);
        let rows = reconcile(rows, &[], 20);
        let rows = reconcile(rows, &[c(Kind::Failing, "")], 30);
        assert_eq!((rows[0].raised_at, rows[0].cleared_at), (10, None));
        assert!(!rows[0].to_tell());
    }

    #[test]
    fn quarantined_messages_are_told_once_each_and_leave_quietly() {
        let mut rows = reconcile(vec![], &[c(Kind::Quarantined, "7")], 10);
        told(&mut rows, 10);
        let mut rows = reconcile(
            rows,
            &[c(Kind::Quarantined, "7"), c(Kind::Quarantined, "8")],
            20,
        );
        let pending: Vec<&str> = rows
            .iter()
            .filter(|n| n.to_tell())
            .map(|n| n.subject.as_str())
            .collect();
        assert_eq!(pending, vec!["8"]);
        told(&mut rows, 20);
        // Retried or dropped by the operator: no notice about that.
        assert!(reconcile(rows, &[], 30).is_empty());
    }

    #[test]
    fn the_notice_says_what_and_what_to_do() {
        let a = crate::config::one_account(
            "[accounts.work]\nhost = \"127.0.0.1\"\ntls = \"none\"\nusername = \"u\"\n\
             password = \"p\"\ndeliver = \"smtp://127.0.0.1:25\"\nrecipients = [\"me@x.org\"]\n",
        );
        let mut rows = reconcile(
            vec![],
            &[c(Kind::Failing, ""), c(Kind::Quarantined, "12")],
            0,
        );
        rows[0].held_since = Some(0);
        rows[0].held_reply = Some("451 later".into());
        let (subject, text) = compose(&a, &rows, 7200);
        assert_eq!(
            subject,
            "[imapull] work: failing since 1970-01-01 00:00 UTC; 1 message(s) quarantined"
        );
        assert!(text.contains("imapull check work"), "{text}");
        assert!(text.contains("ID 12: Quarantined 12"), "{text}");
        assert!(text.contains("held back from 1970-01-01 00:00 UTC to 1970-01-01 02:00 UTC (2h): the local server refused it (451 later)"), "{text}");
        let m = String::from_utf8(message(&a, "pm@x.org", &subject, &text, 0)).unwrap();
        assert!(m.contains("\r\nAuto-Submitted: auto-generated\r\n"), "{m}");
        assert!(!m.replace("\r\n", "").contains('\n'), "bare LF in {m:?}");
    }
}
