//! imapull's own OAuth2 token source against the real Dovecot (its
//! `oauth2` passdb) and a scripted provider on 127.0.0.1 (provider.rs):
//! refresh and rotation, a revoked refresh token, both authorisation flows
//! end to end, client credentials, and kill -9 during rotation.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;
use crate::provider::Provider;

/// An account of a new user logging in with `mechanism`, its tokens from
/// `provider` by `flow`; `extra` goes into the account table.
fn builtin_case(provider: &Provider, mechanism: &str, flow: &str, extra: &str) -> (Case, PathBuf) {
    let rcpt = new_recipient();
    let user = new_user();
    provider.with(|s| s.user = user.clone());
    let table = format!(
        "[accounts.{user}.oauth2]\nflow = \"{flow}\"\nclient_id = \"imapull-test\"\n\
         token_url = {t:?}\ndevice_authorization_url = {d:?}\nauthorization_url = {a:?}\n\
         scope = [\"imap\"]\n",
        t = provider.url("/token"),
        d = provider.url("/devicecode"),
        a = provider.url("/authorize"),
    );
    let case = Case::for_user(
        user,
        &smtp(),
        &[&rcpt],
        &format!("initial = \"all\"\nauth = \"{mechanism}\"\n{extra}\n{table}"),
    );
    drop_password(&case);
    // The default place: beside the ledger.
    let token_file = case.dir.join("oauth2").join(format!("{}.json", case.user));
    (case, token_file)
}

/// A token file as `imapull oauth2 authorize` leaves it, its access token
/// expired.
fn seed(token_file: &Path, refresh_token: &str) {
    std::fs::create_dir_all(token_file.parent().unwrap()).unwrap();
    let now = imapull::system_now();
    std::fs::write(
        token_file,
        format!(
            "{{\"version\":1,\"client_id\":\"imapull-test\",\"refresh_token\":\"{refresh_token}\",\
             \"access_token\":\"at-stale\",\"expires_at\":{},\"authorized_at\":{}}}",
            now - 10,
            now - 3600
        ),
    )
    .unwrap();
}

fn file_json(token_file: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(token_file).unwrap()).unwrap()
}

