//! The port sysctls: the kernel's ephemeral port range and its reserved ports.
//!
//! Both are those of the calling thread's network namespace: the kernel resolves
//! `/proc/sys/net` per thread. Reserving reads, adds and writes the value back.

use std::{
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    ops::RangeInclusive,
    path::Path,
};

use super::{HostError, port_ranges::PortRanges};
use crate::paths;

// ---- the ephemeral range ----

/// The ephemeral port range of this thread's network namespace
/// (`net.ipv4.ip_local_port_range`, which IPv6 uses too), as `(low, high)`.
pub fn local_port_range() -> Result<(u16, u16), HostError> {
    let path = Path::new(paths::IP_LOCAL_PORT_RANGE);
    let value = read_sysctl(path)?;
    parse_port_range(&value).ok_or_else(|| HostError::BadPortRange {
        path: path.to_owned(),
        value,
    })
}

fn parse_port_range(value: &str) -> Option<(u16, u16)> {
    let mut fields = value.split_whitespace().map(str::parse::<u16>);
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// The part of the managed range the kernel may also pick ephemeral ports from, as
/// `(low, high)`; `None` when they are apart. There, an outgoing connection can take a port
/// before portgate hands it out, so the daemon warns (or reserves the managed range).
#[must_use]
pub fn ephemeral_overlap(
    managed: RangeInclusive<u16>,
    ephemeral: (u16, u16),
) -> Option<(u16, u16)> {
    let low = (*managed.start()).max(ephemeral.0);
    let high = (*managed.end()).min(ephemeral.1);
    (low <= high).then_some((low, high))
}

// ---- reserved ports ----

/// Adds `range` to this thread's network namespace's reserved ports
/// (`net.ipv4.ip_local_reserved_ports`, which IPv6 uses too), so the kernel never picks them as
/// ephemeral ports, and returns the sub-ranges that were not reserved before: what portgate
/// added, and all that [`unreserve_ports`] should later take away. Already reserved ports
/// are left alone and not returned; when nothing is new, nothing is written.
///
/// Read, add, write: a change another program makes between the read and the write is lost.
/// The kernel offers no compare-and-set here.
pub fn reserve_ports(range: RangeInclusive<u16>) -> Result<Vec<(u16, u16)>, HostError> {
    reserve_ports_at(Path::new(paths::IP_LOCAL_RESERVED_PORTS), range)
}

/// The sub-ranges of `range` that are not reserved yet: what [`reserve_ports`] would add
/// now. Nothing is written (the daemon records them before it reserves them, so that a
/// crash in between cannot leave a reservation nobody knows to give back).
pub fn ports_to_reserve(range: RangeInclusive<u16>) -> Result<Vec<(u16, u16)>, HostError> {
    let current = read_port_ranges(Path::new(paths::IP_LOCAL_RESERVED_PORTS))?;
    Ok(PortRanges::from(range)
        .difference(&current)
        .ranges()
        .to_vec())
}

/// Removes exactly the sub-ranges `added` (as returned by [`reserve_ports`]) from this
/// thread's network namespace's reserved ports, keeping every other reservation. When none
/// of them is reserved any more, nothing is written.
pub fn unreserve_ports(added: &[(u16, u16)]) -> Result<(), HostError> {
    unreserve_ports_at(Path::new(paths::IP_LOCAL_RESERVED_PORTS), added)
}

fn reserve_ports_at(path: &Path, range: RangeInclusive<u16>) -> Result<Vec<(u16, u16)>, HostError> {
    let current = read_port_ranges(path)?;
    let added = PortRanges::from(range).difference(&current);
    if !added.is_empty() {
        write_port_ranges(path, &current.union(&added))?;
    }
    Ok(added.ranges().to_vec())
}

fn unreserve_ports_at(path: &Path, added: &[(u16, u16)]) -> Result<(), HostError> {
    let current = read_port_ranges(path)?;
    let kept = current.difference(&added.iter().copied().collect());
    if kept != current {
        write_port_ranges(path, &kept)?;
    }
    Ok(())
}

fn read_port_ranges(path: &Path) -> Result<PortRanges, HostError> {
    let value = read_sysctl(path)?;
    value.parse().map_err(|source| HostError::BadReservedPorts {
        path: path.to_owned(),
        value,
        source,
    })
}

fn write_port_ranges(path: &Path, ranges: &PortRanges) -> Result<(), HostError> {
    // The newline matters when the list is empty: the kernel ignores an empty write but
    // clears the set on a lone newline.
    write_sysctl(path, &format!("{ranges}\n"))
}

// ---- one sysctl ----

/// The most bytes a sysctl value may hold for portgate to read it: the longest
/// `ip_local_reserved_ports` (a two-port range every third port, `65533-65534,` at 12 bytes
/// each) is 256 KiB.
pub const MAX_SYSCTL_BYTES: usize = 512 * 1024;

/// Reads a sysctl whole, in one `read(2)` from offset 0.
///
/// Some handlers answer a read that does not start at offset 0 with EOF (the reserved
/// ports' does), so a value read in pieces, as `fs::read_to_string` does when the file
/// says its size is 0, comes back cut off without an error. A value that fills the buffer
/// may be cut off the same way, and is refused; a second read must find nothing more.
fn read_sysctl(path: &Path) -> Result<String, HostError> {
    let failed = |source| HostError::ReadSysctl {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(failed)?;
    let mut value = vec![0; MAX_SYSCTL_BYTES];
    let len = file.read(&mut value).map_err(failed)?;
    if len == value.len() || file.read(&mut [0; 1]).map_err(failed)? != 0 {
        return Err(HostError::SysctlTooLong {
            path: path.to_owned(),
            max: MAX_SYSCTL_BYTES,
        });
    }
    value.truncate(len);
    String::from_utf8(value).map_err(|err| failed(io::Error::new(io::ErrorKind::InvalidData, err)))
}

fn write_sysctl(path: &Path, value: &str) -> Result<(), HostError> {
    // Never create: a missing sysctl is an error, not a new file.
    OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut file| file.write_all(value.as_bytes()))
        .map_err(|source| HostError::WriteSysctl {
            path: path.to_owned(),
            value: value.trim_end().to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    // ---- the ephemeral range ----

    #[test]
    fn ephemeral_overlap_is_the_intersection() {
        let ephemeral = (32768, 60999);
        assert_eq!(ephemeral_overlap(20000..=29999, ephemeral), None);
        assert_eq!(ephemeral_overlap(20000..=32767, ephemeral), None);
        assert_eq!(
            ephemeral_overlap(20000..=32768, ephemeral),
            Some((32768, 32768))
        );
        assert_eq!(
            ephemeral_overlap(40000..=50000, ephemeral),
            Some((40000, 50000))
        );
        assert_eq!(
            ephemeral_overlap(60000..=65535, ephemeral),
            Some((60000, 60999))
        );
        assert_eq!(
            ephemeral_overlap(0..=65535, ephemeral),
            Some((32768, 60999))
        );
        assert_eq!(ephemeral_overlap(61000..=65535, ephemeral), None);
        #[expect(
            clippy::reversed_empty_ranges,
            reason = "an empty range is the case under test"
        )]
        let empty = 50000..=40000;
        assert_eq!(ephemeral_overlap(empty, ephemeral), None);
    }

    #[test]
    fn port_range_values_parse() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 1024"), Some((1024, 1024)));
        for bad in [
            "",
            "32768",
            "32768 60999 1",
            "60999 32768",
            "a b",
            "0 65536",
        ] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn local_port_range_reads_this_namespace() {
        let (low, high) = local_port_range().expect("the ephemeral port range");
        assert!(low <= high);
    }

    // ---- reserved ports, on a plain file standing in for the sysctl ----

    fn stand_in(value: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        fs::write(file.path(), value).expect("write the stand-in");
        file
    }

    fn contents(file: &tempfile::NamedTempFile) -> String {
        fs::read_to_string(file.path()).expect("read the stand-in")
    }

    #[test]
    fn reserve_returns_only_what_it_added_and_unreserve_removes_only_that() {
        let file = stand_in("8080,20050-20060\n");
        let added = reserve_ports_at(file.path(), 20000..=20100).expect("reserve");
        assert_eq!(added, [(20000, 20049), (20061, 20100)]);
        assert_eq!(contents(&file), "8080,20000-20100\n");

        assert_eq!(
            reserve_ports_at(file.path(), 20000..=20100).expect("reserve again"),
            []
        );

        unreserve_ports_at(file.path(), &added).expect("unreserve");
        assert_eq!(contents(&file), "8080,20050-20060\n");
    }

    #[test]
    fn reserve_writes_nothing_when_nothing_is_new() {
        let file = stand_in("20000-29999");
        assert_eq!(
            reserve_ports_at(file.path(), 20000..=20100).expect("reserve"),
            []
        );
        // Unchanged, not even rewritten in the canonical form.
        assert_eq!(contents(&file), "20000-29999");
        unreserve_ports_at(file.path(), &[(1, 2)]).expect("unreserve");
        assert_eq!(contents(&file), "20000-29999");
    }

    #[test]
    fn unreserving_everything_writes_a_lone_newline() {
        let file = stand_in("\n");
        let added = reserve_ports_at(file.path(), 65535..=65535).expect("reserve");
        assert_eq!(added, [(65535, 65535)]);
        assert_eq!(contents(&file), "65535\n");
        unreserve_ports_at(file.path(), &added).expect("unreserve");
        assert_eq!(contents(&file), "\n");
    }

    #[test]
    fn reserve_refuses_a_value_it_cannot_parse() {
        let file = stand_in("8080,oops\n");
        let err = reserve_ports_at(file.path(), 1..=2).expect_err("bad value");
        assert!(
            matches!(&err, HostError::BadReservedPorts { value, .. } if value == "8080,oops\n"),
            "{err:?}"
        );
        assert_eq!(contents(&file), "8080,oops\n");
    }

    #[test]
    fn a_sysctl_too_long_to_read_whole_is_refused() {
        let file = stand_in(&"1,".repeat(MAX_SYSCTL_BYTES / 2));
        let err = read_sysctl(file.path()).expect_err("too long");
        assert!(matches!(err, HostError::SysctlTooLong { .. }), "{err:?}");
        let fits = "1,".repeat(MAX_SYSCTL_BYTES / 2 - 1);
        assert_eq!(read_sysctl(stand_in(&fits).path()).expect("fits"), fits);
    }

    #[test]
    fn reserve_reports_a_missing_file() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("missing");
        let err = reserve_ports_at(&path, 1..=2).expect_err("no file");
        assert!(matches!(err, HostError::ReadSysctl { .. }), "{err:?}");
        assert!(!path.exists());
    }
}
