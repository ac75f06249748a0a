//! The per-shard proof of `verify`, from file names, footers and the
//! checkpoint alone — over ranges, never over single records.
//!
//! A shard's files, sorted by their first record (from the name), must not
//! overlap: two files starting at the same record, or a file whose highest
//! sequence number (exact footer statistics) lies after the start of the
//! next one, hold duplicates. Each file's rows must match its name, and its
//! flush segments must account for them. The flush segments, grouped per
//! flush, must hold exactly the records each flush announced and chain from
//! the start of the shard (or the watermark of `--since-last`) to the
//! committed checkpoint, whose record count they must reach.

use std::collections::{BTreeMap, HashMap};

use crate::archive::checkpoint::Checkpoint;
use crate::archive::verify::read::Footer;
use crate::archive::verify::watermark::ShardMark;
use crate::record::{Position, cmp_sequence};

/// One data file of a shard, as named and as its footer describes it.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Where it is (printable).
    pub path: String,
    /// Its first record (from its name).
    pub first: Position,
    /// Its record count (from its name).
    pub count: u64,
    /// What its footer says.
    pub footer: Footer,
}

/// The files of one flush, as found.
struct FlushFiles {
    prev: Option<Position>,
    announced: u64,
    found: u64,
    paths: Vec<String>,
}

/// Print a position (`None`: the start of the shard).
pub fn fmt_pos(p: Option<&Position>) -> String {
    match p {
        Some(p) => format!("{}:{}", p.sequence_number, p.subsequence_number),
        None => "the start of the shard".into(),
    }
}

/// Whether a flush ending at `last` comes after the proved position `from`
/// (`None` for `from`: nothing was proved, every flush counts).
fn after(last: Option<&Position>, from: Option<&ShardMark>) -> bool {
    match (from.map(|m| m.position.as_ref()), last) {
        (None, _) => true,
        (Some(None), _) => true,
        (Some(Some(w)), Some(l)) => l > w,
        (Some(Some(_)), None) => false,
    }
}

/// Check one shard (checkpoint key `key`): `pieces` are the files whose
/// footers were read, `from` the watermark the chain starts at. Returns the
/// records found after `from`; adds every problem to `problems`.
pub fn check_shard(
    pieces: &mut [Piece],
    ck: Option<&Checkpoint>,
    all: &HashMap<String, Checkpoint>,
    from: Option<&ShardMark>,
    problems: &mut Vec<String>,
) -> u64 {
    let Some(ck) = ck else {
        problems.push(format!(
            "{} file(s) but no checkpoint (written by no committed flush)",
            pieces.len()
        ));
        return 0;
    };
    pieces.sort_by(|a, b| a.first.cmp(&b.first));
    // Each file against its name; neighbours against each other.
    for p in pieces.iter() {
        if p.footer.rows != p.count {
            problems.push(format!(
                "{}: content does not match its name ({} records in its footer, {} in its name)",
                p.path, p.footer.rows, p.count
            ));
        }
        let in_segments: u64 = p.footer.segments.iter().map(|s| s.count).sum();
        if in_segments != p.footer.rows {
            problems.push(format!(
                "{}: its footer accounts for {in_segments} records, it holds {}",
                p.path, p.footer.rows
            ));
        }
        if let Some(low) = &p.footer.lowest
            && cmp_sequence(low, &p.first.sequence_number).is_lt()
        {
            problems.push(format!(
                "{}: content does not match its name (it holds sequence number {low}, before its first record {})",
                p.path,
                fmt_pos(Some(&p.first))
            ));
        }
    }
    let mut overlaps = 0;
    for w in pieces.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        let overlap = a.first == b.first
            || a.footer
                .highest
                .as_deref()
                .is_some_and(|h| cmp_sequence(h, &b.first.sequence_number).is_gt());
        if overlap {
            overlaps += 1;
            if overlaps <= 20 {
                problems.push(format!(
                    "duplicate records: {} and {} overlap (the second starts at {})",
                    a.path,
                    b.path,
                    fmt_pos(Some(&b.first))
                ));
            }
        }
    }
    if overlaps > 20 {
        problems.push(format!("… {overlaps} overlapping files in all"));
    }
    // Flush chain: group the segments by flush, check each flush is
    // complete, then chain them.
    let mut flushes: BTreeMap<Option<Position>, FlushFiles> = BTreeMap::new();
    for p in pieces.iter() {
        let n = p.footer.segments.len();
        for (i, seg) in p.footer.segments.iter().enumerate() {
            if i == 0
                && (seg.prev.as_ref().is_some_and(|prev| p.first <= *prev)
                    || seg.last.as_ref().is_some_and(|last| p.first > *last))
            {
                problems.push(format!(
                    "{}: starts at {}, outside its flush (after {} up to {})",
                    p.path,
                    fmt_pos(Some(&p.first)),
                    fmt_pos(seg.prev.as_ref()),
                    fmt_pos(seg.last.as_ref())
                ));
            }
            if i + 1 == n
                && let (Some(h), Some(last)) = (&p.footer.highest, &seg.last)
                && cmp_sequence(h, &last.sequence_number).is_gt()
            {
                problems.push(format!(
                    "{}: holds sequence number {h}, after the end of its flush {}",
                    p.path,
                    fmt_pos(Some(last))
                ));
            }
            if !after(seg.last.as_ref(), from) {
                continue;
            }
            let e = flushes
                .entry(seg.last.clone())
                .or_insert_with(|| FlushFiles {
                    prev: seg.prev.clone(),
                    announced: seg.flush_records,
                    found: 0,
                    paths: vec![],
                });
            e.found += seg.count;
            e.paths.push(p.path.clone());
            if e.prev != seg.prev {
                problems.push(format!(
                    "files of one flush disagree on its start: {:?}",
                    e.paths
                ));
            }
        }
    }
    let mut expected_prev = from.and_then(|m| m.position.clone());
    let mut found = 0u64;
    for (last, f) in &flushes {
        found += f.found;
        if f.found != f.announced {
            problems.push(format!(
                "flush ending at {} holds {} records in its files but announced {} (missing or extra file among {:?})",
                fmt_pos(last.as_ref()),
                f.found,
                f.announced,
                f.paths
            ));
        }
        if f.prev != expected_prev {
            problems.push(format!(
                "gap: records after {} up to {} are missing (next flush starts after {})",
                fmt_pos(expected_prev.as_ref()),
                fmt_pos(f.prev.as_ref()),
                fmt_pos(f.prev.as_ref()),
            ));
        }
        expected_prev = last.clone();
    }
    if expected_prev != ck.position {
        problems.push(format!(
            "archive ends at {} but the checkpoint is at {}",
            fmt_pos(expected_prev.as_ref()),
            fmt_pos(ck.position.as_ref())
        ));
    }
    let before = from.map_or(0, |m| m.records);
    if before + found != ck.records {
        problems.push(format!(
            "{} records in files, checkpoint counts {}",
            before + found,
            ck.records
        ));
    }
    // Lineage: records of a child only after every parent is finished.
    if before + found > 0 {
        for p in &ck.parents {
            if let Some(pc) = all.get(p)
                && !pc.finished
            {
                problems.push(format!(
                    "lineage: holds records although parent {p} is not finished"
                ));
            }
        }
    }
    found
}
