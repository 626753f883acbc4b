//! Network namespaces on this host: the cookie the kernel keys a namespace by, the nsfs inode
//! people see (`net:[INODE]`), and a readable label; opened by path or pid, entered on a
//! thread of their own, and found again later without holding them open.
//!
//! A namespace is named by a file that opens it: `/run/netns/NAME` (`ip netns add`) or
//! `/proc/PID/ns/net`. Entering or opening another namespace than the caller's needs
//! `CAP_SYS_ADMIN`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    thread,
};

use nix::{
    errno::Errno,
    sched::{CloneFlags, setns},
    sys::socket::{AddressFamily, SockFlag, SockType, getsockopt, socket},
};

use crate::paths;

/// A network namespace found on this host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Netns {
    /// What the kernel keys the namespace by (`bpf_get_netns_cookie`, `SO_NETNS_COOKIE`):
    /// never reused while the system runs, unlike the inode.
    pub cookie: u64,
    /// The nsfs inode, as in `net:[INODE]` (`ls -l /proc/PID/ns/net`, `lsns`); reused once the
    /// namespace is freed.
    pub inode: u64,
    /// A stable, readable name: the name under `/run/netns` if one names the namespace, else
    /// one the caller gives (a container id), else `net:[INODE]`.
    pub label: String,
}

/// Why a network namespace could not be opened, entered or read.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// Nothing exists at the path given.
    #[error(
        "{path} does not exist: name a network namespace as /run/netns/NAME (see \
         `ip netns list`) or /proc/PID/ns/net"
    )]
    Missing {
        /// The path given.
        path: PathBuf,
    },
    /// No process has the pid given.
    #[error("no process {pid} (no {path}): check the pid; the process may have exited")]
    NoProcess {
        /// The pid given.
        pid: u32,
        /// Its directory under `/proc`.
        path: PathBuf,
    },
    /// The file is not a network namespace.
    #[error(
        "{path} is {what}, not a network namespace: name one as /run/netns/NAME or \
         /proc/PID/ns/net"
    )]
    NotNetns {
        /// The path given.
        path: PathBuf,
        /// What it is instead (`a directory`, `an ordinary file`, ...).
        what: String,
    },
    /// A file-system call failed.
    #[error(transparent)]
    Host(#[from] super::HostError),
    /// `setns` refused to enter the namespace.
    #[error(
        "entering the network namespace {path} (setns): entering another network namespace \
         needs CAP_SYS_ADMIN, run portgate as root"
    )]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The namespace cookie could not be read.
    #[error("{call} to read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)")]
    Cookie {
        /// The call that failed.
        call: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// No thread could be started to enter the namespace on.
    #[error("starting a thread to enter the network namespace {path}")]
    Thread {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// `SO_NETNS_COOKIE`, which nix does not define, through nix's own extension macro.
mod sockopt {
    use nix::{getsockopt_impl, sockopt_impl};

    sockopt_impl!(
        /// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of the socket's network namespace.
        NetnsCookie,
        GetOnly,
        libc::SOL_SOCKET,
        libc::SO_NETNS_COOKIE,
        u64
    );
}

/// The cookie of the calling thread's network namespace: `SO_NETNS_COOKIE` of a fresh
/// socket, which lives in the namespace of the thread that made it.
pub fn current_cookie() -> Result<u64, NetnsError> {
    // A Unix socket, which every namespace has, whatever IP families the kernel offers.
    let socket = socket(
        AddressFamily::Unix,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| NetnsError::Cookie {
        call: "socket",
        source,
    })?;
    getsockopt(&socket, sockopt::NetnsCookie).map_err(|source| NetnsError::Cookie {
        call: "getsockopt(SO_NETNS_COOKIE)",
        source,
    })
}

/// Runs `f` on a new thread that first enters the network namespace at `path`, and returns
/// what `f` returns; a panic in `f` goes on in the caller. The caller's thread never moves.
/// Sockets `f` opens, and threads it starts, live in that namespace.
pub fn enter<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let (file, _inode) = open_namespace(path)?;
    enter_file(&file, path, f)
}

/// Opens the network namespace at `path` (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn open(path: &Path) -> Result<Netns, NetnsError> {
    let (file, inode) = open_namespace(path)?;
    Ok(Netns {
        cookie: cookie_of(&file, path, inode)?,
        inode,
        label: label_for(inode),
    })
}

/// The network namespace of process `pid`, and the path it was opened by
/// (`/proc/PID/ns/net`).
pub fn of_pid(pid: u32) -> Result<(PathBuf, Netns), NetnsError> {
    let dir = Path::new(paths::PROC_DIR).join(pid.to_string());
    if !dir.exists() {
        return Err(NetnsError::NoProcess { pid, path: dir });
    }
    let path = dir.join(paths::PROC_PID_NETNS);
    let netns = open(&path)?;
    Ok((path, netns))
}

