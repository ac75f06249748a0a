//! What a query's filters say about arrival time, used to prune hour
//! partitions of the archive and to start live reads at a timestamp.
//!
//! Only conjuncts of the form `approximate_arrival_timestamp <op> <literal>`
//! (either side, `BETWEEN` included) are understood; anything else leaves the
//! range open, which is always safe because every filter is also applied to
//! the rows read.

use datafusion::common::ScalarValue;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator};

use crate::record::col::ARRIVAL as ARRIVAL_COLUMN;

/// Milliseconds per hour partition.
pub const HOUR_MS: i64 = 3_600_000;

/// An inclusive range of arrival times (epoch milliseconds); `None` is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimeRange {
    /// Earliest arrival time a matching record can have.
    pub start_ms: Option<i64>,
    /// Latest arrival time a matching record can have.
    pub end_ms: Option<i64>,
}

impl TimeRange {
    /// The range implied by `filters` (a conjunction).
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut r = TimeRange::default();
        for f in filters {
            r.narrow(f);
        }
        r
    }

    /// True when no arrival time can match.
    pub fn is_empty(&self) -> bool {
        matches!((self.start_ms, self.end_ms), (Some(s), Some(e)) if s > e)
    }

    /// Whether the hour starting at `hour_ms` can hold matching records.
    pub fn overlaps_hour(&self, hour_ms: i64) -> bool {
        self.overlaps(hour_ms, hour_ms + HOUR_MS - 1)
    }

    /// Whether `[from, to]` (inclusive) overlaps the range.
    pub fn overlaps(&self, from: i64, to: i64) -> bool {
        self.start_ms.is_none_or(|s| to >= s) && self.end_ms.is_none_or(|e| from <= e)
    }

    /// Whether `ms` is inside the range.
    pub fn contains(&self, ms: i64) -> bool {
        self.overlaps(ms, ms)
    }

    /// Start of the first and last hour partitions, when both ends are bounded.
    pub fn hours(&self) -> Option<(i64, i64)> {
        let (s, e) = (self.start_ms?, self.end_ms?);
        Some((
            s.div_euclid(HOUR_MS) * HOUR_MS,
            e.div_euclid(HOUR_MS) * HOUR_MS,
        ))
    }

    fn lower(&mut self, v: i64) {
        self.start_ms = Some(self.start_ms.map_or(v, |s| s.max(v)));
    }

    fn upper(&mut self, v: i64) {
        self.end_ms = Some(self.end_ms.map_or(v, |e| e.min(v)));
    }

    fn narrow(&mut self, e: &Expr) {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => {
                self.narrow(left);
                self.narrow(right);
            }
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (op, v) = match (is_arrival(left), is_arrival(right)) {
                    (true, false) => (*op, literal_ms(right)),
                    (false, true) => match op.swap() {
                        Some(op) => (op, literal_ms(left)),
                        None => return,
                    },
                    _ => return,
                };
                let Some((floor, ceil)) = v else { return };
                match op {
                    Operator::Eq => {
                        self.lower(ceil);
                        self.upper(floor);
                    }
                    Operator::Gt => self.lower(floor.saturating_add(1)),
                    Operator::GtEq => self.lower(ceil),
                    Operator::Lt => self.upper(ceil.saturating_sub(1)),
                    Operator::LtEq => self.upper(floor),
                    _ => {}
                }
            }
            Expr::Between(Between {
                expr,
                negated: false,
                low,
                high,
            }) if is_arrival(expr) => {
                if let Some((_, ceil)) = literal_ms(low) {
                    self.lower(ceil);
                }
                if let Some((floor, _)) = literal_ms(high) {
                    self.upper(floor);
                }
            }
            _ => {}
        }
    }
}

fn is_arrival(e: &Expr) -> bool {
    matches!(e, Expr::Column(c) if c.name == ARRIVAL_COLUMN)
}

/// A timestamp literal as whole epoch milliseconds: (floor, ceiling), equal
/// unless the literal has a fraction of a millisecond.
fn literal_ms(e: &Expr) -> Option<(i64, i64)> {
    let Expr::Literal(v, _) = e else { return None };
    let split = |v: i64, per_ms: i64| (v.div_euclid(per_ms), -(-v).div_euclid(per_ms));
    match v {
        ScalarValue::TimestampSecond(Some(s), _) => s.checked_mul(1000).map(|ms| (ms, ms)),
        ScalarValue::TimestampMillisecond(Some(ms), _) => Some((*ms, *ms)),
        ScalarValue::TimestampMicrosecond(Some(us), _) => Some(split(*us, 1000)),
        ScalarValue::TimestampNanosecond(Some(ns), _) => Some(split(*ns, 1_000_000)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::{col, lit};

    fn ts(ms: i64) -> Expr {
        lit(ScalarValue::TimestampMillisecond(
            Some(ms),
            Some("UTC".into()),
        ))
    }

    #[test]
    fn comparisons_and_between_narrow_the_range() {
        let a = || col(ARRIVAL_COLUMN);
        let r = TimeRange::from_filters(&[a().gt_eq(ts(10 * HOUR_MS)), ts(12 * HOUR_MS).gt(a())]);
        assert_eq!(r.start_ms, Some(10 * HOUR_MS));
        assert_eq!(r.end_ms, Some(12 * HOUR_MS - 1));
        // `< 12:00` ends in hour 11: hour 12 is not listed.
        assert_eq!(r.hours(), Some((10 * HOUR_MS, 11 * HOUR_MS)));
        let us = lit(ScalarValue::TimestampMicrosecond(Some(5_500), None));
        let r = TimeRange::from_filters(&[a().gt(us.clone()), a().lt_eq(us)]);
        assert_eq!((r.start_ms, r.end_ms), (Some(6), Some(5)));
        assert!(r.is_empty());
        let b = TimeRange::from_filters(&[a().between(ts(5), ts(HOUR_MS + 5))]);
        assert_eq!(b.hours(), Some((0, HOUR_MS)));
        assert!(b.overlaps_hour(HOUR_MS));
        assert!(!b.overlaps_hour(2 * HOUR_MS));
    }

    #[test]
    fn other_predicates_leave_the_range_open() {
        let r = TimeRange::from_filters(&[
            col("partition_key").eq(lit("k")),
            col(ARRIVAL_COLUMN)
                .gt(ts(1))
                .or(col(ARRIVAL_COLUMN).lt(ts(0))),
        ]);
        assert_eq!(r, TimeRange::default());
        assert!(r.hours().is_none());
        let empty = TimeRange::from_filters(&[
            col(ARRIVAL_COLUMN).gt(ts(10)),
            col(ARRIVAL_COLUMN).lt(ts(5)),
        ]);
        assert!(empty.is_empty());
    }
}
