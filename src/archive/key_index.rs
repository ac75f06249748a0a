//! Key summaries: a sidecar of the archive that lets a lookup by
//! `partition_key` leave out the data files that cannot hold the key without
//! a single request to any of them (on S3 every request is a round trip, and
//! a lookup over days would otherwise read the tail of every file).
//!
//! ```text
//! <root>/<stream>/_fluxcap/keys/dt=YYYY-MM-DD/<name of the flush's first file of the day>.json
//! <root>/<stream>/_fluxcap/keys/dt=YYYY-MM-DD/merged-<level>-<ms>-<random>.json
//!   {"version": 1,
//!    "files": [{"name": "<data file name>", "rows": 5123,
//!               "min": "<smallest key>", "max": "<largest key>",
//!               "bloom": "<base64: a Parquet split-block bloom filter of the keys>"}, …]}
//! ```
//!
//! One object (a *piece*) per committed flush and day, written after the
//! commit by the writer of the flush ([`write`]); it describes the flush's
//! data files of that day by name. An hourly publication's merged files get
//! a piece when they are published. Once a day has [`FANOUT`] pieces, a
//! writer merges them into one `merged-1-….json` object of the same format,
//! and [`FANOUT`] of those into one `merged-2-…` ([`compact_day`]), so a day
//! of one-minute flushes keeps a few objects rather than thousands, and each
//! entry is rewritten only once per level.
//!
//! **Not part of the commit protocol, and always safe to use.** A data
//! file's name determines its records (see `layout`), a published file never
//! changes, and a summary is written only after its flush is committed, so an
//! entry is true of the file of that name for good. Readers use summaries as
//! hints only ([`KeyIndex`]): a file without an entry (written before
//! summaries existed, by a process that stopped between its commit and the
//! summary) is opened as before, and a summary that cannot be read or has an
//! unknown version is ignored. Only the merging deletes these objects, and
//! only after their entries are stored in a merged one.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{LazyLock, Mutex};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::DataType;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use parquet::bloom_filter::Sbbf;
use serde::{Deserialize, Serialize};

use crate::archive::layout::STATE_DIR;
use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::record::col;

/// Format version of the summaries this version writes (and the only one it reads).
pub const KEY_INDEX_VERSION: u32 = 1;
/// Folder below [`STATE_DIR`] holding the summaries.
pub const KEYS_DIR: &str = "keys";
/// False-positive rate of the summaries' bloom filters.
const FPP: f64 = 0.01;
/// Summaries read at once.
const READ_CONCURRENCY: usize = 32;
/// A day with more summaries than this is read without them: a day of many
/// small flushes has about as many files as summaries, and reading the
/// summaries would cost as many requests as it saves. (The writers keep a
/// day well below it by merging its pieces, [`compact_day`].)
pub const MAX_SUMMARIES_PER_DAY: usize = 256;
/// A day's objects of one level (pieces: level 0) are merged into one
/// object of the next level once there are this many. A writer also lists
/// a day's summaries on its first piece of the day and then every this many
/// pieces, to see whether they are due.
pub const FANOUT: usize = 8;
/// Objects are not merged into one larger than this (a lookup reads whole
/// objects; a day with more keep several).
const MERGED_MAX: u64 = 32 << 20;
/// Name prefix of merged objects (pieces are named after data files).
pub const MERGED_PREFIX: &str = "merged-";

/// One summary object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeySummary {
    /// Format version.
    pub version: u32,
    /// The data files it describes.
    pub files: Vec<FileKeys>,
}

/// The partition keys of one data file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileKeys {
    /// The data file's name (`<shard>_<first-seq>_<first-sub>_<count>.parquet`).
    pub name: String,
    /// Its rows.
    pub rows: u64,
    /// Its smallest key.
    pub min: String,
    /// Its largest key.
    pub max: String,
    /// Base64 of a Parquet split-block bloom filter (header and bitset) of its keys.
    pub bloom: String,
}

impl FileKeys {
    /// The keys of `batch`, the records of the data file at `path`; `None`
    /// when the batch has no rows or no `partition_key` column.
    pub fn of(path: &Path, batch: &RecordBatch) -> Option<FileKeys> {
        FileKeys::of_batches(path, std::slice::from_ref(batch))
    }

