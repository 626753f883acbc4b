//! How the verbs print values for people, so that every verb prints them alike.

use std::{
    fmt::Write as _,
    time::{Duration, UNIX_EPOCH},
};

use serde::Serialize;

use crate::model::{Allowlist, PortId, UnixMillis};

/// Prints `value` as indented JSON on stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// A time as RFC 3339 in UTC, to the second.
#[must_use]
pub fn time(at: UnixMillis) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at)).to_string()
}

/// A duration to the second ("5m", "1h 2m 3s").
#[must_use]
pub fn duration(length: Duration) -> String {
    humantime::format_duration(Duration::from_secs(length.as_secs())).to_string()
}

/// The time left until `at`, rounded up to the second; "expired" once it has passed.
#[must_use]
pub fn remaining(at: UnixMillis, now: UnixMillis) -> String {
    match at.checked_sub(now) {
        Some(left) if left > 0 => duration(Duration::from_secs(left.div_ceil(1000))),
        _ => "expired".to_owned(),
    }
}

/// A deadline and the time left: "2024-05-01T12:00:00Z (in 5m)", or "(expired)".
#[must_use]
pub fn expiry(at: UnixMillis, now: UnixMillis) -> String {
    if at > now {
        format!("{} (in {})", time(at), remaining(at, now))
    } else {
        format!("{} (expired)", time(at))
    }
}

/// An allowlist in a table cell: "any" when empty, the first prefixes and a count after.
#[must_use]
pub fn allow_cell(allow: &Allowlist) -> String {
    let mut prefixes = allow.iter();
    match (prefixes.next(), prefixes.next(), allow.len()) {
        (None, _, _) => "any".to_owned(),
        (Some(one), None, _) => one.to_string(),
        (Some(one), Some(two), 2) => format!("{one},{two}"),
        (Some(first), _, len) => format!("{first} +{} more", len - 1),
    }
}

/// A connection limit, `unlimited` for 0 ("-" in tables, "unlimited" in prose).
#[must_use]
pub fn limit(max_connections: u32, unlimited: &str) -> String {
    if max_connections == 0 {
        unlimited.to_owned()
    } else {
        max_connections.to_string()
    }
}

/// "yes" or "no".
#[must_use]
pub const fn yes_no(flag: bool) -> &'static str {
    if flag { "yes" } else { "no" }
}

/// A port in a sentence: `80/tcp`, or `80/tcp in netns web1` in another namespace than the
/// host's (named by `netns_label`, else by its cookie).
#[must_use]
pub fn port(id: PortId, netns_label: Option<&str>) -> String {
    let mut text = format!("{}/{}", id.port, id.protocol);
    if !id.netns.is_host() {
        let _infallible = write!(text, " in netns {}", id.netns.name(netns_label));
    }
    text
}

/// `key: value` lines with the values aligned.
#[must_use]
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let width = pairs
        .iter()
        .map(|(key, _)| key.len() + 1)
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in pairs {
        let key = format!("{key}:");
        // Writing to a String cannot fail.
        let _infallible = writeln!(out, "{key:<width$}  {value}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{allow_cell, expiry, key_values, port, remaining, time};
    use crate::model::{Allowlist, NetnsId, PortId, Protocol};

    #[test]
    fn times_and_durations_read_as_people_write_them() {
        assert_eq!(time(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(remaining(1_000_300_000, 1_000_000_001), "5m");
        assert_eq!(remaining(1_000, 2_000), "expired");
        assert_eq!(
            expiry(1_700_000_000_000, 1_699_999_999_000),
            "2023-11-14T22:13:20Z (in 1s)"
        );
        assert_eq!(
            expiry(1_700_000_000_000, 1_700_000_000_000),
            "2023-11-14T22:13:20Z (expired)"
        );
    }

    #[test]
    fn long_allowlists_are_shortened() {
        let allow = |prefixes: &[&str]| -> Allowlist {
            prefixes
                .iter()
                .map(|p| p.parse().expect("a prefix"))
                .collect()
        };
        assert_eq!(allow_cell(&allow(&[])), "any");
        assert_eq!(allow_cell(&allow(&["10.0.0.0/8"])), "10.0.0.0/8");
        assert_eq!(
            allow_cell(&allow(&["10.0.0.0/8", "192.168.0.0/16"])),
            "10.0.0.0/8,192.168.0.0/16"
        );
        assert_eq!(
            allow_cell(&allow(&["10.0.0.0/8", "192.168.0.0/16", "::1/128"])),
            "10.0.0.0/8 +2 more"
        );
    }

    #[test]
    fn key_values_align() {
        assert_eq!(
            key_values(&[
                ("port", "20001".to_owned()),
                ("status", "active".to_owned())
            ]),
            "port:    20001\nstatus:  active\n"
        );
    }

    #[test]
    fn ports_name_their_namespace_unless_it_is_the_hosts() {
        let host = PortId::new(80, Protocol::Udp);
        let inside = PortId {
            netns: NetnsId(4097),
            ..PortId::new(80, Protocol::Tcp)
        };
        assert_eq!(port(host, Some("ignored")), "80/udp");
        assert_eq!(port(inside, Some("web1")), "80/tcp in netns web1");
        assert_eq!(port(inside, None), "80/tcp in netns 4097");
        assert_eq!(host.cli_args(None), "80 --proto udp");
        assert_eq!(inside.cli_args(Some("web1")), "80 --netns web1");
    }
}
