//! The host's port facts: live sockets (procfs), the kernel's ephemeral port range and its
//! reserved ports.
//!
//! Everything here reads (and, for the reserved ports, writes) the network namespace of the
//! calling thread: the socket tables through `/proc/thread-self/net`, the sysctls through
//! `/proc/sys/net`, which the kernel resolves per thread.

use std::{
    collections::BTreeSet,
    fmt,
    fs::{File, OpenOptions},
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
    path::{Path, PathBuf},
    str::FromStr,
};

use procfs::{
    FromReadSI, ProcError,
    net::{TcpNetEntries, TcpNetEntry, TcpState, UdpNetEntries, UdpNetEntry},
};

use crate::{paths, policy::Protocol};

/// A problem reading or changing the host's port facts.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A socket table under `/proc/thread-self/net` could not be read or parsed.
    #[error("reading the socket table {path}: {source}; portgate needs procfs mounted at /proc")]
    SocketTable {
        /// The table read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ProcError,
    },
    /// A sysctl file could not be read.
    #[error("reading {path}: {source}; portgate needs procfs mounted at /proc")]
    ReadSysctl {
        /// The file read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A sysctl holds more than portgate reads in one go.
    #[error(
        "{path} holds more than {max} bytes, more than portgate reads: shorten the value \
         (merge neighbouring ports into ranges)"
    )]
    SysctlTooLong {
        /// The file read.
        path: PathBuf,
        /// The most bytes read.
        max: usize,
    },
    /// A sysctl file could not be written.
    #[error(
        "writing {value:?} to {path}: {source}; run portgate as root (CAP_NET_ADMIN over its \
         network namespace) with /proc/sys mounted read-write"
    )]
    WriteSysctl {
        /// The file written.
        path: PathBuf,
        /// What was being written.
        value: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The ephemeral port range is not two ports, low then high.
    #[error(
        "{path} holds {value:?}, not two ports low then high: set it with \
         `sysctl -w net.ipv4.ip_local_port_range=\"32768 60999\"`"
    )]
    BadPortRange {
        /// The file read.
        path: PathBuf,
        /// What it held.
        value: String,
    },
    /// The reserved ports are not a list of ports and ranges.
    #[error(
        "{path} holds {value:?}: {source}; set it to a valid list with \
         `sysctl -w net.ipv4.ip_local_reserved_ports=...`"
    )]
    BadReservedPorts {
        /// The file read.
        path: PathBuf,
        /// What it held.
        value: String,
        /// What is wrong with it.
        #[source]
        source: ParsePortRangesError,
    },
}

// ---- live sockets ----

/// A socket that takes traffic on a local port: a TCP socket in LISTEN, or a bound UDP socket.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Listener {
    /// The local port.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The local address (`0.0.0.0` or `::` when bound to every address).
    pub addr: IpAddr,
    /// The socket owner's uid.
    pub uid: u32,
    /// The socket's inode, which `/proc/<pid>/fd` links name as `socket:[inode]`: the way
    /// to find the process holding it.
    pub inode: u64,
}

/// The local ports in `range` that a `protocol` socket holds, in this thread's network
/// namespace, from the IPv4 and IPv6 socket tables.
///
/// For TCP every entry counts, whatever its state: `LISTEN`, `ESTABLISHED` and the closing
/// states, `SYN_RECV` and `TIME_WAIT` all keep the port from a new plain `bind()`
/// (`EADDRINUSE`), and a port in use locally is not free to hand out. For UDP every entry is
/// a bound socket, connected or not.
///
/// Not seen: a TCP socket that is bound but neither listening nor connected. The kernel's
/// table lists only its listening and established hashes, not the bind hash, so such a
/// socket holds its port invisibly; a failed `bind()` stays the final word.
///
/// Cost: the kernel's, almost all of it. Each TCP table is a walk of the whole established
/// hash, however few sockets it holds (262144 buckets on a 24 GiB host: about 1 ms a table),
/// plus about 0.6 µs a row to print and 0.35 µs to parse; the UDP tables are quick when
/// small but grow faster than linearly (each page of output restarts the kernel's walk).
/// Measured: TCP 2.2 ms with 1 socket, 3.2 ms with 1000, 13 ms with 10000; UDP 0.04 ms with
/// none, 1.3 ms with 1000, 9 ms with 4000. Fine once per allocation; to place many ports,
/// call once with the whole range and pick from the set.
pub fn bound_ports(
    protocol: Protocol,
    range: RangeInclusive<u16>,
) -> Result<BTreeSet<u16>, HostError> {
    Ok(ports_in(&sockets(protocol)?, &range))
}

