//! The knock listener (`[auth] listen`): reads knock datagrams, rate-limited for the whole
//! listener and per source, hands each to the manager, and audits the outcome. It never
//! answers, so a scanner learns nothing; a client learns it worked by connecting.

use std::{
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::Arc,
    time::Duration,
};

use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock, Reference as _},
    middleware::NoOpMiddleware,
    state::{InMemoryState, NotKeyed, keyed::DefaultKeyedStateStore},
};
use tokio::{net::UdpSocket, sync::watch};

use super::{
    App,
    audit::{AuditLog, AuditParams, AuditRecord, now_rfc3339},
};
use crate::{
    knock::MAX_BYTES,
    manager::keys::{KnockAccepted, KnockRefusal, unix_now},
};

/// Knocks a source may send per second, on average.
pub const KNOCKS_PER_SECOND: u32 = 5;
/// Knocks a source may send at once, after being quiet.
pub const KNOCK_BURST: u32 = 10;
/// Knocks the listener looks at per second from all sources together (and at once): a
/// flood from many (spoofed) sources costs at most this much work.
pub const LISTENER_PER_SECOND: u32 = 1_000;
/// Sources remembered by the limiter. When it is full, the sources whose buckets are full
/// again (two seconds after their last knock) are forgotten, at most once a second; while
/// it stays full of recent ones, every datagram waits (a spoofed flood can keep honest
/// clients out while it lasts; it cannot open anything).
pub const LIMITED_SOURCES: usize = 65_536;
/// Refused knocks audited one by one per second (and at once); the rest are counted, and
/// their number is audited once a second.
pub const AUDITED_REFUSALS_PER_SECOND: u32 = 100;

type Keyed<C> =
    RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Whether the listener looks at a datagram: a token bucket per source (an IPv6 source
/// by its /64, what one host usually holds), bounded in the sources it remembers, then
/// the listener's own limit, charged only for datagrams within their source's share, so
/// that one source cannot use up the others' room.
#[derive(Debug)]
pub struct SourceLimiter<C: Clock = DefaultClock> {
    clock: C,
    listener: Direct<C>,
    sources: Keyed<C>,
    last_sweep: Option<C::Instant>,
}

/// What [`SourceLimiter::check`] says of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Look at it.
    Allowed,
    /// Its source sent more than its share (or the limiter is full of recent sources).
    SourceLimited,
    /// The listener took its most datagrams this second.
    ListenerBusy,
}

impl SourceLimiter {
    /// An empty limiter on the monotonic clock.
    #[must_use]
    pub fn new() -> Self {
        Self::with_clock(&DefaultClock::default())
    }
}

impl Default for SourceLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: Clock + Clone> SourceLimiter<C> {
    /// An empty limiter on `clock`.
    #[must_use]
    pub fn with_clock(clock: &C) -> Self {
        Self {
            clock: clock.clone(),
            last_sweep: None,
            listener: RateLimiter::direct_with_clock(
                per_second(LISTENER_PER_SECOND, LISTENER_PER_SECOND),
                clock.clone(),
            ),
            sources: RateLimiter::new(
                per_second(KNOCKS_PER_SECOND, KNOCK_BURST),
                DefaultKeyedStateStore::default(),
                clock.clone(),
            ),
        }
    }

    /// Whether a datagram from `source` may be looked at now.
    pub fn check(&mut self, source: IpAddr) -> Admission {
        if self.sources.len() >= LIMITED_SOURCES {
            // Sources whose buckets are full again are forgotten, at most once a second
            // (it walks them all); if every one is recent, nothing is taken until some go.
            let now = self.clock.now();
            let due = self.last_sweep.is_none_or(|last| {
                Duration::from(now.duration_since(last)) >= Duration::from_secs(1)
            });
            if due {
                self.last_sweep = Some(now);
                self.sources.retain_recent();
                self.sources.shrink_to_fit();
            }
            if self.sources.len() >= LIMITED_SOURCES {
                return Admission::SourceLimited;
            }
        }
        if self.sources.check_key(&bucket(source)).is_err() {
            return Admission::SourceLimited;
        }
        if self.listener.check().is_err() {
            return Admission::ListenerBusy;
        }
        Admission::Allowed
    }
}

