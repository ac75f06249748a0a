//! Which records a replay sends, and in which order: one SQL query over the
//! unified view `S` (archive ∪ live) or over a Parquet result set.
//!
//! ```text
//!   S ─▶ bounds (arrival, per-shard sequence) ─▶ horizon ─▶ [compact: last per key, drop tombstoned keys]
//!     ─▶ --where ─▶ ORDER BY position
//! ```
//!
//! A plain selection runs as one such query per piece of a shard
//! ([`range_sql`], see [`crate::replay::order`]); the others as one sorted
//! query ([`ordered_sql`]) that a resume starts after a position.
//!
//! The order is the position of [`crate::consistency::Position`]: lineage
//! depth, shard, sequence and sub-sequence number — the shard's own sequence
//! order, and a child shard after its parents (it is deeper). Arrival times
//! play no part (Kinesis does not promise that they increase). It is a total
//! order, so a resumed replay selects exactly what comes after what was
//! sent, and the records of one partition key (always in one shard or in
//! a chain of ancestors) keep their original order.
//!
//! Replayed copies (records whose payload carries a replay annotation, see
//! [`crate::query::origin`]) are left out unless `--include-replayed`; when
//! included they are ordered and compacted by their original's position and
//! sent unchanged, with the original annotation.
//!
//! With `--compact`, `--where` filters the compacted state (each key's last
//! record), so a key whose last record fails the predicate is not replayed
//! with an older value; records whose key is NULL are not compacted. A key
//! whose last record matches `--tombstone` is deleted: with `--tombstones
//! drop` nothing of it is sent, with `emit` that last record is sent so that
//! consumers delete the key too.
//! Sorting and the compaction window spill to disk under the configured
//! `query.memory_limit`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanBuilder, Int32Builder, RecordBatch};
use arrow::datatypes::{DataType, Int32Type, Int64Type, TimeUnit, TimestampMillisecondType};
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use crate::error::{Error, Result};
use crate::query::bounds::SEQ_RANGE_FN;
use crate::query::origin;
use crate::record::{cmp_sequence, col};
use crate::replay::state::Selection;

/// Name of the horizon function registered in a replay's session.
pub const HORIZON_FN: &str = "fluxcap_in_horizon";
/// Name of the lineage-depth function registered in a replay's session.
pub const DEPTH_FN: &str = "fluxcap_lineage_depth";
/// Name of the position-key function registered in a replay's session.
pub const POSITION_FN: &str = "fluxcap_position";

/// Parse `--since`/`--until`: RFC 3339 (`2026-11-26T01:00:00Z`), a date
/// (`2026-11-26`, midnight UTC), or a duration before `now_ms` (`90s`, `15m`, `2h`, `7d`).
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.timestamp_millis());
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc().timestamp_millis());
    }
    let unit = s.chars().last().unwrap_or(' ');
    let mult: i64 = match unit {
        's' => 1_000,
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        'w' => 7 * 86_400_000,
        _ => 0,
    };
    if mult > 0
        && let Ok(n) = s[..s.len() - 1].trim().parse::<f64>()
        && n >= 0.0
    {
        return Ok(now_ms - (n * mult as f64) as i64);
    }
    Err(Error::Usage(format!(
        "expected a time such as 2026-11-26T01:00:00Z, 2026-11-26, or a duration ago such as 2h or 30m; got {s:?}"
    )))
}

/// A SQL string literal.
pub fn lit(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `sequence_number <op> 'seq'`, numerically (decimal strings of any length).
fn seq_cmp(op: &str, seq: &str) -> String {
    let len = seq.len();
    let strict = if op == ">=" { ">" } else { "<" };
    format!(
        "(octet_length({c}) {strict} {len} OR (octet_length({c}) = {len} AND {c} {op} {l}))",
        c = col::SEQUENCE_NUMBER,
        l = lit(seq)
    )
}

fn ts(ms: i64) -> String {
    let t = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms)
        .unwrap_or(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH);
    format!("TIMESTAMP '{}'", t.format("%Y-%m-%dT%H:%M:%S%.3fZ"))
}

