//! `fluxcap verify`: proves, from the data files' footers and the
//! checkpoints alone, that each shard's archive has no gap and no duplicate.
//!
//! Every data file's footer names the flush that wrote it (position before,
//! position after, record count). Per shard, the flushes must form one chain
//! from the start of the shard to the committed checkpoint; their files must
//! hold exactly the announced records; no two files may overlap; and a child
//! shard may hold records only if its parents are finished (lineage). A
//! published file of a flush that is not committed is a problem; committed
//! files not published yet are checked from their staged copies; gaps the
//! archiver recorded (records that expired before they were read) are
//! reported as problems too, so that `verify` exits 3 on any loss.
//!
//! Only footers are read (ranged reads, see [`read`]), [`read::READ_CONCURRENCY`]
//! at a time across all shards; what is kept per file is its name's range and
//! its footer's segments, so memory grows with files, not records. Every run
//! records how far it proved each clean shard ([`watermark`]);
//! `--since-last` starts each shard's chain there.
//!
//! An archiver may run meanwhile: the checkpoints are read before the
//! listing, files committed after them are noted, and a committed file that
//! vanishes under the run (a staged file published and merged with others)
//! makes the whole stream be verified again — footers already read are kept.

pub mod check;
pub mod read;
pub mod watermark;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectStore;
use object_store::path::Path;
use serde::Serialize;

use crate::archive::checkpoint::{Checkpoint, load_all, load_latest, stored_path};
use crate::archive::layout::{is_hidden_below, parse_data_file_name, staged_epoch};
use crate::archive::manifest::LOAD_CONCURRENCY;
use crate::archive::store::{Archive, StagedFallback};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::record::Position;
use check::{Piece, check_shard, fmt_pos};
use read::{Footer, READ_CONCURRENCY, read_footer};
use watermark::{ShardMark, Watermark};

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
    /// Data files found (published, or committed and staged).
    pub files: u64,
    /// Footers read by this run (fewer than `files` with `--since-last`).
    pub files_read: u64,
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
                    "  {:<24} {:>10} records {:>6} files ({} read)  {}{}\n",
                    sh.shard_id,
                    sh.records,
                    sh.files,
                    sh.files_read,
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

/// What to verify.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions {
    /// Start each shard at the watermark of the last verify (files wholly
    /// before it are not read again).
    pub since_last: bool,
}

/// Times the stream is listed again when committed files vanish under a run.
const ATTEMPTS: u32 = 5;

/// Verify the selected streams.
pub async fn verify(
    cfg: &Config,
    stream: Option<&str>,
    opts: VerifyOptions,
) -> Result<VerifyReport> {
    let archive = Archive::open(cfg).await?;
    let mut streams = Vec::new();
    for s in cfg.selected_streams(stream)? {
        streams.push(verify_stream(&archive, &s.name, opts).await?);
    }
    Ok(VerifyReport { streams })
}

/// Verify one stream of an opened archive, and record how far each clean
/// shard was proved (a store that refuses the write only costs a note).
pub async fn verify_stream(
    archive: &Archive,
    stream: &str,
    opts: VerifyOptions,
) -> Result<StreamReport> {
    let mut cache: HashMap<String, Footer> = HashMap::new();
    for attempt in 1..=ATTEMPTS {
        let Some((mut report, marks)) = verify_once(archive, stream, opts, &mut cache).await?
        else {
            tracing::info!(
                stream,
                attempt,
                "a committed file was published or merged while verify ran; listing the stream again"
            );
            continue;
        };
        if attempt > 1 {
            report.notes.push(format!(
                "committed files moved while verify ran (publication or merge): the stream was listed {attempt} times"
            ));
        }
        let w = Watermark {
            version: watermark::WATERMARK_VERSION,
            stream: stream.to_string(),
            written_at: Utc::now().to_rfc3339(),
            shards: marks,
        };
        // Nothing archived: nothing to record (no state for a stream never archived).
        if report.shards.is_empty() {
            return Ok(report);
        }
        if let Err(e) = watermark::store(archive, stream, &w).await {
            report.notes.push(format!(
                "could not record how far this run verified (verify --since-last will start further back): {e}"
            ));
        }
        return Ok(report);
    }
    Err(Error::CorruptState {
        object: archive.describe(&archive.layout.stream_dir(stream)),
        message: format!(
            "committed files kept moving while verify ran ({ATTEMPTS} listings); run it again"
        ),
    })
}

