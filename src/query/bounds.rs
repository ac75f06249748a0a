//! What a query's filters say about arrival time, shards and sequence
//! numbers, used to prune hour partitions and data files of the archive, to
//! start live reads at a timestamp and to leave shards out of live reads.
//!
//! Only conjuncts of the forms `approximate_arrival_timestamp <op> <literal>`
//! (either side, `BETWEEN` included), `shard_id = <literal>`, `shard_id IN
//! (<literals>)` and [`SEQ_RANGE_FN`]`(sequence_number, lo, hi)` are
//! understood; anything else leaves the range open, which is always safe
//! because every filter is also applied to the rows read.
//!
//! A data file's name gives its shard and its first record, and within one
//! hour partition a shard's files hold disjoint runs of its sequence space,
//! so a shard and sequence range select files without opening any
//! ([`ShardRange`]).

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{Array, AsArray, BooleanBuilder};
use arrow::datatypes::DataType;
use datafusion::common::{Result as DfResult, ScalarValue, exec_err};
use datafusion::logical_expr::expr::InList;
use datafusion::logical_expr::{
    Between, BinaryExpr, ColumnarValue, Expr, Operator, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};

use crate::record::cmp_sequence;
use crate::record::col::{
    ARRIVAL as ARRIVAL_COLUMN, PARTITION_KEY as PARTITION_KEY_COLUMN,
    SEQUENCE_NUMBER as SEQUENCE_COLUMN, SHARD_ID as SHARD_COLUMN,
};

/// `fluxcap_seq_range(sequence_number, lo, hi)`: `lo <= sequence_number < hi`
/// compared as numbers (decimal strings of any length); an empty `lo` or `hi`
/// is unbounded. Registered in every session; a filter with literal bounds
/// prunes archive files and live shards.
pub const SEQ_RANGE_FN: &str = "fluxcap_seq_range";

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

/// What a query's filters say about shards and sequence numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardRange {
    /// Only these Kinesis shard ids can match (`None`: any).
    pub shards: Option<BTreeSet<String>>,
    /// Sequence numbers at or after this one (inclusive).
    pub from_seq: Option<String>,
    /// Sequence numbers before this one (exclusive).
    pub to_seq: Option<String>,
}

impl ShardRange {
    /// The range implied by `filters` (a conjunction).
    pub fn from_filters(filters: &[Expr]) -> Self {
        let mut r = ShardRange::default();
        for f in filters {
            r.narrow(f);
        }
        r
    }

    /// Whether records of Kinesis shard `shard` can match.
    pub fn has_shard(&self, shard: &str) -> bool {
        self.shards.as_ref().is_none_or(|s| s.contains(shard))
    }

    /// Whether a sequence range can match that holds only numbers greater
    /// than `after` (the records of a live read after a committed position).
    pub fn reaches_past(&self, after: &str) -> bool {
        self.to_seq
            .as_deref()
            .is_none_or(|to| cmp_sequence(to, after).is_gt())
    }

    /// Whether the range can match a record at `seq`.
    pub fn contains_seq(&self, seq: &str) -> bool {
        self.from_seq
            .as_deref()
            .is_none_or(|f| cmp_sequence(seq, f).is_ge())
            && self
                .to_seq
                .as_deref()
                .is_none_or(|t| cmp_sequence(seq, t).is_lt())
    }

