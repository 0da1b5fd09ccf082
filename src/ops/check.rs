//! `imapull check`: the config is valid (it was loaded), and for each
//! account: log in (nothing fetched or flagged), the capabilities that
//! matter, the mailboxes that exist, and a session with the local server
//! (EHLO/LHLO and QUIT, no mail). Says plainly what is wrong and how to
//! fix it.

use std::io::Write;

use crate::config::{Account, TlsMode, TokenSource};
use crate::deliver::reply::Extensions;
use crate::deliver::Sessions;
use crate::exit;
use crate::imap::{ConnectError, Imap};

/// The capabilities that change what imapull does, and what.
const FEATURES: &[(&str, &str)] = &[
    ("IDLE", "the daemon delivers new mail at once; without it, it polls"),
    ("UIDPLUS", "retention removes exactly its messages; without it, only when no other message is \\Deleted"),
    ("COMPRESS=DEFLATE", "a slow link can be compressed"),
    ("MOVE", "Gmail's retention moves to the trash in one command"),
    ("SPECIAL-USE", "the trash mailbox is found by its attribute"),
];

/// What a check of one account found: lines to print, and the exit code
/// (0 when all is well).
pub struct Checked {
    pub lines: Vec<String>,
    pub code: i32,
}

impl Checked {
    fn fail(&mut self, code: i32, line: String) {
        self.lines.push(line);
        // The first failure's code: what broke first explains the rest.
        if self.code == exit::OK {
            self.code = code;
        }
    }
}

/// Checks one account against its servers.
pub async fn check(a: &Account) -> Checked {
    let mut c = Checked {
        lines: vec![format!("{}: {}", a.name, describe(a))],
        code: exit::OK,
    };
    oauth_lines(&mut c, a);
    match Imap::connect(a).await {
        Err(e) => {
            let (code, hint) = connect_hint(a, &e);
            c.fail(code, format!("  IMAP       FAILED: {e}"));
            c.lines.push(format!("             {hint}"));
        }
        Ok(mut imap) => {
            let how = match &a.auth {
                crate::config::Auth::Password => String::new(),
                crate::config::Auth::OAuth2 { mechanism, .. } => {
                    format!(" with an OAuth2 token ({mechanism:?})")
                }
            };
            c.lines.push(format!(
                "  IMAP       ok: logged in as {:?}{how}",
                a.username
            ));
            let features: Vec<String> = FEATURES
                .iter()
                .map(|(cap, _)| format!("{cap} {}", if imap.has(cap) { "yes" } else { "no" }))
                .collect();
            c.lines
                .push(format!("  features   {}", features.join(", ")));
            for (cap, why) in FEATURES {
                if !imap.has(cap) {
                    c.lines.push(format!("             without {cap}: {why}"));
                }
            }
            mailboxes(&mut c, a, &mut imap).await;
            imap.logout().await;
        }
    }
    local(&mut c, a).await;
    c
}

/// The built-in OAuth2 source: what the token file says (no token).
fn oauth_lines(c: &mut Checked, a: &Account) {
    let crate::config::Auth::OAuth2 {
        source: TokenSource::Builtin(o),
        ..
    } = &a.auth
    else {
        return;
    };
    let at = |t: Option<i64>| t.map_or("-".to_string(), crate::ops::status::rfc3339);
    let r = crate::oauth::report(&a.name, o, crate::system_now());
    c.lines.push(format!(
        "  OAuth2     {} flow, token file {}",
        o.flow.as_str(),
        r.token_file.display()
    ));
    if r.authorized_at.is_some() {
        c.lines.push(format!(
            "             authorised {}, last refreshed {}, access token until {}{}",
            at(r.authorized_at),
            at(r.refreshed_at),
            at(r.access_expires_at),
            r.refresh_expires_at.map_or(String::new(), |e| format!(
                ", refresh token until {}",
                at(Some(e))
            ))
        ));
    }
    if let Some(w) = r.attention {
        c.lines.push(format!("             WARNING: {w}"));
    }
}

fn describe(a: &Account) -> String {
    match &a.connect {
        crate::config::Connect::Tunnel { command, .. } => format!("tunnel {}", command.join(" ")),
        crate::config::Connect::Tcp { proxy } => {
            let tls = match a.tls {
                TlsMode::Implicit => "TLS",
                TlsMode::Starttls => "STARTTLS",
                TlsMode::None => "no TLS",
            };
            let via = proxy
                .as_ref()
                .map_or(String::new(), |p| format!(" through {p}"));
            format!("{}:{} ({tls}){via}", a.host, a.port)
        }
    }
}

