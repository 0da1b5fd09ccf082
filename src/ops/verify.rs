//! `imapull verify`: each mailbox's UIDs on the server against the ledger,
//! changing nothing (EXAMINE, UID SEARCH ALL). Exit 0 when they agree, so
//! that a timer can run it as a health check.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;

use serde::Serialize;

use crate::config::Account;
use crate::exit;
use crate::imap::{uid_sets, Imap};
use crate::ledger::{Kept, Ledger, MailboxRow, State};

/// What one comparison found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The mailbox was never pulled: nothing to compare (not a failure).
    NeverPulled,
    /// The server's UIDVALIDITY is not the ledger's.
    UidvalidityChanged,
    /// On the server below the watermark, above what first contact or a
    /// baseline skipped, and never seen by imapull: a pass skipped them.
    NeverSeen,
    /// Deferred longer than `stuck_after`.
    StuckDeferred,
    /// Rejected, waiting for the operator.
    Quarantined,
    /// Delivered, and removed from the server by someone else before
    /// retention did (not a failure: another client may delete).
    GoneBeforeRetention,
}

impl Kind {
    /// Whether this finding makes `verify` fail.
    pub fn fails(&self) -> bool {
        !matches!(self, Kind::NeverPulled | Kind::GoneBeforeRetention)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: Kind,
    pub uids: Vec<u32>,
    pub message: String,
}

/// What the server says of a mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Server {
    pub uidvalidity: u32,
    pub uidnext: u32,
    pub messages: usize,
}

fn finding(kind: Kind, uids: Vec<u32>, message: String) -> Finding {
    Finding {
        kind,
        uids,
        message,
    }
}

/// Compares. Pure: the ledger's mailbox row and message rows (of the
/// server's UIDVALIDITY), the server's UIDs, the clock.
pub fn compare(
    row: Option<&MailboxRow>,
    server: &Server,
    on_server: &BTreeSet<u32>,
    kept: &[Kept],
    now: i64,
    stuck_after: i64,
) -> Vec<Finding> {
    let Some(row) = row else {
        return vec![finding(
            Kind::NeverPulled,
            vec![],
            "never pulled: the first pass delivers as `initial` says".into(),
        )];
    };
    if row.uidvalidity != server.uidvalidity {
        return vec![finding(
            Kind::UidvalidityChanged,
            vec![],
            format!(
                "UIDVALIDITY is {} on the server, {} in the ledger: the next pass matches \
                 the messages again by Message-ID and size",
                server.uidvalidity, row.uidvalidity
            ),
        )];
    }
    let known: HashSet<u32> = kept.iter().map(|k| k.uid).collect();
    let never_seen: Vec<u32> = on_server
        .iter()
        .copied()
        .filter(|u| *u >= row.skipped_below && *u < row.watermark && !known.contains(u))
        .collect();
    let of = |pick: &dyn Fn(&Kept) -> bool| -> Vec<u32> {
        kept.iter().filter(|k| pick(k)).map(|k| k.uid).collect()
    };
    let stuck = of(&|k| k.state == Some(State::Deferred) && now - k.first_seen_at >= stuck_after);
    let quarantined = of(&|k| k.state == Some(State::Rejected) && k.dropped_at.is_none());
    let gone = of(&|k| {
        k.state == Some(State::Delivered) && k.purged_at.is_none() && !on_server.contains(&k.uid)
    });
    let mut out = Vec::new();
    let sets = |u: &[u32]| uid_sets(u).join(",");
    if !never_seen.is_empty() {
        out.push(finding(
            Kind::NeverSeen,
            never_seen.clone(),
            format!(
                "{} message(s) below the watermark ({}) that imapull never saw (UIDs {}): \
                 no pass will deliver them; please report this",
                never_seen.len(),
                row.watermark,
                sets(&never_seen)
            ),
        ));
    }
    if !stuck.is_empty() {
        out.push(finding(
            Kind::StuckDeferred,
            stuck.clone(),
            format!(
                "{} message(s) deferred for longer than stuck_after (UIDs {}): see `imapull status` \
                 for the local server's last reply",
                stuck.len(),
                sets(&stuck)
            ),
        ));
    }
    if !quarantined.is_empty() {
        out.push(finding(
            Kind::Quarantined,
            quarantined.clone(),
            format!(
                "{} message(s) quarantined (UIDs {}): `imapull quarantine list`",
                quarantined.len(),
                sets(&quarantined)
            ),
        ));
    }
    if !gone.is_empty() {
        out.push(finding(
            Kind::GoneBeforeRetention,
            gone.clone(),
            format!(
                "{} delivered message(s) were removed from the server by someone else \
                 (UIDs {})",
                gone.len(),
                sets(&gone)
            ),
        ));
    }
    out
}