    /// The keys of `batches`, all the records of the data file at `path`
    /// (an hourly merge's file); `None` when they have no rows or a batch
    /// has no `partition_key` column.
    pub fn of_batches(path: &Path, batches: &[RecordBatch]) -> Option<FileKeys> {
        let name = path.filename()?.to_string();
        let mut distinct: HashSet<&str> = HashSet::new();
        let mut rows = 0u64;
        for batch in batches {
            let column = batch.column_by_name(col::PARTITION_KEY)?;
            match column.data_type() {
                DataType::Utf8 => distinct.extend(column.as_string::<i32>().iter().flatten()),
                DataType::LargeUtf8 => distinct.extend(column.as_string::<i64>().iter().flatten()),
                DataType::Utf8View => distinct.extend(column.as_string_view().iter().flatten()),
                _ => return None,
            }
            rows += column.len() as u64;
        }
        let (min, max) = (distinct.iter().min()?, distinct.iter().max()?);
        let mut bloom = Sbbf::new_with_ndv_fpp(distinct.len() as u64, FPP).ok()?;
        for k in &distinct {
            bloom.insert(*k);
        }
        let mut bytes = Vec::new();
        bloom.write(&mut bytes).ok()?;
        Some(FileKeys {
            name,
            rows,
            min: min.to_string(),
            max: max.to_string(),
            bloom: BASE64.encode(bytes),
        })
    }
}

/// `<root>/<stream>/_fluxcap/keys/`.
pub fn keys_root(archive: &Archive, stream: &str) -> Path {
    archive
        .layout
        .stream_dir(stream)
        .join(STATE_DIR)
        .join(KEYS_DIR)
}

/// `<root>/<stream>/_fluxcap/keys/dt=<dt>/`.
pub fn day_dir(archive: &Archive, stream: &str, dt: &str) -> Path {
    keys_root(archive, stream).join(format!("dt={dt}"))
}

/// The day (`YYYY-MM-DD`) of a data file's published path (`…/dt=…/hr=…/<name>`).
fn day_of(path: &Path) -> Option<String> {
    let parts: Vec<_> = path.parts().collect();
    let n = parts.len();
    let dt = parts.get(n.checked_sub(3)?)?.as_ref().strip_prefix("dt=")?;
    Some(dt.to_string())
}

/// Write the summaries of one committed flush: `files` are its data files'
/// published paths with their keys. One object per day, named after the
/// flush's first file of that day. Call only after the commit.
pub async fn write(archive: &Archive, stream: &str, files: Vec<(Path, FileKeys)>) -> Result<()> {
    let mut by_day: BTreeMap<String, Vec<FileKeys>> = BTreeMap::new();
    for (path, keys) in files {
        let Some(dt) = day_of(&path) else { continue };
        by_day.entry(dt).or_default().push(keys);
    }
    for (dt, files) in by_day {
        let Some(first) = files.iter().map(|f| f.name.as_str()).min() else {
            continue;
        };
        let name = format!("{}.json", first.strip_suffix(".parquet").unwrap_or(first));
        let path = day_dir(archive, stream, &dt).join(name);
        let body = serde_json::to_vec(&KeySummary {
            version: KEY_INDEX_VERSION,
            files,
        })
        .map_err(|e| Error::Usage(format!("internal error: key summary: {e}")))?;
        archive.put_bytes(&path, body.into()).await?;
    }
    Ok(())
}

/// [`write`] for the writer of a flush that must not fail because of its
/// summaries: an error is logged and otherwise ignored (the flush's files
/// are then opened by lookups, as if they had no summary). Then merges the
/// pieces of the flush's days when they have become many ([`compact_day`]).
pub async fn write_after_commit(archive: &Archive, stream: &str, files: Vec<(Path, FileKeys)>) {
    if files.is_empty() {
        return;
    }
    let days: BTreeSet<String> = files.iter().filter_map(|(p, _)| day_of(p)).collect();
    if let Err(e) = write(archive, stream, files).await {
        tracing::warn!(%stream, "key summary not written (lookups open these files): {e}");
        return;
    }
    for dt in days {
        if !compaction_due(archive, stream, &dt) {
            continue;
        }
        if let Err(e) = compact_day(archive, stream, &dt).await {
            tracing::warn!(%stream, %dt, "key summaries not merged (lookups read more of them): {e}");
        }
    }
}

