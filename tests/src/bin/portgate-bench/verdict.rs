//! Section 1: what the in-kernel verdict costs per packet, as the kernel itself times it
//! with `BPF_PROG_TEST_RUN` (the average of `repeat` runs on one made-up packet).
//!
//! Every verdict is measured in a set of "worlds": a gate holding 1 or 10,000 allocated
//! ports, whose measured port lists 1, 1,000 or 100,000 disjoint prefixes (the source of
//! the packet in one of them), for IPv4 and for IPv6. Each world is its own gate in its own
//! pin directory; nothing is attached, the programs run against the live maps.
//!
//! Each case uses a packet that takes the same path on every repeat: a verdict that keeps
//! state (a SYN that passes reserves a connection slot) is measured on packets that do not
//! (an ACK for `pass`; a SYN at a port whose one slot is already held for `conn_limit`).
//! Before it is timed, each case is checked against the per-port counters; after, the
//! counters must show every run took the expected path, or the case is reported as failed.
//!
//! Deny events run at the product's default rate (100 per second per port), so nearly every
//! denial takes the rate limiter's path; one row measures a denial with events off. With
//! nothing attached, the XDP-to-`cgroup_skb` hand-off is off (as with one hook attached).
//! A control world, 10,000 ports whose other ports list no prefix, tells the cost of more
//! policies from that of a larger allowlist trie.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    panic,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, ensure};
use ipnet::IpNet;
use portgate::{
    gate::{Gate, GateSettings, GateStats, HookCounters, PacketHook},
    model::{Allowlist, PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::{defaults, hook, reason};
use portgate_tests::common::{
    PinDir,
    packet::{PacketSpec, build_packet},
    pin_to_cpu0,
};
use serde_json::json;

use crate::{
    Options,
    report::{Figure, number},
};

/// The section's title, which its figures carry.
pub const SECTION: &str = "1. In-kernel verdict (BPF_PROG_TEST_RUN)";

/// The gate's managed range: 20,000 ports, room for 10,000 allocated ones and free ones.
const MIN_PORT: u16 = 20_000;
const MAX_PORT: u16 = 39_999;
/// The port whose verdicts are measured; the other allocated ports are 20,000..=29,999.
const MEASURED_PORT: u16 = 25_000;
/// In the range, never allocated.
const UNALLOCATED_PORT: u16 = 35_000;
/// Outside the range.
const OUTSIDE_PORT: u16 = 40_001;

/// Allocated ports in a world (the measured one included).
const PORT_COUNTS: [u32; 2] = [1, 10_000];
/// Prefixes in the measured port's allowlist.
const PREFIX_COUNTS: [u32; 3] = [1, 1_000, 100_000];

/// Runs before timing, which also create the per-CPU counter row and the event-rate entry
/// a first packet creates.
const WARM_UP: u32 = 10_000;
/// A reservation must outlive the whole section, or the held slot of the `conn_limit`
/// case would be swept away and its SYNs would start to pass.
const PENDING_TTL: Duration = Duration::from_hours(1);

const TARGET: &str = "< 100 ns, flat (ours)";
const TARGET_NS: f64 = 100.0;
const SPREAD_TARGET: &str = "<= 1.5x (flat)";
const SPREAD_MAX: f64 = 1.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Verdict {
    Pass,
    NewConnection,
    NotAllowed,
    ConnLimit,
    AuthRequired,
    Unallocated,
    OutsideRange,
}

impl Verdict {
    const ALL: [Self; 7] = [
        Self::Pass,
        Self::NewConnection,
        Self::NotAllowed,
        Self::ConnLimit,
        Self::AuthRequired,
        Self::Unallocated,
        Self::OutsideRange,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Pass => "pass",
            Self::NewConnection => "new connection",
            Self::NotAllowed => "not_allowed",
            Self::ConnLimit => "conn_limit",
            Self::AuthRequired => "auth_required",
            Self::Unallocated => "unallocated",
            Self::OutsideRange => "outside the range",
        }
    }

    /// The packet each run judges, in words.
    fn packet(self) -> &'static str {
        match self {
            // cgroup_skb: the established-flow fast path after a call's first run (the
            // test run's socket remembers the generation it passed under); XDP has no
            // socket and checks the allowlist every time.
            Self::Pass => "TCP ACK (established flow) from an allowed source",
            Self::NewConnection => "TCP SYN from an allowed source, the port without a limit",
            Self::NotAllowed => "TCP SYN from a source in no listed prefix",
            Self::ConnLimit => "TCP SYN from an allowed source, the port's one slot held",
            Self::AuthRequired => "TCP SYN from an allowed source without a grant",
            Self::Unallocated => "TCP SYN to a managed port without a policy",
            Self::OutsideRange => "TCP SYN to a port outside the managed range",
        }
    }

    fn port(self) -> u16 {
        match self {
            Self::Unallocated => UNALLOCATED_PORT,
            Self::OutsideRange => OUTSIDE_PORT,
            _ => MEASURED_PORT,
        }
    }

    /// The drop reason it must be counted under; `None` when it passes.
    fn drop_code(self) -> Option<u8> {
        match self {
            Self::Pass | Self::NewConnection | Self::OutsideRange => None,
            Self::NotAllowed => Some(reason::NOT_ALLOWED),
            Self::ConnLimit => Some(reason::CONN_LIMIT),
            Self::AuthRequired => Some(reason::AUTH_REQUIRED),
            Self::Unallocated => Some(reason::UNALLOCATED),
        }
    }
}

