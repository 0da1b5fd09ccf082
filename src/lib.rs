//! imapull: pull mail from IMAP mailboxes and deliver it to a local SMTP or
//! LMTP server, with a crash-safe SQLite ledger.
//!
//! - [`config`]: the TOML file, as written and resolved;
//! - [`imap`]: connecting and the IMAP commands a pass uses;
//! - [`deliver`]: the SMTP/LMTP client and the wire encoding;
//! - [`ledger`]: what has been done, in SQLite;
//! - [`pull`]: one pass of one mailbox, as a fetch → deliver pipeline;
//! - [`purge`]: retention, the only code that removes mail from a server;
//! - [`run_once`]: every account and mailbox once, as `imapull run` does.
//!
//! `main.rs` only parses arguments, sets up logging and maps the result to
//! an exit code; everything else lives here, where the tests reach it.

pub mod alert;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod deliver;
pub mod imap;
pub mod ledger;
pub mod lock;
pub mod metrics;
pub mod net;
pub mod oauth;
pub mod ops;
pub mod progress;
pub mod pull;
pub mod purge;
pub mod secret;
pub mod tunnel;

use std::sync::Arc;

use anyhow::Result;
use tracing::Instrument as _;

use config::{Account, Config};
use deliver::Sessions;
use ledger::{Ledger, LedgerHandle};
use pull::{Ctx, PassReport};

/// sysexits(3) codes, used as documented in docs/operations.md.
pub mod exit {
    pub const OK: i32 = 0;
    pub const USAGE: i32 = 64;
    pub const DATAERR: i32 = 65;
    pub const UNAVAILABLE: i32 = 69;
    pub const SOFTWARE: i32 = 70;
    pub const CANTCREAT: i32 = 73;
    pub const TEMPFAIL: i32 = 75;
    pub const NOPERM: i32 = 77;
    pub const CONFIG: i32 = 78;

    /// The code for an error, in one place: the first typed error in its
    /// chain that says what went wrong decides; `otherwise` when none does
    /// (what the caller was doing: a pass is UNAVAILABLE, a command is
    /// SOFTWARE). Never decided by an error's text.
    pub fn for_error(e: &anyhow::Error, otherwise: i32) -> i32 {
        use super::imap::ConnectError;
        if find::<super::UnknownAccount>(e).is_some()
            || find::<super::UnknownState>(e).is_some()
            || find::<super::UnknownMailbox>(e).is_some()
        {
            return USAGE;
        }
        if find::<super::config::ConfigError>(e).is_some() {
            return CONFIG;
        }
        if find::<super::lock::Busy>(e).is_some() {
            return CANTCREAT;
        }
        if find::<super::ledger::LedgerFailure>(e).is_some() {
            return SOFTWARE;
        }
        match find::<ConnectError>(e) {
            Some(ConnectError::Auth(_)) => NOPERM,
            Some(ConnectError::Unavailable(_)) => UNAVAILABLE,
            None => otherwise,
        }
    }

    /// A `T` anywhere in `e`: among anyhow's contexts (which `chain()`
    /// shows wrapped) or among the `source()`s of the errors it holds.
    pub fn find<T: std::error::Error + Send + Sync + 'static>(e: &anyhow::Error) -> Option<&T> {
        e.downcast_ref::<T>()
            .or_else(|| e.chain().find_map(|c| c.downcast_ref::<T>()))
    }
}

/// A mailbox named on the command line that the account does not pull.
#[derive(Debug, thiserror::Error)]
#[error("{account} has no mailbox {name:?} in `mailboxes` (it has {known})")]
pub struct UnknownMailbox {
    pub account: String,
    pub name: String,
    pub known: String,
}

/// A message state named on the command line that there is none of.
#[derive(Debug, thiserror::Error)]
#[error("no message state {0:?} (there are delivered, deferred, rejected, skipped, vanished)")]
pub struct UnknownState(pub String);

