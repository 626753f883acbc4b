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

/// How long etcd may take to answer its health check after it starts.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running etcd server.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    client: SocketAddr,
    data: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports and waits until it is healthy.
    ///
    /// # Panics
    /// When etcd is missing (`cargo xtask setup` installs it) or does not become healthy.
    pub fn start() -> Self {
        let data = tempfile::Builder::new()
            .prefix("portgate-etcd-")
            .tempdir()
            .expect("a data directory for etcd");
        let (client, peer) = (free_port(), free_port());
        let client_url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let log = std::fs::File::create(data.path().join("etcd.log")).expect("etcd's log");
        let child = Command::new("etcd")
            .args(["--name", "portgate-test"])
            .arg("--data-dir")
            .arg(data.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("portgate-test={peer_url}")])
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log"))
            .stderr(log)
            .spawn()
            .expect("etcd runs (`cargo xtask setup` installs the distribution's etcd-server)");
        let server = Self {
            child,
            client,
            data,
        };
        server.wait_healthy();
        server
    }

    /// Its client URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client)
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
