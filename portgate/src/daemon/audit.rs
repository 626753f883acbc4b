//! The audit log: one JSON line per API request and per knock, with what it asked for and
//! its outcome.
//!
//! The log is bounded on disk: when a record would take `audit.log` past
//! [`Rotation::max_bytes`], it is renamed `audit.log.1` (`.1` to `.2`, ..., the oldest
//! replaced), and a new `audit.log` is begun. A write that fails (a full disk) never fails
//! nor holds up the request, which has been answered: it is counted
//! (`portgate_errors_total{category="audit"}`), logged once per [`ERROR_LOG_PERIOD`] at
//! most, and cut off the file, so that no record is ever torn; the next record tries again.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::model::HostPort;

/// Prefixes of an allowlist written into a record: the first ones, and their count beside
/// them (an allowlist may hold 100,000).
pub const AUDIT_PREFIXES: usize = 16;

/// The longest text (an owner's name, a path, a container id) a record holds, in bytes:
/// longer ones are cut at a character boundary.
pub const AUDIT_TEXT_BYTES: usize = 256;

/// While the log cannot be written, at most one message per this period says so.
pub const ERROR_LOG_PERIOD: Duration = Duration::from_mins(1);

/// One audited request.
#[derive(Clone, Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339 time, milliseconds.
    pub time: String,
    /// The caller's uid (`None` when the socket could not tell).
    pub uid: Option<u32>,
    /// The caller's pid.
    pub pid: Option<i32>,
    /// What was asked (`alloc`, `release`, ...).
    pub action: &'a str,
    /// The port named or allocated.
    pub port: Option<u16>,
    /// Its protocol.
    pub proto: Option<&'a str>,
    /// Its network namespace's cookie, when it is not the host's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<u64>,
    /// `ok`, or the error code.
    pub result: &'a str,
    /// The HTTP status answered (0 for a knock, which is never answered).
    pub status: u16,
    /// The client key a knock named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    /// The address a knock came from, or the grant's address a request named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<IpAddr>,
    /// The address an accepted knock's grant is for (its source's, or the one it named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_for: Option<IpAddr>,
    /// How many refused knocks this record stands for (`"result": "not_audited"`: those
    /// beyond the audit's rate, counted since the last knock record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// What the request asked for.
    #[serde(flatten)]
    pub params: AuditParams,
}

/// What a request asked for, as far as its route takes it: each field is written only
/// when the request gave it, and each is bounded in size ([`AUDIT_PREFIXES`],
/// [`AUDIT_TEXT_BYTES`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditParams {
    /// The owner's name an allocation gave.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The owner cgroup named (an allocation's, or a port's new owner).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The process named as owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner_pid: Option<u32>,
    /// The container named as owner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The network namespace path named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns_path: Option<String>,
    /// The host port asked to publish on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<HostPort>,
    /// The allowlist given (an allocation's) or the prefixes added (an access change): the
    /// first [`AUDIT_PREFIXES`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow: Option<Vec<IpNet>>,
    /// How many prefixes `allow` stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_count: Option<usize>,
    /// The prefixes an access change takes out: the first [`AUDIT_PREFIXES`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove: Option<Vec<IpNet>>,
    /// How many prefixes `remove` stands for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remove_count: Option<usize>,
    /// The connection limit asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Whether new connections were asked to need a grant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub require_auth: Option<bool>,
    /// A lease's length (allocation, renewal), a grant's (a grant, an accepted knock) or a
    /// key's longest grant, as `"5m"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    /// Whether a new key lets a knock name its grant's address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub any_source: Option<bool>,
    /// The fleet node named (a repair).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl AuditParams {
    /// The first [`AUDIT_PREFIXES`] of `prefixes` and their count; nothing for none.
    pub fn prefixes<'a>(
        prefixes: impl ExactSizeIterator<Item = &'a IpNet>,
    ) -> (Option<Vec<IpNet>>, Option<usize>) {
        let count = prefixes.len();
        if count == 0 {
            return (None, None);
        }
        (
            Some(prefixes.take(AUDIT_PREFIXES).copied().collect()),
            Some(count),
        )
    }

    /// `text` cut to [`AUDIT_TEXT_BYTES`] at a character boundary.
    #[must_use]
    pub fn text(text: &str) -> String {
        let mut end = text.len().min(AUDIT_TEXT_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_owned()
    }

    /// A path as a record writes it, cut as [`AuditParams::text`].
    #[must_use]
    pub fn path(path: &Path) -> String {
        Self::text(&path.to_string_lossy())
    }

    /// A duration as a record writes it (`"5m"`).
    #[must_use]
    pub fn duration(duration: Duration) -> String {
        humantime::format_duration(duration).to_string()
    }
}

/// How the audit log is bounded on disk: it takes at most `(keep + 1) * max_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rotation {
    /// A record that would take the live file past this many bytes goes into a new one.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` is the newest).
    pub keep: u32,
}

