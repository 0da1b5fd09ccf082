//! The kill test: `kill -9` at random moments loses nothing, and duplicates
//! at most the message in flight each time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::harness::*;

const MESSAGES: u32 = 500;
const KILLS: u32 = 5;

/// Both durabilities keep the promise for a process that dies: every
/// outcome is committed before the next message's final ".", whether or not
/// it is fsynced yet. Independent sessions keep it per session: at most one
/// duplicate per session and kill.
#[test]
fn kill_9_at_random_moments_loses_nothing_in_each_mode() {
    std::thread::scope(|s| {
        for (name, settings, window) in [
            ("message", "durability = \"message\"", 1),
            ("grouped", "durability = \"grouped\"", 1),
            (
                "independent",
                "delivery_sessions = 2\nindependent_sessions = true",
                2,
            ),
        ] {
            s.spawn(move || kill_loop(name, settings, window));
        }
    });
}

/// Kills `imapull run` a few times, then lets it finish; `window` is the
/// duplicates a kill may cause.
fn kill_loop(mode: &str, settings: &str, window: u32) {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], &format!("initial = \"all\"\n{settings}"));
    for n in 0..MESSAGES {
        drop_message(
            &case.user,
            n,
            &message(n, "bob@remote.test", &"x".repeat(2000)),
            false,
        );
    }
    let mut kills = 0;
    let mut runs = 0;
    loop {
        runs += 1;
        assert!(runs < 50, "{mode}: never finished");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_imapull"))
            .arg("--config")
            .arg(&case.config)
            .args(["run", "-q"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        if kills < KILLS {
            // Let it get going, then kill it somewhere in the middle.
            std::thread::sleep(Duration::from_millis(150 + pseudo_random(600)));
            if child.try_wait().unwrap().is_none() {
                // SAFETY: our own child's PID.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                let _ = child.wait();
                kills += 1;
                continue;
            }
        }
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0));
        break;
    }
    assert!(kills >= 1, "{mode}: the runs were too quick to be killed");
    // Count what Postfix delivered, by Message-ID.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut counts: BTreeMap<String, u32>;
    loop {
        counts = BTreeMap::new();
        for f in wait_delivered(&rcpt, MESSAGES as usize) {
            let text = String::from_utf8_lossy(&f).to_string();
            let id = text
                .lines()
                .find(|l| l.starts_with("Message-ID:"))
                .unwrap()
                .to_string();
            *counts.entry(id).or_default() += 1;
        }
        if counts.len() as u32 >= MESSAGES || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        counts.len() as u32,
        MESSAGES,
        "{mode}: every message arrived at least once"
    );
    let duplicates: u32 = counts.values().map(|c| c - 1).sum();
    assert!(
        duplicates <= kills * window,
        "{mode}: {duplicates} duplicates for {kills} kills"
    );
    let rows = case.rows();
    assert_eq!(rows.len() as u32, MESSAGES);
    assert!(rows.iter().all(|r| r.state == "delivered" && r.flagged));
    eprintln!("kill test: {kills} kills, {runs} runs, {duplicates} duplicates");
}
