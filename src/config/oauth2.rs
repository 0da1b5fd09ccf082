//! The `oauth2` table of an account: where imapull gets its bearer tokens
//! by itself. A provider preset fills the endpoints and scopes; every one
//! of them may be given by hand instead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, HumanDuration};

/// `[accounts.NAME.oauth2]` (or `[defaults.oauth2]`) as written.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct RawOAuth2 {
    pub provider: Option<Provider>,
    pub flow: Option<Flow>,
    pub tenant: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_file: Option<PathBuf>,
    pub authorization_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub token_url: Option<String>,
    pub scope: Option<Vec<String>>,
    pub token_file: Option<PathBuf>,
    pub refresh_token_lifetime: Option<HumanDuration>,
}

impl RawOAuth2 {
    /// The account's keys win over `[defaults.oauth2]`, key by key.
    pub fn merge(d: Option<&RawOAuth2>, a: Option<RawOAuth2>) -> Option<RawOAuth2> {
        let Some(d) = d else { return a };
        let a = a.unwrap_or_default();
        macro_rules! pick {
            ($($f:ident),*) => { RawOAuth2 { $($f: a.$f.or_else(|| d.$f.clone()),)* } };
        }
        Some(pick!(
            provider,
            flow,
            tenant,
            client_id,
            client_secret_file,
            authorization_url,
            device_authorization_url,
            token_url,
            scope,
            token_file,
            refresh_token_lifetime
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Google,
    Microsoft,
}

/// How the first token is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flow {
    /// RFC 8628: a URL and a code to enter on any device.
    Device,
    /// RFC 6749 4.1 with PKCE (RFC 7636) and a loopback redirect.
    AuthorizationCode,
    /// RFC 6749 4.4: the application's own credentials, no user
    /// (Microsoft 365's app-only access).
    ClientCredentials,
}

impl Flow {
    pub fn as_str(self) -> &'static str {
        match self {
            Flow::Device => "device",
            Flow::AuthorizationCode => "authorization_code",
            Flow::ClientCredentials => "client_credentials",
        }
    }
}

/// The built-in token source of an account, complete and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuth2 {
    pub provider: Option<Provider>,
    pub flow: Flow,
    pub client_id: String,
    pub client_secret_file: Option<PathBuf>,
    pub authorization_url: Option<String>,
    pub device_authorization_url: Option<String>,
    pub token_url: String,
    pub scope: Vec<String>,
    /// Extra parameters of the authorisation request.
    pub authorization_params: Vec<(String, String)>,
    /// The refresh token, the cached access token and their ages (0600).
    pub token_file: PathBuf,
    /// How long the provider lets a refresh token live from its
    /// authorisation, when it says so only in its documentation.
    pub refresh_token_lifetime: Option<Duration>,
}

const GOOGLE_AUTH: &str = "https://accounts.google.com/o/oauth2/v2/auth";
const GOOGLE_TOKEN: &str = "https://oauth2.googleapis.com/token";
const GOOGLE_SCOPE: &str = "https://mail.google.com/";
const MICROSOFT_BASE: &str = "https://login.microsoftonline.com";
/// Delegated access to a user's mailbox, and a refresh token.
const MICROSOFT_SCOPES: [&str; 2] = [
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "offline_access",
];
/// App-only access: the permissions the tenant's administrator granted.
const MICROSOFT_APP_SCOPE: &str = "https://outlook.office365.com/.default";

