//! A scripted OAuth 2.0 provider on 127.0.0.1: the token endpoint (refresh,
//! authorisation code with PKCE, device code, client credentials) and the
//! device authorization endpoint. The access tokens it issues are granted
//! to the tests' Dovecot (harness.rs), so they log in as its user.
//!
//! Rotation is strict enough to catch a client that loses a rotated
//! refresh token: the old one keeps working only until the new one is
//! used.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::harness::{grant_token, read_http_request, unique};

#[derive(Default)]
pub struct State {
    /// Whom the access tokens log in as.
    pub user: String,
    pub expires_in: u64,
    /// A new refresh token with every refresh.
    pub rotate: bool,
    /// How long each token reply waits (to widen a kill's window).
    pub delay: Duration,
    /// Required of client-credentials requests.
    pub client_secret: Option<String>,
    /// Valid refresh tokens, each with the token that replaced it (if any).
    refresh: BTreeMap<String, Option<String>>,
    codes: BTreeMap<String, (String, String)>,
    /// device_code -> (user_code, approved)
    devices: BTreeMap<String, (String, bool)>,
    /// Each token request's grant type, in order.
    pub grants: Vec<String>,
    /// Each access token issued, with the refresh token issued with it.
    pub issued: Vec<(String, Option<String>)>,
}

