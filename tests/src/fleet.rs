//! A fleet for the tests and the benchmarks: an etcd in a network namespace of its own and
//! three daemons in fleet mode on it, each in its own namespace, cgroup and pin directory,
//! reaching etcd over a veth pair.

use std::time::Duration;

use crate::{
    common::{NetNs, Veth, eventually},
    daemon::Daemon,
    etcd::EtcdServer,
};

/// How long a change may take to reach every node before a test gives up (a bound for
/// the tests, not the figure: the benchmarks measure it).
pub const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

/// The nodes' names.
pub const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// An etcd and three daemons in fleet mode on it.
pub struct Fleet {
    /// The daemons, in the order of [`NODES`].
    pub daemons: Vec<Daemon>,
    // Dropped after the daemons: their namespaces hold the veth ends.
    _links: Vec<Veth>,
    /// The etcd they share.
    pub etcd: EtcdServer,
}

impl Fleet {
    /// Starts etcd and the three daemons on the ports `min..=max`, and waits until each
    /// has applied the fleet.
    pub fn start((min, max): (u16, u16)) -> Self {
        let etcd = EtcdServer::start_in(NetNs::new());
        let mut daemons = Vec::new();
        let mut links = Vec::new();
        for node in NODES {
            let mut daemon = Daemon::start(min, max);
            assert!(daemon.stop());
            let link = Veth::new(etcd.ns().expect("etcd's namespace"), &daemon.ns);
            daemon.append_config(&format!(
                "[cluster]\netcd = [\"{}\"]\nnode = \"{node}\"\ntimeout = \"5s\"\nlease = \"6s\"\n",
                etcd.endpoint_at(link.v4(1))
            ));
            daemon.spawn();
            links.push(link);
            daemons.push(daemon);
        }
        let fleet = Self {
            daemons,
            _links: links,
            etcd,
        };
        for daemon in &fleet.daemons {
            assert!(
                eventually(CONVERGE_WITHIN, || joined(daemon)),
                "a daemon did not join its fleet:\n{}\netcd:\n{}",
                daemon.log(),
                fleet.etcd.log()
            );
        }
        fleet
    }
}

/// Whether the daemon has applied a list of its fleet and etcd answers it.
pub fn joined(daemon: &Daemon) -> bool {
    daemon
        .api(portgate::client::Client::status)
        .ok()
        .and_then(|status| status.fleet)
        .is_some_and(|fleet| fleet.joined && fleet.reachable)
}
