//! `fluxcap verify`: proves, from the raw files and the checkpoints alone,
//! that each shard's archive has no gap and no duplicate.
//!
//! Every data file's footer names the flush that wrote it (position before,
//! position after, record count). Per shard, the flushes must form one chain
//! from the start of the shard to the committed checkpoint; their files must
//! hold exactly the announced records; no identity may appear twice; and a
//! child shard may hold records only if its parents are finished (lineage).
//! A published file of a flush that is not committed is a problem; committed
//! files not published yet are checked from their staged copies; gaps the
//! archiver recorded (records that expired before they were read) are
//! reported as problems too, so that `verify` exits 3 on any loss.

use std::collections::{BTreeMap, HashMap, HashSet};

use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Int64Type;

use crate::archive::checkpoint::{Checkpoint, load_all, load_latest, stored_path};
use crate::archive::footer::{decode_position, key_values, segments_of};
use crate::archive::layout::{is_hidden_below, parse_data_file_name, staged_epoch};
use crate::archive::store::Archive;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::record::Position;

/// Verification of every selected stream.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    /// One entry per stream.
    pub streams: Vec<StreamReport>,
}

/// Verification of one stream.
#[derive(Debug, Serialize)]
pub struct StreamReport {
    /// Stream name.
    pub stream: String,
    /// Per-shard results.
    pub shards: Vec<ShardReport>,
    /// Problems not tied to one shard (stray objects).
    pub problems: Vec<String>,
    /// Things worth knowing that are not problems (files committed but not
    /// published yet, staged leftovers).
    pub notes: Vec<String>,
}

/// Verification of one shard.
#[derive(Debug, Serialize)]
pub struct ShardReport {
    /// Shard id.
    pub shard_id: String,
    /// Records found in the archive's files.
    pub records: u64,
    /// Data files found.
    pub files: u64,
    /// Records the checkpoint says were committed.
    pub checkpoint_records: u64,
    /// The shard is finished.
    pub finished: bool,
    /// Files of a flush in progress or interrupted (removed by the next archiver run).
    pub uncommitted_files: Vec<String>,
    /// Gaps, duplicates, lineage violations.
    pub problems: Vec<String>,
}

impl VerifyReport {
    /// Total problems.
    pub fn problems(&self) -> usize {
        self.streams
            .iter()
            .map(|s| s.problems.len() + s.shards.iter().map(|x| x.problems.len()).sum::<usize>())
            .sum()
    }

    /// Human-readable report.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        for s in &self.streams {
            let recs: u64 = s.shards.iter().map(|x| x.records).sum();
            o.push_str(&format!(
                "stream {}: {} shards, {} records\n",
                s.stream,
                s.shards.len(),
                recs
            ));
            for p in &s.problems {
                o.push_str(&format!("  PROBLEM: {p}\n"));
            }
            for n in &s.notes {
                o.push_str(&format!("  note: {n}\n"));
            }
            for sh in &s.shards {
                let status = if sh.problems.is_empty() {
                    "ok"
                } else {
                    "PROBLEMS"
                };
                o.push_str(&format!(
                    "  {:<24} {:>10} records {:>6} files  {}{}\n",
                    sh.shard_id,
                    sh.records,
                    sh.files,
                    status,
                    if sh.finished { " (finished)" } else { "" }
                ));
                for u in &sh.uncommitted_files {
                    o.push_str(&format!(
                        "    note: uncommitted file (flush in progress or interrupted): {u}\n"
                    ));
                }
                for p in &sh.problems {
                    o.push_str(&format!("    PROBLEM: {p}\n"));
                }
            }
        }
        let n = self.problems();
        o.push_str(&if n == 0 {
            "verify: no gaps, no duplicates\n".to_string()
        } else {
            format!("verify: {n} problem(s)\n")
        });
        o
    }
}

/// One data file as read back.
struct FileInfo {
    path: String,
    /// The flush parts it holds (one for a file written by one flush).
    segments: Vec<FileSegment>,
    positions: Vec<Position>,
}

/// One flush part of a file, decoded.
struct FileSegment {
    prev: Option<Position>,
    last: Option<Position>,
    flush_records: u64,
    count: u64,
}

/// Verify the selected streams.
pub async fn verify(cfg: &Config, stream: Option<&str>) -> Result<VerifyReport> {
    let archive = Archive::open(cfg).await?;
    let mut streams = Vec::new();
    for s in cfg.selected_streams(stream)? {
        streams.push(verify_stream(&archive, &s.name).await?);
    }
    Ok(VerifyReport { streams })
}

