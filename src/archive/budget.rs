//! The archiver's memory accountant: every large piece of memory the
//! archiver holds is taken from one process-wide budget
//! (`archive.flush.memory_budget`) *before* it is allocated, and given back
//! when it is freed.
//!
//! ```text
//!            budget (KiB permits, FIFO)                       fixed part, taken at start:
//!   ┌──────────────────────────────────────────────┐          PROCESS_FIXED +
//!   │                                              │          encoders × ENCODER_FIXED
//!   │ call in flight: response_cost(expected)      │◀─ take ── shard, before GetRecords
//!   │    │ response arrives (larger than expected: │           (its Limit is sized so that
//!   │    │  the excess is charged as debt)         │            the response fits)
//!   │    ▼ resize                                  │
//!   │ buffered: buffered_cost(records)             │── covers the records, and their
//!   │    │ (records + their encoded copy)          │   Parquet pages and encoded file
//!   │    ▼ flush: encode, upload, commit           │   during the flush
//!   │ released ────────────────────────────────────┼─▶ next waiter in line
//!   └──────────────────────────────────────────────┘
//! ```
//!
//! What costs what (measured with 1 MiB incompressible records, see
//! `tests/it/memory_budget.rs`):
//!
//! - A GetRecords response of P payload bytes is read whole by the SDK
//!   (JSON with base64 payloads, ~1.37 P, collected into one buffer: ~2.7 P
//!   at the moment of collection), then decoded (P), then copied into the
//!   shard's Arrow builders: [`response_cost`] is 3 P plus a constant.
//! - Buffered records of M bytes (`Record::mem_size`) take M in the builders;
//!   their flush encodes them into compressed pages (≤ M for incompressible
//!   payloads) and then into the file (≤ M), the batch being dropped once
//!   written: [`buffered_cost`] is 2 M. The flush itself takes nothing more,
//!   so a shard holding buffered records can always flush.
//! - An encoder's fixed working memory (the page being built, dictionaries,
//!   bloom filters) is set aside once per encoder (they are bounded by the
//!   encoder semaphore): [`ENCODER_FIXED`]; so is the process's own
//!   working memory (runtime, SDK clients, TLS): [`PROCESS_FIXED`].
//!
//! A shard sizes each call from the largest Kinesis record it saw recently
//! ([`CallSizer`]): the call's `Limit` is the number of such records that
//! fit in the call's payload target, so that the response fits its
//! reservation. A response larger than reserved (a record larger than any
//! seen before) is charged at once as *debt*: the memory is already in use,
//! and permits released later pay the debt before anyone waits less.
//!
//! **Waiting without deadlock or starvation.** Only the reservation for a
//! call ever waits, and a shard that has to wait first flushes what it
//! buffered: a waiting shard holds nothing. Every other holder gives its
//! memory back in bounded time (a call in flight returns; a flush finishes;
//! a shard between calls reaches its next reservation, finds the budget
//! taken, and flushes; a shard idle at its tip is asked to flush through
//! [`MemoryBudget::ask_to_flush`]). Waiters are served first come, first
//! served (tokio's semaphore is fair), so with 512 shards and a small budget
//! the shards take turns and none waits for ever. A request larger than the
//! whole budget is clamped to it (it then runs alone).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, Semaphore};

use crate::error::{Error, Result};

/// The largest GetRecords response Kinesis returns.
pub const MAX_RESPONSE: u64 = 10 * 1024 * 1024;
/// Assumed size of a Kinesis record before any was seen (the classic limit;
/// a larger one is charged as debt and raises the estimate).
pub const FIRST_RECORD_GUESS: u64 = 1024 * 1024;
/// Working memory of one Parquet encoder beyond its input and output.
pub const ENCODER_FIXED: u64 = 2 * 1024 * 1024;
/// The process's own working memory: runtime, SDK clients, TLS, logging,
/// checkpoints (measured: ~7 MiB of anonymous memory in an idle archiver).
pub const PROCESS_FIXED: u64 = 8 * 1024 * 1024;
/// Per-call overhead: request, HTTP and TLS buffers, response metadata.
const CALL_FIXED: u64 = 256 * 1024;

/// Memory a GetRecords response of `payload` bytes (data and partition
/// keys) takes at its peak, until its records are in the shard's buffer.
pub fn response_cost(payload: u64) -> u64 {
    payload.saturating_mul(3).saturating_add(CALL_FIXED)
}

