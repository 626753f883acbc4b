//! Sections 2 and 3: the connection-setup rate over loopback to a server in a test
//! cgroup, with no gate, with portgate and with the nftables equivalent, the three
//! alternated round by round.
//!
//! Each round is a child process (this binary with the hidden `--round` option) that
//! `unshare(2)`s a network namespace of its own, so no conntrack entry, nftables rule or
//! socket of one round is seen by the next, and nothing outlives the round: the namespace
//! goes when the child exits. The child puts its listener in the round's cgroup (the
//! gated one for portgate, an ungated sibling otherwise), runs the load from
//! [`crate::loadgen`], and prints one JSON line. The gate is installed once per section by
//! this process, attached to the gated cgroup, which only portgate rounds use.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use ipnet::{IpNet, Ipv4Net};
use portgate::{
    gate::{Gate, GateSettings, PortCounters},
    host,
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::hook;
use portgate_tests::common::{PinDir, TestCgroup};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde::{Deserialize, Serialize};
use serde_json::json;

mod figures;

use crate::{
    Options,
    bpf_stats::{self, GatePrograms, ProgramRuns, StatsEnabled},
    loadgen::{self, LoadOutcome, LoadShape},
    nft::{self, NftPort, RuleHits},
    report::Figure,
};

/// Section 2's title.
pub const SECTION_LOOPBACK: &str = "2. Connection setup rate over loopback";
/// Section 3's title.
pub const SECTION_SCALE: &str = "3. Connection setup rate with 10,000 ports x 100 prefixes";

/// The managed range of the benchmark's gate and rules.
const MIN_PORT: u16 = 20_000;
const MAX_PORT: u16 = 29_999;
/// The connection limit of every port: far above the client's concurrency, so that no
/// legitimate connection is refused.
const MAX_CONNECTIONS: u32 = 1_000;
/// Client threads (connect, close with RST) and server threads (accept, close): on two
/// cores, two clients and one server keep both busy (the kernel's side of a loopback
/// connect runs in the connecting thread).
const CLIENT_THREADS: usize = 2;
const SERVER_THREADS: usize = 1;

/// The three set-ups.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setup {
    /// Nothing between client and server.
    NoGate,
    /// portgate's programs on the server's cgroup.
    Portgate,
    /// The nftables rules in the round's namespace.
    Nftables,
}

impl Setup {
    const ALL: [Self; 3] = [Self::NoGate, Self::Portgate, Self::Nftables];

    fn label(self) -> &'static str {
        match self {
            Self::NoGate => "no gate",
            Self::Portgate => "portgate",
            Self::Nftables => "nftables",
        }
    }
}

/// What a round's child is told (as JSON after `--round`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundSpec {
    /// The set-up.
    pub setup: Setup,
    /// The cgroup the listener is made in.
    pub cgroup: PathBuf,
    /// The server's port.
    pub port: u16,
    /// The nftables ruleset to load (nftables rounds).
    pub nft_rules: Option<PathBuf>,
    /// The pin directory of the gate (portgate rounds): the child adopts it from its own
    /// namespace, which makes that namespace the gate's host (whose ports the policies are).
    #[serde(default)]
    pub gate_pins: Option<PathBuf>,
    /// The load.
    pub shape: LoadShape,
}

/// What a round's child reports (one JSON line on stdout).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundReport {
    /// The load's outcome.
    pub load: LoadOutcome,
    /// How long `nft -f` took, seconds (nftables rounds).
    pub nft_load_s: Option<f64>,
    /// The rules' counters after the load (nftables rounds).
    pub nft_hits: Option<RuleHits>,
    /// How long deleting the table took, seconds (nftables rounds).
    pub nft_unload_s: Option<f64>,
    /// The namespace's TCP counters after the load (accept-queue overflows, lost SYNs).
    pub tcp: std::collections::BTreeMap<String, u64>,
}

/// Section 2: one managed port with an allowlist and a limit.
pub fn loopback(options: &Options) -> Vec<Figure> {
    let port = MIN_PORT + 1;
    let plan = Plan {
        ports: vec![(port, vec![client_prefix()])],
        measured: port,
        description: "one managed port; allowlist 127.0.0.1/32, max_connections 1000",
    };
    compare(SECTION_LOOPBACK, options, &plan)
}

