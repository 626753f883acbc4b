#!/usr/bin/env python3
"""Writes the seeds of the packet_verdict fuzz target (fuzz/seeds/packet_verdict/).

Each seed is a few frames, each as a control byte (bit 0: cgroup_skb rather than XDP;
bit 1: XDP in the container's namespace), a length byte and the frame, sent to the
ports of fuzz/src/harness.rs: SYNs, ACKs and datagrams from allowed, granted and other
sources, VLAN tags, IPv6 extension headers, fragments and truncated headers, as the
kernel tests (tests/tests/kernel/differential.rs, parsing.rs) build them.

Run from fuzz/: python3 packet_seeds.py
"""
import ipaddress
import os
import struct

XDP, SKB, CONTAINER = 0, 1, 2
SYN, ACK, RST = 0x02, 0x10, 0x04
ETH = bytes([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1])


def checksum(header):
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def l4(proto, sport, dport, flags):
    if proto == "tcp":
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)
    return struct.pack("!HHHH", sport, dport, 8, 0)


def frame(source, dport, proto="tcp", flags=SYN, sport=40000, vlan=False, ext=(), frag=0):
    """An Ethernet frame to `dport` from `source`; `ext`: IPv6 extension header numbers;
    `frag`: the IPv4 flags and fragment offset word."""
    addr = ipaddress.ip_address(source)
    number = 6 if proto == "tcp" else 17
    payload = l4(proto, sport, dport, flags)
    eth = ETH + (b"\x81\x00\x00\x07" if vlan else b"")
    if addr.version == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0x1234, frag, 64,
                         number, 0, addr.packed, bytes([198, 19, 0, 1]))
        ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
        return eth + b"\x08\x00" + ip + payload
    chain = b""
    headers = list(ext) + [number]
    for here, following in zip(headers, headers[1:]):
        if here == 44:
            chain += struct.pack("!BBHI", following, 0, 0, 7)
        else:
            chain += bytes([following, 0, 1, 4, 0, 0, 0, 0])
    destination = ipaddress.ip_address("fd00:7067:1::1").packed
    ip = struct.pack("!IHBB", 6 << 28, len(chain) + len(payload), headers[0], 64)
    return eth + b"\x86\xdd" + ip + addr.packed + destination + chain + payload


def record(control, data):
    assert len(data) < 256
    return bytes([control, len(data)]) + data


SEEDS = {
    # Each managed port, and one outside the range, from an allowed, granted source.
    "syn_each_port_v4": [record(XDP, frame("198.18.0.1", port))
                         for port in (20000, 20001, 20002, 20003, 20006, 20008, 20010, 19999)],
    # Three SYNs to a port of two slots (the third is refused), and a retransmission.
    "syn_conn_limit_v6": [record(SKB, frame("fd00:7067::1", 20001, sport=port))
                          for port in (40001, 40002, 40001, 40003)],
    # Authentication: a granted source, an expired grant, a source with none.
    "syn_auth": [record(SKB, frame(source, 20002))
                 for source in ("198.18.0.1", "198.18.0.2", "198.18.0.3")],
    "udp": [record(XDP, frame("203.0.113.5", 20004, "udp")),
            record(SKB, frame("203.0.113.77", 20004, "udp")),
            record(XDP, frame("203.0.113.200", 20004, "udp")),
            record(SKB, frame("2001:db8::1", 20000, "udp")),
            record(XDP, frame("198.18.0.1", 20005, "udp"))],
    # Established traffic: an allowlist still applies, draining does not.
    "ack_established": [record(SKB, frame("203.0.113.9", 20001, flags=ACK)),
                        record(XDP, frame("198.18.0.9", 20003, flags=ACK)),
                        record(XDP, frame("203.0.113.9", 20003, flags=ACK | RST)),
                        record(SKB, frame("198.18.0.1", 20008, flags=SYN | ACK))],
    # The container's ports, and the host ports they are published on.
    "container": [record(XDP | CONTAINER, frame("198.18.3.4", 80)),
                  record(XDP | CONTAINER, frame("198.18.3.5", 80)),
                  record(XDP, frame("198.18.3.6", 20010)),
                  record(XDP | CONTAINER, frame("fd00:7067::1", 20001)),
                  record(XDP | CONTAINER, frame("fd00:7067::2", 20001)),
                  record(XDP | CONTAINER, frame("192.0.2.1", 443, "udp")),
                  record(XDP, frame("192.0.2.1", 20011, "udp"))],
    "vlan": [record(XDP, frame("198.18.0.1", 20002, vlan=True)),
             record(SKB, frame("198.18.0.1", 20002, vlan=True)),
             record(XDP, frame("198.18.0.3", 20002, vlan=True))],
    # Extension headers: hop-by-hop, routing, destination options and a first fragment
    # are followed; a fifth header is too many.
    "ipv6_extensions": [record(XDP, frame("fd00:7067::5", 20000, ext=(0, 60))),
                        record(SKB, frame("fd00:7067::5", 20001, ext=(0, 43, 44, 60))),
                        record(XDP, frame("fd00:7067::5", 20001, ext=(0, 43, 60, 60, 60)))],
    # A fragment other than the first cannot be read; a first one can.
    "ipv4_fragments": [record(XDP, frame("198.18.0.1", 20001, frag=0x2000)),
                       record(SKB, frame("198.18.0.1", 20001, frag=0x0004)),
                       record(XDP, frame("198.18.0.1", 20008, frag=0x0001))],
    # Headers cut short: IPv4, IPv6 and TCP.
    "truncated": [record(XDP, frame("198.18.0.1", 20001)[:30]),
                  record(SKB, frame("fd00:7067::1", 20001)[:50]),
                  record(XDP, frame("198.18.0.1", 20001)[:40]),
                  record(SKB, frame("198.18.0.1", 20001, "udp")[:38])],
}

os.makedirs("seeds/packet_verdict", exist_ok=True)
for name, records in SEEDS.items():
    with open(os.path.join("seeds/packet_verdict", name), "wb") as out:
        out.write(b"".join(records))
