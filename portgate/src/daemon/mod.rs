//! `portgate daemon`: owns the store and the kernel maps, serves the local API on a Unix
//! socket and the Prometheus metrics, runs the lifecycle timers and reads deny events.
//!
//! Start-up: read the configuration; install (or adopt) the kernel gate and attach it to the
//! configured cgroup and XDP interfaces; reserve the managed range from the kernel's
//! ephemeral ports; open the store and make the kernel maps equal to it; then serve and tell
//! systemd it is ready. SIGTERM and SIGINT stop serving and leave enforcement in place (the
//! pins); `portgate uninstall` takes it away.

pub mod api;
pub mod audit;
pub mod auth;
pub mod fleet;
mod gate_watch;
pub mod knock;

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use tokio::{
    net::{TcpListener, UnixListener},
    signal::unix::{SignalKind, signal},
    sync::watch,
};

use self::{audit::AuditLog, auth::AdminGroup};
use crate::{
    config::{CgroupTarget, Config},
    gate::{self, Gate, GateSettings, KernelLog},
    host::{
        self,
        sockets::{CachedSockets, ProcfsSockets},
    },
    manager::{self, ErrorSource, PortManager, StartReport},
    paths,
    store::{RedbStore, Store, StoredState},
    text::Chain,
};

/// How often the lifecycle timers are checked (leases, drains, quarantine): a step is taken
/// at most this long after it is due.
pub const LIFECYCLE_PERIOD: Duration = Duration::from_millis(200);

/// How long one read of the socket tables serves range scans (see [`CachedSockets`]).
pub const SOCKET_SNAPSHOT_AGE: Duration = Duration::from_millis(250);

/// How long shutdown waits for open requests (an `events -f` stream ends at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What the API handlers share.
pub struct App {
    /// The port manager.
    pub manager: Arc<PortManager>,
    /// The audit log.
    pub audit: AuditLog,
    /// The admin group.
    pub admin: AdminGroup,
    /// When the daemon started.
    pub started: Instant,
    /// The configuration it runs with.
    pub config: Config,
    /// Configuration and host warnings.
    pub warnings: Vec<String>,
    /// What start-up found.
    pub start_report: StartReport,
    /// Becomes `true` at shutdown (ends event streams).
    pub shutdown: watch::Receiver<bool>,
    /// The API's connections, their limits and metrics.
    pub connections: Arc<api::connections::ApiConnections>,
}

/// The configuration at `path` (or the default file, which may be missing).
fn load_config(path: Option<PathBuf>) -> anyhow::Result<(Config, Vec<String>)> {
    let explicit = path.is_some();
    let path = path.unwrap_or_else(|| PathBuf::from(paths::DEFAULT_CONFIG));
    let config = Config::load_or_default(&path, explicit)?;
    let warnings = config.validate()?;
    Ok((config, warnings))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, warnings) = load_config(config)?;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(serve(config, warnings))
}

/// The cgroup the daemon attaches to.
fn attach_cgroup(config: &Config) -> anyhow::Result<PathBuf> {
    match &config.daemon.cgroup {
        CgroupTarget::Auto => Ok(host::cgroups::root()?),
        CgroupTarget::Path(path) => Ok(path.clone()),
    }
}

