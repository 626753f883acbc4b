//! Real containers, for the opt-in test that checks what [`super::container`] imitates:
//! podman (with runc and netavark) running a static busybox `httpd` from a local image, a
//! port published on the host, the container's cgroup2 directory and its network
//! namespace. The test runs only with `PORTGATE_TEST_PODMAN=1`: it needs `podman`, `runc`
//! and `busybox-static`, and it changes the machine. The image and every container are
//! removed on drop, but netavark leaves what it set up for its default network: the
//! iptables-nft tables `ip nat` and `ip filter` (their netavark chains emptied), the empty
//! `libpod_parent` cgroups (with `libpod_parent/conmon` in the v1 hierarchies of a hybrid
//! host), and `net.ipv4.ip_forward` set to 1.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use portgate::host;

use super::{output, unique};

/// The variable that turns the podman test on.
pub const OPT_IN: &str = "PORTGATE_TEST_PODMAN";
/// A statically linked busybox, from Debian's `busybox-static` (the image holds only it).
pub const BUSYBOX: &str = "/bin/busybox";
/// The page the image's `httpd` serves at `/`.
pub const INDEX_HTML: &str = "portgate podman test\n";
/// The port `httpd` listens on inside the container.
pub const CONTAINER_PORT: u16 = 80;
/// The cgroup parent podman puts containers under with the cgroupfs manager, below the
/// cgroup2 mount: a container's cgroup is `<mount>/libpod_parent/libpod-<id>`.
pub const CGROUP_PARENT: &str = "libpod_parent";

/// Whether the podman test was asked for: otherwise it prints
/// `SKIPPED: <test>: set PORTGATE_TEST_PODMAN=1 ...` and returns (also under CI: it is
/// opt-in). Asked for without podman, runc or busybox-static, it panics saying what to
/// install.
pub fn require_podman(test: &str) -> bool {
    if std::env::var(OPT_IN).as_deref() != Ok("1") {
        // Straight to stdout, uncaptured, like `require_privileges`.
        let _ignored = writeln!(
            io::stdout().lock(),
            "SKIPPED: {test}: set {OPT_IN}=1 to run it (needs podman, runc and busybox-static)"
        );
        return false;
    }
    for (program, package) in [("podman", "podman"), ("runc", "runc")] {
        assert!(
            Command::new(program).arg("--version").output().is_ok(),
            "{test}: {OPT_IN}=1 but `{program}` is not installed (apt-get install {package})"
        );
    }
    assert!(
        Path::new(BUSYBOX).exists(),
        "{test}: {OPT_IN}=1 but {BUSYBOX} is missing (apt-get install busybox-static)"
    );
    true
}

/// Whether the calling podman test can run: [`require_podman`] under the test's own name
/// (as [`crate::require_privileges!`] finds it), then the kernel test's privileges. One
/// `SKIPPED` line at most. A podman test starts with `if !require_podman!() { return; }`.
#[macro_export]
macro_rules! require_podman {
    () => {
        $crate::common::podman::require_podman($crate::test_name!())
            && $crate::require_privileges!()
    };
}

/// Runs `podman args...`, returning its trimmed standard output; panics on failure.
pub fn podman(args: &[&str]) -> String {
    output("podman", args).trim().to_owned()
}

/// A local image made by `podman import` of a tar that holds [`BUSYBOX`] as `/bin/busybox`
/// and [`INDEX_HTML`] as `/www/index.html`, with `httpd` as its command. Removed on drop.
pub struct PodmanImage {
    name: String,
}

impl PodmanImage {
    /// Builds the image under a unique `localhost/` name.
    pub fn build() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().join("root");
        fs::create_dir_all(root.join("bin")).expect("create bin/");
        fs::create_dir_all(root.join("www")).expect("create www/");
        fs::copy(BUSYBOX, root.join("bin/busybox"))
            .unwrap_or_else(|err| panic!("copying {BUSYBOX}: {err}"));
        fs::write(root.join("www/index.html"), INDEX_HTML).expect("write index.html");
        let tar = dir.path().join("image.tar");
        let tar_arg = tar.to_str().expect("a UTF-8 temporary path");
        let root_arg = root.to_str().expect("a UTF-8 temporary path");
        output("tar", &["-C", root_arg, "-cf", tar_arg, "."]);

