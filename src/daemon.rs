//! `imapull daemon`: every configured mailbox watched at once, new mail
//! delivered within seconds.
//!
//! One task per watched mailbox, each with its own IMAP connection, up to
//! `max_connections` per account; mailboxes beyond that share the last
//! connection and are polled in turn. A task runs the same pass as
//! `imapull run`, then IDLEs (or sleeps, without IDLE) until the server
//! reports something, the catch-up interval runs out, or it is woken. Any
//! error ends the connection; the task reconnects after a backoff. The
//! supervisor owns the tasks: it starts them, reloads them on SIGHUP
//! (restarting only those whose settings changed), wakes them on SIGUSR1,
//! stops them on SIGTERM, and reports to systemd.
//!
//! Signals reach this module as [`Control`] messages: `main` owns the
//! signal handlers, so tests and other callers can drive the daemon with a
//! channel (the mini-redis shape: shutdown is a parameter).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use sd_notify::NotifyState;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument as _;

use crate::config::{Account, Config, MailboxConfig};
use crate::deliver::Sessions;
use crate::imap::{ConnectError, IdleEnd, Imap};
use crate::ledger::{Ledger, LedgerHandle, MailboxLedger};
use crate::lock::{self, AccountLock};
use crate::pull::Ctx;
use crate::{work_mailbox, Clock, Mode};

/// What the outside world asks of the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// SIGTERM, SIGINT: finish the messages in flight, log out, exit.
    Stop,
    /// SIGHUP: re-read the configuration.
    Reload,
    /// SIGUSR1: a pass on every mailbox now.
    PullNow,
}

/// How long a stopping daemon waits for its tasks (a message in flight,
/// DONE, LOGOUT, QUIT) before it exits anyway.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// A connection that lived this long resets the backoff.
const HEALTHY: Duration = Duration::from_secs(60);
/// How often STATUS is refreshed (and the watchdog fed, at most this far
/// apart unless systemd asks for more often).
const STATUS_EVERY: Duration = Duration::from_secs(10);
/// Authentication failures are logged at most this often per task.
const AUTH_LOG_EVERY: Duration = Duration::from_secs(3600);

