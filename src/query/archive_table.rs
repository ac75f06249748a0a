//! `archive.<stream>`: the committed Parquet files of one stream as a
//! Hive-partitioned table (`dt`, `hr`), listed straight from the layout.
//!
//! Listing is driven by what the filters allow: a bounded arrival-time range
//! of at most a week lists only the hour prefixes it covers; otherwise the
//! day prefixes are listed first and pruned. Predicates on `dt`/`hr` are
//! evaluated against the candidate partitions (hour prefixes and days before
//! they are listed, the hours found in a listed day before their files are
//! used), and files of uncommitted flushes are left out
//! ([`Snapshot::is_committed`]). Committed files that are not published yet
//! are read from their staged copies ([`Snapshot::unpublished`]).
//! Row groups and pages are then pruned by the Parquet reader from the same
//! filters (statistics, bloom filters on `partition_key`/`sequence_number`);
//! on S3 each file's metadata comes from one read of its tail
//! ([`crate::query::tail_reader`]).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use chrono::NaiveDate;
use datafusion::catalog::Session;
use datafusion::common::{DFSchema, Result as DfResult, ScalarValue};
use datafusion::datasource::file_format::FileFormat;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::PartitionedFile;
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder, ParquetSource};
use datafusion::datasource::source::DataSourceExec;
use datafusion::datasource::table_schema::TableSchema;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::logical_expr::Expr;
use datafusion::logical_expr::utils::expr_to_columns;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use futures::{StreamExt, TryStreamExt};
use object_store::ObjectMeta;
use object_store::path::Path;

use crate::archive::key_index::{self, KeyIndex};
use crate::archive::layout::{is_hidden_below, parse_data_file_name};
use crate::archive::store::{Archive, with_retry};
use crate::config::ArchiveLocation;
use crate::error::Error;
use crate::query::bounds::{HOUR_MS, ShardRange, TimeRange, partition_keys};
use crate::query::df_err;
use crate::query::snapshot::Snapshot;
use crate::query::tail_reader::{TailCache, TailReaderFactory, WholeFiles};
use crate::record::{self, col};

/// Widest bounded range (in hours) listed hour by hour instead of by day.
const MAX_HOUR_PREFIXES: i64 = 7 * 24;
/// Concurrent LIST requests.
const LIST_CONCURRENCY: usize = 16;

/// `archive.<stream>`.
#[derive(Debug)]
pub struct ArchiveTable {
    archive: Archive,
    stream: String,
    /// The URL the archive's store is registered under in the session.
    store_url: ObjectStoreUrl,
    /// File tails (footers, page indexes, bloom filters; small files
    /// whole) read on a remote store, kept across the queries of a
    /// long-lived session (`serve`, the prompt) within a fixed budget. A
    /// file's name fixes its contents, so an entry never goes stale.
    tails: Arc<TailCache>,
}

/// One data file selected for a scan.
#[derive(Debug, Clone)]
pub struct SelectedFile {
    /// The object.
    pub meta: ObjectMeta,
    /// Its `dt` partition value.
    pub dt: String,
    /// Its `hr` partition value.
    pub hr: String,
}

impl ArchiveTable {
    /// The archive table of `stream`; `store_url` is where the session has
    /// the archive's store registered.
    pub fn new(archive: Archive, stream: &str, store_url: ObjectStoreUrl) -> Self {
        ArchiveTable {
            archive,
            stream: stream.to_string(),
            store_url,
            tails: Arc::new(TailCache::default()),
        }
    }

