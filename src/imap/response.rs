//! IMAP server responses from bytes, with no I/O in sight.
//!
//! Two steps, both pure:
//!
//! - [`Framer`] finds where one response ends in a growing buffer: its line,
//!   and any literals (`{N}` at a line's end, then N bytes, then more line).
//!   It bounds memory: a response whose lines add up to more than
//!   [`MAX_LINE`] is an error that ends the connection, and a literal over
//!   the configured limit is dropped as it arrives (never held) and marked,
//!   so the caller can say "too large" instead of running out of memory.
//!   The bytes of a frame are split off the read buffer without a copy.
//! - [`parse`] turns a frame into a [`Response`]. It never fails: a response
//!   it does not know is [`Data::Other`], to be ignored (RFC 3501 section 7,
//!   RFC 9051 section 7), and one it knows but cannot read (a `SEARCH` with
//!   a word in it) is [`Data::Malformed`], which a command that needs that
//!   data treats as a failure, never as "nothing".
//!
//! Only what imapull acts on is decoded: status responses and their codes
//! (UIDVALIDITY, UIDNEXT, CAPABILITY), CAPABILITY, EXISTS, EXPUNGE, SEARCH
//! (with CONDSTORE's MODSEQ tail), LIST, and the FETCH items UID,
//! RFC822.SIZE, FLAGS, INTERNALDATE, BODY[] and BODY[HEADER]. Every other
//! FETCH item is skipped by the generic value grammar.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

/// The most line bytes (literals not counted) one response may have. A
/// `* SEARCH` listing a million UIDs is about 8 MB; nothing a server says
/// to imapull is longer, and a hostile server gets no further.
pub const MAX_LINE: usize = 8 << 20;

/// Why the byte stream cannot be read on: the connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a response line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("a literal whose size cannot be read")]
    BadLiteral,
}

/// One complete response: its bytes, and where literals were dropped for
/// being too large.
#[derive(Debug, Clone)]
pub struct Frame {
    pub bytes: Bytes,
    /// (offset in `bytes` where the literal would have started, its size).
    pub skipped: Vec<(usize, u64)>,
}

/// Finds response boundaries in a read buffer. Keeps its place between
/// calls, so a buffer that grows a little at a time is scanned once, and a
/// read cancelled half-way loses nothing.
#[derive(Debug)]
pub struct Framer {
    max_literal: u64,
    /// Where the current line starts in the buffer.
    line_start: usize,
    /// How far the current line has been searched for its end.
    scanned: usize,
    /// Line bytes of this response so far (earlier lines).
    line_total: usize,
    /// Literal bytes still to come in the buffer before the next line.
    literal_left: usize,
    /// Literal bytes still to drop (a literal over `max_literal`).
    skip_left: u64,
    /// The frame's bytes before a dropped literal, once one was dropped.
    head: Option<BytesMut>,
    skipped: Vec<(usize, u64)>,
}

impl Framer {
    /// `max_literal`: literals above it are dropped, not held.
    pub fn new(max_literal: u64) -> Framer {
        Framer {
            max_literal,
            line_start: 0,
            scanned: 0,
            line_total: 0,
            literal_left: 0,
            skip_left: 0,
            head: None,
            skipped: Vec::new(),
        }
    }

    /// How many more bytes than `buffered` the current frame needs at
    /// least (the rest of an announced literal), as a hint for reserving
    /// buffer space once instead of growing it read by read.
    pub fn wanted(&self, buffered: usize) -> usize {
        (self.line_start + self.literal_left).saturating_sub(buffered)
    }

    /// Line bytes (literals not counted) of the current frame so far.
    pub fn line_bytes(&self, buffered: usize) -> usize {
        if self.literal_left > 0 {
            return self.line_total;
        }
        self.line_total + buffered.saturating_sub(self.line_start)
    }

