//! One SMTP/LMTP transaction's decisions, without I/O: the command lines
//! it sends, and what each stage's replies make of it (go on, or stop with
//! an [`Outcome`] per message and the recipients that accepted it).
//! [`super::client`] only writes what this builds and reads what this
//! judges.

use super::reply::{Class, Extensions, Reply};
use super::{Delivery, Envelope, Outcome};

/// A message over the SIZE the server announced is not sent: quarantined,
/// with the reason.
pub fn over_size(size: u64, ext: &Extensions, peer: &str) -> Option<Delivery> {
    let max = ext.size?;
    (size > max).then(|| {
        Delivery::all(
            Outcome::Rejected,
            format!(
                "not sent: the message has {size} bytes, over the SIZE limit of {max} that \
                 {peer} announced"
            ),
        )
    })
}

/// MAIL with the parameters the server offers and the message needs, one
/// RCPT per recipient, and, with PIPELINING, DATA: the group ends there
/// (RFC 2920 section 3.1), and a server that accepted no recipient must
/// refuse it, so no message is ever sent blind.
pub fn commands(env: &Envelope, ext: &Extensions, size: u64, eight_bit: bool) -> Vec<String> {
    let mut mail = format!("MAIL FROM:<{}>", env.sender);
    if ext.size.is_some() {
        mail.push_str(&format!(" SIZE={size}"));
    }
    if eight_bit && ext.eight_bit_mime {
        mail.push_str(" BODY=8BITMIME");
    }
    let needs_utf8 = !env.sender.is_ascii() || env.recipients.iter().any(|r| !r.is_ascii());
    if needs_utf8 && ext.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    let mut commands = vec![mail];
    commands.extend(env.recipients.iter().map(|r| format!("RCPT TO:<{r}>")));
    if ext.pipelining {
        commands.push("DATA".into());
    }
    commands
}

/// How to leave a session after a transaction given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// RSET, and the session serves the next message.
    Reset,
    /// Drop the connection: the server said 421, or it said 354 to a
    /// pipelined DATA all the same and would take the next line as the
    /// message.
    Drop,
}

/// What the replies to MAIL and the RCPTs (and a pipelined DATA) say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Send the message: to `accepted`; `refused` are retried (4xx) or
    /// quarantined (5xx) on their own, and the ledger remembers who
    /// already has it, so no one gets it twice.
    Data {
        accepted: Vec<String>,
        refused: Vec<(String, Reply)>,
    },
    /// The transaction is over before the message.
    Stop(Delivery, End),
}

/// Judges the envelope's replies: `replies[0]` to MAIL, then one per
/// recipient; `data`, the reply to a pipelined DATA.
pub fn judge_envelope(peer: &str, env: &Envelope, replies: &[Reply], data: Option<&Reply>) -> Next {
    if let Some(r) = replies.iter().chain(data).find(|r| r.code == 421) {
        let d = Delivery::all(Outcome::Deferred, format!("{peer}: {r}"));
        return Next::Stop(d, End::Drop);
    }
    let in_data = data.is_some_and(|r| r.code == 354);
    let end = if in_data { End::Drop } else { End::Reset };
    let mail = &replies[0];
    if !mail.is_ok() {
        let d = Delivery::all(
            class_outcome(mail.class()),
            format!("MAIL FROM refused: {mail}"),
        );
        return Next::Stop(d, end);
    }
    let (mut accepted, mut refused) = (Vec::new(), Vec::new());
    for (rcpt, r) in env.recipients.iter().zip(&replies[1..]) {
        if r.is_ok() {
            accepted.push(rcpt.clone());
        } else {
            refused.push((rcpt.clone(), r.clone()));
        }
    }
    if accepted.is_empty() {
        let outcome = worst(refused.iter().map(|(_, r)| r.class()));
        return Next::Stop(Delivery::all(outcome, describe_refused(&refused)), end);
    }
    Next::Data { accepted, refused }
}

/// Judges the reply to DATA: None for 354 (send the message).
pub fn judge_data(r: &Reply) -> Option<(Delivery, End)> {
    if r.code == 354 {
        return None;
    }
    let end = if r.code == 421 { End::Drop } else { End::Reset };
    let d = Delivery::all(class_outcome(r.class()), format!("DATA refused: {r}"));
    Some((d, end))
}