/// Section 3: 10,000 managed ports with 100 prefixes each.
pub fn at_scale(options: &Options) -> Vec<Figure> {
    let measured = 25_000;
    let ports = (MIN_PORT..=MAX_PORT)
        .map(|port| {
            let mut prefixes = random_prefixes(port, if port == measured { 99 } else { 100 });
            if port == measured {
                prefixes.push(client_prefix());
            }
            (port, prefixes)
        })
        .collect();
    let plan = Plan {
        ports,
        measured,
        description: "ports 20000-29999 each with 100 non-overlapping random IPv4 prefixes \
                      (/16 to /32, seeded by the port) and max_connections 1000; the measured \
                      port's 100 include 127.0.0.1/32",
    };
    compare(SECTION_SCALE, options, &plan)
}

/// The client's source, 127.0.0.1/32.
fn client_prefix() -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::LOCALHOST, 32).expect("a /32")
}

/// `count` non-overlapping IPv4 prefixes (lengths 16 to 32, outside 127/8), the same for
/// the same port on every run.
fn random_prefixes(port: u16, count: usize) -> Vec<Ipv4Net> {
    let loopback: Ipv4Net = "127.0.0.0/8".parse().expect("127/8");
    let mut rng = StdRng::seed_from_u64(u64::from(port));
    let mut chosen: Vec<Ipv4Net> = Vec::with_capacity(count);
    while chosen.len() < count {
        let len = rng.random_range(16..=32);
        let prefix = Ipv4Net::new(Ipv4Addr::from(rng.random::<u32>()), len)
            .expect("a valid length")
            .trunc();
        let overlaps = |other: &Ipv4Net| other.contains(&prefix) || prefix.contains(other);
        if !overlaps(&loopback) && !chosen.iter().any(overlaps) {
            chosen.push(prefix);
        }
    }
    chosen
}

/// The policy a section measures with.
struct Plan {
    /// Every managed port and its allowlist (each with [`MAX_CONNECTIONS`]).
    ports: Vec<(u16, Vec<Ipv4Net>)>,
    /// The port the server listens on.
    measured: u16,
    /// The policy in words, for the raw numbers.
    description: &'static str,
}

/// One round as recorded.
#[derive(Debug, Serialize)]
struct Round {
    #[serde(rename = "round")]
    number: usize,
    setup: Setup,
    /// The child's report, or why there is none.
    report: Option<RoundReport>,
    error: Option<String>,
    /// portgate rounds: the gate's `cgroup_skb` counters of the port over the round.
    gate_accepted: Option<u64>,
    gate_dropped: Option<u64>,
    /// portgate rounds: the kernel's run counts and times of the gate's programs over the
    /// round (see [`crate::bpf_stats`]).
    kernel: Option<std::collections::BTreeMap<String, ProgramRuns>>,
}

/// The gate of one section and the cgroup it is attached to, set up once.
struct Fixture {
    gate: Gate,
    /// The programs the gate loaded, whose run-time statistics each round reads.
    programs: GatePrograms,
    gated: TestCgroup,
    // Dropped last: uninstalls the gate (detaching it from `gated`).
    pins: PinDir,
}

impl Fixture {
    /// Installs the gate, attaches it to a fresh cgroup and writes the plan's policies;
    /// returns the fixture and how long the policies took to write.
    fn new(plan: &Plan) -> Result<(Self, Duration)> {
        let pins = PinDir::new();
        let gated = TestCgroup::new();
        let mut gate = Gate::install(&GateSettings {
            pin_dir: pins.path().to_owned(),
            min_port: MIN_PORT,
            max_port: MAX_PORT,
            ..GateSettings::default()
        })
        .context("installing the gate")?;
        gate.attach_cgroup(gated.path())
            .context("attaching the gate to the test cgroup")?;
        let start = Instant::now();
        for (port, prefixes) in &plan.ports {
            gate.set_policy(
                PortId::new(*port, Protocol::Tcp),
                &PortPolicy {
                    access: PortAccessControl {
                        allowed_ips: prefixes.iter().copied().map(IpNet::V4).collect(),
                        max_connections: MAX_CONNECTIONS,
                        require_authentication: false,
                    },
                    ..PortPolicy::default()
                },
            )
            .with_context(|| format!("setting the policy of {port}"))?;
        }
        let took = start.elapsed();
        let programs = GatePrograms::of(&mut gate);
        let fixture = Self {
            gate,
            programs,
            gated,
            pins,
        };
        Ok((fixture, took))
    }

