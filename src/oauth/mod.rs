//! imapull's own OAuth 2.0 token source (the `oauth2` table): an access
//! token for every login, from the token file while it has more than a
//! minute left, else refreshed at the provider's token endpoint (or, for
//! app-only access, asked for with the client credentials). A refresh
//! token the provider rotates is saved, durably, before the access token
//! that came with it is used. A refresh token the provider refuses is
//! recorded, and not offered again: only `imapull oauth2 authorize` helps.
//!
//! Tokens are [`Secret`]s: they reach the token file and the IMAP server,
//! and nothing else (no log, no error, no `status`).

pub mod authorize;
pub mod store;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::anyhow;
use oauth2::basic::{BasicClient, BasicErrorResponse, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, AuthUrl, ClientId, ClientSecret, DeviceAuthorizationUrl, EndpointMaybeSet,
    EndpointNotSet, EndpointSet, HttpClientError, RefreshToken, RequestTokenError, Scope,
    TokenResponse as _, TokenUrl,
};

use crate::config::{Flow, OAuth2};
use crate::secret::Secret;
use store::{Refused, Stored};

/// A cached access token is used while it has more than this left: a
/// login takes a few round trips, and the clocks may differ a little.
const MIN_LEFT: i64 = 60;

/// When the token endpoint gives no `expires_in` (RFC 6749 says it
/// should): an hour, what Google and Microsoft hand out.
const DEFAULT_EXPIRES_IN: i64 = 3600;

/// Why there is no token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Only the operator can help: no token file yet, a refresh token the
    /// provider refused, a client secret it does not take.
    #[error("{0:#}")]
    Reauthorize(anyhow::Error),
    /// The token endpoint could not be asked now (network, 5xx).
    #[error("{0:#}")]
    Unavailable(anyhow::Error),
}

pub type Client =
    BasicClient<EndpointMaybeSet, EndpointMaybeSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

type HttpError = HttpClientError<oauth2::reqwest::Error>;

/// One HTTP client for the process: no redirects (RFC 6749 section 10.15;
/// oauth2's advice against SSRF), and a deadline for a hung endpoint.
pub fn http() -> &'static oauth2::reqwest::Client {
    static HTTP: OnceLock<oauth2::reqwest::Client> = OnceLock::new();
    HTTP.get_or_init(|| {
        oauth2::reqwest::Client::builder()
            .redirect(oauth2::reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("imapull/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client with native-tls")
    })
}

/// The OAuth2 client of `cfg`, with its secret read from its file.
pub fn client(cfg: &OAuth2) -> anyhow::Result<Client> {
    let url = |u: &Option<String>| u.clone();
    let mut c = BasicClient::new(ClientId::new(cfg.client_id.clone()))
        // Google and Microsoft both take the client's credentials in the
        // body, and a public client (no secret) must name itself there.
        .set_auth_type(AuthType::RequestBody)
        .set_auth_uri_option(url(&cfg.authorization_url).map(AuthUrl::new).transpose()?)
        .set_device_authorization_url_option(
            url(&cfg.device_authorization_url)
                .map(DeviceAuthorizationUrl::new)
                .transpose()?,
        )
        .set_token_uri(TokenUrl::new(cfg.token_url.clone())?);
    if let Some(p) = &cfg.client_secret_file {
        let s = crate::credentials::secret_from_file("oauth2.client_secret_file", p)?;
        c = c.set_client_secret(ClientSecret::new(s.expose().to_string()));
    }
    Ok(c)
}

pub fn scopes(cfg: &OAuth2) -> Vec<Scope> {
    cfg.scope.iter().cloned().map(Scope::new).collect()
}

/// The command that gives the account a new authorisation.
pub fn reauthorize_hint(account: &str) -> String {
    format!("`imapull oauth2 authorize {account}`")
}

/// A valid access token for the account `name`. `refused` is the token the
/// server just refused, if any: it is not handed out again.
pub async fn access_token(
    name: &str,
    cfg: &OAuth2,
    refused: Option<&Secret>,
    now: i64,
) -> Result<Secret, TokenError> {
    // One refresh at a time per token file: in this process (the daemon's
    // mailboxes connect at once) and across processes (the lock file).
    let gate = gate(&cfg.token_file);
    let _in_process = gate.lock().await;
    let path = cfg.token_file.clone();
    let _across = tokio::task::spawn_blocking(move || store::lock(&path))
        .await
        .map_err(|e| TokenError::Unavailable(e.into()))?
        .map_err(TokenError::Unavailable)?;
    let stored = store::load(&cfg.token_file).map_err(TokenError::Reauthorize)?;
    let stored = match stored {
        Some(s) if s.client_id != cfg.client_id => {
            return Err(TokenError::Reauthorize(anyhow!(
                "{} holds tokens of another client_id; authorise again: {}",
                cfg.token_file.display(),
                reauthorize_hint(name)
            )))
        }
        other => other,
    };
    if let Some(s) = &stored {
        if let (Some(token), Some(expires)) = (&s.access_token, s.expires_at) {
            if expires - now > MIN_LEFT && Some(token) != refused {
                return Ok(token.clone());
            }
        }
    }
    let fresh = match (cfg.flow, stored) {
        (Flow::ClientCredentials, old) => client_credentials(cfg, old, now).await?,
        (_, None) => {
            return Err(TokenError::Reauthorize(anyhow!(
                "no OAuth2 token yet ({} does not exist): authorise first with {}",
                cfg.token_file.display(),
                reauthorize_hint(name)
            )))
        }
        (_, Some(old)) => refresh(name, cfg, old, now).await?,
    };
    Ok(fresh)
}