        let name = format!("localhost/{}:latest", unique("portgate-test-"));
        let command = format!(
            r#"CMD ["/bin/busybox", "httpd", "-f", "-p", "{CONTAINER_PORT}", "-h", "/www"]"#
        );
        podman(&["import", "--quiet", "--change", &command, tar_arg, &name]);
        Self { name }
    }

    /// Its name (`localhost/portgate-test-...:latest`).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for PodmanImage {
    fn drop(&mut self) {
        quietly(&["rmi", "--force", &self.name]);
    }
}

/// A container of a [`PodmanImage`], run detached by runc with its [`CONTAINER_PORT`]
/// published on the host's `host_port`; `podman rm --force` on drop.
pub struct PodmanContainer<'i> {
    id: String,
    _image: &'i PodmanImage,
    /// The cgroup parent it was run under, whose v1 directories go with it.
    cgroup_parent: Option<PathBuf>,
}

impl<'i> PodmanContainer<'i> {
    /// `podman --runtime runc run -d -p host_port:80 IMAGE`. The `--ulimit`s are needed on
    /// hosts like the test machine: podman's defaults for root (1048576 open files, 32768
    /// processes) make runc fail with "error setting rlimit type 7 (then 6): operation not
    /// permitted".
    pub fn run(image: &'i PodmanImage, host_port: u16) -> Self {
        Self::run_under(image, host_port, None)
    }

    /// [`PodmanContainer::run`] with the container's cgroup made below `cgroup_parent` (a
    /// cgroup2 directory, as a test's cgroup with the gate's programs attached) instead of
    /// [`CGROUP_PARENT`]. Podman also makes the parent in each cgroup v1 hierarchy of a
    /// hybrid host: they are removed with the container.
    pub fn run_under(image: &'i PodmanImage, host_port: u16, cgroup_parent: Option<&Path>) -> Self {
        let name = unique("portgate-test-");
        let publish = format!("{host_port}:{CONTAINER_PORT}");
        let mut command = Command::new("podman");
        command.args(["--runtime", "runc", "run", "--detach", "--name", &name]);
        if let Some(parent) = cgroup_parent {
            let root = host::cgroups::root().expect("cgroup2 mount");
            let relative = parent
                .strip_prefix(&root)
                .unwrap_or_else(|_| panic!("{} is not below {}", parent.display(), root.display()));
            command.arg(format!("--cgroup-parent=/{}", relative.display()));
        }
        let run = command
            .args([
                "--ulimit",
                "nofile=10000:10000",
                "--ulimit",
                "nproc=1000:1000",
            ])
            .args(["--publish", &publish, image.name()])
            .output()
            .unwrap_or_else(|err| panic!("running podman: {err}"));
        if !run.status.success() {
            // It may exist although it did not start.
            quietly(&["rm", "--force", "--time", "0", &name]);
            panic!(
                "podman run {name} failed: {}",
                String::from_utf8_lossy(&run.stderr).trim()
            );
        }
        let id = String::from_utf8_lossy(&run.stdout).trim().to_owned();
        let container = Self {
            id,
            _image: image,
            cgroup_parent: cgroup_parent.map(Path::to_owned),
        };
        assert!(
            container.id.len() == 64 && container.id.bytes().all(|b| b.is_ascii_hexdigit()),
            "podman run printed {:?}, not a container id",
            container.id
        );
        container
    }

    /// The full container id (64 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The pid of the container's first process, as podman reports it.
    pub fn pid(&self) -> u32 {
        let pid = podman(&["inspect", "--format", "{{.State.Pid}}", &self.id]);
        pid.parse()
            .unwrap_or_else(|_| panic!("podman inspect gave the pid {pid:?}"))
    }