    /// Takes one complete response off the front of `buf`, or returns
    /// `None` when more bytes are needed.
    pub fn next(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        loop {
            if self.skip_left > 0 {
                let n = (buf.len() as u64).min(self.skip_left) as usize;
                let _ = buf.split_to(n);
                self.skip_left -= n as u64;
                if self.skip_left > 0 {
                    return Ok(None);
                }
                continue;
            }
            if self.literal_left > 0 {
                let have = buf.len() - self.line_start;
                if have < self.literal_left {
                    return Ok(None);
                }
                self.line_start += self.literal_left;
                self.scanned = self.line_start;
                self.literal_left = 0;
            }
            let Some(i) = memchr::memchr(b'\n', &buf[self.scanned..]) else {
                self.scanned = buf.len();
                if self.line_total + (buf.len() - self.line_start) > MAX_LINE {
                    return Err(FrameError::LineTooLong);
                }
                return Ok(None);
            };
            let end = self.scanned + i + 1;
            let line = &buf[self.line_start..end];
            self.line_total += line.len();
            if self.line_total > MAX_LINE {
                return Err(FrameError::LineTooLong);
            }
            match literal_at_end(line)? {
                None => {
                    let mut bytes = buf.split_to(end);
                    if let Some(mut head) = self.head.take() {
                        head.extend_from_slice(&bytes);
                        bytes = head;
                    }
                    let frame = Frame {
                        bytes: bytes.freeze(),
                        skipped: std::mem::take(&mut self.skipped),
                    };
                    *self = Framer::new(self.max_literal);
                    return Ok(Some(frame));
                }
                Some(n) if n > self.max_literal => {
                    // Keep what came before; drop the literal as it comes.
                    let part = buf.split_to(end);
                    let head = self.head.get_or_insert_with(BytesMut::new);
                    head.extend_from_slice(&part);
                    self.skipped.push((head.len(), n));
                    self.skip_left = n;
                    self.line_start = 0;
                    self.scanned = 0;
                }
                Some(n) => {
                    self.line_start = end;
                    self.scanned = end;
                    // Within max_literal, which the caller keeps in memory.
                    self.literal_left = n as usize;
                }
            }
        }
    }
}

/// The size of the literal announced at the end of a line (`{N}` or `~{N}`
/// before CRLF), if any.
fn literal_at_end(line: &[u8]) -> Result<Option<u64>, FrameError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let Some(inner) = line.strip_suffix(b"}") else {
        return Ok(None);
    };
    let Some(open) = memchr::memrchr(b'{', inner) else {
        return Ok(None);
    };
    let digits = &inner[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        // "{" and "}" in free text, not a literal.
        return Ok(None);
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u64>().ok())
        .map(Some)
        .ok_or(FrameError::BadLiteral)
}

/// OK, NO, BAD, and the untagged-only BYE and PREAUTH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    No,
    Bad,
    Bye,
    Preauth,
}

/// A response code (`[...]` after a status), where imapull acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Code {
    UidValidity(u32),
    UidNext(u32),
    Capability(Vec<String>),
    /// Any other code, by its name (upper-cased): ignored, except in
    /// messages to the operator.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `+ text`: the server waits for more of the command.
    Continue(String),
    /// The end of a command. `status` is `None` for a tagged line that is
    /// not OK, NO or BAD: a broken server, treated as a failure.
    Tagged {
        tag: String,
        status: Option<Status>,
        code: Option<Code>,
        text: String,
    },
    /// `* ...`
    Data(Data),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// `* OK/NO/BAD/BYE/PREAUTH [code] text`
    Status {
        status: Status,
        code: Option<Code>,
        text: String,
    },
    Capability(Vec<String>),
    Exists(u32),
    Expunge(u32),
    Search(Vec<u32>),
    Fetch(Fetch),
    List {
        attributes: Vec<String>,
        name: String,
    },
    /// A response imapull knows but could not read.
    Malformed {
        keyword: String,
        why: &'static str,
    },
    /// A response imapull does not know (an extension, RECENT, FLAGS...).
    Other {
        keyword: String,
    },
}

/// Where a FETCH item's string value is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A literal, in the frame's bytes (no copy).
    In(Range<usize>),
    /// A quoted string, unescaped.
    Owned(Vec<u8>),
    /// A literal dropped for being larger than the limit.
    TooLarge(u64),
    Nil,
}

/// One `* n FETCH (...)` response, holding its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    pub seq: u32,
    pub uid: Option<u32>,
    pub size: Option<u64>,
    pub flags: Option<Vec<String>>,
    /// INTERNALDATE as sent ("23-Nov-2026 10:00:00 +0000").
    pub internal_date: Option<String>,
    /// BODY[] (or RFC822, BINARY[]).
    pub body: Option<Value>,
    /// BODY[HEADER] (or RFC822.HEADER).
    pub header: Option<Value>,
    raw: Bytes,
}

