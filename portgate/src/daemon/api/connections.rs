//! The API's connections: a bounded accept loop in front of the router, for the Unix
//! socket and for the metrics address.
//!
//! `axum::serve` takes every connection and waits on each as long as its client likes: a
//! local user could hold every descriptor of the daemon, or keep its connections half-sent
//! forever. Here a connection is taken only while its holder has room, and is closed when
//! its client is too slow:
//!
//! - at most [`Limits::total`] connections on the socket at once; a uid other than root at
//!   most [`Limits::per_user`], and those uids together at most [`Limits::users`], so that
//!   a quarter is always left to root: no user, nor all of them at once, locks root out;
//! - the metrics address (no credentials) at most [`MAX_METRICS_CONNECTIONS`], counted
//!   apart from the socket's;
//! - a request head must have arrived [`HEADER_TIMEOUT`] after the connection was made or
//!   its last answer written (so an idle keep-alive connection is closed then), and may have
//!   at most [`MAX_HEAD_BYTES`]; a body must have arrived [`BODY_TIMEOUT`] after its head;
//!   an answer whose writing makes no progress for [`WRITE_TIMEOUT`] (a client that does not
//!   read) closes the connection.
//!
//! A connection over a limit is answered `503 too_many_connections` once its request head
//! has arrived (its body is never read) and closed, so it changes nothing; while
//! [`REFUSALS_AT_ONCE`] refusals are under way, one more is closed unanswered. Every connection refused or cut is counted in
//! `portgate_api_connections_cut_total{reason}`, beside `portgate_api_connections` (open)
//! and `portgate_api_connections_limit` ([`Limits::total`]).
//! Root counts as root only: an admin group member shares the users' limits (telling a
//! member apart reads the group database, which is not done for every connection).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{body::Body, extract::ConnectInfo, http::Request};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

pub use super::serve::{serve_metrics, serve_socket};
use crate::daemon::auth::Peer;

/// Connections the socket takes at once, at most (fewer when the open-file limit is low:
/// see [`Limits::fitted`]).
pub const MAX_CONNECTIONS: usize = 2048;
/// Connections one uid other than root holds at once, at most.
pub const MAX_CONNECTIONS_PER_USER: usize = 64;
/// Connections the metrics address takes at once, at most (anyone on the host can reach it).
pub const MAX_METRICS_CONNECTIONS: usize = 64;
/// Descriptors kept for everything but connections (maps, store, namespaces, logs).
pub const FD_HEADROOM: usize = 1024;
/// The fewest connections the socket takes, however low the open-file limit.
const MIN_CONNECTIONS: usize = 16;
/// How long a request head may take to arrive, from the connection or the last answer.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request body may take to arrive, from its head (at most
/// [`MAX_BODY_BYTES`](crate::api::MAX_BODY_BYTES) over a local socket).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing an answer may make no progress before the connection is closed.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head (request line and headers) taken; a larger one is answered 431.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Reads of the whole daemon (every allocation, every kernel map) that callers other than
/// root run at once: each holds the manager's lock for as long as its walk takes, so one
/// user's many connections must not queue many walks ahead of every other request.
pub const WHOLE_READS_AT_ONCE: usize = 2;
/// Refused connections answered 503 at once (each once its request head has arrived); past
/// that a refused connection is closed unanswered.
pub const REFUSALS_AT_ONCE: usize = 64;
/// How long a refused connection's request head is waited for.
pub const REFUSAL_LINGER: Duration = Duration::from_secs(1);
/// How long the accept loop waits after an accept fails (out of descriptors, say).
pub(super) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How many connections are taken at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// On the socket, everyone together (root may hold them all).
    pub total: usize,
    /// On the socket, by one uid other than root.
    pub per_user: usize,
    /// On the socket, by every uid other than root together.
    pub users: usize,
    /// On the metrics address.
    pub metrics: usize,
}

impl Limits {
    /// The limits for a daemon that may open `descriptors` files: the defaults, or fewer
    /// connections when the socket's and the metrics' would not leave [`FD_HEADROOM`].
    #[must_use]
    pub fn fitted(descriptors: u64) -> Self {
        let descriptors = usize::try_from(descriptors).unwrap_or(usize::MAX);
        let room = descriptors.saturating_sub(FD_HEADROOM + MAX_METRICS_CONNECTIONS);
        let total = room.clamp(MIN_CONNECTIONS, MAX_CONNECTIONS);
        let users = total - total / 4;
        Self {
            total,
            per_user: MAX_CONNECTIONS_PER_USER.min(users),
            users,
            metrics: MAX_METRICS_CONNECTIONS,
        }
    }
}

/// Raises the daemon's soft open-file limit as far as the connections need (never above the
/// hard limit), and gives back the limit in force.
#[must_use]
pub fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let wanted = (MAX_CONNECTIONS + MAX_METRICS_CONNECTIONS + FD_HEADROOM) as u64;
    if soft >= wanted {
        return soft;
    }
    let raised = wanted.min(hard);
    match setrlimit(Resource::RLIMIT_NOFILE, raised, hard) {
        Ok(()) => raised,
        Err(err) => {
            log::warn!("raising the open-file limit to {raised}: {err}");
            soft
        }
    }
}