    /// Which of one shard's data files of one hour partition (their first
    /// sequence numbers, in the shard's order) can hold matching records:
    /// not those starting at or after `to_seq`, and of those starting at or
    /// before `from_seq` only the last one (the files hold disjoint runs).
    pub fn keep_files(&self, firsts: &[&str]) -> Vec<bool> {
        let mut keep: Vec<bool> = firsts
            .iter()
            .map(|f| {
                self.to_seq
                    .as_deref()
                    .is_none_or(|t| cmp_sequence(f, t).is_lt())
            })
            .collect();
        if let Some(from) = self.from_seq.as_deref() {
            // The last file starting at or before `from` may hold it.
            let last_before = firsts.iter().rposition(|f| cmp_sequence(f, from).is_le());
            for (i, k) in keep.iter_mut().enumerate() {
                if last_before.is_some_and(|l| i < l) {
                    *k = false;
                }
            }
        }
        keep
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
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Eq,
                right,
            }) => {
                let v = match (
                    is_column(left, SHARD_COLUMN),
                    is_column(right, SHARD_COLUMN),
                ) {
                    (true, false) => literal_str(right),
                    (false, true) => literal_str(left),
                    _ => None,
                };
                if let Some(v) = v {
                    self.only([v].into_iter().collect());
                }
            }
            Expr::InList(InList {
                expr,
                list,
                negated: false,
            }) if is_column(expr, SHARD_COLUMN) => {
                let values: Option<BTreeSet<String>> = list.iter().map(literal_str).collect();
                if let Some(v) = values {
                    self.only(v);
                }
            }
            Expr::ScalarFunction(f) if f.func.name() == SEQ_RANGE_FN => {
                let [c, lo, hi] = f.args.as_slice() else {
                    return;
                };
                if !is_column(c, SEQUENCE_COLUMN) {
                    return;
                }
                if let Some(lo) = literal_str(lo).filter(|s| !s.is_empty()) {
                    let keep = self
                        .from_seq
                        .as_deref()
                        .is_some_and(|cur| cmp_sequence(cur, &lo).is_ge());
                    if !keep {
                        self.from_seq = Some(lo);
                    }
                }
                if let Some(hi) = literal_str(hi).filter(|s| !s.is_empty()) {
                    let keep = self
                        .to_seq
                        .as_deref()
                        .is_some_and(|cur| cmp_sequence(cur, &hi).is_le());
                    if !keep {
                        self.to_seq = Some(hi);
                    }
                }
            }
            _ => {}
        }
    }

    fn only(&mut self, shards: BTreeSet<String>) {
        self.shards = Some(match self.shards.take() {
            Some(cur) => cur.intersection(&shards).cloned().collect(),
            None => shards,
        });
    }
}

/// The partition keys a matching record can have, when the filters (a
/// conjunction) name them: `partition_key = '<literal>'`,
/// `partition_key IN ('<literal>', …)`, and `AND`/`OR` of those (DataFusion
/// turns a short `IN` list into `OR`s), on the column itself (a cast could
/// compare other values). `None`: any key.
pub fn partition_keys(filters: &[Expr]) -> Option<BTreeSet<String>> {
    fn is_key(e: &Expr) -> bool {
        matches!(e, Expr::Column(c) if c.name == PARTITION_KEY_COLUMN)
    }
    fn keys_of(e: &Expr) -> Option<BTreeSet<String>> {
        match e {
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::And,
                right,
            }) => match (keys_of(left), keys_of(right)) {
                (Some(a), Some(b)) => Some(a.intersection(&b).cloned().collect()),
                (Some(a), None) | (None, Some(a)) => Some(a),
                (None, None) => None,
            },
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Or,
                right,
            }) => {
                let (mut a, b) = (keys_of(left)?, keys_of(right)?);
                a.extend(b);
                Some(a)
            }
            Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Eq,
                right,
            }) => match (is_key(left), is_key(right)) {
                (true, false) => literal_str(right).map(|v| [v].into()),
                (false, true) => literal_str(left).map(|v| [v].into()),
                _ => None,
            },
            Expr::InList(InList {
                expr,
                list,
                negated: false,
            }) if is_key(expr) => list.iter().map(literal_str).collect(),
            _ => None,
        }
    }
    filters
        .iter()
        .filter_map(keys_of)
        .reduce(|a, b| a.intersection(&b).cloned().collect())
}

fn is_column(e: &Expr, name: &str) -> bool {
    match e {
        Expr::Column(c) => c.name == name,
        Expr::Cast(c) => is_column(&c.expr, name),
        _ => false,
    }
}

fn literal_str(e: &Expr) -> Option<String> {
    match e {
        Expr::Literal(
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)),
            _,
        ) => Some(s.clone()),
        Expr::Cast(c) => literal_str(&c.expr),
        _ => None,
    }
}

