//! Fuzzes the protocol parser and checks the framing invariants the connection relies on:
//! progress, bounded buffering, prefix stability, and limits on what a command may carry.
#![no_main]

use cache_node::protocol::{self, Command, Frame, Limits, MAX_KEY_LEN};
use libfuzzer_sys::fuzz_target;

const LIMITS: Limits = Limits { max_item_size: 64, max_line: 128, max_get_line: 256 };

fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.iter().all(|&b| b > 0x20 && b != 0x7f)
}

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while !buf.is_empty() {
        let Some((frame, used)) = protocol::parse(buf, &LIMITS) else {
            // Waiting for more bytes is only allowed while the buffered input is within the
            // longest line plus the largest data block: memory stays bounded.
            assert!(buf.len() <= LIMITS.max_get_line + LIMITS.max_item_size + 2 + 16, "unbounded wait");
            return;
        };
        assert!(used > 0 && used <= buf.len(), "consumed {used} of {}", buf.len());
        // The frame must not depend on bytes after the ones it consumed.
        if !matches!(frame, Frame::Close(_)) {
            let again = protocol::parse(&buf[..used], &LIMITS).map(|(f, n)| (f, n));
            assert_eq!(again, Some((frame.clone(), used)), "framing depends on later bytes");
        }
        match &frame {
            Frame::Command(Command::Store { key, data, .. }) => {
                assert!(valid_key(key));
                assert!(protocol::item_size(key.len(), data.len()) <= LIMITS.max_item_size);
            }
            Frame::Command(Command::Get { keys, touch, .. }) => {
                // `gat <exptime>` alone is a retrieval of no key, as in memcached.
                let keys: Vec<_> = keys.iter().collect();
                assert!((touch.is_some() || !keys.is_empty()) && keys.iter().all(|k| valid_key(k)));
            }
            Frame::Command(Command::Delete { key, .. } | Command::Arith { key, .. } | Command::Touch { key, .. }) => {
                assert!(valid_key(key));
            }
            Frame::Swallow { bytes, .. } => assert!(*bytes >= 2),
            _ => {}
        }
        if matches!(frame, Frame::Close(_) | Frame::Hangup) {
            return;
        }
        buf = &buf[used..];
    }
});