fn refresh_token_in(token_file: &Path) -> String {
    file_json(token_file)["refresh_token"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn an_expired_token_is_refreshed_and_the_rotated_refresh_token_is_saved_before_use() {
    let provider = Provider::start("");
    provider.with(|s| s.rotate = true);
    let (case, token_file) = builtin_case(&provider, "xoauth2", "device", "");
    let rt0 = provider.seed_refresh_token();
    seed(&token_file, &rt0);
    watch_token_file(&case.user, &token_file);
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["-vv", "run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(1), "delivered", "{}", stderr(&out));
    assert_eq!(provider.grants(), ["refresh_token"]);
    let (access, rotated) = provider.with(|s| s.issued[0].clone());
    let rotated = rotated.expect("rotated");
    // When Dovecot first saw the new access token, the file on disk
    // already held the refresh token that came with it.
    let at_use = token_file_at_use(&access).expect("the token was used");
    assert!(at_use.contains(&rotated), "not saved before use: {at_use}");
    assert_eq!(refresh_token_in(&token_file), rotated);
    // No token in the log, at trace level.
    let log = stderr(&out);
    for t in [&rt0, &rotated, &access] {
        assert!(!log.contains(t.as_str()), "a token in the log: {log}");
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&token_file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // The next run (OAUTHBEARER now) uses the cached access token: no
    // request to the provider.
    let text = std::fs::read_to_string(&case.config)
        .unwrap()
        .replace("auth = \"xoauth2\"", "auth = \"oauthbearer\"");
    std::fs::write(&case.config, text).unwrap();
    drop_message(&case.user, 2, &message(2, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(2), "delivered");
    assert_eq!(provider.grants().len(), 1);
    // An access token the server refuses is refreshed once, at once.
    revoke_token(&access);
    drop_message(&case.user, 3, &message(3, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(3), "delivered", "{}", stderr(&out));
    assert_eq!(provider.grants().len(), 2);
    // The rotated token was used, which retires the first one.
    assert!(!provider.takes_refresh_token(&rt0));
    // status and check show the authorisation, and no token.
    let out = case.run(&["status", "--json"]);
    assert_exit(&out, 0);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let o = &status["accounts"][0]["oauth2"];
    assert_eq!(o["flow"], "device");
    assert!(o["refreshed_at"].is_string(), "{o}");
    assert!(o["attention"].is_null(), "{o}");
    let out = case.run(&["check"]);
    assert_exit(&out, 0);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("OAuth2     device flow"), "{text}");
    let rt = refresh_token_in(&token_file);
    assert!(!text.contains(&rt) && !String::from_utf8_lossy(&status_bytes(&case)).contains(&rt));
}

fn status_bytes(case: &Case) -> Vec<u8> {
    case.run(&["status"]).stdout
}

#[test]
fn a_revoked_refresh_token_is_one_clear_error_one_notice_and_no_loop() {
    let provider = Provider::start("");
    let owner = new_recipient();
    let (case, token_file) = builtin_case(
        &provider,
        "xoauth2",
        "device",
        &format!("alert_to = \"{owner}\""),
    );
    seed(&token_file, &provider.seed_refresh_token());
    provider.revoke_refresh_tokens();
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 77);
    let log = stderr(&out);
    assert!(log.contains("refused the refresh token"), "{log}");
    assert!(
        log.contains(&format!("imapull oauth2 authorize {}", case.user)),
        "{log}"
    );
    assert_eq!(case.state_of(1), "none");
    // Asked once; the next run does not ask again.
    let out = case.run(&["run"]);
    assert_exit(&out, 77);
    assert_eq!(provider.grants(), ["refresh_token"]);
    // One notice to the owner, saying which command helps.
    let notice = String::from_utf8_lossy(&wait_delivered(&owner, 1)[0]).into_owned();
    assert!(
        notice.contains("OAUTH2 NEEDS A NEW AUTHORISATION"),
        "{notice}"
    );
    assert!(
        notice.contains(&format!("imapull oauth2 authorize {}", case.user)),
        "{notice}"
    );
    // status and check say so.
    let out = case.run(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("oauth2 NEEDS YOU: the provider refused"),
        "{text}"
    );
    let out = case.run(&["check"]);
    assert_exit(&out, 77);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("authorise the account (again) with `imapull oauth2 authorize"),
        "{text}"
    );
    // A new authorisation (device flow) ends it: mail flows, and the owner
    // hears that it is over.
    authorize_by_device(&provider, &case);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(1), "delivered");
    let notices = wait_delivered(&owner, 2);
    let last = String::from_utf8_lossy(&notices[1]).into_owned();
    assert!(last.contains("AUTHORISED AGAIN"), "{last}");
}

/// Runs `imapull oauth2 authorize`, reads what it prints until `until`
/// says it has what the test needs, and hands back the child.
fn start_authorize(
    case: &Case,
    extra: &[&str],
    stdin: Stdio,
) -> (Child, std::io::BufReader<ChildStdout>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_imapull"))
        .arg("--config")
        .arg(&case.config)
        .args(["oauth2", "authorize", &case.user, "--wait", "30s"])
        .args(extra)
        .env("NO_COLOR", "1")
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = std::io::BufReader::new(child.stdout.take().unwrap());
    (child, out)
}

/// The first printed line that `pick` finds something in.
fn read_until(out: &mut impl std::io::BufRead, pick: impl Fn(&str) -> Option<String>) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    loop {
        assert!(Instant::now() < deadline, "nothing found in: {seen}");
        let mut line = String::new();
        assert!(out.read_line(&mut line).unwrap() > 0, "ended: {seen}");
        if let Some(x) = pick(&line) {
            return x;
        }
        seen.push_str(&line);
    }
}

fn finish(mut child: Child, mut out: impl std::io::Read) -> String {
    let status = child.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{rest}{err}");
    rest
}

fn authorize_by_device(provider: &Provider, case: &Case) {
    let (child, mut out) = start_authorize(case, &[], Stdio::null());
    let code = read_until(&mut out, |l| {
        l.split("enter the code ")
            .nth(1)
            .map(|c| c.trim().to_string())
    });
    provider.approve(&code);
    let rest = finish(child, out);
    assert!(rest.contains("Authorised."), "{rest}");
}

#[test]
fn the_device_flow_end_to_end() {
    let provider = Provider::start("");
    let (case, token_file) = builtin_case(&provider, "oauthbearer", "device", "");
    // Before it: not authorised, and the run says what to do.
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 77);
    assert!(stderr(&out).contains("authorise first"), "{}", stderr(&out));
    authorize_by_device(&provider, &case);
    let json = file_json(&token_file);
    assert!(json["refresh_token"].as_str().unwrap().starts_with("rt-"));
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(1), "delivered");
    // The access token of the authorisation was still fresh: nothing but
    // the device flow's polls reached the token endpoint.
    assert!(
        provider
            .grants()
            .iter()
            .all(|g| g.ends_with(":device_code")),
        "{:?}",
        provider.grants()
    );
    assert!(!provider.grants().iter().any(|g| g == "refresh_token"));
}

