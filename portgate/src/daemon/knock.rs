//! The knock listener (`[auth] listen`): reads knock datagrams, rate-limited per source,
//! hands each to the manager, and audits the outcome. It never answers, so a scanner
//! learns nothing; a client learns it worked by connecting.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{net::UdpSocket, sync::watch};

use super::{
    App,
    audit::{AuditLog, AuditRecord, now_rfc3339},
};
use crate::{
    knock::MAX_BYTES,
    manager::keys::{KnockAccepted, KnockRefusal, unix_now},
};

/// Knocks a source may send per second, on average.
pub const KNOCKS_PER_SECOND: f64 = 5.0;
/// Knocks a source may send at once, after being quiet.
pub const KNOCK_BURST: u32 = 10;
/// Sources remembered by the limiter; when it is full of recent ones, new sources wait.
pub const LIMITED_SOURCES: usize = 65_536;

/// A token bucket per source address, bounded in the sources it remembers.
#[derive(Debug)]
pub struct SourceLimiter {
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl SourceLimiter {
    /// An empty limiter.
    #[must_use]
    pub fn new() -> Self {
        Self {
            buckets: HashMap::new(),
        }
    }

    /// Whether a datagram from `source` at `now` may be looked at.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= LIMITED_SOURCES {
            // A source whose bucket has been full again for a while is forgotten.
            let idle = Duration::from_secs_f64(f64::from(KNOCK_BURST) / KNOCKS_PER_SECOND);
            self.buckets
                .retain(|_, (_, last)| now.saturating_duration_since(*last) < idle);
            if self.buckets.len() >= LIMITED_SOURCES {
                return false;
            }
        }
        let burst = f64::from(KNOCK_BURST);
        let (tokens, last) = self.buckets.entry(source).or_insert((burst, now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * KNOCKS_PER_SECOND;
        *tokens = (*tokens + refill).min(burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for SourceLimiter {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves knocks on `socket` until `shutdown`: through `app`'s manager, into its audit log.
pub async fn serve(app: Arc<App>, socket: UdpSocket, mut shutdown: watch::Receiver<bool>) {
    let (manager, audit) = (&app.manager, &app.audit);
    let mut limiter = SourceLimiter::new();
    // Room for one byte more than the largest knock, so that a longer one reads as such.
    let mut buffer = [0_u8; MAX_BYTES + 1];
    loop {
        let (len, from) = tokio::select! {
            received = socket.recv_from(&mut buffer) => match received {
                Ok(received) => received,
                Err(err) => {
                    log::warn!("reading a knock: {err}");
                    continue;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let source = from.ip().to_canonical();
        let outcome = if limiter.allow(source, Instant::now()) {
            manager.knock(&buffer[..len], source, unix_now()).await
        } else {
            Err(KnockRefusal::RateLimited)
        };
        // A flood's datagrams beyond the source's share are counted, not each audited: the
        // audit log would otherwise grow with the flood.
        if !matches!(outcome, Err(KnockRefusal::RateLimited)) {
            record(audit, source, &outcome);
        }
        manager.monitor().record_knock(match &outcome {
            Ok(_) => "ok",
            Err(refusal) => refusal.reason(),
        });
    }
}

/// Audits one knock: its key, address and port when it got that far, and its outcome.
fn record(audit: &AuditLog, source: IpAddr, outcome: &Result<KnockAccepted, KnockRefusal>) {
    let (port, proto, key, result) = match outcome {
        Ok(accepted) => (
            Some(accepted.id.port),
            Some(accepted.id.protocol.to_string()),
            Some(accepted.key.as_str()),
            "ok",
        ),
        Err(refusal) => (None, None, refusal.key(), refusal.reason()),
    };
    audit.record(&AuditRecord {
        time: now_rfc3339(),
        uid: None,
        pid: None,
        action: "knock",
        port,
        proto: proto.as_deref(),
        netns: None,
        result,
        status: 0,
        key,
        addr: Some(source),
    });
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{KNOCK_BURST, KNOCKS_PER_SECOND, SourceLimiter};

    #[test]
    fn a_source_gets_its_burst_then_its_rate_and_others_are_not_held_back() {
        let mut limiter = SourceLimiter::new();
        let start = Instant::now();
        let a = "192.0.2.1".parse().unwrap();
        let b = "192.0.2.2".parse().unwrap();
        let let_in = (0..100).filter(|_| limiter.allow(a, start)).count();
        assert_eq!(
            u32::try_from(let_in).unwrap(),
            KNOCK_BURST,
            "the burst, then nothing at the same instant"
        );
        assert!(limiter.allow(b, start), "another source is not held back");
        let later = start + Duration::from_secs_f64(1.0 / KNOCKS_PER_SECOND);
        assert!(
            limiter.allow(a, later),
            "one more after its share of a second"
        );
        assert!(!limiter.allow(a, later));
    }
}