/// The listeners on ports in `range`, in this thread's network namespace, sorted: TCP sockets
/// in LISTEN and every bound UDP socket (a connected one too: it still receives on its port).
pub fn listeners(
    protocol: Protocol,
    range: RangeInclusive<u16>,
) -> Result<Vec<Listener>, HostError> {
    Ok(listeners_in(&sockets(protocol)?, protocol, &range))
}

/// One socket-table row, reduced to what portgate asks of it.
#[derive(Clone, Copy, Debug)]
struct Socket {
    local: SocketAddr,
    listening: bool,
    uid: u32,
    inode: u64,
}

impl From<TcpNetEntry> for Socket {
    fn from(entry: TcpNetEntry) -> Self {
        Self {
            local: entry.local_address,
            listening: entry.state == TcpState::Listen,
            uid: entry.uid,
            inode: entry.inode,
        }
    }
}

impl From<UdpNetEntry> for Socket {
    fn from(entry: UdpNetEntry) -> Self {
        Self {
            local: entry.local_address,
            // UDP has no listen(): a socket in the table is bound and receives.
            listening: true,
            uid: entry.uid,
            inode: entry.inode,
        }
    }
}

fn sockets(protocol: Protocol) -> Result<Vec<Socket>, HostError> {
    let mut sockets = Vec::new();
    match protocol {
        Protocol::Tcp => {
            for (path, ipv6) in [(paths::PROC_NET_TCP, false), (paths::PROC_NET_TCP6, true)] {
                if let Some(TcpNetEntries(entries)) = read_table(path, ipv6)? {
                    sockets.extend(entries.into_iter().map(Socket::from));
                }
            }
        }
        Protocol::Udp => {
            for (path, ipv6) in [(paths::PROC_NET_UDP, false), (paths::PROC_NET_UDP6, true)] {
                if let Some(UdpNetEntries(entries)) = read_table(path, ipv6)? {
                    sockets.extend(entries.into_iter().map(Socket::from));
                }
            }
        }
    }
    Ok(sockets)
}

/// Reads and parses one socket table with procfs's parser. `None` when an `ipv6` table does
/// not exist: IPv6 is disabled, so there are no such sockets.
///
/// No bigger read buffer than procfs's: the kernel hands out a socket table at most a page
/// per `read()` whatever the buffer, and 8 KiB, 64 KiB and 256 KiB buffers timed the same.
fn read_table<T: FromReadSI>(path: &str, ipv6: bool) -> Result<Option<T>, HostError> {
    let table_error = |source| HostError::SocketTable {
        path: PathBuf::from(path),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if ipv6 && err.kind() == io::ErrorKind::NotFound => {
            return Ok(None);
        }
        Err(err) => return Err(table_error(ProcError::from(err))),
    };
    T::from_read(file, procfs::current_system_info())
        .map(Some)
        .map_err(table_error)
}

fn ports_in(sockets: &[Socket], range: &RangeInclusive<u16>) -> BTreeSet<u16> {
    sockets
        .iter()
        .map(|socket| socket.local.port())
        .filter(|port| range.contains(port))
        .collect()
}

