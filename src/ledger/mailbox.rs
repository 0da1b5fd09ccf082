//! The ledger seen through one mailbox of one account, and through that
//! mailbox under one UIDVALIDITY: the names and the UIDVALIDITY are bound
//! once, so that callers (the pass, retention, the daemon's retry
//! schedule) never pass them around, and a row of one UIDVALIDITY is never
//! written under another.

use std::sync::Arc;

use anyhow::Result;

use super::{
    Attempt, Durability, Known, Ledger, LedgerHandle, MailboxState, MessageKey, OldRow, PassClose,
    PurgeRow,
};

struct Names {
    account: String,
    mailbox: String,
}

/// One mailbox of one account.
#[derive(Clone)]
pub struct MailboxLedger {
    ledger: LedgerHandle,
    names: Arc<Names>,
}

/// What retention reads of a mailbox before it plans.
pub struct PurgeView {
    pub state: Option<MailboxState>,
    pub last_purge_at: Option<i64>,
    pub rows: Vec<PurgeRow>,
}

impl MailboxLedger {
    pub fn new(ledger: &LedgerHandle, account: &str, mailbox: &str) -> MailboxLedger {
        MailboxLedger {
            ledger: ledger.clone(),
            names: Arc::new(Names {
                account: account.to_string(),
                mailbox: mailbox.to_string(),
            }),
        }
    }

    /// `f` on the ledger's thread, with the account's and mailbox's names.
    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ledger, &str, &str) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let names = self.names.clone();
        self.ledger
            .call(move |l| f(l, &names.account, &names.mailbox))
            .await
    }

    /// Its UIDVALIDITY and watermark; None before the first pass.
    pub async fn state(&self) -> Result<Option<MailboxState>> {
        self.call(|l, a, m| l.mailbox_state(a, m)).await
    }

    pub async fn for_purge(&self) -> Result<PurgeView> {
        self.call(|l, a, m| {
            Ok(PurgeView {
                state: l.mailbox_state(a, m)?,
                last_purge_at: l.last_purge_at(a, m)?,
                rows: l.purge_rows(a, m)?,
            })
        })
        .await
    }

    /// When the daemon retries this mailbox's deferred mail, and how much.
    pub async fn set_retry(&self, retry: Option<(i64, u32)>) -> Result<()> {
        self.call(move |l, a, m| l.set_retry(a, m, retry)).await
    }

    /// A pass went through (for `status`, alerts, metrics).
    pub async fn pass_ok(&self, now: i64) -> Result<()> {
        self.call(move |l, a, m| l.pass_ok(a, m, now)).await
    }

    /// A pass, or the connection for it, failed with `error`.
    pub async fn pass_failed(&self, now: i64, error: &str) -> Result<()> {
        let error = error.to_string();
        self.call(move |l, a, m| l.pass_failed(a, m, now, &error))
            .await
    }

    /// This mailbox under `uidvalidity`.
    pub fn epoch(&self, uidvalidity: u32) -> Epoch {
        Epoch {
            mailbox: self.clone(),
            uidvalidity,
        }
    }
}

/// One mailbox under one UIDVALIDITY: every row read or written carries it.
#[derive(Clone)]
pub struct Epoch {
    mailbox: MailboxLedger,
    uidvalidity: u32,
}

impl Epoch {
    pub fn uidvalidity(&self) -> u32 {
        self.uidvalidity
    }

    pub fn mailbox(&self) -> &str {
        &self.mailbox.names.mailbox
    }

    async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ledger, &str, &str, u32) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let uv = self.uidvalidity;
        self.mailbox.call(move |l, a, m| f(l, a, m, uv)).await
    }

    fn state(&self, watermark: u32) -> MailboxState {
        MailboxState {
            uidvalidity: self.uidvalidity,
            watermark,
        }
    }

    /// The key of message `uid`.
    pub fn key(&self, uid: u32) -> MessageKey {
        MessageKey {
            account: self.mailbox.names.account.clone(),
            mailbox: self.mailbox.names.mailbox.clone(),
            uidvalidity: self.uidvalidity,
            uid,
        }
    }

    /// What a pass plans from, read once ([`Known`]).
    pub async fn known(&self, watermark: u32) -> Result<Known> {
        self.call(move |l, a, m, uv| l.known(a, m, uv, watermark))
            .await
    }

    /// Makes this the mailbox's UIDVALIDITY, with `watermark`, from
    /// scratch: the mail below `skipped_below` was skipped on purpose
    /// (first contact with `initial = "none"`, a baseline).
    pub async fn start(&self, watermark: u32, skipped_below: u32, now: i64) -> Result<()> {
        let st = self.state(watermark);
        self.call(move |l, a, m, _| l.start_mailbox(a, m, st, skipped_below, now))
            .await
    }

    /// Messages found at first contact and deliberately not pulled.
    pub async fn record_skipped(
        &self,
        rows: Vec<(u32, Option<String>, Option<u64>)>,
        now: i64,
    ) -> Result<()> {
        self.call(move |l, a, m, uv| l.record_skipped(a, m, uv, &rows, now))
            .await
    }

    /// Rows of earlier UIDVALIDITYs that a resync can match.
    pub async fn old_rows(&self) -> Result<Vec<OldRow>> {
        self.call(|l, a, m, uv| l.old_rows(a, m, uv)).await
    }

    /// Moves matched old rows to this UIDVALIDITY and makes it the
    /// mailbox's, with `watermark`, in one transaction.
    pub async fn rekey(&self, moves: Vec<(OldRow, u32)>, watermark: u32, now: i64) -> Result<()> {
        let st = self.state(watermark);
        self.call(move |l, a, m, _| l.rekey(a, m, &moves, st, now))
            .await
    }

    pub async fn mark_flagged(&self, uids: Vec<u32>) -> Result<()> {
        self.call(move |l, a, m, uv| l.mark_flagged(a, m, uv, &uids))
            .await
    }

    pub async fn mark_purged(&self, uids: Vec<u32>, now: i64) -> Result<()> {
        self.call(move |l, a, m, uv| l.mark_purged(a, m, uv, &uids, now))
            .await
    }

    /// The end of a pass, in one transaction ([`PassClose`]).
    pub async fn close_pass(&self, close: PassClose, now: i64) -> Result<()> {
        self.call(move |l, a, m, uv| l.close_pass(a, m, uv, &close, now))
            .await
    }

    /// Records one delivery attempt, then fsyncs (see
    /// [`LedgerHandle::record_then_sync`]).
    pub fn record_then_sync(
        &self,
        attempt: Attempt,
        durability: Durability,
        then: impl FnOnce(Result<()>) + Send + 'static,
    ) -> tokio::sync::oneshot::Receiver<Result<()>> {
        debug_assert_eq!(attempt.key.uidvalidity, self.uidvalidity);
        self.mailbox
            .ledger
            .record_then_sync(attempt, durability, then)
    }

    /// The ledger's handle, for its fsyncs ([`LedgerHandle::sync`]).
    pub fn handle(&self) -> &LedgerHandle {
        &self.mailbox.ledger
    }
}
