//! Floods at a port with a connection limit (issue #15): raw SYNs with forged sources, from
//! inside the allowlist and from outside it, while legitimate clients connect and the API
//! is asked; forged RSTs and FINs with wrong sequence numbers at an established
//! connection; half-closed connections (`forged.rs`).
//!
//! The real daemon serves each port in its network namespace, with XDP on its end of a
//! veth pair whose other end is in a second test namespace, `outside`: the legitimate
//! clients connect from that end's address, and the floods are sent there through a raw
//! IPv4 socket (`IP_HDRINCL`), so that their sources can be any address. The daemon's
//! namespace routes the forged prefixes back through the veth, where nothing answers
//! (`outside` does not forward): every SYN the gate lets through is a half-open handshake
//! for good. Every flood is bounded in count and time; nothing leaves the test
//! namespaces.
//!
//! What is asserted exactly: every SYN the gate judges is counted once, whichever hook
//! judged it (XDP hands what it passed to `cgroup_skb`, which does not count it again), as
//! accepted (it made a reservation) or as dropped for one reason. So at the allowed flood,
//! `accepted + conn_limit` is the flood's SYNs plus the legitimate attempts' (one SYN
//! each), less only what the veth dropped before XDP as the interfaces count it (none in
//! every run so far), and no other reason counts anything; at the disallowed flood,
//! `not_allowed` is the flood's SYNs (less the same), all at XDP, and `accepted` the
//! legitimate clients admitted. Packet counts, which take in every other segment, are
//! reported, not asserted.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use portgate::{
    api::AllocRequest,
    client::Client,
    gate::{Gate, HookCounters},
    model::PortId,
};
use portgate_common::{defaults, hook, reason};
use portgate_tests::{
    common::{NetNs, Veth, connect_from, echo, listen_in, output},
    daemon::Daemon,
    require_privileges,
    stress::{percentile, report, size},
};
use serde_json::json;

mod forged;
mod raw;

use raw::flood;

/// The forged sources inside the allowlist: `10.77.0.0/16`.
const ALLOWED_FLOOD: [u8; 2] = [10, 77];
/// The forged sources outside it: `10.88.0.0/16`.
const DISALLOWED_FLOOD: [u8; 2] = [10, 88];
/// How long one legitimate attempt waits: below the first SYN retransmission (1 s), so
/// that each attempt sends exactly one SYN.
const ATTEMPT_WITHIN: Duration = Duration::from_millis(300);

/// A port of the real daemon, limited and allowlisted, reached over a veth pair from the
/// namespace `outside`. Fields drop in order: the gate handle first, the daemon (and its
/// pins) after, the outside namespace (and the veth) last.
struct Site {
    /// Another handle on the daemon's pinned gate, to read slots and counters.
    gate: Gate,
    daemon: Daemon,
    veth: Veth,
    outside: NetNs,
    id: PortId,
}

