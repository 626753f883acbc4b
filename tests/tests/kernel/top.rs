//! `portgate top` in a real terminal (a tmux session of a fixed size) over a real daemon:
//! allowed, limited and refused connections on loopback in the daemon's namespace, then
//! the screen read with `tmux capture-pane`: the ports' rows, connections against their
//! limits, drops by reason with their rates, the deny events, a sort key, and `q`, Esc,
//! Ctrl-C and SIGTERM ending it with status 0 and the terminal as it was; run by a user
//! other than root, and through a daemon that stops and starts again.

use std::{
    net::TcpStream,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use portgate::model::DropReason;
use portgate_tests::{
    common::{
        CONNECT_WITHIN, EchoServer, LOCAL, OTHER_LOCAL, REFUSED_WITHIN, connect_from, eventually,
        listen_in, loopback, tmux::Tmux,
    },
    daemon::{Daemon, portgate_bin},
    require_tmux,
};

/// How long the screen may take to show what the daemon holds (a debug build, a loaded
/// machine; reads every 200 ms).
const SHOWN_WITHIN: Duration = Duration::from_secs(30);

/// The line of the ports' table that starts with `port`.
fn port_line(screen: &str, port: u16) -> Option<(usize, &str)> {
    screen
        .lines()
        .enumerate()
        .find(|(_, line)| line.split_whitespace().next() == Some(&port.to_string()))
}

/// The line with every port's drops.
fn totals_line(screen: &str) -> &str {
    screen
        .lines()
        .find(|line| line.starts_with("all ports' drops:"))
        .unwrap_or_default()
}

/// Whether `screen` shows what `echo` printed after `words`: an exit status, where the
/// command line typed shows `$?`.
fn echoed(screen: &str, words: &str) -> bool {
    screen.match_indices(words).any(|(at, _)| {
        screen[at + words.len()..]
            .chars()
            .next()
            .is_some_and(|next| next.is_ascii_digit())
    })
}

/// The deny event line of 127.0.0.2 refused on `port` for not being allowed.
fn deny_event(screen: &str, port: u16) -> Option<&str> {
    screen.lines().find(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        words.contains(&port.to_string().as_str())
            && words.contains(&"127.0.0.2")
            && words.contains(&"not_allowed")
    })
}