/// Checks the table; `default_token_file` is where the token is kept when
/// `token_file` is not set (beside the ledger).
pub fn resolve(
    raw: &RawOAuth2,
    default_token_file: &Path,
    here: &dyn Fn(&str, String) -> ConfigError,
) -> Result<OAuth2, ConfigError> {
    let key = |k: &str| format!("oauth2.{k}");
    let flow = match (raw.flow, raw.provider) {
        (Some(f), _) => f,
        (None, Some(Provider::Microsoft)) => Flow::Device,
        (None, Some(Provider::Google)) => Flow::AuthorizationCode,
        (None, None) if raw.device_authorization_url.is_some() => Flow::Device,
        (None, None) if raw.authorization_url.is_some() => Flow::AuthorizationCode,
        (None, None) => return Err(here(
            &key("flow"),
            "missing: set `provider = \"google\"` or \"microsoft\", or `flow` with its endpoints"
                .into(),
        )),
    };
    if raw.tenant.is_some() && raw.provider != Some(Provider::Microsoft) {
        return Err(here(
            &key("tenant"),
            "only with provider = \"microsoft\"".into(),
        ));
    }
    if flow == Flow::Device && raw.provider == Some(Provider::Google) {
        return Err(here(
            &key("flow"),
            "Google's device flow does not grant the Gmail scope: use \"authorization_code\""
                .into(),
        ));
    }
    let tenant = raw.tenant.clone().unwrap_or_else(|| "common".into());
    if flow == Flow::ClientCredentials
        && raw.provider == Some(Provider::Microsoft)
        && matches!(tenant.as_str(), "common" | "organizations" | "consumers")
    {
        return Err(here(
            &key("tenant"),
            "app-only access needs the tenant's ID or domain (e.g. \"contoso.onmicrosoft.com\")"
                .into(),
        ));
    }
    let ms = |path: &str| format!("{MICROSOFT_BASE}/{tenant}/oauth2/v2.0/{path}");
    let (auth_url, device_url, token_url, scope): (_, _, _, Vec<String>) = match raw.provider {
        Some(Provider::Google) => (
            Some(GOOGLE_AUTH.to_string()),
            None,
            Some(GOOGLE_TOKEN.to_string()),
            vec![GOOGLE_SCOPE.into()],
        ),
        Some(Provider::Microsoft) => (
            Some(ms("authorize")),
            Some(ms("devicecode")),
            Some(ms("token")),
            if flow == Flow::ClientCredentials {
                vec![MICROSOFT_APP_SCOPE.into()]
            } else {
                MICROSOFT_SCOPES.iter().map(|s| s.to_string()).collect()
            },
        ),
        None => (None, None, None, Vec::new()),
    };
    let authorization_url = raw.authorization_url.clone().or(auth_url);
    let device_authorization_url = raw.device_authorization_url.clone().or(device_url);
    let token_url = raw.token_url.clone().or(token_url).ok_or_else(|| {
        here(
            &key("token_url"),
            "missing: the provider's token endpoint (or set `provider`)".into(),
        )
    })?;
    for (k, url) in [
        ("token_url", Some(&token_url)),
        ("authorization_url", authorization_url.as_ref()),
        (
            "device_authorization_url",
            device_authorization_url.as_ref(),
        ),
    ] {
        if let Some(url) = url {
            check_url(url).map_err(|m| here(&key(k), m))?;
        }
    }
    match flow {
        Flow::Device if device_authorization_url.is_none() => {
            return Err(here(
                &key("device_authorization_url"),
                "missing: the device flow needs the provider's device authorization endpoint"
                    .into(),
            ))
        }
        Flow::AuthorizationCode if authorization_url.is_none() => {
            return Err(here(
                &key("authorization_url"),
                "missing: the authorization-code flow needs the provider's authorization endpoint"
                    .into(),
            ))
        }
        _ => {}
    }
    let scope = raw.scope.clone().unwrap_or(scope);
    if scope.is_empty() || scope.iter().any(|s| s.is_empty() || s.contains(' ')) {
        return Err(here(
            &key("scope"),
            "missing or empty: a list of scopes, e.g. [\"https://mail.google.com/\"]".into(),
        ));
    }
    let client_id = raw
        .client_id
        .clone()
        .filter(|c| !c.trim().is_empty())
        .ok_or_else(|| {
            here(
                &key("client_id"),
                "missing: the ID of the application registered with the provider".into(),
            )
        })?;
    let needs_secret = flow == Flow::ClientCredentials || raw.provider == Some(Provider::Google);
    if needs_secret && raw.client_secret_file.is_none() {
        return Err(here(
            &key("client_secret_file"),
            format!(
                "missing: {} needs the application's client secret, in a file",
                if flow == Flow::ClientCredentials {
                    "app-only access (client credentials)"
                } else {
                    "Google"
                }
            ),
        ));
    }
    let authorization_params = match raw.provider {
        // Google hands out a refresh token only for offline access, and
        // only at a consent.
        Some(Provider::Google) => vec![
            ("access_type".into(), "offline".into()),
            ("prompt".into(), "consent".into()),
        ],
        _ => Vec::new(),
    };
    Ok(OAuth2 {
        provider: raw.provider,
        flow,
        client_id,
        client_secret_file: raw.client_secret_file.clone(),
        authorization_url,
        device_authorization_url,
        token_url,
        scope,
        authorization_params,
        token_file: raw
            .token_file
            .clone()
            .unwrap_or_else(|| default_token_file.to_path_buf()),
        refresh_token_lifetime: raw.refresh_token_lifetime.map(|d| d.0),
    })
}

