//! `portgate list`: every allocation.

use clap::Args;

use super::{OutputFormat, format, table::Table};
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

/// The allocations as a table, leases as the time left at `now`.
fn allocation_table(views: &[AllocationView], now: u64) -> Table {
    let mut table = Table::new(&[
        "PORT", "PROTO", "STATUS", "OWNER", "UID", "ALLOW", "MAXCONN", "AUTH", "CONNS", "LEASE",
    ]);
    for view in views {
        table.row(vec![
            view.id.port.to_string(),
            view.id.protocol.to_string(),
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
    table
}

#[cfg(test)]
mod tests {
    use super::allocation_table;
    use crate::client::testing::view;

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
}
