//! The knock datagram's parser on any bytes: it must never panic, never read past the
//! input, and never accept a datagram under a key that did not sign it; a datagram it
//! accepts must encode back to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portgate::knock::{self, KEY_BYTES, Key};

fuzz_target!(|data: &[u8]| {
    let Ok(unverified) = knock::parse(data) else {
        return;
    };
    let fields = unverified.knock.clone();
    let key = Key([0x5a; KEY_BYTES]);
    if let Ok(verified) = unverified.verify(&key) {
        // Only a datagram signed with this key verifies; its encoding is the input.
        assert_eq!(knock::encode(&verified, &key).as_deref(), Ok(data));
    }
    // Re-encoding the fields parses back to them.
    if let Ok(again) = knock::encode(&fields, &key) {
        assert_eq!(knock::parse(&again).map(|u| u.knock), Ok(fields));
    }
});
