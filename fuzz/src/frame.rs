//! A reference reading of a frame, as the kernel's parser (`portgate-ebpf/src/parse.rs`,
//! `xdp.rs`, `skb.rs`) reads it, written again from its rules: the packet fields the
//! userspace verdict ([`portgate::verdict`]) is given, or why there are none. The
//! userspace verdict has no parser of its own (it is asked about ports and addresses), so
//! the fuzz target `packet_verdict` needs this one to hold the kernel to it on any bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use portgate::model::Protocol;

/// The hook a frame is handed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP: the frame from its Ethernet header, one VLAN tag read.
    Xdp,
    /// `cgroup_skb`: `BPF_PROG_TEST_RUN` pulls the Ethernet header and takes the
    /// ethertype as the packet's protocol (a VLAN tag is not read: the stack strips it
    /// before a real packet reaches a socket).
    CgroupSkb,
}

/// What a frame's headers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Read {
    /// A TCP or UDP packet whose ports were read.
    Packet(Fields),
    /// Not for the verdict: not IP, neither TCP nor UDP.
    Other,
    /// TCP or UDP, or possibly so, but its ports cannot be read: the kernel drops it.
    Unreadable,
}

/// The fields of a packet the verdict reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fields {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Source address.
    pub source: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP SYN.
    pub syn: bool,
    /// TCP ACK.
    pub ack: bool,
}

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Below it, the Ethernet type field is an 802.3 length (`eth_type_trans`).
const ETH_P_802_3_MIN: u16 = 0x0600;
const TCP: u8 = 6;
const UDP: u8 = 17;
const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DSTOPTS: u8 = 60;
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// `len` bytes at `offset` of `bytes`, or `None` past its end.
fn at(bytes: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    bytes.get(offset..offset.checked_add(len)?)
}

fn be16(bytes: &[u8], offset: usize) -> Option<u16> {
    at(bytes, offset, 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// How `hook` reads `frame` (from its Ethernet header). `None`: the frame is too short
/// for `BPF_PROG_TEST_RUN` to take (under an Ethernet header).
#[must_use]
pub fn read(hook: Hook, frame: &[u8]) -> Option<Read> {
    let ethertype = be16(frame, 12)?;
    Some(match hook {
        Hook::Xdp => {
            if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
                match be16(frame, 16) {
                    Some(inner) => read_l3(inner, &frame[ETH_HLEN + 4..]),
                    None => Read::Other,
                }
            } else {
                read_l3(ethertype, &frame[ETH_HLEN..])
            }
        }
        Hook::CgroupSkb if ethertype < ETH_P_802_3_MIN => Read::Other,
        Hook::CgroupSkb => read_l3(ethertype, &frame[ETH_HLEN..]),
    })
}

/// Whether `frame` is IPv4 or IPv6 (by its Ethernet type) with its IP header cut short:
/// `BPF_PROG_TEST_RUN` of a `cgroup_skb` program refuses such a frame (`EINVAL`).
#[must_use]
pub fn short_ip_header(frame: &[u8]) -> bool {
    let l3 = frame.len().saturating_sub(ETH_HLEN);
    match be16(frame, 12) {
        Some(ETH_P_IP) => l3 < 20,
        Some(ETH_P_IPV6) => l3 < 40,
        _ => false,
    }
}

/// From the L3 header (`l3` starts there) of the given ethertype to the ports.
fn read_l3(ethertype: u16, l3: &[u8]) -> Read {
    let (source, proto, l4) = match ethertype {
        ETH_P_IP => {
            let Some(ip) = at(l3, 0, 20) else {
                return Read::Unreadable;
            };
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 {
                return Read::Unreadable;
            }
            if ip[9] != TCP && ip[9] != UDP {
                return Read::Other;
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
                return Read::Unreadable;
            }
            let source = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            (IpAddr::V4(source), ip[9], ihl)
        }
        ETH_P_IPV6 => {
            let Some(ip) = at(l3, 0, 40) else {
                return Read::Unreadable;
            };
            if ip[0] >> 4 != 6 {
                return Read::Unreadable;
            }
            let mut source = [0u8; 16];
            source.copy_from_slice(&ip[8..24]);
            let Some((proto, l4)) = skip_extensions(l3, ip[6], 40) else {
                return Read::Unreadable;
            };
            (IpAddr::V6(Ipv6Addr::from(source)), proto, l4)
        }
        _ => return Read::Other,
    };
    let (protocol, header) = match proto {
        TCP => (Protocol::Tcp, 20),
        UDP => (Protocol::Udp, 8),
        _ => return Read::Other,
    };
    let Some(l4) = at(l3, l4, header) else {
        return Read::Unreadable;
    };
    let flags = if protocol == Protocol::Tcp { l4[13] } else { 0 };
    Read::Packet(Fields {
        protocol,
        source,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        syn: flags & 0x02 != 0,
        ack: flags & 0x10 != 0,
    })
}

/// Follows up to [`MAX_IPV6_EXT_HEADERS`] extension headers from `offset`: the upper
/// protocol and its offset, `None` when the chain is longer, truncated, or reaches a
/// fragment other than the first.
fn skip_extensions(l3: &[u8], mut next: u8, mut offset: usize) -> Option<(u8, usize)> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            HOPOPTS | ROUTING | DSTOPTS => {
                let ext = at(l3, offset, 2)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            FRAGMENT => {
                let frag = at(l3, offset, 4)?;
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                    return None;
                }
                next = frag[0];
                offset += 8;
            }
            _ => return Some((next, offset)),
        }
    }
    match next {
        HOPOPTS | ROUTING | DSTOPTS | FRAGMENT => None,
        _ => Some((next, offset)),
    }
}