impl Site {
    /// A daemon managing `min..=min+9`, with XDP on its end of the veth, and one port
    /// allocated with `max_conns` that allows the veth's subnet and `allow`.
    fn new(min: u16, max_conns: u32, allow: &[&str]) -> Self {
        let mut daemon = Daemon::start(min, min + 9);
        let outside = NetNs::new();
        // What the gate lets through stays half-open: the outside namespace never forwards
        // the server's answers to the forged sources (nor anything else).
        outside.set_sysctl("/proc/sys/net/ipv4/ip_forward", "0");
        let veth = Veth::new(&outside, &daemon.ns);
        // XDP needs the interface at start-up: the daemon starts again with it.
        assert!(daemon.stop(), "the daemon stops on SIGTERM");
        let config = fs::read_to_string(&daemon.config).expect("read the config");
        let config = config.replacen(
            "[daemon]\n",
            &format!("[daemon]\nxdp_interfaces = [\"{}\"]\n", veth.b_name),
            1,
        );
        fs::write(&daemon.config, config).expect("write the config");
        daemon.spawn();
        let via = veth.v4(1).to_string();
        for prefix in [ALLOWED_FLOOD, DISALLOWED_FLOOD] {
            let net = format!("{}.{}.0.0/16", prefix[0], prefix[1]);
            daemon.ns.ip(&["route", "add", &net, "via", &via]);
        }
        let mut prefixes: Vec<IpNet> = vec![
            format!("198.18.{}.0/24", veth.subnet)
                .parse()
                .expect("prefix"),
        ];
        prefixes.extend(
            allow
                .iter()
                .map(|text| text.parse::<IpNet>().expect("prefix")),
        );
        let request = AllocRequest {
            owner: "floods".to_owned(),
            allow: prefixes,
            max_conns: Some(max_conns),
            ..AllocRequest::default()
        };
        let held = daemon
            .api(|client| client.alloc(&request))
            .expect("allocate the port");
        let gate = Gate::open(daemon.pins.path()).expect("open the daemon's gate");
        let site = Self {
            gate,
            daemon,
            veth,
            outside,
            id: held.id,
        };
        // Resolves the neighbours both ways before any flood, so that no SYN waits on ARP:
        // a connection to a port the gate does not manage, refused by the kernel.
        let unmanaged = SocketAddr::new(site.veth.v4(2), 9);
        let refused = site
            .outside
            .run(|| connect_from(site.veth.v4(1), unmanaged, Duration::from_secs(5)));
        assert!(
            refused.is_err_and(|err| err.kind() == std::io::ErrorKind::ConnectionRefused),
            "the daemon's namespace answers with a RST"
        );
        site
    }

    /// The server's address, on the daemon's end of the veth.
    fn server(&self) -> SocketAddrV4 {
        let IpAddr::V4(addr) = self.veth.v4(2) else {
            unreachable!("an IPv4 address")
        };
        SocketAddrV4::new(addr, self.id.port)
    }

    /// A listener on the port, in the daemon's namespace and cgroup.
    fn listen(&self) -> TcpListener {
        let any = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), self.id.port);
        self.daemon.ns.run(|| listen_in(&self.daemon.cgroup, any))
    }

    /// A legitimate connection from the outside end of the veth.
    fn connect(&self, within: Duration) -> std::io::Result<TcpStream> {
        let server = SocketAddr::V4(self.server());
        self.outside
            .run(|| connect_from(self.veth.v4(1), server, within))
    }

    /// Waits (bounded) until the port holds exactly `held` slots, all established.
    fn settled(&self, held: u64) -> bool {
        portgate_tests::common::eventually(Duration::from_secs(5), || {
            let slots = self.gate.slots(self.id).expect("slots");
            slots.slots == held && slots.established == held
        })
    }

    /// The port's counters, all hooks.
    fn counters(&self) -> portgate::gate::PortCounters {
        self.gate.counters(self.id).expect("counters")
    }

    /// Packets the veth pair dropped on their way into the daemon's namespace, before its
    /// XDP saw them (a full ring on the receiving end), as the interfaces count them: the
    /// outside end's transmit drops and the daemon's end's receive drops.
    fn lost_on_the_way(&self) -> u64 {
        let dropped = |ns: &NetNs, name: &str, direction: &str| {
            let text = output(
                "ip",
                &["-n", ns.name(), "-s", "-j", "link", "show", "dev", name],
            );
            let links: serde_json::Value = serde_json::from_str(&text).expect("ip's JSON");
            links[0]["stats64"][direction]["dropped"]
                .as_u64()
                .unwrap_or_else(|| panic!("no {direction} drop count in {text}"))
        };
        dropped(&self.outside, &self.veth.a_name, "tx")
            + dropped(&self.daemon.ns, &self.veth.b_name, "rx")
    }

    /// Server-side sockets of the port in `state` (`ss` state names), in the daemon's
    /// namespace.
    fn sockets_in(&self, state: &str) -> usize {
        let filter = format!("( sport = :{} )", self.id.port);
        self.daemon
            .ns
            .exec("ss", &["-Htn", "state", state, &filter])
            .lines()
            .filter(|line| !line.trim().is_empty())
            .count()
    }
}