/// The order of a replay: the position of the record (of its original, for
/// an included copy).
fn order(desc: bool) -> String {
    let d = if desc { " DESC" } else { "" };
    [
        "__depth",
        "__pshard",
        "octet_length(__pseq)",
        "__pseq",
        "__psub",
        "__copy",
        col::SHARD_ID,
        "octet_length(sequence_number)",
        col::SEQUENCE_NUMBER,
        col::SUBSEQUENCE_NUMBER,
    ]
    .iter()
    .map(|c| format!("{c}{d}"))
    .collect::<Vec<_>>()
    .join(", ")
}

/// The columns the selection's rows have (see [`Columns`]).
const OUT: &str = "shard_id, sequence_number, subsequence_number, partition_key, \
                   explicit_hash_key, approximate_arrival_timestamp, data, __depth, __copy, \
                   __pshard, __pseq, __psub";

/// The selection query over `table` (already quoted). `horizon`: apply the
/// registered horizon function. Without `ordered`, the query is for counting.
pub fn sql(table: &str, sel: &Selection, horizon: bool, ordered: bool, offset: u64) -> String {
    if ordered {
        ordered_sql(table, sel, horizon, None, offset)
    } else {
        let inner = selection(table, sel, horizon, &[]);
        format!(
            "SELECT count(*) AS n, sum(octet_length(data) + octet_length(partition_key)) AS b FROM ({inner}) AS __r"
        )
    }
}

/// The whole selection in its order, as one query (a global sort):
/// positions after `after` (a position key) only, and the first `offset`
/// of those skipped (a resume of a replay saved without positions).
pub fn ordered_sql(
    table: &str,
    sel: &Selection,
    horizon: bool,
    after: Option<&[u8]>,
    offset: u64,
) -> String {
    let inner = selection(table, sel, horizon, &[]);
    let resumed = match after {
        Some(k) => format!(
            " WHERE {POSITION_FN}(__depth, __pshard, __pseq, __psub) > X'{}'",
            crate::replay::acks::hex(k)
        ),
        None => String::new(),
    };
    let mut q = format!(
        "SELECT {OUT} FROM ({inner}) AS __r{resumed} ORDER BY {}",
        order(false)
    );
    if offset > 0 {
        q.push_str(&format!(" OFFSET {offset}"));
    }
    q
}

/// The records of one source shard whose sequence numbers are in
/// `[from, to)` (either end open), in the shard's order: one piece of a
/// selection that is read shard after shard (see [`crate::replay::order`]).
/// The shard and range filters prune the archive's files by name and leave
/// other shards out of live reads.
pub fn range_sql(
    table: &str,
    sel: &Selection,
    horizon: bool,
    shard: &str,
    from: Option<&str>,
    to: Option<&str>,
) -> String {
    let extra = [
        format!("{} = {}", col::SHARD_ID, lit(shard)),
        format!(
            "{SEQ_RANGE_FN}({}, {}, {})",
            col::SEQUENCE_NUMBER,
            lit(from.unwrap_or("")),
            lit(to.unwrap_or(""))
        ),
    ];
    let inner = selection(table, sel, horizon, &extra);
    format!(
        "SELECT {OUT} FROM ({inner}) AS __r ORDER BY octet_length({seq}), {seq}, {sub}",
        seq = col::SEQUENCE_NUMBER,
        sub = col::SUBSEQUENCE_NUMBER,
    )
}