fn hook_name(hook_kind: PacketHook) -> &'static str {
    match hook_kind {
        PacketHook::Xdp => "XDP",
        PacketHook::CgroupSkb => "cgroup_skb",
    }
}

fn hook_index(hook_kind: PacketHook) -> usize {
    usize::from(match hook_kind {
        PacketHook::Xdp => hook::XDP,
        PacketHook::CgroupSkb => hook::SKB,
    })
}

/// How much to run.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// `repeat` of one `BPF_PROG_TEST_RUN`.
    repeat: u32,
    /// Timed runs per case; the figure is their median.
    samples: usize,
}

/// A world's size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Scale {
    ports: u32,
    prefixes: u32,
    /// The other allocated ports list no prefix (normally each lists one): the control
    /// that tells the cost of more policies from that of a larger allowlist trie.
    bare_others: bool,
}

impl Scale {
    const fn new(ports: u32, prefixes: u32) -> Self {
        Self {
            ports,
            prefixes,
            bare_others: false,
        }
    }

    /// Prefixes in the whole allowlist trie (every port's).
    fn trie_prefixes(self) -> u32 {
        self.prefixes + if self.bare_others { 0 } else { self.ports - 1 }
    }

    fn is_base(self) -> bool {
        self == Self::new(PORT_COUNTS[0], PREFIX_COUNTS[0])
    }
}

impl fmt::Display for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u32, one: &str, many: &str| {
            format!("{} {}", count(n), if n == 1 { one } else { many })
        };
        write!(
            f,
            "{}{}, {}",
            plural(self.ports, "port", "ports"),
            if self.bare_others {
                " (the others without allowlists)"
            } else {
                ""
            },
            plural(self.prefixes, "prefix", "prefixes")
        )
    }
}

/// A count, thousands separated.
fn count(n: u32) -> String {
    number(f64::from(n))
        .split('.')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// One case's timing.
#[derive(Clone, Debug)]
struct Measurement {
    /// The kernel's ns per run, one per timed `BPF_PROG_TEST_RUN`.
    samples_ns: Vec<u128>,
    median_ns: f64,
    /// Over the timed runs: deny events sent, rate-limited and lost (the ring buffer is
    /// not read), and sweeps of expired reservations.
    events_sent: u64,
    events_rate_limited: u64,
    events_lost_full: u64,
    pending_sweeps: u64,
    /// Wall-clock time of the timed runs.
    wall: Duration,
}

/// What one case is, for its figure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    family: Family,
    verdict: Verdict,
    hook_kind: HookKey,
    scale: Scale,
    events_off: bool,
}