/// Who holds a connection, for the limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Holder {
    /// uid 0 on the socket.
    Root,
    /// Any other uid on the socket (`None`: credentials unreadable).
    User(Option<u32>),
    /// A client of the metrics address.
    Metrics,
}

impl Holder {
    pub(super) fn of(peer: &Peer) -> Self {
        match peer.uid {
            Some(0) => Self::Root,
            uid => Self::User(uid),
        }
    }
}

/// Why a connection was refused or cut (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cut {
    /// The socket had [`Limits::total`] connections.
    TotalLimit,
    /// Its uid had [`Limits::per_user`], or the users together [`Limits::users`].
    UserLimit,
    /// The metrics address had [`Limits::metrics`].
    MetricsLimit,
    /// No whole request head within [`HEADER_TIMEOUT`] (idle keep-alive included).
    HeaderTimeout,
    /// No whole body within [`BODY_TIMEOUT`].
    BodyTimeout,
    /// An answer not read for [`WRITE_TIMEOUT`].
    WriteTimeout,
}

impl Cut {
    pub(super) const fn name(self) -> &'static str {
        match self {
            Self::TotalLimit => "total_limit",
            Self::UserLimit => "user_limit",
            Self::MetricsLimit => "metrics_limit",
            Self::HeaderTimeout => "header_timeout",
            Self::BodyTimeout => "body_timeout",
            Self::WriteTimeout => "write_timeout",
        }
    }
}

/// The `reason` label of `portgate_api_connections_cut_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CutLabel {
    reason: &'static str,
}

/// Connections open, by holder.
#[derive(Debug, Default)]
struct Open {
    /// On the socket, everyone.
    total: usize,
    /// On the socket, every uid but root.
    users: usize,
    per_user: HashMap<Option<u32>, usize>,
    metrics: usize,
}

/// The connections the API holds, their limits and their metrics.
#[derive(Debug)]
pub struct ApiConnections {
    limits: Limits,
    open: Mutex<Open>,
    registry: Registry,
    open_gauge: Gauge,
    cut: Family<CutLabel, Counter>,
    /// The turns of [`WHOLE_READS_AT_ONCE`].
    whole_reads: tokio::sync::Semaphore,
    /// The turns of [`REFUSALS_AT_ONCE`].
    pub(super) refusing: Arc<tokio::sync::Semaphore>,
}

impl ApiConnections {
    /// No connection yet, with `limits`.
    #[must_use]
    pub fn new(limits: Limits) -> Arc<Self> {
        let mut registry = Registry::with_prefix("portgate");
        let open_gauge = Gauge::default();
        registry.register(
            "api_connections",
            "Connections open on the API socket",
            open_gauge.clone(),
        );
        // A constant, but the limit in force is lowered when the open-file limit is low
        // (see [`Limits::fitted`]): an alert on the open connections needs it.
        let limit_gauge = Gauge::<i64>::default();
        limit_gauge.set(gauge_value(limits.total));
        registry.register(
            "api_connections_limit",
            "The most connections the API socket takes at once (fewer than 2048 when the open-file limit is low)",
            limit_gauge,
        );
        let cut = Family::<CutLabel, Counter>::default();
        registry.register(
            "api_connections_cut",
            "API connections refused (over a connection limit) or closed (a client too slow), by reason",
            cut.clone(),
        );
        Arc::new(Self {
            limits,
            open: Mutex::new(Open::default()),
            registry,
            open_gauge,
            cut,
            whole_reads: tokio::sync::Semaphore::new(WHOLE_READS_AT_ONCE),
            refusing: Arc::new(tokio::sync::Semaphore::new(REFUSALS_AT_ONCE)),
        })
    }

    /// The limits in force.
    #[must_use]
    pub const fn limits(&self) -> Limits {
        self.limits
    }

    /// A place for one more connection of `holder`, or why there is none.
    pub(super) fn take(self: &Arc<Self>, holder: Holder) -> Result<Slot, Cut> {
        let limits = self.limits;
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        match holder {
            Holder::Metrics if open.metrics >= limits.metrics => return Err(Cut::MetricsLimit),
            Holder::Metrics => open.metrics += 1,
            _ if open.total >= limits.total => return Err(Cut::TotalLimit),
            Holder::Root => open.total += 1,
            Holder::User(uid) => {
                let held = open.per_user.get(&uid).copied().unwrap_or(0);
                if held >= limits.per_user || open.users >= limits.users {
                    return Err(Cut::UserLimit);
                }
                open.per_user.insert(uid, held + 1);
                open.users += 1;
                open.total += 1;
            }
        }
        self.open_gauge.set(gauge_value(open.total));
        Ok(Slot {
            connections: Arc::clone(self),
            holder,
        })
    }

