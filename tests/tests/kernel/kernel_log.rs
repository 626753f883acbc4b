//! The kernel's diagnostic lines (aya-log, the daemon's `kernel_log` key): none while the
//! flag is clear, a line per refusal once a reader asks, and the pinned ring read across a
//! restart that adopts the attached programs; XDP drops and refused binds reach the logger
//! through the async reader the daemon runs; and the real daemon's log, with the key set
//! at a restart.

use std::{
    net::TcpListener,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{Map, MapData, RingBuf};
use portgate::{
    gate::{Gate, KERNEL_LOG_TARGET, PacketHook},
    model::{PortId, Protocol},
};
use portgate_common::{config_flags, map_names, reason};
use portgate_tests::{
    common::{
        EchoServer, LOCAL, NetNs, PinDir, REFUSED_WITHIN, TestCgroup, allowing, connect_from,
        eventually,
        gate::{MIN_PORT, install, settings},
        listen_in, loopback,
        packet::{DESTINATION, tcp_syn},
    },
    daemon::Daemon,
    require_privileges,
};

/// How long a line may take to reach the logger.
const LINE_WITHIN: Duration = Duration::from_secs(5);

/// A logger that keeps every record: (target, level, message).
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<(String, log::Level, String)>>>);

impl Lines {
    fn take(&self) -> Vec<(String, log::Level, String)> {
        std::mem::take(&mut *self.0.lock().expect("lines"))
    }

    /// Waits for a line saying `message` (with the kernel's target), taking what came.
    fn wait_for(&self, message: &str, mut flush: impl FnMut()) -> bool {
        let mut seen = Vec::new();
        let found = eventually(LINE_WITHIN, || {
            flush();
            seen.extend(self.take());
            seen.iter()
                .any(|(target, _, line)| target == KERNEL_LOG_TARGET && line == message)
        });
        if !found {
            eprintln!("lines seen instead: {seen:?}");
        }
        found
    }
}

impl log::Log for Lines {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        self.0.lock().expect("lines").push((
            record.target().to_owned(),
            record.level(),
            record.args().to_string(),
        ));
    }

    fn flush(&self) {}
}

fn log_flag(gate: &Gate) -> bool {
    gate.config().expect("config").flags & config_flags::KERNEL_LOG != 0
}

/// Records waiting in the pinned ring, read without a logger (and without setting the flag).
fn records_in_ring(pins: &PinDir) -> usize {
    let path = pins
        .path()
        .join(portgate::paths::MAPS_SUBDIR)
        .join(map_names::KERNEL_LOG);
    let map = MapData::from_pin(&path).expect("open the pinned log ring");
    let mut ring = RingBuf::try_from(Map::RingBuf(map)).expect("a ring buffer");
    let mut count = 0;
    while ring.next().is_some() {
        count += 1;
    }
    count
}

#[test]
fn lines_follow_the_flag_and_survive_a_restart() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let ns = NetNs::new();
    let port = MIN_PORT + 60;
    let mut gate = ns.run(|| install(&settings(&pins)));
    gate.attach_cgroup(cgroup.path())
        .expect("attach to the test cgroup");
    gate.set_policy(
        PortId::new(port, Protocol::Tcp),
        &allowing(&["127.0.0.2/32"]),
    )
    .expect("set policy");
    let _server = ns.run(|| EchoServer::serve(listen_in(&cgroup, loopback(port))));
    let refuse = || {
        assert!(
            ns.run(|| connect_from(LOCAL, loopback(port), REFUSED_WITHIN))
                .is_err(),
            "127.0.0.1 is outside the allowlist: cgroup_skb drops it"
        );
    };

    // Off: no reader, the flag clear, nothing written.
    assert!(!log_flag(&gate), "a fresh gate writes no lines");
    refuse();
    assert_eq!(records_in_ring(&pins), 0, "with the flag clear, no line");

    // A restart that switches the lines on: the adopted programs (the first handle's)
    // write to the pinned ring this handle reads.
    drop(gate);
    let mut gate = ns.run(|| install(&settings(&pins)));
    let lines = Lines::default();
    let mut kernel_log = gate.kernel_log(lines.clone()).expect("start the lines");
    assert!(log_flag(&gate), "the reader turned the flag on");
    kernel_log.flush();
    assert!(lines.take().is_empty(), "nothing was written while off");
    refuse();
    let dropped = format!(
        "portgate: cgroup_skb dropped a packet to port {port}: reason {}",
        reason::NOT_ALLOWED
    );
    assert!(
        lines.wait_for(&dropped, || kernel_log.flush()),
        "a refused connection is a line"
    );

    // A restart without a reader turns them off again.
    drop(kernel_log);
    drop(gate);
    let gate = ns.run(|| install(&settings(&pins)));
    assert!(!log_flag(&gate), "install clears the flag");
    refuse();
    assert_eq!(records_in_ring(&pins), 0, "off again: no line");
}