/// `PacketHook` with an order, for the result table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum HookKey {
    Skb,
    Xdp,
}

impl HookKey {
    fn hook(self) -> PacketHook {
        match self {
            Self::Skb => PacketHook::CgroupSkb,
            Self::Xdp => PacketHook::Xdp,
        }
    }
}

/// A gate set up at one scale for one family, with the addresses its packets use.
struct World {
    // The gate goes before its pin directory is removed (fields drop in this order).
    gate: Gate,
    pins: PinDir,
    /// The gate's deny-event rate; 0 is off.
    events_per_sec: u32,
    /// The measured port's allowlist.
    allow: Allowlist,
    /// In one of the listed prefixes.
    allowed: IpAddr,
    /// In the same /8 (or /16 for IPv6) as the listed prefixes, in none of them.
    stranger: IpAddr,
    destination: IpAddr,
}

/// The `i`-th of 2^20 blocks, spread over the space rather than packed: the multiplier is
/// odd, so this is a permutation of 0..2^20.
fn block(i: u32) -> u32 {
    i.wrapping_mul(0x9E37_79B1) & 0xF_FFFF
}

/// The measured port's `count` disjoint prefixes: IPv4 /28s in 10.0.0.0/8, IPv6 /64s in
/// `fd00::/44`; and an address in the middle one, and one in a block that is not listed.
fn measured_prefixes(family: Family, count: u32) -> (Allowlist, IpAddr, IpAddr) {
    let net = |b: u32, host: u32| -> (IpNet, IpAddr) {
        match family {
            Family::V4 => {
                let base = 0x0A00_0000 | (b << 4);
                (
                    IpNet::new(IpAddr::V4(Ipv4Addr::from(base)), 28).expect("a /28"),
                    IpAddr::V4(Ipv4Addr::from(base | host)),
                )
            }
            Family::V6 => {
                let base = (0xfd00_u128 << 112) | (u128::from(b) << 64);
                (
                    IpNet::new(IpAddr::V6(Ipv6Addr::from(base)), 64).expect("a /64"),
                    IpAddr::V6(Ipv6Addr::from(base | u128::from(host))),
                )
            }
        }
    };
    let blocks: Vec<u32> = (0..count).map(block).collect();
    let used: BTreeSet<u32> = blocks.iter().copied().collect();
    let chosen = blocks[blocks.len() / 2];
    let free = (1..=0xF_FFFF)
        .map(|step| (chosen + step) & 0xF_FFFF)
        .find(|b| !used.contains(b))
        .expect("a free block");
    let allow = blocks.iter().map(|&b| net(b, 0).0).collect();
    (allow, net(chosen, 5).1, net(free, 5).1)
}

/// One prefix for the `k`-th other allocated port: a /24 or a /48.
fn other_prefix(family: Family, k: u32) -> IpNet {
    match family {
        Family::V4 => IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0A00_0000 | (k << 8))), 24),
        Family::V6 => IpNet::new(
            IpAddr::V6(Ipv6Addr::from((0xfd01_u128 << 112) | (u128::from(k) << 80))),
            48,
        ),
    }
    .expect("a prefix")
}