    /// Gives back the place of a connection of `holder` that closed.
    fn give_back(&self, holder: Holder) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        match holder {
            Holder::Metrics => open.metrics -= 1,
            Holder::Root => open.total -= 1,
            Holder::User(uid) => {
                if let Some(held) = open.per_user.get_mut(&uid) {
                    *held -= 1;
                    if *held == 0 {
                        open.per_user.remove(&uid);
                    }
                }
                open.users -= 1;
                open.total -= 1;
            }
        }
        self.open_gauge.set(gauge_value(open.total));
    }

    /// Counts a connection refused or cut.
    pub(super) fn count(&self, cut: Cut) {
        self.cut
            .get_or_create(&CutLabel { reason: cut.name() })
            .inc();
    }

    /// `text` (a Prometheus exposition ending in `# EOF`) with these metrics added.
    #[must_use]
    pub fn append_metrics(&self, mut text: String) -> String {
        if let Some(body) = text.strip_suffix("# EOF\n") {
            text.truncate(body.len());
        }
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            log::warn!("encoding the API connection metrics: {err}");
        }
        text
    }
}

/// Middleware: a request of a caller other than root that reads the whole daemon waits for
/// one of the [`WHOLE_READS_AT_ONCE`] turns (tokio's semaphore serves them in order).
pub async fn pace_whole_reads(
    axum::extract::State(connections): axum::extract::State<Arc<ApiConnections>>,
    request: Request<Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let root = request
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .is_some_and(|ConnectInfo(peer)| peer.uid == Some(0));
    if root || !reads_everything(&request) {
        return next.run(request).await;
    }
    let _turn = connections.whole_reads.acquire().await.ok();
    next.run(request).await
}

/// Whether `request` reads every allocation or every kernel map under the manager's lock.
fn reads_everything(request: &Request<Body>) -> bool {
    let uri = request.uri();
    request.method() == axum::http::Method::GET
        && match uri.path() {
            "/v1/ports" | "/v1/status" | "/v1/events" | "/metrics" => true,
            "/v1/stats" => !uri
                .query()
                .is_some_and(|query| query.split('&').any(|pair| pair.starts_with("port="))),
            _ => false,
        }
}

fn gauge_value(open: usize) -> i64 {
    i64::try_from(open).unwrap_or(i64::MAX)
}

/// One connection's place; given back when it is dropped.
pub(super) struct Slot {
    connections: Arc<ApiConnections>,
    holder: Holder,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections.give_back(self.holder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_fit_the_open_file_limit() {
        let roomy = Limits::fitted(1 << 20);
        assert_eq!(roomy.total, MAX_CONNECTIONS);
        assert_eq!(roomy.users, MAX_CONNECTIONS * 3 / 4);
        assert_eq!(roomy.per_user, MAX_CONNECTIONS_PER_USER);
        let tight = Limits::fitted(1024 + 64 + 100);
        assert_eq!(tight.total, 100);
        assert_eq!(tight.users, 75);
        assert_eq!(Limits::fitted(0).total, MIN_CONNECTIONS);
    }

    #[test]
    fn a_user_never_takes_roots_share() {
        let limits = Limits {
            total: 8,
            per_user: 3,
            users: 6,
            metrics: 1,
        };
        let connections = ApiConnections::new(limits);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connections.take(Holder::User(Some(1000))).expect("room"));
        }
        assert_eq!(
            connections.take(Holder::User(Some(1000))).err(),
            Some(Cut::UserLimit)
        );
        for _ in 0..3 {
            held.push(connections.take(Holder::User(Some(1001))).expect("room"));
        }
        // The users together have their share: a third user waits, root does not.
        assert_eq!(
            connections.take(Holder::User(Some(1002))).err(),
            Some(Cut::UserLimit)
        );
        held.push(connections.take(Holder::Root).expect("root's share"));
        held.push(connections.take(Holder::Root).expect("root's share"));
        assert_eq!(connections.take(Holder::Root).err(), Some(Cut::TotalLimit));
        // Metrics are counted apart.
        let metrics = connections.take(Holder::Metrics).expect("room");
        assert_eq!(
            connections.take(Holder::Metrics).err(),
            Some(Cut::MetricsLimit)
        );
        drop(metrics);
        // A connection that closes gives its place back.
        held.remove(0);
        held.push(
            connections
                .take(Holder::User(Some(1002)))
                .expect("room again"),
        );
        drop(held);
        let open = connections.open.lock().unwrap();
        assert_eq!((open.total, open.users, open.metrics), (0, 0, 0));
        assert!(open.per_user.is_empty());
    }

    #[test]
    fn metrics_are_added_before_the_end_of_the_exposition() {
        let connections = ApiConnections::new(Limits::fitted(1 << 20));
        connections.count(Cut::WriteTimeout);
        let text =
            connections.append_metrics("# HELP x X.\n# TYPE x gauge\nx 1\n# EOF\n".to_owned());
        assert!(
            text.starts_with("# HELP x X.\n# TYPE x gauge\nx 1\n# HELP portgate_api"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(
            text.contains("portgate_api_connections_cut_total{reason=\"write_timeout\"} 1"),
            "{text}"
        );
        assert!(text.contains("portgate_api_connections 0"), "{text}");
    }
}