/// An account named on the command line that the config does not have.
#[derive(Debug, thiserror::Error)]
#[error("no account {name:?} in {path} (known: {known})")]
pub struct UnknownAccount {
    pub name: String,
    pub path: String,
    pub known: String,
}

/// How one account's run ended.
#[derive(Debug)]
pub struct AccountResult {
    pub account: String,
    pub report: PassReport,
    /// Remote copies removed by retention.
    pub removed: usize,
    /// Why the account stopped early, with the exit code it maps to.
    pub failure: Option<(i32, String)>,
}

impl AccountResult {
    /// The exit code this account alone would give.
    pub fn exit_code(&self) -> i32 {
        if let Some((code, _)) = &self.failure {
            return *code;
        }
        if self.report.rejected > 0 {
            exit::DATAERR
        } else if self.report.deferred > 0 || self.report.incomplete {
            exit::TEMPFAIL
        } else {
            exit::OK
        }
    }
}

/// The exit code of a whole run: the most serious of its accounts'.
pub fn run_exit_code(results: &[AccountResult]) -> i32 {
    // Most serious first: a bug, a broken config, credentials, an
    // unreachable server, a held lock, a quarantined message, a deferral.
    const ORDER: [i32; 8] = [
        exit::SOFTWARE,
        exit::CONFIG,
        exit::NOPERM,
        exit::UNAVAILABLE,
        exit::CANTCREAT,
        exit::DATAERR,
        exit::TEMPFAIL,
        exit::OK,
    ];
    let codes: Vec<i32> = results.iter().map(AccountResult::exit_code).collect();
    ORDER
        .into_iter()
        .find(|c| codes.contains(c))
        .unwrap_or(exit::OK)
}

/// Seconds since the epoch from the system clock.
pub fn system_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What a run does with each mailbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `imapull run`: a pass, then the purge if one is due.
    Pull,
    /// `imapull purge`: only the purge, whatever `purge_interval` says.
    Purge,
}

/// A clock: seconds since the epoch. Injected so tests can move time.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

/// One pass over the named accounts (all when `only` is empty).
pub async fn run_once(config: &Config, only: &[String], now: Clock) -> Result<Vec<AccountResult>> {
    run_accounts(config, only, now, Mode::Pull).await
}

/// Checks that every named account exists.
pub fn check_accounts(config: &Config, only: &[String]) -> Result<()> {
    for name in only {
        if config.account(name).is_none() {
            return Err(UnknownAccount {
                name: name.clone(),
                path: config.path.display().to_string(),
                known: config
                    .accounts
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }
            .into());
        }
    }
    Ok(())
}

/// Runs `mode` over the named accounts (all when `only` is empty), up to
/// `parallel_accounts` (from the config) at once.
pub async fn run_accounts(
    config: &Config,
    only: &[String],
    now: Clock,
    mode: Mode,
) -> Result<Vec<AccountResult>> {
    check_accounts(config, only)?;
    let accounts: Vec<&Account> = config
        .accounts
        .iter()
        .filter(|a| only.is_empty() || only.contains(&a.name))
        .collect();
    // The TLS contexts are built while the ledger opens and the accounts
    // connect.
    imap::tls::prepare(accounts.iter().copied());
    let ledger = {
        let path = config.ledger.clone();
        tokio::task::spawn_blocking(move || Ledger::open(&path)).await??
    };
    let ledger = LedgerHandle::new(ledger);
    let gate = Arc::new(tokio::sync::Semaphore::new(config.parallel_accounts));
    let runs = accounts.into_iter().map(|a| {
        let gate = gate.clone();
        let ledger = ledger.clone();
        let now = now.clone();
        let span = tracing::info_span!("account", name = %a.name);
        async move {
            let _permit = gate.acquire().await;
            run_account(config, a, ledger, now, mode).await
        }
        .instrument(span)
    });
    let results = futures_util::future::join_all(runs).await;
    if let Some(path) = &config.metrics_file {
        metrics::write(path, config, &ledger, now(), None).await;
    }
    Ok(results)
}

