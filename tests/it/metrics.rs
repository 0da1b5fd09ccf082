//! Metrics: the file a run writes, and the daemon's `/metrics` and
//! `/healthz`, parsed back with a parser for the format.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use crate::daemon::Daemon;
use crate::fake::{fake_message, FakeSmtp, Fault, MailServer};
use crate::harness::*;

/// The samples of a scrape: (name, mailbox label) -> value.
fn parse(text: &str) -> Vec<(String, Option<String>, f64)> {
    assert!(text.ends_with("# EOF\n"), "not OpenMetrics: {text}");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                other => panic!("unexpected {other:?}"),
            };
            (s.metric, s.labels.get("mailbox").map(str::to_string), v)
        })
        .collect()
}

fn value(samples: &[(String, Option<String>, f64)], name: &str) -> Option<f64> {
    samples.iter().find(|s| s.0 == name).map(|s| s.2)
}

#[test]
fn a_run_writes_the_metrics_file_from_the_ledger() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "initial = \"all\"\npurge_after = \"0s\"");
    for n in 0..2 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "m"), false);
    }
    let file = case.dir.join("imapull.prom");
    let f = file.to_str().unwrap();
    assert_exit(&case.run(&["--metrics-file", f, "run"]), 0);
    wait_delivered(&rcpt, 2);
    let text = std::fs::read_to_string(&file).unwrap();
    let s = parse(&text);
    assert_eq!(
        value(&s, "imapull_messages_delivered_total"),
        Some(2.0),
        "{text}"
    );
    assert!(
        value(&s, "imapull_bytes_delivered_total").unwrap() > 100.0,
        "{text}"
    );
    assert_eq!(
        value(&s, "imapull_messages_purged_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(value(&s, "imapull_deferred_messages"), Some(0.0));
    assert_eq!(value(&s, "imapull_failing"), Some(0.0));
    assert!(value(&s, "imapull_last_success_timestamp_seconds").unwrap() > 1e9);
    // Counters only grow, across runs (they are the ledger's).
    drop_message(&case.user, 5, &message(5, "bob@remote.test", "m"), false);
    assert_exit(&case.run(&["--metrics-file", f, "run"]), 0);
    let s = parse(&std::fs::read_to_string(&file).unwrap());
    assert_eq!(value(&s, "imapull_messages_delivered_total"), Some(3.0));
    // No temporary file is left beside it.
    let left: Vec<_> = std::fs::read_dir(&case.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// GET `path` from 127.0.0.1:`port`: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_daemon_serves_metrics_and_a_health_check_that_fails_in_trouble() {
    let server = MailServer::start("IDLE UIDPLUS", vec![fake_message(1)]);
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let port = free_port();
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        "initial = \"all\"\ncatchup_interval = \"1h\"\nalert_after = \"1s\"",
    );
    case.use_imap_at(server.port, "none");
    let text = std::fs::read_to_string(&case.config).unwrap();
    std::fs::write(
        &case.config,
        format!("metrics_listen = \"127.0.0.1:{port}\"\n{text}"),
    )
    .unwrap();
    let file = case.dir.join("daemon.prom");
    let d = Daemon::start_with(&case, &["--metrics-file", file.to_str().unwrap()]);
    d.wait_log("delivered mailbox", 1);
    // The daemon writes the file at its first tick, and after passes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !file.exists() {
        assert!(Instant::now() < deadline, "no metrics file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = parse(&std::fs::read_to_string(&file).unwrap());
    assert!(value(&s, "imapull_connected_mailboxes").is_some());
    let deadline = Instant::now() + Duration::from_secs(20);
    let s = loop {
        let (code, body) = get(port, "/metrics");
        assert_eq!(code, 200, "{body}");
        let s = parse(&body);
        if value(&s, "imapull_idling_mailboxes") == Some(1.0) {
            break s;
        }
        assert!(Instant::now() < deadline, "never idling: {body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(value(&s, "imapull_connected_mailboxes"), Some(1.0));
    assert_eq!(value(&s, "imapull_messages_delivered_total"), Some(1.0));
    assert_eq!(get(port, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(port, "/nope").0, 404);
    // Logins start failing: after alert_after, the health check fails.
    {
        let mut st = server.state.lock().unwrap();
        st.fault = Some(("LOGIN".into(), Fault::No));
        st.sticky = true;
    }
    server.hang_up();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = get(port, "/healthz");
        if code == 503 {
            assert!(body.contains("failing"), "{body}");
            break;
        }
        assert!(Instant::now() < deadline, "healthz stayed {code}: {body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = parse(&get(port, "/metrics").1);
    assert_eq!(value(&s, "imapull_failing"), Some(1.0));
    assert_eq!(d.stop().0, Some(0));
}

/// A long first pass shows a progress bar on a terminal (a
/// pseudo-terminal from `script`), and nothing of it on a pipe.
#[test]
fn a_long_pass_shows_a_progress_bar_on_a_terminal_only() {
    for tty in [true, false] {
        let n = crate::fake::fake_message;
        let server = MailServer::start("UIDPLUS", (1..=250).map(n).collect());
        let smtp = FakeSmtp::start(|_, _| "250 ok".into());
        let case = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
        case.use_imap_at(server.port, "none");
        let out = if tty {
            let cmd = format!(
                "{} --config {} run",
                env!("CARGO_BIN_EXE_imapull"),
                case.config.display()
            );
            std::process::Command::new("script")
                .args(["-qec", &cmd, "/dev/null"])
                .env("TERM", "xterm")
                .env_remove("JOURNAL_STREAM")
                .output()
                .unwrap()
        } else {
            case.run(&["run"])
        };
        assert_exit(&out, 0);
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert_eq!(smtp.messages().len(), 250);
        assert_eq!(all.contains("/250 messages"), tty, "tty {tty}: {all}");
        assert_eq!(all.contains("ETA"), tty, "tty {tty}");
    }
}