impl World {
    fn new(family: Family, scale: Scale, events_per_sec: u32) -> Result<Self> {
        let pins = PinDir::new();
        let gate = install(&pins, events_per_sec)?;
        let (allow, allowed, stranger) = measured_prefixes(family, scale.prefixes);
        let destination = match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1)),
            Family::V6 => IpAddr::V6(Ipv6Addr::new(0xfd02, 0, 0, 0, 0, 0, 0, 1)),
        };
        let mut world = Self {
            gate,
            pins,
            events_per_sec,
            allow,
            allowed,
            stranger,
            destination,
        };
        // The other allocated ports: each lists one prefix of its own.
        let others = (MIN_PORT..MIN_PORT + 10_000)
            .filter(|&port| port != MEASURED_PORT)
            .take(usize::try_from(scale.ports - 1)?);
        for (k, port) in (0_u32..).zip(others) {
            let allow = if scale.bare_others {
                Allowlist::default()
            } else {
                std::iter::once(other_prefix(family, k)).collect()
            };
            let policy = PortPolicy {
                access: PortAccessControl {
                    allowed_ips: allow,
                    ..PortAccessControl::default()
                },
                ..PortPolicy::default()
            };
            world
                .gate
                .set_policy(PortId::new(port, Protocol::Tcp), &policy)
                .with_context(|| format!("allocating port {port}"))?;
        }
        world.set_measured_policy(0, false)?;
        Ok(world)
    }

    fn set_measured_policy(&mut self, max_connections: u32, require_auth: bool) -> Result<()> {
        let policy = PortPolicy {
            access: PortAccessControl {
                allowed_ips: self.allow.clone(),
                max_connections,
                require_authentication: require_auth,
            },
            ..PortPolicy::default()
        };
        self.gate
            .set_policy(PortId::new(MEASURED_PORT, Protocol::Tcp), &policy)
            .with_context(|| format!("setting the policy of port {MEASURED_PORT}"))
    }

    /// Sets the measured port's policy for `verdict`; for `conn_limit`, takes its one slot
    /// with a SYN whose reservation outlives the section.
    fn prepare(&mut self, verdict: Verdict) -> Result<()> {
        match verdict {
            Verdict::AuthRequired => self.set_measured_policy(0, true),
            Verdict::ConnLimit => {
                self.set_measured_policy(1, false)?;
                if self.gate.slots(PortId::from(MEASURED_PORT))?.slots == 0 {
                    let holder = self.syn(self.allowed, 40_000, MEASURED_PORT);
                    let outcome = self.gate.test_run(PacketHook::CgroupSkb, &holder, 1)?;
                    ensure!(
                        outcome.passed,
                        "the SYN that takes the one slot was dropped"
                    );
                }
                let slots = self.gate.slots(PortId::from(MEASURED_PORT))?.slots;
                ensure!(slots == 1, "the port holds {slots} slots, not 1");
                Ok(())
            }
            _ => self.set_measured_policy(0, false),
        }
    }

    fn tcp(&self, source: IpAddr, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
        build_packet(&PacketSpec {
            protocol: Protocol::Tcp,
            source,
            destination: self.destination,
            sport,
            dport,
            syn,
            ack: !syn,
            fin: false,
            rst: false,
            psh: false,
            seq: 1_000,
            payload: Vec::new(),
            ipv6_extension_headers: 0,
        })
    }

    fn syn(&self, source: IpAddr, sport: u16, dport: u16) -> Vec<u8> {
        self.tcp(source, sport, dport, true)
    }

    fn packet(&self, verdict: Verdict) -> Vec<u8> {
        match verdict {
            Verdict::Pass => self.tcp(self.allowed, 41_000, MEASURED_PORT, false),
            Verdict::NewConnection => self.syn(self.allowed, 41_006, MEASURED_PORT),
            Verdict::NotAllowed => self.syn(self.stranger, 41_001, MEASURED_PORT),
            // Another 4-tuple than the one holding the slot.
            Verdict::ConnLimit => self.syn(self.allowed, 41_002, MEASURED_PORT),
            Verdict::AuthRequired => self.syn(self.allowed, 41_003, MEASURED_PORT),
            Verdict::Unallocated => self.syn(self.allowed, 41_004, UNALLOCATED_PORT),
            Verdict::OutsideRange => self.syn(self.allowed, 41_005, OUTSIDE_PORT),
        }
    }

    fn counters(&self, verdict: Verdict, hook_kind: PacketHook) -> Result<HookCounters> {
        let id = PortId::new(verdict.port(), Protocol::Tcp);
        Ok(self.gate.counters(id)?.hooks[hook_index(hook_kind)])
    }

    /// Runs `verdict`'s packet `runs` times in `BPF_PROG_TEST_RUN`s of `repeat`, and checks
    /// that every run gave the verdict and was counted under it. Returns the kernel's ns
    /// per run of each call.
    fn run_checked(
        &mut self,
        verdict: Verdict,
        hook_kind: PacketHook,
        repeat: u32,
        calls: usize,
    ) -> Result<Vec<u128>> {
        let packet = self.packet(verdict);
        let before = self.counters(verdict, hook_kind)?;
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let outcome = self.gate.test_run(hook_kind, &packet, repeat)?;
            let expected = verdict.drop_code().is_none();
            ensure!(
                outcome.passed == expected,
                "the packet {} where it should {}",
                if outcome.passed {
                    "passed"
                } else {
                    "was dropped"
                },
                if expected { "pass" } else { "be dropped" }
            );
            samples.push(outcome.duration.as_nanos());
        }
        let after = self.counters(verdict, hook_kind)?;
        let runs = u64::from(repeat) * u64::try_from(calls)?;
        check_counted(verdict, &before, &after, runs)?;
        Ok(samples)
    }

    fn measure(
        &mut self,
        verdict: Verdict,
        hook_kind: PacketHook,
        plan: Plan,
    ) -> Result<Measurement> {
        self.prepare(verdict)?;
        self.run_checked(verdict, hook_kind, WARM_UP, 1)
            .context("the check before timing")?;
        let stats_before = self.gate.stats()?;
        let clock = Instant::now();
        let samples_ns = self
            .run_checked(verdict, hook_kind, plan.repeat, plan.samples)
            .context("the timed runs")?;
        let wall = clock.elapsed();
        let stats = stats_delta(&stats_before, &self.gate.stats()?);
        let denials = if verdict.drop_code().is_some() && self.events_per_sec > 0 {
            u64::from(plan.repeat) * u64::try_from(plan.samples)?
        } else {
            0
        };
        Ok(Measurement {
            median_ns: median(&samples_ns),
            samples_ns,
            events_sent: denials.saturating_sub(stats.events_rate_limited + stats.events_lost_full),
            events_rate_limited: stats.events_rate_limited,
            events_lost_full: stats.events_lost_full,
            pending_sweeps: stats.pending_sweeps,
            wall,
        })
    }
}

