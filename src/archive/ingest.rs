//! Write records that were not read by the archiver — generated for a
//! benchmark or a test, or imported — as one committed flush of a shard,
//! through the same commit protocol (stage, commit, publish) and with the same
//! file names and footers, so that `verify`, `status` and SQL treat the result
//! exactly like an archiver's output.

use std::collections::BTreeMap;

use object_store::path::Path;

use crate::archive::archiver::flush_metadata;
use crate::archive::checkpoint::{Commit, PublishPolicy, ShardCheckpoint, load_latest, stage};
use crate::archive::key_index;
use crate::archive::layout::hour_key;
use crate::archive::store::Archive;
use crate::archive::writer::ParquetSettings;
use crate::error::{Error, Result};
use crate::record::{Record, RecordBatchBuilder};

/// Append `records` (all of `shard`, in shard order, after anything already
/// committed for it) to the archive of `stream` as one flush. Returns the
/// files written.
pub async fn write_flush(
    archive: &Archive,
    settings: &ParquetSettings,
    stream: &str,
    shard: &str,
    records: &[Record],
) -> Result<Vec<Path>> {
    let policy = PublishPolicy {
        settings: settings.clone(),
        ..PublishPolicy::default()
    };
    write_flush_with(archive, &policy, stream, shard, records, None).await
}

/// [`write_flush`] for a shard made by resharding: its first flush records
/// `parents` (the shards it was split or merged from) in its checkpoint, as
/// the archiver does, so the lineage (and the order of positions) knows it.
pub async fn write_child_flush(
    archive: &Archive,
    settings: &ParquetSettings,
    stream: &str,
    shard: &str,
    parents: &[String],
    records: &[Record],
) -> Result<Vec<Path>> {
    let policy = PublishPolicy {
        settings: settings.clone(),
        ..PublishPolicy::default()
    };
    write(archive, &policy, stream, shard, parents, records, None).await
}

/// [`write_flush`] under a publication policy: with hourly publication, the
/// hours that ended at or before `closed_before_ms` are published (merged)
/// after the commit, the others stay staged.
pub async fn write_flush_with(
    archive: &Archive,
    policy: &PublishPolicy,
    stream: &str,
    shard: &str,
    records: &[Record],
    closed_before_ms: Option<i64>,
) -> Result<Vec<Path>> {
    write(
        archive,
        policy,
        stream,
        shard,
        &[],
        records,
        closed_before_ms,
    )
    .await
}

async fn write(
    archive: &Archive,
    policy: &PublishPolicy,
    stream: &str,
    shard: &str,
    parents: &[String],
    records: &[Record],
    closed_before_ms: Option<i64>,
) -> Result<Vec<Path>> {
    let settings = &policy.settings;
    let (Some(first), Some(last)) = (records.first(), records.last()) else {
        return Ok(vec![]);
    };
    // No lease: write under the epoch of the shard's latest state.
    let epoch = load_latest(archive, stream, shard)
        .await?
        .map_or(0, |c| c.epoch);
    let mut ck = ShardCheckpoint::open_with(
        archive,
        stream,
        shard,
        parents.to_vec(),
        "fluxcap-ingest",
        epoch,
        policy.clone(),
    )
    .await?;
    let prev = ck.state().position.clone();
    if prev.as_ref().is_some_and(|p| first.position() <= *p) {
        return Err(Error::Usage(format!(
            "records for shard {shard} of stream {stream} must come after its committed position"
        )));
    }
    let mut by_hour: BTreeMap<i64, Vec<&Record>> = BTreeMap::new();
    for r in records {
        by_hour.entry(hour_key(r.arrival_ms)).or_default().push(r);
    }
    let files: Vec<(Path, Vec<&Record>)> = by_hour
        .into_iter()
        .map(|(hour, recs)| {
            let path =
                archive
                    .layout
                    .data_file(stream, hour, shard, &recs[0].position(), recs.len());
            (path, recs)
        })
        .collect();
    let paths: Vec<Path> = files.iter().map(|(p, _)| p.clone()).collect();
    let last_pos = last.position();
    let mut staged = Vec::with_capacity(files.len());
    let mut keys = Vec::new();
    for (path, recs) in files {
        let mut b =
            RecordBatchBuilder::with_capacity(recs.len(), recs.iter().map(|r| r.data.len()).sum());
        for r in &recs {
            b.push(r);
        }
        let metadata = flush_metadata(prev.as_ref(), Some(&last_pos), records.len() as u64, shard);
        let batch = b.finish();
        if settings.bloom_filters {
            keys.extend(key_index::summarize([(&path, &batch)]));
        }
        let bytes = settings.encode(&[batch], metadata, &archive.describe(&path))?;
        staged.push(stage(archive, stream, epoch, &path, bytes.into()).await?);
    }
    ck.commit(Commit {
        position: Some(last_pos),
        last_arrival_ms: Some(last.arrival_ms),
        records: records.len() as u64,
        files: staged,
        finished: false,
        gap: None,
        closed_before_ms,
    })
    .await?;
    key_index::write_after_commit(archive, stream, keys).await;
    Ok(paths)
}
