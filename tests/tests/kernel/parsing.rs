//! Packets the gate cannot read are not waved through, and the hand-off between the hooks
//! cannot be forged: `cgroup_skb` judges every packet it sees, and a packet whose ports
//! cannot be read is dropped (by XDP only when `cgroup_skb` is not there to judge the
//! reassembled packet), and counted.
//!
//! Needs: root, cgroup v2, bpffs, BTF, iproute2. Packets are handed to the hooks with
//! `BPF_PROG_TEST_RUN`; the hooks are attached to a test cgroup and a test veth only so
//! that the gate knows both are in use.

use std::net::{IpAddr, Ipv4Addr};

use portgate::{
    gate::{Gate, PacketHook},
    model::{PortId, PortPolicy, PortStatus, Protocol},
};
use portgate_common::reason;
use portgate_tests::{
    common::{
        NetNs, PinDir, TestCgroup, Veth,
        gate::{MIN_PORT, install, settings},
        packet::{DESTINATION, PacketSpec, build_packet},
        pin_to_cpu0,
    },
    require_privileges,
};

const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 7));

/// An Ethernet frame with an IPv6 header, `options` Destination Options headers (8 bytes
/// each) and a TCP SYN to `port`.
fn ipv6_syn_behind_options(options: u8, port: u16) -> Vec<u8> {
    const DSTOPTS: u8 = 60;
    const TCP: u8 = 6;
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&port.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x02;
    let payload_len = u16::from(options) * 8 + 20;
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&payload_len.to_be_bytes());
    frame.push(if options == 0 { TCP } else { DSTOPTS });
    frame.push(64);
    frame.extend_from_slice(&[0xfd, 0, 0x70, 0x67, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]);
    frame.extend_from_slice(&[0xfd, 0, 0x70, 0x67, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    for index in 0..options {
        let next = if index + 1 == options { TCP } else { DSTOPTS };
        // Next header, length 0 (8 bytes), one PadN option of 4 bytes.
        frame.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    frame.extend_from_slice(&tcp);
    frame
}

/// An Ethernet frame with the first fragment of an IPv4 TCP SYN to `port` that carries
/// only the first 8 bytes of the TCP header (ports and sequence number, no flags).
fn ipv4_first_fragment_short_tcp(port: u16) -> Vec<u8> {
    let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    let total: u16 = 20 + 8;
    frame.extend_from_slice(&[0x45, 0]);
    frame.extend_from_slice(&total.to_be_bytes());
    // Identification, then flags: More Fragments, offset 0.
    frame.extend_from_slice(&[0x12, 0x34, 0x20, 0x00, 64, 6, 0, 0]);
    frame.extend_from_slice(&[198, 18, 0, 7, 198, 19, 0, 1]);
    let checksum = {
        let mut sum = 0u32;
        for pair in frame[14..34].chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !u16::try_from(sum).expect("folded to 16 bits")
    };
    frame[24..26].copy_from_slice(&checksum.to_be_bytes());
    frame.extend_from_slice(&40_000u16.to_be_bytes());
    frame.extend_from_slice(&port.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]);
    frame
}

fn passes(gate: &mut Gate, hook: PacketHook, frame: &[u8]) -> bool {
    gate.test_run(hook, frame, 1).expect("test run").passed
}

#[test]
fn packets_whose_ports_cannot_be_read_fail_closed_and_are_counted() {
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    let mut gate = install(&settings(&pins));
    let port = MIN_PORT + 70;
    let too_deep = ipv6_syn_behind_options(5, port);
    let fragment = ipv4_first_fragment_short_tcp(port);
    // The same SYN behind two options is read, and refused (the port is unallocated).
    assert!(!passes(
        &mut gate,
        PacketHook::CgroupSkb,
        &ipv6_syn_behind_options(2, port)
    ));

    // Without cgroup_skb, XDP is the only judge: what it cannot read, it drops.
    for frame in [&too_deep, &fragment] {
        assert!(!passes(&mut gate, PacketHook::Xdp, frame));
    }
    assert_eq!(gate.stats().expect("stats").unparsable, 2);

    // With cgroup_skb in use, XDP leaves such packets to it (it sees them reassembled);
    // cgroup_skb drops what it still cannot read.
    let cgroup = TestCgroup::new();
    gate.attach_cgroup(cgroup.path())
        .expect("attach to the test cgroup");
    for frame in [&too_deep, &fragment] {
        assert!(passes(&mut gate, PacketHook::Xdp, frame));
        assert!(!passes(&mut gate, PacketHook::CgroupSkb, frame));
    }
    assert_eq!(gate.stats().expect("stats").unparsable, 4);

    // Neither hook drops what is not TCP or UDP, or a port outside the managed range.
    let mut other = ipv6_syn_behind_options(0, port);
    other[20] = 58; // ICMPv6
    assert!(passes(&mut gate, PacketHook::Xdp, &other));
    assert!(passes(&mut gate, PacketHook::CgroupSkb, &other));
    assert_eq!(gate.stats().expect("stats").unparsable, 4);
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}

#[test]
fn a_packet_xdp_passed_cannot_vouch_for_another_in_cgroup_skb() {
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let pins = PinDir::new();
    // Installed from the test's own namespace: the test runs below are its host's packets.
    let mut gate = install(&settings(&pins));
    let (server_ns, client_ns) = (NetNs::new(), NetNs::new());
    let cgroup = TestCgroup::new();
    gate.attach_cgroup(cgroup.path())
        .expect("attach to the test cgroup");
    let veth = Veth::new(&server_ns, &client_ns);
    server_ns.run(|| {
        gate.attach_xdp(
            &veth.a_name,
            portgate::model::NetnsId::HOST,
            aya::programs::XdpMode::default(),
        )
        .expect("attach XDP to the test veth");
    });
    let port = MIN_PORT + 71;
    let id = PortId::new(port, Protocol::Tcp);
    gate.set_policy(
        id,
        &PortPolicy {
            status: PortStatus::Draining,
            ..PortPolicy::default()
        },
    )
    .expect("set policy");
    let mut ack = PacketSpec::syn(SOURCE, DESTINATION, 40_000, port);
    ack.syn = false;
    ack.ack = true;
    // XDP passes an ACK (established traffic continues on a Draining port) ...
    assert!(passes(&mut gate, PacketHook::Xdp, &build_packet(&ack)));
    // ... and a SYN with the same addresses, ports and sequence number reaches cgroup_skb
    // without XDP having judged it: cgroup_skb refuses it all the same.
    let syn = build_packet(&PacketSpec::syn(SOURCE, DESTINATION, 40_000, port));
    assert!(!passes(&mut gate, PacketHook::CgroupSkb, &syn));
    let counters = gate.counters(id).expect("counters").total;
    assert_eq!(counters.dropped_for(reason::DRAINING), 1);

    // What XDP passed and counted, cgroup_skb judges again but does not count again.
    gate.set_policy(id, &PortPolicy::default())
        .expect("activate");
    let other = build_packet(&PacketSpec::syn(SOURCE, DESTINATION, 40_001, port));
    assert!(passes(&mut gate, PacketHook::Xdp, &other));
    assert!(passes(&mut gate, PacketHook::CgroupSkb, &other));
    let counters = gate.counters(id).expect("counters").total;
    assert_eq!(counters.accepted, 1, "one SYN, accepted once");
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}
