//! The knock datagram: a round trip, every refusal of a malformed or tampered datagram, and
//! the replay cache.

use std::{net::IpAddr, time::Duration};

use super::{
    GrantFor, KEY_BYTES, Key, KeyFile, KeyFileError, Knock, KnockError, KnockRequest, MAX_BYTES,
    MAX_KEY_NAME, MIN_BYTES, Refused, ReplayCache, encode, knock as send_knock, parse,
    valid_key_name,
};
use crate::model::Protocol;

fn key(byte: u8) -> Key {
    Key([byte; KEY_BYTES])
}

fn knock(name: &str, address: Option<&str>) -> Knock {
    Knock {
        key_name: name.to_owned(),
        protocol: Protocol::Tcp,
        port: 21_022,
        ttl: Duration::from_mins(5),
        timestamp: 1_800_000_000,
        nonce: [7; 16],
        address: address.map(|a| a.parse::<IpAddr>().expect("address")),
    }
}

#[test]
fn a_knock_round_trips_under_its_key_in_every_address_form() {
    for address in [None, Some("192.0.2.7"), Some("2001:db8::7")] {
        let sent = knock("alice", address);
        let bytes = encode(&sent, &key(1)).expect("encode");
        let received = parse(&bytes).expect("parse");
        assert_eq!(received.knock, sent, "fields before the check");
        assert_eq!(received.verify(&key(1)).expect("verify"), sent);
    }
}

#[test]
fn sizes_are_the_documented_ones() {
    let shortest = encode(&knock("a", None), &key(1)).expect("encode");
    assert_eq!(shortest.len(), MIN_BYTES);
    assert_eq!(MIN_BYTES, 67);
    let longest = encode(
        &knock(&"n".repeat(MAX_KEY_NAME), Some("2001:db8::1")),
        &key(1),
    )
    .expect("encode");
    assert_eq!(longest.len(), MAX_BYTES);
    assert_eq!(MAX_BYTES, 146);
}

#[test]
fn another_key_or_any_flipped_bit_fails_the_signature() {
    let bytes = encode(&knock("alice", Some("192.0.2.7")), &key(1)).expect("encode");
    assert_eq!(
        parse(&bytes).expect("parse").verify(&key(2)),
        Err(KnockError::BadSignature("alice".to_owned()))
    );
    for byte in 0..bytes.len() {
        for bit in 0..8 {
            let mut flipped = bytes.clone();
            flipped[byte] ^= 1 << bit;
            let outcome = parse(&flipped).and_then(|unverified| unverified.verify(&key(1)));
            assert!(
                outcome.is_err(),
                "bit {bit} of byte {byte} flipped and still accepted"
            );
        }
    }
}

#[test]
fn truncated_oversized_and_malformed_datagrams_are_refused_by_name() {
    let bytes = encode(&knock("alice", None), &key(1)).expect("encode");
    for len in 0..bytes.len() {
        let refused = parse(&bytes[..len]).expect_err("a prefix is refused");
        assert!(
            matches!(refused, KnockError::Truncated(_) | KnockError::Malformed(_)),
            "{len} bytes: {refused:?}"
        );
    }
    let mut long = bytes.clone();
    long.resize(MAX_BYTES + 1, 0);
    assert_eq!(parse(&long), Err(KnockError::Oversized(MAX_BYTES + 1)));
    // One byte more than the fields: refused, not ignored.
    let mut extra = bytes[..bytes.len() - 32].to_vec();
    extra.push(0);
    extra.extend_from_slice(&bytes[bytes.len() - 32..]);
    assert_eq!(
        parse(&extra)
            .map(|u| u.knock)
            .expect_err("trailing byte")
            .reason(),
        "malformed"
    );
    let mut version = bytes.clone();
    version[0] = 2;
    assert_eq!(
        parse(&version).map(|u| u.knock),
        Err(KnockError::Version(2))
    );
    let mut protocol = bytes.clone();
    protocol[2 + 5] = 1;
    assert_eq!(
        parse(&protocol).map(|u| u.knock),
        Err(KnockError::Malformed("protocol"))
    );
}