impl Fetch {
    /// A message not fetched because RFC822.SIZE said it is over the
    /// limit: it goes through the pass like a fetched one, to be recorded.
    pub fn too_large(uid: u32, size: u64) -> Fetch {
        Fetch {
            seq: 0,
            uid: Some(uid),
            size: Some(size),
            flags: None,
            internal_date: None,
            body: Some(Value::TooLarge(size)),
            header: None,
            raw: Bytes::new(),
        }
    }

    fn value<'s>(&'s self, v: &'s Option<Value>) -> Option<&'s [u8]> {
        match v.as_ref()? {
            Value::In(r) => self.raw.get(r.clone()),
            Value::Owned(b) => Some(b),
            Value::TooLarge(_) | Value::Nil => None,
        }
    }

    /// The message, when it came and fit the limit.
    pub fn body(&self) -> Option<&[u8]> {
        self.value(&self.body)
    }

    /// The announced size of a message that was dropped for its size.
    pub fn body_too_large(&self) -> Option<u64> {
        match self.body {
            Some(Value::TooLarge(n)) => Some(n),
            _ => None,
        }
    }

    pub fn header(&self) -> Option<&[u8]> {
        self.value(&self.header)
    }

    /// INTERNALDATE as RFC 3339, when it reads.
    pub fn internal_date_rfc3339(&self) -> Option<String> {
        let s = self.internal_date.as_deref()?.trim_start();
        chrono::DateTime::parse_from_str(s, "%d-%b-%Y %H:%M:%S %z")
            .ok()
            .map(|d| d.to_rfc3339())
    }
}

/// Reads a frame. Never fails and never panics, whatever the bytes.
pub fn parse(frame: &Frame) -> Response {
    let mut p = P {
        b: &frame.bytes,
        i: 0,
        skipped: &frame.skipped,
    };
    if p.eat(b"+") {
        p.eat(b" ");
        return Response::Continue(p.rest_text());
    }
    if matches!(p.b.get(1), None | Some(b' ' | b'\r' | b'\n')) && p.eat(b"*") {
        p.eat(b" ");
        return Response::Data(untagged(&mut p, frame));
    }
    let tag = String::from_utf8_lossy(p.atom()).into_owned();
    p.eat(b" ");
    let status = status_word(p.atom());
    p.eat(b" ");
    let (code, text) = code_and_text(&mut p);
    Response::Tagged {
        tag,
        status: status.filter(|s| matches!(s, Status::Ok | Status::No | Status::Bad)),
        code,
        text,
    }
}

fn status_word(w: &[u8]) -> Option<Status> {
    Some(match w.to_ascii_uppercase().as_slice() {
        b"OK" => Status::Ok,
        b"NO" => Status::No,
        b"BAD" => Status::Bad,
        b"BYE" => Status::Bye,
        b"PREAUTH" => Status::Preauth,
        _ => return None,
    })
}

fn untagged(p: &mut P<'_>, frame: &Frame) -> Data {
    let first = p.atom().to_vec();
    if let Some(status) = status_word(&first) {
        p.eat(b" ");
        let (code, text) = code_and_text(p);
        return Data::Status { status, code, text };
    }
    let upper = String::from_utf8_lossy(&first).to_ascii_uppercase();
    let malformed = |why| Data::Malformed {
        keyword: upper.clone(),
        why,
    };
    if let Some(n) = number_u32(&first) {
        p.eat(b" ");
        let kw = String::from_utf8_lossy(p.atom()).to_ascii_uppercase();
        return match kw.as_str() {
            "EXISTS" => Data::Exists(n),
            "EXPUNGE" => Data::Expunge(n),
            "FETCH" => {
                p.eat(b" ");
                match fetch(p, n, frame) {
                    Some(f) => Data::Fetch(f),
                    None => Data::Malformed {
                        keyword: kw,
                        why: "unreadable FETCH data",
                    },
                }
            }
            _ => Data::Other { keyword: kw },
        };
    }
    match upper.as_str() {
        "CAPABILITY" => Data::Capability(words(&p.rest_text())),
        "SEARCH" => match search(p) {
            Some(v) => Data::Search(v),
            None => malformed("a SEARCH result that is not a list of numbers"),
        },
        "LIST" => match list(p) {
            Some((attributes, name)) => Data::List { attributes, name },
            None => malformed("unreadable LIST data"),
        },
        _ => Data::Other { keyword: upper },
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_ascii_whitespace()
        .map(|w| w.to_ascii_uppercase())
        .collect()
}

fn number_u32(w: &[u8]) -> Option<u32> {
    if w.is_empty() || w.len() > 10 || !w.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(w).ok()?.parse().ok()
}

fn number_u64(w: &[u8]) -> Option<u64> {
    if w.is_empty() || w.len() > 20 || !w.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(w).ok()?.parse().ok()
}

/// `SEARCH 1 2 3`, optionally ending in `(MODSEQ n)` (RFC 7162).
fn search(p: &mut P<'_>) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    loop {
        while p.eat(b" ") {}
        if p.at_line_end() {
            return Some(out);
        }
        if p.peek() == Some(b'(') {
            p.value()?;
            while p.eat(b" ") {}
            return p.at_line_end().then_some(out);
        }
        out.push(number_u32(p.atom())?);
    }
}