/// Exponential backoff with jitter: 1 s doubling to a 5 minute cap. Pure:
/// the caller supplies the randomness.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    pub const FIRST: Duration = Duration::from_secs(1);
    pub const CAP: Duration = Duration::from_secs(300);

    pub fn new() -> Backoff {
        Backoff { next: Self::FIRST }
    }

    /// The delay before the next attempt. `jitter` in [0, 1) spreads it
    /// over [d/2, d), so that many tasks do not reconnect in lockstep.
    /// `to_cap` jumps straight to the cap (authentication failures).
    pub fn delay(&mut self, jitter: f64, to_cap: bool) -> Duration {
        if to_cap {
            self.next = Self::CAP;
        }
        let d = self.next;
        self.next = (self.next * 2).min(Self::CAP);
        d.mul_f64(0.5 + jitter.clamp(0.0, 0.999) / 2.0)
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

/// When to retry deferred mail, like an MTA's queue: `first`, then twice
/// as long each time up to `max`, jittered over [d/2, d) so that many
/// mailboxes do not retry in lockstep; reset once nothing is deferred.
#[derive(Debug)]
pub struct RetrySchedule {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl RetrySchedule {
    pub fn new(first: Duration, max: Duration) -> RetrySchedule {
        RetrySchedule {
            first,
            max,
            next: first,
        }
    }

    /// The wait before the next retry; `jitter` in [0, 1).
    pub fn delay(&mut self, jitter: f64) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d.mul_f64(0.5 + jitter.clamp(0.0, 0.999) / 2.0)
    }

    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A cheap random number in [0, 1) for jitter (no crate needed for that).
fn jitter() -> f64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    let x = n
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// What one task watches: an account and one or more of its mailboxes.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub account: Account,
    pub mailboxes: Vec<MailboxConfig>,
}

impl TaskSpec {
    fn key(&self) -> String {
        let names: Vec<&str> = self.mailboxes.iter().map(|m| m.name.as_str()).collect();
        format!("{}:{}", self.account.name, names.join(","))
    }
}

/// The tasks a configuration asks for: one per mailbox while the account's
/// connection cap allows, the rest sharing the last connection.
pub fn plan_tasks(config: &Config) -> Vec<TaskSpec> {
    let mut out = Vec::new();
    for a in &config.accounts {
        let cap = a.max_connections as usize;
        let mbs = &a.mailboxes;
        let own = if mbs.len() <= cap { mbs.len() } else { cap - 1 };
        for m in &mbs[..own] {
            out.push(TaskSpec {
                account: a.clone(),
                mailboxes: vec![m.clone()],
            });
        }
        if own < mbs.len() {
            out.push(TaskSpec {
                account: a.clone(),
                mailboxes: mbs[own..].to_vec(),
            });
        }
    }
    out
}

/// What the tasks share: the live figures for the STATUS line and the
/// metrics, and the permits to work.
struct Status {
    gate: Gate,
    connected: AtomicUsize,
    /// Connections in IDLE now.
    idling: AtomicUsize,
    /// Rounds of passes so far: the metrics file is rewritten when it moved.
    rounds: AtomicUsize,
    delivered: AtomicUsize,
    failing: Mutex<HashMap<String, String>>,
    last_delivery: Mutex<Option<String>>,
}

impl Status {
    fn new(parallel: usize) -> Status {
        Status {
            gate: Gate::new(parallel),
            connected: AtomicUsize::default(),
            idling: AtomicUsize::default(),
            rounds: AtomicUsize::default(),
            delivered: AtomicUsize::default(),
            failing: Mutex::default(),
            last_delivery: Mutex::default(),
        }
    }

    fn live(&self) -> crate::metrics::Live {
        crate::metrics::Live {
            connected: self.connected.load(Ordering::Relaxed) as i64,
            idling: self.idling.load(Ordering::Relaxed) as i64,
        }
    }

    fn line(&self, tasks: usize) -> String {
        let failing = self.failing.lock().map(|f| f.len()).unwrap_or(0);
        let last = self
            .last_delivery
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .unwrap_or_else(|| "none yet".into());
        format!(
            "{}/{} connected, {} delivered, {} failing; last delivery: {}",
            self.connected.load(Ordering::Relaxed),
            tasks,
            self.delivered.load(Ordering::Relaxed),
            failing,
            last
        )
    }
}

/// How many of the daemon's connections may work at once
/// (`parallel_accounts`): connect and log in, or run a pass. A connection
/// that idles, or waits to reconnect, holds no permit.
///
/// Without it a daemon that started on a thousand accounts ran a thousand
/// TLS handshakes and first passes at once: the IMAP server took them as a
/// storm, the local server could be asked for as many sessions, and the
/// daemon's memory kept that peak for good (the allocator holds on to the
/// freed handshake buffers between the connections' live state).
struct Gate {
    permits: Arc<Semaphore>,
    size: AtomicUsize,
}

impl Gate {
    fn new(n: usize) -> Gate {
        Gate {
            permits: Arc::new(Semaphore::new(n)),
            size: AtomicUsize::new(n),
        }
    }

    /// A permit to work, or None once the task is stopping (`wake` tells
    /// it to look at `stop`).
    async fn enter(&self, stop: &AtomicBool, wake: &Notify) -> Option<OwnedSemaphorePermit> {
        loop {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            tokio::select! {
                p = self.permits.clone().acquire_owned() => return p.ok(),
                _ = wake.notified() => {}
            }
        }
    }

    /// A reloaded `parallel_accounts`: more permits at once, fewer as the
    /// connections that work give theirs back.
    fn resize(&self, n: usize) {
        let was = self.size.swap(n, Ordering::SeqCst);
        if n > was {
            self.permits.add_permits(n - was);
        } else if n < was {
            let permits = self.permits.clone();
            let fewer = (was - n) as u32;
            tokio::spawn(async move {
                if let Ok(p) = permits.acquire_many_owned(fewer).await {
                    p.forget();
                }
            });
        }
    }
}

struct Running {
    spec: Arc<TaskSpec>,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    handle: tokio::task::JoinHandle<()>,
}

/// Runs the daemon until [`Control::Stop`] (or the channel closes).
pub async fn run_daemon(
    config_path: PathBuf,
    config: Config,
    mut control: mpsc::Receiver<Control>,
    now: Clock,
) -> Result<()> {
    raise_nofile_limit();
    let ledger = {
        let path = config.ledger.clone();
        LedgerHandle::new(tokio::task::spawn_blocking(move || Ledger::open(&path)).await??)
    };
    let mut locks: HashMap<String, AccountLock> = HashMap::new();
    for a in &config.accounts {
        // A held lock means a timer run or another daemon: refuse to start
        // rather than race it.
        locks.insert(a.name.clone(), lock::try_lock(&config.ledger, &a.name)?);
    }
    let status = Arc::new(Status::new(config.parallel_accounts));
    let mut tasks: HashMap<String, Running> = HashMap::new();
    for spec in plan_tasks(&config) {
        start_task(&mut tasks, spec, &ledger, &now, &status);
    }
    let mut metrics = Metrics::start(&config, &status, &now).await?;
    let _ = sd_notify::notify(&[NotifyState::Ready]);
    tracing::info!(tasks = tasks.len(), "daemon started");

    let watchdog = sd_notify::watchdog_enabled();
    let tick_every = watchdog.map_or(STATUS_EVERY, |w| (w / 2).min(STATUS_EVERY));
    let mut tick = tokio::time::interval(tick_every);
    loop {
        tokio::select! {
            ctl = control.recv() => match ctl {
                None | Some(Control::Stop) => break,
                Some(Control::PullNow) => {
                    tracing::info!("pulling every mailbox now");
                    for t in tasks.values() {
                        t.wake.notify_one();
                    }
                }
                Some(Control::Reload) => {
                    let _ = sd_notify::notify(&[
                        NotifyState::Reloading,
                        monotonic_now(),
                    ]);
                    match Config::load(&config_path) {
                        Err(e) => tracing::error!("configuration not reloaded, keeping the old one: {e}"),
                        Ok(mut new) => {
                            new.metrics_file = config.metrics_file.clone();
                            status.gate.resize(new.parallel_accounts);
                            reload(&mut tasks, &mut locks, &new, &ledger, &now, &status).await;
                            metrics.reloaded(new);
                        }
                    }
                    let _ = sd_notify::notify(&[NotifyState::Ready]);
                }
            },
            _ = tick.tick() => {
                // The watchdog is fed only while every task is alive: a
                // panicked task means the supervisor lost one.
                let healthy = tasks.values().all(|t| !t.handle.is_finished());
                metrics.tick(&status, now()).await;
                let line = status.line(tasks.len());
                let _ = sd_notify::notify(&[NotifyState::Status(&line)]);
                if healthy && watchdog.is_some() {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
            }
        }
    }
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    tracing::info!("stopping: finishing the messages in flight");
    let handles: Vec<_> = tasks
        .into_values()
        .map(|t| {
            t.stop.store(true, Ordering::SeqCst);
            t.wake.notify_one();
            t.handle
        })
        .collect();
    if tokio::time::timeout(STOP_GRACE, futures_util::future::join_all(handles))
        .await
        .is_err()
    {
        tracing::warn!(
            "some tasks did not finish within {}s; exiting anyway",
            STOP_GRACE.as_secs()
        );
    }
    drop(locks);
    tracing::info!("stopped");
    Ok(())
}

/// The daemon's metrics: the endpoint, and the file written after passes.
struct Metrics {
    /// The accounts the metrics cover: the configuration's, as reloaded.
    current: Arc<std::sync::RwLock<Arc<Config>>>,
    /// The file, and a ledger connection of its own: rendering must not
    /// hold the passes' ledger (each delivery's record waits for it).
    file: Option<(PathBuf, LedgerHandle)>,
    written_at_round: usize,
}

impl Metrics {
    /// Starts the endpoint if `metrics_listen` says so.
    async fn start(config: &Config, status: &Arc<Status>, now: &Clock) -> Result<Metrics> {
        let current = Arc::new(std::sync::RwLock::new(Arc::new(config.clone())));
        if let Some(addr) = config.metrics_listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("metrics_listen: cannot listen on {addr}: {e}"))?;
            tokio::spawn(serve_metrics(
                listener,
                current.clone(),
                status.clone(),
                now.clone(),
            ));
            tracing::info!("metrics on http://{addr}/metrics, health on /healthz");
        }
        let file = match &config.metrics_file {
            Some(p) => {
                let path = config.ledger.clone();
                let l = tokio::task::spawn_blocking(move || Ledger::open(&path)).await??;
                Some((p.clone(), LedgerHandle::new(l)))
            }
            None => None,
        };
        Ok(Metrics {
            current,
            file,
            written_at_round: usize::MAX,
        })
    }

    fn config(&self) -> Arc<Config> {
        latest(&self.current)
    }

    fn reloaded(&self, new: Config) {
        if new.metrics_listen != self.config().metrics_listen {
            tracing::warn!("metrics_listen changed: it takes effect at the next start");
        }
        if let Ok(mut c) = self.current.write() {
            *c = Arc::new(new);
        }
    }

    /// Rewrites the file if passes happened since it was last written.
    async fn tick(&mut self, status: &Status, now: i64) {
        let rounds = status.rounds.load(Ordering::Relaxed);
        if let Some((path, ledger)) = self
            .file
            .as_ref()
            .filter(|_| rounds != self.written_at_round)
        {
            let config = self.config();
            crate::metrics::write(path, &config, ledger, now, Some(status.live())).await;
            self.written_at_round = rounds;
        }
    }
}