/// The calling thread's own network namespace, labelled `host`.
pub fn host() -> Result<Netns, NetnsError> {
    Ok(Netns {
        cookie: current_cookie()?,
        inode: own_file()?.ino(),
        label: "host".to_owned(),
    })
}

/// A path that opens the namespace with this inode and cookie now: a name under
/// `/run/netns`, else `/proc/PID/ns/net` of a process in it. `None` once the namespace is
/// gone, which is how a namespace's end is noticed without holding it open (that would keep
/// it alive). [`find_all`] for one namespace.
#[must_use]
pub fn find(inode: u64, cookie: u64) -> Option<PathBuf> {
    find_all(&BTreeSet::from([(inode, cookie)]))
        .into_values()
        .next()
}

/// For each namespace of `wanted`, by (inode, cookie), a path that opens it now (see
/// [`find`]); a namespace missing from the answer is gone. One pass over `/run/netns` and
/// `/proc` serves them all, and stops once each is settled.
///
/// The cookie is checked by entering a candidate, since a freed namespace's inode is
/// reused: each inode is entered at most once (only one namespace has it at a time).
/// Without `CAP_SYS_ADMIN` only the caller's own namespace is found. A namespace that only
/// an open file, a bind mount elsewhere, or a thread other than a process's main thread
/// holds is not found.
#[must_use]
pub fn find_all(wanted: &BTreeSet<(u64, u64)>) -> BTreeMap<(u64, u64), PathBuf> {
    if wanted.is_empty() {
        return BTreeMap::new();
    }
    let mut unsettled: BTreeSet<u64> = wanted.iter().map(|(inode, _)| *inode).collect();
    let mut found = BTreeMap::new();
    let mut try_path = |path: &Path, unsettled: &mut BTreeSet<u64>| {
        let Ok((file, inode)) = open_namespace(path) else {
            return;
        };
        if !unsettled.contains(&inode) {
            return;
        }
        let Ok(cookie) = cookie_of(&file, path, inode) else {
            return;
        };
        // The one namespace with this inode now: wanted or not, the inode is settled.
        unsettled.remove(&inode);
        if wanted.contains(&(inode, cookie)) {
            found.insert((inode, cookie), path.to_owned());
        }
    };
    for (inode, _name, path) in names() {
        if unsettled.contains(&inode) {
            try_path(&path, &mut unsettled);
        }
    }
    let procs = fs::read_dir(paths::PROC_DIR)
        .into_iter()
        .flatten()
        .flatten();
    for entry in procs {
        if unsettled.is_empty() {
            break;
        }
        if !entry.file_name().to_str().is_some_and(is_pid) {
            continue;
        }
        let path = entry.path().join(paths::PROC_PID_NETNS);
        let linked = fs::read_link(&path).ok();
        if let Some(("net", inode)) = linked.as_deref().and_then(parse_ns_link)
            && unsettled.contains(&inode)
        {
            try_path(&path, &mut unsettled);
        }
    }
    found
}

/// The label of the namespace with this inode: its name under `/run/netns` (the first in
/// order when several name it), else `net:[INODE]`.
#[must_use]
pub fn label_for(inode: u64) -> String {
    names()
        .into_iter()
        .find(|(named, _, _)| *named == inode)
        .map_or_else(|| format!("net:[{inode}]"), |(_, name, _)| name)
}

/// The namespaces named under `/run/netns`, as (inode, name, path), in name order.
fn names() -> Vec<(u64, String, PathBuf)> {
    // Namespaces of every kind share one inode numbering on nsfs: a file there with an
    // inode is that namespace. A leftover file of another file system is not.
    let Ok(nsfs) = own_file().map(|own| own.dev()) else {
        return Vec::new();
    };
    let mut names: Vec<_> = fs::read_dir(paths::NETNS_RUN_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let meta = fs::metadata(entry.path()).ok()?;
            (meta.dev() == nsfs).then_some(())?;
            Some((
                meta.ino(),
                entry.file_name().into_string().ok()?,
                entry.path(),
            ))
        })
        .collect();
    names.sort_by(|a, b| a.1.cmp(&b.1));
    names
}

