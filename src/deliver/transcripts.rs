//! Transcript tests of the SMTP/LMTP client: a scripted server on an
//! in-memory stream, what it reads from imapull line by line, and what
//! imapull makes of its replies. The runtime is single-threaded, so the
//! server can tell a client that sends ahead of a reply from one that
//! waits for it.

use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use super::client::Deliverer;
use super::{Delivery, Envelope, Outcome};
use crate::config::{Deliver, DeliverProtocol, DeliverTarget};

/// One step of the server's side.
#[derive(Clone, Debug)]
enum Step {
    /// A line the client must send (a trailing `*` matches any rest).
    Read(&'static str),
    /// The message, up to its terminating ".".
    Message,
    /// Bytes the server sends; each `|` is a point where it pauses, so that
    /// the client reads the reply in pieces.
    Send(&'static str),
}
use Step::*;

/// What a played transcript left.
struct Played {
    delivery: Result<Delivery, String>,
    /// Every line the client sent, the message as "<message>".
    seen: Vec<String>,
    /// Lines the client sent before it had the reply to the previous one.
    ahead: Vec<String>,
    /// The script was played to the end.
    finished: bool,
    open: bool,
}

/// The server's side: plays `steps`, then reads to the end of the stream.
async fn serve(io: tokio::io::DuplexStream, steps: Vec<Step>) -> (Vec<String>, Vec<String>, bool) {
    let (r, mut w) = tokio::io::split(io);
    let mut r = BufReader::new(r);
    let (mut seen, mut ahead) = (Vec::new(), Vec::new());
    let mut after_send = false;
    for step in steps {
        match step {
            Read(want) => {
                let early = after_send
                    && r.fill_buf()
                        .now_or_never()
                        .is_some_and(|b| b.is_ok_and(|b| !b.is_empty()));
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return (seen, ahead, false);
                }
                let line = line.trim_end().to_string();
                let ok = match want.strip_suffix('*') {
                    Some(p) => line.starts_with(p),
                    None => line == want,
                };
                assert!(ok, "the client sent {line:?}, the script wants {want:?}");
                if early {
                    ahead.push(line.clone());
                }
                seen.push(line);
                after_send = false;
            }
            Message => {
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return (seen, ahead, false);
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                seen.push("<message>".into());
            }
            Send(bytes) => {
                for (i, piece) in bytes.split('|').enumerate() {
                    if i > 0 {
                        // Let the client read what came so far.
                        tokio::task::yield_now().await;
                    }
                    let _ = w.write_all(piece.as_bytes()).await;
                    let _ = w.flush().await;
                }
                after_send = true;
            }
        }
    }
    // Anything more the client sends is a mistake the script did not
    // expect; the test sees it in `seen` (and QUIT is never sent here).
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return (seen, ahead, true);
        }
        seen.push(line.trim_end().to_string());
    }
}

fn deliverer(lmtp: bool) -> Deliverer {
    let target = Deliver {
        protocol: if lmtp {
            DeliverProtocol::Lmtp
        } else {
            DeliverProtocol::Smtp
        },
        target: DeliverTarget::Unix("/nonexistent".into()),
    };
    Deliverer::new(target, "me.test".into(), Duration::from_secs(2))
}

fn env(rcpts: &[&str]) -> Envelope {
    Envelope {
        sender: "s@remote.test".into(),
        recipients: rcpts.iter().map(|r| r.to_string()).collect(),
    }
}

const MSG: &[u8] = b"Subject: hi\r\n\r\nbody\r\n";

/// Plays `steps` against one delivery of `MSG` to `rcpts`.
async fn play(lmtp: bool, rcpts: &[&str], steps: Vec<Step>) -> Played {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve(b, steps));
    let mut d = deliverer(lmtp);
    let delivery = match d.attach(Box::new(a)).await {
        Ok(()) => Ok(d
            .deliver(&env(rcpts), b"", MSG, None, None)
            .await
            .expect("no barrier")),
        Err(e) => Err(format!("{e:#}")),
    };
    let open = d.is_open();
    drop(d);
    let (seen, ahead, finished) = server.await.unwrap();
    Played {
        delivery,
        seen,
        ahead,
        finished,
        open,
    }
}

/// The greeting and EHLO with these extension lines.
fn hello(ext: &'static str) -> Vec<Step> {
    vec![
        Send("220 mx.test ESMTP\r\n"),
        Read("EHLO me.test"),
        Send(ext),
    ]
}

