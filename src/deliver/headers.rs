//! Just enough header reading to build an envelope and a ledger row: the
//! envelope sender (Return-Path, Sender, From) and the Message-ID.
//!
//! The message is never parsed as a whole or rebuilt: these functions look at
//! the header block only and copy nothing but the values they return.

/// The header block: everything before the first empty line.
fn header_block(msg: &[u8]) -> &[u8] {
    let mut start = 0;
    for line in msg.split_inclusive(|&b| b == b'\n') {
        if line == b"\n" || line == b"\r\n" {
            return &msg[..start];
        }
        start += line.len();
    }
    msg
}

/// The unfolded value of the first header field named `name`.
pub fn header(msg: &[u8], name: &str) -> Option<String> {
    let block = header_block(msg);
    let mut value: Option<Vec<u8>> = None;
    for line in block.split_inclusive(|&b| b == b'\n') {
        let content = line
            .strip_suffix(b"\n")
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .unwrap_or(line);
        if let Some(v) = value.as_mut() {
            if content.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
                v.extend_from_slice(content);
                continue;
            }
            break;
        }
        if let Some(colon) = content.iter().position(|&b| b == b':') {
            let field = &content[..colon];
            if field.trim_ascii_end().eq_ignore_ascii_case(name.as_bytes()) {
                value = Some(content[colon + 1..].to_vec());
            }
        }
    }
    value.map(|v| String::from_utf8_lossy(v.trim_ascii()).into_owned())
}

/// The first address in a header value: inside `<...>` if present, else the
/// first word holding an '@'. `Some("")` for the null path `<>`.
fn first_address(value: &str) -> Option<String> {
    let value = strip_quoted(&strip_comments(value));
    let candidate = if let Some(open) = value.find('<') {
        let rest = &value[open + 1..];
        let close = rest.find('>')?;
        let inner = rest[..close].trim();
        // A source route "@a,@b:user@host" keeps only the mailbox.
        inner.rsplit(':').next().unwrap_or(inner).trim().to_string()
    } else {
        value
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
            .find(|w| w.contains('@'))?
            .to_string()
    };
    let ok = candidate.is_empty()
        || (candidate.contains('@')
            && !candidate.starts_with('@')
            && !candidate.ends_with('@')
            && crate::config::is_plausible_address(&candidate));
    ok.then_some(candidate)
}

/// Removes quoted strings (display names may hold '<' or '@').
fn strip_quoted(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut quoted = false;
    let mut escaped = false;
    for c in v.chars() {
        match (quoted, escaped, c) {
            (true, true, _) => escaped = false,
            (true, false, '\\') => escaped = true,
            (_, _, '"') => quoted = !quoted,
            (false, _, _) => out.push(c),
            _ => {}
        }
    }
    out
}

/// Removes RFC 5322 comments "(...)", which may hold anything.
fn strip_comments(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut depth = 0u32;
    let mut quoted = false;
    let mut escaped = false;
    for c in v.chars() {
        if escaped {
            escaped = false;
            if depth == 0 {
                out.push(c);
            }
            continue;
        }
        match c {
            '\\' => {
                escaped = true;
                if depth == 0 {
                    out.push(c);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted && depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out
}

/// The envelope sender for `sender = "auto"`: Return-Path, else Sender, else
/// From, else the null path. A header whose address cannot be read is
/// skipped, not guessed at.
pub fn envelope_sender(msg: &[u8]) -> String {
    for name in ["Return-Path", "Sender", "From"] {
        if let Some(addr) = header(msg, name).as_deref().and_then(first_address) {
            return addr;
        }
    }
    String::new()
}

/// The Message-ID, as written (angle brackets included), if any.
pub fn message_id(msg: &[u8]) -> Option<String> {
    header(msg, "Message-ID")
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty() && v.len() <= 998)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sender_order() {
        let m =
            b"From: A <a@x>\r\nSender: s@x\r\nReturn-Path: <r@x>\r\n\r\nReturn-Path: <body@x>\r\n";
        assert_eq!(envelope_sender(m), "r@x");
        let m = b"From: A <a@x>\r\nSender: s@x\r\n\r\n";
        assert_eq!(envelope_sender(m), "s@x");
        let m = b"From: \"Doe, J. <x>\" <j@x> (work)\nTo: t@x\n\nbody";
        assert_eq!(envelope_sender(m), "j@x");
        assert_eq!(envelope_sender(b"Subject: none\r\n\r\n"), "");
        assert_eq!(envelope_sender(b"Return-Path: <>\r\nFrom: a@x\r\n\r\n"), "");
    }

    #[test]
    fn folded_and_bare_addresses() {
        let m = b"From:\r\n  Someone\r\n  <some@x>\r\nSubject: s\r\n\r\n";
        assert_eq!(envelope_sender(m), "some@x");
        let m = b"from: bare@x (Bare Person)\r\n\r\n";
        assert_eq!(envelope_sender(m), "bare@x");
        let m = b"Return-Path: <@relay.x:u@x>\r\n\r\n";
        assert_eq!(envelope_sender(m), "u@x");
    }

    #[test]
    fn unreadable_sender_falls_through() {
        let m = b"Return-Path: garbage\r\nFrom: <a b@x>\r\nSender: ok@x\r\n\r\n";
        assert_eq!(envelope_sender(m), "ok@x");
        let m = b"From: undisclosed\r\n\r\n";
        assert_eq!(envelope_sender(m), "");
    }

    #[test]
    fn message_ids() {
        assert_eq!(
            message_id(b"Message-Id:\r\n <a@b>\r\n\r\n").as_deref(),
            Some("<a@b>")
        );
        assert_eq!(
            message_id(b"Subject: x\r\n\r\nMessage-ID: <no@x>\r\n"),
            None
        );
        assert_eq!(message_id(b"Message-ID: <a@b>"), Some("<a@b>".into()));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let s = envelope_sender(&bytes);
            proptest::prop_assert!(crate::config::is_plausible_address(&s));
            let _ = message_id(&bytes);
        }
    }
}