/// The authorisation URL's query, by name.
fn query_of(url: &str) -> std::collections::BTreeMap<String, String> {
    oauth2::url::Url::parse(url)
        .unwrap()
        .query_pairs()
        .into_owned()
        .collect()
}

#[test]
fn the_authorization_code_flow_by_loopback_redirect_and_by_pasting_it() {
    let provider = Provider::start("");
    let (case, token_file) = builtin_case(&provider, "xoauth2", "authorization_code", "");
    let prefix = provider.url("/authorize?");
    for way in ["loopback", "paste"] {
        let stdin = if way == "paste" {
            Stdio::piped()
        } else {
            Stdio::null()
        };
        let (mut child, mut out) = start_authorize(&case, &[], stdin);
        let url = read_until(&mut out, |l| {
            l.trim().starts_with(&prefix).then(|| l.trim().to_string())
        });
        let q = query_of(&url);
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["login_hint"], case.user);
        assert_eq!(q["scope"], "imap");
        let redirect = q["redirect_uri"].clone();
        assert!(redirect.starts_with("http://127.0.0.1:"), "{redirect}");
        // The user signs in; the provider sends the browser back.
        let code = provider.issue_code(&q["code_challenge"], &redirect);
        let back = format!("{redirect}?state={}&code={code}&scope=imap", q["state"]);
        if way == "loopback" {
            let page = http_get(&back);
            assert!(page.starts_with("HTTP/1.1 200"), "{page}");
            assert!(page.contains("close this window"), "{page}");
        } else {
            // The browser could not reach 127.0.0.1: its address is pasted.
            let mut stdin = child.stdin.take().unwrap();
            writeln!(stdin, "not it").unwrap();
            writeln!(stdin, "{back}").unwrap();
        }
        let rest = finish(child, out);
        assert!(rest.contains("Authorised."), "{way}: {rest}");
        assert!(refresh_token_in(&token_file).starts_with("rt-"), "{way}");
    }
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(1), "delivered");
    assert_eq!(
        provider.grants(),
        ["authorization_code", "authorization_code"]
    );
}

/// A GET of `url` on loopback, the whole reply.
fn http_get(url: &str) -> String {
    let u = oauth2::url::Url::parse(url).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", u.port().unwrap())).unwrap();
    let target = format!("{}?{}", u.path(), u.query().unwrap_or_default());
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    std::io::Read::read_to_string(&mut s, &mut reply).unwrap();
    reply
}

