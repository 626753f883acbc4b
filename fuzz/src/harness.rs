//! The gate the `packet_verdict` target judges frames with: installed once per process in
//! its own bpffs pin directory (`/sys/fs/bpf/portgate-fuzz-<pid>`, uninstalled at exit, and
//! a dead process's left behind is removed by the next run), with a few ports under
//! allowlists, limits, authentication and draining, in the host's namespace and in a
//! container's, and the userspace model ([`GateModel`]) holding the same policies.
//!
//! [`Harness::judge`] runs one frame through a kernel program with `BPF_PROG_TEST_RUN`
//! and through the userspace verdict, and says where they differ, on the packet's fate and
//! on its drop reason (the deny event's), as the differential kernel test compares them.
//!
//! The kernel keeps state the userspace verdict does not: a SYN admitted to a limited port
//! holds a reservation for its flow, and the flow's next SYN passes on it without taking
//! a slot (a retransmission). The harness models that; every input starts on a new epoch
//! of the limited ports, so slots and reservations of earlier inputs never count.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use portgate::{
    gate::{DenyEvents, Gate, GateSettings, PacketHook},
    host::kernel::monotonic_now_ns,
    model::{DropReason, NetnsId, PortAccessControl, PortId, PortPolicy, PortStatus, Protocol},
    verdict::{GateModel, GateView as _, Packet, Verdict, decide},
};

use crate::frame::{self, Fields, Hook, Read};

/// The managed range.
pub const MIN_PORT: u16 = 20_000;
/// The managed range.
pub const MAX_PORT: u16 = 20_015;
/// The container's namespace: XDP is told that loopback carries its traffic. A cookie no
/// namespace has: XDP takes the namespace from the map, not from the kernel.
pub const CONTAINER: NetnsId = NetnsId(0x7067_0000_0001);
const LOOPBACK_IFINDEX: u32 = 1;
const PIN_PREFIX: &str = "portgate-fuzz-";

/// One port's policy in the harness.
struct Port {
    id: PortId,
    policy: PortPolicy,
}

fn prefixes(list: &[&str]) -> portgate::model::Allowlist {
    list.iter()
        .map(|p| p.parse::<IpNet>().expect("prefix"))
        .collect()
}

fn policy(status: PortStatus, allow: &[&str], max: u32, auth: bool) -> PortPolicy {
    PortPolicy {
        status,
        access: PortAccessControl {
            allowed_ips: prefixes(allow),
            max_connections: max,
            require_authentication: auth,
        },
        ..PortPolicy::default()
    }
}

/// The ports: every step of the verdict is met by one of them; the seeds
/// (`fuzz/seeds/packet_verdict/`) send to each.
fn ports() -> Vec<Port> {
    use PortStatus::{Active, Closed, Draining};
    let host = |port, protocol, policy| Port {
        id: PortId::new(port, protocol),
        policy,
    };
    let container = |port, protocol, policy| Port {
        id: PortId {
            netns: CONTAINER,
            ..PortId::new(port, protocol)
        },
        policy,
    };
    vec![
        host(20_000, Protocol::Tcp, policy(Active, &[], 0, false)),
        host(20_000, Protocol::Udp, policy(Active, &[], 0, false)),
        host(
            20_001,
            Protocol::Tcp,
            policy(Active, &["198.18.0.0/24", "fd00:7067::/32"], 2, false),
        ),
        host(20_002, Protocol::Tcp, policy(Active, &[], 1, true)),
        host(
            20_003,
            Protocol::Tcp,
            policy(Draining, &["198.18.0.0/16"], 0, false),
        ),
        host(
            20_004,
            Protocol::Udp,
            policy(Active, &["203.0.113.0/25", "2001:db8::/48"], 0, true),
        ),
        host(20_005, Protocol::Udp, policy(Closed, &[], 0, false)),
        host(
            20_006,
            Protocol::Tcp,
            policy(Active, &["0.0.0.0/0"], 1, false),
        ),
        container(
            80,
            Protocol::Tcp,
            PortPolicy {
                published: Some(20_010),
                ..policy(Active, &["198.18.0.0/16"], 1, false)
            },
        ),
        container(20_001, Protocol::Tcp, policy(Active, &[], 0, true)),
        container(
            443,
            Protocol::Udp,
            PortPolicy {
                published: Some(20_011),
                ..policy(Active, &[], 0, false)
            },
        ),
    ]
}