/// The configuration as last (re)loaded.
fn latest(current: &std::sync::RwLock<Arc<Config>>) -> Arc<Config> {
    current
        .read()
        .map(|c| c.clone())
        .unwrap_or_else(|p| p.into_inner().clone())
}

/// `/metrics` and `/healthz` on `metrics_listen`, with a ledger connection
/// of their own (reads never wait for the passes' writes: WAL).
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    current: Arc<std::sync::RwLock<Arc<Config>>>,
    status: Arc<Status>,
    now: Clock,
) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    let path = latest(&current).ledger.clone();
    let ledger = match Ledger::open(&path) {
        Ok(l) => LedgerHandle::new(l),
        Err(e) => {
            tracing::error!("metrics: {e:#}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of file descriptors, say: not a reason to spin.
                tracing::warn!("metrics: accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (current, status, now, ledger) =
            (current.clone(), status.clone(), now.clone(), ledger.clone());
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let config = latest(&current);
                let (status, now, ledger) = (status.clone(), now.clone(), ledger.clone());
                async move {
                    let path = req.uri().path().to_string();
                    let live = status.live();
                    let t = now();
                    let answer = ledger
                        .call(move |l| match path.as_str() {
                            "/metrics" => Ok((
                                200,
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                crate::metrics::render(&config, l, t, Some(live))?,
                            )),
                            "/healthz" => Ok(match crate::metrics::trouble(&config, l, t)? {
                                None => (200, "text/plain; charset=utf-8", "ok\n".to_string()),
                                Some(why) => (503, "text/plain; charset=utf-8", format!("{why}\n")),
                            }),
                            _ => Ok((
                                404,
                                "text/plain; charset=utf-8",
                                "/metrics or /healthz\n".to_string(),
                            )),
                        })
                        .await
                        .unwrap_or_else(|e| (500, "text/plain; charset=utf-8", format!("{e:#}\n")));
                    let (code, kind, body) = answer;
                    hyper::Response::builder()
                        .status(code)
                        .header("content-type", kind)
                        .body(Full::new(Bytes::from(body)))
                }
            });
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

fn monotonic_now() -> NotifyState<'static> {
    NotifyState::monotonic_usec_now().unwrap_or(NotifyState::Custom("MONOTONIC_USEC=0"))
}

/// Starts, stops or restarts only the tasks whose settings changed.
async fn reload(
    tasks: &mut HashMap<String, Running>,
    locks: &mut HashMap<String, AccountLock>,
    new: &Config,
    ledger: &LedgerHandle,
    now: &Clock,
    status: &Arc<Status>,
) {
    let wanted: HashMap<String, TaskSpec> =
        plan_tasks(new).into_iter().map(|s| (s.key(), s)).collect();
    let stale: Vec<String> = tasks
        .iter()
        .filter(|(k, t)| wanted.get(*k) != Some(&*t.spec))
        .map(|(k, _)| k.clone())
        .collect();
    let mut stopping = Vec::new();
    for k in &stale {
        if let Some(t) = tasks.remove(k) {
            t.stop.store(true, Ordering::SeqCst);
            t.wake.notify_one();
            stopping.push(t.handle);
        }
    }
    let _ = tokio::time::timeout(STOP_GRACE, futures_util::future::join_all(stopping)).await;
    // Locks follow the accounts.
    locks.retain(|name, _| new.account(name).is_some());
    let mut started = 0;
    for (k, spec) in wanted {
        if tasks.contains_key(&k) {
            continue;
        }
        if !locks.contains_key(&spec.account.name) {
            match lock::try_lock(&new.ledger, &spec.account.name) {
                Ok(l) => {
                    locks.insert(spec.account.name.clone(), l);
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    continue;
                }
            }
        }
        start_task(tasks, spec, ledger, now, status);
        started += 1;
    }
    tracing::info!(
        stopped = stale.len(),
        started,
        running = tasks.len(),
        "configuration reloaded"
    );
}

fn start_task(
    tasks: &mut HashMap<String, Running>,
    spec: TaskSpec,
    ledger: &LedgerHandle,
    now: &Clock,
    status: &Arc<Status>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    let key = spec.key();
    let spec = Arc::new(spec);
    let span = tracing::info_span!("watch", account = %spec.account.name);
    let handle = tokio::spawn(
        watch(
            spec.clone(),
            ledger.clone(),
            now.clone(),
            stop.clone(),
            wake.clone(),
            status.clone(),
        )
        .instrument(span),
    );
    tasks.insert(
        key,
        Running {
            spec,
            stop,
            wake,
            handle,
        },
    );
}

/// One watched mailbox (or group): connect, serve, back off, again.
///
/// This future is what an idle connection holds for as long as it idles,
/// a thousand times over with a thousand accounts: what a pass, a connect
/// or an alert needs is boxed, for the time it runs.
async fn watch(
    spec: Arc<TaskSpec>,
    ledger: LedgerHandle,
    now: Clock,
    stop: Arc<AtomicBool>,
    wake: Arc<Notify>,
    status: Arc<Status>,
) {
    let key = spec.key();
    let mut backoff = Backoff::new();
    let mut last_auth_log: Option<Instant> = None;
    while let Some(permit) = status.gate.enter(&stop, &wake).await {
        let connected = Box::pin(Imap::connect(&spec.account)).await.map(Box::new);
        drop(permit);
        let (error, to_cap) = match connected {
            Err(ConnectError::Auth(e)) => {
                if last_auth_log.is_none_or(|t| t.elapsed() >= AUTH_LOG_EVERY) {
                    tracing::error!(
                        "{e:#} (retrying every {} minutes; logged once an hour)",
                        Backoff::CAP.as_secs() / 60
                    );
                    last_auth_log = Some(Instant::now());
                }
                (format!("{e:#}"), true)
            }
            Err(ConnectError::Unavailable(e)) => {
                tracing::warn!("{e:#}");
                (format!("{e:#}"), false)
            }
            Ok(imap) => {
                status.connected.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut f) = status.failing.lock() {
                    f.remove(&key);
                }
                let since = Instant::now();
                let r = serve(&spec, imap, &ledger, &now, &stop, &wake, &status).await;
                status.connected.fetch_sub(1, Ordering::Relaxed);
                if since.elapsed() >= HEALTHY {
                    backoff.reset();
                }
                match r {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!("connection lost: {e:#}");
                        (format!("{e:#}"), false)
                    }
                }
            }
        };
        Box::pin(crate::health::failed(
            &ledger,
            &spec.account,
            &spec.mailboxes,
            now(),
            &error,
        ))
        .await;
        Box::pin(crate::alert::evaluate(&spec.account, &ledger, now())).await;
        if let Ok(mut f) = status.failing.lock() {
            f.insert(key.clone(), error);
        }
        let delay = backoff.delay(jitter(), to_cap);
        tracing::debug!("reconnecting in {:.1}s", delay.as_secs_f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = wake.notified() => {}
        }
    }
}

