//! The ledger: what imapull has done, in SQLite.
//!
//! One row per mailbox (its UIDVALIDITY and watermark) and one row per remote
//! message imapull acted on, keyed by (account, mailbox, UIDVALIDITY, UID).
//! A delivered row is committed right after the local server's final reply,
//! before any flag is stored on the remote, so a crash can at worst deliver
//! one message twice and never loses one. Nothing is ever removed from a
//! remote server unless a row here says `delivered` (see DESIGN.md).
//!
//! The API is synchronous; async callers go through [`LedgerHandle`], which
//! runs each call on tokio's blocking pool so that an fsync never stalls an
//! IMAP or SMTP socket.

mod mailbox;
mod migrations;
mod ops;

pub use mailbox::{Epoch, MailboxLedger, PurgeView};
pub use ops::{Counters, Health, Kept, MailboxRow, Quarantined, Summary, Which};

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::config::Durability;
use anyhow::{Context as _, Result};
use rusqlite::{params, Connection, OptionalExtension};

/// Another process holding the write lock (a second account's run, a
/// `status` query) finishes a transaction in milliseconds; ten seconds covers
/// a slow disk without hanging a run forever on a stuck one.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The state of one remote message, as stored in `message.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Every recipient got 2xx; the only state that permits removal.
    Delivered,
    /// 4xx, timeout or lost connection; retried before new mail.
    Deferred,
    /// 5xx or too large: quarantined until the operator acts.
    Rejected,
    /// Present at first contact and not pulled (`initial = "unseen"`).
    Skipped,
    /// Deferred once, then gone from the server before it could be retried.
    Vanished,
}

impl State {
    pub const ALL: [State; 5] = [
        State::Delivered,
        State::Deferred,
        State::Rejected,
        State::Skipped,
        State::Vanished,
    ];

    /// The state a ledger row spells `s`; None for a word that is none
    /// (the table's CHECK constraint keeps those out).
    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Delivered => "delivered",
            State::Deferred => "deferred",
            State::Rejected => "rejected",
            State::Skipped => "skipped",
            State::Vanished => "vanished",
        }
    }
}

/// Per-mailbox state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MailboxState {
    pub uidvalidity: u32,
    /// The UIDNEXT after the last pass that left no message unaccounted for.
    pub watermark: u32,
}

/// Identifies one remote message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MessageKey {
    pub account: String,
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
}

/// What one delivery attempt produced, ready to be written.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub key: MessageKey,
    pub message_id: Option<String>,
    pub size: u64,
    pub internaldate: Option<String>,
    pub state: State,
    pub reply: String,
    /// Recipients that have accepted the message so far (LMTP may accept
    /// some and defer others; a retry goes only to the rest).
    pub delivered_to: Vec<String>,
    pub now: i64,
}

/// A deferred message to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub uid: u32,
    pub delivered_to: Vec<String>,
}

/// What the ledger knows of a mailbox under one UIDVALIDITY, read once
/// at the start of a pass, for its plan.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Known {
    /// Delivered, `\Seen` not stored yet (a crash or a lost connection
    /// between delivery and STORE).
    pub unflagged: Vec<u32>,
    /// Deferred, oldest UID first.
    pub pending: Vec<Pending>,
    /// UIDs at or above the watermark that have a row, whatever its state.
    pub from_watermark: HashSet<u32>,
}

/// What the end of a pass writes, in one transaction.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassClose {
    /// Deferred before, gone from the server now.
    pub vanished: Vec<u32>,
    /// `\Seen` stored on these.
    pub flagged: Vec<u32>,
    /// The new watermark; None when the pass was not whole.
    pub watermark: Option<u32>,
}

/// A row as the retention planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeRow {
    pub uidvalidity: u32,
    pub uid: u32,
    pub state: String,
    pub delivered_at: Option<i64>,
    pub purged_at: Option<i64>,
    pub message_id: Option<String>,
    /// When the operator dropped it from the quarantine.
    pub dropped_at: Option<i64>,
}

impl PurgeRow {
    /// The row's state, typed.
    pub fn state(&self) -> Option<State> {
        State::parse(&self.state)
    }

    /// Since when retention may count: the delivery, or the operator's
    /// drop of a quarantined message; None for every other row.
    pub fn released_at(&self) -> Option<i64> {
        match self.state()? {
            State::Delivered => self.delivered_at,
            State::Rejected => self.dropped_at,
            _ => None,
        }
    }
}

