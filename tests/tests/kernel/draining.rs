//! Draining: new connections refused, established ones go on.

use portgate::model::{PortId, PortPolicy, PortStatus, Protocol};
use portgate_common::reason;
use portgate_tests::{
    common::{
        CONNECT_WITHIN, LOCAL, REFUSED_WITHIN, echo,
        gate::{LoopbackPort, MIN_PORT},
    },
    require_privileges,
};

#[test]
fn draining_port_refuses_new_connections_and_keeps_established_ones() {
    if !require_privileges!() {
        return;
    }
    let port = MIN_PORT + 20;
    let mut fixture = LoopbackPort::new(port, &PortPolicy::default());
    let mut established = fixture
        .connect(LOCAL, CONNECT_WITHIN)
        .expect("connect while Active");
    echo(&mut established, b"before").expect("echo while Active");

    fixture
        .gate
        .set_policy(
            PortId::new(port, Protocol::Tcp),
            &PortPolicy {
                status: PortStatus::Draining,
                ..PortPolicy::default()
            },
        )
        .expect("drain");
    assert!(
        fixture.connect(LOCAL, REFUSED_WITHIN).is_err(),
        "a Draining port refuses new connections"
    );
    for round in 0..20 {
        echo(
            &mut established,
            format!("while draining {round}").as_bytes(),
        )
        .expect("the established connection keeps exchanging data");
    }
    let counters = fixture
        .gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert!(counters.dropped_for(reason::DRAINING) >= 1);
    assert_eq!(
        fixture
            .gate
            .slots(PortId::from(port))
            .expect("slots")
            .established,
        1
    );
}
