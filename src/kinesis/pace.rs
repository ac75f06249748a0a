//! Pacing of query-time shard reads to a share of the shard's read limits.
//!
//! Kinesis gives each shard 5 GetRecords calls per second and 2 MiB/s of
//! reads, shared by *every* consumer of the shard (the archiver, production
//! consumers, and `fluxcap sql`/replay reading `live.S` or `S`). A query that
//! reads a shard's tail as fast as it can takes the whole budget and gets the
//! others throttled. A [`ShardPacer`] keeps the query-time reads of a shard
//! under `share` × 5 calls/s and `share` × 2 MiB/s (`query.live_read_share`):
//!
//! ```text
//!   call ──▶ wait until both budgets allow it ──▶ GetRecords ──▶ response of B bytes
//!            calls: one call per 1/(share·5) s        bytes: the next call waits
//!                                                     B / (share·2 MiB/s) after this one started
//! ```
//!
//! Both budgets are strict (no bursts): a response of 10 MiB, after which
//! Kinesis refuses reads of the shard for about 5 s, holds the next call
//! back for 10 MiB / (share·2 MiB/s). A throttled call
//! ([`Permit::throttled`]) holds the shard's next call back by the caller's
//! backoff delay. One call of a shard is in flight at a time, so the bytes
//! of each response are accounted for before the next call.
//!
//! There is one pacer per shard and limits in the process ([`shard_pacer`]):
//! the concurrent queries and replays of `fluxcap serve` share it. The
//! archiver paces its own reads of each shard to
//! `archiver.max_reads_per_second` calls and the full 2 MiB/s (so that it
//! waits out a large response instead of making calls that are throttled).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use tokio::sync::OwnedMutexGuard;
use tokio::time::Instant;

/// GetRecords calls per second a shard allows (all consumers together).
pub const SHARD_CALLS_PER_SECOND: f64 = 5.0;
/// Bytes per second a shard can be read at (all consumers together).
pub const SHARD_BYTES_PER_SECOND: f64 = 2.0 * 1024.0 * 1024.0;

/// The part of a shard's read limits a reader may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadLimits {
    /// GetRecords calls per second.
    pub calls_per_second: f64,
    /// Bytes read per second.
    pub bytes_per_second: f64,
}

impl ReadLimits {
    /// `share` (in (0, 1]) of the shard's limits; out-of-range shares are
    /// clamped (the configuration refuses them before).
    pub fn share(share: f64) -> Self {
        let share = if share.is_finite() {
            share.clamp(0.01, 1.0)
        } else {
            1.0
        };
        ReadLimits {
            calls_per_second: SHARD_CALLS_PER_SECOND * share,
            bytes_per_second: SHARD_BYTES_PER_SECOND * share,
        }
    }

    /// Time between two calls.
    fn call_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.calls_per_second)
    }

    /// Time the budget needs to pay back `bytes`.
    fn byte_time(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_second)
    }
}

/// When the next call of a shard may start: the later of the two budgets.
#[derive(Debug)]
struct Budget {
    limits: ReadLimits,
    /// The call budget allows the next call from then.
    calls_free_at: Option<Instant>,
    /// The byte budget allows the next call from then.
    bytes_free_at: Option<Instant>,
}

impl Budget {
    fn new(limits: ReadLimits) -> Self {
        Budget {
            limits,
            calls_free_at: None,
            bytes_free_at: None,
        }
    }

    /// The earliest start of the next call (`None`: at once).
    fn ready_at(&self) -> Option<Instant> {
        self.calls_free_at.max(self.bytes_free_at)
    }

    /// A call starts at `now`.
    fn start_call(&mut self, now: Instant) {
        let from = self.calls_free_at.map_or(now, |t| t.max(now));
        self.calls_free_at = Some(from + self.limits.call_interval());
    }

    /// The call that started at `started` read `bytes`.
    fn charge(&mut self, started: Instant, bytes: u64) {
        let from = self.bytes_free_at.map_or(started, |t| t.max(started));
        self.bytes_free_at = Some(from + self.limits.byte_time(bytes));
    }

    /// No call before `until` (the shard throttled us).
    fn hold_off(&mut self, until: Instant) {
        self.calls_free_at = Some(self.calls_free_at.map_or(until, |t| t.max(until)));
    }
}

/// The read budget of one shard; clones share it.
#[derive(Debug, Clone)]
pub struct ShardPacer {
    budget: Arc<tokio::sync::Mutex<Budget>>,
}

impl ShardPacer {
    /// A pacer of its own (see [`shard_pacer`] for the process-wide one).
    pub fn new(limits: ReadLimits) -> Self {
        ShardPacer {
            budget: Arc::new(tokio::sync::Mutex::new(Budget::new(limits))),
        }
    }

    /// Wait until the shard's budget would allow a call, without taking a
    /// turn (the archiver waits here before it takes memory for the call).
    pub async fn ready(&self) {
        let budget = self.budget.lock().await;
        if let Some(t) = budget.ready_at() {
            tokio::time::sleep_until(t).await;
        }
    }

    /// Wait until the shard's budget allows a call, and hold the shard's
    /// turn until the returned permit is finished or dropped (one call in
    /// flight at a time). Cancel-safe: dropping the future gives the turn up.
    pub async fn acquire(&self) -> Permit {
        let mut budget = self.budget.clone().lock_owned().await;
        loop {
            let now = Instant::now();
            match budget.ready_at() {
                Some(t) if t > now => tokio::time::sleep_until(t).await,
                _ => {
                    budget.start_call(now);
                    return Permit {
                        budget,
                        started: now,
                    };
                }
            }
        }
    }
}

