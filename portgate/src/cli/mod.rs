//! The `portgate` command line: clap derive, one module per verb.
//!
//! Verbs that talk to the daemon go through [`crate::client`] on a current-thread runtime;
//! `maps` reads the kernel's pins directly, `daemon` and `uninstall` run in this process;
//! `top` runs its own loop over the client.
//!
//! Exit codes: [`EXIT_OK`] when the verb did what was asked (and `check` found the connection
//! allowed), [`EXIT_DENIED`] when `check` found it refused, [`EXIT_FAILURE`] for every failure
//! (daemon down or refusing, bad input; clap's own usage errors use 2 as well).

pub mod access;
pub mod alloc;
pub mod check;
pub mod completions;
pub mod daemon;
pub mod events;
pub mod fleet;
pub mod format;
mod grant;
pub mod grants;
pub mod key;
pub mod knock;
pub mod list;
pub mod man;
pub mod maps;
pub mod release;
pub mod renew;
pub mod show;
pub mod stats;
pub mod status;
pub mod table;
pub mod top;

use std::{collections::BTreeMap, ffi::OsString, net::IpAddr, path::PathBuf, process::ExitCode};

use clap::{
    Args, CommandFactory as _, Parser, Subcommand, ValueEnum, builder::TypedValueParser as _,
};
use ipnet::IpNet;

use self::release::Verb;
use crate::{
    client::{Client, ClientError},
    model::{NetnsId, PortId, Protocol},
    paths,
};

/// Exit code: done (`check`: allowed).
pub const EXIT_OK: u8 = 0;
/// Exit code: `check` found the connection refused.
pub const EXIT_DENIED: u8 = 1;
/// Exit code: something failed; the one line on stderr says what and what to do.
pub const EXIT_FAILURE: u8 = 2;

/// How results are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for programs.
    Json,
}

/// portgate: hands out ports to owners and enforces each port's policy in the kernel.
#[derive(Debug, Parser)]
#[command(name = "portgate", version, about)]
pub struct Cli {
    /// Output format.
    #[arg(
        short = 'o',
        long = "output",
        global = true,
        value_enum,
        default_value_t
    )]
    pub output: OutputFormat,
    /// The daemon's API socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "PORTGATE_SOCKET",
        default_value = paths::DEFAULT_SOCKET
    )]
    pub socket: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Allocate a port and print its number.
    Alloc(alloc::AllocArgs),
    /// Release a port: no new connections; it closes when its connections end.
    Release(release::ReleaseArgs),
    /// Renew a port's lease.
    Renew(renew::RenewArgs),
    /// Drain a port: no new connections; established ones continue.
    Drain(release::ReleaseArgs),
    /// List every allocation.
    List(list::ListArgs),
    /// Show one allocation.
    Show(show::ShowArgs),
    /// Change a port's allowlist, connection limit or authentication requirement.
    Access(access::AccessArgs),
    /// Let an authenticated source connect to a port that requires authentication.
    Grant(grant::GrantArgs),
    /// List a port's grants, with who issued each.
    Grants(grants::GrantsArgs),
    /// Withdraw a port's grant for an address at once.
    Revoke(grants::RevokeArgs),
    /// Ask a daemon's knock listener to open a port to this client (needs a key file).
    Knock(knock::KnockArgs),
    /// Client keys for the knock: add, list, revoke (administrators only).
    Key(key::KeyArgs),
    /// Fleet mode: the live nodes, and the repair pass for a dead one.
    Fleet(fleet::FleetArgs),
    /// Would a new connection from an address get in? Exit 0 if so, 1 if not.
    Check(check::CheckArgs),
    /// Counters and policy of every port, or of one (the columns of `maps`).
    Stats(stats::StatsArgs),
    /// Deny events: who was refused where, and by which hook.
    Events(events::EventsArgs),
    /// The daemon, its range, the kernel gate and what needs attention.
    Status(status::StatusArgs),
    /// A live view of ports, connections, drops and deny events (q quits).
    ///
    /// Every port with its owner, status, connections against its limit, new connections
    /// and drops per second by reason; every port's drops together; the deny events as
    /// they arrive, newest first; the daemon's warnings. Keys: q, Esc or Ctrl-C quit; p, o,
    /// s, c, a, d sort by port, owner, status, connections, connections per second, drops
    /// per second (the same key again, or r, reverses). See docs/top.md.
    Top(top::TopArgs),
    /// Show the live kernel maps (no daemon needed).
    Maps(maps::MapsArgs),
    /// Print a shell completion script.
    Completions(completions::CompletionsArgs),
    /// Print the manual page, or write every command's page to a directory.
    ///
    /// Without --dir the main page goes to stdout (`portgate man | man -l -`); with it, one
    /// page per command (portgate.1, portgate-alloc.1, portgate-key-add.1, ...) is written
    /// to DIR, e.g. /usr/local/share/man/man1.
    Man(man::ManArgs),
    /// Run the daemon.
    Daemon(daemon::ConfigArgs),
    /// Detach and unpin everything portgate put in the kernel.
    Uninstall(daemon::ConfigArgs),
}