    /// The container's cgroup2 directory, as its first process's `/proc/PID/cgroup` says.
    pub fn cgroup(&self) -> PathBuf {
        host::cgroups::of_pid(self.pid()).expect("the container's cgroup")
    }

    /// Where podman's cgroupfs manager is expected to put the container:
    /// `<cgroup2 mount>/libpod_parent/libpod-<id>`.
    pub fn expected_cgroup(&self) -> PathBuf {
        host::cgroups::root()
            .expect("cgroup2 mount")
            .join(CGROUP_PARENT)
            .join(format!("libpod-{}", self.id))
    }
}

impl Drop for PodmanContainer<'_> {
    fn drop(&mut self) {
        // `--time 0`: httpd runs as pid 1, which SIGTERM does not stop, and podman would
        // wait ten seconds before it kills.
        quietly(&["rm", "--force", "--time", "0", &self.id]);
        if let Some(parent) = &self.cgroup_parent {
            remove_v1_parents(parent);
        }
    }
}

/// Removes the (empty) directories podman made for `cgroup_parent` (a cgroup2 directory)
/// in the cgroup v1 hierarchies of a hybrid host, deepest first; reports what it cannot.
pub fn remove_v1_parents(cgroup_parent: &Path) {
    let Ok(root) = host::cgroups::root() else {
        return;
    };
    let Ok(relative) = cgroup_parent.strip_prefix(&root) else {
        return;
    };
    let Some(mounts) = root.parent() else {
        return;
    };
    let Ok(hierarchies) = fs::read_dir(mounts) else {
        return;
    };
    for hierarchy in hierarchies.flatten() {
        let dir = hierarchy.path().join(relative);
        if hierarchy.path() == root || !dir.is_dir() {
            continue;
        }
        let mut below: Vec<PathBuf> = walk_dirs(&dir);
        below.sort_by_key(|path| std::cmp::Reverse(path.components().count()));
        for path in below.into_iter().chain([dir.clone()]) {
            if let Err(err) = fs::remove_dir(&path) {
                eprintln!("clean-up: removing {}: {err}", path.display());
            }
        }
    }
}

/// Every directory below `dir`.
fn walk_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            found.extend(walk_dirs(&path));
            found.push(path);
        }
    }
    found
}

/// `GET /` over HTTP/1.0 from `to`, the whole answer; an error when the connection is not
/// made within 2 s (the gate dropped its SYN) or not answered within 5 s.
pub fn http_get(to: std::net::SocketAddr) -> io::Result<String> {
    use std::io::Read as _;
    let mut stream = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    stream.write_all(format!("GET / HTTP/1.0\r\nHost: {to}\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// A TCP port free on the host now, chosen by the kernel: a fixed one could be taken by
/// another program on a shared machine.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(super::loopback(0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// The processes of the cgroup at `path` (its `cgroup.procs`).
pub fn cgroup_pids(path: &Path) -> Vec<u32> {
    let procs = path.join("cgroup.procs");
    fs::read_to_string(&procs)
        .unwrap_or_else(|err| panic!("reading {}: {err}", procs.display()))
        .lines()
        .map(|line| line.trim().parse().expect("a pid"))
        .collect()
}

/// The inode of process `pid`'s network namespace (`/proc/PID/ns/net`).
pub fn netns_of(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/ns/net");
    fs::metadata(&path)
        .unwrap_or_else(|err| panic!("reading {path}: {err}"))
        .ino()
}

fn quietly(args: &[&str]) {
    match Command::new("podman").args(args).output() {
        Ok(done) if done.status.success() => {}
        Ok(done) => eprintln!(
            "clean-up: podman {args:?}: {}",
            String::from_utf8_lossy(&done.stderr).trim()
        ),
        Err(err) => eprintln!("clean-up: podman {args:?}: {err}"),
    }
}