/// `LIST (attrs) delim name`.
fn list(p: &mut P<'_>) -> Option<(Vec<String>, String)> {
    p.eat(b" ");
    if !p.eat(b"(") {
        return None;
    }
    let mut attributes = Vec::new();
    loop {
        while p.eat(b" ") {}
        if p.eat(b")") {
            break;
        }
        let a = p.atom();
        if a.is_empty() {
            return None;
        }
        attributes.push(String::from_utf8_lossy(a).into_owned());
    }
    p.eat(b" ");
    p.value()?; // the delimiter: a quoted char or NIL
    p.eat(b" ");
    let name = match p.value()? {
        V::Atom(a) => a.to_vec(),
        V::Str(s) => s,
        V::Lit(r) => p.b.get(r)?.to_vec(),
        _ => return None,
    };
    Some((attributes, String::from_utf8_lossy(&name).into_owned()))
}

fn fetch(p: &mut P<'_>, seq: u32, frame: &Frame) -> Option<Fetch> {
    let mut f = Fetch {
        seq,
        uid: None,
        size: None,
        flags: None,
        internal_date: None,
        body: None,
        header: None,
        raw: frame.bytes.clone(),
    };
    if !p.eat(b"(") {
        return None;
    }
    loop {
        while p.eat(b" ") {}
        if p.eat(b")") {
            return Some(f);
        }
        let name = p.fetch_name()?.to_ascii_uppercase();
        p.eat(b" ");
        let v = p.value()?;
        let num = |v: &V<'_>| match v {
            V::Atom(a) => number_u64(a),
            _ => None,
        };
        match name.as_slice() {
            b"UID" => f.uid = Some(u32::try_from(num(&v)?).ok()?),
            b"RFC822.SIZE" => f.size = Some(num(&v)?),
            b"INTERNALDATE" => {
                if let V::Str(s) = v {
                    f.internal_date = Some(String::from_utf8_lossy(&s).into_owned());
                }
            }
            b"FLAGS" => {
                let V::List(items) = v else { return None };
                f.flags = Some(items);
            }
            b"BODY[]" | b"RFC822" | b"BINARY[]" => f.body = Some(v.into_value()?),
            b"BODY[HEADER]" | b"RFC822.HEADER" => f.header = Some(v.into_value()?),
            _ => {}
        }
    }
}

/// Reads `[CODE args] text` after a status word.
fn code_and_text(p: &mut P<'_>) -> (Option<Code>, String) {
    let mut code = None;
    if p.peek() == Some(b'[') {
        let start = p.i;
        match p.bracketed() {
            Some(inner) => {
                code = Some(read_code(inner));
                p.eat(b" ");
            }
            None => p.i = start,
        }
    }
    (code, p.rest_text())
}

fn read_code(inner: &[u8]) -> Code {
    let s = String::from_utf8_lossy(inner);
    let (name, args) = s.split_once(' ').unwrap_or((&s, ""));
    let name = name.to_ascii_uppercase();
    let n = || number_u32(args.trim().as_bytes());
    match name.as_str() {
        "UIDVALIDITY" => n().map(Code::UidValidity),
        "UIDNEXT" => n().map(Code::UidNext),
        "CAPABILITY" => Some(Code::Capability(words(args))),
        _ => None,
    }
    .unwrap_or(Code::Other(name))
}

/// A value of the generic grammar.
enum V<'a> {
    Atom(&'a [u8]),
    Str(Vec<u8>),
    Lit(Range<usize>),
    Skipped(u64),
    /// A parenthesised list, its atoms and strings as text.
    List(Vec<String>),
}