    /// The committed files that `filters` may need, as of `snapshot`.
    pub async fn select_files(
        &self,
        state: &dyn Session,
        filters: &[Expr],
        snapshot: &Snapshot,
    ) -> DfResult<Vec<SelectedFile>> {
        let range = TimeRange::from_filters(filters);
        if range.is_empty() {
            return Ok(vec![]);
        }
        let parts = PartitionFilter::new(state, filters)?;
        // The statement's (or replay's) view keeps the listings.
        let view = state
            .config()
            .get_extension::<crate::query::View>()
            .unwrap_or_else(|| Arc::new(crate::query::View::new(None, false)));
        // Candidate partitions (dt, hr, prefix to list recursively).
        let mut prefixes: Vec<(String, Option<String>, Path)> = Vec::new();
        match range.hours() {
            Some((first, last)) if (last - first) / HOUR_MS < MAX_HOUR_PREFIXES => {
                let hours: Vec<i64> = (0..=(last - first) / HOUR_MS)
                    .map(|i| first + i * HOUR_MS)
                    .collect();
                let keys: Vec<(String, String)> = hours
                    .iter()
                    .map(|h| crate::archive::layout::partition_of(*h))
                    .collect();
                let keep = parts.eval(&keys)?;
                for ((h, (dt, hr)), keep) in hours.iter().zip(keys).zip(keep) {
                    if keep {
                        let prefix = self.archive.layout.partition_dir(&self.stream, *h);
                        prefixes.push((dt, Some(hr), prefix));
                    }
                }
            }
            _ => {
                let dir = self.archive.layout.stream_dir(&self.stream);
                let listed = view
                    .listing(true, &dir, || async {
                        let l = with_retry(&self.archive.describe(&dir), || {
                            self.archive.store.list_with_delimiter(Some(&dir))
                        })
                        .await
                        .map_err(|e| Error::store(self.archive.describe(&dir), e))?;
                        Ok(l.common_prefixes
                            .into_iter()
                            .map(|location| ObjectMeta {
                                location,
                                last_modified: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
                                size: 0,
                                e_tag: None,
                                version: None,
                            })
                            .collect())
                    })
                    .await
                    .map_err(df_err)?;
                let mut days = Vec::new();
                for p in listed.iter().map(|o| &o.location) {
                    let Some(dt) = p.filename().and_then(|n| n.strip_prefix("dt=")) else {
                        continue;
                    };
                    let Ok(day) = NaiveDate::parse_from_str(dt, "%Y-%m-%d") else {
                        continue;
                    };
                    let from = day
                        .and_hms_opt(0, 0, 0)
                        .map(|t| t.and_utc().timestamp_millis());
                    let Some(from) = from else { continue };
                    if range.overlaps(from, from + 24 * HOUR_MS - 1) {
                        days.push((dt.to_string(), p.clone()));
                    }
                }
                let keep =
                    parts.eval_days(&days.iter().map(|d| d.0.clone()).collect::<Vec<_>>())?;
                for ((dt, p), keep) in days.into_iter().zip(keep) {
                    if keep {
                        prefixes.push((dt, None, p));
                    }
                }
            }
        }
        let listings: Vec<(String, Option<String>, Vec<ObjectMeta>)> =
            futures::stream::iter(prefixes.into_iter().map(|(dt, hr, prefix)| {
                let view = view.clone();
                async move {
                    let objects = view
                        .listing(false, &prefix, || self.archive.list(&prefix))
                        .await
                        .map_err(df_err)?;
                    Ok::<_, datafusion::error::DataFusionError>((dt, hr, (*objects).clone()))
                }
            }))
            .buffer_unordered(LIST_CONCURRENCY)
            .try_collect()
            .await?;
        let base = self.archive.layout.stream_dir(&self.stream);
        // Files grouped by their (dt, hr) partition, for the hour-level check.
        let mut by_partition: BTreeMap<(String, String), Vec<ObjectMeta>> = BTreeMap::new();
        for (dt, hr, objects) in listings {
            for o in objects {
                if is_hidden_below(&base, &o.location) {
                    continue;
                }
                let Some(name) = o.location.filename() else {
                    continue;
                };
                let Some(parsed) = name
                    .strip_suffix(".parquet")
                    .and_then(|_| parse_data_file_name(name))
                else {
                    continue;
                };
                if !snapshot.is_committed(&parsed.shard_id, &parsed.first) {
                    continue;
                }
                let hr = match &hr {
                    Some(h) => h.clone(),
                    None => {
                        let parts: Vec<_> = o.location.parts().collect();
                        let Some(h) = parts
                            .iter()
                            .rev()
                            .nth(1)
                            .and_then(|p| p.as_ref().strip_prefix("hr=").map(str::to_string))
                        else {
                            continue;
                        };
                        h
                    }
                };
                by_partition.entry((dt.clone(), hr)).or_default().push(o);
            }
        }
        // Committed files not published yet: read from their staged copies
        // (the session's store falls back to the published path if the
        // staged copy is removed while the query runs).
        let listed: std::collections::HashSet<&Path> = by_partition
            .values()
            .flatten()
            .map(|o| &o.location)
            .collect();
        let mut staged = Vec::new();
        for entry in snapshot.unpublished() {
            let (Ok(path), Ok(staged_path)) =
                (Path::parse(&entry.path), Path::parse(&entry.staged))
            else {
                continue;
            };
            if listed.contains(&path) {
                continue;
            }
            let parts: Vec<_> = path.parts().collect();
            let n = parts.len();
            let partition = (n >= 3)
                .then(|| {
                    let dt = parts[n - 3].as_ref().strip_prefix("dt=")?;
                    let hr = parts[n - 2].as_ref().strip_prefix("hr=")?;
                    Some((dt.to_string(), hr.to_string()))
                })
                .flatten();
            let Some(partition) = partition else { continue };
            staged.push((
                partition,
                ObjectMeta {
                    location: staged_path,
                    last_modified: chrono::Utc::now(),
                    size: entry.size,
                    e_tag: None,
                    version: None,
                },
            ));
        }
        for (partition, meta) in staged {
            by_partition.entry(partition).or_default().push(meta);
        }
        let keys: Vec<(String, String)> = by_partition.keys().cloned().collect();
        let keep = parts.eval(&keys)?;
        let seqs = ShardRange::from_filters(filters);
        let mut out = Vec::new();
        for (((dt, hr), objects), keep) in by_partition.into_iter().zip(keep) {
            let hour_ok = NaiveDate::parse_from_str(&dt, "%Y-%m-%d")
                .ok()
                .zip(hr.parse::<u32>().ok())
                .and_then(|(d, h)| d.and_hms_opt(h, 0, 0))
                .is_some_and(|t| range.overlaps_hour(t.and_utc().timestamp_millis()));
            if keep && hour_ok {
                out.extend(objects.into_iter().map(|meta| SelectedFile {
                    meta,
                    dt: dt.clone(),
                    hr: hr.clone(),
                }));
            }
        }
        Ok(prune_by_name(out, &seqs))
    }