    fn counters(&self, port: u16) -> Result<PortCounters> {
        Ok(self.gate.counters(PortId::new(port, Protocol::Tcp))?)
    }
}

#[expect(clippy::too_many_lines, reason = "the section's steps, in order")]
fn compare(section: &str, options: &Options, plan: &Plan) -> Vec<Figure> {
    let rounds = options.pick(7, 3);
    let shape = LoadShape {
        client_threads: CLIENT_THREADS,
        server_threads: SERVER_THREADS,
        warmup: Duration::from_millis(options.pick(500, 250)),
        measure: Duration::from_secs(options.pick(2, 1)),
    };
    let prefixes: usize = plan.ports.iter().map(|(_, prefixes)| prefixes.len()).sum();

    // portgate: the gate, once for the section.
    eprintln!(
        "portgate-bench: writing {} port policies ({prefixes} prefixes)",
        plan.ports.len()
    );
    let fixture = Fixture::new(plan);
    let (fixture, gate_setup) = match fixture {
        Ok((fixture, took)) => (Some(fixture), Ok(took)),
        Err(err) => (None, Err(format!("{err:#}"))),
    };
    // The other set-ups' servers: a sibling cgroup with nothing attached.
    let ungated = TestCgroup::new();

    // nftables: the ruleset file, written once; loaded by each round's child.
    let rules_dir = tempfile::Builder::new()
        .prefix("portgate-bench-nft-")
        .tempdir();
    let nft_rules: Result<(PathBuf, String)> = (|| {
        let version = nft::version()?;
        let dir = rules_dir.as_ref().map_err(|err| anyhow!("{err}"))?;
        let ports: Vec<NftPort> = plan
            .ports
            .iter()
            .map(|(port, allow)| NftPort {
                port: *port,
                allow: allow.clone(),
                max_connections: MAX_CONNECTIONS,
            })
            .collect();
        let path = dir.path().join("ruleset.nft");
        fs::write(&path, nft::ruleset(&ports, MIN_PORT, MAX_PORT))
            .context("writing the nftables ruleset")?;
        Ok((path, version))
    })();

    let port = plan.measured;
    // The kernel's run-time statistics, for the rounds only (they slow every program).
    let stats = StatsEnabled::new().map_err(|err| format!("{err:#}"));
    if rounds < bpf_stats::MIN_ROUNDS {
        eprintln!(
            "portgate-bench: {rounds} rounds are too few to state the spread of the gate's kernel time (at least {}; run without --quick)",
            bpf_stats::MIN_ROUNDS
        );
    }
    let mut all: Vec<Round> = Vec::new();
    for round in 0..rounds {
        for setup in Setup::ALL {
            let mut record = Round {
                number: round,
                setup,
                report: None,
                error: None,
                gate_accepted: None,
                gate_dropped: None,
                kernel: None,
            };
            let result = match setup {
                Setup::NoGate => run_child(&RoundSpec {
                    setup,
                    cgroup: ungated.path().to_owned(),
                    port,
                    nft_rules: None,
                    gate_pins: None,
                    shape,
                }),
                Setup::Portgate => match (&fixture, &gate_setup) {
                    (Some(fixture), _) => {
                        let programs = stats.is_ok().then_some(&fixture.programs);
                        portgate_round(fixture, programs, port, shape, &mut record)
                    }
                    (None, Err(err)) => Err(anyhow!("the gate's set-up failed: {err}")),
                    (None, Ok(_)) => Err(anyhow!("no gate")),
                },
                Setup::Nftables => match &nft_rules {
                    Ok((path, _)) => run_child(&RoundSpec {
                        setup,
                        cgroup: ungated.path().to_owned(),
                        port,
                        nft_rules: Some(path.clone()),
                        gate_pins: None,
                        shape,
                    }),
                    Err(err) => Err(anyhow!("{err:#}")),
                },
            };
            match result {
                Ok(report) => {
                    eprintln!(
                        "portgate-bench:   round {} {}: {:.0} conn/s, {:.1} us CPU/conn, machine {:.0}% busy ({} failed, {} slow)",
                        round + 1,
                        setup.label(),
                        report.load.rate,
                        report.load.process_cpu_us_per_connection,
                        100.0 * report.load.machine.busy / report.load.machine.total.max(1e-9),
                        report.load.failures,
                        report.load.slow_connects,
                    );
                    if let Some(kernel) = &record.kernel {
                        let connects = report.load.connections + report.load.failures;
                        eprintln!(
                            "portgate-bench:   round {} portgate: {}",
                            round + 1,
                            bpf_stats::summary(kernel, connects)
                        );
                    }
                    record.report = Some(report);
                }
                Err(err) => {
                    eprintln!(
                        "portgate-bench:   round {} {}: failed: {err:#}",
                        round + 1,
                        setup.label()
                    );
                    record.error = Some(format!("{err:#}"));
                }
            }
            all.push(record);
        }
    }
    // Drops the guard: the statistics go back to how they were.
    let stats_error = stats.err();
    drop(fixture);
    drop(ungated);

    let nft_load: Vec<f64> = all
        .iter()
        .filter_map(|r| r.report.as_ref()?.nft_load_s)
        .collect();
    let configuration = json!({
        "policy": plan.description,
        "managed_range": format!("{MIN_PORT}-{MAX_PORT}"),
        "ports": plan.ports.len(),
        "prefixes": prefixes,
        "measured_port": port,
        "client_threads": shape.client_threads,
        "server_threads": shape.server_threads,
        "client": "socket, SO_LINGER 0 and SO_SNDTIMEO 2 s, blocking connect to 127.0.0.1, close (RST); no TIME_WAIT",
        "server": "blocking accept, close",
        "warmup_s": shape.warmup.as_secs_f64(),
        "measure_s": shape.measure.as_secs_f64(),
        "rounds": rounds,
        "order": "no gate, portgate, nftables, repeated; each round in a fresh network namespace (child process)",
        "portgate": "cgroup_skb ingress + sock_ops + bind4/6 on the server's test cgroup; the gate is installed once per section",
        "portgate_policy_write_s": gate_setup.as_ref().ok().map(Duration::as_secs_f64),
        "nftables": "table inet: input hook chain, policy accept: `tcp dport vmap { port : jump port_<port> }` and `tcp dport 20000-29999 ct state new drop`; chain port_<port>: `ip saddr != @allow_<port> drop`, `meta nfproto ipv6 drop`, `ct state new ct count over 1000 drop`, `counter accept`; allow_<port>: ipv4_addr interval set of the port's prefixes; loaded with `nft -f` in each nftables round",
        "nft_version": nft_rules.as_ref().ok().map(|(_, version)| version.clone()),
        "nft_load_s": nft_load,
    });
    let rounds_raw = serde_json::to_value(&all).unwrap_or_default();
    figures::figures(
        section,
        &all,
        &configuration,
        &rounds_raw,
        plan,
        &gate_setup,
        stats_error.as_deref(),
    )
}