/// What to do about a failed connection or login.
fn connect_hint(a: &Account, e: &ConnectError) -> (i32, String) {
    match e {
        ConnectError::Auth(_) => (
            exit::NOPERM,
            match &a.auth {
                crate::config::Auth::OAuth2 {
                    source: TokenSource::Command(argv),
                    ..
                } => format!(
                    "the server refused the token (or the command failed): re-authorise the \
                     account with the helper `{}` names, and check that its token is for \
                     `username` and has the provider's IMAP scope",
                    argv[0]
                ),
                crate::config::Auth::OAuth2 {
                    source: TokenSource::Builtin(o),
                    ..
                } if o.flow == crate::config::Flow::ClientCredentials => {
                    "the provider or the server refused the app-only token: check client_id, \
                     the client secret (they expire), the tenant, that the application has the \
                     IMAP.AccessAsApp permission with an administrator's consent, and that the \
                     mailbox was granted to its service principal (Add-MailboxPermission)"
                        .into()
                }
                crate::config::Auth::OAuth2 { .. } => format!(
                    "authorise the account (again) with {}, signing in as `username`; if \
                     that does not help, check that the application may use the provider's \
                     IMAP scope and that IMAP is on for the mailbox",
                    crate::oauth::reauthorize_hint(&a.name)
                ),
                crate::config::Auth::Password => {
                    "the server refused the login: check `username` and the password \
                     (`password`, `password_file` or `password_command`); Gmail and Microsoft \
                     365 want an app password or OAuth2 (`auth`)"
                        .into()
                }
            },
        ),
        ConnectError::Unavailable(inner) => {
            let io = exit::find::<std::io::Error>(inner).map(std::io::Error::kind);
            let tls = exit::find::<crate::imap::tls::HandshakeFailed>(inner).is_some();
            let hint = match io {
                _ if tls => "the TLS handshake failed: for a private CA set `ca_file`, or pin \
                             the server's key with `tls_pin_sha256`; check that `tls` matches \
                             the port (implicit on 993, starttls on 143)"
                    .to_string(),
                Some(std::io::ErrorKind::ConnectionRefused) => format!(
                    "nothing accepts connections on {}:{}: check `host` and `port`",
                    a.host, a.port
                ),
                Some(std::io::ErrorKind::TimedOut) => format!(
                    "no answer from {}: a firewall, a wrong `host`, or a proxy needed",
                    a.host
                ),
                _ => "check `host`, `port`, `tls` (and `proxy` or `command`)".to_string(),
            };
            (exit::UNAVAILABLE, hint)
        }
    }
}

async fn mailboxes(c: &mut Checked, a: &Account, imap: &mut Imap) {
    let listed = match imap.list().await {
        Ok(l) => l,
        Err(e) => {
            c.fail(
                exit::UNAVAILABLE,
                format!("  mailboxes  FAILED to list them: {e:#}"),
            );
            return;
        }
    };
    let names: Vec<&str> = listed.iter().map(|m| m.name.as_str()).collect();
    let mut missing = Vec::new();
    for mb in &a.mailboxes {
        // INBOX is case-insensitive (RFC 3501 section 5.1).
        let found = names.iter().any(|n| {
            *n == mb.name
                || (mb.name.eq_ignore_ascii_case("INBOX") && n.eq_ignore_ascii_case("INBOX"))
        });
        if !found {
            missing.push(mb.name.as_str());
        }
    }
    c.lines
        .push(format!("  mailboxes  on the server: {}", names.join(", ")));
    if missing.is_empty() {
        let pulled: Vec<&str> = a.mailboxes.iter().map(|m| m.name.as_str()).collect();
        c.lines.push(format!(
            "             pulled: {} (all there)",
            pulled.join(", ")
        ));
    } else {
        c.fail(
            exit::CONFIG,
            format!(
                "             MISSING: {} (in `mailboxes`, not on the server): fix the names",
                missing.join(", ")
            ),
        );
    }
}

async fn local(c: &mut Checked, a: &Account) {
    let mut sessions = Sessions::for_account(a);
    let d = &mut sessions.0[0];
    match d.probe().await {
        Ok(ext) => c.lines.push(format!("  local      ok: {} answered ({})", a.deliver, offers(&ext))),
        Err(e) => c.fail(
            exit::UNAVAILABLE,
            format!(
                "  local      FAILED: {e:#}\n             check `deliver` and that the local server runs"
            ),
        ),
    }
}

fn offers(e: &Extensions) -> String {
    let mut v = Vec::new();
    if e.pipelining {
        v.push("PIPELINING".to_string());
    }
    if let Some(n) = e.size {
        v.push(format!("SIZE {n}"));
    }
    if e.eight_bit_mime {
        v.push("8BITMIME".to_string());
    }
    if e.smtputf8 {
        v.push("SMTPUTF8".to_string());
    }
    if v.is_empty() {
        "no extensions".to_string()
    } else {
        v.join(", ")
    }
}

/// Prints each account's check, `parallel` at a time (as `run` works on
/// accounts); the exit code is the first failure's.
pub async fn check_all(out: &mut impl Write, accounts: &[&Account], parallel: usize) -> i32 {
    use futures_util::StreamExt as _;
    let mut code = exit::OK;
    let checks: Vec<Checked> = futures_util::stream::iter(accounts.iter().map(|a| check(a)))
        .buffered(parallel.max(1))
        .collect()
        .await;
    for c in checks {
        for l in &c.lines {
            let _ = writeln!(out, "{l}");
        }
        if code == exit::OK {
            code = c.code;
        }
    }
    let _ = writeln!(
        out,
        "{}",
        if code == exit::OK {
            "all checks passed"
        } else {
            "some checks FAILED"
        }
    );
    code
}