fn listeners_in(
    sockets: &[Socket],
    protocol: Protocol,
    range: &RangeInclusive<u16>,
) -> Vec<Listener> {
    let mut found: Vec<Listener> = sockets
        .iter()
        .filter(|socket| socket.listening && range.contains(&socket.local.port()))
        .map(|socket| Listener {
            port: socket.local.port(),
            protocol,
            addr: socket.local.ip(),
            uid: socket.uid,
            inode: socket.inode,
        })
        .collect();
    found.sort_unstable();
    found
}

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

// ---- PortRanges ----

/// A set of ports as sorted, disjoint, non-adjacent inclusive ranges, written the kernel's
/// way: `8080,20000-29999` (empty when there are none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortRanges(Vec<(u16, u16)>);

impl PortRanges {
    /// No ports.
    #[must_use]
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// The ranges, `(first, last)`, sorted, apart from each other.
    #[must_use]
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }

    /// Whether there are no ports.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `port` is in the set.
    #[must_use]
    pub fn contains(&self, port: u16) -> bool {
        let after = self.0.partition_point(|&(first, _)| first <= port);
        after > 0 && self.0[after - 1].1 >= port
    }

    /// Whether any port of `range` is in the set (never, for an empty range).
    #[must_use]
    pub fn overlaps(&self, range: RangeInclusive<u16>) -> bool {
        let (low, high) = (*range.start(), *range.end());
        low <= high
            && self
                .0
                .iter()
                .any(|&(first, last)| first <= high && last >= low)
    }

    /// The ports in either set.
    #[must_use]
    pub fn union(&self, other: &Self) -> Self {
        self.0.iter().chain(&other.0).copied().collect()
    }

    /// The ports in this set and not in `other`.
    #[must_use]
    pub fn difference(&self, other: &Self) -> Self {
        let mut left = Vec::new();
        // `other`'s ranges ending before the current range starts; both sets are sorted.
        let mut skip = 0;
        for &(first, last) in &self.0 {
            while other.0.get(skip).is_some_and(|&(_, end)| end < first) {
                skip += 1;
            }
            // The first port of this range not yet known to be kept or removed.
            let mut next = Some(first);
            for &(start, end) in &other.0[skip..] {
                let Some(from) = next else { break };
                if start > last {
                    break;
                }
                if start > from {
                    left.push((from, start - 1));
                }
                next = end.checked_add(1).filter(|&port| port <= last);
            }
            if let Some(from) = next {
                left.push((from, last));
            }
        }
        Self(left)
    }
}

impl From<RangeInclusive<u16>> for PortRanges {
    fn from(range: RangeInclusive<u16>) -> Self {
        std::iter::once(range).collect()
    }
}

/// Collects ranges in any order, overlapping or not; empty ranges (`start > end`) add nothing.
impl FromIterator<RangeInclusive<u16>> for PortRanges {
    fn from_iter<I: IntoIterator<Item = RangeInclusive<u16>>>(iter: I) -> Self {
        iter.into_iter()
            .map(|range| (*range.start(), *range.end()))
            .collect()
    }
}

/// Collects `(first, last)` pairs in any order, overlapping or not; a pair with
/// `first > last` is an empty range and adds nothing.
impl FromIterator<(u16, u16)> for PortRanges {
    fn from_iter<I: IntoIterator<Item = (u16, u16)>>(iter: I) -> Self {
        let mut ranges: Vec<(u16, u16)> = iter
            .into_iter()
            .filter(|&(first, last)| first <= last)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (first, last) in ranges {
            match merged.last_mut() {
                // Overlapping or adjacent (in u32: `last + 1` may be 65536).
                Some(previous) if u32::from(first) <= u32::from(previous.1) + 1 => {
                    previous.1 = previous.1.max(last);
                }
                _ => merged.push((first, last)),
            }
        }
        Self(merged)
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, &(first, last)) in self.0.iter().enumerate() {
            if index > 0 {
                f.write_str(",")?;
            }
            if first == last {
                write!(f, "{first}")?;
            } else {
                write!(f, "{first}-{last}")?;
            }
        }
        Ok(())
    }
}