/// Judges the replies after the message: `finals` has one per accepted
/// recipient (LMTP's own; SMTP's one reply, repeated). Returns the
/// delivery, and whether the session must be dropped (a 421).
pub fn judge_final(
    lmtp: bool,
    mut refused: Vec<(String, Reply)>,
    finals: Vec<(String, Reply)>,
) -> (Delivery, bool) {
    let drop = finals.iter().any(|(_, r)| r.code == 421);
    let mut got = Vec::new();
    for (rcpt, r) in finals {
        if r.is_ok() {
            got.push((rcpt, r));
        } else {
            refused.push((rcpt, r));
        }
    }
    let accepted: Vec<String> = got.iter().map(|(a, _)| a.clone()).collect();
    if refused.is_empty() {
        let reply = if lmtp && got.len() > 1 {
            got.iter()
                .map(|(a, r)| format!("<{a}>: {r}"))
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            got[0].1.to_string()
        };
        let d = Delivery {
            outcome: Outcome::Delivered,
            reply,
            accepted,
        };
        return (d, drop);
    }
    let outcome = worst(refused.iter().map(|(_, r)| r.class()));
    let mut reply = describe_refused(&refused);
    if !accepted.is_empty() {
        reply.push_str(&format!("; accepted by {}", accepted.join(", ")));
    }
    let d = Delivery {
        outcome,
        reply,
        accepted,
    };
    (d, drop)
}

fn class_outcome(c: Class) -> Outcome {
    match c {
        Class::Permanent => Outcome::Rejected,
        Class::Ok => Outcome::Delivered,
        // A 3xx where 2xx was due is a confused server: try again later.
        Class::Transient | Class::Intermediate => Outcome::Deferred,
    }
}

/// Any temporary refusal makes the whole message temporary: a retry may
/// still reach those recipients.
fn worst(classes: impl Iterator<Item = Class>) -> Outcome {
    let mut out = Outcome::Rejected;
    for c in classes {
        if c != Class::Permanent {
            out = Outcome::Deferred;
        }
    }
    out
}

fn describe_refused(refused: &[(String, Reply)]) -> String {
    refused
        .iter()
        .map(|(a, r)| format!("<{a}> refused: {r}"))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(
        pipelining: bool,
        size: Option<u64>,
        eight_bit_mime: bool,
        smtputf8: bool,
    ) -> Extensions {
        Extensions {
            pipelining,
            size,
            eight_bit_mime,
            smtputf8,
        }
    }

    #[test]
    fn the_command_lines() {
        let ascii = Envelope {
            sender: "s@x".into(),
            recipients: vec!["a@x".into(), "b@x".into()],
        };
        let utf8 = Envelope {
            sender: "s@x".into(),
            recipients: vec!["jörg@x".into()],
        };
        // (envelope, extensions, 8-bit body) -> MAIL line, DATA in the group
        let table = [
            (
                &ascii,
                ext(false, None, false, false),
                false,
                "MAIL FROM:<s@x>",
                false,
            ),
            (
                &ascii,
                ext(true, Some(10), true, true),
                false,
                "MAIL FROM:<s@x> SIZE=42",
                true,
            ),
            (
                &ascii,
                ext(false, None, true, false),
                true,
                "MAIL FROM:<s@x> BODY=8BITMIME",
                false,
            ),
            // 8-bit without 8BITMIME: sent as is, no parameter the server
            // does not know.
            (
                &ascii,
                ext(false, None, false, false),
                true,
                "MAIL FROM:<s@x>",
                false,
            ),
            (
                &utf8,
                ext(false, None, false, true),
                false,
                "MAIL FROM:<s@x> SMTPUTF8",
                false,
            ),
            (
                &utf8,
                ext(false, None, false, false),
                false,
                "MAIL FROM:<s@x>",
                false,
            ),
        ];
        for (env, ext, eight_bit, mail, data) in table {
            let c = commands(env, &ext, 42, eight_bit);
            assert_eq!(c[0], mail, "{ext:?}");
            let rcpts: Vec<String> = env
                .recipients
                .iter()
                .map(|r| format!("RCPT TO:<{r}>"))
                .collect();
            assert_eq!(&c[1..=rcpts.len()], &rcpts[..]);
            assert_eq!(
                c.last().map(String::as_str) == Some("DATA"),
                data,
                "{ext:?}"
            );
        }
        let null = Envelope {
            sender: String::new(),
            recipients: vec!["a@x".into()],
        };
        assert_eq!(
            commands(&null, &Extensions::default(), 1, false)[0],
            "MAIL FROM:<>"
        );
    }

    #[test]
    fn over_the_announced_size_only() {
        let e = ext(false, Some(100), false, false);
        assert!(over_size(100, &e, "p").is_none());
        assert_eq!(over_size(101, &e, "p").unwrap().outcome, Outcome::Rejected);
        assert!(over_size(u64::MAX, &Extensions::default(), "p").is_none());
    }
}