fn install(pins: &PinDir, events_per_sec: u32) -> Result<Gate> {
    Gate::install(&GateSettings {
        pin_dir: pins.path().to_owned(),
        min_port: MIN_PORT,
        max_port: MAX_PORT,
        events_per_sec,
        pending_ttl: PENDING_TTL,
        ..GateSettings::default()
    })
    .context("installing the gate")
}

/// Whether the counters moved by exactly `runs` packets under `verdict` and nothing else.
fn check_counted(
    verdict: Verdict,
    before: &HookCounters,
    after: &HookCounters,
    runs: u64,
) -> Result<()> {
    let packets = after.packets - before.packets;
    let accepted = after.accepted - before.accepted;
    let dropped: Vec<u64> = after
        .dropped
        .iter()
        .zip(before.dropped)
        .map(|(a, b)| a - b)
        .collect();
    let counted = |code: u8| dropped[reason::drop_index(code)];
    let expected_packets = if verdict == Verdict::OutsideRange {
        0
    } else {
        runs
    };
    let expected_accepted = if verdict == Verdict::NewConnection {
        runs
    } else {
        0
    };
    let right = packets == expected_packets
        && accepted == expected_accepted
        && match verdict.drop_code() {
            Some(code) => counted(code) == runs && dropped.iter().sum::<u64>() == runs,
            None => dropped.iter().all(|&d| d == 0),
        };
    if right {
        return Ok(());
    }
    let reasons: Vec<String> = (1..=u8::try_from(reason::DROP_COUNT)?)
        .filter(|&code| counted(code) > 0)
        .map(|code| format!("{} {}", counted(code), reason::name(code)))
        .collect();
    Err(anyhow!(
        "expected {runs} runs counted as {}, the counters show {packets} packets, {accepted} \
         accepted, dropped: [{}]",
        verdict.drop_code().map_or("passed", reason::name),
        reasons.join(", ")
    ))
}