/// The in-process gate of one token file.
fn gate(path: &std::path::Path) -> Arc<tokio::sync::Mutex<()>> {
    static GATES: Mutex<Option<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>> = Mutex::new(None);
    let mut g = GATES.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashMap::new)
        .entry(path.to_path_buf())
        .or_default()
        .clone()
}

async fn refresh(name: &str, cfg: &OAuth2, old: Stored, now: i64) -> Result<Secret, TokenError> {
    if let Some(r) = &old.refused {
        return Err(TokenError::Reauthorize(anyhow!(
            "the provider refused the refresh token at {} ({}); authorise again: {}",
            crate::ops::status::rfc3339(r.at),
            r.error,
            reauthorize_hint(name)
        )));
    }
    let Some(rt) = &old.refresh_token else {
        return Err(TokenError::Reauthorize(anyhow!(
            "{} holds no refresh token; authorise again: {}",
            cfg.token_file.display(),
            reauthorize_hint(name)
        )));
    };
    let client = client(cfg).map_err(TokenError::Reauthorize)?;
    let rt = RefreshToken::new(rt.expose().to_string());
    let got = client
        .exchange_refresh_token(&rt)
        .add_scopes(scopes(cfg))
        .request_async(http())
        .await;
    match got {
        Ok(t) => {
            let token = Secret::new(t.access_token().secret().clone());
            let rotated = t.refresh_token().map(|r| Secret::new(r.secret().clone()));
            let new = Stored {
                rotated_at: if rotated.is_some() {
                    Some(now)
                } else {
                    old.rotated_at
                },
                refresh_token: rotated.or(old.refresh_token),
                access_token: Some(token.clone()),
                expires_at: Some(now + expires_in(&t)),
                refreshed_at: Some(now),
                ..old
            };
            // Saved (and fsynced) before the token is used: a rotated
            // refresh token may be the only one the provider still takes.
            save(cfg, &new)?;
            tracing::debug!(account = name, "OAuth2 access token refreshed");
            Ok(token)
        }
        Err(e) => {
            let e = judge(e);
            if let Judged::Refused(why) = &e {
                let new = Stored {
                    refused: Some(Refused {
                        at: now,
                        error: why.clone(),
                    }),
                    access_token: None,
                    expires_at: None,
                    ..old
                };
                save(cfg, &new)?;
                return Err(TokenError::Reauthorize(anyhow!(
                    "the provider refused the refresh token ({why}): it was revoked or has \
                     expired; authorise again: {}",
                    reauthorize_hint(name)
                )));
            }
            Err(e.into_error("refreshing the OAuth2 access token"))
        }
    }
}

pub(super) async fn client_credentials(
    cfg: &OAuth2,
    old: Option<Stored>,
    now: i64,
) -> Result<Secret, TokenError> {
    let client = client(cfg).map_err(TokenError::Reauthorize)?;
    let got = client
        .exchange_client_credentials()
        .add_scopes(scopes(cfg))
        .request_async(http())
        .await;
    match got {
        Ok(t) => {
            let token = Secret::new(t.access_token().secret().clone());
            let new = Stored {
                version: store::VERSION,
                client_id: cfg.client_id.clone(),
                refresh_token: None,
                access_token: Some(token.clone()),
                expires_at: Some(now + expires_in(&t)),
                authorized_at: old.as_ref().map_or(now, |o| o.authorized_at),
                refreshed_at: Some(now),
                rotated_at: None,
                refused: None,
            };
            save(cfg, &new)?;
            Ok(token)
        }
        Err(e) => match judge(e) {
            Judged::Refused(why) => Err(TokenError::Reauthorize(anyhow!(
                "the provider refused the application's credentials ({why}): check \
                 client_id, the secret in oauth2.client_secret_file (secrets expire) and the \
                 tenant's grant"
            ))),
            other => Err(other.into_error("asking for an app-only OAuth2 token")),
        },
    }
}

