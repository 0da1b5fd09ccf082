//! Numbered, forward-only schema migrations.
//!
//! `PRAGMA user_version` holds the number of migrations applied. A migration
//! is never edited once released: a change is a new entry at the end. A
//! ledger written by a newer imapull is refused rather than misread.

use anyhow::{bail, Result};
use rusqlite::Connection;

const MIGRATIONS: &[&str] = &[
    // 1: mailboxes and messages.
    "CREATE TABLE mailbox (
        account     TEXT NOT NULL,
        mailbox     TEXT NOT NULL,
        uidvalidity INTEGER NOT NULL,
        watermark   INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (account, mailbox)
     ) STRICT;
     CREATE TABLE message (
        account       TEXT NOT NULL,
        mailbox       TEXT NOT NULL,
        uidvalidity   INTEGER NOT NULL,
        uid           INTEGER NOT NULL,
        message_id    TEXT,
        size          INTEGER,
        internaldate  TEXT,
        state         TEXT NOT NULL
                      CHECK (state IN ('delivered','deferred','rejected','skipped','vanished')),
        attempts      INTEGER NOT NULL,
        last_reply    TEXT,
        delivered_to  TEXT,
        first_seen_at INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        delivered_at  INTEGER,
        flagged       INTEGER NOT NULL,
        PRIMARY KEY (account, mailbox, uidvalidity, uid)
     ) STRICT;
     CREATE INDEX message_by_state ON message (account, mailbox, state);",
    // 2: retention. When a remote copy was removed, and when a mailbox was
    // last purged (purges are rate-limited by purge_interval).
    "ALTER TABLE message ADD COLUMN purged_at INTEGER;
     ALTER TABLE mailbox ADD COLUMN last_purge_at INTEGER;",
    // 3: the daemon's next retry of a mailbox's deferred mail, and how many
    // were deferred, for `imapull status`.
    "ALTER TABLE mailbox ADD COLUMN retry_at INTEGER;
     ALTER TABLE mailbox ADD COLUMN retry_count INTEGER;",
    // 4: operating. How each mailbox's passes went (`imapull status`,
    // alerts), kept apart from `mailbox` because a login can fail before a
    // mailbox has a state; the UID below which first contact or a baseline
    // skipped mail on purpose (`imapull verify`), for existing mailboxes
    // the lowest UID imapull ever recorded there (mail below it predates
    // imapull), else the watermark; when the operator dropped a
    // quarantined message (`imapull quarantine drop`).
    "CREATE TABLE health (
        account       TEXT NOT NULL,
        mailbox       TEXT NOT NULL,
        last_ok_at    INTEGER,
        last_error    TEXT,
        last_error_at INTEGER,
        failing_since INTEGER,
        PRIMARY KEY (account, mailbox)
     ) STRICT;
     ALTER TABLE mailbox ADD COLUMN skipped_below INTEGER;
     UPDATE mailbox SET skipped_below = coalesce(
        (SELECT min(uid) FROM message m
          WHERE m.account = mailbox.account AND m.mailbox = mailbox.mailbox
            AND m.uidvalidity = mailbox.uidvalidity),
        watermark);
     ALTER TABLE message ADD COLUMN dropped_at INTEGER;",
    // 5: alerts. One row per condition an operator is told about (an
    // account failing, mail stuck, a message quarantined): when it was
    // found, when its notice went out (or since when the local server has
    // refused it), when it ended and when that was told; so that no notice
    // is sent twice, across restarts too.
    "CREATE TABLE notice (
        account       TEXT NOT NULL,
        kind          TEXT NOT NULL,
        subject       TEXT NOT NULL,
        raised_at     INTEGER NOT NULL,
        detail        TEXT NOT NULL,
        sent_at       INTEGER,
        held_since    INTEGER,
        held_reply    TEXT,
        cleared_at    INTEGER,
        clear_sent_at INTEGER,
        PRIMARY KEY (account, kind, subject)
     ) STRICT;",
    // 6: metrics. The attempts that were deferred or rejected, per
    // mailbox, counted by triggers in the same statement as the row they
    // count (no extra commit on the delivery path). Deliveries and purges
    // need no counter: their rows stay, so counting them is a query. Only
    // those two outcomes fire a trigger, so a delivery costs nothing more.
    // (A trigger runs under the conflict policy of the statement that
    // fires it, so a missing counter row is made with NOT EXISTS, not OR
    // IGNORE.)
    "CREATE TABLE counter (
        account TEXT NOT NULL,
        mailbox TEXT NOT NULL,
        name    TEXT NOT NULL,
        value   INTEGER NOT NULL,
        PRIMARY KEY (account, mailbox, name)
     ) STRICT;
     INSERT INTO counter (account, mailbox, name, value)
        SELECT account, mailbox, 'rejected', count(*) FROM message
         WHERE state = 'rejected' GROUP BY account, mailbox;
     CREATE TRIGGER count_first_attempt AFTER INSERT ON message
        WHEN NEW.state IN ('deferred', 'rejected')
     BEGIN
        INSERT INTO counter SELECT NEW.account, NEW.mailbox, NEW.state, 0
         WHERE NOT EXISTS (SELECT 1 FROM counter
           WHERE account = NEW.account AND mailbox = NEW.mailbox AND name = NEW.state);
        UPDATE counter SET value = value + 1
         WHERE account = NEW.account AND mailbox = NEW.mailbox AND name = NEW.state;
     END;
     CREATE TRIGGER count_next_attempt AFTER UPDATE OF attempts ON message
        WHEN NEW.attempts > OLD.attempts AND NEW.state IN ('deferred', 'rejected')
     BEGIN
        INSERT INTO counter SELECT NEW.account, NEW.mailbox, NEW.state, 0
         WHERE NOT EXISTS (SELECT 1 FROM counter
           WHERE account = NEW.account AND mailbox = NEW.mailbox AND name = NEW.state);
        UPDATE counter SET value = value + 1
         WHERE account = NEW.account AND mailbox = NEW.mailbox AND name = NEW.state;
     END;",
];

