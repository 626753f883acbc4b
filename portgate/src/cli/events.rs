//! `portgate events`: deny events from the daemon.

use std::{
    fmt::Write as _,
    io::{self, Write as _},
    ops::ControlFlow,
};

use clap::Args;

use super::{OutputFormat, format};
use crate::{api::EventView, client::Client};

/// Show deny events: who was refused on which port, why, and by which hook. Bind denials
/// name the process that tried.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen (until interrupted).
    #[arg(short, long)]
    pub follow: bool,
}

/// Runs `portgate events`: a table line or a JSON line per event, printed as it arrives.
pub async fn run(client: &Client, args: &EventsArgs, output: OutputFormat) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    let mut written = match output {
        OutputFormat::Table => writeln!(stdout, "{}", header()),
        OutputFormat::Json => Ok(()),
    };
    if written.is_ok() {
        client
            .events(args.follow, |event| {
                let line = match output {
                    OutputFormat::Table => Ok(row(&event)),
                    OutputFormat::Json => serde_json::to_string(&event).map_err(io::Error::from),
                };
                written = line.and_then(|line| writeln!(stdout, "{line}"));
                if written.is_ok() {
                    ControlFlow::Continue(())
                } else {
                    ControlFlow::Break(())
                }
            })
            .await?;
    }
    match written {
        // The reader went away (`portgate events -f | head`): nothing left to do.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(err) => Err(anyhow::anyhow!(
            "writing events to stdout: {err}: check where the output goes"
        )),
        Ok(()) if args.follow => Err(anyhow::anyhow!(
            "the daemon closed the event stream: see whether it still runs (`portgate status`), then run `portgate events -f` again"
        )),
        Ok(()) => Ok(()),
    }
}

/// The column names, aligned as [`row`] aligns the values (the stream cannot be measured
/// before it is printed).
pub(crate) fn header() -> String {
    line(["TIME", "PORT", "PROTO", "ADDR", "REASON", "HOOK"])
}

/// One event as a table line; after it, in parentheses, the port's namespace when it is
/// not the host's, and the process of a bind denial.
pub(crate) fn row(event: &EventView) -> String {
    let mut line = line([
        &format::time(event.time),
        &event.id.port.to_string(),
        &event.id.protocol.to_string(),
        &event.addr.to_string(),
        &event.reason,
        &event.hook,
    ]);
    let mut details = Vec::new();
    if !event.id.netns.is_host() {
        let netns = event.id.netns.name(event.netns_label.as_deref());
        details.push(format!("netns {netns}"));
    }
    if event.pid != 0 {
        details.push(format!("pid {}, cgroup {}", event.pid, event.cgroup_id));
    }
    if !details.is_empty() {
        // Writing to a String cannot fail.
        let _infallible = write!(line, " ({})", details.join(", "));
    }
    line
}

/// Cells in fixed-width columns: an RFC 3339 time, a port, a protocol, an IPv4 address (an
/// IPv6 one pushes the rest right), the longest reason.
fn line([time, port, proto, addr, reason, hook]: [&str; 6]) -> String {
    format!("{time:<20}  {port:<5}  {proto:<5}  {addr:<15}  {reason:<13}  {hook}")
}

#[cfg(test)]
mod tests {
    use super::{header, row};
    use crate::{
        api::EventView,
        model::{NetnsId, PortId},
    };

    #[test]
    fn rows_line_up_with_the_header() {
        let mut event = EventView {
            time: 1_700_000_000_000,
            id: PortId::from(20001),
            netns_label: None,
            addr: "10.0.0.9".parse().expect("an address"),
            reason: "not_allowed".to_owned(),
            hook: "xdp".to_owned(),
            cgroup_id: 0,
            pid: 0,
        };
        assert_eq!(
            header(),
            "TIME                  PORT   PROTO  ADDR             REASON         HOOK"
        );
        assert_eq!(
            row(&event),
            "2023-11-14T22:13:20Z  20001  tcp    10.0.0.9         not_allowed    xdp"
        );
        event.reason = "bind_denied".to_owned();
        event.hook = "bind4".to_owned();
        event.pid = 42;
        event.cgroup_id = 7;
        assert!(row(&event).ends_with("bind4 (pid 42, cgroup 7)"));
        event.id.netns = NetnsId(4097);
        event.netns_label = Some("web1".to_owned());
        assert!(
            row(&event).ends_with("bind4 (netns web1, pid 42, cgroup 7)"),
            "{}",
            row(&event)
        );
        event.netns_label = None;
        event.pid = 0;
        assert!(
            row(&event).ends_with("bind4 (netns 4097)"),
            "{}",
            row(&event)
        );
    }
}