#[test]
fn what_the_format_cannot_carry_is_not_encoded() {
    let mut bad = knock("alice", None);
    bad.key_name = "al ice".to_owned();
    assert!(encode(&bad, &key(1)).is_err());
    let mut bad = knock("alice", None);
    bad.port = 0;
    assert!(encode(&bad, &key(1)).is_err());
    let mut bad = knock("alice", None);
    bad.ttl = Duration::from_millis(500);
    assert!(encode(&bad, &key(1)).is_err());
    assert!(valid_key_name("web-1.prod_a"));
    assert!(!valid_key_name(""));
    assert!(!valid_key_name(&"n".repeat(MAX_KEY_NAME + 1)));
    assert!(!valid_key_name("é"));
}

#[test]
fn the_replay_cache_refuses_a_nonce_seen_inside_the_window_and_stale_or_future_times() {
    let now = 1_000;
    let mut cache = ReplayCache::new(30, 3, 3);
    assert_eq!(cache.admit("a", [1; 16], now, now), Ok(()));
    assert_eq!(cache.admit("a", [1; 16], now, now), Err(Refused::Replayed));
    assert_eq!(
        cache.admit("b", [1; 16], now, now),
        Ok(()),
        "another key's nonce"
    );
    assert_eq!(
        cache.admit("a", [2; 16], now - 31, now),
        Err(Refused::Stale)
    );
    assert_eq!(
        cache.admit("a", [2; 16], now + 31, now),
        Err(Refused::Future)
    );
    assert_eq!(
        cache.admit("a", [2; 16], now - 30, now),
        Ok(()),
        "the window's edge"
    );
    assert_eq!(cache.admit("a", [3; 16], now, now), Err(Refused::Full));
    assert_eq!(cache.len(), 3);
    // Once their timestamps have left the window they are forgotten (and stale anyway).
    assert_eq!(cache.admit("a", [3; 16], now + 31, now + 31), Ok(()));
    assert_eq!(
        cache.len(),
        1,
        "the three before went as their timestamps left the window"
    );
    assert_eq!(
        cache.admit("a", [1; 16], now, now + 31),
        Err(Refused::Stale)
    );
}

#[test]
fn the_replay_cache_refuses_a_keys_knocks_up_to_its_last_before_a_restart_and_holds_a_share_per_key()
 {
    let now = 1_000;
    let mut cache = ReplayCache::new(30, 4, 2);
    cache.set_floor("a", now - 5);
    assert_eq!(
        cache.admit("a", [1; 16], now - 5, now),
        Err(Refused::BeforeRestart),
        "a knock the daemon before this one may have taken"
    );
    assert_eq!(
        cache.admit("b", [1; 16], now - 5, now),
        Ok(()),
        "another key's"
    );
    assert_eq!(cache.admit("a", [1; 16], now - 4, now), Ok(()));
    assert_eq!(cache.admit("a", [2; 16], now, now), Ok(()));
    assert_eq!(
        cache.admit("a", [3; 16], now, now),
        Err(Refused::Full),
        "the key's share is used"
    );
    assert_eq!(
        cache.admit("c", [3; 16], now, now),
        Ok(()),
        "another key still gets in"
    );
}

#[test]
fn a_wall_clock_stepped_back_does_not_bring_a_forgotten_nonce_back() {
    let mut cache = ReplayCache::new(30, 8, 8);
    assert_eq!(cache.admit("a", [1; 16], 1_000, 1_000), Ok(()));
    // Forgotten once its timestamp leaves the window...
    assert_eq!(cache.admit("a", [2; 16], 1_040, 1_040), Ok(()));
    assert_eq!(cache.len(), 1);
    // ...and refused as stale even when the clock then says an earlier time.
    assert_eq!(cache.admit("a", [1; 16], 1_000, 1_005), Err(Refused::Stale));
    assert!(cache.clock_behind(1_005), "and the step back is seen");
    assert!(!cache.clock_behind(1_035));
}

