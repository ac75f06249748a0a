//! The selection in its order, as a list of statements to run one after the
//! other, so that a large replay neither sorts all of its payloads at once
//! nor reads again what an earlier run sent.
//!
//! The order is the position: lineage depth, shard, sequence, sub-sequence.
//! It puts one shard's records together, and a shard's archive is made of
//! files that each hold a run of its records in order and whose names give
//! the first one (within an hour partition the runs are disjoint; files of
//! different hours can interleave when arrival times go back). So a plain
//! replay is read shard after shard, and each shard in pieces that start
//! where a file starts, about [`PIECE_BYTES`] of Parquet each:
//!
//! ```text
//!   shards by (depth, id):   s0 ───────────────────▶ s1 ─────────▶ s2 …
//!   pieces of s0:            [f1 f2 f3)[f4 f5)[f6 …  live tail of s0]
//!   statement per piece:     shard_id = 's0' AND fluxcap_seq_range(seq, lo, hi)
//!                            ORDER BY seq, sub          (sorts one piece only)
//! ```
//!
//! The shard and range filters make the archive table open only the files
//! that can hold the piece's records (per hour partition: see
//! [`crate::query::bounds::ShardRange::keep_files`]) and the live table read
//! only that shard, and only for the last piece. Memory follows the piece (and the shard's unarchived tail, which
//! the sort spills to disk when it is large), not the selection.
//!
//! A resume starts after a position: the shards before it and the pieces
//! that end before it are not read at all, and the piece that holds it
//! starts at its sequence number.
//!
//! A compacted replay, one that includes replayed copies (ordered by their
//! originals' positions, which can lie in any shard) and one fed from a
//! Parquet result set keep one sorted query; its resume is a position
//! predicate applied before the sort (and, for progress saved by an older
//! version without positions, an OFFSET).

use datafusion::common::ScalarValue;
use datafusion::prelude::{col, lit};
use std::collections::BTreeMap;

use crate::consistency::parse_position_key;
use crate::error::Result;
use crate::query::QuerySession;
use crate::query::archive_table::ArchiveTable;
use crate::record::{cmp_sequence, col as rcol};
use crate::replay::select;
use crate::replay::state::{Manifest, Source};

/// About this much Parquet (compressed) is sorted per statement.
pub const PIECE_BYTES: u64 = 32 * 1024 * 1024;

/// Where a run starts in the order.
#[derive(Debug, Clone, Default)]
pub struct Start<'a> {
    /// After this position key (the acknowledged prefix of earlier runs).
    pub after: Option<&'a [u8]>,
    /// Skip this many records first (progress saved without positions).
    pub offset: u64,
}

/// The statements that read the selection of `m` from `table` in order.
pub async fn statements(
    session: &QuerySession,
    table: &str,
    m: &Manifest,
    start: &Start<'_>,
) -> Result<Vec<String>> {
    let horizon = m.horizon.is_some();
    let sel = &m.selection;
    let stream = match &m.source {
        Source::Stream { stream } if !sel.compact && !sel.include_replayed && start.offset == 0 => {
            stream
        }
        _ => {
            return Ok(vec![select::ordered_sql(
                table,
                sel,
                horizon,
                start.after,
                start.offset,
            )]);
        }
    };
    // Shards that have records in the horizon, in the order.
    let mut shards: Vec<(u32, String)> = match &m.horizon {
        Some(h) => h
            .iter()
            .filter(|(_, last)| last.is_some())
            .map(|(s, _)| s.clone())
            .collect::<Vec<_>>(),
        None => m.lineage.keys().cloned().collect(),
    }
    .into_iter()
    .map(|s| {
        let s = crate::archive::identity::split_key(&s).0.to_string();
        (m.lineage.get(&s).copied().unwrap_or(0), s)
    })
    .collect();
    shards.sort();
    shards.dedup();
    let resume = start.after.and_then(parse_position_key);
    let files = archived_firsts(session, stream, sel.since_ms, sel.until_ms).await?;
    let mut out = Vec::new();
    for (depth, shard) in &shards {
        let from: Option<&str> = match &resume {
            Some((d, s, _, _)) if (*depth, shard.as_str()) < (*d, s.as_str()) => continue,
            Some((d, s, seq, _)) if (*depth, shard.as_str()) == (*d, s.as_str()) => {
                Some(seq.as_str())
            }
            _ => None,
        };
        let bounds = piece_bounds(files.get(shard).map(Vec::as_slice).unwrap_or(&[]));
        let mut lo: Option<&str> = from;
        for hi in bounds.iter().map(String::as_str) {
            if lo.is_some_and(|l| cmp_sequence(hi, l).is_le()) {
                // The piece ends before the resume point.
                continue;
            }
            out.push(select::range_sql(table, sel, horizon, shard, lo, Some(hi)));
            lo = Some(hi);
        }
        out.push(select::range_sql(table, sel, horizon, shard, lo, None));
    }
    Ok(out)
}