/// The selected records, unordered, with the columns of [`OUT`] (and more);
/// `extra`: more conditions on the table's own columns.
fn selection(table: &str, sel: &Selection, horizon: bool, extra: &[String]) -> String {
    let mut conds = vec!["TRUE".to_string()];
    conds.extend(extra.iter().cloned());
    if let Some(t) = sel.since_ms {
        conds.push(format!("{} >= {}", col::ARRIVAL, ts(t)));
    }
    if let Some(t) = sel.until_ms {
        conds.push(format!("{} < {}", col::ARRIVAL, ts(t)));
    }
    for (shard, seq) in &sel.from_sequence {
        conds.push(format!(
            "({} <> {} OR {})",
            col::SHARD_ID,
            lit(shard),
            seq_cmp(">=", seq)
        ));
    }
    for (shard, seq) in &sel.to_sequence {
        conds.push(format!(
            "({} <> {} OR {})",
            col::SHARD_ID,
            lit(shard),
            seq_cmp("<=", seq)
        ));
    }
    if horizon {
        conds.push(format!(
            "{HORIZON_FN}({}, {})",
            col::SHARD_ID,
            col::SEQUENCE_NUMBER
        ));
    }
    if !sel.include_replayed {
        conds.push(format!("{} IS NULL", origin::REPLAY_ID));
    }
    // Every record with its position (its original's, for a copy).
    let positioned = format!(
        "SELECT *, \
           coalesce({odepth}, {DEPTH_FN}({shard})) AS __depth, \
           coalesce({oshard}, {shard}) AS __pshard, \
           coalesce({oseq}, {seq}) AS __pseq, \
           coalesce({osub}, {sub}) AS __psub, \
           ({rid} IS NOT NULL) AS __copy \
         FROM {table} WHERE {conds}",
        odepth = origin::ORIGIN_LINEAGE_DEPTH,
        oshard = origin::ORIGIN_SHARD_ID,
        oseq = origin::ORIGIN_SEQUENCE_NUMBER,
        osub = origin::ORIGIN_SUBSEQUENCE_NUMBER,
        rid = origin::REPLAY_ID,
        shard = col::SHARD_ID,
        seq = col::SEQUENCE_NUMBER,
        sub = col::SUBSEQUENCE_NUMBER,
        conds = conds.join(" AND "),
    );
    let predicate = sel
        .predicate
        .as_deref()
        .map(|p| format!("({p})"))
        .unwrap_or_else(|| "TRUE".into());
    if sel.compact {
        let key = sel
            .key
            .as_deref()
            .map(|k| format!("({k})"))
            .unwrap_or_else(|| col::PARTITION_KEY.to_string());
        let tomb = sel
            .tombstone
            .as_deref()
            .map(|t| format!("coalesce(({t}), FALSE)"))
            .unwrap_or_else(|| "FALSE".into());
        let deleted = if sel.emit_tombstones {
            "FALSE".to_string()
        } else {
            format!("({tomb})")
        };
        // Not a window over every record (that would sort the payloads):
        // first each key's greatest position (a hash aggregate over a small
        // sortable key), then the records at that position (a hash join whose
        // build side is one row per key), then one of those few candidates
        // (an original before its copies). Memory follows the number of
        // keys, not the data.
        let records = format!(
            "SELECT *, {key} AS __key, {POSITION_FN}(__depth, __pshard, __pseq, __psub) AS __pos \
             FROM ({positioned}) AS __p"
        );
        let last = format!(
            "SELECT __key AS __lk, max(__pos) AS __lp FROM ({records}) AS __a \
             WHERE __key IS NOT NULL GROUP BY 1"
        );
        let mut parts = vec![format!(
            "SELECT {OUT} FROM (\
               SELECT __r.*, row_number() OVER (PARTITION BY __r.__key ORDER BY {asc}) AS __rn \
               FROM ({last}) AS __l JOIN ({records}) AS __r \
                 ON __r.__key = __l.__lk AND __r.__pos = __l.__lp\
             ) AS __w WHERE __rn = 1 AND NOT {deleted}",
            asc = order(false),
        )];
        if sel.key.is_some() {
            // Records without a key are not compacted.
            parts.push(format!(
                "SELECT {OUT} FROM ({records}) AS __n WHERE __key IS NULL AND NOT {deleted}"
            ));
        }
        // `--where` filters the compacted state; an emitted tombstone is
        // sent whatever the predicate says of it (it deletes the key).
        let keep = if sel.emit_tombstones && sel.tombstone.is_some() {
            format!("({predicate} OR {tomb})")
        } else {
            predicate
        };
        format!(
            "SELECT * FROM ({}) AS __c WHERE {keep}",
            parts.join(" UNION ALL ")
        )
    } else {
        format!("SELECT * FROM ({positioned}) AS __s WHERE {predicate}")
    }
}

