//! SMTP/LMTP replies (RFC 5321 section 4.2): parsing lines and classifying
//! codes. No I/O here, so the parser can be tested on bytes and fuzzed.

use std::fmt;

/// A complete (possibly multi-line) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// The text of every line, joined with "\n" (without the codes).
    pub lines: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// 2xx
    Ok,
    /// 3xx (354 after DATA)
    Intermediate,
    /// 4xx: try again later
    Transient,
    /// 5xx: this will not work
    Permanent,
}

impl Reply {
    pub fn class(&self) -> Class {
        match self.code / 100 {
            2 => Class::Ok,
            3 => Class::Intermediate,
            4 => Class::Transient,
            _ => Class::Permanent,
        }
    }

    pub fn is_ok(&self) -> bool {
        self.class() == Class::Ok
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code)?;
        for (i, l) in self.lines.iter().enumerate() {
            if i == 0 {
                write!(f, " {l}")?;
            } else {
                write!(f, " / {l}")?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply code changed inside a multi-line reply ({0} then {1})")]
    CodeChanged(u16, u16),
}

/// One line of a reply: its code, whether it is the last line, its text.
pub fn parse_line(line: &[u8]) -> Result<(u16, bool, String), ReplyError> {
    let line = line
        .strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line);
    let bad = || ReplyError::Malformed(String::from_utf8_lossy(line).into_owned());
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let code =
        (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
    if !(200..600).contains(&code) {
        return Err(bad());
    }
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(bad()),
    };
    Ok((code, last, String::from_utf8_lossy(text).into_owned()))
}

/// Accumulates lines into a [`Reply`].
#[derive(Default)]
pub struct ReplyBuilder {
    code: Option<u16>,
    lines: Vec<String>,
}

impl ReplyBuilder {
    /// Feeds one line; returns the reply once its last line arrived.
    pub fn push(&mut self, line: &[u8]) -> Result<Option<Reply>, ReplyError> {
        let (code, last, text) = parse_line(line)?;
        if let Some(c) = self.code {
            if c != code {
                return Err(ReplyError::CodeChanged(c, code));
            }
        }
        self.code = Some(code);
        self.lines.push(text);
        if last {
            let lines = std::mem::take(&mut self.lines);
            self.code = None;
            Ok(Some(Reply { code, lines }))
        } else {
            Ok(None)
        }
    }
}

/// What an EHLO/LHLO reply advertises that we use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extensions {
    pub pipelining: bool,
    /// `SIZE n`; 0 or absent means no limit announced.
    pub size: Option<u64>,
    pub eight_bit_mime: bool,
    pub smtputf8: bool,
}

impl Extensions {
    pub fn from_ehlo(r: &Reply) -> Extensions {
        let mut e = Extensions::default();
        // The first line is the greeting name; keywords follow.
        for line in r.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(kw) = words.next() else { continue };
            match kw.to_ascii_uppercase().as_str() {
                "PIPELINING" => e.pipelining = true,
                "8BITMIME" => e.eight_bit_mime = true,
                "SMTPUTF8" => e.smtputf8 = true,
                "SIZE" => {
                    e.size = words.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0);
                }
                _ => {}
            }
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replies(input: &[u8]) -> Result<Vec<Reply>, ReplyError> {
        let mut b = ReplyBuilder::default();
        let mut out = vec![];
        for line in input.split_inclusive(|&c| c == b'\n') {
            if let Some(r) = b.push(line)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    #[test]
    fn single_and_multi_line() {
        let r = replies(
            b"220 mx ESMTP\r\n250-mx\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
        )
        .unwrap();
        assert_eq!(r[0].code, 220);
        assert_eq!(
            r[1].lines,
            vec!["mx", "PIPELINING", "SIZE 1000", "8BITMIME"]
        );
        let e = Extensions::from_ehlo(&r[1]);
        assert!(e.pipelining && e.eight_bit_mime && !e.smtputf8);
        assert_eq!(e.size, Some(1000));
        assert_eq!(
            r[1].to_string(),
            "250 mx / PIPELINING / SIZE 1000 / 8BITMIME"
        );
    }

    #[test]
    fn bare_code_and_lf_only() {
        let r = replies(b"250\n").unwrap();
        assert_eq!(
            r[0],
            Reply {
                code: 250,
                lines: vec![String::new()]
            }
        );
    }

    #[test]
    fn classes() {
        for (code, class) in [
            (250, Class::Ok),
            (354, Class::Intermediate),
            (451, Class::Transient),
            (554, Class::Permanent),
        ] {
            assert_eq!(
                Reply {
                    code,
                    lines: vec![]
                }
                .class(),
                class
            );
        }
    }

    #[test]
    fn malformed() {
        assert!(replies(b"25 x\r\n").is_err());
        assert!(replies(b"abc x\r\n").is_err());
        assert!(replies(b"250x\r\n").is_err());
        assert!(replies(b"199 x\r\n").is_err());
        assert!(replies(b"600 x\r\n").is_err());
        assert_eq!(
            replies(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeChanged(250, 251))
        );
    }

    #[test]
    fn size_zero_is_no_limit() {
        let r = Reply {
            code: 250,
            lines: vec!["x".into(), "SIZE 0".into()],
        };
        assert_eq!(Extensions::from_ehlo(&r).size, None);
        let r = Reply {
            code: 250,
            lines: vec!["x".into(), "SIZE".into()],
        };
        assert_eq!(Extensions::from_ehlo(&r).size, None);
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = replies(&bytes);
        }
    }
}