/// Whether this process should look at a day's pieces now: on its first
/// summary of the day, then after every [`FANOUT`] more (a `LIST` of the
/// day each time, not one per flush).
fn compaction_due(archive: &Archive, stream: &str, dt: &str) -> bool {
    static WRITES: LazyLock<Mutex<HashMap<String, usize>>> = LazyLock::new(Default::default);
    let key = day_dir(archive, stream, dt).to_string();
    let mut writes = WRITES.lock().unwrap_or_else(|e| e.into_inner());
    let n = writes.entry(key).or_insert(0);
    let due = n.is_multiple_of(FANOUT);
    *n += 1;
    due
}

/// Merge one day's summaries level by level: [`FANOUT`] pieces (level 0)
/// into one object of level 1, [`FANOUT`] of those into one of level 2, and
/// so on, so that a day of many small flushes keeps a few objects for
/// lookups to read instead of one per flush, and each entry is rewritten
/// once per level (not on every merge):
///
/// ```text
///   list dt=…/                        objects by level (pieces: 0)
///   for each level L with ≥ FANOUT objects (and ≤ MERGED_MAX bytes in all):
///     read them
///     PUT  dt=…/merged-<L+1>-<ms>-<rand>.json   (the union of their entries)
///     DELETE the objects read
/// ```
///
/// Safe at every step, like the summaries themselves: an entry describes
/// its data file for good, readers take the union of whatever they find, and
/// only objects whose entries are in the new merged object are deleted. A
/// crash between the PUT and the deletes leaves entries twice; a reader that
/// lists a piece deleted before it reads it opens that piece's files. Two
/// compactions of one day at once (two processes) each write a merged
/// object holding the same entries. Returns the objects merged.
pub async fn compact_day(archive: &Archive, stream: &str, dt: &str) -> Result<usize> {
    static RUNNING: LazyLock<Mutex<HashSet<String>>> = LazyLock::new(Default::default);
    let dir = day_dir(archive, stream, dt);
    let key = dir.to_string();
    if !RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key.clone())
    {
        return Ok(0);
    }
    let result = compact(archive, &dir).await;
    RUNNING
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&key);
    result
}

/// The level of a summary object by its name: 0 for a piece, `L` for
/// `merged-L-…` (1 for any other merged name).
fn level_of(name: &str) -> usize {
    match name.strip_prefix(MERGED_PREFIX) {
        None => 0,
        Some(rest) => rest
            .split('-')
            .next()
            .and_then(|l| l.parse().ok())
            .filter(|&l| l > 0)
            .unwrap_or(1),
    }
}

async fn compact(archive: &Archive, dir: &Path) -> Result<usize> {
    let mut levels: BTreeMap<usize, Vec<object_store::ObjectMeta>> = BTreeMap::new();
    for o in archive.list(dir).await? {
        if o.location.extension() != Some("json") {
            continue;
        }
        let level = o.location.filename().map_or(0, level_of);
        levels.entry(level).or_default().push(o);
    }
    let mut merged = 0;
    let mut level = 0;
    while let Some(objects) = levels.remove(&level) {
        let total: u64 = objects.iter().map(|o| o.size).sum();
        if objects.len() < FANOUT || total > MERGED_MAX {
            level += 1;
            continue;
        }
        let Some(made) = merge_objects(archive, dir, objects, level + 1).await? else {
            break;
        };
        merged += made.1;
        levels.entry(level + 1).or_default().push(made.0);
        level += 1;
    }
    Ok(merged)
}

