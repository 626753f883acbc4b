//! `portgate top`: a live terminal view of the daemon over its API socket, with the typed
//! client ([`crate::client`]): every port with its owner, status, connections against
//! its limit, new connections and drops per second by reason; every port's drops by
//! reason together; the deny events as they arrive (newest first); the daemon's warnings.
//!
//! [`model`] is the state, built from successive reads and tested alone; [`view`] draws
//! it; [`run`] is the loop between them. Two tasks feed the loop: one reads the ports,
//! counters and status every interval, the other follows the event stream (opened again
//! after it breaks). The terminal's own events (keys, resizes) are read on the loop's
//! thread.
//!
//! The first read must succeed: otherwise `run` returns the client's error before the
//! screen is touched. Once running, a read that fails is shown on the screen, the rows
//! of the last good read stay, and reading goes on every interval until the daemon
//! answers again.
//!
//! The terminal is restored (raw mode off, the alternate screen left) on every way out:
//! the keys that quit, SIGTERM, SIGHUP and SIGINT, an error (a guard's drop), a panic
//! (ratatui's panic hook). Only SIGKILL leaves it as it was drawn.

pub mod model;
pub mod view;

use std::{
    io,
    ops::ControlFlow,
    sync::mpsc::{self, Receiver, Sender},
    time::{Duration, Instant},
};

use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use clap::Args;

use self::model::{Reading, SortColumn, Top};
use crate::{api::EventView, client::Client, client::ClientError};

/// The shortest time between two reads of the daemon.
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);
/// The longest time between two reads of the daemon.
pub const MAX_INTERVAL: Duration = Duration::from_mins(1);

/// How long the loop waits for a key before it looks at what the tasks sent.
const KEY_WAIT: Duration = Duration::from_millis(50);

/// `portgate top`'s options (what it shows: the verb's help, [`super::Command::Top`]).
#[derive(Debug, Args)]
pub struct TopArgs {
    /// How often the daemon is read, from 100ms to 1m.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
}

/// What can end `portgate top` with an error.
#[derive(Debug, thiserror::Error)]
pub enum TopError {
    /// The first read failed: the client's message says what to do.
    #[error(transparent)]
    Start(#[from] ClientError),
    /// The terminal could not be set up or drawn on.
    #[error("the terminal: {0}: run portgate top in an interactive terminal (a tty)")]
    Terminal(io::Error),
    /// The async runtime did not start.
    #[error("cannot start the async runtime: {0}: check the process limits")]
    Runtime(io::Error),
}

/// What the tasks send the loop.
#[derive(Debug)]
enum Update {
    /// A read of the daemon, made at that instant (boxed: it is much the largest).
    Read(Box<Reading>, Instant),
    /// A read failed.
    Lost(String),
    /// The event stream was opened (again).
    EventsOpened,
    /// A deny event.
    Event(EventView),
    /// A signal asked the view to end.
    Quit,
}

/// Runs `portgate top`: the live view of the daemon `client` talks to, read every
/// `--interval`, until a key quits (q, Esc, Ctrl-C).
pub fn run(client: Client, args: &TopArgs) -> Result<(), TopError> {
    let interval = args.interval;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(TopError::Runtime)?;
    let first = runtime.block_on(read(&client))?;
    let mut top = Top::new();
    top.observe(first, Instant::now());
    let (sender, updates) = mpsc::channel();
    runtime.spawn(poll(client.clone(), interval, sender.clone()));
    let signals = {
        let _inside = runtime.enter();
        QuitSignals::register()
    };
    if let Some(signals) = signals {
        runtime.spawn(signals.quit(sender.clone()));
    }
    runtime.spawn(follow_events(client, interval, sender));
    let shown = show(&mut top, &updates, interval);
    // The tasks may be inside a call: they stop where they are.
    runtime.shutdown_background();
    shown
}

/// `--interval`: a duration (`500ms`, `2s`) within [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text)
        .map_err(|err| format!("{text:?} is not a duration (500ms, 2s): {err}"))?;
    if (MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        Ok(interval)
    } else {
        Err(format!("{text} is outside 100ms..=1m"))
    }
}

/// Draws and handles keys until one quits.
fn show(top: &mut Top, updates: &Receiver<Update>, interval: Duration) -> Result<(), TopError> {
    let mut screen = Screen::enter()?;
    let mut dirty = true;
    loop {
        while let Ok(update) = updates.try_recv() {
            if apply(top, update).is_break() {
                return Ok(());
            }
            dirty = true;
        }
        if dirty {
            screen
                .terminal
                .draw(|frame| view::draw(frame, top, interval))
                .map_err(TopError::Terminal)?;
            dirty = false;
        }
        if event::poll(KEY_WAIT).map_err(TopError::Terminal)? {
            match event::read().map_err(TopError::Terminal)? {
                Event::Key(key) => {
                    if on_key(top, key).is_break() {
                        return Ok(());
                    }
                    dirty = true;
                }
                Event::Resize(..) => dirty = true,
                _ => {}
            }
        }
    }
}

/// What a key does: quit, or change the order.
fn on_key(top: &mut Top, key: KeyEvent) -> ControlFlow<()> {
    if key.kind != KeyEventKind::Press {
        return ControlFlow::Continue(());
    }
    match key.code {
        KeyCode::Char('q') | KeyCode::Esc => return ControlFlow::Break(()),
        // Raw mode delivers Ctrl-C as a key, not as SIGINT.
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => {
            return ControlFlow::Break(());
        }
        KeyCode::Char('r') => top.reverse(),
        KeyCode::Char(key) => {
            if let Some(column) = SortColumn::of_key(key) {
                top.sort_by(column);
            }
        }
        _ => {}
    }
    ControlFlow::Continue(())
}