/// Parses the kernel's format: ports and `first-last` ranges separated by commas, in any
/// order, overlapping or not. Surrounding whitespace (the trailing newline) and spaces around
/// items are ignored; an empty string is the empty set.
impl FromStr for PortRanges {
    type Err = ParsePortRangesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Ok(Self::new());
        }
        s.split(',')
            .map(|item| parse_item(s, item.trim()))
            .collect::<Result<Vec<(u16, u16)>, _>>()
            .map(|ranges| ranges.into_iter().collect())
    }
}

fn parse_item(whole: &str, item: &str) -> Result<(u16, u16), ParsePortRangesError> {
    if item.is_empty() {
        return Err(ParsePortRangesError::EmptyItem {
            list: whole.to_owned(),
        });
    }
    let (first, last) = if let Some((low, high)) = item.split_once('-') {
        (parse_port(low.trim())?, parse_port(high.trim())?)
    } else {
        let port = parse_port(item)?;
        (port, port)
    };
    if first > last {
        return Err(ParsePortRangesError::Backwards { first, last });
    }
    Ok((first, last))
}

fn parse_port(text: &str) -> Result<u16, ParsePortRangesError> {
    let not_a_port = || ParsePortRangesError::NotAPort {
        text: text.to_owned(),
    };
    // Digits only: `u16::from_str` would also take a leading `+`.
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(not_a_port());
    }
    text.parse().map_err(|_| not_a_port())
}