/// Merge `objects` into one object of `level`; returns it and how many
/// objects it replaced (`None` when fewer than two could be read).
async fn merge_objects(
    archive: &Archive,
    dir: &Path,
    objects: Vec<object_store::ObjectMeta>,
    level: usize,
) -> Result<Option<(object_store::ObjectMeta, usize)>> {
    let read: Vec<(Path, Option<KeySummary>)> = futures::stream::iter(objects)
        .map(|o| async move {
            let s = read_summary(archive, &o.location).await;
            (o.location, s)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut files: BTreeMap<String, FileKeys> = BTreeMap::new();
    let mut done = Vec::new();
    for (p, s) in read {
        // An unreadable object stays (a reader ignores it as well).
        let Some(s) = s else { continue };
        for f in s.files {
            files.insert(f.name.clone(), f);
        }
        done.push(p);
    }
    if done.len() < 2 {
        return Ok(None);
    }
    let path = dir.clone().join(format!(
        "{MERGED_PREFIX}{level}-{}-{:08x}.json",
        chrono::Utc::now().timestamp_millis(),
        rand::random::<u32>()
    ));
    let body = serde_json::to_vec(&KeySummary {
        version: KEY_INDEX_VERSION,
        files: files.into_values().collect(),
    })
    .map_err(|e| Error::Usage(format!("internal error: key summary: {e}")))?;
    let size = body.len() as u64;
    archive.put_bytes(&path, body.into()).await?;
    let n = done.len();
    for p in done {
        if let Err(e) = archive.store.delete(&p).await {
            tracing::debug!(
                "merged key summary not deleted: {}: {e}",
                archive.describe(&p)
            );
        }
    }
    tracing::debug!(
        objects = n,
        level,
        "key summaries merged: {}",
        archive.describe(dir)
    );
    let meta = object_store::ObjectMeta {
        location: path,
        last_modified: chrono::Utc::now(),
        size,
        e_tag: None,
        version: None,
    };
    Ok(Some((meta, n)))
}

/// One summary object, or `None` (logged) when it cannot be read, parsed,
/// or has another version.
async fn read_summary(archive: &Archive, p: &Path) -> Option<KeySummary> {
    let parsed = archive.get_bytes(p).await.and_then(|b| {
        serde_json::from_slice::<KeySummary>(&b)
            .map_err(|e| Error::Usage(format!("{}: {e}", archive.describe(p))))
    });
    match parsed {
        Ok(s) if s.version == KEY_INDEX_VERSION => Some(s),
        Ok(s) => {
            tracing::debug!("key summary {p}: unknown version {}", s.version);
            None
        }
        Err(e) => {
            tracing::debug!("key summary not used: {e}");
            None
        }
    }
}

/// The summaries of `files` with their keys, for the flush paths: files
/// without keys are left out.
pub fn summarize<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a RecordBatch)>,
) -> Vec<(Path, FileKeys)> {
    files
        .into_iter()
        .filter_map(|(p, b)| FileKeys::of(p, b).map(|k| (p.clone(), k)))
        .collect()
}

/// A decoded entry.
struct Entry {
    min: String,
    max: String,
    bloom: Sbbf,
}

impl Entry {
    fn may_hold(&self, key: &str) -> bool {
        self.min.as_str() <= key && key <= self.max.as_str() && self.bloom.check(key)
    }
}

/// The entries of the summaries read for one query, by data file name.
#[derive(Default)]
pub struct KeyIndex {
    entries: HashMap<String, Entry>,
    /// Summary objects read (for tests and logs).
    pub objects: usize,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyIndex")
            .field("files", &self.entries.len())
            .field("objects", &self.objects)
            .finish()
    }
}

