//! Metrics in the OpenMetrics text format (Prometheus reads it): a file
//! written atomically after each run or round of passes
//! (`--metrics-file`, for node_exporter's textfile collector), and, in the
//! daemon, `/metrics` and `/healthz` on `metrics_listen`.
//!
//! The counters come from the ledger (kept by triggers in the same
//! statement as each outcome), so they only grow, across restarts too;
//! the gauges from the ledger and, in the daemon, its connections.

use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64};

use anyhow::{Context as _, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::config::Config;
use crate::ledger::Ledger;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    account: String,
    mailbox: String,
}

/// What only a running daemon knows.
#[derive(Debug, Clone, Copy, Default)]
pub struct Live {
    /// IMAP connections open now.
    pub connected: i64,
    /// Of those, the ones waiting in IDLE now.
    pub idling: i64,
}

type Counters = Family<Labels, Counter<u64, AtomicU64>>;
type Gauges = Family<Labels, Gauge<i64, AtomicI64>>;

/// The metrics of every configured account, as text.
pub fn render(config: &Config, ledger: &Ledger, now: i64, live: Option<Live>) -> Result<String> {
    let mut registry = Registry::default();
    let counter = |r: &mut Registry, name: &str, help: &str| {
        let f = Counters::default();
        r.register(name, help, f.clone());
        f
    };
    let gauge = |r: &mut Registry, name: &str, help: &str| {
        let f = Gauges::default();
        r.register(name, help, f.clone());
        f
    };
    let delivered = counter(
        &mut registry,
        "imapull_messages_delivered",
        "Deliveries accepted by the local server",
    );
    let bytes = counter(
        &mut registry,
        "imapull_bytes_delivered",
        "Bytes of the messages delivered",
    );
    let deferrals = counter(
        &mut registry,
        "imapull_deferrals",
        "Delivery attempts deferred (4xx, timeout, connection lost)",
    );
    let rejections = counter(
        &mut registry,
        "imapull_rejections",
        "Delivery attempts rejected (5xx, too large)",
    );
    let purged = counter(
        &mut registry,
        "imapull_messages_purged",
        "Remote copies removed by retention",
    );
    let backlog = gauge(
        &mut registry,
        "imapull_deferred_messages",
        "Messages deferred now, waiting for a retry",
    );
    let quarantined = gauge(
        &mut registry,
        "imapull_quarantined_messages",
        "Messages rejected and waiting for the operator",
    );
    let oldest = gauge(
        &mut registry,
        "imapull_oldest_deferred_timestamp_seconds",
        "When the oldest deferred message was first seen (absent without one)",
    );
    let last_ok = gauge(
        &mut registry,
        "imapull_last_success_timestamp_seconds",
        "The end of the last pass that went through",
    );
    let failing = gauge(
        &mut registry,
        "imapull_failing",
        "1 while the mailbox's passes or connections fail",
    );
    for a in &config.accounts {
        for mb in &a.mailboxes {
            let l = Labels {
                account: a.name.clone(),
                mailbox: mb.name.clone(),
            };
            let c = ledger.counters(&a.name, &mb.name)?;
            delivered.get_or_create(&l).inc_by(c.delivered);
            bytes.get_or_create(&l).inc_by(c.delivered_bytes);
            deferrals.get_or_create(&l).inc_by(c.deferred);
            rejections.get_or_create(&l).inc_by(c.rejected);
            purged.get_or_create(&l).inc_by(c.purged);
            let s = ledger.summary(&a.name, &mb.name, now)?;
            backlog.get_or_create(&l).set(s.deferred);
            quarantined.get_or_create(&l).set(s.rejected);
            if let Some(t) = s.oldest_deferred_at {
                oldest.get_or_create(&l).set(t);
            }
            let h = ledger.health(&a.name, &mb.name)?;
            if let Some(t) = h.last_ok_at {
                last_ok.get_or_create(&l).set(t);
            }
            failing
                .get_or_create(&l)
                .set(i64::from(h.failing_since.is_some()));
        }
    }
    if let Some(live) = live {
        let connected = Gauge::<i64, AtomicI64>::default();
        connected.set(live.connected);
        registry.register(
            "imapull_connected_mailboxes",
            "IMAP connections the daemon holds now",
            connected,
        );
        let idling = Gauge::<i64, AtomicI64>::default();
        idling.set(live.idling);
        registry.register(
            "imapull_idling_mailboxes",
            "Of those, the ones in IDLE now",
            idling,
        );
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)?;
    Ok(out)
}

/// Writes `text` to `path` atomically: a reader (node_exporter) sees the
/// old file or the new one, never half of one.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// What `/healthz` says: None when all is well, else what is in trouble
/// (an account failing for `alert_after`, mail deferred for
/// `stuck_after`).
pub fn trouble(config: &Config, ledger: &Ledger, now: i64) -> Result<Option<String>> {
    let mut found = Vec::new();
    for a in &config.accounts {
        let conds = ledger.alert_conditions(
            &a.name,
            &a.mailboxes,
            now,
            a.alert_after.as_secs() as i64,
            a.stuck_after.as_secs() as i64,
        )?;
        for c in conds
            .iter()
            .filter(|c| c.kind != crate::alert::Kind::Quarantined)
        {
            found.push(format!("{} {}: {}", a.name, c.kind.as_str(), c.detail));
        }
    }
    Ok((!found.is_empty()).then(|| found.join("\n")))
}

/// Writes the metrics file; a failure is logged (metrics never stop mail).
pub async fn write(
    path: &std::path::Path,
    config: &Config,
    ledger: &crate::ledger::LedgerHandle,
    now: i64,
    live: Option<Live>,
) {
    let (config, path) = (config.clone(), path.to_path_buf());
    let r = ledger
        .call(move |l| {
            let text = render(&config, l, now, live)?;
            write_file(&path, &text)
        })
        .await;
    if let Err(e) = r {
        tracing::warn!("metrics file: {e:#}");
    }
}
