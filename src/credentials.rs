//! Reading an account's password where the config says it is: inline, in a
//! file (systemd's `LoadCredential=` directory included), or printed by a
//! command. What is read goes straight into a [`Secret`].

use anyhow::{anyhow, bail, Context as _, Result};

use crate::config::PasswordSource;
use crate::secret::Secret;

pub fn read_password(src: &PasswordSource) -> Result<Secret> {
    match src {
        PasswordSource::None => Ok(Secret::new(String::new())),
        PasswordSource::Inline(s) => Ok(s.clone()),
        PasswordSource::File(p) => secret_from_file("password_file", p),
        PasswordSource::Command(argv) => secret_from_command("password_command", argv),
    }
}

/// The secret in the file `key` names (its final newline is the file's);
/// `${CREDENTIALS_DIRECTORY}` in the path is systemd's.
pub fn secret_from_file(key: &str, p: &std::path::Path) -> Result<Secret> {
    let p = &expand_credentials(key, p)?;
    let s = std::fs::read_to_string(p).with_context(|| format!("reading {key} {}", p.display()))?;
    Ok(Secret::new(strip_newline(s)))
}

/// What `argv` prints on stdout, without its final newline: a password
/// (`password_command`) or an access token (`oauth2_token_command`). The
/// command's stderr goes to imapull's; what it prints is never logged.
pub fn secret_from_command(key: &str, argv: &[String]) -> Result<Secret> {
    let out = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {key} {:?}", argv[0]))?;
    if !out.status.success() {
        bail!("{key} {:?} failed: {}", argv[0], out.status);
    }
    let s = String::from_utf8(out.stdout)
        .map_err(|_| anyhow!("{key} {:?} printed non-UTF-8", argv[0]))?;
    Ok(Secret::new(strip_newline(s)))
}

/// One final newline (LF or CRLF) is the file's, not the password's.
fn strip_newline(mut s: String) -> String {
    if s.ends_with('\n') {
        s.pop();
        if s.ends_with('\r') {
            s.pop();
        }
    }
    s
}

/// Expands `${CREDENTIALS_DIRECTORY}` (or `$CREDENTIALS_DIRECTORY`) in a
/// password_file path: where systemd's `LoadCredential=` puts secrets.
fn expand_credentials(key: &str, p: &std::path::Path) -> Result<std::path::PathBuf> {
    let s = p.to_string_lossy();
    let pattern = ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"]
        .into_iter()
        .find(|pat| s.contains(pat));
    let Some(pattern) = pattern else {
        return Ok(p.to_path_buf());
    };
    let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
        anyhow!(
            "{key} {s:?} names $CREDENTIALS_DIRECTORY, but CREDENTIALS_DIRECTORY is not set \
             (it is set by systemd's LoadCredential=)"
        )
    })?;
    Ok(s.replace(pattern, &dir).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_final_newline_is_stripped() {
        assert_eq!(strip_newline("pw\r\n".into()), "pw");
        assert_eq!(strip_newline("pw\n\n".into()), "pw\n");
        assert_eq!(strip_newline("pw".into()), "pw");
    }
}