pub struct Provider {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

impl Provider {
    pub fn start(user: &str) -> Provider {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State {
            user: user.into(),
            expires_in: 3600,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        std::thread::spawn(move || {
            for s in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(s) = s else { continue };
                let st = st.clone();
                std::thread::spawn(move || serve(s, &st, port));
            }
        });
        Provider { port, state, stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        f(&mut self.state.lock().unwrap())
    }

    /// A refresh token it takes, as if an authorisation had happened.
    pub fn seed_refresh_token(&self) -> String {
        let rt = format!("rt-seed-{}", unique());
        self.with(|s| s.refresh.insert(rt.clone(), None));
        rt
    }

    pub fn takes_refresh_token(&self, rt: &str) -> bool {
        self.with(|s| s.refresh.contains_key(rt))
    }

    /// Every refresh token is refused from now on (revoked).
    pub fn revoke_refresh_tokens(&self) {
        self.with(|s| s.refresh.clear());
    }

    /// The user said yes to the authorisation-code request with this PKCE
    /// challenge: the code the provider sends the browser back with.
    pub fn issue_code(&self, challenge: &str, redirect_uri: &str) -> String {
        let code = format!("code-{}", unique());
        self.with(|s| {
            s.codes
                .insert(code.clone(), (challenge.into(), redirect_uri.into()))
        });
        code
    }

    /// The user entered `user_code` and said yes.
    pub fn approve(&self, user_code: &str) {
        self.with(|s| {
            for (uc, ok) in s.devices.values_mut() {
                if uc == user_code {
                    *ok = true;
                }
            }
        });
    }

    pub fn grants(&self) -> Vec<String> {
        self.with(|s| s.grants.clone())
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve(s: TcpStream, state: &Mutex<State>, port: u16) {
    let (first, body) = read_http_request(&s);
    if first.is_empty() {
        return;
    }
    let form: BTreeMap<String, String> = oauth2::url::form_urlencoded::parse(&body)
        .into_owned()
        .collect();
    let path = first.split(' ').nth(1).unwrap_or_default().to_string();
    let (status, json) = answer(&path, &form, state, port);
    let delay = state.lock().unwrap().delay;
    std::thread::sleep(delay);
    let mut w = s;
    let _ = write!(
        w,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
}

fn error(code: &str, what: &str) -> (&'static str, String) {
    let status = if code == "invalid_client" {
        "401 Unauthorized"
    } else {
        "400 Bad Request"
    };
    (
        status,
        format!("{{\"error\":\"{code}\",\"error_description\":\"{what}\"}}"),
    )
}

fn answer(
    path: &str,
    form: &BTreeMap<String, String>,
    state: &Mutex<State>,
    port: u16,
) -> (&'static str, String) {
    let mut s = state.lock().unwrap();
    let get = |k: &str| form.get(k).cloned().unwrap_or_default();
    if get("client_id") != "imapull-test" {
        return error("invalid_client", "Unknown client.");
    }
    match path {
        "/devicecode" => {
            let device_code = format!("dc-{}", unique());
            let user_code = format!("UC{}", unique());
            s.devices
                .insert(device_code.clone(), (user_code.clone(), false));
            (
                "200 OK",
                format!(
                    "{{\"device_code\":\"{device_code}\",\"user_code\":\"{user_code}\",\
                     \"verification_uri\":\"http://127.0.0.1:{port}/device\",\
                     \"expires_in\":600,\"interval\":1}}"
                ),
            )
        }
        "/token" => {
            let grant = get("grant_type");
            s.grants.push(grant.clone());
            match grant.as_str() {
                "refresh_token" => {
                    let rt = get("refresh_token");
                    // A rotated-away token still works until its
                    // successor has been used.
                    if !s.refresh.contains_key(&rt) {
                        return error("invalid_grant", "Token has been expired or revoked.");
                    }
                    // Using a successor retires its predecessor.
                    let before: Vec<String> = s
                        .refresh
                        .iter()
                        .filter(|(_, succ)| succ.as_deref() == Some(rt.as_str()))
                        .map(|(k, _)| k.clone())
                        .collect();
                    for b in before {
                        s.refresh.remove(&b);
                    }
                    let new_rt = s.rotate.then(|| format!("rt-{}", unique()));
                    if let Some(n) = &new_rt {
                        s.refresh.insert(rt.clone(), Some(n.clone()));
                        s.refresh.insert(n.clone(), None);
                    }
                    issue(&mut s, new_rt)
                }
                "authorization_code" => {
                    let Some((challenge, redirect)) = s.codes.remove(&get("code")) else {
                        return error("invalid_grant", "Unknown or used code.");
                    };
                    let verifier = get("code_verifier");
                    use base64::Engine as _;
                    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(openssl::sha::sha256(verifier.as_bytes()));
                    if computed != challenge || get("redirect_uri") != redirect {
                        return error("invalid_grant", "PKCE or redirect_uri mismatch.");
                    }
                    let rt = format!("rt-{}", unique());
                    s.refresh.insert(rt.clone(), None);
                    issue(&mut s, Some(rt))
                }
                "urn:ietf:params:oauth:grant-type:device_code" => {
                    match s.devices.get(&get("device_code")).cloned() {
                        None => error("expired_token", "Unknown device code."),
                        Some((_, false)) => error("authorization_pending", "Waiting."),
                        Some((_, true)) => {
                            s.devices.remove(&get("device_code"));
                            let rt = format!("rt-{}", unique());
                            s.refresh.insert(rt.clone(), None);
                            issue(&mut s, Some(rt))
                        }
                    }
                }
                "client_credentials" => {
                    if s.client_secret.is_none()
                        || form.get("client_secret") != s.client_secret.as_ref()
                    {
                        return error("invalid_client", "Invalid client secret provided.");
                    }
                    issue(&mut s, None)
                }
                _ => error("unsupported_grant_type", "No."),
            }
        }
        _ => ("404 Not Found", "{}".into()),
    }
}

fn issue(s: &mut State, refresh: Option<String>) -> (&'static str, String) {
    let at = format!("at-{}", unique());
    grant_token(&at, &s.user);
    s.issued.push((at.clone(), refresh.clone()));
    let rt = refresh.map_or(String::new(), |r| format!(",\"refresh_token\":\"{r}\""));
    (
        "200 OK",
        format!(
            "{{\"access_token\":\"{at}\",\"token_type\":\"Bearer\",\"expires_in\":{}{rt}}}",
            s.expires_in
        ),
    )
}
