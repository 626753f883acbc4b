//! `portgate check`: would a new connection get in?

use std::net::IpAddr;

use clap::Args;

use super::{Outcome, OutputFormat, PortArg, format};
use crate::{api::CheckResponse, client::Client};

/// Ask the daemon whether a new connection from IP to the port would get in now: exit 0 and
/// print "allowed", or exit 1 and print why not.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The port.
    #[command(flatten)]
    pub port: PortArg,
    /// The source address to check.
    #[arg(value_name = "IP")]
    pub ip: IpAddr,
}

/// Runs `portgate check`: [`Outcome::Denied`] when the connection would be refused.
pub async fn run(
    client: &Client,
    args: &CheckArgs,
    output: OutputFormat,
) -> anyhow::Result<Outcome> {
    let answer = client.check(args.port.id(client).await?, args.ip).await?;
    match output {
        OutputFormat::Table => {
            println!("{}", verdict_line(&answer));
            if let Some(warning) = &answer.warning {
                eprintln!("warning: {warning}");
            }
        }
        OutputFormat::Json => format::print_json(&answer)?,
    }
    Ok(if answer.allowed {
        Outcome::Done
    } else {
        Outcome::Denied
    })
}

/// "allowed", or "denied: REASON: MESSAGE".
fn verdict_line(answer: &CheckResponse) -> String {
    if answer.allowed {
        return "allowed".to_owned();
    }
    let mut line = "denied".to_owned();
    for part in [&answer.reason, &answer.message].into_iter().flatten() {
        line.push_str(": ");
        line.push_str(part);
    }
    line
}

#[cfg(test)]
mod tests {
    use axum::{Json, Router, routing::get};

    use super::{CheckArgs, run, verdict_line};
    use crate::{
        api::CheckResponse,
        cli::{Outcome, OutputFormat, PortArg},
        client::testing::serve,
        model::{PortId, Protocol},
    };

    fn refused() -> CheckResponse {
        CheckResponse {
            id: PortId::from(20001),
            ip: "10.0.0.9".parse().expect("an address"),
            allowed: false,
            reason: Some("not_allowed".to_owned()),
            message: Some(
                "10.0.0.9 may not connect to 20001/tcp: not in the port's allowlist".to_owned(),
            ),
            warning: None,
        }
    }

    #[test]
    fn a_refusal_says_why() {
        assert_eq!(
            verdict_line(&refused()),
            "denied: not_allowed: 10.0.0.9 may not connect to 20001/tcp: not in the port's allowlist"
        );
    }

    #[tokio::test]
    async fn a_refusal_is_the_denied_outcome() {
        let router =
            Router::new().route("/v1/ports/{port}/check", get(|| async { Json(refused()) }));
        let (_dir, client) = serve(router).await;
        let args = CheckArgs {
            port: PortArg {
                port: 20001,
                proto: Protocol::Tcp,
                netns: None,
            },
            ip: "10.0.0.9".parse().expect("an address"),
        };

        let outcome = run(&client, &args, OutputFormat::Table)
            .await
            .expect("an answer");

        assert_eq!(outcome, Outcome::Denied);
        assert_eq!(outcome.exit_code(), crate::cli::EXIT_DENIED);
    }
}
