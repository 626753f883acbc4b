//! The host's port facts against the real kernel: the reserved ports and the ephemeral range
//! that [`portgate::host`] reads and writes, and the socket tables it reads, each inside a
//! test network namespace; and other programs' reserved ports kept through the daemon's
//! install and uninstall. Both sysctls are per network namespace, so the tests write them
//! only there, and check that the host's own values stay as they were.

use std::{collections::BTreeSet, fs, net::TcpListener};

use portgate::{
    host::{
        port_ranges::PortRanges,
        sockets::{self, Listener},
        sysctls,
    },
    model::Protocol,
    paths,
};
use portgate_tests::{common::NetNs, daemon::Daemon, require_privileges};

fn read(path: &str) -> String {
    fs::read_to_string(path).unwrap_or_else(|err| panic!("reading {path}: {err}"))
}

/// Sets a sysctl of the namespace the thread is in. Call only inside
/// [`NetNs::run_elsewhere`], which makes sure that it is not the host's.
fn set(path: &str, value: &str) {
    fs::write(path, value).unwrap_or_else(|err| panic!("writing {value:?} to {path}: {err}"));
}

#[test]
fn reserve_and_unreserve_change_only_the_namespace_and_only_what_was_added() {
    if !require_privileges!() {
        return;
    }
    let host_before = read(paths::IP_LOCAL_RESERVED_PORTS);
    let ns = NetNs::new();

    let added = ns.run_elsewhere(|| {
        set(paths::IP_LOCAL_RESERVED_PORTS, "8080\n");
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "8080\n");

        let added = sysctls::reserve_ports(20_000..=20_100).expect("reserve 20000-20100");
        assert_eq!(added, [(20_000, 20_100)]);
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "8080,20000-20100\n");
        added
    });

    // While the namespace holds the reservation the host does not: a check before and after
    // alone would also pass if the host's value were written and then restored.
    assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), host_before);

    ns.run_elsewhere(|| {
        let again = sysctls::reserve_ports(20_000..=20_100).expect("reserve again");
        assert_eq!(again, [], "nothing is new the second time");
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "8080,20000-20100\n");

        sysctls::unreserve_ports(&added).expect("unreserve");
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "8080\n");
    });

    assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), host_before);
}

#[test]
fn reserve_returns_only_the_gaps_and_unreserve_can_empty_the_list() {
    if !require_privileges!() {
        return;
    }
    let host_before = read(paths::IP_LOCAL_RESERVED_PORTS);
    let ns = NetNs::new();

    ns.run_elsewhere(|| {
        set(paths::IP_LOCAL_RESERVED_PORTS, "20050-20060,65535\n");
        let added = sysctls::reserve_ports(20_000..=65_535).expect("reserve 20000-65535");
        assert_eq!(added, [(20_000, 20_049), (20_061, 65_534)]);
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "20000-65535\n");

        sysctls::unreserve_ports(&added).expect("unreserve");
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "20050-20060,65535\n");

        // From nothing back to nothing: the write that empties the list must clear it.
        set(paths::IP_LOCAL_RESERVED_PORTS, "\n");
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "\n");
        let added = sysctls::reserve_ports(30_000..=30_000).expect("reserve 30000");
        assert_eq!(added, [(30_000, 30_000)]);
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "30000\n");
        sysctls::unreserve_ports(&added).expect("unreserve");
        assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), "\n");
    });

    assert_eq!(read(paths::IP_LOCAL_RESERVED_PORTS), host_before);
}

#[test]
fn local_port_range_reads_the_namespace_of_the_calling_thread() {
    if !require_privileges!() {
        return;
    }
    let host_before = read(paths::IP_LOCAL_PORT_RANGE);
    let host_range = sysctls::local_port_range().expect("the host's ephemeral range");
    let ns = NetNs::new();

    ns.run_elsewhere(|| {
        // A fresh namespace starts from the kernel's default, whatever the host set.
        let (low, high) = sysctls::local_port_range().expect("the namespace's ephemeral range");
        assert!(low <= high);

        // Distinct from the default, and low and high of different parity as the kernel
        // prefers.
        set(paths::IP_LOCAL_PORT_RANGE, "40000 40999\n");
        assert_eq!(
            sysctls::local_port_range().expect("after setting it"),
            (40_000, 40_999)
        );
        assert_eq!(
            sysctls::ephemeral_overlap(40_500..=41_000, (40_000, 40_999)),
            Some((40_500, 40_999))
        );
    });

    assert_eq!(read(paths::IP_LOCAL_PORT_RANGE), host_before);
    assert_eq!(
        sysctls::local_port_range().expect("the host's ephemeral range again"),
        host_range
    );
}

#[test]
fn socket_tables_are_read_in_the_namespace_of_the_calling_thread() {
    if !require_privileges!() {
        return;
    }
    let ns = NetNs::new();

    let (listener, port, found) = ns.run_elsewhere(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen inside the namespace");
        let port = listener.local_addr().expect("its address").port();
        let bound = sockets::bound_ports(Protocol::Tcp, port..=port).expect("bound ports inside");
        assert_eq!(bound, BTreeSet::from([port]));
        let found = sockets::listeners(Protocol::Tcp, port..=port).expect("listeners inside");
        (listener, port, found)
    });
    let [Listener { inode, .. }] = found[..] else {
        panic!("expected one listener on {port} in the namespace, found {found:?}");
    };

    // The same call from this thread reads the host's tables, which do not hold that socket
    // (the port itself may be in use there by chance, the socket's inode cannot).
    let outside = sockets::listeners(Protocol::Tcp, port..=port).expect("listeners outside");
    assert!(
        outside.iter().all(|listener| listener.inode != inode),
        "the namespace's listener shows in the host's table: {outside:?}"
    );
    drop(listener);
}

/// Other programs' reserved ports survive the daemon's install and its uninstall, however
/// long the list: the kernel answers a read of `ip_local_reserved_ports` that does not
/// start at offset 0 with EOF, so a value read in pieces came back cut after 32 bytes.
#[test]
fn other_programs_reserved_ports_survive_install_and_uninstall() {
    const RESERVED: &str = portgate::paths::IP_LOCAL_RESERVED_PORTS;
    if !require_privileges!() {
        return;
    }
    let mut daemon = Daemon::start(41_100, 41_149);
    daemon.stop();
    daemon.uninstall();
    // The case reported (41 bytes) and a list longer than a page: every seventh port.
    let long: Vec<String> = (0..1_200_u16)
        .map(|n| (1_024 + 7 * n).to_string())
        .collect();
    let long = long.join(",");
    assert!(long.len() > 4_096);
    for others in ["10000-10099,11000-11099,12000,45000-45099", long.as_str()] {
        daemon.ns.set_sysctl(RESERVED, &format!("{others}\n"));
        let before = daemon.ns.sysctl(RESERVED);
        assert_eq!(before.trim_end(), others, "the kernel's own spelling");
        daemon.spawn();
        let during: PortRanges = daemon.ns.sysctl(RESERVED).trim_end().parse().unwrap();
        let others_set: PortRanges = others.parse().unwrap();
        let managed: PortRanges = std::iter::once(41_100..=41_149).collect();
        assert_eq!(
            during,
            others_set.union(&managed),
            "installed over {others:?}"
        );
        assert!(
            daemon.stop(),
            "the daemon stopped on SIGTERM:\n{}",
            daemon.log()
        );
        daemon.uninstall();
        assert_eq!(
            daemon.ns.sysctl(RESERVED),
            before,
            "uninstalled over {others:?}"
        );
    }
}
