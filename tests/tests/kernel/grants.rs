//! Authentication grants: a port that requires them admits a source while its grant lasts.

use portgate::{
    host::kernel::monotonic_now_ns,
    model::{PortAccessControl, PortId, PortPolicy, Protocol},
};
use portgate_common::reason;
use portgate_tests::{
    common::{
        LOCAL, OTHER_LOCAL, REFUSED_WITHIN, echo,
        gate::{LoopbackPort, MIN_PORT},
    },
    require_privileges,
};

#[test]
fn grants_admit_until_they_expire() {
    if !require_privileges!() {
        return;
    }
    let port = MIN_PORT + 30;
    let mut fixture = LoopbackPort::new(
        port,
        &PortPolicy {
            access: PortAccessControl {
                require_authentication: true,
                ..PortAccessControl::default()
            },
            ..PortPolicy::default()
        },
    );
    let connect = |fixture: &LoopbackPort, from| fixture.connect(from, REFUSED_WITHIN);

    assert!(connect(&fixture, LOCAL).is_err(), "no grant: refused");
    let now = monotonic_now_ns();
    let gate = &mut fixture.gate;
    gate.add_grant(
        PortId::new(port, Protocol::Tcp),
        LOCAL,
        now + 60_000_000_000,
    )
    .expect("grant");
    gate.add_grant(
        PortId::new(port, Protocol::Tcp),
        OTHER_LOCAL,
        now.saturating_sub(1),
    )
    .expect("expired grant");
    let mut ok = connect(&fixture, LOCAL).expect("an unexpired grant admits");
    echo(&mut ok, b"granted").expect("echo");
    assert!(
        connect(&fixture, OTHER_LOCAL).is_err(),
        "an expired grant does not admit"
    );
    fixture
        .gate
        .remove_grant(PortId::new(port, Protocol::Tcp), LOCAL)
        .expect("revoke");
    assert!(
        connect(&fixture, LOCAL).is_err(),
        "a revoked grant does not admit"
    );
    let counters = fixture
        .gate
        .counters(PortId::new(port, Protocol::Tcp))
        .expect("counters")
        .total;
    assert!(counters.dropped_for(reason::AUTH_REQUIRED) >= 3);
    assert_eq!(counters.accepted, 1);
}
