//! Which records of a replay are acknowledged, kept so that a resume sends
//! again as little as possible, and what a resume skips.
//!
//! Records go out in the order of their positions (lineage depth, shard,
//! sequence, sub-sequence) and are acknowledged out of order: each target
//! shard has its own sender, and a throttled shard lags behind the others.
//! Progress keeps
//!
//! ```text
//!   output order ─────────────────────────────────────────────────────▶
//!   [ acknowledged prefix ]│ through
//!   target shard A:         ✓ ✓ ✓ ✓ ✓ ✓ ✓ ✓ │ through(A)          (all of A up to here)
//!   target shard B (slow):  ✓ · · ✓ ✓        acked(B) = the ✓ above its first ·
//! ```
//!
//! * `through`: every record up to this position is acknowledged;
//! * per target hash key range: every record of the range up to
//!   `through(t)` is acknowledged, and the list `acked(t)` above it.
//!
//! A resume selects only positions after `through` (a predicate that prunes
//! what was sent) and skips a record whose target range says it is
//! acknowledged. The hash key of a record decides its range, so marks stay
//! right when the target was resharded in between (a record is skipped when
//! any saved range holding its hash key says so).
//!
//! What a resume sends again is therefore at most the records acknowledged
//! after the last progress save (fewer than `replay.checkpoint_records`, or
//! one `replay.checkpoint_interval` of them) plus the PutRecords batch each
//! target shard had in flight at the crash (≤ 500 records per target shard)
//! — records that the target may or may not have stored.

use std::collections::BTreeMap;

use crate::consistency::position_key;
use crate::replay::state::TargetMark;

/// Lower-case hex of a position key.
pub fn hex(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// A position key from [`hex`]; `None` when malformed.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A target hash key range of this run.
#[derive(Debug, Clone)]
pub struct Range {
    /// Target shard id.
    pub shard_id: String,
    /// First hash key.
    pub start: u128,
    /// Last hash key (inclusive).
    pub end: u128,
}

/// A saved mark, parsed.
#[derive(Debug, Clone)]
struct Mark {
    shard_id: String,
    start: u128,
    end: u128,
    through: Option<Vec<u8>>,
    acked: std::collections::BTreeSet<Vec<u8>>,
}

impl Mark {
    fn parse(m: &TargetMark) -> Option<Mark> {
        Some(Mark {
            shard_id: m.shard_id.clone(),
            start: m.hash_start.parse().ok()?,
            end: m.hash_end.parse().ok()?,
            through: match &m.through {
                Some(t) => Some(unhex(t)?),
                None => None,
            },
            acked: m.acked.iter().filter_map(|a| unhex(a)).collect(),
        })
    }

    fn holds(&self, hash: u128) -> bool {
        self.start <= hash && hash <= self.end
    }

    fn covers(&self, key: &[u8]) -> bool {
        self.through.as_deref().is_some_and(|t| key <= t) || self.acked.contains(key)
    }

    fn save(&self) -> TargetMark {
        TargetMark {
            shard_id: self.shard_id.clone(),
            hash_start: self.start.to_string(),
            hash_end: self.end.to_string(),
            through: self.through.as_deref().map(hex),
            acked: self.acked.iter().map(|k| hex(k)).collect(),
        }
    }
}

/// What an earlier run left acknowledged: what a resume does not send again.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    /// Every record up to this position is acknowledged.
    pub through: Option<Vec<u8>>,
    marks: Vec<Mark>,
}

impl Resume {
    /// From saved progress (`through`, `targets`).
    pub fn new(through: Option<&str>, targets: &[TargetMark]) -> Self {
        Resume {
            through: through.and_then(unhex),
            marks: targets.iter().filter_map(Mark::parse).collect(),
        }
    }

    /// Whether the record at `key` with hash key `hash` is acknowledged.
    pub fn done(&self, key: &[u8], hash: u128) -> bool {
        self.through.as_deref().is_some_and(|t| key <= t)
            || self.marks.iter().any(|m| m.holds(hash) && m.covers(key))
    }
}