/// Memory buffered records of `mem` bytes (`Record::mem_size`) take until
/// their flush is uploaded: the records, then their encoded copy.
pub fn buffered_cost(mem: u64) -> u64 {
    mem.saturating_mul(2)
}

/// The process-wide budget; clones share it.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sem: Semaphore,
    /// Permits (KiB) of the whole budget, less the fixed part.
    total_kib: u32,
    /// KiB charged beyond what was free ([`MemoryBudget::force`]).
    debt_kib: Mutex<u64>,
    /// Wakes idle shards so that they flush (someone waits for memory).
    pressure: Notify,
    /// KiB in use (for tests and the debug log).
    used_kib: AtomicU64,
    /// Most KiB ever in use at once.
    peak_kib: AtomicU64,
}

impl MemoryBudget {
    /// A budget of `bytes`, of which `fixed` are set aside (encoders).
    /// At least 1 MiB remains to share.
    pub fn new(bytes: u64, fixed: u64) -> Self {
        let kib = (bytes.saturating_sub(fixed) / 1024).clamp(1024, u64::from(u32::MAX / 2)) as u32;
        MemoryBudget {
            inner: Arc::new(Inner {
                sem: Semaphore::new(kib as usize),
                total_kib: kib,
                debt_kib: Mutex::new(0),
                pressure: Notify::new(),
                used_kib: AtomicU64::new(0),
                peak_kib: AtomicU64::new(0),
            }),
        }
    }

    /// Bytes shared by calls and buffers.
    pub fn total(&self) -> u64 {
        u64::from(self.inner.total_kib) * 1024
    }

    /// Bytes in use (reservations, debt included).
    pub fn used(&self) -> u64 {
        self.inner.used_kib.load(Ordering::Relaxed) * 1024
    }

    /// Most bytes ever in use at once.
    pub fn peak(&self) -> u64 {
        self.inner.peak_kib.load(Ordering::Relaxed) * 1024
    }

    fn kib(&self, bytes: u64) -> u32 {
        (bytes.div_ceil(1024).max(1)).min(u64::from(self.inner.total_kib)) as u32
    }

    /// `bytes` now if they are free and nobody waits before us.
    pub fn try_take(&self, bytes: u64) -> Option<Reservation> {
        let n = self.kib(bytes);
        let p = self.inner.sem.try_acquire_many(n).ok()?;
        p.forget();
        Some(self.granted(n))
    }

    /// Wait in line for `bytes` (clamped to the whole budget).
    /// Cancel-safe: a dropped wait takes nothing.
    pub async fn take(&self, bytes: u64) -> Result<Reservation> {
        let n = self.kib(bytes);
        let p = self
            .inner
            .sem
            .acquire_many(n)
            .await
            .map_err(|_| Error::Interrupted)?;
        p.forget();
        Ok(self.granted(n))
    }

    /// `bytes` that are already in use: what is free is taken, the rest is
    /// debt, paid back by the next releases before any waiter is served.
    pub fn force(&self, bytes: u64) -> Reservation {
        let n = bytes.div_ceil(1024).min(u64::from(u32::MAX / 2)) as u32;
        let mut got = 0u32;
        while got < n {
            let free = self.inner.sem.available_permits().min((n - got) as usize) as u32;
            if free == 0 {
                break;
            }
            if let Ok(p) = self.inner.sem.try_acquire_many(free) {
                p.forget();
                got += free;
            }
        }
        if got < n {
            let mut debt = self
                .inner
                .debt_kib
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            *debt += u64::from(n - got);
        }
        self.granted(n)
    }

    fn granted(&self, kib: u32) -> Reservation {
        let now = self
            .inner
            .used_kib
            .fetch_add(u64::from(kib), Ordering::Relaxed)
            + u64::from(kib);
        self.inner.peak_kib.fetch_max(now, Ordering::Relaxed);
        Reservation {
            budget: self.clone(),
            kib,
        }
    }

    fn release(&self, kib: u32) {
        if kib == 0 {
            return;
        }
        self.inner
            .used_kib
            .fetch_sub(u64::from(kib), Ordering::Relaxed);
        let back = {
            let mut debt = self
                .inner
                .debt_kib
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let pay = (*debt).min(u64::from(kib));
            *debt -= pay;
            kib - pay as u32
        };
        if back > 0 {
            self.inner.sem.add_permits(back as usize);
        }
    }

