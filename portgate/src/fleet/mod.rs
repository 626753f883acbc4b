//! Fleet mode's shared store (issue #14, in progress): the allocations of one port range,
//! shared by every node through etcd.
//!
//! Key layout (under `[cluster] prefix`, `/portgate` by default, and the range, so that
//! fleets of different ranges on one etcd never meet):
//!
//! - `<prefix>/<min>-<max>/alloc/<proto>/<port>`: one key per allocated port, its value a
//!   [`FleetRecord`] (the allocation, JSON, and the node that made it). A port is claimed by
//!   a transaction that creates the key only if it does not exist, so no port is held twice
//!   across the fleet, whatever the races. Every later change compares the key's
//!   `mod_revision` with the one the writer read, and a release deletes it the same way.
//! - `<prefix>/<min>-<max>/nodes/<node>`: each node's liveness key, on a lease kept alive
//!   while the node runs ([`Fleet::join`]); it is gone a lease after the node stops.
//!
//! Allocations are not tied to a node's lease: a node that dies keeps its ports.
//!
//! What is here: connecting (endpoints, user and password, TLS, a deadline on every
//! request and HTTP/2 keep-alive, so that an etcd that stops answering fails requests
//! instead of hanging them), claim, compare-and-swap update, guarded release, list with
//! its revision, watch from a revision (a compaction is reported so that the caller lists
//! again), and the liveness key. `crate::manager`'s fleet mode builds on it.

mod keys;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    TxnOpResponse, WatchOptions, WatchStream,
};
use serde::{Deserialize, Serialize};

pub use self::keys::FleetKeys;
use crate::{
    config::ClusterConfig,
    model::{Allocation, PortId},
};

/// An allocation as the fleet holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetRecord {
    /// The node that made it (its `[cluster] node`).
    pub node: String,
    /// The allocation, the same on every node.
    pub allocation: Allocation,
    /// A random token of the claim that made it: a node whose claim got no answer in time
    /// (and told its caller so) knows it again if etcd took it after all, and releases it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<u64>,
}

/// A record with the `mod_revision` of its key, which a change must compare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The record.
    pub record: FleetRecord,
    /// Its key's `mod_revision` when read.
    pub revision: i64,
}

/// Every allocation of the range at one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// The records, by key order (protocol, then port as text).
    pub held: Vec<Held>,
    /// The store's revision they were read at; a watch goes on from the next one.
    pub revision: i64,
}

/// A change to the range's allocations, seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FleetEvent {
    /// An allocation was made or changed.
    Put(Box<Held>),
    /// An allocation was released, at this revision.
    Deleted(PortId, i64),
}

/// Why a fleet operation failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// etcd did not answer in time, or could not be reached: nothing was changed that the
    /// caller can count on.
    #[error("etcd is unreachable ({0}): fleet changes are refused until it is back")]
    Unreachable(String),
    /// The port is held in the fleet already.
    #[error("{id} is held in the fleet already (by node {node})")]
    Taken {
        /// The port.
        id: PortId,
        /// The node that made its allocation.
        node: String,
    },
    /// The record changed (or went) since it was read.
    #[error("{0} changed in the fleet since it was read: read it again")]
    Changed(PortId),
    /// The watched revision was compacted: list again, then watch from the listed revision.
    #[error("etcd compacted its history past revision {0}: list again")]
    Compacted(i64),
    /// A record in etcd cannot be read.
    #[error("a fleet record is corrupt ({key}): {message}")]
    Corrupt {
        /// Its key.
        key: String,
        /// Why.
        message: String,
    },
    /// The configuration cannot be used (a file that cannot be read, a bad URL).
    #[error("{0}")]
    Config(String),
    /// Any other answer from etcd.
    #[error("etcd: {0}")]
    Etcd(String),
}