/// Opens the namespace file at `path`, returning it and the namespace's inode. Any kind of
/// namespace passes: `setns` refuses one that is not a network namespace.
fn open_namespace(path: &Path) -> Result<(File, u64), NetnsError> {
    let not_netns = |what: &str| NetnsError::NotNetns {
        path: path.to_owned(),
        what: what.to_owned(),
    };
    let meta = match fs::metadata(path) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            return Err(NetnsError::Missing {
                path: path.to_owned(),
            });
        }
        other => other.map_err(io_error("reading", path))?,
    };
    if meta.is_dir() {
        return Err(not_netns("a directory"));
    }
    // Namespace files are regular files; opening anything else (a FIFO) could block.
    if !meta.is_file() {
        return Err(not_netns("a special file"));
    }
    let file = File::open(path).map_err(io_error("opening", path))?;
    let meta = file.metadata().map_err(io_error("reading", path))?;
    // Every namespace file lives on the one nsfs file system, as our own does.
    if meta.dev() != own_file()?.dev() {
        return Err(not_netns("an ordinary file"));
    }
    Ok((file, meta.ino()))
}

/// The calling thread's network namespace file: its inode names the namespace, its device
/// is nsfs.
fn own_file() -> Result<fs::Metadata, NetnsError> {
    let path = Path::new(paths::THREAD_NETNS);
    fs::metadata(path).map_err(io_error("reading", path))
}

/// The cookie of the network namespace open as `file`: read on the calling thread when that
/// is its namespace (no privilege needed), else on a thread that enters it.
fn cookie_of(file: &File, path: &Path, inode: u64) -> Result<u64, NetnsError> {
    if inode == own_file()?.ino() {
        return current_cookie();
    }
    enter_file(file, path, current_cookie)?
}