/// Grants: (port, source, whether it is still valid).
fn grants() -> Vec<(PortId, IpAddr, bool)> {
    let v4 = |d| IpAddr::V4(Ipv4Addr::new(198, 18, 0, d));
    let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0x7067, 0, 0, 0, 0, 0, 1));
    vec![
        (PortId::new(20_002, Protocol::Tcp), v4(1), true),
        (PortId::new(20_002, Protocol::Tcp), v4(2), false),
        (PortId::new(20_002, Protocol::Tcp), v6, true),
        (
            PortId::new(20_004, Protocol::Udp),
            IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
            true,
        ),
        (
            PortId {
                netns: CONTAINER,
                ..PortId::new(20_001, Protocol::Tcp)
            },
            v6,
            true,
        ),
    ]
}

/// Where the kernel and the userspace verdict differ on one frame.
#[derive(Debug)]
pub struct Divergence {
    /// What the reference parser read.
    pub read: Read,
    /// What the userspace verdict (with the reservation model) expects.
    pub expected: Expected,
    /// Whether the kernel passed it.
    pub passed: bool,
    /// The drop reasons of the deny events it wrote.
    pub reasons: Vec<&'static str>,
}

/// What a frame should come to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Passes.
    Pass,
    /// Dropped for this reason, with a deny event.
    Drop(DropReason),
    /// Dropped as unreadable: no port, so no deny event.
    DropUnreadable,
}

/// The gate, its deny events, the model, and the reservations of the current input.
pub struct Harness {
    gate: Gate,
    events: DenyEvents,
    model: GateModel,
    pins: PathBuf,
    ports: Vec<Port>,
    epoch: u32,
    /// Flows (home port, source, source port) holding a reservation this input.
    held: HashSet<(PortId, IpAddr, u16)>,
}

impl Harness {
    /// Installs the gate in a new pin directory, with the harness's ports and grants.
    ///
    /// # Panics
    /// When the gate cannot be installed (not root, no bpffs or BTF).
    #[must_use]
    pub fn install() -> Self {
        remove_stale_pins();
        let pins = Path::new(portgate::paths::BPFFS_MOUNT)
            .join(format!("{PIN_PREFIX}{}", std::process::id()));
        portgate::host::mounts::prepare_pin_dir(&pins).expect("a pin directory on bpffs");
        let settings = GateSettings {
            pin_dir: pins.clone(),
            min_port: MIN_PORT,
            max_port: MAX_PORT,
            events_per_sec: 1_000_000,
            // Far longer than an input: no reservation expires in the middle of one.
            pending_ttl: Duration::from_secs(10),
            ..GateSettings::default()
        };
        let mut gate = Gate::install(&settings).expect("install the gate (as root)");
        let events = gate.events().expect("the deny events");
        let mut model = GateModel::new(MIN_PORT, MAX_PORT);
        let ports = ports();
        for port in &ports {
            gate.set_policy(port.id, &port.policy)
                .expect("set a policy");
            model.set_policy(port.id, port.policy.clone());
        }
        let now = monotonic_now_ns();
        for (id, source, valid) in grants() {
            let expires = if valid {
                now + Duration::from_hours(24 * 30).as_nanos() as u64
            } else {
                now - 1
            };
            gate.add_grant(id, source, expires).expect("add a grant");
            model.add_grant(id, source, expires);
        }
        Self {
            gate,
            events,
            model,
            pins,
            ports,
            epoch: 0,
            held: HashSet::new(),
        }
    }

    /// The pin directory, for [`uninstall`].
    #[must_use]
    pub fn pins(&self) -> &Path {
        &self.pins
    }

    /// Starts an input: a new epoch on every limited port, so that no slot or
    /// reservation of an earlier input counts.
    pub fn start_input(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.held.clear();
        for port in &mut self.ports {
            if port.policy.access.max_connections != 0 {
                port.policy.epoch = self.epoch;
                self.gate
                    .set_policy(port.id, &port.policy)
                    .expect("set a policy");
                self.model.set_policy(port.id, port.policy.clone());
            }
        }
        let _ = self.events.drain();
    }

