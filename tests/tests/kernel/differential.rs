//! Differential test: the kernel's verdict (XDP and `cgroup_skb`, run with
//! `BPF_PROG_TEST_RUN`) against the userspace verdict, over thousands of generated policies
//! and packets, and the kernel's counters and deny events against what the userspace
//! verdict implies.
//!
//! Ports live in two namespaces: the host's and a test namespace (a "container"), with
//! the same port numbers under different policies, container ports outside the managed
//! range, and container ports published on host ports. `cgroup_skb` runs a container's
//! packet from a thread inside its namespace (the test run's socket is made there); XDP
//! is told that loopback carries the container's traffic.
//!
//! Needs: root (or `CAP_BPF` + `CAP_NET_ADMIN` + `CAP_SYS_ADMIN`), bpffs, BTF, iproute2.
//! Attaches nothing.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use ipnet::IpNet;
use portgate::{
    gate::{Gate, GateSettings, HookCounters, PacketHook},
    host::kernel::monotonic_now_ns,
    model::{
        Allowlist, DropReason, NetnsId, OwnerCgroup, PortAccessControl, PortId, PortPolicy,
        PortStatus, Protocol,
    },
    verdict::{GateModel, GateView as _, Packet, Verdict, decide},
};
use portgate_common::{hook, reason};
use portgate_tests::{common, require_privileges};

use common::{
    NetNs, PinDir,
    packet::{PacketSpec, build_packet},
    pin_to_cpu0,
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};

const MIN_PORT: u16 = 20_000;
const MAX_PORT: u16 = 20_063;
const POLICY_ROUNDS: usize = 25;
const PACKETS_PER_ROUND: usize = 800;
/// The container's ports: some in the managed range (the same numbers as host ports),
/// some outside it.
const CONTAINER_PORTS: [u16; 6] = [80, 443, 8080, MIN_PORT, MIN_PORT + 1, MIN_PORT + 7];
/// Host ports that only ever carry a published container port (container port `i` is
/// published on `PUBLISHED_BASE + i`), never a host allocation of their own.
const PUBLISHED_BASE: u16 = MAX_PORT - 5;
/// The loopback interface's index: the interface of every XDP test run.
const LOOPBACK_IFINDEX: u32 = 1;

/// Sources the generated allowlists and packets draw from, so prefixes hit and miss.
fn address_pool() -> Vec<IpAddr> {
    let mut pool = Vec::new();
    for last in [1u8, 2, 77, 200] {
        pool.push(IpAddr::V4(Ipv4Addr::new(198, 18, 0, last)));
        pool.push(IpAddr::V4(Ipv4Addr::new(198, 18, 9, last)));
        pool.push(IpAddr::V4(Ipv4Addr::new(203, 0, 113, last)));
        pool.push(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x7067,
            0,
            0,
            0,
            0,
            0,
            u16::from(last),
        )));
        pool.push(IpAddr::V6(Ipv6Addr::new(
            0xfd00,
            0x7067,
            0xbeef,
            0,
            0,
            0,
            0,
            u16::from(last),
        )));
        pool.push(IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            u16::from(last),
        )));
    }
    pool
}

fn random_prefix(rng: &mut StdRng, pool: &[IpAddr]) -> IpNet {
    let addr = *pool.choose(rng).expect("pool is not empty");
    let max = if addr.is_ipv4() { 32 } else { 128 };
    // Mostly long prefixes, sometimes short ones down to /0.
    let len = match rng.random_range(0..10) {
        0 => 0,
        1..=3 => rng.random_range(1..=max),
        _ => max - rng.random_range(0..=8.min(max)),
    };
    IpNet::new(addr, len).expect("valid prefix length").trunc()
}

fn random_policy(rng: &mut StdRng, pool: &[IpAddr]) -> Option<PortPolicy> {
    if rng.random_bool(0.15) {
        return None;
    }
    let status = *[
        PortStatus::Active,
        PortStatus::Active,
        PortStatus::Active,
        PortStatus::Draining,
        PortStatus::Closed,
    ]
    .choose(rng)
    .expect("not empty");
    let allow = if rng.random_bool(0.5) {
        (0..rng.random_range(1..=4))
            .map(|_| random_prefix(rng, pool))
            .collect()
    } else {
        Allowlist::default()
    };
    Some(PortPolicy {
        status,
        access: PortAccessControl {
            allowed_ips: allow,
            max_connections: *[0, 0, 1, 2, 3].choose(rng).expect("not empty"),
            require_authentication: rng.random_bool(0.3),
        },
        owner: rng.random_bool(0.2).then_some(OwnerCgroup {
            path: "/".into(),
            id: 1,
            level: 0,
        }),
        // A few allocations per port: a new epoch starts the port's slots again.
        epoch: rng.random_range(0..3),
        published: None,
    })
}