#[test]
fn xdp_drops_and_refused_binds_reach_the_async_reader() {
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let ns = NetNs::new();
    let unallocated = MIN_PORT + 61;
    let mut gate = ns.run(|| install(&settings(&pins)));
    gate.attach_cgroup(cgroup.path())
        .expect("attach to the test cgroup");
    let lines = Lines::default();
    let kernel_log = gate.kernel_log(lines.clone()).expect("start the lines");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_io()
        .build()
        .expect("tokio runtime");
    let reader = runtime.spawn(kernel_log.forward());

    // XDP, loaded after the reader took the ring, run on a made-up packet.
    let packet = tcp_syn(LOCAL, DESTINATION, 40_000, unallocated);
    let outcome = gate
        .test_run(PacketHook::Xdp, &packet, 1)
        .expect("test run");
    assert!(!outcome.passed, "an unallocated managed port is dropped");
    let dropped = format!(
        "portgate: XDP dropped a packet to port {unallocated}: reason {}",
        reason::UNALLOCATED
    );
    assert!(lines.wait_for(&dropped, || ()), "an XDP drop is a line");

    let refused = ns.run(|| {
        let _inside = cgroup.enter();
        TcpListener::bind(loopback(unallocated)).map(drop)
    });
    assert!(refused.is_err(), "an unallocated managed port is not bound");
    let bind = format!(
        "portgate: refused a bind of port {unallocated} by pid {}: its cgroup does not own the port",
        std::process::id()
    );
    assert!(lines.wait_for(&bind, || ()), "a refused bind is a line");
    assert!(!reader.is_finished(), "the reader keeps reading");
    reader.abort();
}

#[test]
fn the_daemon_logs_the_lines_once_a_restart_sets_the_key() {
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(41_600, 41_609);
    let unallocated = 41_605;
    let line = format!("portgate: refused a bind of port {unallocated} by pid");
    assert!(
        bind_in(&daemon, unallocated).is_err(),
        "an unallocated managed port is not bound"
    );
    assert!(
        !daemon.log().contains(&line),
        "kernel_log = false: no line:\n{}",
        daemon.log()
    );

    assert!(daemon.stop());
    daemon.set_config("kernel_log", "true");
    daemon.spawn();
    assert!(
        bind_in(&daemon, unallocated).is_err(),
        "still refused after the restart"
    );
    assert!(
        eventually(LINE_WITHIN, || daemon.log().contains(&line)),
        "kernel_log = true: the adopted programs' line in the daemon's log:\n{}",
        daemon.log()
    );
    assert!(daemon.log().contains(KERNEL_LOG_TARGET), "{}", daemon.log());
}

/// `bind()` of TCP `port` on loopback by a process in the daemon's cgroup and namespace.
fn bind_in(daemon: &Daemon, port: u16) -> std::io::Result<()> {
    daemon.ns.run(|| {
        let _inside = daemon.cgroup.enter();
        TcpListener::bind(loopback(port)).map(drop)
    })
}
