//! `portgate status`: the daemon and what needs attention.

use std::{fmt::Write as _, time::Duration};

use clap::Args;

use super::{OutputFormat, format};
use crate::{api::StatusView, client::Client};

/// Show the daemon (version, pid, uptime), its range and usage per protocol, the kernel
/// gate and its attachments, the store, ports whose owner cgroup is gone, listeners no
/// allocation explains, and warnings.
#[derive(Debug, Args)]
pub struct StatusArgs {}

/// Runs `portgate status`.
pub async fn run(client: &Client, _args: &StatusArgs, output: OutputFormat) -> anyhow::Result<()> {
    let status = client.status().await?;
    match output {
        OutputFormat::Table => print!("{}", describe(&status)),
        OutputFormat::Json => format::print_json(&status)?,
    }
    Ok(())
}

/// The status as `key: value` lines, then the lists that need attention.
fn describe(status: &StatusView) -> String {
    let mut range = format!("{}-{}", status.min_port, status.max_port);
    if !status.reserved_ports.is_empty() {
        let reserved: Vec<String> = status.reserved_ports.iter().map(u16::to_string).collect();
        let _infallible = write!(range, " (reserved {})", reserved.join(","));
    }
    let mut pairs = vec![
        (
            "daemon",
            format!(
                "portgate {}, pid {}, up {}",
                status.version,
                status.pid,
                format::duration(Duration::from_secs(status.uptime_secs))
            ),
        ),
        ("range", range),
    ];
    for usage in &status.usage {
        pairs.push((
            match usage.proto {
                crate::model::Protocol::Tcp => "tcp",
                crate::model::Protocol::Udp => "udp",
            },
            format!(
                "{} active, {} draining, {} closed, {} free",
                usage.active, usage.draining, usage.closed, usage.free
            ),
        ));
    }
    pairs.push((
        "kernel gate",
        if status.kernel_gate {
            format!("on (pins {})", status.pin_dir.display())
        } else {
            "off: nothing is enforced in the kernel (see the warnings and the daemon's log)"
                .to_owned()
        },
    ));
    pairs.push((
        "attachments",
        if status.attachments.is_empty() {
            "none".to_owned()
        } else {
            status.attachments.join(", ")
        },
    ));
    pairs.push(("store", status.store.clone()));
    if let Some(fleet) = &status.fleet {
        pairs.push((
            "fleet",
            if fleet.joined {
                format!(
                    "node {}, revision {} applied ({} behind), etcd {}",
                    fleet.node,
                    fleet.revision,
                    fleet.behind,
                    if fleet.reachable {
                        "reachable"
                    } else {
                        "unreachable: fleet changes are refused"
                    }
                )
            } else {
                format!(
                    "node {}, the fleet not read since the start: enforcing the local store; fleet changes are refused while etcd is unreachable",
                    fleet.node
                )
            },
        ));
    }
    pairs.push((
        "owner gone",
        format!(
            "{} port(s) whose owner cgroup no longer exists",
            status.owner_gone
        ),
    ));
    pairs.push((
        "unexplained",
        format!(
            "{} listener(s) on managed ports without an allocation",
            status.unexplained_listeners.len()
        ),
    ));
    pairs.push(("warnings", status.warnings.len().to_string()));
    let mut out = format::key_values(&pairs);
    for listener in &status.unexplained_listeners {
        let _infallible = writeln!(
            out,
            "  listener {}/{} on {} (uid {}): allocate the port to its owner or move it out of the range",
            listener.port, listener.protocol, listener.addr, listener.uid
        );
    }
    for warning in &status.warnings {
        let _infallible = writeln!(out, "  warning: {warning}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe;
    use crate::{
        api::{RangeUsage, StatusView},
        model::Protocol,
    };

    #[test]
    fn lists_what_needs_attention_after_the_summary() {
        let status = StatusView {
            version: "0.1.0".to_owned(),
            pid: 4242,
            uptime_secs: 3725,
            min_port: 20000,
            max_port: 29999,
            reserved_ports: vec![20080],
            kernel_gate: true,
            pin_dir: "/sys/fs/bpf/portgate".into(),
            attachments: vec!["cgroup_skb_ingress".to_owned(), "xdp_eth0".to_owned()],
            store: "redb /var/lib/portgate/portgate.redb".to_owned(),
            usage: vec![RangeUsage {
                proto: Protocol::Tcp,
                active: 3,
                draining: 1,
                closed: 0,
                free: 9995,
            }],
            owner_gone: 2,
            unexplained_listeners: Vec::new(),
            warnings: vec!["the range overlaps the ephemeral range".to_owned()],
            fleet: None,
        };
        let text = describe(&status);
        assert!(
            text.starts_with("daemon:       portgate 0.1.0, pid 4242, up 1h 2m 5s\n"),
            "{text}"
        );
        assert!(
            text.contains("range:        20000-29999 (reserved 20080)\n"),
            "{text}"
        );
        assert!(
            text.contains("tcp:          3 active, 1 draining, 0 closed, 9995 free\n"),
            "{text}"
        );
        assert!(
            text.contains("owner gone:   2 port(s) whose owner cgroup no longer exists\n"),
            "{text}"
        );
        assert!(
            text.ends_with("  warning: the range overlaps the ephemeral range\n"),
            "{text}"
        );
    }
}