/// TCP flag sets a packet may carry: (syn, ack, fin, rst, psh).
const TCP_FLAG_SETS: [(bool, bool, bool, bool, bool); 6] = [
    (true, false, false, false, false),
    (true, false, false, false, false),
    (true, true, false, false, false),
    (false, true, false, false, true),
    (false, true, true, false, false),
    (false, false, false, true, false),
];

#[derive(Default)]
struct Expected {
    counters: BTreeMap<PortId, [HookCounters; hook::COUNT as usize]>,
    drops: usize,
}

impl Expected {
    fn record(&mut self, id: PortId, hook_index: usize, bytes: u64, verdict: Verdict) {
        if matches!(verdict, Verdict::Untouched) {
            return;
        }
        let row = &mut self.counters.entry(id).or_default()[hook_index];
        row.packets += 1;
        row.bytes += bytes;
        match verdict {
            Verdict::Accept => row.accepted += 1,
            Verdict::Drop(reason) => {
                row.dropped[reason::drop_index(reason.code())] += 1;
                self.drops += 1;
            }
            Verdict::Pass | Verdict::Untouched => {}
        }
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one generate-run-compare loop, told in order"
)]
fn kernel_verdict_matches_userspace_verdict() {
    if !require_privileges!() {
        return;
    }
    pin_to_cpu0();
    let seed: u64 = std::env::var("PORTGATE_TEST_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or(0x7067_6174_6501);
    println!("seed {seed} (set PORTGATE_TEST_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);
    let pool = address_pool();

    let pins = PinDir::new();
    let settings = GateSettings {
        pin_dir: pins.path().to_owned(),
        min_port: MIN_PORT,
        max_port: MAX_PORT,
        events_per_sec: 1_000_000,
        // Longer than the test: no reservation expires behind the model's back.
        pending_ttl: Duration::from_hours(1),
        ..GateSettings::default()
    };
    let container_ns = NetNs::new();
    let container = NetnsId(
        portgate::host::netns::open(&std::path::Path::new("/run/netns").join(container_ns.name()))
            .expect("the container namespace")
            .cookie,
    );
    let mut gate = Gate::install(&settings).expect("install the gate");
    let mut events = gate.events().expect("take the event stream");
    let mut model = GateModel::new(MIN_PORT, MAX_PORT);
    let mut expected = Expected::default();
    let mut next_sport: u16 = 1_024;
    let mut cases = 0usize;
    let mut by_reason: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut deny_events = Vec::new();

    for round in 0..POLICY_ROUNDS {
        // New policies for every port and protocol (slots carry over, as in the kernel).
        for port in MIN_PORT..PUBLISHED_BASE {
            for protocol in Protocol::ALL {
                if let Some(policy) = random_policy(&mut rng, &pool) {
                    gate.set_policy(PortId::new(port, protocol), &policy)
                        .expect("set policy");
                    model.set_policy(PortId::new(port, protocol), policy);
                } else {
                    gate.remove_policy(PortId::new(port, protocol))
                        .expect("remove policy");
                    model.remove_policy(PortId::new(port, protocol));
                }
            }
        }
        for (index, port) in (0u16..).zip(CONTAINER_PORTS) {
            for protocol in Protocol::ALL {
                let id = PortId {
                    netns: container,
                    ..PortId::new(port, protocol)
                };
                if let Some(mut policy) = random_policy(&mut rng, &pool) {
                    policy.published = rng.random_bool(0.4).then_some(PUBLISHED_BASE + index);
                    gate.set_policy(id, &policy).expect("set policy");
                    model.set_policy(id, policy);
                } else {
                    gate.remove_policy(id).expect("remove policy");
                    model.remove_policy(id);
                }
            }
        }
        // Grants, some expired, some not.
        let now = monotonic_now_ns();
        for _ in 0..24 {
            let port = rng.random_range(MIN_PORT..=MAX_PORT);
            let protocol = *Protocol::ALL.choose(&mut rng).expect("not empty");
            let addr = *pool.choose(&mut rng).expect("not empty");
            let expires = if rng.random_bool(0.7) {
                now + 3_600_000_000_000
            } else {
                now.saturating_sub(1)
            };
            let id = if rng.random_bool(0.3) {
                PortId {
                    netns: container,
                    ..PortId::new(*CONTAINER_PORTS.choose(&mut rng).expect("ports"), protocol)
                }
            } else {
                PortId::new(port, protocol)
            };
            gate.add_grant(id, addr, expires).expect("add grant");
            model.add_grant(id, addr, expires);
        }

        for _ in 0..PACKETS_PER_ROUND {
            cases += 1;
            let protocol = *Protocol::ALL.choose(&mut rng).expect("not empty");
            let in_container = rng.random_bool(0.3);
            // Mostly managed ports, sometimes just outside the range; in the container,
            // mostly its own ports.
            let dport = match rng.random_range(0..20) {
                0 => MIN_PORT - 1,
                1 => MAX_PORT + 1,
                2..=11 if in_container => *CONTAINER_PORTS.choose(&mut rng).expect("ports"),
                _ => rng.random_range(MIN_PORT..=MAX_PORT),
            };
            let source = *pool.choose(&mut rng).expect("not empty");
            let destination: IpAddr = if source.is_ipv4() {
                Ipv4Addr::new(198, 19, 0, 1).into()
            } else {
                Ipv6Addr::new(0xfd00, 0x7067, 1, 0, 0, 0, 0, 1).into()
            };
            next_sport = next_sport.checked_add(1).unwrap_or(1_024);
            let (syn, ack, fin, rst, psh) = *TCP_FLAG_SETS.choose(&mut rng).expect("not empty");
            let spec = PacketSpec {
                protocol,
                source,
                destination,
                sport: next_sport,
                dport,
                syn,
                ack,
                fin,
                rst,
                psh,
                seq: rng.random(),
                payload: vec![0xab; rng.random_range(0..64)],
                ipv6_extension_headers: if source.is_ipv6() {
                    rng.random_range(0..=2)
                } else {
                    0
                },
            };
            let frame = build_packet(&spec);
            let mut packet = match protocol {
                Protocol::Tcp => Packet::tcp(source, dport, syn, ack),
                Protocol::Udp => Packet::udp(source, dport),
            };
            if in_container {
                packet.netns = container;
            }
            let verdict = decide(&model, &packet, monotonic_now_ns());
            // Everything is counted under the allocation a packet is for.
            let home = model
                .policy(packet.port())
                .map_or(packet.port(), |(home, _)| home);
            // A SYN takes a slot only on a limited port (an unlimited one takes none).
            let limited = model
                .policy(packet.port())
                .is_some_and(|(_, policy)| policy.access.max_connections != 0);
            if verdict == Verdict::Accept && protocol == Protocol::Tcp && limited {
                model.add_slot(home);
            }
            let (hook_kind, hook_index, bytes) = if rng.random_bool(0.5) {
                (PacketHook::Xdp, usize::from(hook::XDP), frame.len())
            } else {
                // cgroup_skb sees the packet from its IP header.
                (
                    PacketHook::CgroupSkb,
                    usize::from(hook::SKB),
                    frame.len() - 14,
                )
            };
            let outcome = if !in_container {
                gate.test_run(hook_kind, &frame, 1)
            } else if hook_kind == PacketHook::Xdp {
                gate.set_interface_netns(LOOPBACK_IFINDEX, container)
                    .expect("route loopback to the container");
                let outcome = gate.test_run(hook_kind, &frame, 1);
                gate.set_interface_netns(LOOPBACK_IFINDEX, NetnsId::HOST)
                    .expect("route loopback back to the host");
                outcome
            } else {
                container_ns.run(|| gate.test_run(hook_kind, &frame, 1))
            }
            .expect("BPF_PROG_TEST_RUN");
            assert_eq!(
                outcome.passed,
                verdict.passes(),
                "round {round}: {hook_kind:?} verdict differs for {spec:?}: userspace says \
                 {verdict:?}, policy {:?}",
                model.policy(packet.port()),
            );
            if let Verdict::Drop(reason) = verdict {
                *by_reason.entry(reason.name()).or_default() += 1;
            }
            expected.record(home, hook_index, bytes as u64, verdict);
        }
        // Drained every round, so the ring buffer never fills.
        deny_events.extend(events.drain());
    }

    let kernel = gate.all_counters().expect("read counters");
    for (key, hooks) in &expected.counters {
        let got = kernel.get(key).copied().unwrap_or_default();
        for hook_code in [hook::XDP, hook::SKB] {
            let index = usize::from(hook_code);
            assert_eq!(
                got.hooks[index],
                hooks[index],
                "counters of {key:?} in hook {} differ",
                hook::name(hook_code)
            );
        }
    }
    for key in kernel.keys() {
        assert!(
            expected.counters.contains_key(key),
            "the kernel counted {key:?}, which the userspace verdict left untouched"
        );
    }

    assert_eq!(
        deny_events.len(),
        expected.drops,
        "one deny event per drop (rate limit far above the test's rate)"
    );
    for reason_code in DropReason::ALL {
        let name = reason_code.name();
        let events_for = deny_events.iter().filter(|e| e.reason == name).count();
        assert_eq!(
            events_for,
            by_reason.get(name).copied().unwrap_or(0),
            "events for {name}"
        );
    }
    for reason_code in DropReason::ALL {
        assert!(
            by_reason.get(reason_code.name()).copied().unwrap_or(0) > 0,
            "the generated cases never hit {reason_code}: widen the generator"
        );
    }
    println!(
        "{cases} packets over {} policies, drops by reason: {by_reason:?}",
        POLICY_ROUNDS * usize::from(MAX_PORT - MIN_PORT + 1) * Protocol::ALL.len()
    );
    drop(events);
    drop(gate);
    portgate::gate::uninstall(pins.path()).expect("uninstall");
}