async fn serve(config: Config, mut warnings: Vec<String>) -> anyhow::Result<()> {
    let started = Instant::now();
    // Before anything is changed, so that a signal during start-up is a clean stop too.
    let mut terminate = signal(SignalKind::terminate()).context("handling SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("handling SIGINT")?;
    let ports = &config.ports;
    let daemon = &config.daemon;
    let pin_lock = claim_host(daemon)?;
    // The store next: its file lock keeps a second daemon out, and what it holds must fit
    // the configuration before the gate's range or policies are touched.
    let (store, stored, store_path) = open_store(&config)?;
    let (gate, installed) = install_gate(&config)?;
    let (manager, start_report) = open_manager(&config, &store, stored, gate, &mut warnings)?;
    for warning in manager.reserve_ephemeral().await? {
        log::warn!("{warning}");
        warnings.push(warning);
    }

    let audit = open_audit(daemon, &manager)?;
    let admin = AdminGroup::resolve(&daemon.admin_group);
    let connections = open_connections();
    let listener = bind_socket(&daemon.socket, daemon.socket_mode.bits(), &admin)?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let app = Arc::new(App {
        manager: Arc::clone(&manager),
        audit,
        admin,
        started,
        config: config.clone(),
        warnings,
        start_report,
        shutdown: shutdown_rx.clone(),
        connections,
    });

    let mut tasks = tokio::task::JoinSet::new();
    let store_failed = Arc::new(tokio::sync::Notify::new());
    tasks.spawn(run_lifecycle_timers(
        Arc::clone(&manager),
        shutdown_rx.clone(),
        Arc::clone(&store_failed),
    ));
    let cgroup = spawn_kernel_readers(&mut tasks, &manager, installed, &shutdown_rx);
    let watched = (daemon.pin_dir.clone(), Arc::clone(&pin_lock));
    tasks.spawn(gate_watch::watch_gate(
        Arc::clone(&manager),
        cgroup.clone(),
        watched,
        shutdown_rx.clone(),
    ));
    // The metrics address first: if it cannot be bound, no request has been taken yet.
    let metrics_server = spawn_metrics(&app, daemon.metrics_listen, shutdown_rx.clone()).await?;
    spawn_knock_listener(&mut tasks, &app, &shutdown_rx).await?;
    fleet::spawn_fleet(&mut tasks, &manager, &config, &shutdown_rx)?;
    let api_server = spawn_api(listener, &app, shutdown_rx.clone());

    if let Err(err) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        log::warn!("telling systemd the daemon is ready: {err}");
    }
    log::info!(
        "portgate daemon ready: ports {}-{}, socket {}, cgroup {}",
        ports.min_port,
        ports.max_port,
        daemon.socket.display(),
        cgroup.display()
    );

    let failed = tokio::select! {
        _ = terminate.recv() => false,
        _ = interrupt.recv() => false,
        () = store_failed.notified() => true,
    };
    if failed {
        log::error!(
            "the store refused a change: stopping, so that a restart makes the kernel maps equal to the store"
        );
    } else {
        log::info!("shutting down on a signal; enforcement stays in place");
    }
    let _ignored = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ignored = shutdown_tx.send(true);
    stop_serving(api_server, metrics_server, tasks).await;
    let _removed = fs::remove_file(&daemon.socket);
    drop(app);
    drop(manager);
    store.shutdown();
    if failed {
        bail!(
            "the store at {} refused a change: check its disk space and permissions, then start the daemon again (systemd restarts it)",
            store_path.display()
        );
    }
    Ok(())
}

/// Checks the daemon's privileges and that no other daemon serves its socket or pin
/// directory, before anything is touched: a second daemon reconciling the kernel maps would
/// undo the first one's work. Returns the pin directory's lock, held until exit.
fn claim_host(daemon: &crate::config::DaemonConfig) -> anyhow::Result<gate_watch::PinLock> {
    let missing = host::kernel::missing_capabilities();
    if !missing.is_empty() {
        bail!(
            "the daemon needs {}: run it as root (or under the systemd unit in dist/)",
            missing.join(", ")
        );
    }
    refuse_a_second_daemon(&daemon.socket)?;
    // One daemon per pin directory, whatever its socket and store.
    host::mounts::prepare_pin_dir(&daemon.pin_dir)?;
    Ok(Arc::new(std::sync::Mutex::new(lock_pin_dir(
        &daemon.pin_dir,
    )?)))
}

/// Opens the audit log with its rotation, its failures counted by the manager's monitor.
fn open_audit(
    daemon: &crate::config::DaemonConfig,
    manager: &PortManager,
) -> anyhow::Result<AuditLog> {
    AuditLog::open(
        &daemon.audit_log,
        audit::Rotation {
            max_bytes: daemon.audit_max_bytes,
            keep: daemon.audit_keep,
        },
        manager.monitor().error_counter(ErrorSource::Audit),
    )
    .with_context(|| format!("opening the audit log {}", daemon.audit_log.display()))
}