/// The [`SEQ_RANGE_FN`] function.
pub fn seq_range_udf() -> ScalarUDF {
    ScalarUDF::new_from_impl(SeqRangeFn {
        signature: Signature::any(3, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SeqRangeFn {
    signature: Signature,
}

impl ScalarUDFImpl for SeqRangeFn {
    fn name(&self) -> &str {
        SEQ_RANGE_FN
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Boolean)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let n = args.number_rows;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [seq, lo, hi] = arrays.as_slice() else {
            return exec_err!("{SEQ_RANGE_FN} takes (sequence_number, lo, hi)");
        };
        let [seq, lo, hi] = [seq, lo, hi].map(|a| arrow::compute::cast(a, &DataType::Utf8View));
        let (seq, lo, hi) = (seq?, lo?, hi?);
        let (seq, lo, hi) = (
            seq.as_string_view(),
            lo.as_string_view(),
            hi.as_string_view(),
        );
        let mut out = BooleanBuilder::with_capacity(n);
        for i in 0..seq.len() {
            if seq.is_null(i) {
                out.append_null();
                continue;
            }
            let s = seq.value(i);
            let above =
                lo.is_null(i) || lo.value(i).is_empty() || cmp_sequence(s, lo.value(i)).is_ge();
            let below =
                hi.is_null(i) || hi.value(i).is_empty() || cmp_sequence(s, hi.value(i)).is_lt();
            out.append_value(above && below);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
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
    fn shard_and_sequence_filters_select_files_by_name() {
        let f = |lo: &str, hi: &str| {
            Expr::ScalarFunction(datafusion::logical_expr::expr::ScalarFunction::new_udf(
                Arc::new(seq_range_udf()),
                vec![col(SEQUENCE_COLUMN), lit(lo), lit(hi)],
            ))
        };
        let r = ShardRange::from_filters(&[
            col(SHARD_COLUMN).eq(lit("s1")),
            f("200", ""),
            f("", "1000"),
        ]);
        assert!(r.has_shard("s1") && !r.has_shard("s2"));
        // Files start at 100, 150, 250 (holds 200..), 900, 1000 (past the end).
        let keep = r.keep_files(&["100", "150", "250", "900", "1000"]);
        assert_eq!(keep, [false, true, true, true, false]);
        assert!(r.contains_seq("999") && !r.contains_seq("1000") && !r.contains_seq("99"));
        assert!(r.reaches_past("998") && !r.reaches_past("1000"));
        let both = ShardRange::from_filters(&[
            col(SHARD_COLUMN).in_list(vec![lit("a"), lit("b")], false),
            col(SHARD_COLUMN).eq(lit("b")),
        ]);
        assert_eq!(both.shards, Some(["b".to_string()].into_iter().collect()));
        let open = ShardRange::from_filters(&[col(SHARD_COLUMN)
            .eq(lit("a"))
            .or(col(SHARD_COLUMN).eq(lit("b")))]);
        assert_eq!(open, ShardRange::default());
    }

    #[test]
    fn key_filters_name_the_keys() {
        let k = || col(PARTITION_KEY_COLUMN);
        let set = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>());
        assert_eq!(partition_keys(&[k().eq(lit("a"))]), set(&["a"]));
        assert_eq!(partition_keys(&[lit("a").eq(k())]), set(&["a"]));
        assert_eq!(
            partition_keys(&[k().in_list(vec![lit("a"), lit("b")], false)]),
            set(&["a", "b"])
        );
        // Conjuncts intersect.
        assert_eq!(
            partition_keys(&[
                k().in_list(vec![lit("a"), lit("b")], false),
                k().eq(lit("b")).and(col(SHARD_COLUMN).eq(lit("s")))
            ]),
            set(&["b"])
        );
        // OR of keys: either.
        assert_eq!(
            partition_keys(&[k().eq(lit("a")).or(k().eq(lit("b")))]),
            set(&["a", "b"])
        );
        // Anything else: any key.
        assert_eq!(
            partition_keys(&[k().eq(lit("a")).or(col(SHARD_COLUMN).eq(lit("b")))]),
            None
        );
        assert_eq!(partition_keys(&[k().in_list(vec![lit("a")], true)]), None);
        assert_eq!(partition_keys(&[k().not_eq(lit("a"))]), None);
        assert_eq!(partition_keys(&[k().like(lit("a%"))]), None);
        assert_eq!(partition_keys(&[col(SHARD_COLUMN).eq(lit("a"))]), None);
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
