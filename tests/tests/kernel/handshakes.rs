//! A connection is established only through a live reservation: the packet that completes
//! a handshake is judged again in `cgroup_skb`, so a last ACK held back past the
//! reservation's TTL cannot push a port over its limit, and a handshake (SYN cookies
//! included) cannot complete on a port that went Draining after its SYN.
//!
//! Needs: root, cgroup v2, bpffs, BTF, iproute2 and nftables (`cargo xtask setup` installs
//! them): the client's ACKs are held back by an nftables rule in the test's namespace.

use std::{io::Write as _, net::TcpStream, thread, time::Duration};

use portgate::{
    gate::GateSettings,
    model::{PortAccessControl, PortId, PortPolicy, PortStatus, Protocol},
};
use portgate_common::reason;
use portgate_tests::{
    common::{
        CONNECT_WITHIN, LOCAL, NetNs, eventually,
        gate::{LoopbackPort, MIN_PORT},
    },
    require_privileges,
};

/// An nftables table in a test namespace that drops the client's segments to `port` that
/// carry ACK without SYN or RST: handshakes to the port cannot complete while it exists.
struct HeldAcks<'a> {
    ns: &'a NetNs,
    table: String,
}

impl<'a> HeldAcks<'a> {
    fn new(ns: &'a NetNs, port: u16) -> Self {
        let table = format!("pg_held_acks_{port}");
        ns.nft(&["add", "table", "inet", &table]);
        ns.nft(&[
            "add",
            "chain",
            "inet",
            &table,
            "out",
            "{ type filter hook output priority 0 ; }",
        ]);
        ns.nft(&[
            "add",
            "rule",
            "inet",
            &table,
            "out",
            "tcp",
            "dport",
            &port.to_string(),
            "tcp",
            "flags",
            "&",
            "(syn|ack|rst)",
            "==",
            "ack",
            "drop",
        ]);
        Self { ns, table }
    }

    /// Lets the ACKs through from now on.
    fn release(self) {
        drop(self);
    }
}

impl Drop for HeldAcks<'_> {
    fn drop(&mut self) {
        self.ns.nft(&["delete", "table", "inet", &self.table]);
    }
}

fn limited(max_connections: u32) -> PortPolicy {
    PortAccessControl {
        max_connections,
        ..PortAccessControl::default()
    }
    .into()
}

/// Sends one byte on each client: a segment with ACK, which completes the server's side of
/// a handshake whose last ACK was held back.
fn nudge(clients: &mut [TcpStream]) {
    for client in clients {
        client
            .write_all(b"x")
            .expect("write on an established client");
    }
}

#[test]
fn a_last_ack_held_back_past_its_reservation_cannot_exceed_the_limit() {
    const LIMIT: u32 = 2;
    if !require_privileges!() {
        return;
    }
    let port = MIN_PORT + 20;
    let id = PortId::new(port, Protocol::Tcp);
    let fixture = LoopbackPort::with_settings(port, &limited(LIMIT), |settings| GateSettings {
        pending_ttl: Duration::from_secs(1),
        ..settings
    });
    let (gate, ns) = (&fixture.gate, &fixture.ns);
    let held = HeldAcks::new(ns, port);
    let mut clients = Vec::new();
    for _ in 0..LIMIT {
        clients.push(
            fixture
                .connect(LOCAL, CONNECT_WITHIN)
                .expect("SYN-ACK back"),
        );
    }
    assert_eq!(gate.slots(id).expect("slots").slots, u64::from(LIMIT));
    // The reservations expire; the next SYNs sweep them and take their slots.
    thread::sleep(Duration::from_millis(1_500));
    for _ in 0..LIMIT {
        clients.push(
            fixture
                .connect(LOCAL, CONNECT_WITHIN)
                .expect("SYN-ACK back once the first reservations expired"),
        );
    }
    held.release();
    nudge(&mut clients);

    assert!(
        eventually(Duration::from_secs(5), || gate
            .slots(id)
            .expect("slots")
            .established
            >= u64::from(LIMIT)),
        "the handshakes holding live reservations complete: {:?}",
        gate.slots(id)
    );
    // The server retransmits its SYN-ACK to the others after 1 s and 3 s, and their
    // clients answer: every answer is refused again.
    let deadline = std::time::Instant::now() + Duration::from_millis(3_500);
    while std::time::Instant::now() < deadline {
        let established = gate.slots(id).expect("slots").established;
        assert!(
            established <= u64::from(LIMIT),
            "{established} established over the limit of {LIMIT}"
        );
        assert!(
            ns.established_on(port) <= LIMIT as usize,
            "ss shows more than the limit"
        );
        thread::sleep(Duration::from_millis(50));
    }
    let counters = gate.counters(id).expect("counters").total;
    assert!(
        counters.dropped_for(reason::CONN_LIMIT) >= u64::from(LIMIT),
        "each late last ACK is refused as conn_limit: {counters:?}"
    );
    assert_eq!(gate.stats().expect("stats").unreserved, 0);
}

#[test]
fn a_handshake_cannot_complete_on_a_port_that_went_draining_after_its_syn() {
    if !require_privileges!() {
        return;
    }
    for syncookies in ["1", "2"] {
        let port = MIN_PORT + 21;
        let id = PortId::new(port, Protocol::Tcp);
        let mut fixture = LoopbackPort::new(port, &PortPolicy::default());
        // 2: every SYN is answered with a cookie, so the ACK completes a handshake the
        // listener kept no state for.
        fixture
            .ns
            .set_sysctl("/proc/sys/net/ipv4/tcp_syncookies", syncookies);
        let mut clients = {
            let _held = HeldAcks::new(&fixture.ns, port);
            vec![
                fixture
                    .connect(LOCAL, CONNECT_WITHIN)
                    .expect("SYN-ACK back"),
            ]
        };
        fixture
            .gate
            .set_policy(
                id,
                &PortPolicy {
                    status: PortStatus::Draining,
                    ..PortPolicy::default()
                },
            )
            .expect("drain");
        nudge(&mut clients);
        let gate = &fixture.gate;
        assert!(
            eventually(Duration::from_secs(3), || gate
                .counters(id)
                .expect("counters")
                .total
                .dropped_for(reason::DRAINING)
                >= 1),
            "syncookies={syncookies}: the last ACK is refused as draining"
        );
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            fixture.ns.established_on(port),
            0,
            "syncookies={syncookies}: no connection established on a Draining port"
        );
        assert_eq!(gate.slots(id).expect("slots").established, 0);
    }
}