/// What a verb found, beyond success or failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It did what was asked; `check`: the connection would get in.
    Done,
    /// `check`: the connection would be refused.
    Denied,
}

impl Outcome {
    /// The process exit code.
    #[must_use]
    pub const fn exit_code(self) -> u8 {
        match self {
            Self::Done => EXIT_OK,
            Self::Denied => EXIT_DENIED,
        }
    }
}

impl From<Outcome> for ExitCode {
    fn from(outcome: Outcome) -> Self {
        Self::from(outcome.exit_code())
    }
}

/// A port named on the command line (a bare number means TCP in the host's namespace).
#[derive(Clone, Debug, Args)]
pub struct PortArg {
    /// The port.
    #[arg(value_name = "PORT")]
    pub port: u16,
    /// Its protocol.
    #[arg(long, value_name = "PROTO", default_value = "tcp", value_parser = protocol_parser())]
    pub proto: Protocol,
    /// Its network namespace: a label as the NETNS column shows it (`host`, a name under
    /// /run/netns, a container id, net:[INODE]), a cookie, or a path (/run/netns/NAME,
    /// /proc/PID/ns/net) [default: the host's].
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,
}

impl PortArg {
    /// The port it names, its namespace found by the daemon.
    pub async fn id(&self, client: &Client) -> Result<PortId, ClientError> {
        port_id(client, self.port, self.proto, self.netns.as_deref()).await
    }
}

/// The port `port`/`proto` in the namespace `netns` names (the host's when `None`): the
/// one way a verb turns what it was given into a [`PortId`]. The daemon says what a name
/// means (`GET /v1/netns`); a relative path is taken from this process's directory.
pub async fn port_id(
    client: &Client,
    port: u16,
    proto: Protocol,
    netns: Option<&str>,
) -> Result<PortId, ClientError> {
    let netns = match netns {
        None => NetnsId::HOST,
        // No label has a '/': a name with one is a path, which the daemon opens from `/`.
        Some(path) if path.contains('/') => {
            let path = std::path::absolute(path).unwrap_or_else(|_| PathBuf::from(path));
            client.netns(&path.to_string_lossy()).await?.netns
        }
        Some(name) => client.netns(name).await?.netns,
    };
    Ok(PortId {
        netns,
        ..PortId::new(port, proto)
    })
}

/// The labels of the namespaces the daemon's allocations are in, by cookie: what a NETNS
/// column shows for a port whose view carries only the cookie.
pub async fn netns_labels(client: &Client) -> Result<BTreeMap<NetnsId, String>, ClientError> {
    Ok(client
        .list()
        .await?
        .into_iter()
        .filter_map(|view| Some((view.id.netns, view.netns_label?)))
        .collect())
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let Cli {
        output,
        socket,
        command,
    } = cli;
    let client = Client::new(socket);
    match command {
        Command::Alloc(args) => on_daemon(alloc::run(&client, &args, output))?,
        Command::Release(args) => on_daemon(release::run(&client, &args, Verb::Release, output))?,
        Command::Renew(args) => on_daemon(renew::run(&client, &args, output))?,
        Command::Drain(args) => on_daemon(release::run(&client, &args, Verb::Drain, output))?,
        Command::List(args) => on_daemon(list::run(&client, &args, output))?,
        Command::Show(args) => on_daemon(show::run(&client, &args, output))?,
        Command::Access(args) => on_daemon(access::run(&client, &args, output))?,
        Command::Grant(args) => on_daemon(grant::run(&client, &args, output))?,
        Command::Grants(args) => on_daemon(grants::run(&client, &args, output))?,
        Command::Revoke(args) => on_daemon(grants::revoke(&client, &args, output))?,
        Command::Knock(args) => knock::run(&args, output)?,
        Command::Key(args) => on_daemon(key::run(&client, &args, output))?,
        Command::Fleet(args) => on_daemon(fleet::run(&client, &args, output))?,
        Command::Check(args) => return on_daemon(check::run(&client, &args, output)),
        Command::Stats(args) => on_daemon(stats::run(&client, &args, output))?,
        Command::Events(args) => on_daemon(events::run(&client, &args, output))?,
        Command::Status(args) => on_daemon(status::run(&client, &args, output))?,
        Command::Top(args) => top::run(client, &args)?,
        Command::Maps(args) => maps::run(&client, &args, output)?,
        Command::Completions(args) => completions::run(&args)?,
        Command::Man(args) => man::run(&args)?,
        Command::Daemon(args) => daemon::run(args)?,
        Command::Uninstall(args) => daemon::uninstall(args)?,
    }
    Ok(Outcome::Done)
}