#[derive(Debug, Serialize)]
pub struct MailboxVerdict {
    pub name: String,
    pub agrees: bool,
    pub server: Option<Server>,
    pub findings: Vec<Finding>,
}

#[derive(Debug, Serialize)]
pub struct AccountVerdict {
    pub name: String,
    /// The server could not be asked (with why); nothing was compared.
    pub error: Option<String>,
    pub mailboxes: Vec<MailboxVerdict>,
}

/// Verifies one account's mailboxes.
pub async fn verify(a: &Account, ledger: &crate::ledger::LedgerHandle, now: i64) -> AccountVerdict {
    let mut v = AccountVerdict {
        name: a.name.clone(),
        error: None,
        mailboxes: Vec::new(),
    };
    let mut imap = match Imap::connect(a).await {
        Ok(i) => i,
        Err(e) => {
            v.error = Some(e.to_string());
            return v;
        }
    };
    for mb in &a.mailboxes {
        match one(a, &mut imap, ledger, &mb.name, now).await {
            Ok(m) => v.mailboxes.push(m),
            Err(e) => {
                v.error = Some(format!("{}: {e:#}", mb.name));
                break;
            }
        }
    }
    imap.logout().await;
    v
}

async fn one(
    a: &Account,
    imap: &mut Imap,
    ledger: &crate::ledger::LedgerHandle,
    mailbox: &str,
    now: i64,
) -> anyhow::Result<MailboxVerdict> {
    let sel = imap.examine(mailbox).await?;
    let on_server = if sel.exists > 0 {
        imap.search("ALL").await?
    } else {
        BTreeSet::new()
    };
    let server = Server {
        uidvalidity: sel.uidvalidity,
        uidnext: sel.uidnext,
        messages: on_server.len(),
    };
    let (acct, m, uv) = (a.name.clone(), mailbox.to_string(), sel.uidvalidity);
    let (row, kept) = ledger
        .call(move |l: &mut Ledger| Ok((l.mailbox_row(&acct, &m)?, l.kept(&acct, &m, uv)?)))
        .await?;
    let stuck = a.stuck_after.as_secs() as i64;
    let findings = compare(row.as_ref(), &server, &on_server, &kept, now, stuck);
    Ok(MailboxVerdict {
        name: mailbox.to_string(),
        agrees: !findings.iter().any(|f| f.kind.fails()),
        server: Some(server),
        findings,
    })
}

/// The exit code of a verification: 0 when all agree, 65 when the ledger
/// and a server disagree, 69 when a server could not be asked.
pub fn exit_code(verdicts: &[AccountVerdict]) -> i32 {
    if verdicts.iter().any(|v| v.error.is_some()) {
        exit::UNAVAILABLE
    } else if verdicts
        .iter()
        .flat_map(|v| &v.mailboxes)
        .any(|m| !m.agrees)
    {
        exit::DATAERR
    } else {
        exit::OK
    }
}