impl From<etcd_client::Error> for FleetError {
    fn from(error: etcd_client::Error) -> Self {
        use etcd_client::Error as E;
        match &error {
            E::GRpcStatus(status)
                if matches!(
                    status.code(),
                    tonic::Code::Cancelled
                        | tonic::Code::Unavailable
                        | tonic::Code::DeadlineExceeded
                ) =>
            {
                Self::Unreachable(status.message().to_owned())
            }
            E::TransportError(_) | E::IoError(_) => Self::Unreachable(error.to_string()),
            _ => Self::Etcd(error.to_string()),
        }
    }
}

/// A connection to the fleet's etcd, for one range.
#[derive(Clone)]
pub struct Fleet {
    client: Client,
    keys: FleetKeys,
    node: String,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("keys", &self.keys)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Fleet {
    /// Connects to `config`'s etcd as `node`, for the range `min..=max`. Every request
    /// then fails after `config.timeout` without an answer, and a connection whose HTTP/2
    /// pings go unanswered for as long is dropped (watches with it).
    pub async fn connect(
        config: &ClusterConfig,
        node: &str,
        range: (u16, u16),
    ) -> Result<Self, FleetError> {
        let mut options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            .with_keep_alive(config.timeout, config.timeout)
            .with_keep_alive_while_idle(true);
        if let (Some(user), Some(file)) = (&config.username, &config.password_file) {
            let password = std::fs::read_to_string(file).map_err(|err| {
                FleetError::Config(format!(
                    "reading cluster.password_file {}: {err}",
                    file.display()
                ))
            })?;
            let password = password.lines().next().unwrap_or_default().to_owned();
            options = options.with_user(user.clone(), password);
        }
        if config.ca_file.is_some() || config.cert_file.is_some() {
            options = options.with_tls(tls(config)?);
        }
        // With a user, connect() authenticates: the request deadline does not bound it.
        let client = tokio::time::timeout(
            config.timeout,
            Client::connect(config.etcd.clone(), Some(options)),
        )
        .await
        .map_err(|_| {
            FleetError::Unreachable(format!(
                "no answer from {} within {}",
                config.etcd.join(", "),
                humantime::format_duration(config.timeout)
            ))
        })??;
        Ok(Self {
            client,
            keys: FleetKeys::new(&config.prefix, range),
            node: node.to_owned(),
        })
    }

    /// The keys of this fleet's range.
    #[must_use]
    pub const fn keys(&self) -> &FleetKeys {
        &self.keys
    }

    /// This node's name.
    #[must_use]
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Claims `allocation`'s port for the fleet with the random `token`: creates its key
    /// only if it does not exist. Returns the key's revision, which a later change or
    /// release compares.
    pub async fn claim(&self, allocation: &Allocation, token: u64) -> Result<i64, FleetError> {
        let id = allocation.id;
        let key = self.keys.alloc(id)?;
        let record = FleetRecord {
            node: self.node.clone(),
            allocation: allocation.clone(),
            claim: Some(token),
        };
        let value = serde_json::to_vec(&record).map_err(|err| FleetError::Etcd(err.to_string()))?;
        let answer = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key.clone(), value, None)])
                    .or_else([TxnOp::get(key.clone(), None)]),
            )
            .await?;
        if answer.succeeded() {
            return revision_of(answer.header());
        }
        let node = answer
            .op_responses()
            .into_iter()
            .find_map(|op| match op {
                TxnOpResponse::Get(got) => got.kvs().first().map(|kv| decode(kv.key(), kv.value())),
                _ => None,
            })
            .transpose()?
            .map_or_else(|| "unknown".to_owned(), |held| held.node);
        Err(FleetError::Taken { id, node })
    }

    /// Replaces the record of `allocation`'s port if its key is still at `revision`;
    /// returns the new revision.
    pub async fn update(&self, allocation: &Allocation, revision: i64) -> Result<i64, FleetError> {
        let id = allocation.id;
        let key = self.keys.alloc(id)?;
        let record = FleetRecord {
            node: self.node.clone(),
            allocation: allocation.clone(),
            claim: None,
        };
        let value = serde_json::to_vec(&record).map_err(|err| FleetError::Etcd(err.to_string()))?;
        self.if_at(id, revision, TxnOp::put(key, value, None)).await
    }

    /// Releases `id` for the fleet if its key is still at `revision`; returns the
    /// revision of the delete.
    pub async fn release(&self, id: PortId, revision: i64) -> Result<i64, FleetError> {
        let key = self.keys.alloc(id)?;
        self.if_at(id, revision, TxnOp::delete(key, None)).await
    }

    /// Does `op` on `id`'s key if the key is still at `revision`; returns the revision it
    /// was done at, or [`FleetError::Changed`].
    async fn if_at(&self, id: PortId, revision: i64, op: TxnOp) -> Result<i64, FleetError> {
        let key = self.keys.alloc(id)?;
        let answer = self
            .client
            .kv_client()
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
                    .and_then([op]),
            )
            .await?;
        if answer.succeeded() {
            revision_of(answer.header())
        } else {
            Err(FleetError::Changed(id))
        }
    }

    /// Every allocation of the range, and the revision they were read at.
    pub async fn list(&self) -> Result<Snapshot, FleetError> {
        let answer = self
            .client
            .kv_client()
            .get(
                self.keys.alloc_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let revision = revision_of(answer.header())?;
        let held = answer
            .kvs()
            .iter()
            .map(|kv| {
                Ok(Held {
                    record: decode(kv.key(), kv.value())?,
                    revision: kv.mod_revision(),
                })
            })
            .collect::<Result<Vec<_>, FleetError>>()?;
        Ok(Snapshot { held, revision })
    }

    /// Watches the range's allocations from revision `from` (the listed revision + 1).
    pub async fn watch(&self, from: i64) -> Result<FleetWatch, FleetError> {
        let stream = self
            .client
            .watch_client()
            .watch(
                self.keys.alloc_prefix(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from)
                        .with_prev_key(),
                ),
            )
            .await?;
        Ok(FleetWatch {
            stream,
            keys: self.keys.clone(),
        })
    }

    /// Compacts etcd's history up to `revision` (what a repair or a test does; etcd's own
    /// auto-compaction does the same).
    pub async fn compact(&self, revision: i64) -> Result<(), FleetError> {
        self.client.kv_client().compact(revision, None).await?;
        Ok(())
    }

    /// Writes this node's liveness key on a lease of `ttl` and keeps the lease alive on a
    /// task until the returned [`Liveness`] is dropped (the key goes a lease later). A
    /// lease that ran out (etcd unreachable for longer) is granted again, with the key.
    pub async fn join(&self, ttl: Duration, info: &NodeInfo) -> Result<Liveness, FleetError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let value = serde_json::to_vec(info).map_err(|err| FleetError::Etcd(err.to_string()))?;
        let first = self.put_alive(seconds, &value).await?;
        let period = Duration::from_secs(u64::try_from(seconds).unwrap_or(1)) / 3;
        let fleet = self.clone();
        let task = tokio::spawn(async move {
            let mut lease = first;
            loop {
                if let Err(err) = fleet.keep_alive(lease, period).await {
                    log::warn!("the fleet liveness lease ended ({err}); granting a new one");
                }
                lease = loop {
                    match fleet.put_alive(seconds, &value).await {
                        Ok(lease) => break lease,
                        Err(_) => tokio::time::sleep(period).await,
                    }
                };
            }
        });
        Ok(Liveness { lease: first, task })
    }

    /// Grants a lease of `seconds` and writes this node's liveness key on it.
    async fn put_alive(&self, seconds: i64, value: &[u8]) -> Result<i64, FleetError> {
        let lease = self.client.lease_client().grant(seconds, None).await?.id();
        self.client
            .kv_client()
            .put(
                self.keys.node(&self.node),
                value.to_vec(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(lease)
    }

    /// Keeps `lease` alive every `period` until it fails or has run out.
    async fn keep_alive(&self, lease: i64, period: Duration) -> Result<(), FleetError> {
        let (mut keeper, mut answers) = self.client.lease_client().keep_alive(lease).await?;
        loop {
            keeper.keep_alive().await?;
            match answers.message().await? {
                Some(answer) if answer.ttl() > 0 => {}
                _ => return Err(FleetError::Etcd(format!("lease {lease} ran out"))),
            }
            tokio::time::sleep(period).await;
        }
    }

    /// The nodes whose liveness keys are there now.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, FleetError> {
        let answer = self
            .client
            .kv_client()
            .get(
                self.keys.nodes_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        answer
            .kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice(kv.value()).map_err(|err| FleetError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    message: err.to_string(),
                })
            })
            .collect()
    }
}