impl KeyIndex {
    /// Read the summaries of `days` (`YYYY-MM-DD`). A day with more than
    /// [`MAX_SUMMARIES_PER_DAY`] summaries is skipped. Lists the days and
    /// reads the summaries concurrently; anything that cannot be listed,
    /// read or parsed is left out (its files are opened).
    pub async fn load(archive: &Archive, stream: &str, days: Vec<String>) -> KeyIndex {
        let dirs: Vec<Path> = days.iter().map(|dt| day_dir(archive, stream, dt)).collect();
        let listings: Vec<Vec<object_store::ObjectMeta>> = futures::stream::iter(dirs)
            .map(|dir| async move {
                archive.list(&dir).await.unwrap_or_else(|e| {
                    tracing::debug!("key summaries not listed: {e}");
                    vec![]
                })
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect()
            .await;
        let mut wanted = Vec::new();
        for objects in listings {
            let objects: Vec<Path> = objects
                .into_iter()
                .map(|o| o.location)
                .filter(|p| p.extension() == Some("json"))
                .collect();
            if objects.len() > MAX_SUMMARIES_PER_DAY {
                continue;
            }
            wanted.extend(objects);
        }
        let read: Vec<Option<KeySummary>> = futures::stream::iter(wanted)
            .map(|p| async move { read_summary(archive, &p).await })
            .buffer_unordered(READ_CONCURRENCY)
            .collect()
            .await;
        let mut index = KeyIndex::default();
        for s in read.into_iter().flatten() {
            index.objects += 1;
            for f in s.files {
                let Ok(bytes) = BASE64.decode(f.bloom.as_bytes()) else {
                    continue;
                };
                let Ok(bloom) = Sbbf::from_bytes(&bytes) else {
                    continue;
                };
                index.entries.insert(
                    f.name,
                    Entry {
                        min: f.min,
                        max: f.max,
                        bloom,
                    },
                );
            }
        }
        index
    }

    /// Whether a summary describes the data file named `name`.
    pub fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// Whether the data file named `name` may hold a record with one of
    /// `keys`: true unless a summary rules every one of them out.
    pub fn may_hold_any(&self, name: &str, keys: &BTreeSet<String>) -> bool {
        self.entries
            .get(name)
            .is_none_or(|e| keys.iter().any(|k| e.may_hold(k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn batch(keys: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new(
            col::PARTITION_KEY,
            DataType::Utf8,
            false,
        )]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(keys.to_vec()))])
            .expect("batch")
    }

    #[test]
    fn merged_objects_have_levels_and_pieces_level_zero() {
        assert_eq!(level_of("shardId-000000000001_4960_0_3.json"), 0);
        assert_eq!(level_of("merged-1-1795132800000-0000abcd.json"), 1);
        assert_eq!(level_of("merged-3-1795132800000-0000abcd.json"), 3);
        assert_eq!(level_of("merged-x.json"), 1);
        assert_eq!(level_of("merged-0-1.json"), 1);
    }

    #[test]
    fn an_entry_rules_out_absent_keys_and_never_present_ones() {
        let path = Path::from("s/dt=2026-11-20/hr=03/shard_1_0_3.parquet");
        let keys: Vec<String> = (0..2000).map(|i| format!("customer-{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let f = FileKeys::of(&path, &batch(&refs)).expect("keys");
        assert_eq!(f.name, "shard_1_0_3.parquet");
        assert_eq!(f.rows, 2000);
        assert_eq!(day_of(&path).as_deref(), Some("2026-11-20"));
        // Through JSON, as a reader sees it.
        let s: KeySummary = serde_json::from_slice(
            &serde_json::to_vec(&KeySummary {
                version: KEY_INDEX_VERSION,
                files: vec![f],
            })
            .expect("json"),
        )
        .expect("parse");
        let mut index = KeyIndex::default();
        for f in s.files {
            let bloom = Sbbf::from_bytes(&BASE64.decode(&f.bloom).expect("b64")).expect("bloom");
            index.entries.insert(
                f.name,
                Entry {
                    min: f.min,
                    max: f.max,
                    bloom,
                },
            );
        }
        let one = |k: &str| [k.to_string()].into_iter().collect::<BTreeSet<_>>();
        for k in &keys {
            assert!(index.may_hold_any("shard_1_0_3.parquet", &one(k)));
        }
        let absent = (0..2000)
            .filter(|i| index.may_hold_any("shard_1_0_3.parquet", &one(&format!("other-{i}"))))
            .count();
        assert!(absent < 100, "{absent} false positives of 2000");
        // Outside min/max: ruled out whatever the bloom filter says.
        assert!(!index.may_hold_any("shard_1_0_3.parquet", &one("a")));
        // A file without an entry may hold anything.
        assert!(index.may_hold_any("other.parquet", &one("a")));
    }
}