/// The quota of `rate` a second with bursts of `burst`.
fn per_second(rate: u32, burst: u32) -> Quota {
    let nonzero = |n: u32| NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(nonzero(rate)).allow_burst(nonzero(burst))
}

/// The bucket of a source: an IPv4 address, or an IPv6 address's /64.
fn bucket(source: IpAddr) -> IpAddr {
    match source.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !u128::from(u64::MAX);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 @ IpAddr::V4(_) => v4,
    }
}

/// The audit of refused knocks, bounded: beyond its rate they are counted, and the count
/// is written with the next record that gets through.
struct RefusalAudit {
    limit: Direct<DefaultClock>,
    unwritten: u64,
}

/// Serves knocks on `socket` until `shutdown`: through `app`'s manager, into its audit log.
pub async fn serve(app: Arc<App>, socket: UdpSocket, mut shutdown: watch::Receiver<bool>) {
    let (manager, audit) = (&app.manager, &app.audit);
    let mut limiter = SourceLimiter::new();
    let mut refusals = RefusalAudit {
        limit: RateLimiter::direct(per_second(
            AUDITED_REFUSALS_PER_SECOND,
            AUDITED_REFUSALS_PER_SECOND,
        )),
        unwritten: 0,
    };
    // The refusals not audited one by one are written as a count within a second.
    let mut flush = tokio::time::interval(Duration::from_secs(1));
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Room for one byte more than the largest knock, so that a longer one reads as such.
    let mut buffer = [0_u8; MAX_BYTES + 1];
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            _ = flush.tick() => {
                refusals.flush(audit);
                continue;
            }
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let (len, from) = match received {
            Ok(received) => received,
            Err(err) => {
                // A lasting error must not spin: wait a little before the next read.
                log::warn!("reading a knock: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = from.ip().to_canonical();
        let outcome = match limiter.check(source) {
            Admission::Allowed => manager.knock(&buffer[..len], source, unix_now()).await,
            Admission::SourceLimited => Err(KnockRefusal::RateLimited),
            Admission::ListenerBusy => Err(KnockRefusal::ListenerBusy),
        };
        manager.monitor().record_knock(match &outcome {
            Ok(_) => "ok",
            Err(refusal) => refusal.reason(),
        });
        // A flood's datagrams beyond their share are counted, not each audited: the
        // audit log would otherwise grow with the flood.
        match &outcome {
            Err(KnockRefusal::RateLimited | KnockRefusal::ListenerBusy) => {}
            Ok(_) => record(audit, source, &outcome),
            Err(_) if refusals.limit.check().is_ok() => record(audit, source, &outcome),
            Err(_) => refusals.unwritten += 1,
        }
    }
    refusals.flush(audit);
}

impl RefusalAudit {
    /// Writes the number of refusals not audited one by one since the last such record,
    /// if any (once a second, and at shutdown).
    fn flush(&mut self, audit: &AuditLog) {
        if self.unwritten > 0 {
            audit.record(&AuditRecord {
                count: Some(self.unwritten),
                ..knock_record("not_audited", None, None, None)
            });
            self.unwritten = 0;
        }
    }
}

/// Audits one knock: its key, address and port when it got that far, and its outcome.
fn record(audit: &AuditLog, source: IpAddr, outcome: &Result<KnockAccepted, KnockRefusal>) {
    let (id, key, result, grant_for, ttl) = match outcome {
        Ok(accepted) => (
            Some(accepted.id),
            Some(accepted.key.as_str()),
            "ok",
            Some(accepted.addr),
            Some(AuditParams::duration(accepted.ttl)),
        ),
        Err(refusal) => (refusal.port(), refusal.key(), refusal.reason(), None, None),
    };
    let proto = id.map(|id| id.protocol.to_string());
    audit.record(&AuditRecord {
        proto: proto.as_deref(),
        grant_for,
        params: AuditParams {
            ttl,
            ..AuditParams::default()
        },
        ..knock_record(result, id.map(|id| id.port), key, Some(source))
    });
}

/// A knock's audit record.
fn knock_record<'a>(
    result: &'a str,
    port: Option<u16>,
    key: Option<&'a str>,
    addr: Option<IpAddr>,
) -> AuditRecord<'a> {
    AuditRecord {
        time: now_rfc3339(),
        uid: None,
        pid: None,
        action: "knock",
        port,
        proto: None,
        netns: None,
        result,
        status: 0,
        key,
        addr,
        grant_for: None,
        count: None,
        params: AuditParams::default(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::{
        Admission, KNOCK_BURST, KNOCKS_PER_SECOND, LIMITED_SOURCES, LISTENER_PER_SECOND,
        SourceLimiter,
    };

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_not_held_back() {
        let clock = FakeRelativeClock::default();
        let mut limiter = SourceLimiter::with_clock(&clock);
        let a = "192.0.2.1".parse().unwrap();
        let b = "192.0.2.2".parse().unwrap();
        let let_in = (0..100)
            .filter(|_| limiter.check(a) == Admission::Allowed)
            .count();
        assert_eq!(
            u32::try_from(let_in).unwrap(),
            KNOCK_BURST,
            "the burst, then nothing at the same instant"
        );
        assert_eq!(
            limiter.check(b),
            Admission::Allowed,
            "another source is not held back"
        );
        clock.advance(Duration::from_secs(1) / KNOCKS_PER_SECOND);
        assert_eq!(
            limiter.check(a),
            Admission::Allowed,
            "one more after its share of a second"
        );
        assert_eq!(limiter.check(a), Admission::SourceLimited);
    }

    #[test]
    fn an_ipv6_host_is_one_source_whatever_its_64_bit_suffix() {
        let mut limiter = SourceLimiter::with_clock(&FakeRelativeClock::default());
        let let_in = (0..100_u16)
            .filter(|i| {
                let source = format!("2001:db8::{i:x}").parse().unwrap();
                limiter.check(source) == Admission::Allowed
            })
            .count();
        assert_eq!(u32::try_from(let_in).unwrap(), KNOCK_BURST);
        let other_host = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(limiter.check(other_host), Admission::Allowed);
    }

    #[test]
    fn a_flood_from_many_sources_is_held_to_the_listeners_rate() {
        let clock = FakeRelativeClock::default();
        let mut limiter = SourceLimiter::with_clock(&clock);
        let looked_at = (0..5_000_u32)
            .filter(|i| {
                let source = std::net::Ipv4Addr::from(0x0a00_0000 + i).into();
                limiter.check(source) == Admission::Allowed
            })
            .count();
        assert_eq!(u32::try_from(looked_at).unwrap(), LISTENER_PER_SECOND);
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            limiter.check("192.0.2.1".parse().unwrap()),
            Admission::Allowed,
            "a second later the listener takes knocks again"
        );
    }

    #[test]
    fn one_source_cannot_use_up_the_listeners_room() {
        let mut limiter = SourceLimiter::with_clock(&FakeRelativeClock::default());
        let loud = "192.0.2.1".parse().unwrap();
        let let_in = (0..5_000)
            .filter(|_| limiter.check(loud) == Admission::Allowed)
            .count();
        assert_eq!(u32::try_from(let_in).unwrap(), KNOCK_BURST);
        assert_eq!(
            limiter.check("192.0.2.2".parse().unwrap()),
            Admission::Allowed,
            "the loud source's refused datagrams cost the listener nothing"
        );
    }

    #[test]
    fn a_full_limiter_forgets_quiet_sources_at_most_once_a_second() {
        let clock = FakeRelativeClock::default();
        let mut limiter = SourceLimiter::with_clock(&clock);
        for i in 0..u32::try_from(LIMITED_SOURCES).unwrap() {
            let _ = limiter.check(std::net::Ipv4Addr::from(0x0a00_0000 + i).into());
        }
        let newcomer = "192.0.2.9".parse().unwrap();
        assert_eq!(
            limiter.check(newcomer),
            Admission::SourceLimited,
            "full of recent sources"
        );
        clock.advance(Duration::from_secs(3));
        assert_eq!(
            limiter.check(newcomer),
            Admission::Allowed,
            "the quiet ones were forgotten"
        );
    }
}
