//! `imapull oauth2 authorize ACCOUNT`: the first authorisation, on a
//! headless machine, with the browser on another one.
//!
//! - The device flow (RFC 8628, Microsoft): a URL and a code to enter on
//!   any device; imapull polls the token endpoint until the user is done.
//! - The authorisation-code flow with PKCE (RFC 7636) and a loopback
//!   redirect (RFC 8252, Google, whose device flow refuses the Gmail
//!   scope): the provider sends the browser to `http://127.0.0.1:PORT/`.
//!   imapull listens there, for a browser on this machine or one whose
//!   port is forwarded over SSH; or the user pastes the address the
//!   browser failed to load back into the command.
//! - Client credentials: nothing to authorise; a first token is fetched to
//!   show that the application's credentials work.

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use oauth2::DeviceCodeErrorResponseType;
use oauth2::{
    AuthorizationCode, CsrfToken, PkceCodeChallenge, RedirectUrl, RequestTokenError,
    StandardDeviceAuthorizationResponse, TokenResponse as _,
};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::store::{self, Stored};
use super::{client, describe, expires_in, http, judge, scopes, Judged, TokenError};
use crate::config::{Account, Flow, OAuth2};
use crate::secret::Secret;

pub struct Options {
    /// The loopback port of the authorisation-code flow (0: any free one).
    pub port: u16,
    /// How long to wait for the user.
    pub wait: Duration,
}

pub async fn authorize(
    out: &mut dyn Write,
    account: &Account,
    cfg: &OAuth2,
    opts: &Options,
) -> Result<()> {
    let who = format!("the account {} ({})", account.name, account.username);
    match cfg.flow {
        Flow::ClientCredentials => {
            let now = crate::system_now();
            super::client_credentials(cfg, None, now)
                .await
                .map_err(anyhow::Error::new)?;
            writeln!(
                out,
                "{who}: the application's credentials work; imapull asks for a new app-only \
                 token by itself whenever it needs one (kept in {}).",
                cfg.token_file.display()
            )?;
            return Ok(());
        }
        Flow::Device => device(out, &who, account, cfg, opts).await?,
        Flow::AuthorizationCode => code(out, &who, account, cfg, opts).await?,
    }
    writeln!(
        out,
        "Authorised. The refresh token is in {} (mode 0600); imapull renews the access \
         token by itself.",
        cfg.token_file.display()
    )?;
    if let Some(l) = cfg.refresh_token_lifetime {
        let end = crate::system_now() + l.as_secs() as i64;
        writeln!(
            out,
            "By refresh_token_lifetime it works until {}: run this command again before then \
             (imapull check, status and the alerts say so from a day before).",
            crate::ops::status::rfc3339(end)
        )?;
    }
    Ok(())
}

async fn device(
    out: &mut dyn Write,
    who: &str,
    account: &Account,
    cfg: &OAuth2,
    opts: &Options,
) -> Result<()> {
    let c = client(cfg)?;
    let details: StandardDeviceAuthorizationResponse = c
        .exchange_device_code()?
        .add_scopes(scopes(cfg))
        .request_async(http())
        .await
        .map_err(|e| judged(judge(e), "asking for a device code"))?;
    let url = details
        .verification_uri_complete()
        .map(|u| u.secret().clone())
        .unwrap_or_else(|| details.verification_uri().to_string());
    writeln!(
        out,
        "To authorise imapull for {who}, on any device with a browser:\n\n  \
         1. open {}\n  2. enter the code {}\n  3. sign in as {}\n\n\
         Waiting for you (the code is valid for {})...",
        url,
        details.user_code().secret(),
        account.username,
        humantime::format_duration(details.expires_in())
    )?;
    out.flush()?;
    let now = crate::system_now();
    let wait = opts.wait.min(details.expires_in());
    let t = c
        .exchange_device_access_token(&details)
        .request_async(http(), tokio::time::sleep, Some(wait))
        .await
        .map_err(|e| match e {
            RequestTokenError::ServerResponse(r) => {
                let code = r.error();
                let why = describe(code.as_ref(), r.error_description());
                match code {
                    DeviceCodeErrorResponseType::AccessDenied => {
                        anyhow!("the authorisation was declined ({why})")
                    }
                    DeviceCodeErrorResponseType::ExpiredToken => anyhow!(
                        "nobody entered the code within {} ({why}): run this again",
                        humantime::format_duration(wait)
                    ),
                    _ => anyhow!("the token endpoint refused: {why}"),
                }
            }
            other => anyhow!(
                "waiting for the authorisation: {}",
                judged_text(other.to_string())
            ),
        })?;
    keep(cfg, &t, now).await
}