/// The records of the selection's busiest partition key (a dry run's
/// estimate: in order, a key's records go one per PutRecords round trip).
pub fn busiest_key_sql(table: &str, sel: &Selection, horizon: bool) -> String {
    let q = selection(table, sel, horizon, &[]);
    format!(
        "SELECT max(n) AS n FROM (SELECT partition_key, count(*) AS n FROM ({q}) AS __b GROUP BY 1) AS __k"
    )
}

/// Check `--where`, `--key` and `--tombstone` on their own before the
/// selection runs, so a mistake names the option (and predicates must be
/// true/false).
pub async fn validate(
    session: &crate::query::QuerySession,
    table: &str,
    sel: &Selection,
) -> Result<()> {
    let checks = [
        ("--where", sel.predicate.as_deref(), true),
        ("--key", sel.key.as_deref(), false),
        ("--tombstone", sel.tombstone.as_deref(), true),
    ];
    for (option, expr, boolean) in checks {
        let Some(expr) = expr else { continue };
        // Name the option and the start of the expression (it may be huge).
        let shown: String = if expr.chars().count() > 60 {
            expr.chars().take(60).chain(['…']).collect()
        } else {
            expr.to_string()
        };
        let bad = |m: String| Error::Usage(format!("{option} {shown:?}: {m}"));
        let df = session
            .sql(&format!("SELECT ({expr}) AS __x FROM {table} LIMIT 0"))
            .await
            .map_err(|e| bad(e.to_string()))?;
        let t = df.schema().field(0).data_type().clone();
        if boolean && !matches!(t, DataType::Boolean | DataType::Null) {
            return Err(bad(format!(
                "expected a true/false predicate, got a value of type {t}"
            )));
        }
    }
    Ok(())
}

/// Register the horizon and lineage functions for one replay.
pub fn register(
    ctx: &SessionContext,
    horizon: Option<&BTreeMap<String, Option<String>>>,
    lineage: &BTreeMap<String, u32>,
) {
    if let Some(h) = horizon {
        ctx.register_udf(ScalarUDF::new_from_impl(HorizonFn {
            horizon: h.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            signature: Signature::any(2, Volatility::Immutable),
        }));
    }
    ctx.register_udf(ScalarUDF::new_from_impl(PositionFn {
        signature: Signature::any(4, Volatility::Immutable),
    }));
    ctx.register_udf(ScalarUDF::new_from_impl(DepthFn {
        depth: lineage
            .iter()
            .map(|(k, v)| (k.clone(), *v as i32))
            .collect(),
        signature: Signature::any(1, Volatility::Immutable),
    }));
}

fn strings(a: &ArrayRef) -> DfResult<ArrayRef> {
    Ok(arrow::compute::cast(a, &DataType::Utf8View)?)
}

/// `fluxcap_in_horizon(shard_id, sequence_number)`: true when the record is
/// at or before its shard's horizon.
#[derive(Debug)]
struct HorizonFn {
    horizon: HashMap<String, Option<String>>,
    signature: Signature,
}

impl PartialEq for HorizonFn {
    fn eq(&self, other: &Self) -> bool {
        self.horizon == other.horizon
    }
}
impl Eq for HorizonFn {}
impl std::hash::Hash for HorizonFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        HORIZON_FN.hash(state);
        self.horizon.len().hash(state);
    }
}