/// Serves one connection until an error (returned) or a stop (Ok).
async fn serve(
    spec: &TaskSpec,
    mut imap: Box<Imap>,
    ledger: &LedgerHandle,
    now: &Clock,
    stop: &AtomicBool,
    wake: &Notify,
    status: &Status,
) -> Result<()> {
    let account = &spec.account;
    let mut sessions = Sessions::for_account(account);
    let ctx = Ctx::new(account, ledger.clone(), now, Some(stop));
    // IDLE watches the selected mailbox only: a shared connection polls.
    let idle = spec.mailboxes.len() == 1 && imap.has("IDLE");
    if idle {
        // Kept uncompressed (short of compress = "always"), so that the
        // server can hibernate it while it idles.
        imap.mark_for_idle();
    }
    let mut retry = RetrySchedule::new(account.retry_interval, account.retry_max);
    // Mailboxes whose ledger row may hold a retry time, to clear once none
    // is due: all of them at first (a time left by an earlier run).
    let mut on_record: HashSet<String> = spec.mailboxes.iter().map(|m| m.name.clone()).collect();
    while let Some(permit) = status.gate.enter(stop, wake).await {
        let mut deferred = Vec::new();
        for mb in &spec.mailboxes {
            let work = Box::pin(work_mailbox(&ctx, &mut imap, &mut sessions, mb, Mode::Pull)).await;
            if work.report.deferred > 0 {
                deferred.push((mb.name.clone(), work.report.deferred));
            }
            if work.report.delivered > 0 {
                status
                    .delivered
                    .fetch_add(work.report.delivered as usize, Ordering::Relaxed);
                if let Ok(mut l) = status.last_delivery.lock() {
                    *l = Some(format!(
                        "{} {}/{}",
                        chrono::DateTime::from_timestamp(now(), 0)
                            .unwrap_or_default()
                            .format("%Y-%m-%d %H:%M:%S UTC"),
                        account.name,
                        mb.name
                    ));
                }
            }
            if let Some(e) = work.error {
                sessions.quit().await;
                return Err(e);
            }
        }
        // Sessions to the local server are opened when there is mail and
        // not kept between passes.
        sessions.quit().await;
        drop(permit);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // Deferred mail is retried on its own schedule, not only when new
        // mail comes or at the next catch-up.
        let retry_in = Box::pin(schedule_retry(
            account,
            ledger,
            now,
            &mut retry,
            &mut on_record,
            &spec.mailboxes,
            &deferred,
        ))
        .await?;
        Box::pin(crate::alert::evaluate(account, ledger, now())).await;
        status.rounds.fetch_add(1, Ordering::Relaxed);
        if idle {
            // Re-issued before idle_timeout, and a pass at least every
            // catchup_interval: an IDLE that died silently costs minutes.
            let wait = account.idle_timeout.min(account.catchup_interval);
            let wait = retry_in.map_or(wait, |r| r.min(wait));
            status.idling.fetch_add(1, Ordering::Relaxed);
            let idled = Box::pin((*imap).idle(wait, wake, stop)).await;
            status.idling.fetch_sub(1, Ordering::Relaxed);
            let (i, end) = idled?;
            *imap = i;
            tracing::debug!(?end, "IDLE ended");
            if end == IdleEnd::Stopped {
                return Ok(());
            }
        } else {
            let wait = account.poll_interval.min(account.catchup_interval);
            let wait = retry_in.map_or(wait, |r| r.min(wait));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = wake.notified() => {}
            }
        }
        if stop.load(Ordering::SeqCst) {
            break;
        }
    }
    Box::pin(imap.logout()).await;
    Ok(())
}