/// What is wrong with a written list of ports and ranges.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParsePortRangesError {
    /// Two commas in a row, or one at either end.
    #[error(
        "empty item in {list:?}: separate ports and ranges with single commas, as in \
         \"8080,20000-29999\""
    )]
    EmptyItem {
        /// The whole list.
        list: String,
    },
    /// Something that is not a port number where one belongs.
    #[error("{text:?} is not a port: write a whole number from 0 to 65535")]
    NotAPort {
        /// The text found.
        text: String,
    },
    /// A range whose first port is above its last.
    #[error("range {first}-{last} is backwards: write it as {last}-{first}")]
    Backwards {
        /// The first port written.
        first: u16,
        /// The last port written.
        last: u16,
    },
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        net::{Ipv4Addr, TcpListener, UdpSocket},
    };

    use super::*;

    fn ranges(text: &str) -> PortRanges {
        text.parse()
            .unwrap_or_else(|err| panic!("parsing {text:?}: {err}"))
    }

    // ---- PortRanges ----

    #[test]
    fn port_ranges_parse_and_format_round_trip() {
        for text in [
            "",
            "0",
            "8080",
            "8080,20000-29999",
            "1-2,4,6-65535",
            "65535",
        ] {
            assert_eq!(ranges(text).to_string(), text);
        }
    }

    #[test]
    fn port_ranges_ignore_surrounding_whitespace() {
        assert!(ranges("\n").is_empty());
        assert!(ranges("  \t\n").is_empty());
        assert_eq!(ranges("8080,20000-29999\n").to_string(), "8080,20000-29999");
        assert_eq!(
            ranges(" 8080 , 20000 - 29999 ").to_string(),
            "8080,20000-29999"
        );
    }

    #[test]
    fn port_ranges_merge_overlapping_and_adjacent_ranges() {
        assert_eq!(ranges("10-20,15-30").ranges(), [(10, 30)]);
        assert_eq!(ranges("10-20,21-30").ranges(), [(10, 30)]);
        assert_eq!(ranges("5,6,7,9").ranges(), [(5, 7), (9, 9)]);
        assert_eq!(ranges("30-40,1-2,10-20").to_string(), "1-2,10-20,30-40");
        assert_eq!(ranges("10-20,12-14").ranges(), [(10, 20)]);
        assert_eq!(ranges("8080,8080").ranges(), [(8080, 8080)]);
        assert_eq!(ranges("65534,65535,0").to_string(), "0,65534-65535");
        assert_eq!(ranges("0-65535,7").ranges(), [(0, 65535)]);
    }

    #[test]
    fn port_ranges_reject_bad_input() {
        let error = |text: &str| {
            text.parse::<PortRanges>()
                .expect_err(&format!("{text:?} should not parse"))
        };
        for text in ["8080,", ",8080", "8080,,9090", " , "] {
            assert!(
                matches!(error(text), ParsePortRangesError::EmptyItem { .. }),
                "{text:?}"
            );
        }
        for (text, bad) in [
            ("65536", "65536"),
            ("http", "http"),
            ("-5", ""),
            ("+5", "+5"),
            ("1-2-3", "2-3"),
            ("10-", ""),
            ("1 2", "1 2"),
            ("0x50", "0x50"),
        ] {
            assert_eq!(
                error(text),
                ParsePortRangesError::NotAPort {
                    text: bad.to_owned()
                },
                "{text:?}"
            );
        }
        assert_eq!(
            error("30-20"),
            ParsePortRangesError::Backwards {
                first: 30,
                last: 20
            }
        );
        assert!(error("30-20").to_string().contains("write it as 20-30"));
    }

    #[test]
    fn port_ranges_contains_and_overlaps() {
        let set = ranges("8080,20000-29999,65535");
        for port in [8080, 20000, 25000, 29999, 65535] {
            assert!(set.contains(port), "{port}");
        }
        for port in [0, 8079, 8081, 19999, 30000, 65534] {
            assert!(!set.contains(port), "{port}");
        }
        assert!(!PortRanges::new().contains(0));
        assert!(set.overlaps(8000..=8080));
        assert!(set.overlaps(29999..=30000));
        assert!(set.overlaps(0..=65535));
        assert!(set.overlaps(65535..=65535));
        assert!(!set.overlaps(8081..=19999));
        assert!(!set.overlaps(30000..=65534));
        #[expect(
            clippy::reversed_empty_ranges,
            reason = "an empty range is the case under test"
        )]
        let empty = 25000..=20000;
        assert!(!set.overlaps(empty));
    }

    #[test]
    fn port_ranges_union() {
        assert_eq!(
            ranges("8080").union(&ranges("20000-20100")).to_string(),
            "8080,20000-20100"
        );
        assert_eq!(
            ranges("1-10,20-30").union(&ranges("11-19")).to_string(),
            "1-30"
        );
        assert_eq!(ranges("5-10").union(&PortRanges::new()), ranges("5-10"));
        assert_eq!(
            ranges("65535").union(&ranges("65534")).to_string(),
            "65534-65535"
        );
    }

    #[test]
    fn port_ranges_difference() {
        let cases = [
            // (set, minus, left)
            ("20000-20100", "8080", "20000-20100"),
            ("20000-20100", "20000-20100", ""),
            ("20000-20100", "0-65535", ""),
            ("20000-20100", "20050", "20000-20049,20051-20100"),
            ("20000-20100", "19000-20010,20090-21000", "20011-20089"),
            ("1-10,20-30", "5-25", "1-4,26-30"),
            ("1-10,20-30,40-50", "10-20", "1-9,21-30,40-50"),
            ("0-65535", "0,65535", "1-65534"),
            ("65535", "65535", ""),
            ("65530-65535", "65535", "65530-65534"),
            ("0-5", "0", "1-5"),
            ("8080", "", "8080"),
            ("", "8080", ""),
            ("1-100", "10-20,30-40,50-60", "1-9,21-29,41-49,61-100"),
        ];
        for (set, minus, left) in cases {
            assert_eq!(
                ranges(set).difference(&ranges(minus)).to_string(),
                left,
                "{set} minus {minus}"
            );
        }
    }

    /// The operations against a plain set of ports, on random sets crowding both ends of the
    /// port space, where the arithmetic could overflow.
    #[test]
    fn port_ranges_agree_with_a_set_of_ports() {
        use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

        let mut rng = StdRng::seed_from_u64(0x7067);
        // Both ends of a range on the same side, so the model sets stay small.
        let port = |rng: &mut StdRng, high: bool| {
            let offset = rng.random_range(0..24u16);
            if high { u16::MAX - offset } else { offset }
        };
        let random_set = |rng: &mut StdRng| -> Vec<(u16, u16)> {
            (0..rng.random_range(0..5))
                .map(|_| {
                    let high = rng.random_bool(0.5);
                    let (a, b) = (port(rng, high), port(rng, high));
                    if rng.random_bool(0.1) {
                        (a.max(b), a.min(b))
                    } else {
                        (a.min(b), a.max(b))
                    }
                })
                .collect()
        };
        let model = |pairs: &[(u16, u16)]| -> BTreeSet<u16> {
            pairs
                .iter()
                .flat_map(|&(first, last)| first..=last)
                .collect()
        };
        let ports_of = |set: &PortRanges| model(set.ranges());
        for _ in 0..2000 {
            let (a, b) = (random_set(&mut rng), random_set(&mut rng));
            let (set_a, set_b): (PortRanges, PortRanges) =
                (a.iter().copied().collect(), b.iter().copied().collect());
            let (model_a, model_b) = (model(&a), model(&b));

            assert_eq!(ports_of(&set_a), model_a, "{a:?}");
            // Normalized: sorted, and apart by at least one port.
            for pair in set_a.ranges().windows(2) {
                assert!(u32::from(pair[0].1) + 1 < u32::from(pair[1].0), "{set_a:?}");
            }
            assert_eq!(ranges(&set_a.to_string()), set_a);
            assert_eq!(
                ports_of(&set_a.union(&set_b)),
                &model_a | &model_b,
                "{a:?} | {b:?}"
            );
            assert_eq!(
                ports_of(&set_a.difference(&set_b)),
                &model_a - &model_b,
                "{a:?} - {b:?}"
            );
            let high = rng.random_bool(0.5);
            let probe = port(&mut rng, high);
            assert_eq!(set_a.contains(probe), model_a.contains(&probe));
            for &(first, last) in &b {
                assert_eq!(
                    set_a.overlaps(first..=last),
                    (first..=last).any(|port| model_a.contains(&port)),
                    "{a:?} overlaps {first}..={last}"
                );
            }
        }
    }

    #[test]
    fn port_ranges_from_pairs_skip_empty_ranges() {
        let set: PortRanges = [(30, 20), (5, 5), (1, 3)].into_iter().collect();
        assert_eq!(set.to_string(), "1-3,5");
    }

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

    // ---- live sockets ----

    /// Rows as the kernel prints them: a listener, an accepted connection on its port, a
    /// `TIME_WAIT` left by an outgoing connection, a request socket (`SYN_RECV`), and an IPv6
    /// listener. Addresses are all-zero so the rows read the same on either byte order.
    const TCP_TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0
   1: 00000000:1F90 00000000:D431 01 00000000:00000000 02:00000A1E 00000000  1000        0 4243 2 0000000000000000 20 4 30 10 -1
   2: 00000000:9C41 00000000:1F90 06 00000000:00000000 03:00001234 00000000     0        0 0 3 0000000000000000
   3: 00000000:9C42 00000000:D432 03 00000000:00000000 01:00000064 00000000     0        0 0 1 0000000000000000
