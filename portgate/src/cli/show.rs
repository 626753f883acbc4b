//! `portgate show`: one allocation in full.

use clap::Args;

use super::{OutputFormat, PortArg, format};
use crate::{api::AllocationView, client::Client, model::now_millis};

/// Show one allocation: owner, policy, lifecycle times and live connections.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
}

/// Runs `portgate show`.
pub async fn run(client: &Client, args: &ShowArgs, output: OutputFormat) -> anyhow::Result<()> {
    let view = client.show(args.port.id(client).await?).await?;
    match output {
        OutputFormat::Table => print!("{}", describe(&view, now_millis())),
        OutputFormat::Json => format::print_json(&view)?,
    }
    Ok(())
}

/// `key: value` lines of an allocation, the lease as a time and the time left at `now`.
fn describe(view: &AllocationView, now: u64) -> String {
    let none = || "-".to_owned();
    let mut pairs = vec![
        ("port", view.id.port.to_string()),
        ("proto", view.id.protocol.to_string()),
    ];
    if !view.id.netns.is_host() {
        pairs.push((
            "netns",
            format!(
                "{} (cookie {})",
                view.id.netns.name(view.netns_label.as_deref()),
                view.id.netns.0
            ),
        ));
    }
    if let Some(port) = view.published {
        pairs.push((
            "published",
            format!("{port}/{} on the host", view.id.protocol),
        ));
    }
    pairs.extend([
        ("status", view.status.to_string()),
        ("owner", view.owner.clone()),
        (
            "owner uid",
            view.owner_uid.map_or_else(none, |uid| uid.to_string()),
        ),
        (
            "cgroup",
            view.cgroup.as_ref().map_or_else(
                || "- (anyone may bind)".to_owned(),
                |path| path.display().to_string(),
            ),
        ),
        (
            "allow",
            if view.access.allowed_ips.is_empty() {
                "any source".to_owned()
            } else {
                view.access
                    .allowed_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        ),
        (
            "max conns",
            format::limit(view.access.max_connections, "unlimited"),
        ),
        (
            "require auth",
            format::yes_no(view.access.require_authentication).to_owned(),
        ),
        ("connections", view.connections.to_string()),
        ("allocated", format::time(view.timeline.allocated_at)),
        ("ttl", view.timeline.ttl.map_or_else(none, format::duration)),
        (
            "lease expires",
            view.timeline
                .lease_expires_at
                .map_or_else(none, |at| format::expiry(at, now)),
        ),
    ]);
    if let Some(since) = view.timeline.draining_since {
        pairs.push(("draining since", format::time(since)));
    }
    if let Some(at) = view.timeline.closed_at {
        pairs.push(("closed at", format::time(at)));
    }
    format::key_values(&pairs)
}

#[cfg(test)]
mod tests {
    use super::describe;
    use crate::{client::testing::view, model::NetnsId};

    #[test]
    fn shows_every_field_as_a_line() {
        let text = describe(&view(20001), 1_700_000_000_000);
        assert!(text.starts_with("port:           20001\n"), "{text}");
        assert!(
            text.contains("lease expires:  2023-11-14T22:18:20Z (in 5m)\n"),
            "{text}"
        );
        assert!(!text.contains("draining since"), "{text}");
        assert!(!text.contains("netns"), "{text}");
    }

    #[test]
    fn another_namespace_is_named_with_its_cookie() {
        let mut inside = view(80);
        inside.id.netns = NetnsId(4097);
        inside.netns_label = Some("web1".to_owned());
        inside.published = Some(20080);
        let text = describe(&inside, 1_700_000_000_000);
        assert!(
            text.contains("proto:          tcp\nnetns:          web1 (cookie 4097)\npublished:      20080/tcp on the host\nstatus:"),
            "{text}"
        );
    }
}
