//! UDP: every datagram judged by the allowlist and counted.

use std::{net::SocketAddr, thread, time::Duration};

use portgate::model::{PortId, Protocol};
use portgate_common::reason;
use portgate_tests::{
    common::{
        LOCAL, NetNs, OTHER_LOCAL, PinDir, TestCgroup, allowing,
        gate::{MIN_PORT, install, settings},
        loopback,
    },
    require_privileges,
};

#[test]
fn udp_datagrams_follow_the_allowlist_each_counted() {
    const SENT: usize = 5;
    if !require_privileges!() {
        return;
    }
    let pins = PinDir::new();
    let cgroup = TestCgroup::new();
    let ns = NetNs::new();
    let mut gate = ns.run(|| install(&settings(&pins)));
    gate.attach_cgroup(cgroup.path()).expect("attach");
    let port = MIN_PORT + 60;
    gate.set_policy(
        PortId::new(port, Protocol::Udp),
        &allowing(&["127.0.0.1/32"]),
    )
    .expect("set policy");
    let replies = ns.run(|| {
        let server = {
            let _inside = cgroup.enter();
            std::net::UdpSocket::bind(loopback(port)).expect("bind the UDP server")
        };
        // Quiet for longer than the dropped datagrams take to send, so it is still
        // there (and cgroup_skb still sees them) until the end.
        server
            .set_read_timeout(Some(Duration::from_millis(1_500)))
            .expect("timeout");
        let echo_server = thread::spawn(move || {
            let mut buffer = [0u8; 64];
            // Bounded: it stops at the first quiet 1.5 s.
            while let Ok((n, from)) = server.recv_from(&mut buffer) {
                let _sent = server.send_to(&buffer[..n], from);
            }
        });
        let mut replies = [0usize; 2];
        for (slot, source) in [LOCAL, OTHER_LOCAL].into_iter().enumerate() {
            let client =
                std::net::UdpSocket::bind(SocketAddr::new(source, 0)).expect("bind the client");
            client
                .set_read_timeout(Some(Duration::from_millis(200)))
                .expect("timeout");
            for round in 0..SENT {
                client
                    .send_to(format!("datagram {round}").as_bytes(), loopback(port))
                    .expect("send");
                let mut buffer = [0u8; 64];
                if client.recv_from(&mut buffer).is_ok() {
                    replies[slot] += 1;
                }
            }
        }
        echo_server.join().expect("UDP echo server");
        replies
    });
    assert_eq!(
        replies,
        [SENT, 0],
        "allowed source answered, the other dropped"
    );
    let counters = gate
        .counters(PortId::new(port, Protocol::Udp))
        .expect("counters")
        .total;
    assert_eq!(
        counters.accepted, SENT as u64,
        "every datagram is a new connection"
    );
    assert_eq!(counters.dropped_for(reason::NOT_ALLOWED), SENT as u64);
}