fn save(cfg: &OAuth2, s: &Stored) -> Result<(), TokenError> {
    store::save(&cfg.token_file, s).map_err(TokenError::Unavailable)
}

pub fn expires_in(t: &BasicTokenResponse) -> i64 {
    t.expires_in()
        .map_or(DEFAULT_EXPIRES_IN, |d| d.as_secs() as i64)
}

/// What a failed request to the token endpoint says.
pub enum Judged {
    /// The grant or the client was refused: the provider's error code and
    /// description.
    Refused(String),
    /// Anything else: try again later.
    Failed(anyhow::Error),
}

impl Judged {
    pub fn into_error(self, doing: &str) -> TokenError {
        match self {
            Judged::Refused(why) => TokenError::Reauthorize(anyhow!("{doing}: refused: {why}")),
            Judged::Failed(e) => TokenError::Unavailable(e.context(doing.to_string())),
        }
    }
}

/// Sorts an error of the token endpoint. The body of a reply that is not
/// OAuth2 JSON is never shown: it may hold a token.
pub fn judge(e: RequestTokenError<HttpError, BasicErrorResponse>) -> Judged {
    match e {
        RequestTokenError::ServerResponse(r) => {
            let why = describe(r.error().as_ref(), r.error_description());
            match r.error() {
                BasicErrorResponseType::InvalidGrant
                | BasicErrorResponseType::InvalidClient
                | BasicErrorResponseType::UnauthorizedClient
                | BasicErrorResponseType::InvalidScope => Judged::Refused(why),
                _ => Judged::Failed(anyhow!("the token endpoint answered {why}")),
            }
        }
        RequestTokenError::Request(e) => {
            Judged::Failed(anyhow!("the token endpoint could not be reached: {e}"))
        }
        RequestTokenError::Parse(e, _body) => Judged::Failed(anyhow!(
            "the token endpoint's reply is not an OAuth2 token response (at {})",
            e.path()
        )),
        RequestTokenError::Other(s) => Judged::Failed(anyhow!("the token endpoint: {s}")),
    }
}

/// `invalid_grant: Token has been expired or revoked.`
pub fn describe(code: &str, description: Option<&String>) -> String {
    match description {
        Some(d) => format!("{code}: {}", d.lines().next().unwrap_or_default()),
        None => code.to_string(),
    }
}

/// What the token file says of an account's authorisation, for `status`,
/// `check` and the alerts. Reads the file without the lock (it is replaced
/// whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub token_file: PathBuf,
    pub flow: Flow,
    pub authorized_at: Option<i64>,
    pub refreshed_at: Option<i64>,
    pub access_expires_at: Option<i64>,
    /// When the refresh token stops working by the config's
    /// `refresh_token_lifetime`.
    pub refresh_expires_at: Option<i64>,
    /// What needs the operator, if anything.
    pub attention: Option<String>,
}

/// How long before a refresh token's end by `refresh_token_lifetime` it is
/// reported: a day, or a quarter of the lifetime if that is shorter.
fn warn_before(lifetime: i64) -> i64 {
    (lifetime / 4).min(86_400)
}