/// The per-second rate shown after `reason N (` in `line`.
fn rate_after(line: &str, reason: DropReason, count: u64) -> Option<f64> {
    let start = line.find(&format!("{reason} {count} ("))? + format!("{reason} {count} (").len();
    line[start..].split("/s)").next()?.parse().ok()
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one scenario on one screen, told in order"
)]
fn top_shows_ports_drops_and_events_sorts_and_quits() {
    if !require_tmux!() {
        return;
    }
    let daemon = Daemon::start(42_300, 42_309);
    let (limited, open) = (42_300_u16, 42_301_u16);
    daemon.cli_ok(
        None,
        &[
            "alloc",
            "--owner",
            "limited",
            "--port",
            "42300",
            "--allow",
            "127.0.0.1",
            "--max-conns",
            "2",
        ],
    );
    daemon.cli_ok(
        None,
        &[
            "alloc",
            "--owner",
            "open",
            "--port",
            "42301",
            "--max-conns",
            "5",
        ],
    );
    let servers: Vec<EchoServer> = [limited, open]
        .map(|port| {
            daemon
                .ns
                .run(|| EchoServer::serve(listen_in(&daemon.cgroup, loopback(port))))
        })
        .into();
    let connect = |from, port, within| daemon.ns.run(|| connect_from(from, loopback(port), within));
    let held: Vec<TcpStream> = [limited, limited, open]
        .map(|port| connect(LOCAL, port, CONNECT_WITHIN).expect("an allowed connection"))
        .into();
    assert!(
        connect(LOCAL, limited, REFUSED_WITHIN).is_err(),
        "over the limit"
    );
    assert!(
        connect(OTHER_LOCAL, limited, REFUSED_WITHIN).is_err(),
        "outside the allowlist"
    );
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .allocations()
            .values()
            .map(|view| view.connections)
            .sum::<u64>()
            == 3),
        "three connections held"
    );
    // The counts settle once the refused connects gave up (their SYNs were retried).
    let stats = daemon.api(|client| client.stats(None)).expect("stats");
    let dropped = |reason| -> u64 {
        stats
            .iter()
            .map(|report| report.counters.dropped.get(reason))
            .sum()
    };
    let (not_allowed, conn_limit) = (
        dropped(DropReason::NotAllowed),
        dropped(DropReason::ConnLimit),
    );
    assert!(not_allowed >= 1 && conn_limit >= 1, "{stats:?}");

    let tmux = Tmux::new(200, 50);
    tmux.type_line(&format!(
        "S=$(stty -g); {} --socket {} top --interval 200ms; echo \"top exited $? tty $([ \"$(stty -g)\" = \"$S\" ] && echo restored || echo changed)\"",
        portgate_bin().display(),
        daemon.socket.display()
    ));
    let screen = tmux.wait_for("both ports and every drop", SHOWN_WITHIN, |screen| {
        port_line(screen, limited)
            .is_some_and(|(_, line)| line.contains("not_allowed") && line.contains("conn_limit"))
            && port_line(screen, open).is_some()
            && totals_line(screen).contains(&format!("not_allowed {not_allowed} ("))
            && deny_event(screen, limited).is_some()
    });
    let (_, row) = port_line(&screen, limited).expect("the limited port's row");
    for cell in ["tcp", "host", "limited", "active", "2/2"] {
        assert!(
            row.split_whitespace().any(|word| word == cell),
            "{cell} in {row:?}\n{screen}"
        );
    }
    assert!(
        row.contains(&format!("not_allowed {not_allowed} (")),
        "{row}"
    );
    assert!(row.contains(&format!("conn_limit {conn_limit} (")), "{row}");
    let (_, row) = port_line(&screen, open).expect("the open port's row");
    assert!(row.split_whitespace().any(|word| word == "1/5"), "{row}");
    assert!(row.contains("open"), "{row}");
    assert!(screen.contains("deny events, newest first"), "{screen}");
    let event = deny_event(&screen, limited).expect("a deny event");
    assert!(
        event.contains("cgroup_skb") || event.contains("xdp"),
        "{event}"
    );
    // No new drops: every rate falls to zero by the next reads.
    let screen = tmux.wait_for("zero drop rates", SHOWN_WITHIN, |screen| {
        rate_after(totals_line(screen), DropReason::NotAllowed, not_allowed) == Some(0.0)
            && rate_after(totals_line(screen), DropReason::ConnLimit, conn_limit) == Some(0.0)
    });
    assert!(
        totals_line(&screen).contains("unallocated 0 (0.0/s)"),
        "{screen}"
    );

    // Refused connects now, until the screen shows their rate.
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            let mut tries = 0_u32;
            while !stop.load(Ordering::Relaxed) && tries < 200 {
                let _refused = connect(OTHER_LOCAL, limited, Duration::from_millis(100));
                tries += 1;
            }
        });
        tmux.wait_for("a drop rate above zero", SHOWN_WITHIN, |screen| {
            let line = totals_line(screen);
            let at = line.find("not_allowed ").map_or("", |at| &line[at..]);
            at.split('(')
                .nth(1)
                .and_then(|rest| rest.split("/s)").next())
                .and_then(|rate| rate.parse::<f64>().ok())
                .is_some_and(|rate| rate > 0.0)
        });
        stop.store(true, Ordering::Relaxed);
        flood.join().expect("the refused connects");
    });

    // Sorting: by connections, the open port (1) comes before the limited one (2); the
    // same key again reverses.
    let order = |screen: &str| {
        let (a, _) = port_line(screen, limited).expect("the limited port's row");
        let (b, _) = port_line(screen, open).expect("the open port's row");
        a < b
    };
    assert!(order(&tmux.screen()), "by port at first");
    tmux.press("c");
    tmux.wait_for("sorted by connections", SHOWN_WITHIN, |screen| {
        screen.contains("sorted by connections ascending") && !order(screen)
    });
    tmux.press("c");
    tmux.wait_for("sorted by connections, reversed", SHOWN_WITHIN, |screen| {
        screen.contains("sorted by connections descending") && order(screen)
    });

    tmux.press("q");
    let screen = tmux.wait_for("the shell again", SHOWN_WITHIN, |screen| {
        echoed(screen, "top exited ")
    });
    assert!(screen.contains("top exited 0 tty restored"), "{screen}");
    assert!(
        !screen.contains("deny events, newest first"),
        "the alternate screen was left:\n{screen}"
    );
    drop((held, servers));
}