impl V<'_> {
    fn into_value(self) -> Option<Value> {
        Some(match self {
            V::Atom(a) if a.eq_ignore_ascii_case(b"NIL") => Value::Nil,
            V::Atom(_) | V::List(_) => return None,
            V::Str(s) => Value::Owned(s),
            V::Lit(r) => Value::In(r),
            V::Skipped(n) => Value::TooLarge(n),
        })
    }
}

/// A cursor over a frame's bytes. Every method stops at the end of the
/// bytes; none panics.
struct P<'a> {
    b: &'a [u8],
    i: usize,
    skipped: &'a [(usize, u64)],
}

/// Lists nest no deeper than this (BODYSTRUCTURE nests a few levels); a
/// deeper one is unreadable rather than a stack overflow.
const MAX_DEPTH: usize = 64;

impl<'a> P<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, s: &[u8]) -> bool {
        if self.b.get(self.i..).is_some_and(|rest| rest.starts_with(s)) {
            self.i += s.len();
            true
        } else {
            false
        }
    }

    fn at_line_end(&self) -> bool {
        matches!(self.peek(), None | Some(b'\r') | Some(b'\n'))
    }

    /// Bytes up to a space, a bracket, a parenthesis or the line's end.
    fn atom(&mut self) -> &'a [u8] {
        self.i = self.i.min(self.b.len());
        let start = self.i;
        while let Some(c) = self.peek() {
            if matches!(
                c,
                b' ' | b'(' | b')' | b'\r' | b'\n' | b'"' | b'{' | b'[' | b']'
            ) {
                break;
            }
            self.i += 1;
        }
        &self.b[start..self.i]
    }

    /// The rest of the line as text.
    fn rest_text(&mut self) -> String {
        self.i = self.i.min(self.b.len());
        let start = self.i;
        while !self.at_line_end() {
            self.i += 1;
        }
        String::from_utf8_lossy(&self.b[start..self.i]).into_owned()
    }

    /// `[...]` with nested brackets and quoted strings inside; returns the
    /// inside.
    fn bracketed(&mut self) -> Option<&'a [u8]> {
        if !self.eat(b"[") {
            return None;
        }
        let start = self.i;
        let mut depth = 1usize;
        let mut quoted = false;
        while let Some(c) = self.peek() {
            match c {
                b'\r' | b'\n' => return None,
                b'\\' if quoted => self.i += 1,
                b'"' => quoted = !quoted,
                b'[' if !quoted => depth += 1,
                b']' if !quoted => {
                    depth -= 1;
                    if depth == 0 {
                        let inner = &self.b[start..self.i];
                        self.i += 1;
                        return Some(inner);
                    }
                }
                _ => {}
            }
            self.i += 1;
        }
        None
    }

    /// A FETCH item name: `BODY[HEADER.FIELDS (A B)]<0>` is one name.
    fn fetch_name(&mut self) -> Option<Vec<u8>> {
        let mut name = self.atom().to_vec();
        if self.peek() == Some(b'[') {
            let inner = self.bracketed()?;
            name.push(b'[');
            name.extend_from_slice(inner);
            name.push(b']');
            if self.peek() == Some(b'<') {
                while let Some(c) = self.peek() {
                    self.i += 1;
                    if c == b'>' {
                        break;
                    }
                }
            }
        }
        (!name.is_empty()).then_some(name)
    }

    fn value(&mut self) -> Option<V<'a>> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Option<V<'a>> {
        match self.peek()? {
            b'(' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    while self.eat(b" ") {}
                    if self.eat(b")") {
                        return Some(V::List(items));
                    }
                    match self.value_at(depth + 1)? {
                        V::Atom(a) => items.push(String::from_utf8_lossy(a).into_owned()),
                        V::Str(s) => items.push(String::from_utf8_lossy(&s).into_owned()),
                        _ => {}
                    }
                }
            }
            b'"' => {
                self.i += 1;
                let mut s = Vec::new();
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.i += 1;
                            return Some(V::Str(s));
                        }
                        b'\\' => {
                            self.i += 1;
                            s.push(self.peek()?);
                        }
                        b'\r' | b'\n' => return None,
                        c => s.push(c),
                    }
                    self.i += 1;
                }
            }
            b'~' | b'{' => {
                self.eat(b"~");
                if !self.eat(b"{") {
                    return None;
                }
                let start = self.i;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
                let n = number_u64(&self.b[start..self.i])?;
                self.eat(b"+");
                if !self.eat(b"}") {
                    return None;
                }
                self.eat(b"\r");
                if !self.eat(b"\n") {
                    return None;
                }
                if self.skipped.iter().any(|&(at, _)| at == self.i) {
                    return Some(V::Skipped(n));
                }
                let start = self.i;
                let end = start.checked_add(usize::try_from(n).ok()?)?;
                if end > self.b.len() {
                    return None;
                }
                self.i = end;
                Some(V::Lit(start..end))
            }
            _ => {
                // An atom, possibly with a bracketed part (BODY[...] as a
                // value does not occur, but a flag like \* or a code might).
                let start = self.i;
                self.atom();
                if self.peek() == Some(b'[') {
                    self.bracketed()?;
                    self.atom();
                }
                (self.i > start).then(|| V::Atom(&self.b[start..self.i]))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(max_literal: u64, input: &[u8]) -> Result<Vec<Frame>, FrameError> {
        let mut f = Framer::new(max_literal);
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        while let Some(fr) = f.next(&mut buf)? {
            out.push(fr);
        }
        Ok(out)
    }

    fn one(input: &str) -> Response {
        let fr = frames(1 << 30, input.as_bytes()).unwrap();
        assert_eq!(fr.len(), 1, "{input:?}");
        parse(&fr[0])
    }

    fn data(input: &str) -> Data {
        match one(input) {
            Response::Data(d) => d,
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn tagged_statuses() {
        assert_eq!(
            one("A1 NO [UNAVAILABLE] try later\r\n"),
            Response::Tagged {
                tag: "A1".into(),
                status: Some(Status::No),
                code: Some(Code::Other("UNAVAILABLE".into())),
                text: "try later".into(),
            }
        );
        let Response::Tagged { status, text, .. } = one("A2 bad what?\r\n") else {
            panic!()
        };
        assert_eq!((status, text.as_str()), (Some(Status::Bad), "what?"));
        // Not a status at all: no status, so the command is not "OK".
        let Response::Tagged { status, .. } = one("A3 MAYBE\r\n") else {
            panic!()
        };
        assert_eq!(status, None);
        let Response::Tagged { status, .. } = one("A3 BYE\r\n") else {
            panic!()
        };
        assert_eq!(status, None);
    }

    #[test]
    fn codes() {
        assert_eq!(
            data("* OK [UIDVALIDITY 42] v\r\n"),
            Data::Status {
                status: Status::Ok,
                code: Some(Code::UidValidity(42)),
                text: "v".into()
            }
        );
        assert!(matches!(
            data("* OK [UIDNEXT 7]\r\n"),
            Data::Status {
                code: Some(Code::UidNext(7)),
                ..
            }
        ));
        assert!(matches!(
            data("* OK [CAPABILITY IMAP4rev1 idle SASL-IR] hi\r\n"),
            Data::Status { code: Some(Code::Capability(c)), .. } if c == ["IMAP4REV1", "IDLE", "SASL-IR"]
        ));
        for odd in [
            "* OK [MYRIGHTS \"acdilrsw]\"] rights\r\n",
            "* OK [HIGHESTMODSEQ 123456789012] x\r\n",
            "* OK [X-FOO (a [b] \"c\")] y\r\n",
            "* OK [PERMANENTFLAGS (\\Seen \\*)] flags\r\n",
        ] {
            assert!(
                matches!(
                    data(odd),
                    Data::Status {
                        code: Some(Code::Other(_)),
                        ..
                    }
                ),
                "{odd}"
            );
        }
        // An unclosed bracket is text, not a code.
        assert!(matches!(
            data("* OK [UIDNEXT 5 no end\r\n"),
            Data::Status { code: None, text, .. } if text == "[UIDNEXT 5 no end"
        ));
        // A number that does not fit is another code, not a wrong value.
        assert!(matches!(
            data("* OK [UIDNEXT 99999999999] x\r\n"),
            Data::Status {
                code: Some(Code::Other(_)),
                ..
            }
        ));
    }

    #[test]
    fn untagged_data() {
        assert_eq!(data("* 3 EXISTS\r\n"), Data::Exists(3));
        assert_eq!(data("* 2 expunge\r\n"), Data::Expunge(2));
        assert_eq!(data("* SEARCH\r\n"), Data::Search(vec![]));
        assert_eq!(data("* SEARCH 1 2 30\r\n"), Data::Search(vec![1, 2, 30]));
        assert_eq!(
            data("* SEARCH 4 5 (MODSEQ 917162500)\r\n"),
            Data::Search(vec![4, 5])
        );
        assert!(matches!(
            data("* SEARCH 1 two 3\r\n"),
            Data::Malformed { .. }
        ));
        assert!(matches!(
            data("* SEARCH 1 99999999999\r\n"),
            Data::Malformed { .. }
        ));
        assert_eq!(
            data("* CAPABILITY IMAP4rev1 Idle AUTH=PLAIN\r\n"),
            Data::Capability(vec!["IMAP4REV1".into(), "IDLE".into(), "AUTH=PLAIN".into()])
        );
        assert_eq!(
            data("* LIST (\\HasNoChildren \\Trash) \"/\" \"[Gmail]/Trash\"\r\n"),
            Data::List {
                attributes: vec!["\\HasNoChildren".into(), "\\Trash".into()],
                name: "[Gmail]/Trash".into()
            }
        );
        assert_eq!(
            data("* LIST () NIL {5}\r\nINBOX\r\n"),
            Data::List {
                attributes: vec![],
                name: "INBOX".into()
            }
        );
        for other in [
            "* XFOO 17 (something new) \"x\"\r\n",
            "* 0 RECENT\r\n",
            "* FLAGS (\\Seen \\Deleted)\r\n",
            "* ENABLED CONDSTORE\r\n",
            "* VANISHED (EARLIER) 1:3\r\n",
            "* STATUS INBOX (MESSAGES 2)\r\n",
            "* ID (\"name\" \"Dovecot\")\r\n",
            "*\r\n",
        ] {
            assert!(matches!(data(other), Data::Other { .. }), "{other}");
        }
        // Progress lines are untagged OKs with text.
        assert!(matches!(
            data("* OK Searched 91% of the mailbox, ETA 0:01\r\n"),
            Data::Status {
                status: Status::Ok,
                code: None,
                ..
            }
        ));
    }

    #[test]
    fn fetch_items() {
        let msg = "Subject: x\r\n\r\nhi\r\n";
        let input = format!(
            "* 12 FETCH (UID 7 RFC822.SIZE {} FLAGS (\\Seen $Forwarded) X-GM-LABELS (\"\\\\Important\" foo) MODSEQ (12) INTERNALDATE \" 3-Nov-2026 10:00:00 +0100\" BODY[] {{{}}}\r\n{msg})\r\n",
            msg.len(),
            msg.len()
        );
        let Data::Fetch(f) = data(&input) else {
            panic!()
        };
        assert_eq!(
            (f.seq, f.uid, f.size),
            (12, Some(7), Some(msg.len() as u64))
        );
        assert_eq!(f.body(), Some(msg.as_bytes()));
        assert_eq!(f.flags, Some(vec!["\\Seen".into(), "$Forwarded".into()]));
        assert_eq!(
            f.internal_date_rfc3339().as_deref(),
            Some("2026-11-03T10:00:00+01:00")
        );
        // Header sections, quoted values, NIL, and a section with fields.
        let Data::Fetch(f) = data(
            "* 1 FETCH (BODY[HEADER.FIELDS (MESSAGE-ID)] {3}\r\nabc UID 1 BODY[HEADER] \"a \\\"b\\\"\" BODY[] NIL)\r\n",
        ) else {
            panic!()
        };
        assert_eq!(f.uid, Some(1));
        assert_eq!(f.header(), Some(&b"a \"b\""[..]));
        assert_eq!(f.body, Some(Value::Nil));
        assert!(matches!(
            data("* 1 FETCH (UID x)\r\n"),
            Data::Malformed { .. }
        ));
        assert!(matches!(
            data("* 1 FETCH UID 1\r\n"),
            Data::Malformed { .. }
        ));
    }

    #[test]
    fn framing_across_reads_and_literals() {
        let input = b"* 1 FETCH (UID 1 BODY[] {5}\r\nab\r\nc)\r\nA1 OK done\r\n";
        // Fed one byte at a time, the same two frames come out.
        let mut f = Framer::new(100);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for &b in input.iter() {
            buf.extend_from_slice(&[b]);
            while let Some(fr) = f.next(&mut buf).unwrap() {
                got.push(fr.bytes.to_vec());
            }
        }
        assert_eq!(
            got,
            vec![
                b"* 1 FETCH (UID 1 BODY[] {5}\r\nab\r\nc)\r\n".to_vec(),
                b"A1 OK done\r\n".to_vec()
            ]
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn literal_over_the_limit_is_dropped_not_held() {
        let big = vec![b'x'; 1000];
        let mut input = b"* 1 FETCH (UID 9 BODY[] {1000}\r\n".to_vec();
        input.extend_from_slice(&big);
        input.extend_from_slice(b" BODY[HEADER] {2}\r\nhi)\r\nA1 OK\r\n");
        let mut f = Framer::new(100);
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for chunk in input.chunks(7) {
            buf.extend_from_slice(chunk);
            // Never more than a chunk plus a line is held.
            assert!(buf.len() < 200, "{}", buf.len());
            while let Some(fr) = f.next(&mut buf).unwrap() {
                got.push(fr);
            }
        }
        assert_eq!(got.len(), 2);
        let Response::Data(Data::Fetch(fetch)) = parse(&got[0]) else {
            panic!()
        };
        assert_eq!(fetch.uid, Some(9));
        assert_eq!(fetch.body_too_large(), Some(1000));
        assert_eq!(fetch.body(), None);
        assert_eq!(fetch.header(), Some(&b"hi"[..]));
    }

    #[test]
    fn a_long_line_is_an_error() {
        let mut f = Framer::new(100);
        let mut buf = BytesMut::new();
        let chunk = vec![b'a'; 1 << 20];
        let mut result = Ok(None);
        for _ in 0..10 {
            buf.extend_from_slice(&chunk);
            result = f.next(&mut buf);
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result.unwrap_err(), FrameError::LineTooLong);
        // Many short lines of one response (literals between) count too.
        let mut input = Vec::new();
        for _ in 0..(MAX_LINE / 900) {
            input.extend_from_slice(&[b'a'; 990]);
            input.extend_from_slice(b" {1}\r\nx");
        }
        assert_eq!(frames(100, &input).unwrap_err(), FrameError::LineTooLong);
        assert_eq!(
            frames(100, b"* X {99999999999999999999999}\r\n").unwrap_err(),
            FrameError::BadLiteral
        );
    }

    #[test]
    fn braces_in_text_are_not_literals() {
        let fr = frames(100, b"* OK {not a literal}\r\nA1 OK x{}\r\n").unwrap();
        assert_eq!(fr.len(), 2);
    }

    #[test]
    fn deep_nesting_is_unreadable_not_a_crash() {
        let deep = format!(
            "* 1 FETCH (X {}{})\r\n",
            "(".repeat(10_000),
            ")".repeat(10_000)
        );
        assert!(matches!(data(&deep), Data::Malformed { .. }));
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Whatever the bytes and however they are cut into reads: no
        /// panic, and what is framed is exactly what came in, in order.
        #[test]
        fn any_bytes_frame_and_parse_without_panic(
            input in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::sample::select(vec![
                        &b"* "[..], b"A1 ", b"OK ", b"NO ", b"FETCH ", b"(", b")", b"[", b"]",
                        b"{3}\r\n", b"{0}\r\n", b"~{2}\r\n", b"\"", b"\\", b"\r\n", b"\n", b"UID 5 ",
                        b"BODY[] ", b"BODY[HEADER] ", b"NIL ", b"SEARCH 1 2 ", b"+ ", b"1 ",
                        b"LIST () \"/\" ", b"(MODSEQ 3) ", b"RFC822.SIZE 9 ", b"FLAGS (\\Seen) ",
                        b"{99}\r\n",
                    ]).prop_map(<[u8]>::to_vec),
                    proptest::collection::vec(proptest::num::u8::ANY, 0..8),
                ],
                0..60,
            ).prop_map(|v| v.concat()),
            cut in 1usize..16,
        ) {
            // Frames whatever the reads, each parsed; the same frames
            // whether the bytes come at once or cut into pieces.
            let frames_of = |cut: usize| {
                let mut f = Framer::new(20);
                let mut buf = BytesMut::new();
                let mut out = Vec::new();
                for chunk in input.chunks(cut.max(1)) {
                    buf.extend_from_slice(chunk);
                    loop {
                        match f.next(&mut buf) {
                            Ok(Some(fr)) => {
                                let _ = parse(&fr);
                                out.push(fr.bytes.to_vec());
                            }
                            Ok(None) => break,
                            Err(_) => return out,
                        }
                    }
                }
                out
            };
            let whole = frames_of(input.len());
            proptest::prop_assert_eq!(&whole, &frames_of(cut));
            proptest::prop_assert!(whole.iter().map(Vec::len).sum::<usize>() <= input.len());
        }
    }
}