/// After the passes of one round: the wait before deferred mail is tried
/// again (None when nothing is deferred), logged, and written to the
/// ledger for `imapull status`. The ledger is written only for a mailbox
/// with a retry to record or one to clear (`on_record`), not on every
/// wake-up of every idle mailbox.
async fn schedule_retry(
    account: &crate::config::Account,
    ledger: &LedgerHandle,
    now: &Clock,
    retry: &mut RetrySchedule,
    on_record: &mut HashSet<String>,
    mailboxes: &[crate::config::MailboxConfig],
    deferred: &[(String, u32)],
) -> Result<Option<Duration>> {
    let delay = if deferred.is_empty() {
        retry.reset();
        None
    } else {
        Some(retry.delay(jitter()))
    };
    for mb in mailboxes {
        let waiting = deferred.iter().find(|(m, _)| *m == mb.name).map(|d| d.1);
        let at = match (delay, waiting) {
            (Some(d), Some(n)) => {
                tracing::info!(
                    mailbox = mb.name,
                    "{n} message(s) deferred; retrying in {}s",
                    d.as_secs()
                );
                Some((now() + d.as_secs() as i64, n))
            }
            _ => None,
        };
        if at.is_none() && !on_record.remove(&mb.name) {
            continue;
        }
        if at.is_some() {
            on_record.insert(mb.name.clone());
        }
        MailboxLedger::new(ledger, &account.name, &mb.name)
            .set_retry(at)
            .await?;
    }
    Ok(delay)
}

