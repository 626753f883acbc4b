//! What the kernel tests share: the privilege gate, and RAII guards for the cgroups,
//! network namespaces, veth pairs and bpffs pin directories each test makes. Every guard
//! has a unique name and removes what it made on drop, also when the test panics. Nothing
//! here touches the machine's root cgroup or an interface a test did not create.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use portgate::{
    host,
    model::{Allowlist, PortAccessControl, PortPolicy},
};

pub mod container;
pub mod gate;
pub mod packet;
pub mod podman;
pub mod recording;
pub mod tmpfs;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name no other test (in this or another process) uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether the kernel part can run. Without it: with `CI` set the test fails, saying what
/// is missing; otherwise it prints `SKIPPED: <test>: <why>` and the test returns. Tests call
/// it through [`crate::require_privileges!`], which names them.
pub fn require_privileges(test: &str) -> bool {
    if let Some(why) = missing_privileges() {
        cannot_run(test, &format!("the kernel test cannot run: {why}"));
        return false;
    }
    true
}

/// Says that `test` cannot run, and `why`: with `CI` set the test fails; otherwise it prints
/// `SKIPPED: <test>: <why>` (and the caller returns).
pub fn cannot_run(test: &str, why: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {why} (CI is set, so this fails)"
    );
    // Straight to the process's stdout: libtest captures `println!` of passing tests,
    // and a skip must be seen (cargo xtask test counts these lines).
    let _ignored = writeln!(io::stdout().lock(), "SKIPPED: {test}: {why}");
}

/// Pins the calling thread to CPU 0, so that consecutive `BPF_PROG_TEST_RUN` calls see the
/// same per-CPU state.
pub fn pin_to_cpu0() {
    pin_to_cpu(0);
}

/// Pins the calling thread to CPU `cpu`.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).expect("a CPU number");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).expect("sched_setaffinity");
}

fn missing_privileges() -> Option<String> {
    let missing = host::kernel::missing_capabilities();
    if !missing.is_empty() {
        return Some(format!("{} missing: run as root", missing.join(", ")));
    }
    if !Path::new(portgate::paths::KERNEL_BTF).exists() {
        return Some(format!("no kernel BTF at {}", portgate::paths::KERNEL_BTF));
    }
    if host::cgroups::root().is_err() {
        return Some("no cgroup2 mount".to_owned());
    }
    if let Err(err) = host::kernel::check_version() {
        return Some(err.to_string());
    }
    if which("ip").is_none() {
        return Some("iproute2's `ip` is not installed (run `cargo xtask setup`)".to_owned());
    }
    None
}

/// Where `program` is on `PATH`, if it is.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.exists())
    })
}

/// Runs a command, panicking with its output when it fails.
pub fn run(program: &str, args: &[&str]) {
    output(program, args);
}