/// What the watchers saw while a flood ran.
#[derive(Debug, Default)]
struct Watched {
    /// Most slots held at once (established and reservations), as the gate counts them.
    max_slots: AtomicU64,
    /// Most established connections at once, as the gate counts them.
    max_established: AtomicU64,
    /// Most established connections at once, as `ss` lists them in the server's namespace.
    max_ss: AtomicU64,
    /// Latencies of the API calls made meanwhile.
    api: Mutex<Vec<Duration>>,
    /// Legitimate attempts (one SYN each), and how many got in.
    attempts: AtomicU64,
    admitted: AtomicU64,
    done: AtomicBool,
}

impl Watched {
    /// Samples the port's slots (and now and then `ss`) until done.
    fn watch_slots(&self, site: &Site) {
        let mut round = 0_u32;
        while !self.done.load(Ordering::Relaxed) {
            let slots = site.gate.slots(site.id).expect("slots");
            self.max_slots.fetch_max(slots.slots, Ordering::Relaxed);
            self.max_established
                .fetch_max(slots.established, Ordering::Relaxed);
            if round.is_multiple_of(20) {
                let listed = site.sockets_in("established") as u64;
                self.max_ss.fetch_max(listed, Ordering::Relaxed);
            }
            round += 1;
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks the daemon for its status until done, timing each answer.
    fn ask_the_api(&self, daemon: &Daemon) {
        while !self.done.load(Ordering::Relaxed) {
            let asked = Instant::now();
            daemon.api(Client::status).expect("the API answers");
            let took = asked.elapsed();
            self.api
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(took);
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// One legitimate attempt every 100 ms until `stop`; each that gets in is closed.
    fn legitimate(&self, site: &Site, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            self.attempt(site);
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// One legitimate attempt (one SYN); whether it got in.
    fn attempt(&self, site: &Site) -> bool {
        self.attempts.fetch_add(1, Ordering::Relaxed);
        let admitted = site.connect(ATTEMPT_WITHIN).is_ok();
        if admitted {
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }

    /// The API's p50 and p99 in milliseconds, and how many calls were made.
    fn api_figures(&self) -> (f64, f64, usize) {
        let mut samples = self.api.lock().unwrap_or_else(PoisonError::into_inner);
        let count = samples.len();
        let p50 = percentile(&mut samples, 50.0).unwrap_or_default();
        let p99 = percentile(&mut samples, 99.0).unwrap_or_default();
        (ms(p50), ms(p99), count)
    }
}

/// How long a burst of `limit` forged SYNs from allowed sources (never answered) keeps the
/// idle port full: from the burst until a legitimate attempt, one every 50 ms, gets in.
fn slot_hold(site: &Site, limit: u32, ttl: Duration) -> Duration {
    // Sources no earlier flood of the test used.
    let first = 1 << 20;
    let burst = flood(
        &site.outside,
        site.server(),
        ALLOWED_FLOOD,
        first..first + limit,
        Duration::from_millis(10),
    );
    let sent = Instant::now();
    assert_eq!(burst.sent, u64::from(limit), "the burst was sent");
    let full = portgate_tests::common::eventually(Duration::from_secs(2), || {
        site.gate.slots(site.id).expect("slots").slots == u64::from(limit)
    });
    assert!(
        full,
        "the burst fills the port: {:?}",
        site.gate.slots(site.id)
    );
    while sent.elapsed() < ttl * 2 + Duration::from_secs(5) {
        if site.connect(ATTEMPT_WITHIN).is_ok() {
            let hold = sent.elapsed();
            // Not before the reservations' TTL (less the burst's own few milliseconds).
            assert!(
                hold + burst.took >= ttl,
                "a reservation let go after {hold:?}"
            );
            assert!(
                hold <= ttl + Duration::from_secs(3),
                "the burst held the port {hold:?}"
            );
            return hold;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("the burst's reservations never let go")
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

/// The drops of `counters` by reason name, for the report.
fn drops_by_reason(counters: &HookCounters) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for code in 1..=u8::try_from(reason::DROP_COUNT).expect("few reasons") {
        out.insert(
            reason::name(code).to_owned(),
            counters.dropped_for(code).into(),
        );
    }
    out.into()
}

/// `after` minus `before`, field by field.
fn delta(after: &HookCounters, before: &HookCounters) -> HookCounters {
    let mut out = HookCounters {
        packets: after.packets - before.packets,
        bytes: after.bytes - before.bytes,
        accepted: after.accepted - before.accepted,
        bind_denied: after.bind_denied - before.bind_denied,
        ..HookCounters::default()
    };
    for (i, dropped) in out.dropped.iter_mut().enumerate() {
        *dropped = after.dropped[i] - before.dropped[i];
    }
    out
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_syn_flood_from_allowed_sources_never_exceeds_the_limit_and_legitimate_clients_get_back_in() {
    const LIMIT: u32 = 8;
    const HELD: usize = 4;
    if !require_privileges!() {
        return;
    }
    let count = size(10_000_u32, 200_000);
    let within = size(Duration::from_secs(2), Duration::from_secs(20));
    let site = Site::new(41_700, LIMIT, &["10.77.0.0/16"]);
    let server = portgate_tests::common::EchoServer::serve(site.listen());
    let mut held: Vec<TcpStream> = (0..HELD)
        .map(|_| {
            site.connect(Duration::from_secs(5))
                .expect("a held connection")
        })
        .collect();
    assert!(site.settled(HELD as u64));
    let before = site.counters();
    let lost_before = site.lost_on_the_way();
    let stats_before = site.gate.stats().expect("stats");
    let watched = Watched::default();
    let legit_stop = AtomicBool::new(false);
    let (flooded, flood_ended, recovered_at) = thread::scope(|scope| {
        let slots = scope.spawn(|| watched.watch_slots(&site));
        let api = scope.spawn(|| watched.ask_the_api(&site.daemon));
        let legit = scope.spawn(|| watched.legitimate(&site, &legit_stop));
        let flooded = flood(
            &site.outside,
            site.server(),
            ALLOWED_FLOOD,
            0..count,
            within,
        );
        let flood_ended = Instant::now();
        legit_stop.store(true, Ordering::Relaxed);
        legit.join().expect("legitimate clients");
        // Recovery: one attempt every 50 ms until one gets in, bounded well past the TTL.
        let bound = Duration::from_nanos(defaults::PENDING_TTL_NS * 2) + Duration::from_secs(5);
        let mut recovered_at = None;
        while flood_ended.elapsed() < bound {
            if watched.attempt(&site) {
                recovered_at = Some(flood_ended.elapsed());
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        watched.done.store(true, Ordering::Relaxed);
        slots.join().expect("slot watcher");
        api.join().expect("API caller");
        (flooded, flood_ended, recovered_at)
    });
    let recovery = recovered_at.unwrap_or_else(|| {
        panic!(
            "no legitimate client got in within {:?} of the flood's end: {:?}, reservations {:?}",
            flood_ended.elapsed(),
            site.gate.slots(site.id),
            site.gate.reservations()
        )
    });
    let ttl = Duration::from_nanos(defaults::PENDING_TTL_NS);
    // The flood's last reservations expire one TTL after they were made at the latest;
    // the next SYN sweeps them (at most a sweep interval later). Generous for the load.
    assert!(
        recovery <= ttl + Duration::from_secs(3),
        "a legitimate client got in only {recovery:?} after the flood"
    );
    let after = site.counters();
    let counted = delta(&after.total, &before.total);
    let xdp = delta(
        &after.hooks[usize::from(hook::XDP)],
        &before.hooks[usize::from(hook::XDP)],
    );
    let lost = site.lost_on_the_way() - lost_before;
    let attempts = watched.attempts.load(Ordering::Relaxed);
    let limit = u64::from(LIMIT);
    let (max_slots, max_established, max_ss) = (
        watched.max_slots.load(Ordering::Relaxed),
        watched.max_established.load(Ordering::Relaxed),
        watched.max_ss.load(Ordering::Relaxed),
    );
    assert!(max_slots <= limit, "{max_slots} slots held at once");
    assert!(max_established <= limit, "{max_established} established");
    assert!(max_ss <= limit, "ss listed {max_ss} established");
    assert!(
        flooded.sent >= u64::from(count) * 9 / 10,
        "the flood sent only {} of {count}",
        flooded.sent
    );
    // Every SYN judged once: accepted (a reservation made) or refused for the limit. Only
    // what the veth itself dropped (counted by the interfaces, normally none) never
    // reached the gate.
    let seen = counted.accepted + counted.dropped_for(reason::CONN_LIMIT);
    let syns = flooded.sent + attempts;
    assert!(
        syns.saturating_sub(lost) <= seen && seen <= syns,
        "each flood SYN and each legitimate attempt's SYN counted once: {seen} counted of \
         {syns} sent, {lost} lost on the veth: {counted:?}"
    );
    for code in [
        reason::UNALLOCATED,
        reason::DRAINING,
        reason::NOT_ALLOWED,
        reason::AUTH_REQUIRED,
    ] {
        assert_eq!(counted.dropped_for(code), 0, "{}", reason::name(code));
    }
    let stats = site.gate.stats().expect("stats");
    assert_eq!(stats.unreserved, stats_before.unreserved, "{stats:?}");
    for stream in &mut held {
        echo(stream, b"still here").expect("a connection held through the flood");
    }
    assert!(
        portgate_tests::common::eventually(Duration::from_secs(5), || site
            .sockets_in("established")
            == HELD),
        "ss lists the held connections, and no other, after the flood"
    );
    let (p50, p99, calls) = watched.api_figures();
    assert!(calls > 0, "the API was asked during the flood");
    assert!(p99 < 2_000.0, "the API's p99 during the flood: {p99} ms");
    // Once the flood's reservations expire, what the port holds is what is established.
    drop(held);
    thread::sleep(ttl);
    drop(
        site.connect(Duration::from_secs(5))
            .expect("a connection after the TTL"),
    );
    assert!(
        site.settled(0),
        "every slot comes back: {:?}",
        site.gate.slots(site.id)
    );
    let burst_hold = slot_hold(&site, LIMIT, ttl);
    drop(server);
    report(
        "floods",
        &format!(
            "{} SYNs from forged sources inside the allowlist in {:.1} s at a port limited to \
             {LIMIT} (XDP and cgroup_skb), {HELD} connections held, a legitimate attempt every \
             100 ms and the API asked every 10 ms",
            flooded.sent,
            flooded.took.as_secs_f64()
        ),
        "never more than the limit held or established (kernel and ss); every SYN counted \
         once, accepted or conn_limit; the held connections kept working; a legitimate client \
         got in again once the flood's reservations expired",
        &json!({
            "syns_sent": flooded.sent,
            "flood_secs": flooded.took.as_secs_f64(),
            "legitimate_attempts": attempts,
            "legitimate_admitted": watched.admitted.load(Ordering::Relaxed),
            "syns_seen": counted.accepted + counted.dropped_for(reason::CONN_LIMIT),
            "accepted": counted.accepted,
            "dropped": drops_by_reason(&counted),
            "xdp_dropped_conn_limit": xdp.dropped_for(reason::CONN_LIMIT),
            "lost_before_xdp": lost,
            "max_slots": max_slots,
            "max_established": max_established,
            "max_established_ss": max_ss,
            "api_calls": calls,
            "api_p50_ms": p50,
            "api_p99_ms": p99,
            "recovery_ms": ms(recovery),
            "burst_slot_hold_ms": ms(burst_hold),
            "reservation_ttl_ms": defaults::PENDING_TTL_NS / 1_000_000,
            "events_rate_limited": stats.events_rate_limited - stats_before.events_rate_limited,
        }),
    );
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_syn_flood_from_disallowed_sources_is_dropped_and_counted_and_takes_no_slot() {
    const LIMIT: u32 = 8;
    const HELD: usize = 4;
    if !require_privileges!() {
        return;
    }
    let count = size(10_000_u32, 200_000);
    let within = size(Duration::from_secs(2), Duration::from_secs(20));
    let site = Site::new(41_710, LIMIT, &[]);
    let server = portgate_tests::common::EchoServer::serve(site.listen());
    let held: Vec<TcpStream> = (0..HELD)
        .map(|_| {
            site.connect(Duration::from_secs(5))
                .expect("a held connection")
        })
        .collect();
    assert!(site.settled(HELD as u64));
    let before = site.counters();
    let lost_before = site.lost_on_the_way();
    let watched = Watched::default();
    let legit_stop = AtomicBool::new(false);
    let slowest = Mutex::new(Duration::ZERO);
    let flooded = thread::scope(|scope| {
        let slots = scope.spawn(|| watched.watch_slots(&site));
        let api = scope.spawn(|| watched.ask_the_api(&site.daemon));
        let legit = scope.spawn(|| {
            while !legit_stop.load(Ordering::Relaxed) {
                watched.attempts.fetch_add(1, Ordering::Relaxed);
                let started = Instant::now();
                let mut stream = site
                    .connect(Duration::from_secs(3))
                    .expect("a legitimate client gets in during the flood");
                echo(&mut stream, b"hello").expect("and is served");
                let mut slowest = slowest.lock().unwrap_or_else(PoisonError::into_inner);
                *slowest = (*slowest).max(started.elapsed());
                watched.admitted.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                thread::sleep(Duration::from_millis(100));
            }
        });
        let flooded = flood(
            &site.outside,
            site.server(),
            DISALLOWED_FLOOD,
            0..count,
            within,
        );
        legit_stop.store(true, Ordering::Relaxed);
        legit.join().expect("legitimate clients");
        watched.done.store(true, Ordering::Relaxed);
        slots.join().expect("slot watcher");
        api.join().expect("API caller");
        flooded
    });
    let after = site.counters();
    let counted = delta(&after.total, &before.total);
    let xdp = delta(
        &after.hooks[usize::from(hook::XDP)],
        &before.hooks[usize::from(hook::XDP)],
    );
    let admitted = watched.admitted.load(Ordering::Relaxed);
    let lost = site.lost_on_the_way() - lost_before;
    let refused = counted.dropped_for(reason::NOT_ALLOWED);
    assert!(
        flooded.sent.saturating_sub(lost) <= refused && refused <= flooded.sent,
        "every forged SYN dropped as not_allowed, once ({lost} lost on the veth): {counted:?}"
    );
    assert_eq!(xdp.dropped_for(reason::NOT_ALLOWED), refused, "all by XDP");
    assert_eq!(counted.dropped_for(reason::CONN_LIMIT), 0);
    assert_eq!(
        counted.accepted, admitted,
        "only the legitimate clients accepted"
    );
    // The held connections and the legitimate clients': never over the limit.
    let max_slots = watched.max_slots.load(Ordering::Relaxed);
    assert!(
        max_slots <= u64::from(LIMIT),
        "{max_slots} slots held at once"
    );
    assert!(
        !site
            .gate
            .reservations()
            .expect("reservations")
            .contains_key(&site.id),
        "no reservation left"
    );
    assert!(site.settled(HELD as u64), "{:?}", site.gate.slots(site.id));
    let (p50, p99, calls) = watched.api_figures();
    assert!(calls > 0, "the API was asked during the flood");
    assert!(p99 < 2_000.0, "the API's p99 during the flood: {p99} ms");
    drop(held);
    drop(server);
    let slowest = *slowest.lock().unwrap_or_else(PoisonError::into_inner);
    report(
        "floods",
        &format!(
            "{} SYNs from forged sources outside the allowlist in {:.1} s at a port limited \
             to {LIMIT}, {HELD} connections held, a legitimate client every 100 ms and the API \
             asked every 10 ms",
            flooded.sent,
            flooded.took.as_secs_f64()
        ),
        "every forged SYN dropped by XDP as not_allowed and counted exactly once; no slot or \
         reservation taken; every legitimate client got in and was served",
        &json!({
            "syns_sent": flooded.sent,
            "flood_secs": flooded.took.as_secs_f64(),
            "dropped": drops_by_reason(&counted),
            "packets_xdp": xdp.packets,
            "lost_before_xdp": lost,
            "legitimate_admitted": admitted,
            "legitimate_slowest_ms": ms(slowest),
            "max_slots": max_slots,
            "api_calls": calls,
            "api_p50_ms": p50,
            "api_p99_ms": p99,
        }),
    );
}