fn script(parts: &[Vec<Step>]) -> Vec<Step> {
    parts.concat()
}

fn outcome(p: &Played) -> (Outcome, String, Vec<String>) {
    let d = p.delivery.clone().expect("a session");
    (d.outcome, d.reply, d.accepted)
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

const PIPELINING: &str = "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n";
const PLAIN: &str = "250-mx.test\r\n250 8BITMIME\r\n";

#[tokio::test(flavor = "current_thread")]
async fn pipelining_on_sends_mail_rcpt_and_data_in_one_go() {
    // The server answers nothing before it has all four lines: a client
    // that waited for each reply would time out here.
    let p = play(
        false,
        &["a@x", "b@x"],
        script(&[
            hello(PIPELINING),
            vec![
                Read("MAIL FROM:<s@remote.test>"),
                Read("RCPT TO:<a@x>"),
                Read("RCPT TO:<b@x>"),
                Read("DATA"),
                Send("250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
                Message,
                Send("250 2.0.0 queued as X\r\n"),
            ],
        ]),
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    let (o, reply, accepted) = outcome(&p);
    assert_eq!(
        (o, reply.as_str()),
        (Outcome::Delivered, "250 2.0.0 queued as X")
    );
    assert_eq!(accepted, strings(&["a@x", "b@x"]));
    assert!(p.open);
}

#[tokio::test(flavor = "current_thread")]
async fn pipelining_off_waits_for_every_reply() {
    let p = play(
        false,
        &["a@x", "b@x"],
        script(&[
            hello(PLAIN),
            vec![
                Read("MAIL FROM:<s@remote.test>"),
                Send("250 ok\r\n"),
                Read("RCPT TO:<a@x>"),
                Send("250 ok\r\n"),
                Read("RCPT TO:<b@x>"),
                Send("250 ok\r\n"),
                Read("DATA"),
                Send("354 go\r\n"),
                Message,
                Send("250 queued\r\n"),
            ],
        ]),
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    assert!(p.ahead.is_empty(), "sent before the reply: {:?}", p.ahead);
    assert_eq!(outcome(&p).0, Outcome::Delivered);
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_rcpt_among_several_gets_the_rest_their_copy() {
    for (code, want) in [("450", Outcome::Deferred), ("550", Outcome::Rejected)] {
        let refusal: &'static str = Box::leak(format!("{code} 4.2.0 mailbox busy\r\n").into());
        let p = play(
            false,
            &["a@x", "b@x", "c@x"],
            script(&[
                hello(PLAIN),
                vec![
                    Read("MAIL FROM:*"),
                    Send("250 ok\r\n"),
                    Read("RCPT TO:<a@x>"),
                    Send("250 ok\r\n"),
                    Read("RCPT TO:<b@x>"),
                    Send(refusal),
                    Read("RCPT TO:<c@x>"),
                    Send("250 ok\r\n"),
                    Read("DATA"),
                    Send("354 go\r\n"),
                    Message,
                    Send("250 queued\r\n"),
                ],
            ]),
        )
        .await;
        let (o, reply, accepted) = outcome(&p);
        // The message is not delivered to everyone: what the ledger keeps
        // is who has it, so that the retry goes to b alone.
        assert_eq!(o, want, "{reply}");
        assert_eq!(accepted, strings(&["a@x", "c@x"]));
        assert!(
            reply.starts_with(&format!("<b@x> refused: {code}")),
            "{reply}"
        );
        assert!(reply.ends_with("accepted by a@x, c@x"), "{reply}");
        assert!(p.open && p.finished);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_354_after_every_rcpt_was_refused_drops_the_connection_unsent() {
    let p = play(
        false,
        &["a@x", "b@x"],
        script(&[
            hello(PIPELINING),
            vec![
                Read("MAIL FROM:*"),
                Read("RCPT TO:<a@x>"),
                Read("RCPT TO:<b@x>"),
                Read("DATA"),
                Send("250 ok\r\n550 no such user\r\n450 try later\r\n354 go ahead anyway\r\n"),
            ],
        ]),
    )
    .await;
    let (o, reply, accepted) = outcome(&p);
    assert_eq!(o, Outcome::Deferred, "{reply}");
    assert!(accepted.is_empty());
    // Nothing more was sent: not the message, not even RSET, which the
    // server would have taken as the message's first line.
    assert!(p.finished);
    assert_eq!(p.seen.len(), 5, "{:?}", p.seen);
    assert!(!p.open);
}

#[tokio::test(flavor = "current_thread")]
async fn every_rcpt_refused_and_data_refused_resets_and_keeps_the_session() {
    let p = play(
        false,
        &["a@x"],
        script(&[
            hello(PIPELINING),
            vec![
                Read("MAIL FROM:*"),
                Read("RCPT TO:<a@x>"),
                Read("DATA"),
                Send("250 ok\r\n550 no such user\r\n554 no valid recipients\r\n"),
                Read("RSET"),
                Send("250 ok\r\n"),
            ],
        ]),
    )
    .await;
    let (o, reply, _) = outcome(&p);
    assert_eq!(
        (o, reply.as_str()),
        (Outcome::Rejected, "<a@x> refused: 550 no such user")
    );
    assert!(p.open && p.finished, "{:?}", p.seen);
}

/// The clean non-pipelined transaction, as (what the client sends, the
/// server's reply) pairs.
const CLEAN: &[(&str, &str)] = &[
    ("", "220 mx.test\r\n"),
    ("EHLO me.test", "250-mx.test\r\n250 8BITMIME\r\n"),
    ("MAIL FROM:*", "250 ok\r\n"),
    ("RCPT TO:<a@x>", "250 ok\r\n"),
    ("DATA", "354 go\r\n"),
    ("<message>", "250 queued\r\n"),
];

/// The clean transaction with the reply at `k` replaced and nothing after.
fn answered_at(k: usize, reply: &'static str) -> Vec<Step> {
    let mut steps = Vec::new();
    for (i, (client, server)) in CLEAN.iter().enumerate().take(k + 1) {
        match *client {
            "" => {}
            "<message>" => steps.push(Message),
            c => steps.push(Read(c)),
        }
        steps.push(Send(if i == k { reply } else { server }));
    }
    steps
}

#[tokio::test(flavor = "current_thread")]
async fn a_421_at_each_step_defers_and_closes_the_session() {
    for k in 0..CLEAN.len() {
        let p = play(
            false,
            &["a@x"],
            answered_at(k, "421 4.3.2 shutting down\r\n"),
        )
        .await;
        match &p.delivery {
            // The greeting or EHLO: no session at all (a real run defers
            // the message and reconnects next time).
            Err(e) => assert!(k < 2 && e.contains("421"), "step {k}: {e}"),
            Ok(d) => {
                assert!(k >= 2, "step {k}: {d:?}");
                assert_eq!(d.outcome, Outcome::Deferred, "step {k}: {d:?}");
                assert!(
                    d.reply.contains("421 4.3.2 shutting down"),
                    "step {k}: {d:?}"
                );
            }
        }
        assert!(!p.open, "step {k}: the session stayed open");
        // Nothing was sent after the 421 (no RSET, no QUIT).
        assert!(p.finished, "step {k}: {:?}", p.seen);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn replies_split_across_reads_are_put_together() {
    let p = play(
        false,
        &["a@x"],
        script(&[
            vec![Send("22|0 mx.test|\r\n"), Read("EHLO me.test")],
            vec![Send(
                "250-mx.test\r\n250-PIPE|LINING\r|\n250 SIZE 10|00\r\n",
            )],
            vec![
                Read("MAIL FROM:<s@remote.test> SIZE=21"),
                Read("RCPT TO:<a@x>"),
                Read("DATA"),
                Send("250 ok\r\n2|50 ok\r\n354 go\r\n"),
                Message,
                Send("25|0-2.0.0 line one\r\n250 2.0.0 li|ne two\r\n"),
            ],
        ]),
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    let (o, reply, _) = outcome(&p);
    assert_eq!(
        (o, reply.as_str()),
        (Outcome::Delivered, "250 2.0.0 line one / 2.0.0 line two")
    );
}

#[tokio::test(flavor = "current_thread")]
async fn lmtp_judges_each_recipient_by_its_own_final_reply() {
    let p = play(
        true,
        &["a@x", "b@x", "c@x"],
        vec![
            Send("220 lmtp.test LMTP\r\n"),
            Read("LHLO me.test"),
            Send("250-lmtp.test\r\n250 PIPELINING\r\n"),
            Read("MAIL FROM:*"),
            Read("RCPT TO:<a@x>"),
            Read("RCPT TO:<b@x>"),
            Read("RCPT TO:<c@x>"),
            Read("DATA"),
            Send("250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
            Message,
            Send("250 2.0.0 <a@x> saved\r\n452 4.2.2 <b@x> over quota\r\n550 5.1.1 <c@x> gone\r\n"),
        ],
    )
    .await;
    let (o, reply, accepted) = outcome(&p);
    // One temporary refusal makes the message deferred; a has it, and the
    // retry goes to the others only.
    assert_eq!(o, Outcome::Deferred, "{reply}");
    assert_eq!(accepted, strings(&["a@x"]));
    assert_eq!(
        reply,
        "<b@x> refused: 452 4.2.2 <b@x> over quota; <c@x> refused: 550 5.1.1 <c@x> gone; \
         accepted by a@x"
    );
    assert!(p.open && p.finished);
}

#[tokio::test(flavor = "current_thread")]
async fn size_refusals_quarantine_without_sending_the_message() {
    // Over the announced SIZE: not even MAIL is sent.
    let p = play(
        false,
        &["a@x"],
        script(&[hello("250-mx.test\r\n250 SIZE 10\r\n")]),
    )
    .await;
    let (o, reply, _) = outcome(&p);
    assert_eq!(o, Outcome::Rejected);
    assert!(
        reply.contains("21 bytes, over the SIZE limit of 10"),
        "{reply}"
    );
    assert_eq!(p.seen, strings(&["EHLO me.test"]));
    assert!(p.open);
    // Under it, but MAIL's SIZE= refused (552): quarantined, RSET.
    let p = play(
        false,
        &["a@x"],
        script(&[
            hello("250-mx.test\r\n250 SIZE 1000\r\n"),
            vec![
                Read("MAIL FROM:<s@remote.test> SIZE=21"),
                Send("552 5.3.4 message size exceeds fixed limit\r\n"),
                Read("RSET"),
                Send("250 ok\r\n"),
            ],
        ]),
    )
    .await;
    let (o, reply, _) = outcome(&p);
    assert_eq!(
        (o, reply.as_str()),
        (
            Outcome::Rejected,
            "MAIL FROM refused: 552 5.3.4 message size exceeds fixed limit"
        )
    );
    assert!(p.open && p.finished);
}

#[tokio::test(flavor = "current_thread")]
async fn reply_codes_outside_2xx_to_5xx_defer_and_drop_the_session() {
    for odd in [
        "199 what\r\n",
        "600 what\r\n",
        "099 what\r\n",
        "2500 what\r\n",
        "hello\r\n",
    ] {
        let odd: &'static str = Box::leak(odd.to_string().into());
        let p = play(false, &["a@x"], answered_at(2, odd)).await;
        let (o, reply, _) = outcome(&p);
        assert_eq!(o, Outcome::Deferred, "{odd:?}: {reply}");
        assert!(!p.open, "{odd:?}");
        assert!(p.finished, "{odd:?}: {:?}", p.seen);
    }
    // A 3xx where a 2xx was due: a confused server; deferred, RSET.
    let mut steps = answered_at(2, "354 what\r\n");
    steps.extend([Read("RSET"), Send("250 ok\r\n")]);
    let p = play(false, &["a@x"], steps).await;
    assert_eq!(outcome(&p).0, Outcome::Deferred);
    assert!(p.open && p.finished, "{:?}", p.seen);
}

/// The first message, with the second one's envelope right after its ".".
fn first_then_the_next_envelope() -> Vec<Step> {
    vec![
        Read("MAIL FROM:<s@remote.test>"),
        Read("RCPT TO:<a@x>"),
        Read("DATA"),
        Send("250 ok\r\n250 ok\r\n354 go\r\n"),
        Message,
        Read("MAIL FROM:<s@remote.test>"),
        Read("RCPT TO:<b@x>"),
        Read("DATA"),
    ]
}

/// Two deliveries on one session, the first told of the second
/// ([`super::Upcoming`]); then `after` (QUIT or a third delivery).
async fn play_two(
    ext: &'static str,
    steps: Vec<Step>,
    second: Envelope,
    third: Option<Envelope>,
) -> (Vec<Delivery>, Played) {
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve(b, [hello(ext), steps].concat()));
    let mut d = deliverer(false);
    d.attach(Box::new(a)).await.unwrap();
    let first = env(&["a@x"]);
    let next = super::Upcoming {
        env: &second,
        prefix: b"",
        msg: MSG,
    };
    let mut got = vec![d.deliver(&first, b"", MSG, None, Some(next)).await.unwrap()];
    match third {
        Some(t) => got.push(d.deliver(&t, b"", MSG, None, None).await.unwrap()),
        None => {
            got.push(d.deliver(&second, b"", MSG, None, None).await.unwrap());
            d.quit().await;
        }
    }
    let open = d.is_open();
    drop(d);
    let (seen, ahead, finished) = server.await.unwrap();
    let played = Played {
        delivery: Ok(got[0].clone()),
        seen,
        ahead,
        finished,
        open,
    };
    (got, played)
}

#[tokio::test(flavor = "current_thread")]
async fn the_next_envelope_goes_out_with_the_final_dot() {
    // The server reads the second envelope before it answers the first
    // message: a client that waited for the 250 would hang here.
    let (got, p) = play_two(
        PIPELINING,
        [
            first_then_the_next_envelope(),
            vec![
                Send("250 queued 1\r\n|250 ok\r\n250 ok\r\n|354 go\r\n"),
                Message,
                Send("250 queued 2\r\n"),
                Read("QUIT"),
                Send("221 bye\r\n"),
            ],
        ]
        .concat(),
        env(&["b@x"]),
        None,
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    assert_eq!(got[0].reply, "250 queued 1");
    assert_eq!(got[1].reply, "250 queued 2");
    assert_eq!(got[1].accepted, strings(&["b@x"]));
    assert_eq!(
        p.seen.iter().filter(|l| l.starts_with("MAIL")).count(),
        2,
        "{:?}",
        p.seen
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_first_message_leaves_the_envelope_sent_ahead_in_use() {
    let (got, p) = play_two(
        PIPELINING,
        [
            first_then_the_next_envelope(),
            vec![
                Send("554 5.7.1 spam\r\n250 ok\r\n250 ok\r\n354 go\r\n"),
                Message,
                Send("250 queued 2\r\n"),
                Read("QUIT"),
                Send("221 bye\r\n"),
            ],
        ]
        .concat(),
        env(&["b@x"]),
        None,
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    assert_eq!(got[0].outcome, Outcome::Rejected);
    assert_eq!(got[1].outcome, Outcome::Delivered);
}

#[tokio::test(flavor = "current_thread")]
async fn an_envelope_sent_ahead_for_another_message_ends_the_session_without_quit() {
    // The second delivery is not the one announced: the server may be
    // waiting after its 354, so the session is dropped (no QUIT, which it
    // would take as message text) and a new one opened (which fails here:
    // the deliverer's own socket does not exist).
    let (got, p) = play_two(
        PIPELINING,
        [
            first_then_the_next_envelope(),
            vec![Send("250 queued 1\r\n250 ok\r\n250 ok\r\n354 go\r\n")],
        ]
        .concat(),
        env(&["b@x"]),
        Some(env(&["c@x"])),
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    assert_eq!(got[0].outcome, Outcome::Delivered);
    assert_eq!(got[1].outcome, Outcome::Deferred, "{:?}", got[1]);
    assert!(!p.seen.iter().any(|l| l == "QUIT"), "{:?}", p.seen);
    assert!(!p.seen.iter().any(|l| l.contains("c@x")), "{:?}", p.seen);
}

#[tokio::test(flavor = "current_thread")]
async fn without_pipelining_nothing_goes_out_after_the_dot() {
    let (got, p) = play_two(
        PLAIN,
        vec![
            Read("MAIL FROM:<s@remote.test>"),
            Send("250 ok\r\n"),
            Read("RCPT TO:<a@x>"),
            Send("250 ok\r\n"),
            Read("DATA"),
            Send("354 go\r\n"),
            Message,
            Send("250 queued 1\r\n"),
            Read("MAIL FROM:<s@remote.test>"),
            Send("250 ok\r\n"),
            Read("RCPT TO:<b@x>"),
            Send("250 ok\r\n"),
            Read("DATA"),
            Send("354 go\r\n"),
            Message,
            Send("250 queued 2\r\n"),
            Read("QUIT"),
            Send("221 bye\r\n"),
        ],
        env(&["b@x"]),
        None,
    )
    .await;
    assert!(p.finished, "{:?}", p.seen);
    assert!(p.ahead.is_empty(), "sent ahead: {:?}", p.ahead);
    assert_eq!(got[1].reply, "250 queued 2");
}
