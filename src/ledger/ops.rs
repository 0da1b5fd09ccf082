//! What the operator's commands read and change in the ledger: how each
//! mailbox's passes went (`health`), the figures `imapull status` shows,
//! the quarantine, and what `imapull verify` compares with the server.
//! Everything here is safe while a pass or the daemon runs: reads see a
//! committed state (WAL), and the writes touch only rows no pass holds.

use anyhow::Result;
use rusqlite::{params, OptionalExtension};

use super::{Ledger, State};
use crate::alert::{Condition, Kind, Notice};

/// How a mailbox's passes went.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// The end of the last pass that went through.
    pub last_ok_at: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// The first failure since the last pass that went through; None while
    /// it works.
    pub failing_since: Option<i64>,
}

/// A mailbox's figures, from its message rows (every UIDVALIDITY).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub delivered_total: i64,
    pub delivered_since: i64,
    pub last_delivery_at: Option<i64>,
    pub deferred: i64,
    pub oldest_deferred_at: Option<i64>,
    /// Quarantined: rejected and not dropped.
    pub rejected: i64,
    /// The earliest delivery whose remote copy is still there.
    pub oldest_unpurged_at: Option<i64>,
}

/// The mailbox row, for status and verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxRow {
    pub uidvalidity: u32,
    pub watermark: u32,
    /// First contact or a baseline skipped the mail below this on purpose.
    pub skipped_below: u32,
    pub last_purge_at: Option<i64>,
    pub retry_at: Option<i64>,
}

/// What the ledger counted for a mailbox (see [`Ledger::counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub delivered: u64,
    pub deferred: u64,
    pub rejected: u64,
    pub delivered_bytes: u64,
    pub purged: u64,
}

/// A quarantined message, as `imapull quarantine` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The ledger's row number: what `quarantine retry` and `drop` take.
    pub id: i64,
    pub account: String,
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub size: Option<i64>,
    pub message_id: Option<String>,
    pub reply: Option<String>,
    /// When it was rejected (its row's last change).
    pub at: i64,
}

/// A message row as `imapull verify` compares it with the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub uid: u32,
    pub state: Option<State>,
    pub first_seen_at: i64,
    pub purged_at: Option<i64>,
    pub dropped_at: Option<i64>,
}