async fn run_account(
    config: &Config,
    account: &Account,
    ledger: LedgerHandle,
    now: Clock,
    mode: Mode,
) -> AccountResult {
    let mut result = AccountResult {
        account: account.name.clone(),
        report: PassReport::default(),
        removed: 0,
        failure: None,
    };
    let _lock = match lock::try_lock(&config.ledger, &account.name) {
        Ok(l) => l,
        Err(e) => {
            let code = exit::for_error(&e, exit::SOFTWARE);
            tracing::error!("{e:#}");
            result.failure = Some((code, format!("{e:#}")));
            return result;
        }
    };
    let mut imap = match imap::Imap::connect(account).await {
        Ok(i) => i,
        Err(e) => {
            tracing::error!("{e}");
            let message = e.to_string();
            health::failed(&ledger, account, &account.mailboxes, now(), &message).await;
            alert::evaluate(account, &ledger, now()).await;
            let e: anyhow::Error = e.into();
            let code = exit::for_error(&e, exit::UNAVAILABLE);
            result.failure = Some((code, message));
            return result;
        }
    };
    let mut sessions = Sessions::for_account(account);
    let ctx = Ctx::new(account, ledger.clone(), &now, None);
    for mb in &account.mailboxes {
        let work = work_mailbox(&ctx, &mut imap, &mut sessions, mb, mode).await;
        result.report.add(&work.report);
        result.removed += work.removed;
        if let Some(e) = work.error {
            result.report.incomplete = true;
            // Without the ledger nothing more may be delivered.
            let is_ledger = exit::find::<ledger::LedgerFailure>(&e).is_some();
            let code = exit::for_error(&e, exit::UNAVAILABLE);
            result
                .failure
                .get_or_insert((code, format!("{}: {e:#}", mb.name)));
            if is_ledger {
                break;
            }
        }
    }
    sessions.quit().await;
    imap.logout().await;
    alert::evaluate(account, &ledger, now()).await;
    result
}

/// What [`work_mailbox`] did.
pub(crate) struct Work {
    pub report: PassReport,
    pub removed: usize,
    /// The IMAP side or the ledger failed (already logged).
    pub error: Option<anyhow::Error>,
}

/// One mailbox's turn, the same for `run`, `purge` and the daemon: a pass
/// (in [`Mode::Pull`]), then the purge if one is due.
pub(crate) async fn work_mailbox(
    ctx: &Ctx<'_>,
    imap: &mut imap::Imap,
    sessions: &mut Sessions,
    mb: &config::MailboxConfig,
    mode: Mode,
) -> Work {
    let span = tracing::info_span!("mailbox", name = %mb.name);
    let started = std::time::Instant::now();
    let mut work = Work {
        report: PassReport::default(),
        removed: 0,
        error: None,
    };
    let outcome = if mode == Mode::Pull {
        let outcome = pull::pass(ctx, imap, sessions, &mb.name, &mut work.report)
            .instrument(span.clone())
            .await;
        span.in_scope(|| log_summary(&work.report, outcome.is_err(), started));
        outcome
    } else {
        Ok(())
    };
    // Retention runs only after a pass that went through: the pass is what
    // re-keys the ledger after a UIDVALIDITY change.
    let outcome = match outcome {
        Ok(()) => purge::purge_mailbox(
            ctx.account,
            &ctx.ledger,
            imap,
            mb,
            (ctx.now)(),
            mode == Mode::Purge,
        )
        .instrument(span.clone())
        .await
        .map(|p| work.removed = p.removed)
        .map_err(|e| e.context("purging")),
        Err(e) => Err(e),
    };
    if let Err(e) = outcome {
        // A tunnel that died says why (exit status, its stderr).
        let e = match imap.tunnel_report().await {
            Some(r) => e.context(r),
            None => e,
        };
        span.in_scope(|| tracing::error!("{e:#}"));
        let text = format!("{e:#}");
        health::failed(
            &ctx.ledger,
            ctx.account,
            std::slice::from_ref(mb),
            (ctx.now)(),
            &text,
        )
        .await;
        work.error = Some(e);
    } else if mode == Mode::Pull {
        // A purge alone is no pass: it says nothing of new mail.
        health::ok(&ctx.ledger, ctx.account, mb, (ctx.now)()).await;
    }
    work
}