/// The audit log file, appended to under one lock, one `write` per record.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    rotation: Rotation,
    writer: Mutex<Writer>,
    /// Records not written, for the metric.
    failures: Counter,
}

/// The live file and what the log knows of it.
#[derive(Debug)]
struct Writer {
    /// `None` after a failure that left it unusable: opened again by the next record.
    file: Option<File>,
    /// Bytes in the live file: every record in it is whole.
    size: u64,
    /// Since when records fail, when that was last logged, and how many failed since.
    failing: Option<Failing>,
}

#[derive(Debug)]
struct Failing {
    failed: u64,
    logged_at: Instant,
    unlogged: u64,
}

impl AuditLog {
    /// Opens (creating) the log and its directory; the file is readable by root only.
    /// `failures` counts the records that could not be written.
    pub fn open(path: &Path, rotation: Rotation, failures: Counter) -> io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let (file, size) = open_live(path)?;
        Ok(Self {
            path: path.to_owned(),
            rotation,
            writer: Mutex::new(Writer {
                file: Some(file),
                size,
                failing: None,
            }),
            failures,
        })
    }

    /// The log's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the `n`th rotated file (`audit.log.1` is the newest).
    #[must_use]
    pub fn rotated(&self, n: u32) -> PathBuf {
        rotated(&self.path, n)
    }

    /// Appends a record. A failure is counted and logged, not returned: the request has
    /// been answered.
    pub fn record(&self, record: &AuditRecord<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(err) => {
                self.failures.inc();
                log::error!("audit record not encoded: {err}");
                return;
            }
        };
        line.push(b'\n');
        let mut writer = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match writer.append(&self.path, self.rotation, &line) {
            Ok(()) => {
                if let Some(failing) = writer.failing.take() {
                    log::warn!(
                        "audit log {} written again; {} records were lost while it could not be",
                        self.path.display(),
                        failing.failed
                    );
                }
            }
            Err(err) => {
                self.failures.inc();
                self.log_failure(&mut writer, &err);
            }
        }
    }

    /// Logs a failed record: the first of a run at once, then at most once per
    /// [`ERROR_LOG_PERIOD`] with the number failed meanwhile.
    fn log_failure(&self, writer: &mut Writer, err: &io::Error) {
        let now = Instant::now();
        let Some(failing) = writer.failing.as_mut() else {
            log::error!(
                "audit log {} not written: {err}; the request was carried out, its record is lost (free space or fix the permissions there; portgate_errors_total{{category=\"audit\"}} counts them)",
                self.path.display()
            );
            writer.failing = Some(Failing {
                failed: 1,
                logged_at: now,
                unlogged: 0,
            });
            return;
        };
        failing.failed += 1;
        failing.unlogged += 1;
        if now.duration_since(failing.logged_at) >= ERROR_LOG_PERIOD {
            log::error!(
                "audit log {} still not written: {err}; {} more records lost",
                self.path.display(),
                failing.unlogged
            );
            failing.logged_at = now;
            failing.unlogged = 0;
        }
    }
}

impl Writer {
    /// Writes `line` whole into the live file, rotating first when it would take the file
    /// past the bound; on failure nothing of it stays in the file.
    fn append(&mut self, path: &Path, rotation: Rotation, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64;
        if self.file.is_none() {
            let (file, size) = open_live(path)?;
            self.file = Some(file);
            self.size = size;
        }
        if self.size > 0 && self.size + len > rotation.max_bytes {
            self.rotate(path, rotation.keep)?;
        }
        let Some(file) = self.file.as_mut() else {
            return Err(io::Error::other("the audit log is not open"));
        };
        if let Err(err) = file.write_all(line) {
            // A part of the line may be in: cut it off, so that the next record starts on
            // a line of its own. If even that fails, the file is opened again next time.
            if file.set_len(self.size).is_err() {
                self.file = None;
            }
            return Err(err);
        }
        self.size += len;
        Ok(())
    }

    /// `audit.log.{keep-1}` becomes `.{keep}` (replacing it), ..., `audit.log` becomes
    /// `.1`, and a new live file is begun.
    fn rotate(&mut self, path: &Path, keep: u32) -> io::Result<()> {
        for n in (1..keep).rev() {
            match fs::rename(rotated(path, n), rotated(path, n + 1)) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        fs::rename(path, rotated(path, 1))?;
        // From here the old file is `.1`: whatever happens, writes go to a new live file.
        self.file = None;
        self.size = 0;
        let (file, size) = open_live(path)?;
        self.file = Some(file);
        self.size = size;
        Ok(())
    }
}

/// Opens (creating, mode 0600) the live file for appending, with its size.
fn open_live(path: &Path) -> io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let size = file.metadata()?.len();
    Ok((file, size))
}

/// `path` with `.n` appended.
fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{n}"));
    PathBuf::from(name)
}

/// The current time as the audit log writes it.
#[must_use]
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests;