    /// The scan plan as of `snapshot`.
    pub async fn scan_at(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        snapshot: &Snapshot,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        // A lookup by key reads the key summaries while the files are listed
        // (see `archive::key_index`), and opens only the files they allow.
        let keys = partition_keys(filters);
        let summaries = async {
            match keys {
                Some(_) => self.key_index(state, filters).await.map(Some),
                None => Ok(None),
            }
        };
        let (files, index) = futures::join!(self.select_files(state, filters, snapshot), summaries);
        let (mut files, index) = (files?, index?);
        // Files whose data is most likely needed (see `tail_reader`).
        let mut whole = WholeFiles::None;
        if let (Some(keys), Some(index)) = (&keys, &index) {
            let likely;
            (files, likely) = prune_by_keys(files, keys, index);
            whole = WholeFiles::These(likely);
        } else if keys.is_none() && reads_record_columns(projection, filters) {
            whole = WholeFiles::All;
        }
        if files.is_empty() {
            let schema = match projection {
                Some(p) => Arc::new(record::table_schema().project(p)?),
                None => record::table_schema(),
            };
            return Ok(Arc::new(EmptyExec::new(schema)));
        }
        let groups = balance(files, state.config().target_partitions().max(1));
        let table_schema = TableSchema::builder(record::query_file_schema())
            .with_table_partition_cols(vec![
                Arc::new(Field::new(col::DT, DataType::Utf8, false)),
                Arc::new(Field::new(col::HR, DataType::Utf8, false)),
            ])
            .build();
        let options = state.table_options().parquet.clone();
        if !matches!(self.archive.location, ArchiveLocation::S3 { .. }) {
            let format = ParquetFormat::default().with_options(options);
            let source = format.file_source(table_schema);
            let config = FileScanConfigBuilder::new(self.store_url.clone(), source)
                .with_file_groups(groups)
                .with_projection_indices(projection.cloned())?
                .with_limit(limit)
                .build();
            return format.create_physical_plan(state, config).await;
        }
        // A remote store: every request is a round trip (see `tail_reader`).
        let store = state.runtime_env().object_store(&self.store_url)?;
        let order = groups
            .iter()
            .map(|g| {
                g.iter()
                    .map(|f| (f.object_meta.location.clone(), f.object_meta.size))
                    .collect()
            })
            .collect();
        let source = ParquetSource::new(table_schema)
            .with_table_parquet_options(options)
            .with_parquet_file_reader_factory(Arc::new(TailReaderFactory::new(
                store,
                order,
                whole,
                Arc::clone(&self.tails),
            )));
        let config = FileScanConfigBuilder::new(self.store_url.clone(), Arc::new(source))
            .with_file_groups(groups)
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        Ok(DataSourceExec::from_data_source(config))
    }
}