/// An endpoint is HTTPS, or plain HTTP on a loopback address (a local
/// proxy, the tests).
fn check_url(url: &str) -> Result<(), String> {
    let u = oauth2::url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let loopback = u
        .host_str()
        .is_some_and(|h| super::is_loopback(h.trim_start_matches('[').trim_end_matches(']')));
    match u.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "{url:?}: must be https:// (plain http only on a loopback address)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here(k: &str, m: String) -> ConfigError {
        ConfigError(format!("`{k}`: {m}"))
    }

    fn raw(toml_text: &str) -> RawOAuth2 {
        toml::from_str(toml_text).unwrap()
    }

    fn ok(text: &str) -> OAuth2 {
        resolve(
            &raw(text),
            Path::new("/var/lib/imapull/oauth2/a.json"),
            &here,
        )
        .unwrap()
    }

    fn err(text: &str) -> String {
        resolve(&raw(text), Path::new("/x"), &here).unwrap_err().0
    }

    #[test]
    fn presets_fill_the_endpoints_and_scopes() {
        let g = ok("provider = \"google\"\nclient_id = \"c\"\nclient_secret_file = \"/s\"");
        assert_eq!(g.flow, Flow::AuthorizationCode);
        assert_eq!(g.token_url, GOOGLE_TOKEN);
        assert_eq!(g.scope, [GOOGLE_SCOPE]);
        assert!(g
            .authorization_params
            .contains(&("access_type".into(), "offline".into())));
        assert_eq!(g.token_file, Path::new("/var/lib/imapull/oauth2/a.json"));
        let m = ok("provider = \"microsoft\"\nclient_id = \"c\"\ntenant = \"example.org\"");
        assert_eq!(m.flow, Flow::Device);
        assert_eq!(
            m.device_authorization_url.as_deref(),
            Some("https://login.microsoftonline.com/example.org/oauth2/v2.0/devicecode")
        );
        assert!(m.scope.contains(&"offline_access".to_string()));
        assert!(m.client_secret_file.is_none());
        let app = ok("provider = \"microsoft\"\nflow = \"client_credentials\"\n\
             client_id = \"c\"\ntenant = \"example.org\"\nclient_secret_file = \"/s\"");
        assert_eq!(app.scope, [MICROSOFT_APP_SCOPE]);
        // By hand, on loopback over plain HTTP.
        let own = ok("client_id = \"c\"\ntoken_url = \"http://127.0.0.1:9/t\"\n\
             device_authorization_url = \"http://[::1]:9/d\"\nscope = [\"imap\"]\n\
             token_file = \"/t.json\"\nrefresh_token_lifetime = \"7d\"");
        assert_eq!(own.flow, Flow::Device);
        assert_eq!(own.token_file, Path::new("/t.json"));
        assert_eq!(
            own.refresh_token_lifetime,
            Some(Duration::from_secs(7 * 86400))
        );
    }

    #[test]
    fn what_is_missing_or_wrong_is_named() {
        for (text, key, says) in [
            ("client_id = \"c\"", "oauth2.flow", "provider"),
            ("provider = \"google\"\nclient_id = \"c\"", "oauth2.client_secret_file", "Google"),
            ("provider = \"google\"", "oauth2.client_id", "missing"),
            (
                "provider = \"google\"\nflow = \"device\"\nclient_id = \"c\"",
                "oauth2.flow",
                "Gmail scope",
            ),
            (
                "provider = \"microsoft\"\nflow = \"client_credentials\"\nclient_id = \"c\"\n\
                 client_secret_file = \"/s\"",
                "oauth2.tenant",
                "tenant's ID",
            ),
            ("provider = \"google\"\ntenant = \"x\"", "oauth2.tenant", "microsoft"),
            (
                "provider = \"microsoft\"\nclient_id = \"c\"\ntoken_url = \"http://login.example/t\"",
                "oauth2.token_url",
                "https",
            ),
            (
                "flow = \"device\"\nclient_id = \"c\"\ntoken_url = \"https://t/\"\nscope = [\"s\"]",
                "oauth2.device_authorization_url",
                "missing",
            ),
            (
                "provider = \"microsoft\"\nclient_id = \"c\"\nscope = []",
                "oauth2.scope",
                "empty",
            ),
        ] {
            let e = err(text);
            assert!(e.contains(&format!("`{key}`")) && e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn the_accounts_keys_win_over_the_defaults_key_by_key() {
        let d = raw("provider = \"microsoft\"\nclient_id = \"shared\"");
        let a = raw("token_file = \"/a.json\"");
        let m = RawOAuth2::merge(Some(&d), Some(a)).unwrap();
        assert_eq!(m.client_id.as_deref(), Some("shared"));
        assert_eq!(m.token_file.as_deref(), Some(Path::new("/a.json")));
        assert!(RawOAuth2::merge(None, None).is_none());
    }
}
