//! portgate in front of a real container: podman (runc, netavark) runs a static busybox
//! `httpd` with its port 80 published on a host port; the daemon allocates the container's
//! port by container id (`alloc --container ID --publish HOST:80`) and its kernel gate
//! judges the container's traffic in the container's namespace.
//!
//! Opt-in (`PORTGATE_TEST_PODMAN=1`), as the podman test of `topology`: it needs podman,
//! runc and busybox-static and changes the machine (see `common::podman`). The daemon runs
//! in a test namespace with its programs on a test cgroup, and the container is started
//! below that cgroup (`--cgroup-parent`). The client is the host itself, over loopback:
//! netavark masquerades that traffic, so the container sees its bridge's gateway as the
//! source, and the allowlist judges that address.

use portgate::{
    api::AllocationView,
    model::{AccessChange, PortId, Protocol},
};
use portgate_tests::{
    common::{
        CONNECT_WITHIN, eventually, loopback,
        podman::{CONTAINER_PORT, PodmanContainer, PodmanImage, free_port, http_get, podman},
    },
    daemon::Daemon,
    require_podman,
};

#[test]
fn a_podman_containers_published_port_is_allocated_and_gated_by_container_id() {
    if !require_podman!() {
        return;
    }
    // The published host port must be in the daemon's range; the container's port 80 is
    // outside it (another namespace's ports may be any port).
    let host_port = free_port();
    let daemon = Daemon::start(host_port, host_port.saturating_add(9));
    let image = PodmanImage::build();
    let container = PodmanContainer::run_under(&image, host_port, Some(daemon.cgroup.path()));
    assert!(
        eventually(CONNECT_WITHIN, || http_get(loopback(host_port)).is_ok()),
        "httpd answers before the allocation"
    );

    // Allocated by a unique prefix of its id: its cgroup owns the port, in its namespace.
    let short = &container.id()[..12];
    let view: AllocationView = daemon.cli_json(
        None,
        &[
            "alloc",
            "--owner",
            "web",
            "--container",
            short,
            "--publish",
            &format!("{host_port}:{CONTAINER_PORT}"),
            "--allow",
            "192.0.2.1",
        ],
    );
    assert_eq!(view.id.port, CONTAINER_PORT);
    assert!(!view.id.netns.is_host(), "{view:?}");
    assert_eq!(view.netns_label.as_deref(), Some(short), "{view:?}");
    assert_eq!(view.published, Some(host_port));
    assert_eq!(
        view.cgroup,
        Some(container.cgroup()),
        "the container's cgroup owns it"
    );
    let id = PortId {
        netns: view.id.netns,
        ..PortId::new(CONTAINER_PORT, Protocol::Tcp)
    };

    // The source the container sees (netavark's masquerade of loopback) is not allowed.
    assert!(
        http_get(loopback(host_port)).is_err(),
        "a source outside the allowlist was served"
    );
    let report = daemon
        .api(|client| client.stats(Some(id)))
        .expect("stats of the container's port");
    let dropped = report
        .first()
        .map_or(0, |report| report.counters.dropped.not_allowed);
    assert!(
        dropped >= 1,
        "not_allowed counted on the container's port: {report:?}"
    );

    // Allowed once the gateway is, and counted as the container port's.
    let gateway = podman(&[
        "inspect",
        "--format",
        "{{.NetworkSettings.Gateway}}",
        container.id(),
    ]);
    let change = AccessChange {
        allow: [format!("{gateway}/32")
            .parse()
            .expect("the gateway's prefix")]
        .into_iter()
        .collect(),
        ..AccessChange::default()
    };
    daemon
        .api(|client| client.access(id, &change))
        .expect("allow the gateway");
    let page = http_get(loopback(host_port)).expect("served once allowed");
    assert!(page.contains(" 200 "), "{page}");
    let report = daemon
        .api(|client| client.stats(Some(id)))
        .expect("stats of the container's port");
    let accepted = report.first().map_or(0, |report| report.counters.accepted);
    assert!(
        accepted >= 1,
        "accepted on the container's port: {report:?}"
    );

    // Released, it goes Draining: new connections are refused again.
    daemon
        .api(|client| client.release(id))
        .expect("release the container's port");
    assert!(
        http_get(loopback(host_port)).is_err(),
        "a released port took a new connection"
    );
    drop(container);
}
