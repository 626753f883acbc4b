//! Fleet mode's follower (`[cluster]`, issue #14 in progress): connects to etcd, lists the
//! fleet's allocations and applies them, then applies every change the watch brings; a
//! compaction, a lost watch or an unreachable etcd makes it list again, after a pause
//! that grows to [`MAX_PAUSE`]. The node's liveness key is written after each list.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::{
    config::{ClusterConfig, Config},
    fleet::{Fleet, FleetError, Liveness, NodeInfo},
    manager::{ErrorSource, PortManager, fleet::FleetLink},
    model::now_millis,
    text::Chain,
};

/// The longest pause between two attempts to reach etcd.
pub const MAX_PAUSE: Duration = Duration::from_secs(10);

/// The first pause, and the one after a list was applied.
const FIRST_PAUSE: Duration = Duration::from_millis(250);

/// Joins the fleet when `[cluster]` asks for it: the manager refuses changes to the
/// host's ports until the follower has connected, and the follower runs on a task.
pub fn spawn_fleet(
    tasks: &mut tokio::task::JoinSet<()>,
    manager: &Arc<PortManager>,
    config: &Config,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let Some(cluster) = config.cluster.clone() else {
        return Ok(());
    };
    let node = cluster
        .node_name()
        .context("naming this node in the fleet")?;
    manager.expect_fleet();
    log::info!(
        "fleet mode: node {node} on etcd {}, ports {}-{}",
        cluster.etcd.join(", "),
        config.ports.min_port,
        config.ports.max_port
    );
    tasks.spawn(follow(
        Arc::clone(manager),
        cluster,
        node,
        (config.ports.min_port, config.ports.max_port),
        shutdown.clone(),
    ));
    Ok(())
}

/// Connects (again and again until it can), then lists and watches until `shutdown`.
async fn follow(
    manager: Arc<PortManager>,
    cluster: ClusterConfig,
    node: String,
    range: (u16, u16),
    mut shutdown: watch::Receiver<bool>,
) {
    let mut pause = FIRST_PAUSE;
    let link = loop {
        match Fleet::connect(&cluster, &node, range).await {
            Ok(fleet) => break fleet,
            Err(err) => {
                manager.monitor().record_error(ErrorSource::Fleet);
                log::warn!("connecting to the fleet's etcd: {err}; trying again");
            }
        }
        if wait(&mut shutdown, &mut pause).await {
            return;
        }
    };
    if let Err(err) = manager.join_fleet(FleetLink::new(link)) {
        manager.monitor().record_error(ErrorSource::Fleet);
        log::error!("joining the fleet: {}", Chain(&err));
        return;
    }
    let Some(link) = manager.fleet_link() else {
        return;
    };
    let mut liveness: Option<Liveness> = None;
    loop {
        let round = follow_once(&manager, link.fleet(), &cluster, &mut liveness, &mut pause);
        tokio::select! {
            result = round => {
                if let Err(err) = result {
                    manager.monitor().record_error(ErrorSource::Fleet);
                    log::warn!("following the fleet: {err}; listing again");
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        if wait(&mut shutdown, &mut pause).await {
            return;
        }
    }
}

/// Lists, applies, renews the liveness key, then applies the watch's changes until it
/// fails.
async fn follow_once(
    manager: &PortManager,
    fleet: &Fleet,
    cluster: &ClusterConfig,
    liveness: &mut Option<Liveness>,
    pause: &mut Duration,
) -> Result<(), FleetError> {
    // The liveness key first: a node that reaches etcd is alive, whatever its list does.
    if liveness.is_none() {
        let info = NodeInfo {
            node: fleet.node().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            joined_at: now_millis(),
        };
        *liveness = Some(fleet.join(cluster.lease, &info).await?);
    }
    let snapshot = fleet.list().await?;
    let revision = snapshot.revision;
    manager
        .sync_fleet(snapshot)
        .await
        .map_err(|err| FleetError::Etcd(format!("applying the fleet's list: {}", Chain(&err))))?;
    log::info!("fleet: applied everything up to revision {revision}");
    *pause = FIRST_PAUSE;
    let mut watch = fleet.watch(revision + 1).await?;
    loop {
        let events = watch.next().await?;
        manager.apply_fleet(events).await.map_err(|err| {
            FleetError::Etcd(format!("applying the fleet's change: {}", Chain(&err)))
        })?;
    }
}

/// Waits `pause` (then doubles it, up to [`MAX_PAUSE`]); `true` when `shutdown` came first.
async fn wait(shutdown: &mut watch::Receiver<bool>, pause: &mut Duration) -> bool {
    let stop = tokio::select! {
        () = tokio::time::sleep(*pause) => false,
        _ = shutdown.wait_for(|stop| *stop) => true,
    };
    *pause = (*pause * 2).min(MAX_PAUSE);
    stop
}