/// Acknowledgement bookkeeping of one run.
#[derive(Debug, Default)]
pub struct Acks {
    /// Records before this ordinal are all acknowledged.
    pub next: u64,
    /// Records acknowledged above `next`: ordinal → bytes.
    above: BTreeMap<u64, usize>,
    /// Bytes acknowledged (payload + key), earlier runs' included.
    pub bytes: u64,
    /// Sent records not in the prefix yet: ordinal → (target range, position key).
    sent: BTreeMap<u64, (usize, Option<Vec<u8>>)>,
    /// Position of the prefix's last record.
    through: Option<Vec<u8>>,
    /// Position of the last record sent (or skipped as acknowledged).
    reached: Option<Vec<u8>>,
    /// This run's target ranges (index = the writer's shard index).
    ranges: Vec<Range>,
    /// Marks of earlier runs, kept until the prefix passes them.
    earlier: Vec<Mark>,
}

impl Acks {
    /// Bookkeeping that starts at ordinal `start` after what `resume` says
    /// is acknowledged, `bytes` of it.
    pub fn new(start: u64, bytes: u64, resume: &Resume) -> Self {
        Acks {
            next: start,
            bytes,
            through: resume.through.clone(),
            reached: resume.through.clone(),
            earlier: resume.marks.clone(),
            ..Default::default()
        }
    }

    /// The target's hash key ranges (a Kinesis target).
    pub fn set_ranges(&mut self, ranges: Vec<Range>) {
        self.ranges = ranges;
    }

    /// Records acknowledged in all.
    pub fn count(&self) -> u64 {
        self.next + self.above.len() as u64
    }

    /// Record `idx` at position `key` (none for a followed live record) is
    /// on its way to target range `range`.
    pub fn sent(&mut self, idx: u64, range: usize, key: Option<Vec<u8>>) {
        if let Some(k) = &key {
            self.reached = Some(k.clone());
        }
        self.sent.insert(idx, (range, key));
    }

    /// A record at `key` was skipped: an earlier run had it acknowledged.
    pub fn skipped(&mut self, key: Vec<u8>) {
        self.reached = Some(key);
    }

    /// Record `idx` is acknowledged (`bytes` counted).
    pub fn ack(&mut self, idx: u64, bytes: usize) {
        if idx < self.next {
            return;
        }
        self.bytes += bytes as u64;
        self.above.insert(idx, bytes);
        while self.above.remove(&self.next).is_some() {
            if let Some((_, Some(k))) = self.sent.remove(&self.next) {
                self.through = Some(k);
            } else {
                self.sent.remove(&self.next);
            }
            self.next += 1;
        }
        if self.sent.is_empty() {
            // Nothing in flight: everything reached is acknowledged.
            if let Some(r) = &self.reached {
                self.through = Some(r.clone());
            }
        }
    }

    /// What to save: the prefix's last position and the marks per target range.
    pub fn marks(&self) -> (Option<String>, Vec<TargetMark>) {
        let through = self.through.clone();
        let mut marks: Vec<Mark> = Vec::new();
        for (i, r) in self.ranges.iter().enumerate() {
            // Up to the first record of this range still unacknowledged,
            // everything of it is acknowledged.
            let mut first_open = false;
            let mut last_before: Option<&Vec<u8>> = None;
            let mut acked = std::collections::BTreeSet::new();
            for (idx, (range, key)) in &self.sent {
                if *range != i {
                    continue;
                }
                let Some(key) = key else { continue };
                let done = self.above.contains_key(idx);
                match (first_open, done) {
                    (false, true) => last_before = Some(key),
                    (false, false) => first_open = true,
                    (true, true) => {
                        acked.insert(key.clone());
                    }
                    (true, false) => {}
                }
            }
            let t = if first_open {
                last_before.cloned()
            } else {
                // Everything reached that routes here is acknowledged.
                self.reached.clone()
            };
            marks.push(Mark {
                shard_id: r.shard_id.clone(),
                start: r.start,
                end: r.end,
                through: t,
                acked,
            });
        }
        // Earlier runs' marks: merged into this run's range when it is the
        // same, else kept as they are.
        for e in &self.earlier {
            match marks
                .iter_mut()
                .find(|m| m.start == e.start && m.end == e.end)
            {
                Some(m) => {
                    if e.through > m.through {
                        m.through = e.through.clone();
                    }
                    m.acked.extend(e.acked.iter().cloned());
                }
                None => marks.push(e.clone()),
            }
        }
        // Drop what the prefix (or a range's own `through`) covers.
        for m in &mut marks {
            if let (Some(t), Some(g)) = (&m.through, &through)
                && t <= g
            {
                m.through = None;
            }
            let (mt, g) = (m.through.clone(), through.clone());
            m.acked
                .retain(|k| g.as_ref().is_none_or(|g| k > g) && mt.as_ref().is_none_or(|t| k > t));
        }
        marks.retain(|m| m.through.is_some() || !m.acked.is_empty());
        (
            through.as_deref().map(hex),
            marks.iter().map(Mark::save).collect(),
        )
    }
}