/// Which quarantined messages an operator's command is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Which<'a> {
    Ids(&'a [i64]),
    /// Every one, of one account or of all.
    All(Option<&'a str>),
}

const QUARANTINED: &str = "state = 'rejected' AND dropped_at IS NULL";

impl Ledger {
    /// A pass of `mailbox` went through.
    pub fn pass_ok(&self, account: &str, mailbox: &str, now: i64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO health (account, mailbox, last_ok_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (account, mailbox) DO UPDATE SET
                   last_ok_at = excluded.last_ok_at, failing_since = NULL",
            )?
            .execute(params![account, mailbox, now])?;
        Ok(())
    }

    /// A pass of `mailbox` (or the connection for it) failed with `error`.
    pub fn pass_failed(&self, account: &str, mailbox: &str, now: i64, error: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO health (account, mailbox, last_error, last_error_at, failing_since)
                 VALUES (?1, ?2, ?3, ?4, ?4)
                 ON CONFLICT (account, mailbox) DO UPDATE SET
                   last_error = excluded.last_error, last_error_at = excluded.last_error_at,
                   failing_since = coalesce(health.failing_since, excluded.failing_since)",
            )?
            .execute(params![account, mailbox, error, now])?;
        Ok(())
    }

    pub fn health(&self, account: &str, mailbox: &str) -> Result<Health> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_ok_at, last_error, last_error_at, failing_since FROM health
                 WHERE account = ?1 AND mailbox = ?2",
                params![account, mailbox],
                |r| {
                    Ok(Health {
                        last_ok_at: r.get(0)?,
                        last_error: r.get(1)?,
                        last_error_at: r.get(2)?,
                        failing_since: r.get(3)?,
                    })
                },
            )
            .optional()?
            .unwrap_or_default())
    }

    /// The mailbox's figures; `since` starts the "today" count.
    pub fn summary(&self, account: &str, mailbox: &str, since: i64) -> Result<Summary> {
        Ok(self.conn.query_row(
            &format!(
                "SELECT
                   count(*) FILTER (WHERE state = 'delivered'),
                   count(*) FILTER (WHERE state = 'delivered' AND delivered_at >= ?3),
                   max(delivered_at),
                   count(*) FILTER (WHERE state = 'deferred'),
                   min(first_seen_at) FILTER (WHERE state = 'deferred'),
                   count(*) FILTER (WHERE {QUARANTINED}),
                   min(delivered_at) FILTER (WHERE state = 'delivered' AND purged_at IS NULL)
                 FROM message WHERE account = ?1 AND mailbox = ?2"
            ),
            params![account, mailbox, since],
            |r| {
                Ok(Summary {
                    delivered_total: r.get(0)?,
                    delivered_since: r.get(1)?,
                    last_delivery_at: r.get(2)?,
                    deferred: r.get(3)?,
                    oldest_deferred_at: r.get(4)?,
                    rejected: r.get(5)?,
                    oldest_unpurged_at: r.get(6)?,
                })
            },
        )?)
    }

    pub fn mailbox_row(&self, account: &str, mailbox: &str) -> Result<Option<MailboxRow>> {
        Ok(self
            .conn
            .query_row(
                "SELECT uidvalidity, watermark, coalesce(skipped_below, 1), last_purge_at,
                        retry_at
                 FROM mailbox WHERE account = ?1 AND mailbox = ?2",
                params![account, mailbox],
                |r| {
                    Ok(MailboxRow {
                        uidvalidity: r.get(0)?,
                        watermark: r.get(1)?,
                        skipped_below: r.get(2)?,
                        last_purge_at: r.get(3)?,
                        retry_at: r.get(4)?,
                    })
                },
            )
            .optional()?)
    }

    /// A mailbox's state from another tool (PullIMAP): the watermark, the
    /// mail below it handled by that tool, and `delivered` UIDs at or above
    /// it that it delivered without flagging them (a run cut short), as
    /// delivered rows not flagged, so that the first pass stores their
    /// `\Seen` and delivers them no more. One transaction.
    pub fn import_state(
        &mut self,
        account: &str,
        mailbox: &str,
        state: super::MailboxState,
        delivered: &[u32],
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        super::set_mailbox_state(&tx, account, mailbox, state, Some(state.watermark), now)?;
        {
            let mut st = tx.prepare(
                "INSERT OR IGNORE INTO message (account, mailbox, uidvalidity, uid, state,
                   attempts, last_reply, first_seen_at, updated_at, delivered_at, flagged)
                 VALUES (?1, ?2, ?3, ?4, 'delivered', 0, 'delivered by PullIMAP', ?5, ?5, ?5, 0)",
            )?;
            for uid in delivered {
                st.execute(params![account, mailbox, state.uidvalidity, uid, now])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Every message row of a mailbox under one UIDVALIDITY, by UID.
    pub fn kept(&self, account: &str, mailbox: &str, uidvalidity: u32) -> Result<Vec<Kept>> {
        let mut st = self.conn.prepare_cached(
            "SELECT uid, state, first_seen_at, purged_at, dropped_at FROM message
             WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 ORDER BY uid",
        )?;
        let rows = st.query_map(params![account, mailbox, uidvalidity], |r| {
            Ok(Kept {
                uid: r.get(0)?,
                state: State::parse(&r.get::<_, String>(1)?),
                first_seen_at: r.get(2)?,
                purged_at: r.get(3)?,
                dropped_at: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The quarantine, oldest first.
    pub fn quarantined(&self, account: Option<&str>) -> Result<Vec<Quarantined>> {
        self.select_quarantined("(?1 IS NULL OR account = ?1)", params![account])
    }

    fn select_quarantined(
        &self,
        filter: &str,
        p: impl rusqlite::Params,
    ) -> Result<Vec<Quarantined>> {
        let mut st = self.conn.prepare(&format!(
            "SELECT rowid, account, mailbox, uidvalidity, uid, size, message_id, last_reply,
                    updated_at
             FROM message WHERE {QUARANTINED} AND {filter}
             ORDER BY updated_at, rowid"
        ))?;
        let rows = st.query_map(p, |r| {
            Ok(Quarantined {
                id: r.get(0)?,
                account: r.get(1)?,
                mailbox: r.get(2)?,
                uidvalidity: r.get(3)?,
                uid: r.get(4)?,
                size: r.get(5)?,
                message_id: r.get(6)?,
                reply: r.get(7)?,
                at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The quarantined messages `which` names (an ID that is not in the
    /// quarantine is left out).
    pub fn quarantine_of(&self, which: &Which<'_>) -> Result<Vec<Quarantined>> {
        match which {
            Which::All(account) => self.quarantined(*account),
            Which::Ids(ids) => {
                let mut out = Vec::new();
                for id in *ids {
                    out.extend(self.select_quarantined("rowid = ?1", params![id])?);
                }
                Ok(out)
            }
        }
    }

    /// Makes quarantined messages deferred again, so that the next pass
    /// tries them. Returns what it changed.
    pub fn retry_quarantined(&mut self, which: &Which<'_>, now: i64) -> Result<Vec<Quarantined>> {
        self.change_quarantined(
            which,
            "UPDATE message SET state = 'deferred', updated_at = ?2,
               last_reply = 'retry asked by the operator; before: ' || coalesce(last_reply, '-')
             WHERE rowid = ?1",
            now,
        )
    }

    /// Takes messages out of the quarantine for good: no more tries, and
    /// retention may remove them like delivered mail. Returns what it
    /// changed.
    pub fn drop_quarantined(&mut self, which: &Which<'_>, now: i64) -> Result<Vec<Quarantined>> {
        self.change_quarantined(
            which,
            "UPDATE message SET dropped_at = ?2, updated_at = ?2 WHERE rowid = ?1",
            now,
        )
    }

    fn change_quarantined(
        &mut self,
        which: &Which<'_>,
        sql: &str,
        now: i64,
    ) -> Result<Vec<Quarantined>> {
        let rows = self.quarantine_of(which)?;
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare(sql)?;
            for r in &rows {
                st.execute(params![r.id, now])?;
            }
        }
        tx.commit()?;
        Ok(rows)
    }
}

impl Ledger {
    /// What holds now that an operator is told about: mailboxes of
    /// `account` failing for `after` seconds (one condition), mail deferred
    /// for `stuck` seconds (one), and each quarantined message.
    pub fn alert_conditions(
        &self,
        account: &str,
        mailboxes: &[crate::config::MailboxConfig],
        now: i64,
        after: i64,
        stuck: i64,
    ) -> Result<Vec<Condition>> {
        let at = crate::ops::status::rfc3339;
        let (mut failing, mut stuck_mail) = (Vec::new(), Vec::new());
        for mb in mailboxes {
            let h = self.health(account, &mb.name)?;
            if let Some(since) = h.failing_since.filter(|s| now - s >= after) {
                failing.push(format!(
                    "{} since {}: {}",
                    mb.name,
                    at(since),
                    h.last_error.unwrap_or_default()
                ));
            }
            let s = self.summary(account, &mb.name, now)?;
            if let Some(oldest) = s.oldest_deferred_at.filter(|o| now - o >= stuck) {
                stuck_mail.push(format!(
                    "{}: {} deferred, the oldest since {}",
                    mb.name,
                    s.deferred,
                    at(oldest)
                ));
            }
        }
        let mut out = Vec::new();
        for (kind, items) in [(Kind::Failing, failing), (Kind::Stuck, stuck_mail)] {
            if !items.is_empty() {
                out.push(Condition {
                    kind,
                    subject: String::new(),
                    detail: items.join("; "),
                });
            }
        }
        for q in self.quarantined(Some(account))? {
            out.push(Condition {
                kind: Kind::Quarantined,
                subject: q.id.to_string(),
                detail: format!(
                    "{} uid {} {} at {}: {}",
                    q.mailbox,
                    q.uid,
                    q.message_id.as_deref().unwrap_or("(no Message-ID)"),
                    at(q.at),
                    q.reply.as_deref().unwrap_or("-")
                ),
            });
        }
        Ok(out)
    }

    /// The mailbox's counters: deliveries, their bytes and purges counted
    /// from the rows (which stay), deferred and rejected attempts from the
    /// counters the triggers keep; 0 for one never counted.
    pub fn counters(&self, account: &str, mailbox: &str) -> Result<Counters> {
        let (delivered, delivered_bytes, purged): (i64, i64, i64) = self.conn.query_row(
            "SELECT count(*) FILTER (WHERE state = 'delivered'),
                    coalesce(sum(size) FILTER (WHERE state = 'delivered'), 0),
                    count(purged_at)
             FROM message WHERE account = ?1 AND mailbox = ?2",
            params![account, mailbox],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )?;
        let mut c = Counters {
            delivered: delivered.max(0) as u64,
            delivered_bytes: delivered_bytes.max(0) as u64,
            purged: purged.max(0) as u64,
            ..Counters::default()
        };
        let mut st = self.conn.prepare_cached(
            "SELECT name, value FROM counter WHERE account = ?1 AND mailbox = ?2",
        )?;
        let rows = st.query_map(params![account, mailbox], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        for row in rows {
            let (name, v) = row?;
            match name.as_str() {
                "deferred" => c.deferred = v.max(0) as u64,
                "rejected" => c.rejected = v.max(0) as u64,
                _ => {}
            }
        }
        Ok(c)
    }

    pub fn notices(&self, account: &str) -> Result<Vec<Notice>> {
        let mut st = self.conn.prepare_cached(
            "SELECT kind, subject, raised_at, detail, sent_at, held_since, held_reply,
                    cleared_at, clear_sent_at
             FROM notice WHERE account = ?1 ORDER BY kind, subject",
        )?;
        let rows = st.query_map(params![account], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Notice {
                    kind: Kind::Failing,
                    subject: r.get(1)?,
                    raised_at: r.get(2)?,
                    detail: r.get(3)?,
                    sent_at: r.get(4)?,
                    held_since: r.get(5)?,
                    held_reply: r.get(6)?,
                    cleared_at: r.get(7)?,
                    clear_sent_at: r.get(8)?,
                },
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (kind, mut n) = row?;
            // A kind this imapull does not know (a newer one wrote it):
            // left alone.
            if let Some(k) = Kind::parse(&kind) {
                n.kind = k;
                out.push(n);
            }
        }
        Ok(out)
    }

    /// Makes `rows` the account's notices, in one transaction.
    pub fn save_notices(&mut self, account: &str, rows: &[Notice]) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let kinds: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
            for k in kinds {
                tx.execute(
                    "DELETE FROM notice WHERE account = ?1 AND kind = ?2",
                    params![account, k],
                )?;
            }
            let mut st = tx.prepare(
                "INSERT INTO notice (account, kind, subject, raised_at, detail, sent_at,
                   held_since, held_reply, cleared_at, clear_sent_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for n in rows {
                st.execute(params![
                    account,
                    n.kind.as_str(),
                    n.subject,
                    n.raised_at,
                    n.detail,
                    n.sent_at,
                    n.held_since,
                    n.held_reply,
                    n.cleared_at,
                    n.clear_sent_at
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{attempt, tempdir};
    use super::*;

    #[test]
    fn health_keeps_the_first_failure_until_a_pass_goes_through() {
        let dir = tempdir();
        let l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        assert_eq!(l.health("a", "INBOX").unwrap(), Health::default());
        l.pass_ok("a", "INBOX", 10).unwrap();
        l.pass_failed("a", "INBOX", 20, "login refused").unwrap();
        l.pass_failed("a", "INBOX", 30, "login refused again")
            .unwrap();
        let h = l.health("a", "INBOX").unwrap();
        assert_eq!(h.last_ok_at, Some(10));
        assert_eq!(h.failing_since, Some(20));
        assert_eq!(
            (h.last_error.as_deref(), h.last_error_at),
            (Some("login refused again"), Some(30))
        );
        l.pass_ok("a", "INBOX", 40).unwrap();
        let h = l.health("a", "INBOX").unwrap();
        // The last error stays on record, with its time; it no longer fails.
        assert_eq!((h.last_ok_at, h.failing_since), (Some(40), None));
        assert_eq!(h.last_error_at, Some(30));
    }

    #[test]
    fn every_attempt_and_removal_is_counted_in_the_same_statement() {
        let dir = tempdir();
        let mut l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        l.record(&attempt(1, State::Deferred, &[])).unwrap();
        l.record(&attempt(1, State::Deferred, &[])).unwrap();
        l.record(&attempt(1, State::Delivered, &[])).unwrap();
        l.record(&attempt(2, State::Rejected, &[])).unwrap();
        // An operator's retry is no attempt; its next outcome is.
        let q = l.quarantined(None).unwrap();
        l.retry_quarantined(&Which::Ids(&[q[0].id]), 5).unwrap();
        l.record(&attempt(2, State::Delivered, &[])).unwrap();
        l.mark_purged("a", "INBOX", 7, &[1, 2], 9).unwrap();
        l.mark_purged("a", "INBOX", 7, &[1], 10).unwrap();
        let c = l.counters("a", "INBOX").unwrap();
        assert_eq!(
            c,
            Counters {
                delivered: 2,
                deferred: 2,
                rejected: 1,
                delivered_bytes: 200,
                purged: 2,
            }
        );
        assert_eq!(l.counters("a", "Other").unwrap(), Counters::default());
    }

    #[test]
    fn the_quarantine_is_retried_or_dropped_by_id() {
        let dir = tempdir();
        let mut l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        for uid in [1, 2, 3] {
            l.record(&attempt(uid, State::Rejected, &[])).unwrap();
        }
        l.record(&attempt(4, State::Delivered, &[])).unwrap();
        let q = l.quarantined(None).unwrap();
        assert_eq!(q.iter().map(|r| r.uid).collect::<Vec<_>>(), vec![1, 2, 3]);
        let s = l.summary("a", "INBOX", 0).unwrap();
        assert_eq!((s.rejected, s.delivered_total), (3, 1));
        // An ID that is not quarantined (a delivered row, a made-up one)
        // is left alone.
        let ids = [q[0].id, 4, 999];
        let retried = l.retry_quarantined(&Which::Ids(&ids), 2000).unwrap();
        assert_eq!(retried.iter().map(|r| r.uid).collect::<Vec<_>>(), vec![1]);
        assert_eq!(l.pending("a", "INBOX", 7).unwrap()[0].uid, 1);
        let dropped = l.drop_quarantined(&Which::Ids(&[q[1].id]), 3000).unwrap();
        assert_eq!(dropped.len(), 1);
        assert_eq!(
            l.quarantined(Some("a"))
                .unwrap()
                .iter()
                .map(|r| r.uid)
                .collect::<Vec<_>>(),
            vec![3]
        );
        assert!(l.quarantined(Some("b")).unwrap().is_empty());
        let kept = l.kept("a", "INBOX", 7).unwrap();
        assert_eq!(kept[1].dropped_at, Some(3000));
        let s = l.summary("a", "INBOX", 0).unwrap();
        assert_eq!((s.rejected, s.deferred), (1, 1));
    }
}