/// Runs a command and returns its standard output, panicking with its errors when it fails.
pub fn output(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("running {program} {args:?}: {err}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs a command during clean-up: failures are reported, never raised.
fn run_quietly(program: &str, args: &[&str]) {
    match Command::new(program).args(args).output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => eprintln!(
            "clean-up: {program} {args:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(err) => eprintln!("clean-up: {program} {args:?}: {err}"),
    }
}

/// A bpffs directory for one test's pins; on drop, whatever is still pinned there is
/// unpinned (detaching its programs) and the directory removed.
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A new, empty, uniquely named directory under the bpffs mount.
    pub fn new() -> Self {
        let path = PathBuf::from(portgate::paths::BPFFS_MOUNT).join(unique("portgate-test-"));
        host::mounts::prepare_pin_dir(&path).expect("create the pin directory on bpffs");
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(err) = portgate::gate::uninstall(&self.path) {
            eprintln!("clean-up: uninstalling {}: {err}", self.path.display());
        }
    }
}

/// A cgroup made for a test, under the cgroup2 mount (or under another test cgroup).
pub struct TestCgroup {
    path: PathBuf,
}

impl TestCgroup {
    /// A new cgroup directly below the cgroup2 root.
    pub fn new() -> Self {
        let root = host::cgroups::root().expect("cgroup2 mount");
        Self::create(root.join(unique("portgate-test-")))
    }

    /// A new cgroup below this one.
    pub fn child(&self, name: &str) -> Self {
        Self::create(self.path.join(name))
    }

    fn create(path: PathBuf) -> Self {
        fs::create_dir(&path).unwrap_or_else(|err| panic!("creating {}: {err}", path.display()));
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id (the directory's inode number).
    pub fn id(&self) -> u64 {
        fs::metadata(&self.path).expect("cgroup directory").ino()
    }

    /// The depth below the cgroup2 root.
    pub fn level(&self) -> u32 {
        host::cgroups::id_and_level(&self.path)
            .expect("cgroup level")
            .1
    }

    /// Moves this whole process into the cgroup until the returned guard drops. Sockets
    /// created meanwhile belong to this cgroup for good; `bind()` is judged by the cgroup
    /// of the process at the time of the call.
    pub fn enter(&self) -> Entered {
        let previous = host::cgroups::of_pid(std::process::id()).expect("own cgroup");
        move_self(&self.path);
        Entered { previous }
    }
}

fn move_self(cgroup: &Path) {
    fs::write(cgroup.join("cgroup.procs"), "0")
        .unwrap_or_else(|err| panic!("moving into {}: {err}", cgroup.display()));
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Anything still inside goes to the parent first: a cgroup with members cannot go.
        let parent = self.path.parent().map(Path::to_owned);
        if let (Some(parent), Ok(procs)) =
            (parent, fs::read_to_string(self.path.join("cgroup.procs")))
        {
            for pid in procs.lines() {
                let _ignored = fs::write(parent.join("cgroup.procs"), pid);
            }
        }
        if let Err(err) = fs::remove_dir(&self.path) {
            eprintln!("clean-up: removing cgroup {}: {err}", self.path.display());
        }
    }
}

/// While alive, this process is in a test cgroup; on drop it returns where it was.
pub struct Entered {
    previous: PathBuf,
}

impl Drop for Entered {
    fn drop(&mut self) {
        if let Err(err) = fs::write(self.previous.join("cgroup.procs"), "0") {
            eprintln!("clean-up: returning to {}: {err}", self.previous.display());
        }
    }
}

/// A network namespace made for a test, with `lo` up.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A new, uniquely named namespace.
    pub fn new() -> Self {
        let name = unique("pgt");
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Its name (under /run/netns).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Runs `f` on a thread inside the namespace: sockets it opens live there, and so do
    /// threads it spawns.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    let file = fs::File::open(&path).expect("open the namespace");
                    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("setns into the test namespace");
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl NetNs {
    /// Runs `program args...` inside the namespace (`ip netns exec`) and returns its output.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.name.as_str(), program];
        all.extend_from_slice(args);
        output("ip", &all)
    }

    /// Runs `nft args...` inside the namespace: its tables go with it.
    pub fn nft(&self, args: &[&str]) -> String {
        self.exec("nft", args)
    }

    /// How many TCP sockets in the namespace are established on local port `port` (the
    /// server's side of its connections), as `ss` lists them.
    pub fn established_on(&self, port: u16) -> usize {
        let filter = format!("( sport = :{port} )");
        self.exec("ss", &["-Htn", "state", "established", &filter])
            .lines()
            .filter(|line| !line.trim().is_empty())
            .count()
    }

    /// A sysctl of the namespace (`/proc/sys/...`), read whole in one `read(2)`: some
    /// handlers answer a read that does not start at offset 0 with EOF.
    pub fn sysctl(&self, path: &str) -> String {
        self.run_elsewhere(|| {
            let mut file =
                fs::File::open(path).unwrap_or_else(|err| panic!("opening {path}: {err}"));
            let mut buffer = vec![0; 1 << 20];
            let len = file
                .read(&mut buffer)
                .unwrap_or_else(|err| panic!("reading {path}: {err}"));
            assert!(len < buffer.len(), "{path} is longer than the test reads");
            buffer.truncate(len);
            String::from_utf8(buffer).expect("a UTF-8 sysctl")
        })
    }

    /// Writes a sysctl of the namespace.
    pub fn set_sysctl(&self, path: &str, value: &str) {
        self.run_elsewhere(|| {
            fs::write(path, value)
                .unwrap_or_else(|err| panic!("writing {value:?} to {path}: {err}"));
        });
    }

    /// [`NetNs::run`], after making sure that the thread really is in another network
    /// namespace than the test's own: a sysctl written there would otherwise be the host's.
    pub fn run_elsewhere<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let host_netns =
            host::kernel::current_netns_inode().expect("this thread's network namespace");
        self.run(|| {
            let here = host::kernel::current_netns_inode().expect("the test namespace");
            assert_ne!(
                here, host_netns,
                "setns left the thread in the host's network namespace: refusing to go on"
            );
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its interfaces, veth peers included.
        run_quietly("ip", &["netns", "delete", &self.name]);
    }
}

/// A veth pair from namespace `a` (`198.18.<n>.1`, `fd00:7067:<n>::1`) to namespace `b`
/// (`198.18.<n>.2`, `fd00:7067:<n>::2`): test-only addresses, only inside the namespaces.
pub struct Veth {
    /// Interface name in `a`.
    pub a_name: String,
    /// Interface name in `b`.
    pub b_name: String,
    /// Subnet number `n`.
    pub subnet: u8,
}

impl Veth {
    /// Creates the pair inside `a`, moves one end to `b`, addresses and raises both.
    pub fn new(a: &NetNs, b: &NetNs) -> Self {
        let a_name = unique("pgva");
        let b_name = unique("pgvb");
        let subnet = u8::try_from(COUNTER.fetch_add(1, Ordering::Relaxed) % 250).unwrap_or(0) + 1;
        a.ip(&[
            "link", "add", &a_name, "type", "veth", "peer", "name", &b_name,
        ]);
        a.ip(&["link", "set", &b_name, "netns", b.name()]);
        for (ns, name, host) in [(a, &a_name, 1), (b, &b_name, 2)] {
            ns.ip(&[
                "addr",
                "add",
                &format!("198.18.{subnet}.{host}/24"),
                "dev",
                name,
            ]);
            ns.ip(&[
                "addr",
                "add",
                &format!("fd00:7067:{subnet}::{host}/64"),
                "dev",
                name,
                "nodad",
            ]);
            ns.ip(&["link", "set", name, "up"]);
        }
        Self {
            a_name,
            b_name,
            subnet,
        }
    }

    /// The IPv4 address of end `host` (1 in `a`, 2 in `b`; others are extra addresses
    /// added with [`Veth::add_to_b`]).
    pub fn v4(&self, host: u8) -> std::net::IpAddr {
        std::net::Ipv4Addr::new(198, 18, self.subnet, host).into()
    }

    /// The IPv6 address of end `host`.
    pub fn v6(&self, host: u8) -> std::net::IpAddr {
        std::net::Ipv6Addr::new(
            0xfd00,
            0x7067,
            u16::from(self.subnet),
            0,
            0,
            0,
            0,
            u16::from(host),
        )
        .into()
    }

    /// Adds `198.18.<n>.<host>` and `fd00:7067:<n>::<host>` to `b`'s end.
    pub fn add_to_b(&self, b: &NetNs, host: u8) {
        let v4 = format!("198.18.{}.{host}/24", self.subnet);
        let v6 = format!("fd00:7067:{}::{host}/64", self.subnet);
        b.ip(&["addr", "add", &v4, "dev", &self.b_name]);
        b.ip(&["addr", "add", &v6, "dev", &self.b_name, "nodad"]);
    }
}

/// The loopback source the tests allow.
pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// A second loopback source, outside the allowlists (until a test adds it).
pub const OTHER_LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Long enough for an allowed connect to get in after a few SYN retransmissions.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(10);
/// How long a connect that should be refused is given: the gate drops its SYN, so it
/// would wait for retransmissions; giving up sooner proves nothing was answered.
pub const REFUSED_WITHIN: Duration = Duration::from_millis(700);

/// `127.0.0.1:port`.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(LOCAL, port)
}

/// A listener made inside `cgroup`, so that `cgroup_skb` and `sock_ops` see its
/// connections (a socket belongs to the cgroup of the process that made it).
pub fn listen_in(cgroup: &TestCgroup, addr: SocketAddr) -> TcpListener {
    let _inside = cgroup.enter();
    TcpListener::bind(addr).unwrap_or_else(|err| panic!("bind {addr}: {err}"))
}

/// An allowlist of `prefixes` (`"127.0.0.1/32"`, ...).
pub fn allowlist(prefixes: &[&str]) -> Allowlist {
    prefixes
        .iter()
        .map(|prefix| prefix.parse().expect("prefix"))
        .collect()
}

/// An Active port's policy that allows only `prefixes`.
pub fn allowing(prefixes: &[&str]) -> PortPolicy {
    PortAccessControl {
        allowed_ips: allowlist(prefixes),
        ..PortAccessControl::default()
    }
    .into()
}

/// A TCP server that accepts in the background and echoes what it reads on each
/// connection, closing it when the peer closes (or after a minute idle).
pub struct EchoServer {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<()>>,
}

impl EchoServer {
    /// Serves on `listener` (made by the caller, in the namespace and cgroup it wants).
    pub fn serve(listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("listener address");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_mins(2);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream
                            .set_read_timeout(Some(Duration::from_mins(1)))
                            .expect("read timeout");
                        thread::spawn(move || echo_loop(stream));
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(2));
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            addr,
            stop,
            handle: Some(handle),
        }
    }
}

fn echo_loop(mut stream: TcpStream) {
    let mut buffer = [0u8; 1024];
    for _ in 0..10_000 {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ignored = handle.join();
        }
    }
}

/// Connects to `to` from `from` (port chosen by the kernel) within `timeout`.
pub fn connect_from(
    from: std::net::IpAddr,
    to: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.bind(&SocketAddr::new(from, 0).into())?;
    socket.connect_timeout(&to.into(), timeout)?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(stream)
}

/// Writes `message` and reads the echo back.
pub fn echo(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0; message.len()];
    stream.read_exact(&mut back)?;
    if back == message {
        Ok(())
    } else {
        Err(io::Error::other("the echo differs"))
    }
}

/// Closes with RST instead of FIN (`SO_LINGER` of zero).
pub fn reset(stream: TcpStream) {
    let socket = socket2::Socket::from(stream);
    socket
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
    drop(socket);
}

/// Waits (bounded) until `check` holds, returning whether it did.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