/// A daemon holds a connection per watched mailbox: raise the soft limit
/// on open files to the hard limit (the unit also sets LimitNOFILE=).
fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid, initialised struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload's `parallel_accounts`: more permits at once, fewer once
    /// the connections at work give theirs back; a stopping task gets none.
    #[tokio::test]
    async fn the_gate_follows_a_reloaded_parallel_accounts() {
        let gate = Gate::new(2);
        let (stop, wake) = (AtomicBool::new(false), Notify::new());
        let a = gate.enter(&stop, &wake).await.unwrap();
        let b = gate.enter(&stop, &wake).await.unwrap();
        gate.resize(1);
        drop((a, b));
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(gate.permits.available_permits(), 1);
        gate.resize(3);
        assert_eq!(gate.permits.available_permits(), 3);
        let held = gate.permits.clone().try_acquire_many_owned(3).unwrap();
        // Waiting for a permit when the daemon stops.
        let stopping = async {
            stop.store(true, Ordering::SeqCst);
            wake.notify_one();
        };
        let (got, ()) = tokio::join!(gate.enter(&stop, &wake), stopping);
        assert!(got.is_none());
        drop(held);
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let full: Vec<u64> = (0..12)
            .map(|_| b.delay(0.999, false).as_millis() as u64)
            .collect();
        // With jitter near 1 the delay is just under the nominal value.
        assert!(full[0] > 900 && full[0] < 1000, "{full:?}");
        assert!(full[1] > 1900 && full[1] < 2000, "{full:?}");
        assert!(full.iter().all(|&d| d < 300_000));
        assert!(full[11] > 290_000, "{full:?}");
        let mut b = Backoff::new();
        assert_eq!(b.delay(0.0, false), Duration::from_millis(500));
        b.reset();
        assert_eq!(b.delay(0.0, true), Duration::from_secs(150));
        assert_eq!(b.delay(0.0, false), Duration::from_secs(150));
    }

    #[test]
    fn retries_double_up_to_the_cap_and_reset() {
        let s = Duration::from_secs;
        let mut r = RetrySchedule::new(s(30), s(600));
        // Without jitter (0.999 ~ the full delay), then with the least.
        let full: Vec<u64> = (0..7).map(|_| r.delay(0.999).as_secs()).collect();
        assert_eq!(full, vec![29, 59, 119, 239, 479, 599, 599]);
        r.reset();
        assert_eq!(r.delay(0.0), s(15));
        assert_eq!(r.delay(0.0), s(30));
    }

    #[test]
    fn jitter_is_in_range() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }

    #[test]
    fn tasks_respect_the_connection_cap() {
        let text = r#"
ledger = "/tmp/x"
[accounts.a]
host = "h"
username = "u"
password = "p"
deliver = "smtp://127.0.0.1:25"
recipients = ["r@x"]
mailboxes = ["A", "B", "C", "D", "E"]
max_connections = 3
[accounts.b]
host = "h"
username = "u"
password = "p"
deliver = "smtp://127.0.0.1:25"
recipients = ["r@x"]
mailboxes = ["X", "Y"]
"#;
        let c = Config::parse(std::path::Path::new("t.toml"), text).unwrap();
        let keys: Vec<String> = plan_tasks(&c).iter().map(TaskSpec::key).collect();
        assert_eq!(keys, vec!["a:A", "a:B", "a:C,D,E", "b:X", "b:Y"]);
    }
}
