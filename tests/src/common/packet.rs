//! Frames for `BPF_PROG_TEST_RUN`, built with etherparse: Ethernet, IPv4 or IPv6 (with up
//! to two extension headers), TCP or UDP, correct lengths and checksums.

use std::net::IpAddr;

use etherparse::{
    IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv6Extensions, Ipv6FlowLabel, Ipv6Header,
    Ipv6RawExtHeader, PacketBuilder,
};
use portgate::model::Protocol;

/// One test packet.
#[derive(Clone, Debug)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "one field per TCP flag, as on the wire"
)]
pub struct PacketSpec {
    /// TCP or UDP.
    pub protocol: Protocol,
    /// Source address (its family picks IPv4 or IPv6).
    pub source: IpAddr,
    /// Destination address, of the same family.
    pub destination: IpAddr,
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// TCP SYN.
    pub syn: bool,
    /// TCP ACK.
    pub ack: bool,
    /// TCP FIN.
    pub fin: bool,
    /// TCP RST.
    pub rst: bool,
    /// TCP PSH.
    pub psh: bool,
    /// TCP sequence number.
    pub seq: u32,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// IPv6 only: 0, 1 (hop-by-hop) or 2 (hop-by-hop and destination options).
    pub ipv6_extension_headers: u8,
}

/// The frame for `spec`, from the Ethernet header.
pub fn build_packet(spec: &PacketSpec) -> Vec<u8> {
    let ethernet = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let ip = match (spec.source, spec.destination) {
        (IpAddr::V4(source), IpAddr::V4(destination)) => IpHeaders::Ipv4(
            Ipv4Header::new(0, 64, IpNumber::TCP, source.octets(), destination.octets())
                .expect("IPv4 header"),
            Ipv4Extensions::default(),
        ),
        (IpAddr::V6(source), IpAddr::V6(destination)) => {
            let options = || {
                Ipv6RawExtHeader::new_raw(IpNumber::TCP, &[1, 4, 0, 0, 0, 0]).expect("PadN option")
            };
            let extensions = Ipv6Extensions {
                hop_by_hop_options: (spec.ipv6_extension_headers >= 1).then(options),
                destination_options: (spec.ipv6_extension_headers >= 2).then(options),
                ..Ipv6Extensions::default()
            };
            IpHeaders::Ipv6(
                Ipv6Header {
                    traffic_class: 0,
                    flow_label: Ipv6FlowLabel::ZERO,
                    payload_length: 0,
                    next_header: IpNumber::TCP,
                    hop_limit: 64,
                    source: source.octets(),
                    destination: destination.octets(),
                },
                extensions,
            )
        }
        _ => panic!("source and destination of different families"),
    };
    let ip = ethernet.ip(ip);
    let mut frame = Vec::new();
    match spec.protocol {
        Protocol::Udp => ip
            .udp(spec.sport, spec.dport)
            .write(&mut frame, &spec.payload)
            .expect("write UDP"),
        Protocol::Tcp => {
            let mut tcp = ip.tcp(spec.sport, spec.dport, spec.seq, 64_240);
            if spec.syn {
                tcp = tcp.syn();
            }
            if spec.ack {
                tcp = tcp.ack(1);
            }
            if spec.fin {
                tcp = tcp.fin();
            }
            if spec.rst {
                tcp = tcp.rst();
            }
            if spec.psh {
                tcp = tcp.psh();
            }
            tcp.write(&mut frame, &spec.payload).expect("write TCP");
        }
    }
    frame
}

impl PacketSpec {
    /// A bare TCP SYN from `source`:`sport` to `destination`:`dport` (sequence number 1).
    pub fn syn(source: IpAddr, destination: IpAddr, sport: u16, dport: u16) -> Self {
        Self {
            protocol: Protocol::Tcp,
            source,
            destination,
            sport,
            dport,
            syn: true,
            ack: false,
            fin: false,
            rst: false,
            psh: false,
            seq: 1,
            payload: Vec::new(),
            ipv6_extension_headers: 0,
        }
    }
}

/// The frame of [`PacketSpec::syn`].
pub fn tcp_syn(source: IpAddr, destination: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
    build_packet(&PacketSpec::syn(source, destination, sport, dport))
}

/// The destination of the frames tests hand to `BPF_PROG_TEST_RUN` without a network
/// (198.19.0.1, from the benchmarking range): the gate judges only its port.
pub const DESTINATION: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(198, 19, 0, 1));