/// Waits (bounded) for the servers to finish what they are answering, and stops the tasks.
async fn stop_serving(
    api_server: tokio::task::JoinHandle<std::io::Result<()>>,
    metrics_server: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    mut tasks: tokio::task::JoinSet<()>,
) {
    if tokio::time::timeout(SHUTDOWN_GRACE, api_server)
        .await
        .is_err()
    {
        log::warn!("API requests still open after {SHUTDOWN_GRACE:?}: closing them");
    }
    if let Some(server) = metrics_server {
        let _ignored = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

/// The manager over the store and the gate (kernel maps made equal to the store), with
/// what start-up found logged and listeners no allocation explains added to `warnings`.
fn open_manager(
    config: &Config,
    store: &Arc<RedbStore>,
    stored: StoredState,
    gate: Gate,
    warnings: &mut Vec<String>,
) -> anyhow::Result<(Arc<PortManager>, StartReport)> {
    let (manager, start_report) = PortManager::open(
        config.ports.clone(),
        Arc::clone(store) as Arc<dyn Store>,
        stored,
        Some(gate),
        Arc::new(CachedSockets::new(ProcfsSockets, SOCKET_SNAPSHOT_AGE)),
    )?;
    log::info!(
        "restored {} allocations; removed {} stale kernel policies",
        start_report.restored,
        start_report.stale_policies_removed
    );
    for listener in &start_report.unexplained_listeners {
        let warning = format!(
            "{}/{} has a listener (uid {}, {}) that no allocation explains",
            listener.port, listener.protocol, listener.uid, listener.addr
        );
        log::warn!("{warning}");
        warnings.push(warning);
    }
    Ok((Arc::new(manager), start_report))
}

/// The API's connection limits, fitted to the open-file limit (raised first as far as they
/// need).
fn open_connections() -> Arc<api::connections::ApiConnections> {
    use api::connections::{ApiConnections, Limits, MAX_CONNECTIONS, raise_open_file_limit};
    let descriptors = raise_open_file_limit();
    let limits = Limits::fitted(descriptors);
    if limits.total < MAX_CONNECTIONS {
        log::warn!(
            "the open-file limit is {descriptors}: the API takes {} connections at once rather than {MAX_CONNECTIONS} (raise LimitNOFILE)",
            limits.total
        );
    }
    ApiConnections::new(limits)
}

/// Serves the API on the socket until shutdown.
fn spawn_api(
    listener: UnixListener,
    app: &Arc<App>,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<std::io::Result<()>> {
    let router = api::router(Arc::clone(app)).layer(axum::middleware::from_fn_with_state(
        Arc::clone(&app.connections),
        api::connections::pace_whole_reads,
    ));
    tokio::spawn(api::connections::serve_socket(
        listener,
        router,
        Arc::clone(&app.connections),
        shutdown,
    ))
}

/// Serves `GET /metrics` on `address` (nothing when it is `None`).
async fn spawn_metrics(
    app: &Arc<App>,
    address: Option<SocketAddr>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(address) = address else {
        return Ok(None);
    };
    let tcp = TcpListener::bind(address)
        .await
        .with_context(|| format!("listening on {address} for metrics"))?;
    let router = api::metrics_router(Arc::clone(app)).layer(axum::middleware::from_fn_with_state(
        Arc::clone(&app.connections),
        api::connections::pace_whole_reads,
    ));
    Ok(Some(tokio::spawn(api::connections::serve_metrics(
        tcp,
        router,
        Arc::clone(&app.connections),
        shutdown,
    ))))
}

/// What [`install_gate`] gives the daemon besides the gate.
struct Installed {
    cgroup: PathBuf,
    events: gate::DenyEvents,
    /// The kernel's diagnostic lines, when `daemon.kernel_log` asks for them.
    kernel_log: Option<KernelLog<&'static dyn log::Log>>,
}

/// Installs (or adopts) the kernel gate and attaches it where the configuration says.
fn install_gate(config: &Config) -> anyhow::Result<(Gate, Installed)> {
    let daemon = &config.daemon;
    let mut gate = Gate::install(&GateSettings {
        pin_dir: daemon.pin_dir.clone(),
        min_port: config.ports.min_port,
        max_port: config.ports.max_port,
        ..GateSettings::default()
    })
    .with_context(|| format!("installing the kernel gate in {}", daemon.pin_dir.display()))?;
    let cgroup = attach_cgroup(config)?;
    gate.attach_cgroup(&cgroup)
        .with_context(|| format!("attaching to cgroup {}", cgroup.display()))?;
    for interface in &daemon.xdp_interfaces {
        gate.attach_xdp(
            interface,
            crate::model::NetnsId::HOST,
            aya::programs::XdpMode::default(),
        )
        .with_context(|| format!("attaching XDP to {interface}"))?;
    }
    let events = gate.events().context("opening the deny-event stream")?;
    let kernel_log = if daemon.kernel_log {
        Some(
            gate.kernel_log(log::logger())
                .context("starting the kernel's diagnostic lines (daemon.kernel_log)")?,
        )
    } else {
        None
    };
    Ok((
        gate,
        Installed {
            cgroup,
            events,
            kernel_log,
        },
    ))
}

/// Takes an exclusive lock on the pin directory, failing at once when a daemon holds it.
fn lock_pin_dir(pin_dir: &Path) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
    let dir = fs::File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                anyhow::anyhow!(
                    "another portgate daemon is using the pins in {}: stop it first",
                    pin_dir.display()
                )
            } else {
                anyhow::anyhow!("locking {}: {errno}", pin_dir.display())
            }
        },
    )
}

