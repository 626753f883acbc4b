//! A connection-setup load: client threads connect to a TCP server and close at once, as
//! fast as they can, for a bounded time; server threads accept and close.
//!
//! The client closes with RST (`SO_LINGER` 0), so neither end keeps a `TIME_WAIT` socket
//! and the ephemeral ports never run out; each connect is bounded by `SO_SNDTIMEO`, so a
//! dropped SYN costs at most [`CONNECT_TIMEOUT`] and is counted as a failure.

use std::{
    collections::BTreeMap,
    io,
    net::{SocketAddr, TcpListener},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, Socket, Type};

/// How long one connect may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Listen backlog of the server (the namespace's `somaxconn` caps it).
const BACKLOG: i32 = 4096;

/// Most connections made but not yet accepted: the clients wait above it, so the accept
/// queue never overflows (an overflow drops a SYN, and its 1 s retransmission would
/// measure the server's scheduling, not the connection set-up).
const WINDOW: u64 = 256;

/// A connect slower than this counts as slow (a retransmitted SYN takes 1 s).
const SLOW_CONNECT: Duration = Duration::from_millis(200);

/// Most connects one client thread makes, whatever the time: a bound on the traffic.
const MAX_CONNECTS_PER_THREAD: u64 = 20_000_000;

/// How the load is made.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct LoadShape {
    /// Client threads, each connecting and closing in a loop.
    pub client_threads: usize,
    /// Server threads, each accepting and closing in a loop.
    pub server_threads: usize,
    /// Load before the measurement starts (not counted in the rate).
    pub warmup: Duration,
    /// The measured time.
    pub measure: Duration,
}

/// What one load run did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LoadOutcome {
    /// Connections made during the measured time.
    pub measured_connections: u64,
    /// The measured time, seconds.
    pub measured_seconds: f64,
    /// Connections per second over the measured time.
    pub rate: f64,
    /// Connections made in all (warm-up included).
    pub connections: u64,
    /// Connects that failed or timed out, warm-up included.
    pub failures: u64,
    /// The failures by error.
    pub failure_kinds: BTreeMap<String, u64>,
    /// Connections the server accepted.
    pub accepted: u64,
    /// Connects that took longer than 200 ms (a SYN was lost and sent again).
    pub slow_connects: u64,
    /// CPU time of this process (all threads, user + system) over the measured time, s.
    pub process_cpu_s: f64,
    /// That per measured connection, microseconds: less sensitive than the rate to other
    /// work on the machine.
    pub process_cpu_us_per_connection: f64,
    /// The whole machine over the measured time, from /proc/stat: busy CPU time (s), of
    /// which softirq (s), and the wall time times the number of CPUs (s).
    pub machine: MachineCpu,
}

/// CPU time of the whole machine, from the first line of /proc/stat.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct MachineCpu {
    /// Busy time (all but idle and iowait), seconds.
    pub busy: f64,
    /// Of which softirq, seconds.
    pub softirq: f64,
    /// All time, seconds (wall time times CPUs).
    pub total: f64,
}

impl MachineCpu {
    /// The machine's counters now (seconds since boot); zero when /proc/stat is unreadable.
    #[must_use]
    pub fn now() -> Self {
        use procfs::CurrentSI as _;
        let Ok(stats) = procfs::KernelStats::current() else {
            return Self::default();
        };
        let cpu = stats.total;
        let tick = clock_tick();
        #[expect(clippy::cast_precision_loss, reason = "clock ticks as seconds")]
        let seconds = |ticks: u64| ticks as f64 / tick;
        let idle = seconds(cpu.idle) + seconds(cpu.iowait.unwrap_or(0));
        let busy = seconds(cpu.user)
            + seconds(cpu.nice)
            + seconds(cpu.system)
            + seconds(cpu.irq.unwrap_or(0))
            + seconds(cpu.softirq.unwrap_or(0))
            + seconds(cpu.steal.unwrap_or(0));
        Self {
            busy,
            softirq: seconds(cpu.softirq.unwrap_or(0)),
            total: busy + idle,
        }
    }

    /// The change from `earlier` to `self`.
    #[must_use]
    pub fn since(self, earlier: Self) -> Self {
        Self {
            busy: self.busy - earlier.busy,
            softirq: self.softirq - earlier.softirq,
            total: self.total - earlier.total,
        }
    }
}

/// Clock ticks per second.
pub fn clock_tick() -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a small number")]
    let ticks = procfs::ticks_per_second() as f64;
    ticks
}

/// User + system CPU time of this process (all threads), seconds.
fn process_cpu() -> f64 {
    // SAFETY: getrusage writes the struct it is given, zeroed here.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &raw mut usage);
        usage
    };
    #[expect(clippy::cast_precision_loss, reason = "seconds and microseconds")]
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// A listener on `addr` with the benchmark's backlog, made by the calling thread (so in
/// its network namespace and its process's cgroup).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    // accept() honours the receive timeout: the server threads look at the stop flag.
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(socket.into())
}