/// The one line printed after `portgate: ` for a failed verb: the error and its causes.
#[must_use]
pub fn failure_line(err: &anyhow::Error) -> String {
    crate::text::error_chain(err.as_ref())
}

/// The one line printed after `portgate: ` for the command line `args` (program name
/// first) that clap refused: its message without clap's usage block, and which help to read.
#[must_use]
pub fn usage_line(err: &clap::Error, args: &[OsString]) -> String {
    let rendered = err.render().to_string();
    let message: Vec<&str> = rendered
        .lines()
        .map(str::trim)
        .take_while(|line| !line.is_empty())
        .collect();
    let message = message.join(" ");
    let message = message.strip_prefix("error: ").unwrap_or(&message);
    let command = Cli::command();
    let verb = args
        .iter()
        .skip(1)
        .filter_map(|arg| arg.to_str())
        .find(|arg| command.find_subcommand(arg).is_some());
    match verb {
        Some(verb) => format!("{message}: see `portgate {verb} --help`"),
        None => format!("{message}: see `portgate --help`"),
    }
}

/// Runs a verb that talks to the daemon on a current-thread runtime.
fn on_daemon<T>(verb: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| {
            anyhow::anyhow!("cannot start the async runtime: {err}: check the process limits")
        })?
        .block_on(verb)
}

/// `--proto`: tcp or udp, listed in `--help` and completions.
fn protocol_parser() -> impl clap::builder::TypedValueParser<Value = Protocol> {
    clap::builder::PossibleValuesParser::new(["tcp", "udp"])
        .try_map(|name| name.parse::<Protocol>())
}