fn enter_file<T: Send>(
    file: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    thread::scope(|scope| {
        let thread = thread::Builder::new()
            .name("portgate-netns".to_owned())
            .spawn_scoped(scope, || {
                setns(file, CloneFlags::CLONE_NEWNET).map(|()| f())
            })
            .map_err(|source| NetnsError::Thread {
                path: path.to_owned(),
                source,
            })?;
        match thread.join() {
            Ok(result) => result.map_err(|source| match source {
                // setns checks the kind of namespace before the caller's privilege.
                Errno::EINVAL => NetnsError::NotNetns {
                    path: path.to_owned(),
                    what: "a namespace of another kind".to_owned(),
                },
                source => NetnsError::Enter {
                    path: path.to_owned(),
                    source,
                },
            }),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `kind:[INODE]`, the target of a namespace link, as the kind and the inode.
fn parse_ns_link(link: &Path) -> Option<(&str, u64)> {
    let (kind, rest) = link.to_str()?.split_once(":[")?;
    Some((kind, rest.strip_suffix(']')?.parse().ok()?))
}

fn is_pid(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_digit())
}

fn io_error<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetnsError + 'a {
    move |source| super::HostError::io(op, path)(source).into()
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        process::{Child, Command, Stdio},
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;

    /// Whether the test can run as root. Without root: with `CI` set the test fails;
    /// otherwise it prints `SKIPPED: <test>: <why>` and the test returns.
    fn require_root(test: &str) -> bool {
        if nix::unistd::Uid::effective().is_root() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: needs root to create and enter network namespaces (CI is set, so this fails)"
        );
        // Straight to the process's stdout: libtest captures `println!` of passing tests.
        let _ignored = writeln!(
            io::stdout().lock(),
            "SKIPPED: {test}: not root, cannot create network namespaces"
        );
        false
    }

    /// A namespace made with `ip netns add`, deleted on drop.
    struct TestNetns {
        name: String,
    }

    impl TestNetns {
        fn new() -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "pgu-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            );
            ip(&["netns", "add", &name]);
            Self { name }
        }

        fn path(&self) -> PathBuf {
            Path::new(paths::NETNS_RUN_DIR).join(&self.name)
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ignored = Command::new("ip")
                .args(["netns", "delete", &self.name])
                .status();
        }
    }

    /// A `sleep` running in a namespace, killed on drop.
    struct Sleeper(Child);

    impl Sleeper {
        /// Starts it and waits until it is inside the namespace (it says so).
        fn spawn(netns: &TestNetns) -> Self {
            // `ip netns exec` enters the namespace and then execs, keeping its pid.
            let mut child = Command::new("ip")
                .args(["netns", "exec", &netns.name, "sh", "-c"])
                .arg("echo ready && exec sleep 600")
                .stdout(Stdio::piped())
                .spawn()
                .expect("running ip netns exec");
            let mut line = String::new();
            BufReader::new(child.stdout.take().expect("its stdout"))
                .read_line(&mut line)
                .expect("reading its stdout");
            assert_eq!(line.trim(), "ready", "ip netns exec failed");
            Self(child)
        }

        fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Sleeper {
        fn drop(&mut self) {
            let _ignored = self.0.kill();
            let _ignored = self.0.wait();
        }
    }

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("running ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    #[test]
    fn current_cookie_is_nonzero_and_stable() {
        let cookie = current_cookie().expect("SO_NETNS_COOKIE");
        assert_ne!(cookie, 0);
        assert_eq!(current_cookie().expect("SO_NETNS_COOKIE"), cookie);
    }

    #[test]
    fn own_namespace_opens_as_current() {
        let netns = open(Path::new(paths::THREAD_NETNS)).expect("opening our namespace");
        let host = host().expect("our namespace");
        assert_eq!(netns.cookie, current_cookie().expect("SO_NETNS_COOKIE"));
        assert_eq!(netns.cookie, host.cookie);
        assert_eq!(netns.inode, host.inode);
        assert_eq!(
            netns.inode,
            crate::host::kernel::current_netns_inode().expect("our inode")
        );
        assert_eq!(host.label, "host");
    }

    #[test]
    fn own_namespace_is_found() {
        let host = host().expect("our namespace");
        assert!(find(host.inode, host.cookie).is_some());
        assert_eq!(find(host.inode, host.cookie.wrapping_add(1)), None);
    }

    #[test]
    fn find_all_answers_only_the_namespaces_that_live() {
        let host = host().expect("our namespace");
        let wanted = BTreeSet::from([
            (host.inode, host.cookie),
            // Our inode with another cookie: a namespace that had our inode before us.
            (host.inode, host.cookie.wrapping_add(1)),
            // No namespace has inode 1 (nsfs numbers start far above).
            (1, 2),
        ]);
        let found = find_all(&wanted);
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            [(host.inode, host.cookie)]
        );
        assert!(find_all(&BTreeSet::new()).is_empty());
    }

    #[test]
    fn what_is_not_a_network_namespace_is_refused() {
        let missing = Path::new("/nonexistent/portgate-netns");
        assert!(matches!(open(missing), Err(NetnsError::Missing { .. })));

        let mnt = Path::new("/proc/thread-self/ns/mnt");
        match open(mnt) {
            Err(NetnsError::NotNetns { what, .. }) => {
                assert_eq!(what, "a namespace of another kind");
            }
            other => panic!("opening {}: {other:?}", mnt.display()),
        }

        let dir = tempfile::tempdir().expect("a temporary directory");
        match open(dir.path()) {
            Err(NetnsError::NotNetns { what, .. }) => assert_eq!(what, "a directory"),
            other => panic!("opening a directory: {other:?}"),
        }
        let file = dir.path().join("net");
        fs::write(&file, "").expect("writing a file");
        match enter(&file, || ()) {
            Err(NetnsError::NotNetns { what, .. }) => assert_eq!(what, "an ordinary file"),
            other => panic!("entering an ordinary file: {other:?}"),
        }
    }

    #[test]
    fn missing_process_is_named() {
        // Above the largest pid_max (2^22).
        let pid = 4_000_000_000;
        match of_pid(pid) {
            Err(err @ NetnsError::NoProcess { .. }) => {
                assert!(err.to_string().contains("no process 4000000000"), "{err}");
            }
            other => panic!("of_pid({pid}): {other:?}"),
        }
    }

    #[test]
    fn named_namespace_is_opened_entered_and_found_until_gone() {
        if !require_root("named_namespace_is_opened_entered_and_found_until_gone") {
            return;
        }
        let host = host().expect("our namespace");
        let test_netns = TestNetns::new();
        let path = test_netns.path();

        let netns = open(&path).expect("opening the test namespace");
        assert_eq!(netns.label, test_netns.name);
        assert_ne!(netns.cookie, host.cookie);
        assert_ne!(netns.inode, host.inode);
        assert_eq!(label_for(netns.inode), test_netns.name);
        assert_eq!(find(netns.inode, netns.cookie), Some(path.clone()));

        let caller = thread::current().id();
        let (cookie, inside) = enter(&path, || {
            (
                current_cookie().expect("SO_NETNS_COOKIE"),
                thread::current().id(),
            )
        })
        .expect("entering the test namespace");
        assert_eq!(cookie, netns.cookie);
        assert_ne!(inside, caller, "enter ran on the caller's thread");
        assert_eq!(current_cookie().expect("SO_NETNS_COOKIE"), host.cookie);

        let sleeper = Sleeper::spawn(&test_netns);
        let (pid_path, by_pid) = of_pid(sleeper.pid()).expect("the sleeper's namespace");
        assert_eq!(
            pid_path,
            PathBuf::from(format!("/proc/{}/ns/net", sleeper.pid()))
        );
        assert_eq!(by_pid, netns);

        // Unnamed, the namespace lives on in the sleeper, and is found through it.
        drop(test_netns);
        assert_eq!(label_for(netns.inode), format!("net:[{}]", netns.inode));
        assert_eq!(find(netns.inode, netns.cookie), Some(pid_path));

        drop(sleeper);
        assert_eq!(find(netns.inode, netns.cookie), None);
    }
}