impl ArchiveTable {
    /// The key summaries of the days `filters` allow (by arrival time and
    /// `dt`), listed from the summaries' folder itself so that this runs
    /// alongside the listing of the data files.
    async fn key_index(&self, state: &dyn Session, filters: &[Expr]) -> DfResult<KeyIndex> {
        let range = TimeRange::from_filters(filters);
        if range.is_empty() {
            return Ok(KeyIndex::default());
        }
        let parts = PartitionFilter::new(state, filters)?;
        let root = key_index::keys_root(&self.archive, &self.stream);
        let listed = with_retry(&self.archive.describe(&root), || {
            self.archive.store.list_with_delimiter(Some(&root))
        })
        .await;
        let listed = match listed {
            Ok(l) => l.common_prefixes,
            Err(e) => {
                tracing::debug!("key summaries not listed: {e}");
                return Ok(KeyIndex::default());
            }
        };
        let mut days = Vec::new();
        for p in &listed {
            let Some(dt) = p.filename().and_then(|n| n.strip_prefix("dt=")) else {
                continue;
            };
            let Ok(day) = NaiveDate::parse_from_str(dt, "%Y-%m-%d") else {
                continue;
            };
            let Some(from) = day
                .and_hms_opt(0, 0, 0)
                .map(|t| t.and_utc().timestamp_millis())
            else {
                continue;
            };
            if range.overlaps(from, from + 24 * HOUR_MS - 1) {
                days.push(dt.to_string());
            }
        }
        let keep = parts.eval_days(&days)?;
        let days = days
            .into_iter()
            .zip(keep)
            .filter_map(|(d, k)| k.then_some(d))
            .collect();
        Ok(KeyIndex::load(&self.archive, &self.stream, days).await)
    }
}

/// Whether a scan most likely decodes the data of every file it opens: it
/// reads a record column, and its filters are only on columns that decide
/// the files by their names (`dt`, `hr`, the arrival time's hour, the
/// shard) or that statistics cannot answer (the payload, e.g. through JSON
/// functions). A filter on `partition_key` or the sequence numbers may let
/// statistics or bloom filters rule a file out unread. (A time range within
/// an hour may still rule out some files by their statistics; reading those
/// whole costs bytes, not round trips.)
fn reads_record_columns(projection: Option<&Vec<usize>>, filters: &[Expr]) -> bool {
    let file_columns = record::query_file_schema().fields().len();
    let reads = projection.is_none_or(|p| p.iter().any(|&i| i < file_columns));
    let partition_decides = filters.iter().all(|f| {
        f.column_refs().iter().all(|c| {
            [col::DT, col::HR, col::ARRIVAL, col::SHARD_ID, col::DATA].contains(&c.name.as_str())
        })
    });
    reads && partition_decides
}

/// Leave out the files whose key summaries rule out every one of `keys`
/// (see `archive::key_index`). Also returns the files kept because their
/// summary may hold a key.
fn prune_by_keys(
    files: Vec<SelectedFile>,
    keys: &std::collections::BTreeSet<String>,
    index: &KeyIndex,
) -> (Vec<SelectedFile>, HashSet<Path>) {
    let before = files.len();
    let kept: Vec<SelectedFile> = files
        .into_iter()
        .filter(|f| {
            f.meta
                .location
                .filename()
                .is_none_or(|name| index.may_hold_any(name, keys))
        })
        .collect();
    tracing::debug!(
        summaries = index.objects,
        files = before,
        kept = kept.len(),
        "files pruned by key summaries"
    );
    let likely = kept
        .iter()
        .filter(|f| f.meta.location.filename().is_some_and(|n| index.has(n)))
        .map(|f| f.meta.location.clone())
        .collect();
    (kept, likely)
}

/// Leave out the files that a shard and sequence range rules out, by their
/// names alone. Within one hour partition, a shard's files hold disjoint
/// runs of its sequence space in the order of their first records (flushes
/// are sequential, and a merge joins consecutive files of one hour); files
/// of different hours may interleave (arrival times can go back), so the
/// runs are compared per hour.
fn prune_by_name(files: Vec<SelectedFile>, range: &ShardRange) -> Vec<SelectedFile> {
    if *range == ShardRange::default() {
        return files;
    }
    // Per (checkpoint key, dt, hr): (first sequence, sub-sequence, index).
    type Runs = BTreeMap<(String, String, String), Vec<(String, u64, usize)>>;
    let mut by_key: Runs = BTreeMap::new();
    let mut keep = vec![true; files.len()];
    for (i, f) in files.iter().enumerate() {
        let Some(name) = f.meta.location.filename().and_then(parse_data_file_name) else {
            continue;
        };
        let (shard, _) = crate::archive::identity::split_key(&name.shard_id);
        if !range.has_shard(shard) {
            keep[i] = false;
            continue;
        }
        let group = (name.shard_id.clone(), f.dt.clone(), f.hr.clone());
        by_key.entry(group).or_default().push((
            name.first.sequence_number,
            name.first.subsequence_number.max(0) as u64,
            i,
        ));
    }
    for runs in by_key.values_mut() {
        runs.sort_by(|a, b| record::cmp_sequence(&a.0, &b.0).then(a.1.cmp(&b.1)));
        let firsts: Vec<&str> = runs.iter().map(|r| r.0.as_str()).collect();
        for (r, k) in runs.iter().zip(range.keep_files(&firsts)) {
            if !k {
                keep[r.2] = false;
            }
        }
    }
    files
        .into_iter()
        .zip(keep)
        .filter_map(|(f, k)| k.then_some(f))
        .collect()
}

