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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive::verify::read::FileSegment;

    fn pos(n: u64) -> Position {
        Position::new(format!("4960{n:052}"), 0)
    }

    /// A file of one flush `(prev, last]` holding `count` records from `first`.
    fn piece(
        name: &str,
        first: u64,
        count: u64,
        prev: Option<u64>,
        last: u64,
        flush: u64,
    ) -> Piece {
        Piece {
            path: name.into(),
            first: pos(first),
            count,
            footer: Footer {
                rows: count,
                segments: vec![FileSegment {
                    prev: prev.map(pos),
                    last: Some(pos(last)),
                    flush_records: flush,
                    count,
                }],
                lowest: Some(pos(first).sequence_number),
                highest: Some(pos(first + count - 1).sequence_number),
            },
        }
    }

    fn ck(last: u64, records: u64) -> Checkpoint {
        serde_json::from_value(serde_json::json!({
            "version": 2, "stream": "s", "shard_id": "a", "generation": 3,
            "position": {"sequence_number": pos(last).sequence_number, "subsequence_number": 0},
            "last_arrival_ms": 0, "records": records, "files": 3, "finished": false,
            "parents": [], "owner": "t", "written_at": "now"
        }))
        .unwrap()
    }

    fn run(pieces: &mut [Piece], c: &Checkpoint, from: Option<&ShardMark>) -> (u64, Vec<String>) {
        let mut problems = vec![];
        let n = check_shard(pieces, Some(c), &HashMap::new(), from, &mut problems);
        (n, problems)
    }

    #[test]
    fn a_clean_chain_passes_and_a_copy_or_an_overlap_is_a_duplicate() {
        // Flush 1: records 1..=10 in two hourly files; flush 2: 11..=15.
        let clean = vec![
            piece("a", 1, 4, None, 10, 10),
            piece("b", 5, 6, None, 10, 10),
            piece("c", 11, 5, Some(10), 15, 5),
        ];
        let c = ck(15, 15);
        assert_eq!(run(&mut clean.clone(), &c, None), (15, vec![]));
        let mut copied = clean.clone();
        copied.push(piece("a-copy", 1, 4, None, 10, 10));
        let (_, p) = run(&mut copied, &c, None);
        assert!(
            p.iter().any(|p| p.starts_with("duplicate records")),
            "{p:?}"
        );
        // A file whose statistics reach into the next one.
        let mut overlapping = clean.clone();
        overlapping[0].footer.highest = Some(pos(6).sequence_number);
        let (_, p) = run(&mut overlapping, &c, None);
        assert!(
            p.iter().any(|p| p.starts_with("duplicate records")),
            "{p:?}"
        );
    }

    #[test]
    fn a_missing_file_is_a_gap_and_a_watermark_starts_the_chain() {
        let c = ck(15, 15);
        let mut missing = vec![
            piece("a", 1, 4, None, 10, 10),
            piece("c", 11, 5, Some(10), 15, 5),
        ];
        let (_, p) = run(&mut missing, &c, None);
        assert!(p.iter().any(|p| p.contains("announced 10")), "{p:?}");
        let mut no_first = vec![piece("c", 11, 5, Some(10), 15, 5)];
        let (_, p) = run(&mut no_first, &c, None);
        assert!(p.iter().any(|p| p.starts_with("gap:")), "{p:?}");
        // Proved up to 10 before: only the second flush is needed.
        let mark = ShardMark {
            position: Some(pos(10)),
            records: 10,
            files: 2,
            open_hours: vec![],
            verified_at: "then".into(),
        };
        assert_eq!(run(&mut no_first, &c, Some(&mark)), (5, vec![]));
        // A watermark does not hide a loss after it.
        let (_, p) = run(&mut [], &c, Some(&mark));
        assert!(p.iter().any(|p| p.starts_with("archive ends at")), "{p:?}");
    }

    #[test]
    fn rows_that_do_not_match_the_name_are_found() {
        let c = ck(10, 10);
        let mut short = vec![piece("a", 1, 10, None, 10, 10)];
        short[0].footer.rows = 9;
        let (_, p) = run(&mut short, &c, None);
        assert!(
            p.iter().any(|p| p.contains("does not match its name")),
            "{p:?}"
        );
        let mut early = vec![piece("a", 2, 9, Some(1), 10, 9)];
        early[0].footer.lowest = Some(pos(1).sequence_number);
        let (_, p) = run(
            &mut early,
            &ck(10, 9),
            Some(&ShardMark {
                position: Some(pos(1)),
                records: 0,
                files: 0,
                open_hours: vec![],
                verified_at: "then".into(),
            }),
        );
        assert!(
            p.iter().any(|p| p.contains("before its first record")),
            "{p:?}"
        );
    }
}