pub fn report(name: &str, cfg: &OAuth2, now: i64) -> Report {
    let mut r = Report {
        token_file: cfg.token_file.clone(),
        flow: cfg.flow,
        authorized_at: None,
        refreshed_at: None,
        access_expires_at: None,
        refresh_expires_at: None,
        attention: None,
    };
    let hint = reauthorize_hint(name);
    let stored = match store::load(&cfg.token_file) {
        Ok(s) => s,
        Err(e) => {
            r.attention = Some(format!("{e:#}"));
            return r;
        }
    };
    let Some(s) = stored else {
        if cfg.flow != Flow::ClientCredentials {
            r.attention = Some(format!("not authorised yet: run {hint}"));
        }
        return r;
    };
    r.authorized_at = Some(s.authorized_at);
    r.refreshed_at = s.refreshed_at;
    r.access_expires_at = s.expires_at;
    if cfg.flow != Flow::ClientCredentials {
        r.refresh_expires_at = cfg
            .refresh_token_lifetime
            .map(|l| s.authorized_at + l.as_secs() as i64);
    }
    r.attention = if s.client_id != cfg.client_id {
        Some(format!(
            "the token file is of another client_id: run {hint}"
        ))
    } else if let Some(refused) = s
        .refused
        .as_ref()
        // Only a refresh records a refusal; app-only access asks anew.
        .filter(|_| cfg.flow != Flow::ClientCredentials)
    {
        Some(format!(
            "the provider refused the refresh token at {} ({}): run {hint}",
            crate::ops::status::rfc3339(refused.at),
            refused.error
        ))
    } else if let (Some(end), Some(l)) = (r.refresh_expires_at, cfg.refresh_token_lifetime) {
        (end - now <= warn_before(l.as_secs() as i64)).then(|| {
            format!(
                "the refresh token {} at {} (refresh_token_lifetime, from the authorisation): \
                 run {hint}",
                if end <= now { "expired" } else { "expires" },
                crate::ops::status::rfc3339(end)
            )
        })
    } else {
        None
    };
    if r.attention.is_none() && store::too_open(&cfg.token_file) {
        r.attention = Some(format!(
            "{} is readable by others: chmod 600 it",
            cfg.token_file.display()
        ));
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &std::path::Path, lifetime: Option<u64>) -> OAuth2 {
        OAuth2 {
            provider: None,
            flow: Flow::Device,
            client_id: "c".into(),
            client_secret_file: None,
            authorization_url: None,
            device_authorization_url: Some("http://127.0.0.1:9/d".into()),
            token_url: "http://127.0.0.1:9/t".into(),
            scope: vec!["s".into()],
            authorization_params: Vec::new(),
            token_file: dir.join("a.json"),
            refresh_token_lifetime: lifetime.map(Duration::from_secs),
        }
    }

    fn stored(authorized_at: i64) -> Stored {
        Stored {
            version: store::VERSION,
            client_id: "c".into(),
            refresh_token: Some(Secret::new("rt".into())),
            access_token: Some(Secret::new("at".into())),
            expires_at: Some(authorized_at + 3600),
            authorized_at,
            refreshed_at: None,
            rotated_at: None,
            refused: None,
        }
    }

    #[test]
    fn the_report_says_what_needs_the_operator() {
        let dir = tempfile::tempdir().unwrap();
        let week = 7 * 86_400;
        let c = cfg(dir.path(), Some(week as u64));
        let r = report("work", &c, 1000);
        assert!(r
            .attention
            .unwrap()
            .contains("imapull oauth2 authorize work"));
        store::save(&c.token_file, &stored(0)).unwrap();
        // Six days in: fine; from a day before the end: said.
        assert_eq!(report("work", &c, week - 86_401).attention, None);
        let r = report("work", &c, week - 86_399);
        assert_eq!(r.refresh_expires_at, Some(week));
        assert!(r.attention.unwrap().contains("expires at"));
        assert!(report("work", &c, week + 1)
            .attention
            .unwrap()
            .contains("expired"));
        // Without a lifetime nothing is guessed.
        assert_eq!(
            report("work", &cfg(dir.path(), None), 10 * week).attention,
            None
        );
        // Refused.
        let mut s = stored(0);
        s.refused = Some(Refused {
            at: 50,
            error: "invalid_grant: revoked".into(),
        });
        store::save(&c.token_file, &s).unwrap();
        let said = report("work", &c, 100).attention.unwrap();
        assert!(said.contains("invalid_grant: revoked") && said.contains("authorize work"));
        assert!(!said.contains("rt"), "{said}");
        // Another client.
        let mut s = stored(0);
        s.client_id = "other".into();
        store::save(&c.token_file, &s).unwrap();
        assert!(report("work", &c, 100)
            .attention
            .unwrap()
            .contains("client_id"));
    }

    #[tokio::test]
    async fn a_cached_token_with_time_left_is_used_without_asking_anyone() {
        let dir = tempfile::tempdir().unwrap();
        // The endpoints are a closed port: asking them would fail.
        let c = cfg(dir.path(), None);
        store::save(&c.token_file, &stored(0)).unwrap();
        let t = access_token("work", &c, None, 3600 - MIN_LEFT - 1)
            .await
            .unwrap();
        assert_eq!(t.expose(), "at");
        // Refused by the server, or with a minute left: it asks.
        let e = access_token("work", &c, Some(&t), 10).await.unwrap_err();
        assert!(matches!(e, TokenError::Unavailable(_)), "{e}");
        let e = access_token("work", &c, None, 3600 - MIN_LEFT)
            .await
            .unwrap_err();
        assert!(matches!(e, TokenError::Unavailable(_)), "{e}");
        // A refused refresh token is not offered again.
        let mut s = stored(0);
        s.refused = Some(Refused {
            at: 5,
            error: "invalid_grant".into(),
        });
        s.access_token = None;
        store::save(&c.token_file, &s).unwrap();
        let e = access_token("work", &c, None, 10).await.unwrap_err();
        assert!(matches!(e, TokenError::Reauthorize(_)), "{e}");
        assert!(e.to_string().contains("authorize work"), "{e}");
        // No file: authorise first.
        std::fs::remove_file(&c.token_file).unwrap();
        let e = access_token("work", &c, None, 10).await.unwrap_err();
        assert!(e.to_string().contains("authorise first"), "{e}");
    }
}