    /// Judges `frame` with the kernel's `hook` (XDP for the container's namespace when
    /// `in_container`) and with the userspace verdict; `Err` says how they differ. A frame
    /// `BPF_PROG_TEST_RUN` does not take (under an Ethernet header) is not judged.
    ///
    /// # Panics
    /// When the test run itself fails.
    pub fn judge(
        &mut self,
        hook: Hook,
        in_container: bool,
        frame: &[u8],
    ) -> Result<(), Divergence> {
        let Some(read) = frame::read(hook, frame) else {
            return Ok(());
        };
        let netns = if in_container && hook == Hook::Xdp {
            CONTAINER
        } else {
            NetnsId::HOST
        };
        let expected = match read {
            Read::Other => Expected::Pass,
            Read::Unreadable => Expected::DropUnreadable,
            Read::Packet(fields) => self.expect(netns, &fields),
        };
        let Some(passed) = self.run(hook, netns, frame) else {
            return Ok(());
        };
        let reasons: Vec<&'static str> = self.events.drain().iter().map(|e| e.reason).collect();
        let agrees = match expected {
            Expected::Pass => passed && reasons.is_empty(),
            Expected::DropUnreadable => !passed && reasons.is_empty(),
            Expected::Drop(reason) => !passed && reasons == [reason.name()],
        };
        if agrees {
            Ok(())
        } else {
            Err(Divergence {
                read,
                expected,
                passed,
                reasons,
            })
        }
    }

    /// The userspace verdict on a packet, with the kernel's reservations modelled.
    fn expect(&mut self, netns: NetnsId, fields: &Fields) -> Expected {
        let mut packet = match fields.protocol {
            Protocol::Tcp => Packet::tcp(fields.source, fields.dport, fields.syn, fields.ack),
            Protocol::Udp => Packet::udp(fields.source, fields.dport),
        };
        packet.netns = netns;
        let verdict = decide(&self.model, &packet, monotonic_now_ns());
        let limited = self
            .model
            .policy(packet.port())
            .map(|(home, policy)| (home, policy.access.max_connections != 0));
        match (verdict, limited) {
            // A limited TCP port's new connection that gets this far takes a reservation
            // for its flow, or passes on the one it holds.
            (Verdict::Accept | Verdict::Drop(DropReason::ConnLimit), Some((home, true)))
                if fields.protocol == Protocol::Tcp =>
            {
                let flow = (home, fields.source, fields.sport);
                if self.held.contains(&flow) {
                    Expected::Pass
                } else if verdict == Verdict::Accept {
                    self.held.insert(flow);
                    self.model.add_slot(home);
                    Expected::Pass
                } else {
                    Expected::Drop(DropReason::ConnLimit)
                }
            }
            (Verdict::Drop(reason), _) => Expected::Drop(reason),
            (Verdict::Untouched | Verdict::Pass | Verdict::Accept, _) => Expected::Pass,
        }
    }

    /// The kernel's fate of `frame`: whether `hook` passes it; `None` when the test run
    /// refuses the frame, as it does a `cgroup_skb` frame whose IP header is cut short.
    ///
    /// # Panics
    /// When the test run fails on any other frame.
    fn run(&mut self, hook: Hook, netns: NetnsId, frame: &[u8]) -> Option<bool> {
        let kind = match hook {
            Hook::Xdp => PacketHook::Xdp,
            Hook::CgroupSkb => PacketHook::CgroupSkb,
        };
        if netns != NetnsId::HOST {
            self.gate
                .set_interface_netns(LOOPBACK_IFINDEX, netns)
                .expect("route loopback to the container");
        }
        let outcome = self.gate.test_run(kind, frame, 1);
        if netns != NetnsId::HOST {
            self.gate
                .set_interface_netns(LOOPBACK_IFINDEX, NetnsId::HOST)
                .expect("route loopback back to the host");
        }
        match outcome {
            Ok(outcome) => Some(outcome.passed),
            Err(_) if hook == Hook::CgroupSkb && frame::short_ip_header(frame) => None,
            Err(err) => panic!("BPF_PROG_TEST_RUN refused a frame: {err}"),
        }
    }
}

/// Uninstalls the gate pinned in `pins` and removes the directory.
pub fn uninstall(pins: &Path) {
    if let Err(err) = portgate::gate::uninstall(pins) {
        eprintln!("clean-up: uninstalling {}: {err}", pins.display());
    }
}

/// Removes the pin directories of fuzzing processes that are gone (killed, or stopped by
/// a crash before they could clean up).
fn remove_stale_pins() {
    let Ok(entries) = std::fs::read_dir(portgate::paths::BPFFS_MOUNT) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|name| name.strip_prefix(PIN_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            uninstall(&entry.path());
        }
    }
}