/// `--allow`/`--remove`: a CIDR prefix, or a bare address as a host prefix (/32, /128).
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| {
            format!(
                "{text:?} is neither a CIDR prefix (10.0.0.0/8, 2001:db8::/32) nor an IP address"
            )
        })
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsString, path::Path, time::Duration};

    use clap::{CommandFactory as _, Parser as _, error::ErrorKind};

    use super::{Cli, Command, OutputFormat, port_id, usage_line};
    use crate::{
        client::testing::{netns_route, serve},
        model::{NetnsId, PortId, Protocol},
        paths,
    };

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("portgate")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(argv(args))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_before_or_after_the_verb() {
        for args in [
            &["-o", "json", "--socket", "/tmp/pg.sock", "list"][..],
            &["list", "-o", "json", "--socket", "/tmp/pg.sock"][..],
            &["--output", "json", "list", "--socket", "/tmp/pg.sock"][..],
        ] {
            let cli = parse(args).expect("parses");
            assert_eq!(cli.output, OutputFormat::Json, "{args:?}");
            assert_eq!(cli.socket, Path::new("/tmp/pg.sock"), "{args:?}");
            assert!(matches!(cli.command, Command::List(_)), "{args:?}");
        }
    }

    #[test]
    fn socket_and_output_have_defaults() {
        // Only meaningful when the environment does not name a socket.
        if std::env::var_os("PORTGATE_SOCKET").is_some() {
            return;
        }
        let cli = parse(&["status"]).expect("parses");
        assert_eq!(cli.output, OutputFormat::Table);
        assert_eq!(cli.socket, Path::new(paths::DEFAULT_SOCKET));
    }

    #[test]
    fn cgroup_conflicts_with_pid() {
        let err = parse(&[
            "alloc",
            "--owner",
            "web",
            "--cgroup",
            "/sys/fs/cgroup/web",
            "--pid",
            "42",
        ])
        .expect_err("both named");
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn alloc_takes_every_option() {
        let cli = parse(&[
            "alloc",
            "--owner",
            "web",
            "--port",
            "20001",
            "--proto",
            "udp",
            "--pid",
            "42",
            "--allow",
            "10.0.0.0/8",
            "--allow",
            "192.168.1.5",
            "--allow",
            "2001:db8::1",
            "--max-conns",
            "5",
            "--require-auth",
            "--ttl",
            "5m",
        ])
        .expect("parses");
        let Command::Alloc(args) = cli.command else {
            panic!("not alloc: {:?}", cli.command);
        };
        let request = args.request();
        assert_eq!(request.owner, "web");
        assert_eq!(request.port, Some(20001));
        assert_eq!(request.proto, Some(Protocol::Udp));
        assert_eq!(request.pid, Some(42));
        let allow: Vec<String> = request.allow.iter().map(ToString::to_string).collect();
        assert_eq!(allow, ["10.0.0.0/8", "192.168.1.5/32", "2001:db8::1/128"]);
        assert_eq!(request.max_conns, Some(5));
        assert!(request.require_auth);
        assert_eq!(request.ttl, Some(Duration::from_mins(5)));
    }

    #[test]
    fn allow_refuses_what_is_no_address() {
        let err = parse(&["alloc", "--owner", "web", "--allow", "10.0.0.300"])
            .expect_err("not an address");
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn access_needs_a_change() {
        let err = parse(&["access", "20001"]).expect_err("no change");
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let cli = parse(&["access", "20001", "--require-auth", "false"]).expect("one change");
        let Command::Access(args) = cli.command else {
            panic!("not access: {:?}", cli.command);
        };
        let change = args.change();
        assert_eq!(change.require_authentication, Some(false));
        assert!(change.allow.is_empty() && change.remove.is_empty());
    }

    #[test]
    fn access_moves_the_owner_alone() {
        let cli = parse(&[
            "access",
            "80",
            "--netns",
            "web",
            "--container",
            "0123456789ab",
        ])
        .expect("an owner move");
        let Command::Access(args) = cli.command else {
            panic!("not access: {:?}", cli.command);
        };
        let owner = args.owner().expect("a new owner");
        assert_eq!(owner.container.as_deref(), Some("0123456789ab"));
        assert!(owner.cgroup.is_none() && owner.pid.is_none() && owner.netns.is_none());
        let err = parse(&["access", "80", "--pid", "1", "--allow", "10.0.0.1"])
            .expect_err("an owner move and an access change at once");
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        let err = parse(&["access", "80", "--pid", "1", "--cgroup", "/sys/fs/cgroup/a"])
            .expect_err("two owners");
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
    }

    #[test]
    fn proto_defaults_to_tcp_and_refuses_others() {
        let cli = parse(&["check", "20001", "10.0.0.9"]).expect("parses");
        let Command::Check(args) = cli.command else {
            panic!("not check: {:?}", cli.command);
        };
        assert_eq!(args.port.proto, Protocol::Tcp);
        assert_eq!(args.ip.to_string(), "10.0.0.9");
        let err = parse(&["release", "20001", "--proto", "sctp"]).expect_err("sctp");
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn grant_ttl_defaults_to_five_minutes() {
        let cli = parse(&["grant", "20001", "10.0.0.9"]).expect("parses");
        let Command::Grant(args) = cli.command else {
            panic!("not grant: {:?}", cli.command);
        };
        assert_eq!(args.ttl, Duration::from_mins(5));
    }

    #[test]
    fn a_usage_error_is_one_line_naming_the_verbs_help() {
        let args = [
            "-o", "json", "alloc", "--owner", "web", "--cgroup", "/c", "--pid", "1",
        ];
        let err = parse(&args).expect_err("conflict");
        let line = usage_line(&err, &argv(&args));
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("the argument '--cgroup <PATH>'"), "{line}");
        assert!(line.ends_with("see `portgate alloc --help`"), "{line}");

        let args = ["release", "20001", "--proto", "sctp"];
        let err = parse(&args).expect_err("sctp");
        let line = usage_line(&err, &argv(&args));
        assert_eq!(
            line,
            "invalid value 'sctp' for '--proto <PROTO>' [possible values: tcp, udp]: see `portgate release --help`"
        );
    }

    #[test]
    fn every_port_verb_names_a_namespace() {
        for args in [
            &["show", "80", "--netns", "web1"][..],
            &["release", "80", "--netns", "web1"],
            &["drain", "80", "--netns", "web1"],
            &["renew", "80", "--netns", "web1"],
            &["access", "80", "--netns", "web1", "--max-conns", "1"],
            &["grant", "80", "10.0.0.9", "--netns", "web1"],
            &["check", "80", "10.0.0.9", "--netns", "web1"],
            &["stats", "80", "--netns", "web1"],
        ] {
            parse(args).unwrap_or_else(|err| panic!("{args:?}: {err}"));
        }
        let err = parse(&["stats", "--netns", "web1"]).expect_err("no port");
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[tokio::test]
    async fn a_namespace_name_becomes_its_cookie() {
        let (_dir, client) = serve(netns_route()).await;

        let id = port_id(&client, 80, Protocol::Tcp, Some("net:[4026532999]"))
            .await
            .expect("the namespace");
        assert_eq!(
            id,
            PortId {
                netns: NetnsId(4097),
                ..PortId::new(80, Protocol::Tcp)
            }
        );
        let err = port_id(&client, 80, Protocol::Tcp, Some("web2"))
            .await
            .expect_err("no such namespace");
        assert_eq!(
            err.to_string(),
            r#"no allocation's namespace is labelled "web2""#
        );
        // The host's, without a question to the daemon.
        let (_dir, nobody) = serve(axum::Router::new()).await;
        let host = port_id(&nobody, 80, Protocol::Udp, None)
            .await
            .expect("the host's");
        assert_eq!(host, PortId::new(80, Protocol::Udp));
    }
}
