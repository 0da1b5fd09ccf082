//! The message on the wire after DATA: the only changes imapull makes to a
//! message's bytes.
//!
//! - a bare LF or a bare CR becomes CRLF (SMTP requires CRLF; RFC 5321
//!   section 2.3.8);
//! - a line that starts with "." gets another "." (dot-stuffing, section
//!   4.5.2), whatever ended the previous line;
//! - a final CRLF is added if the message does not end with one, then the
//!   terminating ".\r\n".
//!
//! Everything else (NUL, 8-bit bytes, long lines) passes through unchanged:
//! the local server decides, and a refusal quarantines the message.
//!
//! The encoder is incremental so that a large message is written in chunks
//! instead of being copied whole.

/// Streaming encoder; feed chunks, then call [`DataEncoder::finish`].
#[derive(Debug, Clone)]
pub struct DataEncoder {
    at_line_start: bool,
    /// The previous chunk ended with CR; its LF may be the next byte.
    pending_cr: bool,
}

impl Default for DataEncoder {
    fn default() -> Self {
        DataEncoder {
            at_line_start: true,
            pending_cr: false,
        }
    }
}

impl DataEncoder {
    /// Appends the encoding of `input` to `out`. Runs of bytes between line
    /// ends are copied whole (found with `memchr`), so a message that is
    /// already CRLF costs about one copy.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        out.reserve(input.len() + input.len() / 64 + 4);
        let mut rest = input;
        if self.pending_cr {
            if rest.is_empty() {
                return;
            }
            self.pending_cr = false;
            out.extend_from_slice(b"\r\n");
            self.at_line_start = true;
            if rest[0] == b'\n' {
                rest = &rest[1..];
            }
        }
        while !rest.is_empty() {
            if self.at_line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            let Some(end) = memchr::memchr2(b'\r', b'\n', rest) else {
                out.extend_from_slice(rest);
                self.at_line_start = false;
                return;
            };
            out.extend_from_slice(&rest[..end]);
            let after = match (rest[end], rest.get(end + 1)) {
                (b'\r', None) => {
                    // Its LF, if any, is in the next chunk.
                    self.pending_cr = true;
                    return;
                }
                (b'\r', Some(b'\n')) => end + 2,
                _ => end + 1,
            };
            out.extend_from_slice(b"\r\n");
            self.at_line_start = true;
            rest = &rest[after..];
        }
    }

    /// Closes the message: pending CR, missing final CRLF, then ".\r\n".
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || !self.at_line_start {
            out.extend_from_slice(b"\r\n");
        }
        self.pending_cr = false;
        self.at_line_start = true;
        out.extend_from_slice(b".\r\n");
    }
}

/// Encodes a whole message at once (tests, small messages).
pub fn encode(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = DataEncoder::default();
    e.feed(msg, &mut out);
    e.finish(&mut out);
    out
}

/// Reverses [`encode`] the way a receiving server does: strips the final
/// ".\r\n" and undoes dot-stuffing. Used to check the encoder.
#[cfg(test)]
pub fn decode(wire: &[u8]) -> Vec<u8> {
    let body = wire.strip_suffix(b".\r\n").expect("terminator");
    let mut out = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"a\r\n", b"a\r\n.\r\n"),
            (b"a", b"a\r\n.\r\n"),
            (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
            (b"a\rb", b"a\r\nb\r\n.\r\n"),
            (b"a\r", b"a\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b"x\r\n.\r\ny", b"x\r\n..\r\ny\r\n.\r\n"),
            (b"x\n.y\n", b"x\r\n..y\r\n.\r\n"),
            (b"x\r.y", b"x\r\n..y\r\n.\r\n"),
            (b"a\r\r\nb", b"a\r\n\r\nb\r\n.\r\n"),
            (b"a\0b\xff\r\n", b"a\0b\xff\r\n.\r\n"),
            (b"a.b\r\n", b"a.b\r\n.\r\n"),
        ];
        for (input, want) in cases {
            assert_eq!(
                encode(input),
                want.to_vec(),
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    fn normalize(msg: &[u8]) -> Vec<u8> {
        // What the receiver should see: every line ending CRLF, final CRLF.
        let mut out = Vec::new();
        let mut i = 0;
        while i < msg.len() {
            match msg[i] {
                b'\r' if msg.get(i + 1) == Some(&b'\n') => {
                    out.extend_from_slice(b"\r\n");
                    i += 1;
                }
                b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
                b => out.push(b),
            }
            i += 1;
        }
        if !out.is_empty() && !out.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// The encoder's rules one byte at a time: what the fast `feed` must do.
    fn reference(msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut line_start, mut cr) = (true, false);
        for &b in msg {
            if cr {
                cr = false;
                out.extend_from_slice(b"\r\n");
                line_start = true;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    line_start = true;
                }
                _ => {
                    if line_start && b == b'.' {
                        out.push(b'.');
                    }
                    out.push(b);
                    line_start = false;
                }
            }
        }
        if cr || !line_start {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    proptest! {
        #[test]
        fn same_as_byte_by_byte(msg in proptest::collection::vec(prop_oneof![
            Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), Just(b'b')
        ], 0..200), cuts in proptest::collection::vec(0usize..200, 0..6)) {
            // Any split into chunks gives the byte-by-byte result.
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(msg.len())).collect();
            cuts.sort_unstable();
            let mut out = Vec::new();
            let mut e = DataEncoder::default();
            let mut from = 0;
            for c in cuts.into_iter().chain([msg.len()]) {
                e.feed(&msg[from..c], &mut out);
                from = c;
            }
            e.finish(&mut out);
            prop_assert_eq!(out, reference(&msg));
        }

        #[test]
        fn round_trip(msg in proptest::collection::vec(prop_oneof![
            Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a'), Just(0u8), Just(0xffu8)
        ], 0..64)) {
            let wire = encode(&msg);
            // No bare CR or LF on the wire, and no line is a lone ".".
            for (i, &b) in wire.iter().enumerate() {
                if b == b'\n' { prop_assert!(i > 0 && wire[i - 1] == b'\r'); }
                if b == b'\r' { prop_assert_eq!(wire.get(i + 1), Some(&b'\n')); }
            }
            let body = &wire[..wire.len() - 3];
            prop_assert!(!body.split(|&b| b == b'\n').any(|l| l == b".\r"));
            prop_assert_eq!(decode(&wire), normalize(&msg));
        }

        #[test]
        fn chunking_does_not_matter(msg in proptest::collection::vec(prop_oneof![
            Just(b'\r'), Just(b'\n'), Just(b'.'), Just(b'a')
        ], 0..64), cut in 0usize..64) {
            let cut = cut.min(msg.len());
            let mut out = Vec::new();
            let mut e = DataEncoder::default();
            e.feed(&msg[..cut], &mut out);
            e.feed(&msg[cut..], &mut out);
            e.finish(&mut out);
            prop_assert_eq!(out, encode(&msg));
        }
    }
}
