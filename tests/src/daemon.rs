//! A `portgate daemon` for tests and benchmarks: a child process in its own network
//! namespace, attached to its own test cgroup, pinning under its own bpffs directory, with
//! its state, socket and audit log in its own temporary directory. Tests talk to it through
//! the typed client ([`Daemon::api`]) or, on purpose, through the CLI ([`Daemon::cli`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::{fs::PermissionsExt as _, net::UnixStream, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Mutex, MutexGuard, OnceLock, PoisonError},
    thread,
    time::{Duration, Instant},
};

use portgate::{api::AllocationView, client::Client, gate::Gate, model::PortId};
use serde::de::DeserializeOwned;

use crate::common::{NetNs, PinDir, TestCgroup, eventually};

/// The `portgate` binary under test.
pub fn portgate_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTGATE_BIN") {
        return PathBuf::from(path);
    }
    // A binary in target/<profile>/ has it beside; a test in target/<profile>/deps/ one up.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().expect("target directory");
    let bin = [dir.join("portgate"), dir.join("../portgate")]
        .into_iter()
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| dir.join("../portgate"));
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p portgate` (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// The daemon's state directory, in its temporary directory.
const STATE_SUBDIR: &str = "state";

/// What a CLI run printed to stderr.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A running `portgate daemon` and everything it was given. Dropping it stops the daemon
/// (SIGTERM, then SIGKILL) and uninstalls its pins; the cgroup, namespace and directory
/// go with their own guards.
pub struct Daemon {
    /// The process while it runs; behind a lock so that a test can `kill -9` it while
    /// its clients, on other threads, hold the fixture.
    child: Mutex<Option<Child>>,
    /// Its configuration file.
    pub config: PathBuf,
    /// The API socket.
    pub socket: PathBuf,
    /// The audit log.
    pub audit_log: PathBuf,
    // Dropped in this order, after the daemon is stopped.
    /// The bpffs directory its gate pins under.
    pub pins: PinDir,
    /// The cgroup its programs are attached to.
    pub cgroup: TestCgroup,
    /// The network namespace it runs in.
    pub ns: NetNs,
    /// Its state directory, socket, log and audit log.
    pub dir: tempfile::TempDir,
    /// A copy of the binary that other users can run (see [`Daemon::cli_as`]).
    shared_bin: OnceLock<PathBuf>,
    /// The typed API client, on [`Daemon::socket`].
    client: Client,
    /// Where [`Daemon::api`] runs the client's calls, made on first use.
    runtime: OnceLock<tokio::runtime::Runtime>,
    /// Environment variables the daemon is started with (see [`Daemon::set_env`]).
    env: Vec<(String, String)>,
}

impl Daemon {
    /// The daemon's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child_lock().as_ref().map(Child::id)
    }

    fn child_lock(&self) -> MutexGuard<'_, Option<Child>> {
        // A thread that panicked holding the lock left the child as it was.
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a daemon managing `min..=max` with a 3 s quarantine and a 5 s drain timeout.
    pub fn start(min: u16, max: u16) -> Self {
        Self::start_with(min, max, "portgate-test-no-such-group")
    }

    /// [`Daemon::start`] with `admin_group` as the admin group.
    pub fn start_with(min: u16, max: u16, admin_group: &str) -> Self {
        Self::launch(min, max, admin_group, "")
    }

    /// [`Daemon::start`] with `lines` (`key = value`, one a line) in the `[ports]` section
    /// of its configuration, in place of the defaults above for the keys they name.
    pub fn start_with_ports(min: u16, max: u16, lines: &str) -> Self {
        Self::launch(min, max, "portgate-test-no-such-group", lines)
    }

    fn launch(min: u16, max: u16, admin_group: &str, lines: &str) -> Self {
        let mut ports = vec![
            format!("min_port = {min}"),
            format!("max_port = {max}"),
            "timeout = \"5s\"".to_owned(),
            "quarantine = \"3s\"".to_owned(),
        ];
        for line in lines.lines().filter(|line| !line.trim().is_empty()) {
            let key = line.split('=').next().unwrap_or_default().trim();
            ports.retain(|default| !default.starts_with(&format!("{key} =")));
            ports.push(line.trim().to_owned());
        }
        let ports = ports.join("\n");
        let dir = tempfile::Builder::new()
            .prefix("portgate-daemon-test-")
            .tempdir()
            .expect("temporary directory");
        // Other users' CLI must reach the socket inside.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let pins = PinDir::new();
        let cgroup = TestCgroup::new();
        let ns = NetNs::new();
        let socket = dir.path().join("portgate.sock");
        let audit_log = dir.path().join("audit.log");
        let config = dir.path().join("portgate.toml");
        fs::write(
            &config,
            format!(
                r#"[ports]
{ports}

[daemon]
state_dir = "{state}"
pin_dir = "{pins}"
cgroup = "{cgroup}"
socket = "{socket}"
socket_mode = "0666"
admin_group = "{admin_group}"
metrics_listen = "127.0.0.1:9477"
audit_log = "{audit}"
kernel_log = false

[auth]
listen = ""
window = "30s"
"#,
                state = dir.path().join(STATE_SUBDIR).display(),
                pins = pins.path().display(),
                cgroup = cgroup.path().display(),
                socket = socket.display(),
                audit = audit_log.display(),
            ),
        )
        .expect("write the config");
        let mut daemon = Self {
            child: Mutex::new(None),
            client: Client::new(&socket),
            runtime: OnceLock::new(),
            env: Vec::new(),
            config,
            socket,
            audit_log,
            pins,
            cgroup,
            ns,
            dir,
            shared_bin: OnceLock::new(),
        };
        daemon.spawn();
        daemon
    }

    /// Rewrites one line of the configuration (`key = ...` at the start of a line).
    pub fn set_config(&self, key: &str, value: &str) {
        let text = fs::read_to_string(&self.config).expect("read the config");
        let changed: Vec<String> = text
            .lines()
            .map(|line| {
                if line.starts_with(&format!("{key} =")) {
                    format!("{key} = {value}")
                } else {
                    line.to_owned()
                }
            })
            .collect();
        fs::write(&self.config, changed.join("\n") + "\n").expect("write the config");
    }

    /// Starts the daemon from now on with `key=value` in its environment (e.g. `LD_PRELOAD`).
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Appends `text` (a section of its own, e.g. `[cluster]`) to the configuration.
    pub fn append_config(&self, text: &str) {
        let mut config = fs::read_to_string(&self.config).expect("read the config");
        config.push('\n');
        config.push_str(text);
        fs::write(&self.config, config).expect("write the config");
    }

    /// Starts the daemon and expects it to fail; returns what it printed.
    pub fn spawn_failing(&mut self) -> String {
        let output = self.daemon_command().output().expect("run the daemon");
        assert!(!output.status.success(), "the daemon started");
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// `portgate daemon --config ...` inside the test namespace.
    pub fn daemon_command(&self) -> Command {
        self.daemon_command_with(&self.config)
    }

    /// `portgate daemon --config <config>` inside the test namespace.
    pub fn daemon_command_with(&self, config: &Path) -> Command {
        let mut command = self.command_in_ns("daemon", config);
        command.env("RUST_LOG", "info");
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        command
    }

    /// `portgate uninstall` of this daemon's configuration, inside the test namespace;
    /// expects success.
    pub fn uninstall(&self) {
        let output = self
            .command_in_ns("uninstall", &self.config)
            .output()
            .expect("run portgate uninstall");
        assert!(
            output.status.success(),
            "portgate uninstall failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `portgate <verb> --config <config>` inside the test namespace.
    fn command_in_ns(&self, verb: &str, config: &Path) -> Command {
        // Into the namespace with setns(2) rather than `ip netns exec`, which would also
        // remount /sys and hide the cgroup2 and bpffs mounts from the daemon.
        let netns = fs::File::open(Path::new("/run/netns").join(self.ns.name()))
            .expect("open the test namespace");
        let mut command = Command::new(portgate_bin());
        command.args([verb, "--config"]).arg(config);
        // SAFETY: between fork and exec the child only calls setns(2), which is
        // async-signal-safe, on a descriptor opened before the fork.
        unsafe {
            command.pre_exec(move || {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from)
            });
        }
        command
    }

    /// Starts the daemon process (again) and waits until its socket answers.
    pub fn spawn(&mut self) {
        if let Err(printed) = self.try_spawn() {
            panic!("the daemon exited at start:\n{printed}");
        }
    }

    /// Starts the daemon process (again) and waits until its socket answers; when it exits
    /// at start instead, returns what it printed.
    pub fn try_spawn(&mut self) -> Result<(), String> {
        assert!(self.pid().is_none(), "the daemon is running already");
        let log = fs::File::create(self.dir.path().join("daemon.log")).expect("daemon log");
        let spawned = self
            .daemon_command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the daemon");
        *self.child_lock() = Some(spawned);
        let mut exited = false;
        let up = eventually(Duration::from_secs(20), || {
            let mut child = self.child_lock();
            if child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                *child = None;
                exited = true;
                return true;
            }
            UnixStream::connect(&self.socket).is_ok()
        });
        if exited {
            return Err(self.log());
        }
        assert!(up, "the daemon did not come up in 20 s:\n{}", self.log());
        Ok(())
    }

    /// Waits up to `timeout` for the daemon to exit by itself; its exit status, or `None`
    /// when it still runs.
    pub fn wait_exit(&self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        eventually(timeout, || {
            let mut child = self.child_lock();
            status = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if status.is_some() {
                *child = None;
            }
            status.is_some()
        });
        status
    }

    /// Its state directory (`daemon.state_dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join(STATE_SUBDIR)
    }

    /// What the daemon wrote to stderr.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// SIGKILL: no chance to flush or clean up.
    pub fn kill9(&self) {
        let mut child = self.child_lock().take().expect("a running daemon");
        child.kill().expect("SIGKILL the daemon");
        child.wait().expect("reap the daemon");
    }

    /// SIGTERM, bounded wait; SIGKILL if it does not stop. Returns whether it stopped on
    /// SIGTERM with success.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child_lock().take() else {
            return true;
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _sent = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _killed = child.kill();
        let _reaped = child.wait();
        false
    }

    /// Runs the CLI against this daemon, as root or as `uid` (with gid `uid`).
    pub fn cli(&self, uid: Option<u32>, args: &[&str]) -> Output {
        self.cli_as(uid.map(|uid| (uid, uid)), args)
    }

    /// Runs the CLI against this daemon, as root or as (uid, gid).
    ///
    /// Another user runs a copy of the binary in the daemon's directory: the build's own may
    /// sit under a directory only root can enter (a checkout in /root, or in `mktemp -d`).
    pub fn cli_as(&self, ids: Option<(u32, u32)>, args: &[&str]) -> Output {
        let mut command = match ids {
            Some((uid, gid)) => {
                let mut command = Command::new(self.shared_bin());
                command.uid(uid).gid(gid);
                command
            }
            None => Command::new(portgate_bin()),
        };
        command.arg("--socket").arg(&self.socket).args(args);
        command.output().expect("run the portgate CLI")
    }

    /// The copy of the binary that other users run, made on first use; it goes with the
    /// daemon's directory.
    pub fn shared_bin(&self) -> &Path {
        self.shared_bin.get_or_init(|| {
            let copy = self.dir.path().join("portgate");
            fs::copy(portgate_bin(), &copy).expect("copy the portgate binary");
            fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
                .expect("make the copy executable for everyone");
            copy
        })
    }

    /// Runs the CLI and expects success; returns stdout.
    pub fn cli_ok(&self, uid: Option<u32>, args: &[&str]) -> String {
        let output = self.cli(uid, args);
        assert!(
            output.status.success(),
            "portgate {args:?} as {uid:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout),
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs the CLI with `-o json` and reads what it prints as a `T`.
    pub fn cli_json<T: DeserializeOwned>(&self, uid: Option<u32>, args: &[&str]) -> T {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let printed = self.cli_ok(uid, &all);
        serde_json::from_str(&printed)
            .unwrap_or_else(|err| panic!("portgate {args:?} printed {printed:?}: {err}"))
    }

    /// Runs one call of the typed API client against this daemon and waits for its
    /// answer, so that synchronous tests, on any of their threads, talk to the daemon as
    /// the CLI does: `daemon.api(|client| client.list())`.
    pub fn api<'a, F: Future>(&'a self, call: impl FnOnce(&'a Client) -> F) -> F::Output {
        let runtime = self.runtime.get_or_init(|| {
            // Threaded, so that test threads calling at once each drive their own call
            // while the workers run the connections' I/O.
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a tokio runtime for the API client")
        });
        runtime.block_on(call(&self.client))
    }

    /// The pinned kernel policies: (port, protocol) keys.
    pub fn kernel_policies(&self) -> BTreeSet<PortId> {
        Gate::open(self.pins.path())
            .expect("open the pinned gate")
            .policies()
            .expect("read the policies")
            .into_keys()
            .collect()
    }

    /// The audit log, a record per line.
    pub fn audit(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(&self.audit_log)
            .expect("read the audit log")
            .lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }

    /// Checks what must hold whatever came before (a `kill -9`, a store fault): the
    /// kernel's policies are those of the allocations the daemon holds (which it read from
    /// its store at start), and each protocol's managed ports are counted once, as
    /// allocated in one status or as free. Returns the allocations.
    pub fn assert_consistent(&self) -> BTreeMap<PortId, AllocationView> {
        let allocations = self.allocations();
        let held: BTreeSet<PortId> = allocations.keys().copied().collect();
        assert_eq!(
            self.kernel_policies(),
            held,
            "the kernel's policies are not the store's allocations"
        );
        let status = self.api(Client::status).expect("status");
        let managed = u64::from(status.max_port - status.min_port) + 1
            - u64::try_from(status.reserved_ports.len()).expect("a count");
        for usage in &status.usage {
            let of_protocol = allocations
                .values()
                .filter(|view| view.id.protocol == usage.proto)
                .count();
            assert_eq!(
                usage.active + usage.draining + usage.closed,
                u64::try_from(of_protocol).expect("a count"),
                "status counts other allocations than the list: {usage:?}"
            );
            assert_eq!(
                usage.active + usage.draining + usage.closed + usage.free,
                managed,
                "a port is both allocated and free, or neither: {usage:?}"
            );
        }
        allocations
    }

    /// Every allocation, by port (`GET /v1/ports`).
    pub fn allocations(&self) -> BTreeMap<PortId, AllocationView> {
        self.api(Client::list)
            .expect("list the allocations")
            .into_iter()
            .map(|view| (view.id, view))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stop() {
            eprintln!(
                "clean-up: the daemon did not stop on SIGTERM:\n{}",
                self.log()
            );
        }
    }
}