fn stats_delta(before: &GateStats, after: &GateStats) -> GateStats {
    GateStats {
        events_lost_full: after.events_lost_full - before.events_lost_full,
        events_rate_limited: after.events_rate_limited - before.events_rate_limited,
        pending_full: after.pending_full - before.pending_full,
        sockets_full: after.sockets_full - before.sockets_full,
        pending_port_full: after.pending_port_full - before.pending_port_full,
        unparsable: after.unparsable - before.unparsable,
        unreserved: after.unreserved - before.unreserved,
        pending_sweeps: after.pending_sweeps - before.pending_sweeps,
    }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "nanoseconds per run are small numbers"
)]
fn median(samples: &[u128]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[middle] as f64
    } else {
        (sorted[middle - 1] + sorted[middle]) as f64 / 2.0
    }
}

/// The section: measured on a thread of its own, pinned to CPU 0 so that consecutive runs
/// see the same per-CPU state, without pinning the threads of the sections that follow.
pub fn run(options: &Options) -> Vec<Figure> {
    let plan = Plan {
        repeat: options.pick(2_000_000, 1_000_000),
        samples: options.pick(5, 3),
    };
    match std::thread::spawn(move || measure_all(plan)).join() {
        Ok(figures) => figures,
        Err(payload) => panic::resume_unwind(payload),
    }
}

type Results = BTreeMap<Case, Result<Measurement, String>>;

fn measure_all(plan: Plan) -> Vec<Figure> {
    pin_to_cpu0();
    let mut results: Results = BTreeMap::new();
    for family in [Family::V4, Family::V6] {
        for ports in PORT_COUNTS {
            for prefixes in PREFIX_COUNTS {
                let scale = Scale::new(ports, prefixes);
                measure_world(family, scale, &Verdict::ALL, plan, &mut results);
            }
        }
        let control = Scale {
            bare_others: true,
            ..Scale::new(PORT_COUNTS[1], PREFIX_COUNTS[2])
        };
        measure_world(family, control, &[Verdict::Pass], plan, &mut results);
    }
    figures(&results, plan)
}

/// Every case of one world; a world that cannot be set up fails all its cases.
fn measure_world(
    family: Family,
    scale: Scale,
    verdicts: &[Verdict],
    plan: Plan,
    results: &mut Results,
) {
    let clock = Instant::now();
    let case = |verdict, hook_kind, events_off| Case {
        family,
        verdict,
        hook_kind,
        scale,
        events_off,
    };
    let mut hooks = vec![HookKey::Skb];
    if scale.is_base() {
        hooks.push(HookKey::Xdp);
    }
    let mut world = match World::new(family, scale, defaults::EVENTS_PER_SEC) {
        Ok(world) => world,
        Err(err) => {
            for &verdict in verdicts {
                for &hook_kind in &hooks {
                    results.insert(
                        case(verdict, hook_kind, false),
                        Err(format!("set-up: {err:#}")),
                    );
                }
            }
            return;
        }
    };
    let set_up = clock.elapsed();
    for &verdict in verdicts {
        for &hook_kind in &hooks {
            let outcome = world
                .measure(verdict, hook_kind.hook(), plan)
                .map_err(|err| format!("{err:#}"));
            results.insert(case(verdict, hook_kind, false), outcome);
        }
    }
    if scale.is_base() {
        // The same denial with deny events off: what the per-port rate limiter costs.
        let events_off = install(&world.pins, 0).and_then(|gate| {
            world.gate = gate;
            world.events_per_sec = 0;
            world.measure(Verdict::NotAllowed, PacketHook::CgroupSkb, plan)
        });
        results.insert(
            case(Verdict::NotAllowed, HookKey::Skb, true),
            events_off.map_err(|err| format!("{err:#}")),
        );
    }
    eprintln!(
        "portgate-bench:   {family}, {scale}: set up in {:.1} s, measured in {:.1} s",
        set_up.as_secs_f64(),
        clock.elapsed().saturating_sub(set_up).as_secs_f64()
    );
}

