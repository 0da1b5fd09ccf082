//! The operator's commands: `status`, `quarantine`, against the real
//! Dovecot and Postfix and, for faults, scripted servers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::fake::{fake_message, FakeSmtp, Fault, MailServer};
use crate::harness::*;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_json(case: &Case) -> serde_json::Value {
    let out = case.run(&["status", "--json"]);
    assert_exit(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

/// The first mailbox of the first account.
fn inbox(v: &serde_json::Value) -> &serde_json::Value {
    &v["accounts"][0]["mailboxes"][0]
}

#[test]
fn status_says_how_each_mailbox_is_doing() {
    let rcpt = new_recipient();
    let case = Case::new(
        &smtp(),
        &[&rcpt],
        "initial = \"all\"\npurge_after = \"30d\"",
    );
    for i in 0..2 {
        drop_message(&case.user, i, &message(i, "bob@remote.test", "hi"), false);
    }
    let v = status_json(&case);
    assert_eq!(v["schema"], 1);
    let m = inbox(&v);
    assert_eq!(
        (m["name"].as_str(), m["last_ok_at"].is_null()),
        (Some("INBOX"), true)
    );
    assert_exit(&case.run(&["run"]), 0);
    wait_delivered(&rcpt, 2);
    let v = status_json(&case);
    let a = &v["accounts"][0];
    assert_eq!(a["name"].as_str(), Some(case.user.as_str()));
    assert!(a["held_by"].is_null(), "{a}");
    let m = inbox(&v);
    assert_eq!(m["delivered_total"], 2, "{m}");
    assert_eq!(m["delivered_today"], 2, "{m}");
    assert_eq!(
        (m["deferred"].as_i64(), m["quarantined"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(
        m["last_ok_at"].is_string() && m["last_delivery_at"].is_string(),
        "{m}"
    );
    assert_eq!(m["purge_after"].as_str(), Some("30days"));
    assert!(m["next_removal_at"].is_string(), "{m}");
    assert!(
        m["failing_since"].is_null() && m["last_error"].is_null(),
        "{m}"
    );
    // The terminal form says the same.
    let text = stdout(&case.run(&["status"]));
    assert!(text.contains("2 today, 2 in all"), "{text}");
    assert!(text.contains("no imapull process holds it now"), "{text}");
    // The per-message listing, filtered by state.
    let text = stdout(&case.run(&["status", "--messages", "--state", "delivered"]));
    assert_eq!(text.lines().count(), 3, "{text}");
    let text = stdout(&case.run(&["status", "--messages", "--state", "deferred"]));
    assert_eq!(text.lines().count(), 1, "{text}");
    assert_exit(&case.run(&["status", "--messages", "--state", "lost"]), 64);
    assert_exit(&case.run(&["status", "nobody"]), 64);
}

#[test]
fn status_shows_a_failing_login_until_it_works_again_and_the_daemon_that_holds_it() {
    let server = MailServer::start("UIDPLUS IDLE", vec![fake_message(1)]);
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(&smtp.url(), &["x@example.test"], "initial = \"all\"");
    case.use_imap_at(server.port, "none");
    server.state.lock().unwrap().fault = Some(("LOGIN".into(), Fault::No));
    assert_exit(&case.run(&["run"]), 77);
    let v = status_json(&case);
    let m = inbox(&v);
    assert!(m["failing_since"].is_string(), "{m}");
    let err = m["last_error"]["message"].as_str().unwrap_or_default();
    assert!(err.contains("injected"), "{m}");
    let text = stdout(&case.run(&["status"]));
    assert!(text.contains("FAILING"), "{text}");
    // It works again: no longer failing; the last error stays on record.
    assert_exit(&case.run(&["run"]), 0);
    let m = inbox(&status_json(&case)).clone();
    assert!(m["failing_since"].is_null(), "{m}");
    assert!(m["last_error"]["at"].is_string(), "{m}");
    assert_eq!(m["delivered_total"], 1);
    // With the daemon running, status says so (and takes no lock).
    let d = crate::daemon::Daemon::start(&case);
    d.wait_log("pass done", 1);
    let v = status_json(&case);
    assert_eq!(v["accounts"][0]["held_by"]["mode"], "daemon", "{v}");
    assert_eq!(d.stop().0, Some(0));
}

/// A local server that rejects every message until `fixed` is set.
fn rejecting_until(fixed: Arc<AtomicBool>) -> FakeSmtp {
    FakeSmtp::start(move |_, _| {
        if fixed.load(Ordering::SeqCst) {
            "250 ok".into()
        } else {
            "550 5.7.1 content refused".into()
        }
    })
}

#[test]
fn quarantine_retry_delivers_and_drop_lets_retention_remove() {
    let fixed = Arc::new(AtomicBool::new(false));
    let smtp = rejecting_until(fixed.clone());
    let server = MailServer::start("UIDPLUS", vec![fake_message(1), fake_message(2)]);
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        "initial = \"all\"\npurge_after = \"0s\"",
    );
    case.use_imap_at(server.port, "none");
    assert_exit(&case.run(&["run"]), 65);
    let list = stdout(&case.run(&["quarantine", "list"]));
    assert!(list.contains("550 5.7.1 content refused"), "{list}");
    let ids: Vec<String> = case
        .rows()
        .iter()
        .filter(|r| r.state == "rejected")
        .map(|r| r.id.to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{list}");
    // Quarantined mail stays on the server, whatever the retention says.
    assert_eq!(server.inbox_uids(), vec![1, 2]);
    assert_eq!(inbox(&status_json(&case))["quarantined"], 2);
    fixed.store(true, Ordering::SeqCst);
    let out = case.run(&["quarantine", "retry", &ids[0]]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("will be tried again"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("the next `imapull run"),
        "{}",
        stdout(&out)
    );
    let out = case.run(&["quarantine", "drop", &ids[1]]);
    assert_exit(&out, 0);
    assert!(
        stdout(&out).contains("retention removes it"),
        "{}",
        stdout(&out)
    );
    // An ID that is not quarantined any more is said so, and fails.
    let out = case.run(&["quarantine", "drop", &ids[1]]);
    assert_exit(&out, 65);
    assert!(
        stdout(&out).contains("not in the quarantine"),
        "{}",
        stdout(&out)
    );
    // The next pass delivers the retried one; retention (0s) removes both
    // the delivered and the dropped one, and the dropped one is never sent.
    assert_exit(&case.run(&["run"]), 0);
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(case.state_of(1), "delivered");
    assert!(server.inbox_uids().is_empty(), "{:?}", server.commands());
    let list = stdout(&case.run(&["quarantine", "list"]));
    assert!(list.contains("the quarantine is empty"), "{list}");
}

#[test]
fn quarantine_retry_wakes_a_running_daemon() {
    let fixed = Arc::new(AtomicBool::new(false));
    let smtp = rejecting_until(fixed.clone());
    let server = MailServer::start("UIDPLUS IDLE", vec![fake_message(1)]);
    let case = Case::new(
        &smtp.url(),
        &["x@example.test"],
        "initial = \"all\"\ncatchup_interval = \"1h\"",
    );
    case.use_imap_at(server.port, "none");
    let d = crate::daemon::Daemon::start(&case);
    d.wait_log("rejected (quarantined)", 1);
    fixed.store(true, Ordering::SeqCst);
    let out = case.run(&["quarantine", "retry", "--all"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("woke the daemon"), "{}", stdout(&out));
    d.wait_log("delivered mailbox", 1);
    assert_eq!(smtp.messages().len(), 1);
    assert_eq!(d.stop().0, Some(0));
}

#[test]
fn check_logs_in_lists_and_greets_the_local_server_without_sending_mail() {
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let case = Case::new(&smtp.url(), &["x@example.test"], "");
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["check"]);
    let text = stdout(&out);
    assert_exit(&out, 0);
    assert!(text.contains("the configuration is valid"), "{text}");
    assert!(text.contains("IMAP       ok: logged in"), "{text}");
    assert!(
        text.contains("IDLE yes") && text.contains("UIDPLUS yes"),
        "{text}"
    );
    assert!(text.contains("(all there)"), "{text}");
    assert!(text.contains("local      ok"), "{text}");
    assert!(text.contains("all checks passed"), "{text}");
    // One session with the local server, no mail; nothing fetched or
    // flagged on the remote, no ledger row.
    assert_eq!(smtp.connections.load(Ordering::SeqCst), 1);
    assert!(smtp.messages().is_empty());
    let f = flags(&case.user, "INBOX");
    assert!(
        f.len() == 1 && !f.values().any(|v| v.contains("Seen")),
        "{f:?}"
    );
    assert!(case.rows().is_empty());
    // The real Postfix answers too.
    let case = Case::new(&crate::harness::smtp(), &["x@example.test"], "");
    assert_exit(&case.run(&["check"]), 0);
}

#[test]
fn check_says_what_is_wrong_and_how_to_fix_it() {
    // A wrong password.
    let case = Case::new(&smtp(), &["x@example.test"], "");
    std::fs::write(case.dir.join("password"), "wrong\n").unwrap();
    let out = case.run(&["check"]);
    assert_exit(&out, 77);
    let text = stdout(&out);
    assert!(text.contains("IMAP       FAILED"), "{text}");
    assert!(text.contains("check `username` and the password"), "{text}");
    // A mailbox that is not there.
    let case = Case::new(
        &smtp(),
        &["x@example.test"],
        "mailboxes = [\"INBOX\", \"Nope\"]",
    );
    let out = case.run(&["check"]);
    assert_exit(&out, 78);
    assert!(stdout(&out).contains("MISSING: Nope"), "{}", stdout(&out));
    // No local server.
    let port = free_port();
    let case = Case::new(&format!("smtp://127.0.0.1:{port}"), &["x@example.test"], "");
    let out = case.run(&["check"]);
    assert_exit(&out, 69);
    let text = stdout(&out);
    assert!(text.contains("local      FAILED"), "{text}");
    assert!(text.contains("some checks FAILED"), "{text}");
}

fn verify_json(case: &Case, code: i32) -> serde_json::Value {
    let out = case.run(&["verify", "--json"]);
    assert_exit(&out, code);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", stdout(&out)))
}

fn kinds(v: &serde_json::Value) -> Vec<String> {
    inbox(v)["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn verify_finds_what_changed_behind_imapulls_back() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "initial = \"all\"");
    for n in 0..3 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "v"), false);
    }
    // Never pulled: nothing to compare, not a failure.
    assert_eq!(kinds(&verify_json(&case, 0)), vec!["never_pulled"]);
    assert_exit(&case.run(&["run"]), 0);
    wait_delivered(&rcpt, 3);
    let v = verify_json(&case, 0);
    assert_eq!(inbox(&v)["agrees"], true, "{v}");
    assert_eq!(inbox(&v)["server"]["messages"], 3);
    let text = stdout(&case.run(&["verify"]));
    assert!(text.contains("INBOX: agrees (3 message(s)"), "{text}");
    // Another client expunges a delivered message: said, not a failure.
    doveadm(&["expunge", "-u", &case.user, "mailbox", "INBOX", "uid", "1"]);
    assert_eq!(kinds(&verify_json(&case, 0)), vec!["gone_before_retention"]);
    // A message below the watermark the ledger never saw (its row lost).
    let conn = rusqlite::Connection::open(&case.ledger).unwrap();
    conn.execute("DELETE FROM message WHERE uid = 2", [])
        .unwrap();
    let v = verify_json(&case, 65);
    assert_eq!(
        kinds(&v),
        vec!["never_seen", "gone_before_retention"],
        "{v}"
    );
    assert_eq!(inbox(&v)["findings"][0]["uids"], serde_json::json!([2]));
    assert!(stdout(&case.run(&["verify"])).contains("DISAGREES"));
    // Verify changed nothing: no flag, no row.
    assert!(flags(&case.user, "INBOX")
        .values()
        .all(|f| f.contains("Seen")));
    assert_eq!(case.rows().len(), 2);
}

#[test]
fn baseline_skips_the_mail_there_and_pulls_what_comes_later() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "initial = \"all\"");
    for n in 0..3 {
        drop_message(&case.user, n, &message(n, "bob@remote.test", "old"), false);
    }
    let out = case.run(&["baseline", &case.user]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("watermark set to UIDNEXT 4"), "{text}");
    assert!(
        text.contains("the 3 message(s) there now are not delivered"),
        "{text}"
    );
    assert_exit(&case.run(&["run"]), 0);
    drop_message(&case.user, 9, &message(9, "bob@remote.test", "new"), false);
    assert_exit(&case.run(&["run"]), 0);
    let got = wait_delivered(&rcpt, 1);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(settle_delivered(&rcpt).len(), 1);
    assert!(String::from_utf8_lossy(&got[0]).contains("new"));
    // The skipped mail is skipped on purpose: verify agrees.
    assert_eq!(inbox(&verify_json(&case, 0))["agrees"], true);
    // A mailbox the account does not pull is refused.
    assert_exit(&case.run(&["baseline", &case.user, "Nope"]), 64);
}

/// A statefile written by the Debian `pullimap` itself, imported: imapull
/// delivers nothing PullIMAP delivered, and everything it had not.
#[test]
fn import_pullimap_takes_over_where_pullimap_stopped() {
    let smtp = FakeSmtp::start(|_, _| "250 ok".into());
    let user = new_user();
    let dir = env().dir.join("cases").join(format!("{user}-import"));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("pullimap.state");
    let pconf = dir.join("pullimap.conf");
    std::fs::write(
        &pconf,
        format!(
            "[work]\ntype = imaps\nhost = localhost\nport = {}\nSSL_CAfile = {}\n\
             username = {user}\npassword = secret\nstatefile = {}\n\
             deliver-method = smtp:[127.0.0.1]:{}\ndeliver-rcpt = x@example.test\n\
             compress = NO\nSSL_protocol_min = TLSv1.2\n",
            env().imaps_port,
            env().ca_file.display(),
            state.display(),
            smtp.port
        ),
    )
    .unwrap();
    for n in 1..=3 {
        drop_message(
            &user,
            n,
            &message(n, "bob@remote.test", &format!("m{n}")),
            false,
        );
    }
    let out = std::process::Command::new("pullimap")
        .arg(format!("--config={}", pconf.display()))
        .arg("work")
        .output()
        .expect("pullimap (scripts/install-deps.sh installs it)");
    assert!(
        out.status.success(),
        "pullimap: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(smtp.messages().len(), 3);
    // Two more arrive; PullIMAP delivered the first of them in a run that
    // was cut short (its UID follows the two integers in the statefile).
    for n in 4..=5 {
        drop_message(
            &user,
            n,
            &message(n, "bob@remote.test", &format!("m{n}")),
            false,
        );
    }
    let mut bytes = std::fs::read(&state).unwrap();
    assert_eq!(bytes.len(), 8, "a clean PullIMAP run leaves two integers");
    assert_eq!(u32::from_be_bytes(bytes[4..8].try_into().unwrap()), 4);
    bytes.extend(4u32.to_be_bytes());
    std::fs::write(&state, bytes).unwrap();
    let config = dir.join("imapull.toml");
    std::fs::write(
        &config,
        format!("ledger = {:?}\n", dir.join("ledger.sqlite3")),
    )
    .unwrap();
    let out = imapull(
        &config,
        &[
            "import",
            "pullimap",
            "--from",
            pconf.to_str().unwrap(),
            "work",
        ],
    );
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(text.contains("watermark 4"), "{text}");
    assert!(
        text.contains("1 delivered by a run that was cut short"),
        "{text}"
    );
    assert!(
        text.contains("SSL_protocol_min = TLSv1.2: not mapped"),
        "{text}"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&config).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the config holds a password");
    // Importing twice is refused, and changes nothing.
    let before = std::fs::read(&config).unwrap();
    let from = pconf.to_str().unwrap();
    let again = imapull(&config, &["import", "pullimap", "--from", from, "work"]);
    assert_exit(&again, 78);
    assert!(
        stderr(&again).contains("nothing was written"),
        "{}",
        stderr(&again)
    );
    assert_eq!(std::fs::read(&config).unwrap(), before);
    let out = imapull(&config, &["run"]);
    assert_exit(&out, 0);
    let got = smtp.messages();
    assert_eq!(
        got.len(),
        4,
        "only message 5 is new to imapull: {}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&got[3].data).contains("m5"));
    // Message 4's \Seen, which PullIMAP owed, is stored.
    let f = flags(&user, "INBOX");
    assert!(f.values().all(|v| v.contains("Seen")), "{f:?}");
    assert_exit(&imapull(&config, &["verify"]), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