/// Opens the store in the state directory (made root's alone when it is made here: the
/// store holds client keys' secrets) and reads it, refusing a lost one over enforced pins,
/// a damaged one, and one the configuration no longer fits.
fn open_store(config: &Config) -> anyhow::Result<(Arc<RedbStore>, StoredState, PathBuf)> {
    let daemon = &config.daemon;
    std::os::unix::fs::DirBuilderExt::mode(fs::DirBuilder::new().recursive(true), 0o700)
        .create(&daemon.state_dir)
        .with_context(|| format!("creating {}", daemon.state_dir.display()))?;
    let store_path = daemon.state_dir.join(paths::STORE_FILE);
    refuse_a_lost_store(&store_path, &daemon.pin_dir)?;
    let store = Arc::new(RedbStore::open(&store_path)?);
    let stored = store.load().with_context(|| {
        format!(
            "reading {}: restore it from a backup (the kernel keeps enforcing the ports it held meanwhile), or move it aside and run `portgate uninstall` before starting afresh",
            store_path.display()
        )
    })?;
    manager::validate_stored(&config.ports, &stored).with_context(|| {
        format!(
            "checking {} against the configuration",
            store_path.display()
        )
    })?;
    Ok((store, stored, store_path))
}

/// Refuses to start with a new store (its file missing, or empty: redb would make a new
/// database in it) while the gate pinned under `pin_dir` enforces ports: the new store
/// would not hold them, and making the kernel equal to it would free them all, to be handed
/// to others while their owners still use them.
fn refuse_a_lost_store(store: &Path, pin_dir: &Path) -> anyhow::Result<()> {
    let new = match fs::metadata(store) {
        Ok(found) => found.len() == 0,
        Err(err) => err.kind() == std::io::ErrorKind::NotFound,
    };
    if !new {
        return Ok(());
    }
    // No gate (or one of another layout, which installing reports): nothing enforced.
    let Ok(gate) = Gate::open(pin_dir) else {
        return Ok(());
    };
    let enforced = gate
        .policies()
        .with_context(|| format!("reading the policies pinned in {}", pin_dir.display()))?
        .len();
    if enforced > 0 {
        bail!(
            "the store {} is missing or empty, but the kernel enforces {enforced} ports that an earlier run allocated (pinned in {}): an empty store would free them all. Restore the store from a backup, or run `portgate uninstall` (which takes those ports out of the kernel) to start afresh",
            store.display(),
            pin_dir.display()
        );
    }
    Ok(())
}

/// Fails when a daemon answers on `socket`.
fn refuse_a_second_daemon(socket: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        bail!(
            "another portgate daemon is serving {}: stop it first",
            socket.display()
        );
    }
    Ok(())
}