/// Verify one stream of an opened archive.
pub async fn verify_stream(archive: &Archive, stream: &str) -> Result<StreamReport> {
    let dir = archive.layout.stream_dir(stream);
    // Checkpoints first: a file listed afterwards that belongs to a flush the
    // loaded checkpoint does not cover may have been committed meanwhile (an
    // archiver may be running while we verify); it is checked against the
    // shard's checkpoint read again.
    let ckpts: HashMap<String, Checkpoint> = load_all(archive, stream)
        .await?
        .into_iter()
        .map(|c| (c.shard_id.clone(), c))
        .collect();
    let objects = archive.list(&dir).await?;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut per_shard: BTreeMap<String, Vec<FileInfo>> = BTreeMap::new();
    let mut uncommitted: BTreeMap<String, Vec<String>> = BTreeMap::new();
    // Files of version-1 flushes that never committed (removed by the next run).
    let pending: HashMap<String, String> = ckpts
        .values()
        .flat_map(|c| {
            c.pending
                .iter()
                .map(move |p| (p.clone(), c.shard_id.clone()))
        })
        .collect();
    let mut published: HashSet<String> = HashSet::new();
    let mut staged_objects = Vec::new();
    for o in &objects {
        if is_hidden_below(&dir, &o.location) {
            if staged_epoch(&o.location).is_some() {
                staged_objects.push(o.location.to_string());
            }
            continue;
        }
        let name = o.location.filename().unwrap_or_default();
        let Some(parsed) = parse_data_file_name(name) else {
            problems.push(format!(
                "stray object in the table directory: {}",
                archive.describe(&o.location)
            ));
            continue;
        };
        if let Some(shard) = pending.get(o.location.as_ref()) {
            uncommitted
                .entry(shard.clone())
                .or_default()
                .push(archive.describe(&o.location));
            continue;
        }
        published.insert(o.location.to_string());
        let info = read_file(archive, &o.location, &o.location).await?;
        if !ckpts
            .get(&parsed.shard_id)
            .is_some_and(|c| c.covers(&parsed.first))
        {
            // Committed after our snapshot? Read the shard's state again.
            let again = load_latest(archive, stream, &parsed.shard_id).await?;
            if again.as_ref().is_some_and(|c| c.covers(&parsed.first)) {
                notes.push(format!(
                    "{} was committed while verify ran (not checked)",
                    archive.describe(&o.location)
                ));
            } else {
                problems.push(format!(
                    "published file of a flush that is not committed: {}",
                    archive.describe(&o.location)
                ));
            }
            continue;
        }
        if info.positions.len() != parsed.count || info.positions.first() != Some(&parsed.first) {
            problems.push(format!(
                "{}: content does not match its name ({} records, first {:?})",
                archive.describe(&o.location),
                info.positions.len(),
                info.positions.first()
            ));
        }
        per_shard.entry(parsed.shard_id).or_default().push(info);
    }
    // Committed files that are not published yet count from their staged copies.
    let mut referenced: HashSet<String> = HashSet::new();
    for c in ckpts.values() {
        for e in &c.publish {
            referenced.insert(e.staged.clone());
            if published.contains(&e.path) {
                continue;
            }
            let (staged, path) = (
                stored_path(archive, &e.staged)?,
                stored_path(archive, &e.path)?,
            );
            let info = read_file(archive, &staged, &path).await?;
            notes.push(format!(
                "committed, not published yet: {}",
                archive.describe(&path)
            ));
            per_shard.entry(c.shard_id.clone()).or_default().push(info);
        }
    }
    let orphans = staged_objects
        .iter()
        .filter(|s| !referenced.contains(*s))
        .count();
    if orphans > 0 {
        notes.push(format!(
            "{orphans} staged file(s) of flushes that never committed under {} (not data; removed when an archiver next opens their shards)",
            archive.describe(&archive.layout.staging_root(stream))
        ));
    }

    let mut shards = Vec::new();
    let mut ids: Vec<String> = per_shard.keys().chain(ckpts.keys()).cloned().collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        let files = per_shard.remove(&id).unwrap_or_default();
        let ck = ckpts.get(&id);
        let mut rep = ShardReport {
            shard_id: id.clone(),
            records: files.iter().map(|f| f.positions.len() as u64).sum(),
            files: files.len() as u64,
            checkpoint_records: ck.map_or(0, |c| c.records),
            finished: ck.is_some_and(|c| c.finished),
            uncommitted_files: uncommitted.remove(&id).unwrap_or_default(),
            problems: vec![],
        };
        check_shard(&id, &files, ck, &ckpts, &mut rep.problems);
        if let Some(ck) = ck {
            for g in &ck.gaps {
                rep.problems.push(format!(
                    "gap (recorded {}): records after {} up to {} are lost: {}",
                    g.detected_at,
                    fmt_pos(g.after.as_ref()),
                    g.until
                        .as_ref()
                        .map_or("the end of the shard".to_string(), |p| fmt_pos(Some(p))),
                    g.reason
                ));
            }
        }
        shards.push(rep);
    }
    for (shard, files) in uncommitted {
        problems.push(format!(
            "shard {shard}: uncommitted files without a checkpoint: {files:?}"
        ));
    }
    Ok(StreamReport {
        stream: stream.to_string(),
        shards,
        problems,
        notes,
    })
}