/// A footer to read.
struct Job {
    key: String,
    location: Path,
    size: u64,
    name: String,
    first: Position,
    count: u64,
    /// Published (immutable: its footer may be kept across attempts).
    published: bool,
}

/// `dt=…/hr=…` of a data file path.
fn hour_dir(path: &Path) -> Option<String> {
    let parts: Vec<_> = path.parts().collect();
    let n = parts.len();
    (n >= 3).then(|| format!("{}/{}", parts[n - 3].as_ref(), parts[n - 2].as_ref()))
}

/// One pass over the stream; `None` when a committed file vanished under it.
async fn verify_once(
    archive: &Archive,
    stream: &str,
    opts: VerifyOptions,
    cache: &mut HashMap<String, Footer>,
) -> Result<Option<(StreamReport, BTreeMap<String, ShardMark>)>> {
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
    let mut notes = Vec::new();
    let mark = if opts.since_last {
        let m = watermark::load(archive, stream).await?;
        match &m {
            Some(w) => notes.push(format!(
                "--since-last: starting each shard where the verify of {} left it",
                w.written_at
            )),
            None => notes.push(
                "--since-last: no earlier verify recorded for this stream; verifying everything"
                    .into(),
            ),
        }
        m
    } else {
        None
    };
    // A shard's mark counts only if its checkpoint is at or after it.
    let marks: HashMap<&str, &ShardMark> = mark
        .as_ref()
        .map(|w| {
            w.shards
                .iter()
                .filter(|(k, m)| {
                    ckpts.get(k.as_str()).is_some_and(|c| {
                        m.records <= c.records
                            && match (&m.position, &c.position) {
                                (None, _) => true,
                                (Some(w), Some(p)) => w <= p,
                                (Some(_), None) => false,
                            }
                    })
                })
                .map(|(k, m)| (k.as_str(), m))
                .collect()
        })
        .unwrap_or_default();
    // Already proved: starts at or before the mark, in an hour that had no
    // files waiting to be published (merged later with newer parts).
    let proved = |key: &str, first: &Position, path: &Path| {
        marks.get(key).is_some_and(|m| {
            m.position.as_ref().is_some_and(|p| first <= p)
                && hour_dir(path).is_none_or(|h| !m.open_hours.contains(&h))
        })
    };
    let objects = archive.list(&dir).await?;
    let mut problems = Vec::new();
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
    let mut files: BTreeMap<String, u64> = BTreeMap::new();
    let mut jobs = Vec::new();
    let mut beyond: Vec<(String, Path, Position)> = Vec::new();
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
        if !ckpts
            .get(&parsed.shard_id)
            .is_some_and(|c| c.covers(&parsed.first))
        {
            beyond.push((parsed.shard_id, o.location.clone(), parsed.first));
            continue;
        }
        *files.entry(parsed.shard_id.clone()).or_default() += 1;
        if proved(&parsed.shard_id, &parsed.first, &o.location) {
            continue;
        }
        jobs.push(Job {
            key: parsed.shard_id,
            location: o.location.clone(),
            size: o.size,
            name: archive.describe(&o.location),
            first: parsed.first,
            count: parsed.count as u64,
            published: true,
        });
    }
    // Committed files that are not published yet count from their staged copies.
    let mut referenced: HashSet<String> = HashSet::new();
    let mut open_hours: BTreeMap<String, Vec<String>> = BTreeMap::new();
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
            let Some(parsed) = path.filename().and_then(parse_data_file_name) else {
                problems.push(format!(
                    "checkpoint of shard {} names a file that is not a data file: {}",
                    c.shard_id,
                    archive.describe(&path)
                ));
                continue;
            };
            *files.entry(c.shard_id.clone()).or_default() += 1;
            if let Some(h) = hour_dir(&path) {
                let hours = open_hours.entry(c.shard_id.clone()).or_default();
                if !hours.contains(&h) {
                    hours.push(h);
                }
            }
            if proved(&c.shard_id, &parsed.first, &path) {
                continue;
            }
            notes.push(format!(
                "committed, not published yet: {}",
                archive.describe(&path)
            ));
            jobs.push(Job {
                key: c.shard_id.clone(),
                location: staged,
                size: e.size,
                name: archive.describe(&path),
                first: parsed.first,
                count: parsed.count as u64,
                published: false,
            });
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
    // Files past the snapshot: committed meanwhile? Each shard read again once.
    let again_keys: BTreeSet<String> = beyond.iter().map(|(k, _, _)| k.clone()).collect();
    let again: HashMap<String, Option<Checkpoint>> = futures::stream::iter(again_keys)
        .map(|k| async move {
            let c = load_latest(archive, stream, &k).await?;
            Ok::<_, Error>((k, c))
        })
        .buffer_unordered(LOAD_CONCURRENCY)
        .try_collect()
        .await?;
    for (key, location, first) in &beyond {
        if again
            .get(key)
            .and_then(Option::as_ref)
            .is_some_and(|c| c.covers(first))
        {
            notes.push(format!(
                "{} was committed while verify ran (not checked)",
                archive.describe(location)
            ));
        } else {
            problems.push(format!(
                "published file of a flush that is not committed: {}",
                archive.describe(location)
            ));
        }
    }

    // The footers, READ_CONCURRENCY at a time across every shard.
    let fallback: Arc<dyn ObjectStore> = Arc::new(StagedFallback(archive.store.clone()));
    let read: Vec<(Job, Option<Footer>)> = futures::stream::iter(jobs)
        .map(|job| {
            let cached = job
                .published
                .then(|| cache.get(job.location.as_ref()).cloned())
                .flatten();
            let store = if job.published {
                archive.store.clone()
            } else {
                fallback.clone()
            };
            async move {
                let footer = match cached {
                    Some(f) => Some(f),
                    None => read_footer(store, job.location.clone(), job.size, &job.name).await?,
                };
                Ok::<_, Error>((job, footer))
            }
        })
        .buffer_unordered(READ_CONCURRENCY)
        .try_collect()
        .await?;
    let mut pieces: BTreeMap<String, Vec<Piece>> = BTreeMap::new();
    let mut missing: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (job, footer) in read {
        let Some(footer) = footer else {
            missing.entry(job.key).or_default().push(job.name);
            continue;
        };
        if job.published {
            cache.insert(job.location.to_string(), footer.clone());
        }
        pieces.entry(job.key).or_default().push(Piece {
            path: job.name,
            first: job.first,
            count: job.count,
            footer,
        });
    }
    // A file that vanished under the run: moved by a commit since the
    // checkpoints were read (list again), or lost (a problem of its shard).
    for key in missing.keys() {
        let now = load_latest(archive, stream, key).await?;
        if now.map(|c| c.generation) != ckpts.get(key).map(|c| c.generation) {
            return Ok(None);
        }
    }

    let mut shards = Vec::new();
    let mut proved_marks = BTreeMap::new();
    let mut ids: Vec<String> = pieces
        .keys()
        .chain(ckpts.keys())
        .chain(files.keys())
        .cloned()
        .collect();
    ids.sort();
    ids.dedup();
    for id in ids {
        let mut mine = pieces.remove(&id).unwrap_or_default();
        let ck = ckpts.get(&id);
        let from = marks.get(id.as_str()).copied();
        let mut rep = ShardReport {
            shard_id: id.clone(),
            records: 0,
            files: files.get(&id).copied().unwrap_or(0),
            files_read: mine.len() as u64,
            checkpoint_records: ck.map_or(0, |c| c.records),
            finished: ck.is_some_and(|c| c.finished),
            uncommitted_files: uncommitted.remove(&id).unwrap_or_default(),
            problems: vec![],
        };
        for name in missing.remove(&id).unwrap_or_default() {
            rep.problems.push(format!(
                "committed file is missing (neither published nor staged): {name}"
            ));
        }
        let found = check_shard(&mut mine, ck, &ckpts, from, &mut rep.problems);
        rep.records = from.map_or(0, |m| m.records) + found;
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
            if rep.problems.is_empty() {
                proved_marks.insert(
                    id.clone(),
                    ShardMark {
                        position: ck.position.clone(),
                        records: ck.records,
                        files: rep.files,
                        open_hours: open_hours.remove(&id).unwrap_or_default(),
                        verified_at: Utc::now().to_rfc3339(),
                    },
                );
            }
        }
        shards.push(rep);
    }
    for (shard, files) in uncommitted {
        problems.push(format!(
            "shard {shard}: uncommitted files without a checkpoint: {files:?}"
        ));
    }
    Ok(Some((
        StreamReport {
            stream: stream.to_string(),
            shards,
            problems,
            notes,
        },
        proved_marks,
    )))
}