/// The position key of a selected row (its original's, for a copy).
pub fn row_key(depth: i32, shard: &str, seq: &str, sub: i64) -> Vec<u8> {
    position_key(u32::try_from(depth.max(0)).unwrap_or(0), shard, seq, sub)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::parse_position_key as parse_key;

    fn k(seq: u32) -> Vec<u8> {
        row_key(0, "s", &seq.to_string(), 0)
    }

    fn ranges() -> Vec<Range> {
        vec![
            Range {
                shard_id: "a".into(),
                start: 0,
                end: 99,
            },
            Range {
                shard_id: "b".into(),
                start: 100,
                end: 199,
            },
        ]
    }

    #[test]
    fn the_prefix_advances_only_over_acknowledged_records() {
        let mut a = Acks::new(10, 0, &Resume::default());
        a.sent(10, 0, Some(k(1)));
        a.sent(11, 0, Some(k(2)));
        a.ack(11, 5);
        assert_eq!((a.next, a.count()), (10, 11));
        a.ack(10, 3);
        assert_eq!((a.next, a.bytes), (12, 8));
        a.ack(9, 100); // before the start: ignored
        assert_eq!(a.next, 12);
        assert_eq!(a.marks().0, Some(hex(&k(2))));
    }

    #[test]
    fn a_slow_target_shard_holds_back_only_itself() {
        let mut a = Acks::new(0, 0, &Resume::default());
        a.set_ranges(ranges());
        // Ordinals 0..6 alternate between range 1 (slow) and range 0.
        for i in 0..6u64 {
            a.sent(i, (i % 2 == 0) as usize, Some(k(i as u32 + 1)));
        }
        for i in [1u64, 3, 5, 2] {
            a.ack(i, 1);
        }
        // 0 (range b) is open: the prefix is empty.
        let (through, marks) = a.marks();
        assert_eq!(through, None);
        // Range a: everything reached is acknowledged.
        assert_eq!(marks[0].through, Some(hex(&k(6))));
        // Range b: open at ordinal 0, acknowledged above it: ordinal 2.
        assert_eq!(marks[1].through, None);
        assert_eq!(marks[1].acked, vec![hex(&k(3))]);
        let r = Resume::new(through.as_deref(), &marks);
        let hash_a = 5;
        let hash_b = 150;
        assert!(r.done(&k(2), hash_a) && r.done(&k(6), hash_a));
        assert!(!r.done(&k(1), hash_b) && r.done(&k(3), hash_b) && !r.done(&k(5), hash_b));
        assert!(!r.done(&k(7), hash_a));
    }

    #[test]
    fn earlier_marks_are_kept_until_the_prefix_passes_them() {
        let earlier = Resume::new(
            None,
            &[TargetMark {
                shard_id: "old".into(),
                hash_start: "0".into(),
                hash_end: "199".into(),
                through: None,
                acked: vec![hex(&k(5))],
            }],
        );
        let mut a = Acks::new(0, 0, &earlier);
        a.set_ranges(ranges());
        a.sent(0, 0, Some(k(1)));
        let (_, marks) = a.marks();
        assert!(marks.iter().any(|m| m.acked == vec![hex(&k(5))]));
        a.skipped(k(5));
        a.sent(1, 1, Some(k(6)));
        a.ack(0, 1);
        a.ack(1, 1);
        let (through, marks) = a.marks();
        assert_eq!(through, Some(hex(&k(6))));
        assert!(marks.iter().all(|m| m.acked.is_empty()), "{marks:?}");
    }

    #[test]
    fn keys_parse_back() {
        let key = row_key(2, "shardId-0001", "00420", -3);
        assert_eq!(
            parse_key(&key),
            Some((2, "shardId-0001".to_string(), "420".to_string(), -3))
        );
        assert_eq!(parse_key(&key[..5]), None);
    }

    #[test]
    fn hex_round_trips() {
        let key = k(123456789);
        assert_eq!(unhex(&hex(&key)), Some(key));
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("zz"), None);
    }
}