fn check_shard(
    id: &str,
    files: &[FileInfo],
    ck: Option<&Checkpoint>,
    all: &HashMap<String, Checkpoint>,
    problems: &mut Vec<String>,
) {
    let Some(ck) = ck else {
        problems.push(format!(
            "{} file(s) but no checkpoint (written by no committed flush)",
            files.len()
        ));
        return;
    };
    // Duplicates.
    let mut all_pos: Vec<&Position> = files.iter().flat_map(|f| f.positions.iter()).collect();
    all_pos.sort();
    let mut dups = 0;
    for w in all_pos.windows(2) {
        if w[0] == w[1] {
            dups += 1;
            if dups <= 20 {
                problems.push(format!(
                    "duplicate record {}:{}",
                    w[0].sequence_number, w[0].subsequence_number
                ));
            }
        }
    }
    if dups > 20 {
        problems.push(format!("… {} duplicates in all", dups));
    }
    // Flush chain: group files by flush, check each flush is complete, then chain them.
    let mut flushes: BTreeMap<Option<Position>, FlushFiles> = BTreeMap::new();
    for f in files {
        for seg in &f.segments {
            let e = flushes
                .entry(seg.last.clone())
                .or_insert_with(|| FlushFiles {
                    prev: seg.prev.clone(),
                    announced: seg.flush_records,
                    found: 0,
                    paths: vec![],
                });
            e.found += seg.count;
            e.paths.push(&f.path);
            if e.prev != seg.prev {
                problems.push(format!(
                    "files of one flush disagree on its start: {:?}",
                    e.paths
                ));
            }
        }
        let in_segments: u64 = f.segments.iter().map(|s| s.count).sum();
        if in_segments != f.positions.len() as u64 {
            problems.push(format!(
                "{}: its footer accounts for {in_segments} records, it holds {}",
                f.path,
                f.positions.len()
            ));
        }
    }
    let mut expected_prev: Option<Position> = None;
    for (
        last,
        FlushFiles {
            prev,
            announced,
            found,
            paths,
        },
    ) in &flushes
    {
        if found != announced {
            problems.push(format!(
                "flush ending at {} holds {found} records in its files but announced {announced} (missing or extra file among {paths:?})",
                fmt_pos(last.as_ref())
            ));
        }
        if *prev != expected_prev {
            problems.push(format!(
                "gap: records after {} up to {} are missing (next flush starts after {})",
                fmt_pos(expected_prev.as_ref()),
                fmt_pos(prev.as_ref()),
                fmt_pos(prev.as_ref()),
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
    let found: u64 = files.iter().map(|f| f.positions.len() as u64).sum();
    if found != ck.records {
        problems.push(format!(
            "{found} records in files, checkpoint counts {}",
            ck.records
        ));
    }
    // Lineage: records of a child only after every parent is finished.
    if found > 0 {
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
    let _ = id;
}

/// The files of one flush, as found.
struct FlushFiles<'a> {
    prev: Option<Position>,
    announced: u64,
    found: u64,
    paths: Vec<&'a str>,
}

fn fmt_pos(p: Option<&Position>) -> String {
    match p {
        Some(p) => format!("{}:{}", p.sequence_number, p.subsequence_number),
        None => "the start of the shard".into(),
    }
}

/// Read a data file's positions and footer; `fallback` is read when
/// `location` (a staged copy) was published and removed meanwhile.
async fn read_file(archive: &Archive, location: &Path, fallback: &Path) -> Result<FileInfo> {
    let name = archive.describe(fallback);
    let perr = |source| Error::Parquet {
        object: name.clone(),
        source,
    };
    let got = match archive.store.get(location).await {
        Err(object_store::Error::NotFound { .. }) if location != fallback => {
            archive.store.get(fallback).await
        }
        other => other,
    };
    let bytes = got
        .map_err(|e| Error::store(&name, e))?
        .bytes()
        .await
        .map_err(|e| Error::store(&name, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(perr)?;
    let kv = key_values(builder.metadata().file_metadata());
    let schema = builder.parquet_schema();
    let idx: Vec<usize> = ["sequence_number", "subsequence_number"]
        .iter()
        .filter_map(|n| schema.columns().iter().position(|c| c.name() == *n))
        .collect();
    if idx.len() != 2 {
        return Err(Error::CorruptState {
            object: name,
            message: "not an archive file: missing sequence_number/subsequence_number".into(),
        });
    }
    let mask = ProjectionMask::leaves(schema, idx);
    let reader = builder.with_projection(mask).build().map_err(perr)?;
    let mut positions = Vec::new();
    for batch in reader {
        let batch = batch?;
        let seq = batch.column(0).as_string::<i32>();
        let sub = batch.column(1).as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            positions.push(Position::new(
                seq.value(i),
                if sub.is_null(i) { 0 } else { sub.value(i) },
            ));
        }
    }
    let segments = segments_of(&kv, positions.len() as u64)
        .into_iter()
        .map(|s| FileSegment {
            prev: decode_position(&s.prev),
            last: decode_position(&s.last),
            flush_records: s.records,
            count: s.count,
        })
        .collect();
    Ok(FileInfo {
        path: name,
        segments,
        positions,
    })
}