    /// Ask the shards idle at their tip to flush (someone waits for memory).
    pub fn ask_to_flush(&self) {
        self.inner.pressure.notify_waiters();
    }

    /// Resolves on the next [`Self::ask_to_flush`].
    pub async fn asked_to_flush(&self) {
        self.inner.pressure.notified().await
    }
}

/// Memory taken from the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: MemoryBudget,
    kib: u32,
}

impl Reservation {
    /// An empty reservation of `budget`.
    pub fn empty(budget: &MemoryBudget) -> Self {
        Reservation {
            budget: budget.clone(),
            kib: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        u64::from(self.kib) * 1024
    }

    /// Hold `bytes` from now on: the excess is given back; what is missing
    /// is memory already in use, charged at once ([`MemoryBudget::force`]).
    pub fn resize(&mut self, bytes: u64) {
        let want = bytes.div_ceil(1024).min(u64::from(u32::MAX / 2)) as u32;
        if want < self.kib {
            self.budget.release(self.kib - want);
            self.kib = want;
        } else if want > self.kib {
            let extra = self.budget.force(u64::from(want - self.kib) * 1024);
            self.merge(extra);
        }
    }

    /// Hold at least `bytes` (see [`Self::resize`]).
    pub fn at_least(&mut self, bytes: u64) {
        if bytes > self.bytes() {
            self.resize(bytes);
        }
    }

    /// Take over `other`'s memory.
    pub fn merge(&mut self, mut other: Reservation) {
        self.kib += std::mem::take(&mut other.kib);
    }

    /// Move `bytes` (at most all) out into a reservation of their own.
    pub fn split(&mut self, bytes: u64) -> Reservation {
        let n = (bytes.div_ceil(1024).min(u64::from(u32::MAX / 2)) as u32).min(self.kib);
        self.kib -= n;
        Reservation {
            budget: self.budget.clone(),
            kib: n,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.kib);
    }
}

/// Sizes one shard's GetRecords calls to its share of the budget.
#[derive(Debug, Clone)]
pub struct CallSizer {
    /// Payload a call aims at (bytes).
    target: u64,
    /// Largest Kinesis record (data and key) seen recently; `None`: none yet.
    record: Option<u64>,
    /// The last call: records asked for, records returned.
    last: Option<(u64, u64)>,
    max_limit: i32,
}

/// The largest Kinesis record seen by any shard of the process (a new
/// shard's first estimate).
static LARGEST_RECORD: AtomicU64 = AtomicU64::new(0);

impl CallSizer {
    /// Calls of at most `max_limit` records, each aiming at a quarter of
    /// the budget's shared part (at most [`MAX_RESPONSE`]).
    pub fn new(budget: &MemoryBudget, max_limit: i32) -> Self {
        let quarter = budget.total() / 4;
        // response_cost(target) ≤ a quarter of the budget.
        let target = (quarter.saturating_sub(CALL_FIXED) / 3).clamp(64 * 1024, MAX_RESPONSE);
        let seen = LARGEST_RECORD.load(Ordering::Relaxed);
        CallSizer {
            target,
            record: (seen > 0).then_some(seen),
            last: None,
            max_limit: max_limit.max(1),
        }
    }

    fn record_estimate(&self) -> u64 {
        self.record.unwrap_or(FIRST_RECORD_GUESS).max(64)
    }

    /// The next call: its `Limit`, and the memory to take before it. After
    /// a full response (a backlog) the call aims at the whole target; after
    /// a partial one, at twice what it returned (at least 64 KiB), so that
    /// shards near their tip hold little memory each.
    pub fn next_call(&self) -> (i32, u64) {
        let rec = self.record_estimate();
        let by_target = (self.target / rec).clamp(1, self.max_limit as u64);
        let limit = match self.last {
            Some((asked, got)) if got < asked => {
                by_target.min((2 * got).max(64 * 1024 / rec).max(1))
            }
            _ => by_target,
        };
        let expected = (limit * rec).min(MAX_RESPONSE.max(rec));
        (limit as i32, response_cost(expected))
    }