/// What `imapull status` and the alerts know of how passes went: written
/// after each mailbox's turn and each failed connection, by `run` and the
/// daemon alike. A failure to write it is logged and changes nothing else
/// (the pass's own records are what matter).
pub(crate) mod health {
    use crate::config::{Account, MailboxConfig};
    use crate::ledger::{LedgerHandle, MailboxLedger};

    pub async fn ok(ledger: &LedgerHandle, account: &Account, mb: &MailboxConfig, now: i64) {
        let r = MailboxLedger::new(ledger, &account.name, &mb.name)
            .pass_ok(now)
            .await;
        if let Err(e) = r {
            tracing::warn!("recording the pass's health: {e:#}");
        }
    }

    /// `mailboxes` all failed with `error` (a connection serves several).
    pub async fn failed(
        ledger: &LedgerHandle,
        account: &Account,
        mailboxes: &[MailboxConfig],
        now: i64,
        error: &str,
    ) {
        for mb in mailboxes {
            let r = MailboxLedger::new(ledger, &account.name, &mb.name)
                .pass_failed(now, error)
                .await;
            if let Err(e) = r {
                tracing::warn!("recording the pass's health: {e:#}");
                return;
            }
        }
    }
}

/// One line per pass. A pass that failed never says "nothing new": what
/// it did before the error is counted, and the error follows.
fn log_summary(r: &PassReport, failed: bool, started: std::time::Instant) {
    let secs = started.elapsed().as_secs_f64();
    if !failed && r.delivered + r.deferred + r.rejected + r.skipped + r.vanished == 0 {
        tracing::info!(elapsed = format!("{secs:.2}s"), "pass done: nothing new");
    } else {
        tracing::info!(
            delivered = r.delivered,
            deferred = r.deferred,
            rejected = r.rejected,
            skipped = r.skipped,
            vanished = r.vanished,
            complete = !r.incomplete && !failed,
            elapsed = format!("{secs:.2}s"),
            "{}",
            if failed {
                "pass stopped by an error"
            } else {
                "pass done"
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_come_from_typed_errors_anywhere_in_the_chain() {
        use anyhow::Context as _;
        let unknown: anyhow::Error = UnknownAccount {
            name: "x".into(),
            path: "c.toml".into(),
            known: "a".into(),
        }
        .into();
        assert_eq!(exit::for_error(&unknown, exit::SOFTWARE), exit::USAGE);
        // The same text from another error is not a usage error.
        let text = anyhow::anyhow!("no account \"x\" in c.toml (known: a)");
        assert_eq!(exit::for_error(&text, exit::SOFTWARE), exit::SOFTWARE);
        let ledger = anyhow::anyhow!("disk full")
            .context(ledger::LedgerFailure)
            .context("recording a delivery");
        assert_eq!(exit::for_error(&ledger, exit::UNAVAILABLE), exit::SOFTWARE);
        let auth: anyhow::Error = imap::ConnectError::Auth(anyhow::anyhow!("NO")).into();
        let auth = Err::<(), _>(auth).context("account a").unwrap_err();
        assert_eq!(exit::for_error(&auth, exit::SOFTWARE), exit::NOPERM);
        let busy = anyhow::Error::new(lock::Busy {
            account: "a".into(),
            path: "l".into(),
        })
        .context("locking");
        assert_eq!(exit::for_error(&busy, exit::SOFTWARE), exit::CANTCREAT);
        let other = anyhow::anyhow!("IMAP trouble").context("selecting INBOX");
        assert_eq!(
            exit::for_error(&other, exit::UNAVAILABLE),
            exit::UNAVAILABLE
        );
    }
}