pub fn print(out: &mut impl Write, verdicts: &[AccountVerdict]) -> std::io::Result<()> {
    for v in verdicts {
        writeln!(out, "{}", v.name)?;
        for m in &v.mailboxes {
            let s = m.server.as_ref();
            writeln!(
                out,
                "  {}: {} ({} message(s) on the server, UIDNEXT {})",
                m.name,
                if m.agrees { "agrees" } else { "DISAGREES" },
                s.map_or(0, |s| s.messages),
                s.map_or(0, |s| s.uidnext)
            )?;
            for f in &m.findings {
                let mark = if f.kind.fails() { "!" } else { "-" };
                writeln!(out, "    {mark} {}", f.message)?;
            }
        }
        if let Some(e) = &v.error {
            writeln!(out, "  FAILED to ask the server: {e}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(uid: u32, state: State, first_seen_at: i64) -> Kept {
        Kept {
            uid,
            state: Some(state),
            first_seen_at,
            purged_at: None,
            dropped_at: None,
        }
    }

    fn row(watermark: u32, skipped_below: u32) -> MailboxRow {
        MailboxRow {
            uidvalidity: 7,
            watermark,
            skipped_below,
            last_purge_at: None,
            retry_at: None,
        }
    }

    const SERVER: Server = Server {
        uidvalidity: 7,
        uidnext: 20,
        messages: 0,
    };

    fn kinds(f: &[Finding]) -> Vec<(Kind, Vec<u32>)> {
        f.iter().map(|f| (f.kind.clone(), f.uids.clone())).collect()
    }

    #[test]
    fn what_disagrees() {
        let on_server: BTreeSet<u32> = [1, 2, 5, 6, 7, 8, 15].into();
        let kept = vec![
            kept(5, State::Delivered, 0),
            // Deferred, but not for long: not stuck.
            kept(6, State::Deferred, 9_000),
            kept(7, State::Deferred, 0),
            kept(8, State::Rejected, 0),
            // Delivered, then gone from the server: another client.
            kept(9, State::Delivered, 0),
        ];
        // 1 and 2 are below skipped_below (first contact skipped them); 3
        // and 4 are gone, never seen (expunged before); 15 is new mail at
        // or above the watermark.
        let f = compare(
            Some(&row(10, 3)),
            &SERVER,
            &[1, 2, 15].into(),
            &[],
            10_000,
            3600,
        );
        assert_eq!(kinds(&f), vec![]);
        let f = compare(Some(&row(10, 1)), &SERVER, &on_server, &kept, 10_000, 3600);
        assert_eq!(
            kinds(&f),
            vec![
                (Kind::NeverSeen, vec![1, 2]),
                (Kind::StuckDeferred, vec![7]),
                (Kind::Quarantined, vec![8]),
                (Kind::GoneBeforeRetention, vec![9]),
            ]
        );
        let f = compare(Some(&row(10, 3)), &SERVER, &on_server, &kept, 10_000, 3600);
        assert_eq!(f[0].kind, Kind::StuckDeferred);
        // Purged and dropped rows are settled.
        let mut purged = kept[4].clone();
        purged.purged_at = Some(1);
        let mut dropped = kept[3].clone();
        dropped.dropped_at = Some(1);
        let f = compare(
            Some(&row(10, 3)),
            &SERVER,
            &[8].into(),
            &[purged, dropped],
            0,
            3600,
        );
        assert_eq!(kinds(&f), vec![]);
    }

    #[test]
    fn a_changed_uidvalidity_and_a_mailbox_never_pulled() {
        let mut r = row(10, 1);
        r.uidvalidity = 6;
        let f = compare(Some(&r), &SERVER, &[1].into(), &[], 0, 3600);
        assert_eq!(kinds(&f), vec![(Kind::UidvalidityChanged, vec![])]);
        assert!(f[0].kind.fails());
        let f = compare(None, &SERVER, &[1].into(), &[], 0, 3600);
        assert_eq!(kinds(&f), vec![(Kind::NeverPulled, vec![])]);
        assert!(!f[0].kind.fails());
    }
}