#[test]
fn client_credentials_log_in_without_a_user_and_a_bad_secret_is_named() {
    let provider = Provider::start("");
    provider.with(|s| s.client_secret = Some("s3cret".into()));
    let dir = env().dir.join(format!("cc-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let secret = dir.join("client-secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let (case, token_file) = builtin_case(&provider, "xoauth2", "client_credentials", "");
    let text = std::fs::read_to_string(&case.config).unwrap()
        + &format!("client_secret_file = {secret:?}\n");
    std::fs::write(&case.config, text).unwrap();
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(1), "delivered", "{}", stderr(&out));
    let json = file_json(&token_file);
    assert!(json.get("refresh_token").is_none(), "{json}");
    assert!(!std::fs::read_to_string(&token_file)
        .unwrap()
        .contains("s3cret"));
    // Cached: the next run asks nobody.
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(provider.grants(), ["client_credentials"]);
    // The secret is replaced by a wrong one, and the cache is gone.
    std::fs::write(&secret, "wrong\n").unwrap();
    std::fs::remove_file(&token_file).unwrap();
    let out = case.run(&["run"]);
    assert_exit(&out, 77);
    let log = stderr(&out);
    assert!(
        log.contains("refused the application's credentials"),
        "{log}"
    );
    assert!(!log.contains("wrong"), "{log}");
}

#[test]
fn kill_9_during_rotation_never_leaves_a_dead_token_file() {
    let provider = Provider::start("");
    // Every run refreshes (a token with under a minute left is not used),
    // and every refresh rotates.
    provider.with(|s| {
        s.rotate = true;
        s.expires_in = 30;
        s.delay = Duration::from_millis(40);
    });
    let (case, token_file) = builtin_case(&provider, "xoauth2", "device", "");
    seed(&token_file, &provider.seed_refresh_token());
    let mut killed = 0;
    for _ in 0..12 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_imapull"))
            .arg("--config")
            .arg(&case.config)
            .args(["run", "-q"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + pseudo_random(400)));
        if child.try_wait().unwrap().is_none() {
            // SAFETY: our own child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            killed += 1;
        }
        let _ = child.wait();
        // Whatever the moment, the file is whole and its refresh token
        // works.
        let rt = refresh_token_in(&token_file);
        assert!(
            provider.takes_refresh_token(&rt),
            "a dead token file after a kill: {rt}"
        );
    }
    assert!(killed > 0, "no run was killed");
    assert!(
        provider.grants().len() >= 3,
        "the kills came before any refresh: {:?}",
        provider.grants()
    );
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "hi"), false);
    let out = case.run(&["run"]);
    assert_exit(&out, 0);
    assert_eq!(case.state_of(1), "delivered");
}

/// The daemon keeps its IDLE session across the access token's expiry (no
/// new token until a reconnect), and a reconnect gets a fresh token.
#[test]
fn the_daemon_idles_across_expiry_and_refreshes_for_a_reconnect() {
    let provider = Provider::start("");
    // An access token with just over a minute: stale for imapull a moment
    // after it came.
    provider.with(|s| {
        s.rotate = true;
        s.expires_in = 62;
    });
    let (case, token_file) = builtin_case(&provider, "xoauth2", "device", "");
    seed(&token_file, &provider.seed_refresh_token());
    let d = crate::daemon::Daemon::start(&case);
    d.wait_log("pass done", 1);
    assert_eq!(provider.grants().len(), 1);
    // The token expires: Dovecot would refuse it now.
    let first = provider.with(|s| s.issued[0].0.clone());
    revoke_token(&first);
    drop_message(&case.user, 1, &message(1, "bob@remote.test", "late"), false);
    d.wait_log("delivered mailbox", 1);
    assert_eq!(
        provider.grants().len(),
        1,
        "the IDLE session needed no token"
    );
    // The server drops the session; the reconnect refreshes and logs in.
    std::thread::sleep(Duration::from_secs(3));
    doveadm(&["kick", &case.user]);
    drop_message(
        &case.user,
        2,
        &message(2, "bob@remote.test", "later"),
        false,
    );
    d.wait_log("delivered mailbox", 2);
    assert_eq!(provider.grants().len(), 2, "{:?}", provider.grants());
    assert_eq!(case.state_of(2), "delivered");
    let (code, log) = d.stop();
    assert_eq!(code, Some(0), "{log}");
    let tokens = provider.with(|s| s.issued.clone());
    for (at, rt) in tokens {
        assert!(!log.contains(&at), "a token in the log");
        assert!(rt.is_none_or(|rt| !log.contains(&rt)), "a token in the log");
    }
}