/// What a node says of itself in its liveness key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name.
    pub node: String,
    /// portgate's version.
    pub version: String,
    /// When it joined (milliseconds since the epoch).
    pub joined_at: u64,
}

/// A node's liveness lease, kept alive until dropped.
#[derive(Debug)]
pub struct Liveness {
    lease: i64,
    task: tokio::task::JoinHandle<()>,
}

impl Liveness {
    /// The lease's id.
    #[must_use]
    pub const fn lease(&self) -> i64 {
        self.lease
    }
}

impl Drop for Liveness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A watch on the range's allocations.
pub struct FleetWatch {
    stream: WatchStream,
    keys: FleetKeys,
}

impl std::fmt::Debug for FleetWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetWatch")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl FleetWatch {
    /// The next batch of changes; `Err(Compacted)` when the history it started from is
    /// gone, `Err(Unreachable)` when the watch was lost: list again either way.
    pub async fn next(&mut self) -> Result<Vec<FleetEvent>, FleetError> {
        loop {
            let Some(message) = self.stream.message().await? else {
                return Err(FleetError::Unreachable("the watch ended".to_owned()));
            };
            if message.canceled() {
                return Err(if message.compact_revision() > 0 {
                    FleetError::Compacted(message.compact_revision())
                } else {
                    FleetError::Unreachable(format!(
                        "the watch was cancelled: {}",
                        message.cancel_reason()
                    ))
                });
            }
            if message.created() && message.events().is_empty() {
                continue;
            }
            let mut events = Vec::with_capacity(message.events().len());
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                events.push(match event.event_type() {
                    EventType::Put => FleetEvent::Put(Box::new(Held {
                        record: decode(kv.key(), kv.value())?,
                        revision: kv.mod_revision(),
                    })),
                    EventType::Delete => {
                        FleetEvent::Deleted(self.keys.port_of(kv.key())?, kv.mod_revision())
                    }
                });
            }
            return Ok(events);
        }
    }
}

/// The store revision an answer was given at.
fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Result<i64, FleetError> {
    header
        .map(etcd_client::ResponseHeader::revision)
        .ok_or_else(|| FleetError::Etcd("an answer without a header".to_owned()))
}

/// A record from its key and value.
fn decode(key: &[u8], value: &[u8]) -> Result<FleetRecord, FleetError> {
    serde_json::from_slice(value).map_err(|err| FleetError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: err.to_string(),
    })
}

/// The TLS options of `config`: its CA, and its client certificate and key.
fn tls(config: &ClusterConfig) -> Result<etcd_client::TlsOptions, FleetError> {
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|err| {
            FleetError::Config(format!("reading cluster.{key} {}: {err}", path.display()))
        })
    };
    let mut options = etcd_client::TlsOptions::new();
    if let Some(ca) = &config.ca_file {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read("ca_file", ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        options = options.identity(etcd_client::Identity::from_pem(
            read("cert_file", cert)?,
            read("key_file", key)?,
        ));
    }
    Ok(options)
}