impl ScalarUDFImpl for HorizonFn {
    fn name(&self) -> &str {
        HORIZON_FN
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
        let [shard, seq] = arrays.as_slice() else {
            return exec_err!("{HORIZON_FN} takes (shard_id, sequence_number)");
        };
        let (shard, seq) = (strings(shard)?, strings(seq)?);
        let (shard, seq) = (shard.as_string_view(), seq.as_string_view());
        let mut out = BooleanBuilder::with_capacity(n);
        let mut last: Option<(&str, Option<&str>)> = None;
        for i in 0..shard.len() {
            if shard.is_null(i) || seq.is_null(i) {
                out.append_value(false);
                continue;
            }
            let s = shard.value(i);
            let h = match last {
                Some((ls, h)) if ls == s => h,
                _ => {
                    let h = self.horizon.get(s).and_then(|h| h.as_deref());
                    last = Some((s, h));
                    h
                }
            };
            out.append_value(h.is_some_and(|h| cmp_sequence(seq.value(i), h).is_le()));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `fluxcap_position(depth, shard_id, sequence_number, subsequence_number)`:
/// a binary key whose byte order is the order of
/// [`crate::consistency::Position`] ([`crate::consistency::position_key`]).
#[derive(Debug, PartialEq, Eq, Hash)]
struct PositionFn {
    signature: Signature,
}

impl ScalarUDFImpl for PositionFn {
    fn name(&self) -> &str {
        POSITION_FN
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Binary)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let [depth, shard, seq, sub] = arrays.as_slice() else {
            return exec_err!(
                "{POSITION_FN} takes (depth, shard_id, sequence_number, subsequence_number)"
            );
        };
        let depth = arrow::compute::cast(depth, &DataType::Int64)?;
        let sub = arrow::compute::cast(sub, &DataType::Int64)?;
        let (shard, seq) = (strings(shard)?, strings(seq)?);
        let (depth, sub) = (
            depth.as_primitive::<Int64Type>(),
            sub.as_primitive::<Int64Type>(),
        );
        let (shard, seq) = (shard.as_string_view(), seq.as_string_view());
        let mut out = arrow::array::BinaryBuilder::with_capacity(shard.len(), shard.len() * 48);
        for i in 0..shard.len() {
            if shard.is_null(i) || seq.is_null(i) {
                out.append_null();
                continue;
            }
            let d = if depth.is_null(i) { 0 } else { depth.value(i) };
            let u = if sub.is_null(i) { 0 } else { sub.value(i) };
            out.append_value(crate::consistency::position_key(
                u32::try_from(d.max(0)).unwrap_or(u32::MAX),
                shard.value(i),
                seq.value(i),
                u,
            ));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `fluxcap_lineage_depth(shard_id)`: the shard's lineage depth (0 when unknown).
#[derive(Debug)]
struct DepthFn {
    depth: HashMap<String, i32>,
    signature: Signature,
}

impl PartialEq for DepthFn {
    fn eq(&self, other: &Self) -> bool {
        self.depth == other.depth
    }
}
impl Eq for DepthFn {}
impl std::hash::Hash for DepthFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        DEPTH_FN.hash(state);
        self.depth.len().hash(state);
    }
}

impl ScalarUDFImpl for DepthFn {
    fn name(&self) -> &str {
        DEPTH_FN
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(shard) = arrays.first() else {
            return exec_err!("{DEPTH_FN} takes (shard_id)");
        };
        let shard = strings(shard)?;
        let shard = shard.as_string_view();
        let mut out = Int32Builder::with_capacity(shard.len());
        for i in 0..shard.len() {
            if shard.is_null(i) {
                out.append_value(0);
            } else {
                out.append_value(self.depth.get(shard.value(i)).copied().unwrap_or(0));
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// Cast to a canonical type.
pub(crate) fn cast(a: &ArrayRef, t: &DataType) -> Result<ArrayRef> {
    Ok(arrow::compute::cast(a, t)?)
}

/// One record read from the selection.
pub(crate) struct Row<'a> {
    pub(crate) shard: &'a str,
    pub(crate) seq: &'a str,
    pub(crate) sub: i64,
    pub(crate) pk: &'a str,
    pub(crate) ehk: Option<&'a str>,
    pub(crate) arrival_ms: i64,
    pub(crate) data: &'a [u8],
    pub(crate) depth: i32,
    /// A replayed copy (sent unchanged, with its original annotation).
    pub(crate) copy: bool,
    /// The position's shard, sequence and sub-sequence number (the
    /// original's, for a copy).
    pub(crate) pshard: &'a str,
    pub(crate) pseq: &'a str,
    pub(crate) psub: i64,
}

impl Row<'_> {
    /// The record's position key ([`crate::consistency::position_key`]).
    pub(crate) fn key(&self) -> Vec<u8> {
        crate::replay::acks::row_key(self.depth, self.pshard, self.pseq, self.psub)
    }

    /// The hash key the record is routed by.
    pub(crate) fn hash(&self) -> u128 {
        crate::kinesis::writer::record_hash(self.pk, self.ehk)
    }
}

/// A batch's columns in canonical types.
pub(crate) struct Columns {
    pub(crate) shard: ArrayRef,
    pub(crate) seq: ArrayRef,
    pub(crate) sub: ArrayRef,
    pub(crate) pk: ArrayRef,
    pub(crate) ehk: ArrayRef,
    arrival: ArrayRef,
    pub(crate) data: ArrayRef,
    pub(crate) depth: ArrayRef,
    copy: ArrayRef,
    pshard: ArrayRef,
    pseq: ArrayRef,
    psub: ArrayRef,
}

impl Columns {
    pub(crate) fn of(b: &RecordBatch) -> Result<Self> {
        let c = |i: usize, t: DataType| cast(b.column(i), &t);
        Ok(Columns {
            shard: c(0, DataType::Utf8)?,
            seq: c(1, DataType::Utf8)?,
            sub: c(2, DataType::Int64)?,
            pk: c(3, DataType::Utf8)?,
            ehk: c(4, DataType::Utf8)?,
            arrival: c(
                5,
                DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            )?,
            data: c(6, DataType::Binary)?,
            depth: c(7, DataType::Int32)?,
            copy: c(8, DataType::Boolean)?,
            pshard: c(9, DataType::Utf8)?,
            pseq: c(10, DataType::Utf8)?,
            psub: c(11, DataType::Int64)?,
        })
    }

    pub(crate) fn row(&self, i: usize) -> Row<'_> {
        fn s(a: &ArrayRef, i: usize) -> &str {
            let a = a.as_string::<i32>();
            if a.is_null(i) { "" } else { a.value(i) }
        }
        let ehk = self.ehk.as_string::<i32>();
        let sub = self.sub.as_primitive::<Int64Type>();
        let arr = self.arrival.as_primitive::<TimestampMillisecondType>();
        let data = self.data.as_binary::<i32>();
        let depth = self.depth.as_primitive::<Int32Type>();
        Row {
            shard: s(&self.shard, i),
            seq: s(&self.seq, i),
            sub: if sub.is_null(i) { 0 } else { sub.value(i) },
            pk: s(&self.pk, i),
            ehk: (!ehk.is_null(i)).then(|| ehk.value(i)),
            arrival_ms: if arr.is_null(i) { 0 } else { arr.value(i) },
            data: if data.is_null(i) { &[] } else { data.value(i) },
            depth: if depth.is_null(i) { 0 } else { depth.value(i) },
            copy: {
                let c = self.copy.as_boolean();
                !c.is_null(i) && c.value(i)
            },
            pshard: s(&self.pshard, i),
            pseq: s(&self.pseq, i),
            psub: {
                let p = self.psub.as_primitive::<Int64Type>();
                if p.is_null(i) { 0 } else { p.value(i) }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        let now = 10 * 86_400_000;
        assert_eq!(parse_time("2h", now).ok(), Some(now - 7_200_000));
        assert_eq!(parse_time("30m", now).ok(), Some(now - 1_800_000));
        assert_eq!(parse_time("1970-01-02", now).ok(), Some(86_400_000));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z", now).ok(), Some(1_500));
        assert!(parse_time("yesterday", now).is_err());
        assert!(parse_time("-2h", now).is_err());
    }

    #[test]
    fn sequence_bounds_compare_numerically() {
        let s = seq_cmp(">=", "100");
        assert!(s.contains("octet_length(sequence_number) > 3"));
        assert!(s.contains("sequence_number >= '100'"));
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(lit("it's"), "'it''s'");
    }
}