/// Runs the load against `listener` (served here) at `target`, from the calling thread's
/// network namespace.
pub fn run(listener: &TcpListener, target: SocketAddr, shape: LoadShape) -> LoadOutcome {
    let made = AtomicU64::new(0);
    let failures = AtomicU64::new(0);
    let failure_kinds = Mutex::new(BTreeMap::<String, u64>::new());
    let accepted = AtomicU64::new(0);
    let slow = AtomicU64::new(0);
    let clients_stop = AtomicBool::new(false);
    let server_stop = AtomicBool::new(false);
    let mut outcome = LoadOutcome::default();
    thread::scope(|scope| {
        for _ in 0..shape.server_threads {
            scope.spawn(|| serve(listener, &accepted, &server_stop));
        }
        let clients: Vec<_> = (0..shape.client_threads)
            .map(|_| {
                scope.spawn(|| {
                    connect_loop(
                        target,
                        &Tally {
                            made: &made,
                            accepted: &accepted,
                            failures: &failures,
                            failure_kinds: &failure_kinds,
                            slow: &slow,
                        },
                        &clients_stop,
                    );
                })
            })
            .collect();
        thread::sleep(shape.warmup);
        let (start_count, start) = (made.load(Ordering::Relaxed), Instant::now());
        let (cpu_start, machine_start) = (process_cpu(), MachineCpu::now());
        thread::sleep(shape.measure);
        let (end_count, elapsed) = (made.load(Ordering::Relaxed), start.elapsed());
        let (cpu_end, machine_end) = (process_cpu(), MachineCpu::now());
        clients_stop.store(true, Ordering::Relaxed);
        outcome.measured_connections = end_count - start_count;
        outcome.measured_seconds = elapsed.as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "a count far below 2^52")]
        let rate = outcome.measured_connections as f64 / outcome.measured_seconds;
        outcome.rate = rate;
        outcome.process_cpu_s = cpu_end - cpu_start;
        #[expect(clippy::cast_precision_loss, reason = "a count far below 2^52")]
        let per = outcome.process_cpu_s * 1e6 / outcome.measured_connections.max(1) as f64;
        outcome.process_cpu_us_per_connection = per;
        outcome.machine = machine_end.since(machine_start);
        // Each client stops within one connect timeout; then the server drains its queue.
        for client in clients {
            let _joined = client.join();
        }
        let drain_until = Instant::now() + Duration::from_secs(3);
        while Instant::now() < drain_until
            && accepted.load(Ordering::Relaxed) < made.load(Ordering::Relaxed)
        {
            thread::sleep(Duration::from_millis(5));
        }
        server_stop.store(true, Ordering::Relaxed);
    });
    outcome.connections = made.into_inner();
    outcome.failures = failures.into_inner();
    outcome.failure_kinds = failure_kinds.into_inner().unwrap_or_default();
    outcome.accepted = accepted.into_inner();
    outcome.slow_connects = slow.into_inner();
    outcome
}

fn serve(listener: &TcpListener, accepted: &AtomicU64, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                drop(stream);
            }
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(err) => {
                eprintln!("portgate-bench: accept: {err}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// What the client threads count, together.
struct Tally<'a> {
    made: &'a AtomicU64,
    accepted: &'a AtomicU64,
    failures: &'a AtomicU64,
    failure_kinds: &'a Mutex<BTreeMap<String, u64>>,
    slow: &'a AtomicU64,
}

fn connect_loop(target: SocketAddr, tally: &Tally<'_>, stop: &AtomicBool) {
    let target = target.into();
    for _ in 0..MAX_CONNECTS_PER_THREAD {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        while tally.made.load(Ordering::Relaxed) >= tally.accepted.load(Ordering::Relaxed) + WINDOW
        {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            thread::yield_now();
        }
        let start = Instant::now();
        let result = connect_once(&target);
        if start.elapsed() > SLOW_CONNECT {
            tally.slow.fetch_add(1, Ordering::Relaxed);
        }
        match result {
            Ok(()) => {
                tally.made.fetch_add(1, Ordering::Relaxed);
            }
            Err(err) => {
                tally.failures.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut kinds) = tally.failure_kinds.lock() {
                    *kinds.entry(err.to_string()).or_default() += 1;
                }
            }
        }
    }
}

/// One connection: socket, connect (bounded), close with RST.
fn connect_once(target: &socket2::SockAddr) -> io::Result<()> {
    let domain = if target.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, None)?;
    socket.set_linger(Some(Duration::ZERO))?;
    // A blocking connect honours the send timeout.
    socket.set_write_timeout(Some(CONNECT_TIMEOUT))?;
    socket.connect(target)
}

/// TCP counters of this process's network namespace that tell whether the load was clean:
/// accept-queue overflows, lost SYNs, resets and retransmissions.
pub fn tcp_counters() -> BTreeMap<String, u64> {
    const FROM_NETSTAT: [&str; 4] = [
        "ListenOverflows",
        "ListenDrops",
        "TCPSynRetrans",
        "TCPTimeouts",
    ];
    let mut counters = BTreeMap::new();
    if let Ok(snmp) = procfs::net::snmp() {
        for (name, value) in [
            ("RetransSegs", snmp.tcp_retrans_segs),
            ("AttemptFails", snmp.tcp_attempt_fails),
            ("EstabResets", snmp.tcp_estab_resets),
            ("ActiveOpens", snmp.tcp_active_opens),
        ] {
            counters.insert(name.to_owned(), value);
        }
    }
    // procfs reads /proc/net/snmp but not /proc/net/netstat: a line of names, then a line
    // of values, per group.
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    for pair in lines.chunks(2) {
        let [names, values] = pair else { continue };
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if FROM_NETSTAT.contains(&name)
                && let Ok(value) = value.parse()
            {
                counters.insert(name.to_owned(), value);
            }
        }
    }
    counters
}
