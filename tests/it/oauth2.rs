//! OAuth2 logins against the real Dovecot: its `oauth2` passdb asks a
//! token-introspection endpoint on 127.0.0.1 that the test controls
//! (harness.rs), and the token comes from `oauth2_token_command`.

use crate::harness::*;

/// An account of `user` logging in with `mechanism`; its token command
/// prints the next line of `tokens` at each run (the last one again when
/// they run out), and notes each run.
fn oauth_case(mechanism: &str, tokens: &[&str]) -> Case {
    let rcpt = new_recipient();
    let user = new_user();
    let dir = env().dir.join("cases").join(format!("{user}-oauth2"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokens"), tokens.join("\n") + "\n").unwrap();
    let script = format!(
        "n=$(($(cat {d}/runs 2>/dev/null || echo 0)+1)); echo $n > {d}/runs; \
         sed -n \"${{n}}p;\\$p\" {d}/tokens | head -1",
        d = dir.display()
    );
    let extra = format!(
        "initial = \"all\"\nauth = \"{mechanism}\"\noauth2_token_command = [\"sh\", \"-c\", {script:?}]"
    );
    let case = Case::for_user(user, &smtp(), &[&rcpt], &extra);
    // No password with OAuth2.
    drop_password(&case);
    std::fs::write(
        case.dir.join("oauth2-dir"),
        dir.to_string_lossy().as_bytes(),
    )
    .unwrap();
    case
}

fn runs(case: &Case) -> u32 {
    let dir = std::fs::read_to_string(case.dir.join("oauth2-dir")).unwrap();
    std::fs::read_to_string(std::path::Path::new(&dir).join("runs"))
        .map(|s| s.trim().parse().unwrap())
        .unwrap_or(0)
}

#[test]
fn xoauth2_and_oauthbearer_log_in_to_dovecot_with_a_valid_token() {
    for mechanism in ["xoauth2", "oauthbearer"] {
        let token = format!("good-{mechanism}-{}", unique());
        let case = oauth_case(mechanism, &[&token]);
        grant_token(&token, &case.user);
        drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
        let out = case.run(&["-vv", "run"]);
        assert_exit(&out, 0);
        assert_eq!(
            case.state_of(1),
            "delivered",
            "{mechanism}: {}",
            stderr(&out)
        );
        assert_eq!(runs(&case), 1);
        // Even at trace level, the token is nowhere in the log.
        assert!(
            !stderr(&out).contains(&token),
            "{mechanism}: the token was logged"
        );
        let out = case.run(&["check"]);
        assert_exit(&out, 0);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("with an OAuth2 token"), "{text}");
    }
}

#[test]
fn a_refused_token_is_fetched_again_once_and_a_revoked_one_is_a_clear_refusal() {
    // The first token has expired; the helper's second answer is fresh.
    let (old, fresh) = (format!("old-{}", unique()), format!("fresh-{}", unique()));
    let case = oauth_case("xoauth2", &[&old, &fresh]);
    grant_token(&fresh, &case.user);
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(runs(&case), 2, "{}", stderr(&out));
    assert_eq!(case.state_of(1), "delivered");
    // Revoked: refused twice, exit 77, one clear error, nothing touched.
    revoke_token(&fresh);
    drop_message(&case.user, 2, &message(2, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 77);
    let log = stderr(&out);
    assert!(log.contains("refused the OAuth2 token"), "{log}");
    assert!(!log.contains(&fresh), "the token was logged: {log}");
    assert_eq!(runs(&case), 4, "one fresh try, not a loop");
    assert_eq!(case.state_of(2), "none");
    // `check` says what to do about it.
    let out = case.run(&["check"]);
    assert_exit(&out, 77);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("re-authorise the account with the helper `sh`"),
        "{text}"
    );
    assert!(!text.contains(&fresh), "the token in check's output");
}

/// A daemon that logged in keeps its IDLE session when the token it used
/// expires, and new mail still arrives at once; a reconnect would ask the
/// command for a fresh token.
#[test]
fn the_daemon_keeps_idling_across_the_tokens_expiry() {
    let (first, second) = (
        format!("first-{}", unique()),
        format!("second-{}", unique()),
    );
    let case = oauth_case("oauthbearer", &[&first, &second]);
    grant_token(&first, &case.user);
    let d = crate::daemon::Daemon::start(&case);
    d.wait_log("pass done", 1);
    // The token expires: Dovecot would refuse it now.
    revoke_token(&first);
    grant_token(&second, &case.user);
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "late"), false);
    d.wait_log("delivered mailbox", 1);
    assert_eq!(runs(&case), 1, "the IDLE session was not logged in again");
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        !log.contains(&first) && !log.contains(&second),
        "a token in the log"
    );
}