    /// A call that asked for `asked` records returned `got`, the largest
    /// of `largest` bytes. The record estimate follows the records: a larger
    /// one raises it at once, smaller ones lower it by half per response.
    pub fn observe(&mut self, asked: i32, got: usize, largest: u64) {
        self.last = Some((asked.max(1) as u64, got as u64));
        if largest == 0 {
            return;
        }
        let prev = self.record.unwrap_or(0);
        self.record = Some(largest.max(prev / 2));
        LARGEST_RECORD.fetch_max(largest, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn reservations_come_back_when_dropped() {
        let b = MemoryBudget::new(8 * MIB, 0);
        let r = b.try_take(3 * MIB).expect("free");
        assert_eq!(b.used(), 3 * MIB);
        let mut r2 = b.try_take(5 * MIB).expect("free");
        assert!(b.try_take(1).is_none(), "the budget is full");
        r2.resize(2 * MIB);
        assert_eq!(b.used(), 5 * MIB);
        drop(r);
        drop(r2);
        assert_eq!(b.used(), 0);
        assert!(b.try_take(8 * MIB).is_some());
    }

    #[test]
    fn memory_in_use_beyond_the_budget_is_debt() {
        let b = MemoryBudget::new(4 * MIB, 0);
        let mut r = b.try_take(3 * MIB).expect("free");
        // The response was 6 MiB: 1 MiB was free, 2 MiB are debt.
        r.at_least(6 * MIB);
        assert_eq!(b.used(), 6 * MIB);
        assert!(b.try_take(1).is_none());
        // Giving 3 MiB back pays the debt first: 1 MiB is free again.
        r.resize(3 * MIB);
        assert!(b.try_take(2 * MIB).is_none());
        assert!(b.try_take(MIB).is_some());
    }

    #[test]
    fn a_request_larger_than_the_budget_runs_alone() {
        let b = MemoryBudget::new(2 * MIB, 0);
        let r = b.try_take(100 * MIB).expect("clamped to the budget");
        assert_eq!(r.bytes(), 2 * MIB);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn waiters_are_served_in_order() {
        let b = MemoryBudget::new(4 * MIB, 0);
        let held = b.try_take(4 * MIB).expect("free");
        let (b1, b2) = (b.clone(), b.clone());
        let big = tokio::spawn(async move { b1.take(3 * MIB).await.map(|r| r.bytes()) });
        tokio::task::yield_now().await;
        let small = tokio::spawn(async move { b2.take(MIB).await.map(|r| r.bytes()) });
        tokio::task::yield_now().await;
        // A small request does not overtake the big one waiting before it.
        assert!(b.try_take(MIB).is_none());
        drop(held);
        assert_eq!(big.await.ok().and_then(|r| r.ok()), Some(3 * MIB));
        assert_eq!(small.await.ok().and_then(|r| r.ok()), Some(MIB));
    }

    #[test]
    fn calls_are_sized_from_the_records_seen() {
        let b = MemoryBudget::new(32 * MIB, 0);
        let mut s = CallSizer {
            target: 2 * MIB,
            record: None,
            last: None,
            max_limit: 10_000,
        };
        // Nothing seen: 1 MiB records assumed.
        assert_eq!(s.next_call(), (2, response_cost(2 * MIB)));
        s.observe(2, 2, 1000);
        assert_eq!(s.next_call().0, (2 * MIB / 1000) as i32);
        // A record of 3 MiB: one record per call, its whole size reserved.
        s.observe(2097, 2097, 3 * MIB);
        assert_eq!(s.next_call(), (1, response_cost(3 * MIB)));
        // Smaller records bring the estimate down by half per response.
        s.observe(1, 1, 1000);
        assert_eq!(s.record, Some(3 * MIB / 2));
        // A partial response (near the tip): twice what came, at least 64 KiB.
        s.observe(1, 1, 1000);
        s.observe(1, 1, 1000);
        assert_eq!(s.record, Some(3 * MIB / 8));
        s.record = Some(1000);
        s.observe(2097, 100, 1000);
        assert_eq!(s.next_call(), (200, response_cost(200 * 1000)));
        s.observe(200, 3, 1000);
        assert_eq!(s.next_call().0, 65);
        s.observe(65, 65, 1000);
        assert_eq!(s.next_call().0, 2097);
        // The target is a quarter of the budget, at most 10 MiB of payload.
        assert!(response_cost(CallSizer::new(&b, 10_000).target) <= 8 * MIB);
        let large = MemoryBudget::new(4096 * MIB, 0);
        assert_eq!(CallSizer::new(&large, 10_000).target, MAX_RESPONSE);
    }
}