/// A portgate round: the child on the gated cgroup, the gate's counters around it, and
/// the run-time statistics of `programs` when they are on.
fn portgate_round(
    fixture: &Fixture,
    programs: Option<&GatePrograms>,
    port: u16,
    shape: LoadShape,
    record: &mut Round,
) -> Result<RoundReport> {
    let kernel_before = programs.map(GatePrograms::read);
    let before = fixture.counters(port)?;
    let report = run_child(&RoundSpec {
        setup: Setup::Portgate,
        cgroup: fixture.gated.path().to_owned(),
        port,
        nft_rules: None,
        gate_pins: Some(fixture.pins.path().to_owned()),
        shape,
    })?;
    let after = fixture.counters(port)?;
    if let (Some(programs), Some(kernel_before)) = (programs, kernel_before) {
        record.kernel = Some(bpf_stats::since(&kernel_before, &programs.read()));
    }
    let skb = usize::from(hook::SKB);
    record.gate_accepted = Some(after.hooks[skb].accepted - before.hooks[skb].accepted);
    record.gate_dropped = Some(
        after.hooks[skb].dropped.iter().sum::<u64>()
            - before.hooks[skb].dropped.iter().sum::<u64>(),
    );
    Ok(report)
}

/// Runs one round in a child process and reads its report.
fn run_child(spec: &RoundSpec) -> Result<RoundReport> {
    let exe = std::env::current_exe().context("the benchmark's own path")?;
    let child = Command::new(exe)
        .arg("--round")
        .arg(serde_json::to_string(spec)?)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the round's child")?;
    let pid = child.id();
    let (sender, receiver) = mpsc::channel();
    thread::spawn(move || {
        let _sent = sender.send(child.wait_with_output());
    });
    // The load, its drain, and up to two minutes for nft -f of a large ruleset.
    let limit = spec.shape.warmup + spec.shape.measure + Duration::from_secs(150);
    let Ok(output) = receiver.recv_timeout(limit) else {
        // Our own child, by its id.
        let _killed = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX)),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _reaped = receiver.recv_timeout(Duration::from_secs(10));
        bail!("the round did not end within {} s", limit.as_secs());
    };
    let output = output.context("waiting for the round's child")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!(
            "the round's child failed ({}): {}",
            output.status,
            stderr.trim()
        );
    }
    let line = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow!("the round's child printed nothing: {}", stderr.trim()))?;
    serde_json::from_str(line).context("the round's report")
}

