//! `portgate list`: every allocation.

use clap::Args;

use super::{
    OutputFormat, format,
    table::{NETNS, PUBLISHED, Table, published_cell},
};
use crate::{api::AllocationView, client::Client, model::now_millis};

/// List every allocation: owner, policy, live connections and the lease left.
#[derive(Debug, Args)]
pub struct ListArgs {}

/// Runs `portgate list`.
pub async fn run(client: &Client, _args: &ListArgs, output: OutputFormat) -> anyhow::Result<()> {
    let views = client.list().await?;
    match output {
        OutputFormat::Table => print!("{}", allocation_table(&views, now_millis())),
        OutputFormat::Json => format::print_json(&views)?,
    }
    Ok(())
}

/// The allocations as a table, leases as the time left at `now`. NETNS shows only when a
/// port is in another namespace than the host's, PUBLISHED only when one is published.
fn allocation_table(views: &[AllocationView], now: u64) -> Table {
    let mut table = Table::new(&[
        "PORT", "PROTO", NETNS, PUBLISHED, "STATUS", "OWNER", "UID", "ALLOW", "MAXCONN", "AUTH",
        "CONNS", "LEASE",
    ]);
    for view in views {
        table.row(vec![
            view.id.port.to_string(),
            view.id.protocol.to_string(),
            view.id.netns.name(view.netns_label.as_deref()),
            published_cell(view.published),
            view.status.to_string(),
            view.owner.clone(),
            view.owner_uid
                .map_or_else(|| "-".to_owned(), |uid| uid.to_string()),
            format::allow_cell(&view.access.allowed_ips),
            format::limit(view.access.max_connections, "-"),
            format::yes_no(view.access.require_authentication).to_owned(),
            view.connections.to_string(),
            view.timeline
                .lease_expires_at
                .map_or_else(|| "-".to_owned(), |at| format::remaining(at, now)),
        ]);
    }
    table.port_columns()
}

#[cfg(test)]
mod tests {
    use super::allocation_table;
    use crate::{client::testing::view, model::NetnsId};

    #[test]
    fn lease_shows_the_time_left() {
        let mut unleased = view(20002);
        unleased.timeline.lease_expires_at = None;
        unleased.owner_uid = None;
        let table = allocation_table(&[view(20001), unleased], 1_700_000_000_000);
        assert_eq!(
            table.to_string(),
            "PORT   PROTO  STATUS  OWNER  UID   ALLOW       MAXCONN  AUTH  CONNS  LEASE\n\
             20001  tcp    active  web    1000  10.0.0.0/8  5        no    2      5m\n\
             20002  tcp    active  web    -     10.0.0.0/8  5        no    2      -\n"
        );
    }

    #[test]
    fn another_namespace_adds_its_columns() {
        let mut inside = view(80);
        inside.id.netns = NetnsId(4097);
        inside.netns_label = Some("web1".to_owned());
        inside.published = Some(20080);
        let mut unlabelled = view(80);
        unlabelled.id.netns = NetnsId(4098);
        let table = allocation_table(&[view(20001), inside, unlabelled], 1_700_000_000_000);
        assert_eq!(
            table.to_string(),
            "PORT   PROTO  NETNS  PUBLISHED  STATUS  OWNER  UID   ALLOW       MAXCONN  AUTH  CONNS  LEASE\n\
             20001  tcp    host   -          active  web    1000  10.0.0.0/8  5        no    2      5m\n\
             80     tcp    web1   20080      active  web    1000  10.0.0.0/8  5        no    2      5m\n\
             80     tcp    4098   -          active  web    1000  10.0.0.0/8  5        no    2      5m\n"
        );
    }
}