/// A row as `imapull status` and the tests read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The row's number: the ID `imapull quarantine` takes.
    pub id: i64,
    pub account: String,
    pub mailbox: String,
    pub uidvalidity: u32,
    pub uid: u32,
    pub message_id: Option<String>,
    pub size: Option<i64>,
    pub state: String,
    pub attempts: i64,
    pub last_reply: Option<String>,
    pub delivered_to: Vec<String>,
    pub delivered_at: Option<i64>,
    pub flagged: bool,
    pub purged_at: Option<i64>,
}

impl Row {
    /// The row's state, typed.
    pub fn state(&self) -> Option<State> {
        State::parse(&self.state)
    }
}

/// A row left from an earlier UIDVALIDITY, for matching after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OldRow {
    pub uidvalidity: u32,
    pub uid: u32,
    pub message_id: String,
    pub size: i64,
}

pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    /// In WAL mode with synchronous=NORMAL: commits need [`LedgerHandle::sync`]
    /// to be safe from a power cut.
    wal: bool,
}

fn join_rcpts(r: &[String]) -> Option<String> {
    (!r.is_empty()).then(|| r.join("\n"))
}

fn split_rcpts(s: Option<String>) -> Vec<String> {
    s.map(|s| s.split('\n').map(str::to_string).collect())
        .unwrap_or_default()
}

/// The ledger holds the addresses and subjects of people's mail: a
/// directory imapull creates for it is 0700, and the file is created 0600
/// (SQLite gives its -wal and -shm files the same mode). An existing file
/// that others can read is made 0600, with a warning; an existing
/// directory is the operator's (systemd's StateDirectory, say) and is
/// left as it is.
fn private_file(path: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating the ledger directory {}", dir.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening the ledger {}", path.display()))?;
    let mode = file.metadata()?.permissions().mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            "the ledger {} was readable by others (mode {:o}); made it 0600",
            path.display(),
            mode & 0o777
        );
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

