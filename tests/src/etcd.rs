//! An etcd server for the fleet tests: the distribution's `etcd` as a plain child process on
//! loopback ports, with a temporary data directory. Dropping it kills the process (even a
//! paused one) and removes the directory.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};

use crate::common::NetNs;

/// How long etcd may take to answer its health check after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running etcd server.
pub struct EtcdServer {
    child: Child,
    client: SocketAddr,
    data: tempfile::TempDir,
    /// The namespace it runs in, when not the host's (dropped after it).
    ns: Option<NetNs>,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports and waits until it is healthy.
    ///
    /// # Panics
    /// When etcd is missing (`cargo xtask setup` installs it) or does not become healthy.
    pub fn start() -> Self {
        let (client, peer) = (free_port(), free_port());
        Self::launch(client, peer, None)
    }

    /// Starts etcd in `ns` (a test namespace: daemons in other namespaces reach it over
    /// veth pairs), listening on every address there.
    pub fn start_in(ns: NetNs) -> Self {
        let (client, peer) = ns.run(|| (free_port(), free_port()));
        Self::launch(client, peer, Some(ns))
    }

    fn launch(client: SocketAddr, peer: SocketAddr, ns: Option<NetNs>) -> Self {
        let data = tempfile::Builder::new()
            .prefix("portgate-etcd-")
            .tempdir()
            .expect("a data directory for etcd");
        let listen_client = if ns.is_some() {
            format!("http://0.0.0.0:{}", client.port())
        } else {
            format!("http://{client}")
        };
        let client_url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let log = std::fs::File::create(data.path().join("etcd.log")).expect("etcd's log");
        let mut command = Command::new("etcd");
        command
            .args(["--name", "portgate-test"])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &listen_client])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("portgate-test={peer_url}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log"))
            .stderr(log);
        let mut spawn = move || {
            command
                .spawn()
                .expect("etcd runs (`cargo xtask setup` installs the distribution's etcd-server)")
        };
        // Forked from a thread in the namespace, etcd runs there.
        let child = match &ns {
            Some(ns) => ns.run(spawn),
            None => spawn(),
        };
        let server = Self {
            child,
            client,
            data,
            ns,
        };
        server.wait_healthy();
        server
    }

    /// Its client URL (from its own namespace).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
    }

    /// Its client URL at `addr`, one of its namespace's addresses.
    pub fn endpoint_at(&self, addr: std::net::IpAddr) -> String {
        format!("http://{}", SocketAddr::new(addr, self.client.port()))
    }

    /// The namespace it runs in, when not the host's.
    pub fn ns(&self) -> Option<&NetNs> {
        self.ns.as_ref()
    }

    /// Its process id.
    pub fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("a pid"))
    }

    /// Stops the process (SIGSTOP): it holds its connections and answers nothing.
    pub fn pause(&self) {
        signal::kill(self.pid(), signal::Signal::SIGSTOP).expect("SIGSTOP etcd");
    }

    /// Lets a paused process go on (SIGCONT).
    pub fn resume(&self) {
        signal::kill(self.pid(), signal::Signal::SIGCONT).expect("SIGCONT etcd");
    }

    /// What etcd logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.data.path().join("etcd.log")
    }

    /// Waits until `/health` answers true.
    fn wait_healthy(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        while Instant::now() < deadline {
            if self.healthy() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "etcd on {} did not become healthy within {READY_WITHIN:?}:\n{}",
            self.client,
            self.log()
        );
    }

    /// Whether `/health` says so now.
    pub fn healthy(&self) -> bool {
        match &self.ns {
            Some(ns) => ns.run(|| self.healthy_here()),
            None => self.healthy_here(),
        }
    }

    fn healthy_here(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect_timeout(&self.client, Duration::from_secs(1))
        else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        if stream
            .write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        // A paused process takes SIGKILL too; SIGCONT first all the same, for its children.
        let _ = signal::kill(self.pid(), signal::Signal::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now (the kernel's pick; etcd binds it right after).
fn free_port() -> SocketAddr {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
}