async fn code(
    out: &mut dyn Write,
    who: &str,
    account: &Account,
    cfg: &OAuth2,
    opts: &Options,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", opts.port))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", opts.port))?;
    let port = listener.local_addr()?.port();
    let redirect = RedirectUrl::new(format!("http://127.0.0.1:{port}/"))?;
    let c = client(cfg)?.set_redirect_uri(redirect.clone());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut req = c
        .authorize_url(CsrfToken::new_random)?
        .add_scopes(scopes(cfg))
        .set_pkce_challenge(challenge)
        .add_extra_param("login_hint", account.username.clone());
    for (k, v) in &cfg.authorization_params {
        req = req.add_extra_param(k.clone(), v.clone());
    }
    let (url, state) = req.url();
    let host = crate::config::local_hostname();
    writeln!(
        out,
        "To authorise imapull for {who}, open this address in a browser and sign in as {}:\n\n\
         {url}\n\n\
         The provider then sends the browser to http://127.0.0.1:{port}/, where this command \
         listens. Either:\n  \
         - use a browser on this machine; or forward the port first, from the machine with the \
         browser: ssh -L {port}:127.0.0.1:{port} {host}\n  \
         - or, when the browser says it cannot reach 127.0.0.1, copy the whole address from its \
         address bar and paste it here, then press Enter.\n\n\
         Waiting (up to {})...",
        account.username,
        humantime::format_duration(opts.wait)
    )?;
    out.flush()?;
    let pasted = pasted_lines();
    let answer = tokio::select! {
        r = loopback_redirect(&listener) => r?,
        r = first_redirect(pasted) => r?,
        _ = tokio::time::sleep(opts.wait) => bail!(
            "no answer within {}: run this again", humantime::format_duration(opts.wait)
        ),
    };
    let code = code_of(&answer, state.secret())?;
    let now = crate::system_now();
    let t = c
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .set_redirect_uri(Cow::Owned(redirect))
        .request_async(http())
        .await
        .map_err(|e| judged(judge(e), "exchanging the authorisation code"))?;
    keep(cfg, &t, now).await
}

/// The token file of a new authorisation, written under the lock.
async fn keep(cfg: &OAuth2, t: &oauth2::basic::BasicTokenResponse, now: i64) -> Result<()> {
    let Some(rt) = t.refresh_token() else {
        bail!(
            "the provider gave no refresh token, so imapull could not renew the access token \
             (Microsoft: the scope needs offline_access; Google: access_type=offline, which \
             imapull asks for)"
        );
    };
    let s = Stored {
        version: store::VERSION,
        client_id: cfg.client_id.clone(),
        refresh_token: Some(Secret::new(rt.secret().clone())),
        access_token: Some(Secret::new(t.access_token().secret().clone())),
        expires_at: Some(now + expires_in(t)),
        authorized_at: now,
        refreshed_at: None,
        rotated_at: None,
        refused: None,
    };
    let path = cfg.token_file.clone();
    tokio::task::spawn_blocking(move || {
        let _lock = store::lock(&path)?;
        store::save(&path, &s)
    })
    .await?
}

fn judged(j: Judged, doing: &str) -> anyhow::Error {
    match j.into_error(doing) {
        TokenError::Reauthorize(e) | TokenError::Unavailable(e) => e,
    }
}

/// An error's text, without what a reply that is not OAuth2 JSON held.
fn judged_text(s: String) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

/// Lines typed or pasted on stdin. A thread of its own: a blocking read of
/// a terminal must not hold up the runtime's shutdown.
fn pasted_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first pasted line that is a redirect (a code or an error); other
/// lines are answered on stderr. Never returns when stdin ends.
async fn first_redirect(mut lines: tokio::sync::mpsc::Receiver<String>) -> Result<String> {
    while let Some(line) = lines.recv().await {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if is_redirect(line) {
            return Ok(line.to_string());
        }
        eprintln!(
            "imapull: that is not the address the browser was sent to (it has ?code= or \
             ?error= in it); paste it again"
        );
    }
    std::future::pending().await
}

/// The first request to the loopback port that carries a code or an error,
/// answered with a page the user can close. Others (a favicon) get a 404.
async fn loopback_redirect(listener: &tokio::net::TcpListener) -> Result<String> {
    loop {
        let (mut s, _) = listener.accept().await?;
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        let read = tokio::time::timeout(Duration::from_secs(10), async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            std::io::Result::Ok(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            continue;
        }
        let head = String::from_utf8_lossy(&head);
        let target = head
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("GET "))
            .and_then(|l| l.split(' ').next())
            .unwrap_or_default()
            .to_string();
        let (status, body) = if is_redirect(&target) {
            (
                "200 OK",
                "imapull has the answer; you can close this window and go back to the terminal.",
            )
        } else {
            (
                "404 Not Found",
                "imapull waits for the provider's redirect here.",
            )
        };
        let _ = s
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        let _ = s.shutdown().await;
        if status.starts_with("200") {
            return Ok(target);
        }
    }
}

fn query(s: &str) -> Vec<(String, String)> {
    let base = oauth2::url::Url::parse("http://127.0.0.1/").expect("a URL");
    match base.join(s.trim()) {
        Ok(u) => u.query_pairs().into_owned().collect(),
        Err(_) => Vec::new(),
    }
}

fn is_redirect(s: &str) -> bool {
    query(s).iter().any(|(k, _)| k == "code" || k == "error")
}

/// The code of a redirect (a whole URL, or its path and query), checked
/// against the state this command sent.
fn code_of(redirect: &str, state: &str) -> Result<String> {
    let q = query(redirect);
    let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if let Some(error) = get("error") {
        bail!(
            "the provider did not authorise: {}",
            describe(&error, get("error_description").as_ref())
        );
    }
    if get("state").as_deref() != Some(state) {
        bail!("the redirect is not the answer to this request (its state differs): run this again");
    }
    get("code").ok_or_else(|| anyhow!("the redirect carries no code"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_gives_its_code_when_the_state_matches() {
        let url = "http://127.0.0.1:8080/?state=s1&code=4%2F0Ab&scope=x";
        assert!(is_redirect(url));
        assert_eq!(code_of(url, "s1").unwrap(), "4/0Ab");
        assert_eq!(code_of("/?code=c&state=s1", "s1").unwrap(), "c");
        let e = code_of(url, "other").unwrap_err().to_string();
        assert!(e.contains("state differs"), "{e}");
        let e = code_of(
            "/?error=access_denied&error_description=The+user+said+no&state=s1",
            "s1",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("access_denied: The user said no"), "{e}");
        assert!(!is_redirect("/favicon.ico"));
        assert!(!is_redirect("hello"));
    }
}