#[test]
fn a_wider_window_keeps_the_nonces_it_holds_and_takes_none_it_forgot() {
    let mut cache = ReplayCache::new(30, 8, 8);
    assert_eq!(cache.admit("a", [1; 16], 1_000, 1_000), Ok(()));
    assert_eq!(
        cache.admit("a", [2; 16], 1_040, 1_040),
        Ok(()),
        "forgets [1]"
    );
    cache.set_window(120);
    assert_eq!(
        cache.admit("a", [2; 16], 1_040, 1_100),
        Err(Refused::Replayed),
        "still inside the new window, so still remembered"
    );
    assert_eq!(
        cache.admit("a", [1; 16], 1_000, 1_100),
        Err(Refused::Stale),
        "forgotten under the narrower window: not taken under the wider one"
    );
}

#[test]
fn a_key_never_prints() {
    assert_eq!(format!("{:?}", key(9)), "Key(..)");
    assert_ne!(Key::generate(), Key::generate());
}

#[test]
fn a_key_file_round_trips_and_bad_ones_are_refused_by_cause() {
    let file = KeyFile {
        name: "alice".to_owned(),
        key: Key::generate(),
        any_source: false,
    };
    let text = file.to_text();
    assert!(text.starts_with("# portgate key file"));
    assert!(!text.contains("any_source"), "written only when set");
    assert_eq!(KeyFile::parse(&text).expect("parse"), file);
    let natted = KeyFile {
        any_source: true,
        ..file
    };
    assert_eq!(KeyFile::parse(&natted.to_text()).expect("parse"), natted);
    assert!(matches!(
        KeyFile::parse("name = \"al ice\"\nkey = \"00\""),
        Err(KeyFileError::Name(_))
    ));
    assert!(matches!(
        KeyFile::parse("name = \"alice\"\nkey = \"abcd\""),
        Err(KeyFileError::Key)
    ));
    assert!(matches!(
        KeyFile::parse("name = \"alice\"\nkey = \"zz\"\nextra = 1"),
        Err(KeyFileError::Syntax(_))
    ));
}

#[test]
fn a_knock_sent_to_loopback_arrives_signed_as_sent() {
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let file = KeyFile {
        name: "alice".to_owned(),
        key: key(3),
        any_source: false,
    };
    let request = KnockRequest {
        protocol: Protocol::Udp,
        port: 5353,
        ttl: Duration::from_secs(90),
        grant_for: GrantFor::ThisHost,
    };
    let sent = send_knock(listener.local_addr().expect("addr"), &file, &request).expect("send");
    let mut buffer = [0; 512];
    let (len, _) = listener.recv_from(&mut buffer).expect("a datagram");
    let received = parse(&buffer[..len])
        .and_then(|unverified| unverified.verify(&key(3)))
        .expect("valid");
    assert_eq!(received, sent);
    assert_eq!((received.port, received.protocol), (5353, Protocol::Udp));
    assert_eq!(
        received.address,
        Some("127.0.0.1".parse().unwrap()),
        "this host's address on the way, signed"
    );
}

#[test]
fn datagrams_made_from_the_documented_layout_by_another_program_verify() {
    // Written by a Python script from docs/knock.md alone (the fuzz target's seeds), signed
    // with the key of 32 bytes 0x5a.
    let key = Key([0x5a; KEY_BYTES]);
    let v4 = include_bytes!("../../../fuzz/seeds/knock_datagram/signed_v4");
    let knock = parse(v4).and_then(|u| u.verify(&key)).expect("valid");
    assert_eq!(knock.key_name, "alice");
    assert_eq!((knock.port, knock.protocol), (5432, Protocol::Tcp));
    assert_eq!(knock.ttl, Duration::from_mins(5));
    assert_eq!(knock.timestamp, 1_800_000_000);
    assert_eq!(knock.address, Some("192.0.2.7".parse().expect("address")));
    let longest = include_bytes!("../../../fuzz/seeds/knock_datagram/signed_v6");
    assert_eq!(longest.len(), MAX_BYTES);
    parse(longest).and_then(|u| u.verify(&key)).expect("valid");
}