";
    const TCP6_TABLE: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000    33        0 5151 1 0000000000000000 100 0 0 10 0
";

    fn fixture_sockets() -> Vec<Socket> {
        let si = procfs::current_system_info();
        let mut sockets = Vec::new();
        for table in [TCP_TABLE, TCP6_TABLE] {
            let TcpNetEntries(entries) =
                TcpNetEntries::from_read(table.as_bytes(), si).expect("parse the fixture");
            sockets.extend(entries.into_iter().map(Socket::from));
        }
        sockets
    }

    #[test]
    fn every_tcp_state_holds_its_port() {
        let sockets = fixture_sockets();
        assert_eq!(
            ports_in(&sockets, &(0..=65535)),
            BTreeSet::from([8080, 8081, 40001, 40002])
        );
        assert_eq!(
            ports_in(&sockets, &(8081..=40001)),
            BTreeSet::from([8081, 40001])
        );
    }

    #[test]
    fn only_tcp_listen_rows_are_listeners() {
        let found = listeners_in(&fixture_sockets(), Protocol::Tcp, &(0..=65535));
        assert_eq!(
            found,
            [
                Listener {
                    port: 8080,
                    protocol: Protocol::Tcp,
                    addr: Ipv4Addr::UNSPECIFIED.into(),
                    uid: 1000,
                    inode: 4242,
                },
                Listener {
                    port: 8081,
                    protocol: Protocol::Tcp,
                    addr: std::net::Ipv6Addr::UNSPECIFIED.into(),
                    uid: 33,
                    inode: 5151,
                },
            ]
        );
    }

    fn socket_inode(fd: impl std::os::fd::AsFd) -> u64 {
        nix::sys::stat::fstat(fd).expect("fstat the socket").st_ino
    }

    #[test]
    fn bound_ports_sees_a_live_tcp_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
        let port = listener.local_addr().expect("its address").port();
        let bound = bound_ports(Protocol::Tcp, port..=port).expect("bound TCP ports");
        assert_eq!(bound, BTreeSet::from([port]));
        // The range is a filter: the whole table minus this port does not name it.
        let below = bound_ports(Protocol::Tcp, 0..=port - 1).expect("bound TCP ports");
        assert!(!below.contains(&port));
    }

    #[test]
    fn bound_ports_sees_a_live_ipv6_tcp_listener() {
        let listener = match TcpListener::bind((std::net::Ipv6Addr::LOCALHOST, 0)) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("no IPv6 loopback here ({err}): only the IPv4 tables are tested");
                return;
            }
        };
        let port = listener.local_addr().expect("its address").port();
        let bound = bound_ports(Protocol::Tcp, port..=port).expect("bound TCP ports");
        assert!(bound.contains(&port));
    }

    #[test]
    fn bound_ports_sees_a_live_udp_socket() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a UDP socket");
        let port = socket.local_addr().expect("its address").port();
        let bound = bound_ports(Protocol::Udp, port..=port).expect("bound UDP ports");
        assert_eq!(bound, BTreeSet::from([port]));
    }

    #[test]
    fn listeners_report_a_live_tcp_listener_with_its_uid_and_inode() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
        let port = listener.local_addr().expect("its address").port();
        let found = listeners(Protocol::Tcp, port..=port).expect("TCP listeners");
        assert_eq!(
            found,
            [Listener {
                port,
                protocol: Protocol::Tcp,
                addr: Ipv4Addr::LOCALHOST.into(),
                uid: nix::unistd::geteuid().as_raw(),
                inode: socket_inode(&listener),
            }]
        );
    }

    #[test]
    fn listeners_report_a_live_udp_socket_with_its_uid_and_inode() {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a UDP socket");
        let port = socket.local_addr().expect("its address").port();
        let found = listeners(Protocol::Udp, port..=port).expect("UDP listeners");
        assert_eq!(
            found,
            [Listener {
                port,
                protocol: Protocol::Udp,
                addr: Ipv4Addr::LOCALHOST.into(),
                uid: nix::unistd::geteuid().as_raw(),
                inode: socket_inode(&socket),
            }]
        );
    }

    #[test]
    fn a_connected_tcp_socket_holds_its_port_but_is_no_listener() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a listener");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("its address"))
            .expect("connect");
        let port = client.local_addr().expect("client address").port();
        let bound = bound_ports(Protocol::Tcp, port..=port).expect("bound TCP ports");
        assert_eq!(bound, BTreeSet::from([port]));
        let found = listeners(Protocol::Tcp, port..=port).expect("TCP listeners");
        assert!(found.is_empty(), "{found:?}");
    }
}
