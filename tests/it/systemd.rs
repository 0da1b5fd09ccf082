//! The shipped unit files pass `systemd-analyze verify` (skipped where
//! systemd-analyze is not installed).

use std::process::Command;

use crate::harness::*;

#[test]
fn unit_files_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: unit files not verified");
        return;
    }
    let dir = env().dir.join(format!("units-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = root().join("systemd");
    for name in [
        "imapull-run@.service",
        "imapull-run@.timer",
        "imapull.service",
    ] {
        // verify insists that ExecStart's program exists: use the one built.
        let text = std::fs::read_to_string(src.join(name))
            .unwrap()
            .replace("/usr/local/bin/imapull", env!("CARGO_BIN_EXE_imapull"));
        std::fs::write(dir.join(name), text).unwrap();
    }
    for (link, target) in [
        ("imapull-run@work.service", "imapull-run@.service"),
        ("imapull-run@work.timer", "imapull-run@.timer"),
    ] {
        std::os::unix::fs::symlink(target, dir.join(link)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .current_dir(&dir)
        .args([
            "verify",
            "./imapull-run@work.service",
            "./imapull-run@work.timer",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn password_file_from_systemd_credentials() {
    let rcpt = new_recipient();
    let case = Case::new(&smtp(), &[&rcpt], "");
    let creds = case.dir.join("creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::write(creds.join(format!("imapull-{}", case.user)), "secret\n").unwrap();
    let t = std::fs::read_to_string(&case.config).unwrap();
    let t = t
        .lines()
        .map(|l| {
            if l.starts_with("password_file") {
                format!(
                    "password_file = \"${{CREDENTIALS_DIRECTORY}}/imapull-{}\"",
                    case.user
                )
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&case.config, t).unwrap();
    drop_message(&case.user, 0, &message(0, "bob@remote.test", "x"), false);
    let out = Command::new(env!("CARGO_BIN_EXE_imapull"))
        .arg("--config")
        .arg(&case.config)
        .arg("run")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    assert_exit(&out, 0);
    assert_eq!(wait_delivered(&rcpt, 1).len(), 1);
    // Without the variable the error says what is missing.
    let out = case.run(&["run"]);
    assert_exit(&out, 77);
    assert!(
        stderr(&out).contains("CREDENTIALS_DIRECTORY is not set"),
        "{}",
        stderr(&out)
    );
}
