//! The audit log: one JSON line per API request and per knock, and its outcome.

use std::{
    fs::{self, File, OpenOptions},
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
    time::SystemTime,
};

use serde::Serialize;

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
    pub addr: Option<std::net::IpAddr>,
    /// The address an accepted knock's grant is for (its source's, or the one it named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_for: Option<std::net::IpAddr>,
    /// How many refused knocks this record stands for (`"result": "not_audited"`: those
    /// beyond the audit's rate, counted since the last knock record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// The audit log file, appended to with one `write` per record (`O_APPEND` keeps lines
/// whole when several writers share the file).
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating) the log and its directory; the file is readable by root only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        Ok(Self {
            path: path.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// The log's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a record. A failure is logged, not returned: the request has been answered.
    pub fn record(&self, record: &AuditRecord<'_>) {
        let mut line = match serde_json::to_vec(record) {
            Ok(line) => line,
            Err(err) => {
                log::error!("audit record not encoded: {err}");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = file.write_all(&line) {
            log::error!("audit log {} not written: {err}", self.path.display());
        }
    }
}

/// The current time as the audit log writes it.
#[must_use]
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}