/// Spread files over `n` groups of similar total size (largest first).
fn balance(mut files: Vec<SelectedFile>, n: usize) -> Vec<FileGroup> {
    files.sort_by_key(|f| std::cmp::Reverse(f.meta.size));
    let n = n.min(files.len()).max(1);
    let mut groups: Vec<(u64, Vec<PartitionedFile>)> = (0..n).map(|_| (0, Vec::new())).collect();
    for f in files {
        let Some(g) = groups.iter_mut().min_by_key(|g| g.0) else {
            break;
        };
        g.0 += f.meta.size;
        g.1.push(
            PartitionedFile::new_from_meta(f.meta).with_partition_values(vec![
                ScalarValue::Utf8(Some(f.dt)),
                ScalarValue::Utf8(Some(f.hr)),
            ]),
        );
    }
    groups.into_iter().map(|(_, g)| FileGroup::new(g)).collect()
}

/// The filters that use only partition columns, evaluated on candidate
/// partitions.
struct PartitionFilter {
    exprs: Vec<Arc<dyn datafusion::physical_plan::PhysicalExpr>>,
    day_exprs: Vec<Arc<dyn datafusion::physical_plan::PhysicalExpr>>,
    schema: SchemaRef,
}

impl PartitionFilter {
    fn new(state: &dyn Session, filters: &[Expr]) -> DfResult<Self> {
        let schema = Arc::new(Schema::new(vec![
            Field::new(col::DT, DataType::Utf8, false),
            Field::new(col::HR, DataType::Utf8, false),
        ]));
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        let mut exprs = Vec::new();
        let mut day_exprs = Vec::new();
        for f in filters {
            let mut cols = std::collections::HashSet::new();
            expr_to_columns(f, &mut cols)?;
            if cols.is_empty() || !cols.iter().all(|c| c.name == col::DT || c.name == col::HR) {
                continue;
            }
            let p = state.create_physical_expr(f.clone(), &df_schema)?;
            if cols.iter().all(|c| c.name == col::DT) {
                day_exprs.push(p.clone());
            }
            exprs.push(p);
        }
        Ok(PartitionFilter {
            exprs,
            day_exprs,
            schema,
        })
    }

    fn run(
        &self,
        exprs: &[Arc<dyn datafusion::physical_plan::PhysicalExpr>],
        keys: &[(String, String)],
    ) -> DfResult<Vec<bool>> {
        let mut keep = vec![true; keys.len()];
        if exprs.is_empty() || keys.is_empty() {
            return Ok(keep);
        }
        let batch = RecordBatch::try_new(
            self.schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    keys.iter().map(|k| k.0.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    keys.iter().map(|k| k.1.as_str()),
                )),
            ],
        )?;
        for e in exprs {
            let v = e.evaluate(&batch)?.into_array(keys.len())?;
            let Some(b) = v.as_any().downcast_ref::<BooleanArray>() else {
                continue;
            };
            for (i, k) in keep.iter_mut().enumerate() {
                *k &= b.is_valid(i) && b.value(i);
            }
        }
        Ok(keep)
    }

    /// Which (dt, hr) partitions pass.
    fn eval(&self, keys: &[(String, String)]) -> DfResult<Vec<bool>> {
        self.run(&self.exprs, keys)
    }

    /// Which days pass the filters that use `dt` alone.
    fn eval_days(&self, days: &[String]) -> DfResult<Vec<bool>> {
        let keys: Vec<(String, String)> = days.iter().map(|d| (d.clone(), String::new())).collect();
        self.run(&self.day_exprs, &keys)
    }
}