impl Ledger {
    /// Opens (creating if needed) the ledger at `path` and brings its schema
    /// up to date.
    pub fn open(path: &Path) -> Result<Ledger> {
        private_file(path)?;
        let mut conn = Connection::open(path)
            .with_context(|| format!("opening the ledger {}", path.display()))?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // WAL: readers (imapull status) never block the run, and a commit is
        // one append to the log. synchronous=NORMAL: a commit survives a
        // crash or kill of imapull at once; for a power cut, the delivery
        // path fsyncs the WAL itself ([`LedgerHandle::sync`]) while the next
        // message is on the wire, and holds that message's final "." back
        // until the fsync is done, so a power cut still cannot roll back
        // more than the message in flight (the window DESIGN.md allows).
        // Where WAL is not available, FULL keeps every commit on disk.
        // foreign_keys is set for future tables; none rely on it yet.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        let wal = mode.eq_ignore_ascii_case("wal");
        conn.pragma_update(None, "synchronous", if wal { "NORMAL" } else { "FULL" })?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::run(&mut conn)
            .with_context(|| format!("migrating the ledger {}", path.display()))?;
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            wal,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn mailbox_state(&self, account: &str, mailbox: &str) -> Result<Option<MailboxState>> {
        Ok(self
            .conn
            .query_row(
                "SELECT uidvalidity, watermark FROM mailbox WHERE account = ?1 AND mailbox = ?2",
                params![account, mailbox],
                |r| {
                    Ok(MailboxState {
                        uidvalidity: r.get(0)?,
                        watermark: r.get(1)?,
                    })
                },
            )
            .optional()?)
    }

    pub fn set_mailbox_state(
        &self,
        account: &str,
        mailbox: &str,
        state: MailboxState,
        now: i64,
    ) -> Result<()> {
        set_mailbox_state(&self.conn, account, mailbox, state, None, now)
    }

    /// A mailbox's state from scratch (first contact, a baseline): mail
    /// below `skipped_below` was skipped on purpose.
    pub fn start_mailbox(
        &self,
        account: &str,
        mailbox: &str,
        state: MailboxState,
        skipped_below: u32,
        now: i64,
    ) -> Result<()> {
        set_mailbox_state(
            &self.conn,
            account,
            mailbox,
            state,
            Some(skipped_below),
            now,
        )
    }

    /// UIDs at or above `from` that already have a row, whatever its state.
    pub fn known_uids_from(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        from: u32,
    ) -> Result<HashSet<u32>> {
        let mut st = self.conn.prepare_cached(
            "SELECT uid FROM message
             WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 AND uid >= ?4",
        )?;
        let rows = st.query_map(params![account, mailbox, uidvalidity, from], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deferred messages of this mailbox, oldest UID first.
    /// When the daemon will retry `mailbox`'s deferred mail (seconds since
    /// the epoch), and how many messages wait; None when nothing does.
    pub fn set_retry(&self, account: &str, mailbox: &str, retry: Option<(i64, u32)>) -> Result<()> {
        self.conn.execute(
            "UPDATE mailbox SET retry_at = ?3, retry_count = ?4 WHERE account = ?1 AND mailbox = ?2",
            params![account, mailbox, retry.map(|r| r.0), retry.map(|r| r.1)],
        )?;
        Ok(())
    }

    /// The scheduled retries: (account, mailbox, when, how many).
    pub fn retries(&self, account: Option<&str>) -> Result<Vec<(String, String, i64, u32)>> {
        let mut st = self.conn.prepare_cached(
            "SELECT account, mailbox, retry_at, retry_count FROM mailbox
             WHERE retry_at IS NOT NULL AND (?1 IS NULL OR account = ?1)
             ORDER BY account, mailbox",
        )?;
        let rows = st.query_map(params![account], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get::<_, Option<u32>>(3)?.unwrap_or(0),
            ))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn pending(&self, account: &str, mailbox: &str, uidvalidity: u32) -> Result<Vec<Pending>> {
        let mut st = self.conn.prepare_cached(
            "SELECT uid, delivered_to FROM message
             WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 AND state = 'deferred'
             ORDER BY uid",
        )?;
        let rows = st.query_map(params![account, mailbox, uidvalidity], |r| {
            Ok(Pending {
                uid: r.get(0)?,
                delivered_to: split_rcpts(r.get(1)?),
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Writes the outcome of one delivery attempt, in its own transaction.
    pub fn record(&self, a: &Attempt) -> Result<()> {
        let delivered_at = (a.state == State::Delivered).then_some(a.now);
        self.conn
            .prepare_cached(
                "INSERT INTO message (account, mailbox, uidvalidity, uid, message_id, size,
                   internaldate, state, attempts, last_reply, delivered_to, first_seen_at,
                   updated_at, delivered_at, flagged)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 1, ?9, ?10, ?11, ?11, ?12, 0)
                 ON CONFLICT (account, mailbox, uidvalidity, uid) DO UPDATE SET
                   message_id = coalesce(excluded.message_id, message.message_id),
                   size = excluded.size,
                   internaldate = coalesce(excluded.internaldate, message.internaldate),
                   state = excluded.state,
                   attempts = message.attempts + 1,
                   last_reply = excluded.last_reply,
                   delivered_to = excluded.delivered_to,
                   updated_at = excluded.updated_at,
                   delivered_at = excluded.delivered_at",
            )?
            .execute(params![
                a.key.account,
                a.key.mailbox,
                a.key.uidvalidity,
                a.key.uid,
                a.message_id,
                a.size as i64,
                a.internaldate,
                a.state.as_str(),
                a.reply,
                join_rcpts(&a.delivered_to),
                a.now,
                delivered_at,
            ])?;
        Ok(())
    }

    /// Records messages found at first contact and deliberately not pulled.
    pub fn record_skipped(
        &mut self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        rows: &[(u32, Option<String>, Option<u64>)],
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT OR IGNORE INTO message (account, mailbox, uidvalidity, uid, message_id,
                   size, state, attempts, first_seen_at, updated_at, flagged)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'skipped', 0, ?7, ?7, 0)",
            )?;
            for (uid, mid, size) in rows {
                st.execute(params![
                    account,
                    mailbox,
                    uidvalidity,
                    uid,
                    mid,
                    size.map(|s| s as i64),
                    now
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// What a pass plans from, in one read: see [`Known`].
    pub fn known(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        watermark: u32,
    ) -> Result<Known> {
        Ok(Known {
            unflagged: self.unflagged(account, mailbox, uidvalidity)?,
            pending: self.pending(account, mailbox, uidvalidity)?,
            from_watermark: self.known_uids_from(account, mailbox, uidvalidity, watermark)?,
        })
    }

    /// The end of a pass, in one transaction: the deferred messages found
    /// gone, the `\Seen` flags stored, and the new watermark (for a whole
    /// pass only).
    pub fn close_pass(
        &mut self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        close: &PassClose,
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        mark_vanished(&tx, account, mailbox, uidvalidity, &close.vanished, now)?;
        mark_flagged(&tx, account, mailbox, uidvalidity, &close.flagged)?;
        if let Some(watermark) = close.watermark {
            let state = MailboxState {
                uidvalidity,
                watermark,
            };
            set_mailbox_state(&tx, account, mailbox, state, None, now)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Delivered rows whose `\Seen` flag has not been stored yet (a crash or
    /// a lost connection between delivery and STORE).
    pub fn unflagged(&self, account: &str, mailbox: &str, uidvalidity: u32) -> Result<Vec<u32>> {
        let mut st = self.conn.prepare_cached(
            "SELECT uid FROM message
             WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3
               AND state = 'delivered' AND flagged = 0
             ORDER BY uid",
        )?;
        let rows = st.query_map(params![account, mailbox, uidvalidity], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn mark_flagged(
        &mut self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        mark_flagged(&tx, account, mailbox, uidvalidity, uids)?;
        tx.commit()?;
        Ok(())
    }

    /// Rows of this mailbox under another UIDVALIDITY that carry a
    /// Message-ID and a size: the candidates for re-keying after a change.
    pub fn old_rows(&self, account: &str, mailbox: &str, current: u32) -> Result<Vec<OldRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT uidvalidity, uid, message_id, size FROM message
             WHERE account = ?1 AND mailbox = ?2 AND uidvalidity != ?3
               AND message_id IS NOT NULL AND size IS NOT NULL",
        )?;
        let rows = st.query_map(params![account, mailbox, current], |r| {
            Ok(OldRow {
                uidvalidity: r.get(0)?,
                uid: r.get(1)?,
                message_id: r.get(2)?,
                size: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Moves matched rows to the new UIDVALIDITY and UIDs, in one
    /// transaction together with the new mailbox state, so that a crash
    /// leaves either the old world or the new one. The `\Seen` flag is not
    /// known to be on the renumbered message, so `flagged` is reset.
    pub fn rekey(
        &mut self,
        account: &str,
        mailbox: &str,
        moves: &[(OldRow, u32)],
        new_state: MailboxState,
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE message SET uidvalidity = ?5, uid = ?6, flagged = 0, updated_at = ?7
                 WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 AND uid = ?4",
            )?;
            for (old, new_uid) in moves {
                st.execute(params![
                    account,
                    mailbox,
                    old.uidvalidity,
                    old.uid,
                    new_state.uidvalidity,
                    new_uid,
                    now
                ])?;
            }
        }
        // Every message is matched or new after a change: none skipped.
        set_mailbox_state(&tx, account, mailbox, new_state, Some(1), now)?;
        tx.commit()?;
        Ok(())
    }

    /// Rows of a mailbox whose remote copy has not been removed, for the
    /// retention planner (which decides; this only reads).
    pub fn purge_rows(&self, account: &str, mailbox: &str) -> Result<Vec<PurgeRow>> {
        let mut st = self.conn.prepare_cached(
            "SELECT uidvalidity, uid, state, delivered_at, purged_at, message_id, dropped_at
             FROM message
             WHERE account = ?1 AND mailbox = ?2 AND purged_at IS NULL
             ORDER BY uidvalidity, uid",
        )?;
        let rows = st.query_map(params![account, mailbox], |r| {
            Ok(PurgeRow {
                uidvalidity: r.get(0)?,
                uid: r.get(1)?,
                state: r.get(2)?,
                delivered_at: r.get(3)?,
                purged_at: r.get(4)?,
                message_id: r.get(5)?,
                dropped_at: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Records removals from the server (or a purge that found nothing to
    /// do, with `uids` empty) and the time of the purge.
    pub fn mark_purged(
        &mut self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        uids: &[u32],
        now: i64,
    ) -> Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "UPDATE message SET purged_at = ?5, updated_at = ?5
                 WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 AND uid = ?4
                   AND (state = 'delivered' OR (state = 'rejected' AND dropped_at IS NOT NULL))",
            )?;
            for uid in uids {
                st.execute(params![account, mailbox, uidvalidity, uid, now])?;
            }
            tx.execute(
                "UPDATE mailbox SET last_purge_at = ?3 WHERE account = ?1 AND mailbox = ?2",
                params![account, mailbox, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn last_purge_at(&self, account: &str, mailbox: &str) -> Result<Option<i64>> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_purge_at FROM mailbox WHERE account = ?1 AND mailbox = ?2",
                params![account, mailbox],
                |r| r.get(0),
            )
            .optional()?
            .flatten())
    }

    /// Every message row, optionally of one account, in key order.
    pub fn rows(&self, account: Option<&str>) -> Result<Vec<Row>> {
        let mut st = self.conn.prepare_cached(
            "SELECT account, mailbox, uidvalidity, uid, message_id, size, state, attempts,
                    last_reply, delivered_to, delivered_at, flagged, purged_at, rowid
             FROM message WHERE ?1 IS NULL OR account = ?1
             ORDER BY account, mailbox, uidvalidity, uid",
        )?;
        let rows = st.query_map(params![account], |r| {
            Ok(Row {
                account: r.get(0)?,
                mailbox: r.get(1)?,
                uidvalidity: r.get(2)?,
                uid: r.get(3)?,
                message_id: r.get(4)?,
                size: r.get(5)?,
                state: r.get(6)?,
                attempts: r.get(7)?,
                last_reply: r.get(8)?,
                delivered_to: split_rcpts(r.get(9)?),
                delivered_at: r.get(10)?,
                flagged: r.get::<_, i64>(11)? != 0,
                purged_at: r.get(12)?,
                id: r.get(13)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// The statements that a standalone call and a pass's closing transaction
/// share; `c` is the connection or an open transaction.
/// `skipped_below`: the UID below which mail was skipped on purpose (first
/// contact, a UIDVALIDITY change, a baseline set it); None keeps it.
fn set_mailbox_state(
    c: &Connection,
    account: &str,
    mailbox: &str,
    state: MailboxState,
    skipped_below: Option<u32>,
    now: i64,
) -> Result<()> {
    c.prepare_cached(
        "INSERT INTO mailbox (account, mailbox, uidvalidity, watermark, updated_at, skipped_below)
         VALUES (?1, ?2, ?3, ?4, ?5, coalesce(?6, 1))
         ON CONFLICT (account, mailbox) DO UPDATE SET
           uidvalidity = excluded.uidvalidity,
           watermark = excluded.watermark,
           updated_at = excluded.updated_at,
           skipped_below = coalesce(?6, mailbox.skipped_below)",
    )?
    .execute(params![
        account,
        mailbox,
        state.uidvalidity,
        state.watermark,
        now,
        skipped_below
    ])?;
    Ok(())
}

/// Marks deferred messages that are no longer on the server.
fn mark_vanished(
    c: &Connection,
    account: &str,
    mailbox: &str,
    uidvalidity: u32,
    uids: &[u32],
    now: i64,
) -> Result<()> {
    let mut st = c.prepare_cached(
        "UPDATE message SET state = 'vanished', updated_at = ?5,
           last_reply = 'no longer on the server when retried'
         WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 AND uid = ?4
           AND state = 'deferred'",
    )?;
    for uid in uids {
        st.execute(params![account, mailbox, uidvalidity, uid, now])?;
    }
    Ok(())
}

/// Records that `\Seen` is stored on these messages.
fn mark_flagged(
    c: &Connection,
    account: &str,
    mailbox: &str,
    uidvalidity: u32,
    uids: &[u32],
) -> Result<()> {
    let mut st = c.prepare_cached(
        "UPDATE message SET flagged = 1
         WHERE account = ?1 AND mailbox = ?2 AND uidvalidity = ?3 AND uid = ?4",
    )?;
    for uid in uids {
        st.execute(params![account, mailbox, uidvalidity, uid])?;
    }
    Ok(())
}

/// A ledger shared by the tasks of one run; every call runs on the blocking
/// pool.
#[derive(Clone)]
pub struct LedgerHandle {
    inner: Arc<Mutex<Ledger>>,
    /// The write-ahead log, which an fsync makes safe from a power cut.
    wal: Option<PathBuf>,
    /// Commits of `durability = "grouped"` not yet fsynced.
    unsynced: Arc<Mutex<Unsynced>>,
}

/// How many commits wait for an fsync, and since when.
#[derive(Default)]
struct Unsynced {
    count: u32,
    since: Option<std::time::Instant>,
    /// fsyncs so far, for the pass's log.
    fsyncs: u64,
}

/// `durability = "grouped"`: an fsync at least every this many messages...
pub const GROUP_MAX_MESSAGES: u32 = 100;
/// ...and at least this soon after the first commit it covers.
pub const GROUP_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(50);

impl LedgerHandle {
    pub fn new(l: Ledger) -> LedgerHandle {
        let wal = l.wal.then(|| {
            let mut p = l.path.clone().into_os_string();
            p.push("-wal");
            PathBuf::from(p)
        });
        // A process that died may have left commits that are not on disk
        // yet: made durable here, so that everything this process reads
        // from the ledger before it flags or removes mail is on disk.
        if let Some(w) = wal.as_deref().filter(|w| w.exists()) {
            if let Err(e) = sync_wal(Some(w)) {
                tracing::warn!("syncing the ledger's log: {e:#}");
            }
        }
        LedgerHandle {
            inner: Arc::new(Mutex::new(l)),
            wal,
            unsynced: Arc::default(),
        }
    }

    /// Records a delivery attempt and then makes it durable against a power
    /// cut (an fsync of the write-ahead log: a commit is a WAL append, and
    /// SQLite replays the log's valid frames after a crash), in one job on
    /// the blocking pool, so that the fsync starts the moment the row is
    /// committed. The receiver answers when the row is committed (from then
    /// on a crash of imapull cannot lose it); `then` is called with the
    /// fsync's result, on the blocking thread.
    ///
    /// With [`Durability::Grouped`] the fsync waits until
    /// [`GROUP_MAX_MESSAGES`] commits or [`GROUP_MAX_AGE`] have gathered
    /// (then is called at once when it is not due); [`Self::sync_due`] and
    /// [`Self::sync`] do the rest.
    pub fn record_then_sync(
        &self,
        attempt: Attempt,
        durability: Durability,
        then: impl FnOnce(Result<()>) + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<()>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Grouped, and the ledger free: the commit (an append to the log,
        // tens of microseconds) is made here, which spares two hand-overs
        // between threads per message; an fsync still goes to the blocking
        // pool.
        if durability == Durability::Grouped {
            if let Ok(l) = self.inner.try_lock() {
                let recorded = l.record(&attempt).map_err(|e| e.context(LedgerFailure));
                drop(l);
                match self.committed(recorded, tx, durability) {
                    Ok(true) => {
                        let me = self.clone();
                        tokio::task::spawn_blocking(move || then(me.sync_blocking()));
                    }
                    r => then(r.map(drop)),
                }
                return rx;
            }
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let recorded = me
                .inner
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(&attempt)
                .map_err(|e| e.context(LedgerFailure));
            then(me.committed(recorded, tx, durability).and_then(|sync| {
                if sync {
                    me.sync_blocking()
                } else {
                    Ok(())
                }
            }));
        });
        rx
    }

    /// Hands a commit's result to the delivery waiting for it; whether an
    /// fsync must follow now (an error: the delivery was not recorded).
    fn committed(
        &self,
        recorded: Result<()>,
        tx: tokio::sync::oneshot::Sender<Result<()>>,
        durability: Durability,
    ) -> Result<bool> {
        let ok = recorded.is_ok();
        let _ = tx.send(recorded);
        if !ok {
            anyhow::bail!("the delivery was not recorded");
        }
        Ok(match durability {
            Durability::Message => true,
            Durability::Grouped => self.count_grouped(),
        })
    }

    /// The fsyncs of the log so far.
    pub fn fsyncs(&self) -> u64 {
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .fsyncs
    }

    /// Counts a grouped commit; whether its fsync is due now.
    fn count_grouped(&self) -> bool {
        let mut u = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        u.count += 1;
        let since = *u.since.get_or_insert_with(std::time::Instant::now);
        u.count >= GROUP_MAX_MESSAGES || since.elapsed() >= GROUP_MAX_AGE
    }

    /// An fsync of the log when grouped commits have waited for
    /// [`GROUP_MAX_AGE`]: a pass calls it while its messages come slowly.
    pub async fn sync_due(&self) -> Result<()> {
        let due = {
            let u = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
            u.since.is_some_and(|s| s.elapsed() >= GROUP_MAX_AGE)
        };
        if !due {
            return Ok(());
        }
        self.sync().await
    }

    /// An fsync of the log if any commit waits for one: the end of a pass,
    /// before anything changes on the server.
    pub async fn sync(&self) -> Result<()> {
        if self
            .unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count
            == 0
        {
            return Ok(());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.sync_blocking())
            .await
            .context("ledger task panicked")?
            .map_err(|e| e.context(LedgerFailure))
    }

    /// fsyncs the log; what was committed before is then safe, so it is
    /// taken off the count of what waits.
    fn sync_blocking(&self) -> Result<()> {
        let covered = self
            .unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .count;
        sync_wal(self.wal.as_deref())?;
        let mut u = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        u.fsyncs += 1;
        u.count = u.count.saturating_sub(covered);
        if u.count == 0 {
            u.since = None;
        }
        Ok(())
    }

    pub async fn call<R, F>(&self, f: F) -> Result<R>
    where
        F: FnOnce(&mut Ledger) -> Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut l = inner.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut l)
        })
        .await
        .context("ledger task panicked")?
        .map_err(|e| e.context(LedgerFailure))
    }
}

fn sync_wal(wal: Option<&std::path::Path>) -> Result<()> {
    if let Some(wal) = wal {
        std::fs::File::open(wal)
            .and_then(|f| f.sync_data())
            .with_context(|| format!("syncing {}", wal.display()))?;
    }
    Ok(())
}

/// Marks an error as the ledger's: the run cannot go on without it.
#[derive(Debug, thiserror::Error)]
#[error("ledger failure")]
pub struct LedgerFailure;

#[cfg(test)]
mod tests {
    use super::*;

    fn key(uid: u32) -> MessageKey {
        MessageKey {
            account: "a".into(),
            mailbox: "INBOX".into(),
            uidvalidity: 7,
            uid,
        }
    }

    pub(super) fn attempt(uid: u32, state: State, to: &[&str]) -> Attempt {
        Attempt {
            key: key(uid),
            message_id: Some(format!("<{uid}@x>")),
            size: 100,
            internaldate: None,
            state,
            reply: "250 ok".into(),
            delivered_to: to.iter().map(|s| s.to_string()).collect(),
            now: 1000,
        }
    }

    /// Each recorded delivery, and when its `then` ran with what.
    async fn record_many(h: &LedgerHandle, n: u32, durability: Durability) {
        for uid in 1..=n {
            let (tx, rx) = tokio::sync::oneshot::channel();
            h.record_then_sync(attempt(uid, State::Delivered, &["x@y"]), durability, |r| {
                let _ = tx.send(r.is_ok());
            })
            .await
            .unwrap()
            .unwrap();
            assert!(rx.await.unwrap(), "then got an error");
        }
    }

    #[tokio::test]
    async fn grouped_durability_fsyncs_every_hundred_and_at_the_end() {
        let dir = tempdir();
        let h = LedgerHandle::new(Ledger::open(&dir.path().join("l.sqlite3")).unwrap());
        record_many(&h, 10, Durability::Message).await;
        assert_eq!(h.fsyncs(), 10, "one a message");
        // Quick commits: an fsync every GROUP_MAX_MESSAGES (or sooner, on a
        // slow machine, every GROUP_MAX_AGE), and one at the end.
        record_many(&h, 250, Durability::Grouped).await;
        let grouped = h.fsyncs() - 10;
        assert!((2..=125).contains(&grouped), "{grouped} fsyncs for 250");
        h.sync().await.unwrap();
        assert_eq!(h.fsyncs() - 10, grouped + 1, "the end of the pass");
        h.sync().await.unwrap();
        assert_eq!(h.fsyncs() - 10, grouped + 1, "nothing left to sync");
        // A commit that waited GROUP_MAX_AGE is due.
        record_many(&h, 1, Durability::Grouped).await;
        std::thread::sleep(GROUP_MAX_AGE + Duration::from_millis(10));
        h.sync_due().await.unwrap();
        assert_eq!(h.fsyncs() - 10, grouped + 2, "due after GROUP_MAX_AGE");
    }

    #[test]
    fn record_upserts_and_counts_attempts() {
        let dir = tempdir();
        let l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        l.record(&attempt(5, State::Deferred, &["x@y"])).unwrap();
        assert_eq!(
            l.pending("a", "INBOX", 7).unwrap(),
            vec![Pending {
                uid: 5,
                delivered_to: vec!["x@y".into()]
            }]
        );
        l.record(&attempt(5, State::Delivered, &["x@y", "z@y"]))
            .unwrap();
        let rows = l.rows(None).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].attempts, 2);
        assert_eq!(rows[0].state, "delivered");
        assert_eq!(rows[0].delivered_at, Some(1000));
        assert!(l.pending("a", "INBOX", 7).unwrap().is_empty());
        assert_eq!(l.unflagged("a", "INBOX", 7).unwrap(), vec![5]);
    }

    /// What a pass reads once and what it commits at the end.
    #[test]
    fn known_then_close_pass() {
        let dir = tempdir();
        let mut l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        let start = MailboxState {
            uidvalidity: 7,
            watermark: 10,
        };
        l.set_mailbox_state("a", "INBOX", start, 1).unwrap();
        l.record(&attempt(3, State::Deferred, &[])).unwrap();
        l.record(&attempt(4, State::Delivered, &[])).unwrap();
        l.record(&attempt(11, State::Rejected, &[])).unwrap();
        let k = l.known("a", "INBOX", 7, 10).unwrap();
        assert_eq!(k.unflagged, vec![4]);
        assert_eq!(k.pending.iter().map(|p| p.uid).collect::<Vec<_>>(), vec![3]);
        assert_eq!(k.from_watermark, HashSet::from([11]));
        // A pass that was not whole: the vanished and the flags, no watermark.
        let close = PassClose {
            vanished: vec![3, 4],
            flagged: vec![4],
            watermark: None,
        };
        l.close_pass("a", "INBOX", 7, &close, 2).unwrap();
        assert_eq!(l.mailbox_state("a", "INBOX").unwrap(), Some(start));
        let rows = l.rows(None).unwrap();
        let state = |uid| rows.iter().find(|r| r.uid == uid).unwrap().state.clone();
        // Only a deferred row becomes vanished.
        assert_eq!(
            (state(3).as_str(), state(4).as_str()),
            ("vanished", "delivered")
        );
        assert!(l.unflagged("a", "INBOX", 7).unwrap().is_empty());
        let whole = PassClose {
            watermark: Some(12),
            ..PassClose::default()
        };
        l.close_pass("a", "INBOX", 7, &whole, 3).unwrap();
        assert_eq!(
            l.mailbox_state("a", "INBOX").unwrap().unwrap().watermark,
            12
        );
    }

    #[test]
    fn reopen_keeps_schema_and_data() {
        let dir = tempdir();
        let p = dir.path().join("l.sqlite3");
        Ledger::open(&p)
            .unwrap()
            .record(&attempt(1, State::Rejected, &[]))
            .unwrap();
        let l = Ledger::open(&p).unwrap();
        assert_eq!(l.rows(Some("a")).unwrap().len(), 1);
        assert!(l.rows(Some("b")).unwrap().is_empty());
    }

    #[test]
    fn state_check_constraint() {
        let dir = tempdir();
        let l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        let r = l.conn.execute(
            "INSERT INTO message (account, mailbox, uidvalidity, uid, state, attempts,
               first_seen_at, updated_at, flagged) VALUES ('a','b',1,1,'gone',0,0,0,0)",
            [],
        );
        assert!(r.is_err());
    }

    /// Removed when dropped, also when the test fails.
    pub(super) fn tempdir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("imapull-ledger-test-")
            .tempdir()
            .unwrap()
    }

    #[test]
    fn states_spell_and_parse_back() {
        for st in State::ALL {
            assert_eq!(State::parse(st.as_str()), Some(st));
        }
        assert_eq!(State::parse("gone"), None);
    }

    #[test]
    fn retries_are_kept_per_mailbox() {
        let dir = tempdir();
        let l = Ledger::open(&dir.path().join("l.sqlite3")).unwrap();
        let st = MailboxState {
            uidvalidity: 1,
            watermark: 1,
        };
        l.set_mailbox_state("a", "INBOX", st, 0).unwrap();
        l.set_retry("a", "INBOX", Some((1000, 3))).unwrap();
        assert_eq!(
            l.retries(None).unwrap(),
            vec![("a".into(), "INBOX".into(), 1000, 3)]
        );
        assert!(l.retries(Some("b")).unwrap().is_empty());
        l.set_retry("a", "INBOX", None).unwrap();
        assert!(l.retries(None).unwrap().is_empty());
    }

    #[test]
    fn ledger_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempdir();
        let p = dir.path().join("new/dir/l.sqlite3");
        let l = Ledger::open(&p).unwrap();
        l.record(&attempt(1, State::Delivered, &["x@y"])).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        assert_eq!(mode(&dir.path().join("new/dir")), 0o700);
        assert_eq!(mode(&p), 0o600);
        let wal = p.with_extension("sqlite3-wal");
        assert_eq!(mode(&wal), 0o600);
        drop(l);
        // An existing ledger that others could read is tightened.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        Ledger::open(&p).unwrap();
        assert_eq!(mode(&p), 0o600);
    }
}