/// Where pieces of a shard start: the first sequence number of every few
/// files, so that each piece holds about [`PIECE_BYTES`]. `files`: (first
/// sequence number, size) of the shard's files in order.
fn piece_bounds(files: &[(String, u64)]) -> Vec<String> {
    let mut bounds = Vec::new();
    let mut size = 0u64;
    for (i, (first, bytes)) in files.iter().enumerate() {
        // A piece ends where a file starts, never between two files that
        // start at the same sequence number (one aggregated record's
        // sub-records split by a flush).
        let distinct = i > 0 && files[i - 1].0 != *first;
        if size >= PIECE_BYTES && distinct {
            bounds.push(first.clone());
            size = 0;
        }
        size += bytes;
    }
    bounds
}

/// Per Kinesis shard, the (first sequence number, size) of its committed
/// files in the replay's time range, in order.
async fn archived_firsts(
    session: &QuerySession,
    stream: &str,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
) -> Result<BTreeMap<String, Vec<(String, u64)>>> {
    let snapshot = session.snapshot(stream).await?;
    let table = ArchiveTable::new(
        session.archive.clone(),
        stream,
        datafusion::execution::object_store::ObjectStoreUrl::local_filesystem(),
    );
    let ts = |ms: i64| {
        lit(ScalarValue::TimestampMillisecond(
            Some(ms),
            Some("UTC".into()),
        ))
    };
    let mut filters = Vec::new();
    if let Some(t) = since_ms {
        filters.push(col(rcol::ARRIVAL).gt_eq(ts(t)));
    }
    if let Some(t) = until_ms {
        filters.push(col(rcol::ARRIVAL).lt(ts(t)));
    }
    let state = session.ctx.state();
    let files = table
        .select_files(&state, &filters, &snapshot)
        .await
        .map_err(|e| session.error(e))?;
    let mut out: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    for f in files {
        let Some(name) = f
            .meta
            .location
            .filename()
            .and_then(crate::archive::layout::parse_data_file_name)
        else {
            continue;
        };
        let shard = crate::archive::identity::split_key(&name.shard_id)
            .0
            .to_string();
        out.entry(shard)
            .or_default()
            .push((name.first.sequence_number, f.meta.size));
    }
    for files in out.values_mut() {
        files.sort_by(|a, b| cmp_sequence(&a.0, &b.0));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_hold_about_the_piece_size_and_never_split_a_sequence_number() {
        let mb = 1024 * 1024;
        let files = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(s, b)| (s.to_string(), *b)).collect()
        };
        // 100+200 = 40 MiB: cut at 300; 300+300 = 40: cut at 400; 400+500 = 45: cut at 600.
        let f = files(&[
            ("100", 20 * mb),
            ("200", 20 * mb),
            ("300", 20 * mb),
            ("300", 20 * mb),
            ("400", 5 * mb),
            ("500", 40 * mb),
            ("600", 1),
        ]);
        assert_eq!(piece_bounds(&f), ["300", "400", "600"]);
        // A cut due between two files starting at 300 waits for 400.
        let f = files(&[("100", 40 * mb), ("300", 40 * mb), ("300", 1), ("400", 1)]);
        assert_eq!(piece_bounds(&f), ["300", "400"]);
        assert!(piece_bounds(&[]).is_empty());
    }
}
