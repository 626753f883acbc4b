//! Gates a test installs itself, without the daemon: the settings they start from, and a
//! port served on loopback behind one.

use std::{
    io,
    net::{IpAddr, TcpStream},
    time::Duration,
};

use portgate::{
    gate::{Gate, GateSettings},
    model::{PortId, PortPolicy, Protocol},
};

use super::{EchoServer, NetNs, PinDir, TestCgroup, connect_from, listen_in, loopback};

/// The lowest port a test's gate manages (unless a test sets another range).
pub const MIN_PORT: u16 = 21_000;
/// The highest.
pub const MAX_PORT: u16 = 21_099;

/// The settings of a gate pinned in `pins` that manages [`MIN_PORT`]`..=`[`MAX_PORT`], with
/// the daemon's event rate and handshake TTL; a test changes what its scenario needs
/// (`GateSettings { events_per_sec: 50, ..settings(&pins) }`).
pub fn settings(pins: &PinDir) -> GateSettings {
    GateSettings {
        pin_dir: pins.path().to_owned(),
        min_port: MIN_PORT,
        max_port: MAX_PORT,
        ..GateSettings::default()
    }
}

/// Installs the gate `settings` describe (or adopts the one pinned there).
pub fn install(settings: &GateSettings) -> Gate {
    Gate::install(settings).expect("install the gate")
}

/// One TCP port served on loopback inside a test namespace by an echo server whose socket
/// is in a test cgroup, with the gate's cgroup programs attached to that cgroup. Fields
/// drop in order: the server first, the pins last.
pub struct LoopbackPort {
    _server: EchoServer,
    /// The gate, to change the port's policy and read its counters.
    pub gate: Gate,
    /// The namespace the port is served in.
    pub ns: NetNs,
    _cgroup: TestCgroup,
    _pins: PinDir,
    /// The port.
    pub port: u16,
}

impl LoopbackPort {
    /// Serves `port` (TCP) under `policy`.
    pub fn new(port: u16, policy: &PortPolicy) -> Self {
        Self::with_settings(port, policy, |settings| settings)
    }

    /// Serves `port` (TCP) under `policy`, with the gate's [`settings`] as `edit` changes
    /// them.
    pub fn with_settings(
        port: u16,
        policy: &PortPolicy,
        edit: impl FnOnce(GateSettings) -> GateSettings,
    ) -> Self {
        let pins = PinDir::new();
        let cgroup = TestCgroup::new();
        let ns = NetNs::new();
        // The namespace is the gate's host namespace: its ports are the host's.
        let settings = edit(settings(&pins));
        let mut gate = ns.run(|| install(&settings));
        gate.attach_cgroup(cgroup.path())
            .expect("attach to the test cgroup");
        gate.set_policy(PortId::new(port, Protocol::Tcp), policy)
            .expect("set policy");
        let server = ns.run(|| EchoServer::serve(listen_in(&cgroup, loopback(port))));
        Self {
            _server: server,
            gate,
            ns,
            _cgroup: cgroup,
            _pins: pins,
            port,
        }
    }

    /// Connects from `from` inside the namespace, within `within`.
    pub fn connect(&self, from: IpAddr, within: Duration) -> io::Result<TcpStream> {
        self.ns
            .run(|| connect_from(from, loopback(self.port), within))
    }
}