#[test]
fn top_runs_for_another_user_keeps_trying_without_the_daemon_and_quits_on_keys_and_sigterm() {
    if !require_tmux!() {
        return;
    }
    let mut daemon = Daemon::start(42_310, 42_319);
    daemon.cli_ok(None, &["alloc", "--owner", "root-owned", "--port", "42310"]);
    daemon.cli_ok(
        Some(65_534),
        &["alloc", "--owner", "nobody-owned", "--port", "42311"],
    );
    let tmux = Tmux::new(160, 40);
    let as_nobody = format!(
        "setpriv --reuid 65534 --regid 65534 --clear-groups {} --socket {} top --interval 200ms",
        daemon.shared_bin().display(),
        daemon.socket.display()
    );
    for (quit, run) in [("Escape", 1), ("C-c", 2), ("SIGTERM", 3)] {
        tmux.type_line(&format!(
            "S=$(stty -g); {as_nobody}; echo \"run {run} exited $? tty $([ \"$(stty -g)\" = \"$S\" ] && echo restored || echo changed)\""
        ));
        let screen = tmux.wait_for("both ports", SHOWN_WITHIN, |screen| {
            port_line(screen, 42_310).is_some() && port_line(screen, 42_311).is_some()
        });
        assert!(
            screen.contains("nobody-owned") && screen.contains("root-owned"),
            "{screen}"
        );
        if run == 1 {
            // The daemon goes away: said on the screen, the rows kept; it comes back: read
            // again.
            assert!(daemon.stop(), "the daemon stops on SIGTERM");
            let screen = tmux.wait_for("the daemon unreachable", SHOWN_WITHIN, |screen| {
                screen.contains("daemon unreachable, trying again every 200ms: cannot connect")
            });
            assert!(port_line(&screen, 42_310).is_some(), "{screen}");
            daemon.spawn();
            tmux.wait_for("the daemon again", SHOWN_WITHIN, |screen| {
                screen.contains("portgate top: daemon") && port_line(screen, 42_311).is_some()
            });
        }
        if quit == "SIGTERM" {
            // The shell's one child is top (setpriv runs it in its own place).
            let shell = tmux.pane_pid();
            let children = std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
                .expect("the shell's children");
            let top: i32 = children.trim().parse().expect("one child, top");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(top),
                nix::sys::signal::Signal::SIGTERM,
            )
            .expect("SIGTERM to top");
        } else {
            tmux.press(quit);
        }
        let screen = tmux.wait_for("the exit status", SHOWN_WITHIN, |screen| {
            echoed(screen, &format!("run {run} exited "))
        });
        assert!(
            screen.contains(&format!("run {run} exited 0 tty restored")),
            "{quit}:\n{screen}"
        );
    }
    // A socket nobody answers on: the client's error, before the screen is touched.
    let output = std::process::Command::new(portgate_bin())
        .args(["--socket", "/nonexistent/portgate.sock", "top"])
        .output()
        .expect("run portgate top");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("portgate: cannot connect to the daemon at /nonexistent/portgate.sock"),
        "{stderr}"
    );
}
