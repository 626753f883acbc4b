//! A terminal for tests of full-screen programs (`portgate top`): a detached tmux session
//! of a fixed size on a tmux server of its own (its socket in a temporary directory, no
//! configuration file), so that nothing of the user's tmux is touched. Keys are typed with `send-keys`, the screen is
//! read with `capture-pane -p`. Dropping the guard kills the server and its session.

use std::{io::Write as _, process::Command, time::Duration};

use super::{eventually, output, which};

/// Whether tmux is on PATH: without it, with `CI` set the test fails, saying how to get
/// it; otherwise it prints `SKIPPED: <test>: <why>` and the test returns.
pub fn require_tmux(test: &str) -> bool {
    if which("tmux").is_some() {
        return true;
    }
    let why = "tmux is not on PATH (apt install tmux, or run `cargo xtask setup`)";
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: cannot run: {why} (CI is set, so this fails)"
    );
    let _ignored = writeln!(std::io::stdout().lock(), "SKIPPED: {test}: {why}");
    false
}

/// Whether the calling test can run: [`require_tmux`] under the test's own name, then the
/// kernel test's privileges. A test of a terminal program starts with
/// `if !require_tmux!() { return; }`.
#[macro_export]
macro_rules! require_tmux {
    () => {
        $crate::common::tmux::require_tmux($crate::test_name!()) && $crate::require_privileges!()
    };
}

/// A detached tmux session running `sh`, on its own server; killed on drop.
pub struct Tmux {
    /// The server's socket (`tmux -S`).
    socket: String,
    /// The directory that holds it, removed on drop.
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// A `width` x `height` session running `sh` with `TERM` and `PS1` fixed.
    pub fn new(width: u16, height: u16) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("portgate-tmux-")
            .tempdir()
            .expect("a directory for the tmux socket");
        let tmux = Self {
            socket: dir.path().join("tmux.sock").display().to_string(),
            _dir: dir,
        };
        let (width, height) = (width.to_string(), height.to_string());
        tmux.run(&[
            "new-session",
            "-d",
            "-x",
            &width,
            "-y",
            &height,
            "env",
            "TERM=xterm-256color",
            "PS1=$ ",
            "sh",
        ]);
        tmux
    }

    /// `tmux -S <socket> -f /dev/null args...`; panics when it fails.
    fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["-S", &self.socket, "-f", "/dev/null"];
        all.extend_from_slice(args);
        output("tmux", &all)
    }

    /// Types `line` and Enter.
    pub fn type_line(&self, line: &str) {
        self.run(&["send-keys", "-t", "0", "-l", line]);
        self.run(&["send-keys", "-t", "0", "Enter"]);
    }

    /// Presses one key, as tmux names it (`q`, `Escape`, `C-c`).
    pub fn press(&self, key: &str) {
        self.run(&["send-keys", "-t", "0", key]);
    }

    /// The process id of the pane's shell.
    pub fn pane_pid(&self) -> u32 {
        let pid = self.run(&["display-message", "-p", "-t", "0", "#{pane_pid}"]);
        pid.trim().parse().expect("a pid")
    }

    /// The screen's text now, a line per row.
    pub fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "0"])
    }

    /// Reads the screen until `check` holds, for at most `timeout`; the last screen read,
    /// or a panic naming `what` with that screen.
    pub fn wait_for(&self, what: &str, timeout: Duration, check: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let seen = eventually(timeout, || {
            last = self.screen();
            check(&last)
        });
        assert!(
            seen,
            "the screen never showed {what} in {timeout:?}:\n{last}"
        );
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        // Killing the server ends the session and whatever still runs in it; the socket
        // goes with the directory. It fails only when the server is gone already.
        let _status = Command::new("tmux")
            .args(["-S", &self.socket, "kill-server"])
            .output();
    }
}