/// The child's side of a round (`portgate-bench --round <spec>`): a fresh network
/// namespace, the set-up, the load, one JSON line.
pub fn child(spec: &str) -> Result<()> {
    let spec: RoundSpec = serde_json::from_str(spec).context("the round's spec")?;
    // Before any thread exists: the whole process moves to a namespace of its own, which
    // goes away when it exits.
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
    portgate_tests::common::run("ip", &["link", "set", "lo", "up"]);
    if let Some(pins) = &spec.gate_pins {
        // The gate's host namespace is the one it is installed from: this one, for the
        // round (the counters and slots stay the parent's to read).
        Gate::install(&GateSettings {
            pin_dir: pins.clone(),
            min_port: MIN_PORT,
            max_port: MAX_PORT,
            ..GateSettings::default()
        })
        .context("adopting the gate from the round's namespace")?;
    }
    let nft_load_s = match (&spec.setup, &spec.nft_rules) {
        (Setup::Nftables, Some(rules)) => Some(nft::load(rules)?.as_secs_f64()),
        (Setup::Nftables, None) => bail!("an nftables round without rules"),
        _ => None,
    };
    let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), spec.port);
    let listener = in_cgroup(&spec.cgroup, || loadgen::listen(addr))?
        .with_context(|| format!("listening on {addr}"))?;
    let load = loadgen::run(&listener, addr, spec.shape);
    drop(listener);
    let (nft_hits, nft_unload_s) = if spec.setup == Setup::Nftables {
        (
            Some(nft::hits(spec.port)?),
            Some(nft::unload()?.as_secs_f64()),
        )
    } else {
        (None, None)
    };
    let report = RoundReport {
        load,
        nft_load_s,
        nft_hits,
        nft_unload_s,
        tcp: loadgen::tcp_counters(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs `f` with this (single-threaded) process in `cgroup`, then moves it back: sockets
/// made by `f` stay in `cgroup`.
fn in_cgroup<T>(cgroup: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let previous = host::cgroups::of_pid(std::process::id()).context("own cgroup")?;
    fs::write(cgroup.join("cgroup.procs"), "0")
        .with_context(|| format!("moving into {}", cgroup.display()))?;
    let result = f();
    fs::write(previous.join("cgroup.procs"), "0")
        .with_context(|| format!("moving back to {}", previous.display()))?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::random_prefixes;

    #[test]
    fn prefixes_do_not_overlap_and_repeat() {
        let prefixes = random_prefixes(20_000, 100);
        assert_eq!(prefixes.len(), 100);
        assert_eq!(prefixes, random_prefixes(20_000, 100));
        for (i, a) in prefixes.iter().enumerate() {
            for b in &prefixes[i + 1..] {
                assert!(!a.contains(b) && !b.contains(a), "{a} and {b} overlap");
            }
        }
    }
}
