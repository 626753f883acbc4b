//! Hand-made TCP segments sent through a raw IPv4 socket (`IP_HDRINCL`), so that their
//! source can be any address: the floods' SYNs and the forged RSTs and FINs.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Range,
    thread,
    time::{Duration, Instant},
};

use portgate_tests::common::NetNs;

/// A raw IPv4 socket that sends whole IP packets (`IP_HDRINCL`): their source address is
/// whatever the packet says. Made in the calling thread's namespace.
pub(super) fn raw_sender() -> socket2::Socket {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::RAW,
        Some(socket2::Protocol::TCP),
    )
    .expect("a raw socket");
    socket.set_header_included_v4(true).expect("IP_HDRINCL");
    socket
}

/// The flags of a hand-made segment.
#[derive(Clone, Copy)]
pub(super) enum Flags {
    Syn,
    Rst,
    /// FIN with ACK of the given number (a segment of an established connection carries
    /// ACK, or the kernel discards it before looking at anything else).
    FinAck(u32),
}

/// An IPv4 packet holding one TCP segment, checksums filled in.
pub(super) fn segment(from: SocketAddrV4, to: SocketAddrV4, seq: u32, flags: Flags) -> Vec<u8> {
    let ip = etherparse::PacketBuilder::ipv4(from.ip().octets(), to.ip().octets(), 64);
    let mut tcp = ip.tcp(from.port(), to.port(), seq, 64_240);
    tcp = match flags {
        Flags::Syn => tcp.syn(),
        Flags::Rst => tcp.rst(),
        Flags::FinAck(ack) => tcp.fin().ack(ack),
    };
    let mut packet = Vec::new();
    tcp.write(&mut packet, &[]).expect("write the segment");
    packet
}

/// Sends `packet` to its destination through `socket`; whether the kernel took it.
pub(super) fn send(socket: &socket2::Socket, packet: &[u8], to: SocketAddrV4) -> bool {
    socket
        .send_to(packet, &SocketAddr::V4(to).into())
        .is_ok_and(|sent| sent == packet.len())
}

/// What one flood did.
#[derive(Clone, Copy, Debug)]
pub(super) struct Flood {
    /// SYNs the kernel took from the raw socket.
    pub sent: u64,
    /// How long the sending took.
    pub took: Duration,
}

/// Sends the SYNs `sources` numbers to `to` from `outside`, paced over `within` (and never
/// longer than twice that), each from its own forged source in `prefix`.0.0/16: the `n`th
/// from address `n` mod 2^16 and a port that tells the rounds apart, so no two share a
/// 4-tuple.
pub(super) fn flood(
    outside: &NetNs,
    to: SocketAddrV4,
    prefix: [u8; 2],
    sources: Range<u32>,
    within: Duration,
) -> Flood {
    outside.run(|| {
        let socket = raw_sender();
        let started = Instant::now();
        let per_packet = within / (sources.end - sources.start).max(1);
        let mut sent = 0;
        for (i, n) in (1_u32..).zip(sources) {
            let [.., c, d] = (n % 65_536).to_be_bytes();
            let sport = 1_024 + u16::try_from(n / 65_536).expect("few rounds");
            let from = SocketAddrV4::new(Ipv4Addr::new(prefix[0], prefix[1], c, d), sport);
            if send(&socket, &segment(from, to, 1, Flags::Syn), to) {
                sent += 1;
            }
            if i.is_multiple_of(32) {
                let elapsed = started.elapsed();
                if elapsed > within * 2 {
                    break;
                }
                if let Some(ahead) = (per_packet * i).checked_sub(elapsed) {
                    thread::sleep(ahead);
                }
            }
        }
        Flood {
            sent,
            took: started.elapsed(),
        }
    })
}