/// Hands an update to the model; breaks on [`Update::Quit`].
fn apply(top: &mut Top, update: Update) -> ControlFlow<()> {
    match update {
        Update::Read(reading, at) => top.observe(*reading, at),
        Update::Lost(why) => top.lost(why),
        Update::EventsOpened => top.events_reopened(),
        Update::Event(event) => top.event(event),
        Update::Quit => return ControlFlow::Break(()),
    }
    ControlFlow::Continue(())
}

/// The terminal in raw mode on the alternate screen; dropping it restores both.
struct Screen {
    terminal: ratatui::DefaultTerminal,
}

impl Screen {
    fn enter() -> Result<Self, TopError> {
        // try_init also installs the panic hook that restores the terminal first.
        match ratatui::try_init() {
            Ok(terminal) => Ok(Self { terminal }),
            Err(err) => {
                // Raw mode may be on already when the alternate screen failed.
                ratatui::restore();
                Err(TopError::Terminal(err))
            }
        }
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// One read of the daemon: allocations, counters and status, asked at once.
async fn read(client: &Client) -> Result<Reading, ClientError> {
    let (allocations, reports, status) =
        tokio::try_join!(client.list(), client.stats(None), client.status())?;
    Ok(Reading {
        allocations,
        reports,
        status,
    })
}

/// Reads the daemon every `interval` until the loop is gone.
async fn poll(client: Client, interval: Duration, updates: Sender<Update>) {
    loop {
        tokio::time::sleep(interval).await;
        let update = match read(&client).await {
            Ok(reading) => Update::Read(Box::new(reading), Instant::now()),
            Err(err) => Update::Lost(err.to_string()),
        };
        if updates.send(update).is_err() {
            return;
        }
    }
}

/// SIGTERM, SIGHUP and SIGINT, registered before the screen is touched, so that from then
/// on each one ends the view as `q` does and the terminal is put back before the process
/// exits (raw mode turns Ctrl-C into a key; these come from `kill` or a closed terminal).
struct QuitSignals([tokio::signal::unix::Signal; 3]);

impl QuitSignals {
    /// Registers them; must run inside the runtime. `None` when one could not be: they
    /// keep their default action, and the keys still quit.
    fn register() -> Option<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let each = [
            SignalKind::terminate(),
            SignalKind::hangup(),
            SignalKind::interrupt(),
        ]
        .map(|kind| signal(kind).ok());
        let [Some(terminate), Some(hangup), Some(interrupt)] = each else {
            return None;
        };
        Some(Self([terminate, hangup, interrupt]))
    }

    /// Waits for one, then asks the loop to end.
    async fn quit(self, updates: Sender<Update>) {
        let Self([mut terminate, mut hangup, mut interrupt]) = self;
        tokio::select! {
            _ = terminate.recv() => {}
            _ = hangup.recv() => {}
            _ = interrupt.recv() => {}
        }
        let _gone = updates.send(Update::Quit);
    }
}

/// Follows the event stream; when it ends or fails, opens it again after `interval`.
async fn follow_events(client: Client, interval: Duration, updates: Sender<Update>) {
    loop {
        if updates.send(Update::EventsOpened).is_err() {
            return;
        }
        let mut gone = false;
        // A failure shows in the reads' line; here it only means: try again later.
        let _ended = client
            .events(true, |event| {
                if updates.send(Update::Event(event)).is_ok() {
                    ControlFlow::Continue(())
                } else {
                    gone = true;
                    ControlFlow::Break(())
                }
            })
            .await;
        if gone {
            return;
        }
        tokio::time::sleep(interval).await;
    }
}

#[cfg(test)]
mod tests {
    use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

    use std::time::Duration;

    use super::{
        model::{SortColumn, Top},
        on_key, parse_interval,
    };

    fn press(code: KeyCode, modifiers: KeyModifiers) -> KeyEvent {
        KeyEvent::new_with_kind(code, modifiers, KeyEventKind::Press)
    }

    #[test]
    fn keys_quit_or_sort() {
        let mut top = Top::new();
        for quit in [
            press(KeyCode::Char('q'), KeyModifiers::NONE),
            press(KeyCode::Esc, KeyModifiers::NONE),
            press(KeyCode::Char('c'), KeyModifiers::CONTROL),
        ] {
            assert!(on_key(&mut top, quit).is_break(), "{quit:?}");
        }
        assert!(on_key(&mut top, press(KeyCode::Char('c'), KeyModifiers::NONE)).is_continue());
        assert_eq!(top.sort(), (SortColumn::Connections, false));
        assert!(on_key(&mut top, press(KeyCode::Char('r'), KeyModifiers::NONE)).is_continue());
        assert_eq!(top.sort(), (SortColumn::Connections, true));
        let release = KeyEvent::new_with_kind(
            KeyCode::Char('q'),
            KeyModifiers::NONE,
            KeyEventKind::Release,
        );
        assert!(on_key(&mut top, release).is_continue());
    }

    #[test]
    fn the_interval_is_bounded() {
        assert_eq!(parse_interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("1m"), Ok(Duration::from_mins(1)));
        assert_eq!(
            parse_interval("10ms"),
            Err("10ms is outside 100ms..=1m".to_owned())
        );
        assert!(parse_interval("2h").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
