//! The IMAP framer and parser on arbitrary server bytes, cut into reads at
//! arbitrary points: no panic, no unbounded growth (the framer's limits),
//! and the same frames whatever the cuts.
#![no_main]

use bytes::BytesMut;
use imapull::imap::response::{parse, Framer};
use libfuzzer_sys::fuzz_target;

fn frames(input: &[u8], cut: usize) -> Vec<Vec<u8>> {
    let mut framer = Framer::new(64);
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    for chunk in input.chunks(cut.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            match framer.next(&mut buf) {
                Ok(Some(f)) => {
                    let _ = parse(&f);
                    out.push(f.bytes.to_vec());
                }
                Ok(None) => break,
                Err(_) => return out,
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, input)) = data.split_first() else {
        return;
    };
    let whole = frames(input, input.len());
    let cut_up = frames(input, usize::from(cut % 17) + 1);
    assert_eq!(whole, cut_up);
});