pub fn run(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let version = usize::try_from(version).unwrap_or(usize::MAX);
    if version > MIGRATIONS.len() {
        bail!(
            "the ledger has schema version {version}, newer than this imapull knows ({}); \
             run a newer imapull or restore a backup",
            MIGRATIONS.len()
        );
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ledger written by the release before the operating migrations
    /// (version 3), with rows, brought up to date: what it already knew
    /// is kept, `skipped_below` and the counters are filled from it.
    #[test]
    fn a_version_3_ledger_with_rows_is_brought_up_to_date() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite3");
        {
            let mut c = Connection::open(&path).unwrap();
            for (i, sql) in MIGRATIONS.iter().enumerate().take(3) {
                let tx = c.transaction().unwrap();
                tx.execute_batch(sql).unwrap();
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .unwrap();
                tx.commit().unwrap();
            }
            c.execute_batch(
                "INSERT INTO mailbox (account, mailbox, uidvalidity, watermark, updated_at)
                   VALUES ('a', 'INBOX', 7, 50, 0), ('a', 'Empty', 7, 9, 0);
                 INSERT INTO message (account, mailbox, uidvalidity, uid, size, state, attempts,
                   first_seen_at, updated_at, delivered_at, flagged)
                   VALUES ('a', 'INBOX', 7, 40, 100, 'delivered', 1, 0, 0, 0, 1),
                          ('a', 'INBOX', 7, 41, 100, 'rejected', 1, 0, 0, NULL, 0),
                          ('a', 'INBOX', 6, 3, 100, 'delivered', 1, 0, 0, 0, 1);",
            )
            .unwrap();
        }
        let l = crate::ledger::Ledger::open(&path).unwrap();
        // Mail below the lowest UID imapull recorded under the current
        // UIDVALIDITY predates it; with no rows, the watermark.
        assert_eq!(
            l.mailbox_row("a", "INBOX").unwrap().unwrap().skipped_below,
            40
        );
        assert_eq!(
            l.mailbox_row("a", "Empty").unwrap().unwrap().skipped_below,
            9
        );
        let c = l.counters("a", "INBOX").unwrap();
        assert_eq!((c.delivered, c.rejected, c.delivered_bytes), (2, 1, 200));
        assert_eq!(l.rows(None).unwrap().len(), 3);
        assert_eq!(l.quarantined(None).unwrap().len(), 1);
        assert!(l.notices("a").unwrap().is_empty());
    }
}