fn figures(results: &Results, plan: Plan) -> Vec<Figure> {
    let mut figures = Vec::new();
    for family in [Family::V4, Family::V6] {
        for verdict in Verdict::ALL {
            let (grid, others): (Vec<_>, Vec<_>) = results
                .iter()
                .filter(|(case, _)| case.family == family && case.verdict == verdict)
                .partition(|(case, _)| {
                    case.hook_kind == HookKey::Skb && !case.events_off && !case.scale.bare_others
                });
            for (case, outcome) in &grid {
                figures.push(figure(case, outcome, plan));
            }
            figures.push(spread(family, verdict, &grid));
            // Then XDP, deny events off, and the control, in that order.
            let mut others = others;
            others.sort_by_key(|(case, _)| Reverse((case.hook_kind, case.events_off)));
            for (case, outcome) in others {
                figures.push(figure(case, outcome, plan));
            }
        }
    }
    figures
}

fn figure(case: &Case, outcome: &Result<Measurement, String>, plan: Plan) -> Figure {
    let hook_kind = case.hook_kind.hook();
    let name = format!(
        "{} {} {}: {}; {}{}",
        hook_name(hook_kind),
        case.family,
        case.verdict.name(),
        case.verdict.packet(),
        case.scale,
        if case.events_off {
            "; deny events off"
        } else {
            ""
        }
    );
    let raw = json!({
        "hook": hook_name(hook_kind),
        "family": case.family.to_string(),
        "verdict": case.verdict.name(),
        "packet": case.verdict.packet(),
        "dport": case.verdict.port(),
        "allocated_ports": case.scale.ports,
        "prefixes_on_port": case.scale.prefixes,
        "prefixes_in_trie": case.scale.trie_prefixes(),
        "events_per_sec": if case.events_off { 0 } else { defaults::EVENTS_PER_SEC },
        "repeat": plan.repeat,
        "warm_up_runs": WARM_UP,
    });
    match outcome {
        Ok(m) => {
            let mut raw = raw;
            raw["samples_ns_per_run"] = json!(m.samples_ns);
            raw["median_ns_per_run"] = json!(m.median_ns);
            raw["wall_s"] = json!(m.wall.as_secs_f64());
            raw["deny_events"] = json!({
                "sent": m.events_sent,
                "rate_limited": m.events_rate_limited,
                "lost_ring_full": m.events_lost_full,
            });
            raw["pending_sweeps"] = json!(m.pending_sweeps);
            Figure::measured(SECTION, name, m.median_ns, "ns/packet")
                .target(TARGET, |v| v < TARGET_NS)
                .raw(raw)
        }
        Err(err) => Figure::failed(SECTION, name, err)
            .target(TARGET, |_| false)
            .raw(raw),
    }
}

/// Largest over smallest median of one verdict across every scale.
fn spread(
    family: Family,
    verdict: Verdict,
    grid: &[(&Case, &Result<Measurement, String>)],
) -> Figure {
    let counts = |counts: &[u32]| {
        counts
            .iter()
            .map(|&n| count(n))
            .collect::<Vec<_>>()
            .join("/")
    };
    let name = format!(
        "cgroup_skb {family} {}: spread over {} ports x {} prefixes (max/min median)",
        verdict.name(),
        counts(&PORT_COUNTS),
        counts(&PREFIX_COUNTS),
    );
    let medians: Vec<(String, f64)> = grid
        .iter()
        .filter_map(|(case, outcome)| {
            outcome
                .as_ref()
                .ok()
                .map(|m| (case.scale.to_string(), m.median_ns))
        })
        .collect();
    let raw = json!(medians.iter().cloned().collect::<BTreeMap<_, _>>());
    if medians.len() < grid.len() || medians.is_empty() {
        return Figure::failed(
            SECTION,
            name,
            format!(
                "{} of {} scales failed",
                grid.len() - medians.len(),
                grid.len()
            ),
        )
        .target(SPREAD_TARGET, |_| false)
        .raw(raw);
    }
    let max = medians.iter().map(|(_, v)| *v).fold(f64::MIN, f64::max);
    let min = medians.iter().map(|(_, v)| *v).fold(f64::MAX, f64::min);
    Figure::measured(SECTION, name, max / min, "x")
        .target(SPREAD_TARGET, |v| v <= SPREAD_MAX)
        .raw(raw)
}