/// Binds the API socket: a stale socket file is replaced, a live one (another daemon) is
/// an error. The socket gets `mode` and the admin group.
fn bind_socket(path: &Path, mode: u32, admin: &AdminGroup) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    refuse_a_second_daemon(path)?;
    if path.exists() {
        fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("listening on {}", path.display()))?;
    if let Some(gid) = admin.gid() {
        nix::unistd::chown(path, None, Some(gid))
            .with_context(|| format!("giving {} to group {}", path.display(), admin.name()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    Ok(listener)
}

/// Takes the lifecycle steps as they fall due, and says when the store has failed.
async fn run_lifecycle_timers(
    manager: Arc<PortManager>,
    mut shutdown: watch::Receiver<bool>,
    store_failed: Arc<tokio::sync::Notify>,
) {
    let mut interval = tokio::time::interval(LIFECYCLE_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        match manager.tick().await {
            Ok(steps) => {
                for step in steps {
                    log::info!("lifecycle: {step}");
                }
            }
            Err(err) => log::error!("lifecycle: {}", Chain(&err)),
        }
        if manager.store_failed() {
            store_failed.notify_one();
            return;
        }
    }
}

/// Spawns the readers of what the kernel reports (deny events, and its diagnostic lines
/// when asked for); gives back the cgroup the gate is attached to.
fn spawn_kernel_readers(
    tasks: &mut tokio::task::JoinSet<()>,
    manager: &Arc<PortManager>,
    installed: Installed,
    shutdown: &watch::Receiver<bool>,
) -> PathBuf {
    tasks.spawn(read_events(
        Arc::clone(manager),
        installed.events,
        shutdown.clone(),
    ));
    if let Some(kernel_log) = installed.kernel_log {
        tasks.spawn(forward_kernel_log(kernel_log, shutdown.clone()));
    }
    installed.cgroup
}

/// Reads deny events from the kernel into the monitor.
async fn read_events(
    manager: Arc<PortManager>,
    mut events: gate::DenyEvents,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            event = events.next() => match event {
                Ok(event) => manager.monitor().record_event(event),
                Err(err) => {
                    manager.monitor().record_error(ErrorSource::Kernel);
                    log::error!(
                        "reading deny events: {}; no more events will be read",
                        Chain(&err)
                    );
                    return;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Binds the knock listener when `[auth] listen` asks for one, and serves it.
async fn spawn_knock_listener(
    tasks: &mut tokio::task::JoinSet<()>,
    app: &Arc<App>,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let auth = &app.config.auth;
    let Some(listen) = auth.listen else {
        return Ok(());
    };
    app.manager.set_knock_window(auth.window).await;
    let socket = tokio::net::UdpSocket::bind(listen)
        .await
        .with_context(|| format!("binding the knock listener to {listen} (auth.listen)"))?;
    log::info!("taking knocks on udp {listen}");
    tasks.spawn(knock::serve(Arc::clone(app), socket, shutdown.clone()));
    Ok(())
}

/// Hands the kernel's diagnostic lines to the daemon's log as they come.
async fn forward_kernel_log(
    kernel_log: KernelLog<&'static dyn log::Log>,
    mut shutdown: watch::Receiver<bool>,
) {
    tokio::select! {
        Err(err) = kernel_log.forward() => {
            log::error!(
                "reading the kernel's diagnostic lines: {}; no more will be read",
                Chain(&err)
            );
        }
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// `portgate uninstall`: detaches and unpins the kernel gate and gives back the reserved
/// ports portgate added. The store (allocations) is kept in the state directory.
pub fn uninstall(config: Option<PathBuf>) -> anyhow::Result<()> {
    let (config, _) = load_config(config)?;
    let daemon = &config.daemon;
    if daemon.socket.exists() && std::os::unix::net::UnixStream::connect(&daemon.socket).is_ok() {
        bail!(
            "the daemon is running ({}): stop it first (systemctl stop portgate)",
            daemon.socket.display()
        );
    }
    let _pin_lock = if daemon.pin_dir.exists() {
        Some(lock_pin_dir(&daemon.pin_dir)?)
    } else {
        None
    };
    let store_path = daemon.state_dir.join(paths::STORE_FILE);
    if store_path.exists() {
        let store = RedbStore::open(&store_path)?;
        manager::give_back_reserved_ports(&store)?;
        store.shutdown();
    }
    if daemon.pin_dir.exists() {
        gate::uninstall(&daemon.pin_dir)
            .with_context(|| format!("uninstalling the gate in {}", daemon.pin_dir.display()))?;
    }
    println!(
        "portgate uninstalled: programs detached, pins removed from {}, reserved ports given back; allocations kept in {}",
        daemon.pin_dir.display(),
        store_path.display()
    );
    Ok(())
}
