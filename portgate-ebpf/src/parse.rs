//! Header parsing shared by the packet hooks: from the L3 header to the ports.

use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};
use portgate_common::{family, proto};

/// `ETH_P_IP`.
pub const ETH_P_IP: u16 = 0x0800;
/// `ETH_P_IPV6`.
pub const ETH_P_IPV6: u16 = 0x86dd;

const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_DSTOPTS: u8 = 60;
/// IPv6 extension headers followed before giving up (the packet is then [`Parsed::Unreadable`]).
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// TCP SYN flag.
pub const TCP_SYN: u8 = 0x02;
/// TCP RST flag.
pub const TCP_RST: u8 = 0x04;
/// TCP ACK flag.
pub const TCP_ACK: u8 = 0x10;

/// What the verdict needs from a packet.
#[derive(Clone, Copy)]
pub struct PacketInfo {
    /// The namespace the packet is for: its netns cookie, or
    /// [`portgate_common::HOST_NETNS`] (the verdict keys both as
    /// [`portgate_common::PortKey::netns`] does)
    /// (set by the hook: the parser cannot know it).
    pub netns: u64,
    /// [`family::V4`] or [`family::V6`].
    pub family: u8,
    /// [`proto::TCP`] or [`proto::UDP`].
    pub proto: u8,
    /// [`TCP_SYN`], [`TCP_RST`] and [`TCP_ACK`] as set in the segment (0 for UDP).
    pub tcp_flags: u8,
    /// The packet is for a listening TCP socket (only `cgroup_skb` knows): a segment with
    /// ACK and without SYN or RST then completes a handshake.
    pub to_listener: bool,
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination port, host byte order.
    pub dport: u16,
    /// TCP sequence number, or UDP length and checksum: tells packets of one flow apart.
    pub l4_word: u32,
    /// Source address, IPv4 in the first 4 bytes.
    pub saddr: [u8; 16],
    /// Destination address, IPv4 in the first 4 bytes.
    pub daddr: [u8; 16],
}

impl PacketInfo {
    /// A TCP SYN without ACK, or any UDP datagram.
    #[inline(always)]
    pub fn new_connection(&self) -> bool {
        self.proto == proto::UDP || self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// A TCP segment that completes a handshake: ACK without SYN or RST, to a listening
    /// socket (the last packet of a handshake, or a SYN-cookie ACK that had no SYN).
    #[inline(always)]
    pub fn completes_handshake(&self) -> bool {
        self.to_listener
            && self.proto == proto::TCP
            && self.tcp_flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK
    }
}

/// What a packet's headers say.
pub enum Parsed {
    /// A TCP or UDP packet whose ports were read.
    Packet(PacketInfo),
    /// Not for the verdict: not IP, or neither TCP nor UDP.
    Other,
    /// TCP or UDP, or possibly so, but its ports cannot be read: truncated or malformed
    /// headers, more than [`MAX_IPV6_EXT_HEADERS`] IPv6 extension headers, or a fragment
    /// other than the first (which only the reassembled packet's hook can judge).
    Unreadable,
}

/// Reads fixed-size values at byte offsets of a packet.
pub trait Reader {
    /// The `T` at `offset`, or `None` past the end of the packet.
    fn read<T: Copy>(&self, offset: usize) -> Option<T>;
}

/// Parses from the L3 header at `offset` (of the given ethertype) to the L4 ports.
#[inline(always)]
pub fn parse_l3<R: Reader>(reader: &R, ethertype: u16, offset: usize) -> Parsed {
    if ethertype != ETH_P_IP && ethertype != ETH_P_IPV6 {
        return Parsed::Other;
    }
    match read_l3(reader, ethertype, offset) {
        Ok(info) => Parsed::Packet(info),
        Err(parsed) => parsed,
    }
}

#[inline(always)]
fn read_l3<R: Reader>(reader: &R, ethertype: u16, offset: usize) -> Result<PacketInfo, Parsed> {
    let mut info = PacketInfo {
        netns: 0,
        family: 0,
        proto: 0,
        tcp_flags: 0,
        to_listener: false,
        sport: 0,
        dport: 0,
        l4_word: 0,
        saddr: [0; 16],
        daddr: [0; 16],
    };
    let (l4_proto, l4_offset) = if ethertype == ETH_P_IP {
        let ip: Ipv4Hdr = reader.read(offset).ok_or(Parsed::Unreadable)?;
        let ihl = usize::from(ip.vihl & 0x0f) * 4;
        if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return Err(Parsed::Unreadable);
        }
        if ip.proto != proto::TCP && ip.proto != proto::UDP {
            return Err(Parsed::Other);
        }
        if u16::from_be_bytes(ip.frags) & 0x1fff != 0 {
            return Err(Parsed::Unreadable);
        }
        info.family = family::V4;
        info.saddr[..4].copy_from_slice(&ip.src_addr);
        info.daddr[..4].copy_from_slice(&ip.dst_addr);
        (ip.proto, offset + ihl)
    } else {
        let ip: Ipv6Hdr = reader.read(offset).ok_or(Parsed::Unreadable)?;
        if ip.vcf[0] >> 4 != 6 {
            return Err(Parsed::Unreadable);
        }
        info.family = family::V6;
        info.saddr = ip.src_addr;
        info.daddr = ip.dst_addr;
        skip_ipv6_extensions(reader, ip.next_hdr, offset + Ipv6Hdr::LEN)?
    };
    match l4_proto {
        proto::TCP => {
            let tcp: TcpHdr = reader.read(l4_offset).ok_or(Parsed::Unreadable)?;
            info.sport = u16::from_be_bytes(tcp.source);
            info.dport = u16::from_be_bytes(tcp.dest);
            info.l4_word = u32::from_be_bytes(tcp.seq);
            if tcp.syn() != 0 {
                info.tcp_flags |= TCP_SYN;
            }
            if tcp.ack() != 0 {
                info.tcp_flags |= TCP_ACK;
            }
            if tcp.rst() != 0 {
                info.tcp_flags |= TCP_RST;
            }
        }
        proto::UDP => {
            let udp: UdpHdr = reader.read(l4_offset).ok_or(Parsed::Unreadable)?;
            info.sport = u16::from_be_bytes(udp.src);
            info.dport = u16::from_be_bytes(udp.dst);
            info.l4_word = u32::from_be_bytes([udp.len[0], udp.len[1], udp.check[0], udp.check[1]]);
        }
        _ => return Err(Parsed::Other),
    }
    info.proto = l4_proto;
    Ok(info)
}

/// Follows up to [`MAX_IPV6_EXT_HEADERS`] extension headers to the upper-layer header.
/// `Err(Parsed::Unreadable)` when the chain is longer, truncated, or reaches a fragment
/// other than the first.
#[inline(always)]
fn skip_ipv6_extensions<R: Reader>(
    reader: &R,
    mut next: u8,
    mut offset: usize,
) -> Result<(u8, usize), Parsed> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS => {
                let ext: [u8; 2] = reader.read(offset).ok_or(Parsed::Unreadable)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            IPPROTO_FRAGMENT => {
                let frag: [u8; 4] = reader.read(offset).ok_or(Parsed::Unreadable)?;
                if u16::from_be_bytes([frag[2], frag[3]]) & 0xfff8 != 0 {
                    return Err(Parsed::Unreadable);
                }
                next = frag[0];
                offset += 8;
            }
            _ => return Ok((next, offset)),
        }
    }
    match next {
        IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_DSTOPTS | IPPROTO_FRAGMENT => {
            Err(Parsed::Unreadable)
        }
        _ => Ok((next, offset)),
    }
}