/// The turn of one call; dropped without [`Permit::finish`], the call
/// counts but read nothing.
#[derive(Debug)]
pub struct Permit {
    budget: OwnedMutexGuard<Budget>,
    started: Instant,
}

impl Permit {
    /// The call read `bytes`: the shard's next call waits for them.
    pub fn finish(mut self, bytes: u64) {
        let started = self.started;
        self.budget.charge(started, bytes);
    }

    /// The call was throttled: the shard's next call waits `delay` from now.
    pub fn throttled(mut self, delay: Duration) {
        self.budget.hold_off(Instant::now() + delay);
    }
}

/// Pacers by (stream, shard, limits).
type Pacers = HashMap<(String, String, u64, u64), ShardPacer>;

static PACERS: LazyLock<Mutex<Pacers>> = LazyLock::new(Default::default);

/// The process-wide pacer of `stream`'s `shard` at `limits`: every
/// query-time reader of the shard in this process shares its budget.
pub fn shard_pacer(stream: &str, shard: &str, limits: ReadLimits) -> ShardPacer {
    let key = (
        stream.to_string(),
        shard.to_string(),
        limits.calls_per_second.to_bits(),
        limits.bytes_per_second.to_bits(),
    );
    let mut m = PACERS.lock().unwrap_or_else(|p| p.into_inner());
    m.entry(key)
        .or_insert_with(|| ShardPacer::new(limits))
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_share_of_the_shard_limits() {
        let l = ReadLimits::share(0.4);
        assert!((l.calls_per_second - 2.0).abs() < 1e-9);
        assert!((l.bytes_per_second - 0.8 * 1024.0 * 1024.0).abs() < 1e-6);
        assert_eq!(l.call_interval(), ms(500));
        assert_eq!(ReadLimits::share(1.0).call_interval(), ms(200));
        assert_eq!(ReadLimits::share(f64::NAN), ReadLimits::share(1.0));
    }

    #[test]
    fn calls_are_spaced_by_the_share_of_five_per_second() {
        let mut b = Budget::new(ReadLimits::share(0.4));
        let t0 = Instant::now();
        assert_eq!(b.ready_at(), None, "the first call goes at once");
        b.start_call(t0);
        b.charge(t0, 0);
        assert_eq!(b.ready_at(), Some(t0 + ms(500)));
        // A caller that comes late is not owed the calls it did not make.
        let late = t0 + ms(3000);
        b.start_call(late);
        assert_eq!(b.ready_at(), Some(late + ms(500)));
    }

    #[test]
    fn the_bytes_of_a_response_hold_the_next_call_back() {
        let mut b = Budget::new(ReadLimits::share(0.5));
        let t0 = Instant::now();
        b.start_call(t0);
        // 1 MiB at 1 MiB/s: the next call waits one second after this one started.
        b.charge(t0 + ms(50), 1024 * 1024);
        assert_eq!(b.ready_at(), Some(t0 + ms(1050)));
        // A response of 10 MiB at the whole limit: the shard's ~5 s of refusal.
        let mut b = Budget::new(ReadLimits::share(1.0));
        b.start_call(t0);
        b.charge(t0, 10 * 1024 * 1024);
        assert_eq!(b.ready_at(), Some(t0 + ms(5000)));
        // Small responses leave the call budget in charge.
        let mut b = Budget::new(ReadLimits::share(1.0));
        b.start_call(t0);
        b.charge(t0, 1000);
        assert_eq!(b.ready_at(), Some(t0 + ms(200)));
    }

    #[test]
    fn byte_debt_accumulates_over_calls() {
        let mut b = Budget::new(ReadLimits::share(1.0));
        let t0 = Instant::now();
        // Two 1 MiB responses started 200 ms apart: 2 MiB take one second.
        b.start_call(t0);
        b.charge(t0, 1024 * 1024);
        b.start_call(t0 + ms(200));
        b.charge(t0 + ms(200), 1024 * 1024);
        assert_eq!(b.ready_at(), Some(t0 + ms(1000)));
    }

    #[test]
    fn throttling_holds_the_shard_off() {
        let mut b = Budget::new(ReadLimits::share(1.0));
        let t0 = Instant::now();
        b.start_call(t0);
        b.hold_off(t0 + ms(3000));
        assert_eq!(b.ready_at(), Some(t0 + ms(3000)));
        // An earlier hold-off does not shorten a later one.
        b.hold_off(t0 + ms(100));
        assert_eq!(b.ready_at(), Some(t0 + ms(3000)));
    }

    #[test]
    fn one_pacer_per_shard_in_the_process() {
        let l = ReadLimits::share(0.3);
        let a = shard_pacer("pace-test", "shard-0", l);
        let b = shard_pacer("pace-test", "shard-0", l);
        let c = shard_pacer("pace-test", "shard-1", l);
        assert!(Arc::ptr_eq(&a.budget, &b.budget));
        assert!(!Arc::ptr_eq(&a.budget, &c.budget));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn readers_of_a_shard_take_turns_at_the_paced_rate() {
        // 5 calls/s: four calls from two readers need at least 3 × 200 ms.
        let p = ShardPacer::new(ReadLimits::share(1.0));
        let start = Instant::now();
        let q = p.clone();
        let other = tokio::spawn(async move {
            for _ in 0..2 {
                q.acquire().await.finish(10);
            }
        });
        for _ in 0..2 {
            p.acquire().await.finish(10);
        }
        other.await.expect("the other reader ran");
        assert!(start.elapsed() >= ms(600), "{:?}", start.elapsed());
    }
}
