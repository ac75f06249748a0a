//! The positions table: for each shard of a stream, the position up to which
//! its records are in published files — a small Parquet table beside the
//! archive that any engine joins to tell archived records from live ones
//! (the cluster twin of the split `fluxcap sql` makes for `S`).
//!
//! ```text
//!   <root>/fluxcap-positions/<stream>/positions.parquet      one object, replaced whole
//!
//!   flush of shard s:  stage ─▶ commit gen N+1 ─▶ publish files ─▶ positions row of s := P'
//!                                                                  (the flush waits for it)
//!   a row never names a record whose file is not published (it is written after
//!   the publish), and lags the shard's published files by at most the flush
//!   in progress: the shard's next flush starts only once the row is written.
//! ```
//!
//! One archiver holds a stream's lease, so one process writes the table: its
//! shard tasks hand their rows to one [`PositionsTable`], which writes the
//! whole table (a single PUT, atomic on S3; a rename on a local directory)
//! and answers every row the write included (a group commit). A reader sees
//! the previous table or the new one, never a mix.
//!
//! **Columns** (one row per shard of the stream's current incarnation):
//! `stream`, `stream_arn`, `stream_created_ms`, `shard_id`,
//! `sequence_number` / `subsequence_number` (the last published record;
//! NULL when nothing is), `sequence_key` (`sequence_number` left-padded with
//! zeros to [`SEQUENCE_KEY_WIDTH`] digits, so that engines without 129-digit
//! decimals compare positions as strings), `finished` (read to its end: no
//! live record of the shard is unarchived), `records` and `updated_at_ms`.
//! The footer's `fluxcap.positions.version` is [`POSITIONS_VERSION`].
//!
//! **The rule an engine applies** (the same as `S`): a live record belongs to
//! the unarchived tail when its shard has no row, or its row is not
//! `finished` and its position is after the row's (or the row names none).
//!
//! **Hourly publication** (`archive.publish = "hour"`): committed files wait
//! for their hour to close, so a row holds the position just before the
//! first record of the earliest file not published yet. Records of a file
//! published before that point (arrival times that go back across an hour
//! boundary) are then counted on both sides until the earlier hour is
//! published.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use futures::StreamExt;
use object_store::ObjectStoreExt;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

use crate::archive::checkpoint::{Checkpoint, ShardCheckpoint, stored_path};
use crate::archive::identity;
use crate::archive::layout::parse_data_file_name;
use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::record::Position;

/// Format version of the positions table written by this version.
pub const POSITIONS_VERSION: u32 = 1;

/// Footer key of the format version.
pub const VERSION_KEY: &str = "fluxcap.positions.version";

/// Digits of `sequence_key`: Kinesis sequence numbers have at most 129.
pub const SEQUENCE_KEY_WIDTH: usize = 129;

/// Checkpoints whose published files are checked at once when the table is
/// first built.
const CHECK_CONCURRENCY: usize = 16;

/// One shard's row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Kinesis shard id (without the incarnation suffix).
    pub shard_id: String,
    /// Last record whose file is published; `None` when none is.
    pub position: Option<Position>,
    /// The shard is read to its end and all of it is published.
    pub finished: bool,
    /// Records archived for the shard (committed).
    pub records: u64,
    /// When the row was last changed (epoch ms).
    pub updated_at_ms: i64,
}

/// `sequence_number` left-padded with zeros to [`SEQUENCE_KEY_WIDTH`] digits.
pub fn sequence_key(seq: &str) -> String {
    format!("{seq:0>SEQUENCE_KEY_WIDTH$}")
}

/// The position just before `p`: every position `q < p` has `q <= before(p)`.
/// `None` when nothing comes before `p`.
pub fn before(p: &Position) -> Option<Position> {
    if p.subsequence_number > 0 {
        return Some(Position::new(
            p.sequence_number.clone(),
            p.subsequence_number - 1,
        ));
    }
    let prev = decrement(&p.sequence_number)?;
    Some(Position::new(prev, i64::MAX))
}

/// A decimal string minus one (`None` for 0 or a string that is not a number).
fn decrement(s: &str) -> Option<String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: Vec<u8> = s.bytes().collect();
    let mut i = digits.len();
    loop {
        if i == 0 {
            return None;
        }
        i -= 1;
        if digits[i] == b'0' {
            digits[i] = b'9';
        } else {
            digits[i] -= 1;
            break;
        }
    }
    let out = String::from_utf8(digits).ok()?;
    let trimmed = out.trim_start_matches('0');
    Some(if trimmed.is_empty() {
        "0".to_string()
    } else {
        trimmed.to_string()
    })
}

/// The schema of the table.
pub fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stream", DataType::Utf8, false),
        Field::new("stream_arn", DataType::Utf8, true),
        Field::new("stream_created_ms", DataType::Int64, true),
        Field::new("shard_id", DataType::Utf8, false),
        Field::new("sequence_number", DataType::Utf8, true),
        Field::new("subsequence_number", DataType::Int64, true),
        Field::new("sequence_key", DataType::Utf8, true),
        Field::new("finished", DataType::Boolean, false),
        Field::new("records", DataType::Int64, false),
        Field::new("updated_at_ms", DataType::Int64, false),
    ]))
}

/// Which incarnation of the stream the rows describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamId {
    /// Stream name.
    pub stream: String,
    /// Its ARN.
    pub arn: String,
    /// Its creation time (epoch ms).
    pub created_ms: i64,
}

/// Encode the table.
pub fn encode(id: &StreamId, rows: &BTreeMap<String, Row>, object: &str) -> Result<Vec<u8>> {
    let n = rows.len();
    let col_str = |f: &dyn Fn(&Row) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(rows.values().map(f).collect::<Vec<_>>()))
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![id.stream.as_str(); n])),
        Arc::new(StringArray::from(vec![Some(id.arn.as_str()); n])),
        Arc::new(Int64Array::from(vec![Some(id.created_ms); n])),
        col_str(&|r| Some(r.shard_id.clone())),
        col_str(&|r| r.position.as_ref().map(|p| p.sequence_number.clone())),
        Arc::new(Int64Array::from(
            rows.values()
                .map(|r| r.position.as_ref().map(|p| p.subsequence_number))
                .collect::<Vec<_>>(),
        )),
        col_str(&|r| {
            r.position
                .as_ref()
                .map(|p| sequence_key(&p.sequence_number))
        }),
        Arc::new(BooleanArray::from(
            rows.values().map(|r| r.finished).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.values()
                .map(|r| i64::try_from(r.records).unwrap_or(i64::MAX))
                .collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            rows.values().map(|r| r.updated_at_ms).collect::<Vec<_>>(),
        )),
    ];
    let perr = |source| Error::Parquet {
        object: object.to_string(),
        source,
    };
    let batch = RecordBatch::try_new(schema(), columns).map_err(|e| Error::Query {
        message: format!("building the positions table {object}: {e}"),
    })?;
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::ZSTD(
            parquet::basic::ZstdLevel::try_new(3).map_err(perr)?,
        ))
        .set_key_value_metadata(Some(vec![KeyValue::new(
            VERSION_KEY.to_string(),
            POSITIONS_VERSION.to_string(),
        )]))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, schema(), Some(props)).map_err(perr)?;
    w.write(&batch).map_err(perr)?;
    w.close().map_err(perr)?;
    Ok(out)
}

/// Read a stream's positions table: its incarnation and rows by shard id;
/// `None` when there is none. A table of a later format version is refused.
pub async fn read(
    archive: &Archive,
    stream: &str,
) -> Result<Option<(StreamId, BTreeMap<String, Row>)>> {
    let path = archive.layout.positions(stream);
    let bytes = match archive.get_bytes(&path).await {
        Ok(b) => b,
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => return Ok(None),
        Err(e) => return Err(e),
    };
    decode(stream, bytes, &archive.describe(&path)).map(Some)
}

/// Decode a positions table read from `object`.
fn decode(
    stream: &str,
    bytes: bytes::Bytes,
    object: &str,
) -> Result<(StreamId, BTreeMap<String, Row>)> {
    let object = object.to_string();
    let perr = |source| Error::Parquet {
        object: object.clone(),
        source,
    };
    let corrupt = |message: String| Error::CorruptState {
        object: object.clone(),
        message,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(perr)?;
    let version = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .and_then(|kv| kv.iter().find(|k| k.key == VERSION_KEY))
        .and_then(|k| k.value.as_deref())
        .and_then(|v| v.parse::<u32>().ok())
        .unwrap_or(0);
    if version == 0 || version > POSITIONS_VERSION {
        return Err(corrupt(format!(
            "positions table of format version {version}; this fluxcap reads versions 1 to {POSITIONS_VERSION}"
        )));
    }
    let mut id = None;
    let mut rows = BTreeMap::new();
    for batch in builder.build().map_err(perr)? {
        let b = batch?;
        let s = |name: &str| -> Result<&StringArray> {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                .ok_or_else(|| corrupt(format!("no string column {name}")))
        };
        let i = |name: &str| -> Result<&Int64Array> {
            b.column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                .ok_or_else(|| corrupt(format!("no integer column {name}")))
        };
        let finished = b
            .column_by_name("finished")
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
            .ok_or_else(|| corrupt("no boolean column finished".into()))?;
        let (streams, arns, created) = (s("stream")?, s("stream_arn")?, i("stream_created_ms")?);
        let (shards, seqs, subs) = (
            s("shard_id")?,
            s("sequence_number")?,
            i("subsequence_number")?,
        );
        let (records, updated) = (i("records")?, i("updated_at_ms")?);
        for r in 0..b.num_rows() {
            id.get_or_insert_with(|| StreamId {
                stream: streams.value(r).to_string(),
                arn: arns.value(r).to_string(),
                created_ms: created.value(r),
            });
            let position = (!seqs.is_null(r)).then(|| Position::new(seqs.value(r), subs.value(r)));
            rows.insert(
                shards.value(r).to_string(),
                Row {
                    shard_id: shards.value(r).to_string(),
                    position,
                    finished: finished.value(r),
                    records: u64::try_from(records.value(r)).unwrap_or(0),
                    updated_at_ms: updated.value(r),
                },
            );
        }
    }
    let id = id.unwrap_or(StreamId {
        stream: stream.to_string(),
        arn: String::new(),
        created_ms: 0,
    });
    Ok((id, rows))
}

/// Whether row `a` is further than row `b` of the same shard: finished, or
/// at a later position. Rows only ever move forward, so of two writers'
/// rows the further one is the newer.
fn further(a: &Row, b: &Row) -> bool {
    (a.finished, &a.position, a.records) > (b.finished, &b.position, b.records)
}

/// `ours` merged into the table `theirs` read from the store: for each
/// shard the further row (rows of another incarnation are dropped).
fn merge(
    id: &StreamId,
    theirs: Option<(StreamId, BTreeMap<String, Row>)>,
    ours: BTreeMap<String, Row>,
) -> BTreeMap<String, Row> {
    let mut out = match theirs {
        Some((tid, rows)) if &tid == id => rows,
        _ => BTreeMap::new(),
    };
    for (k, r) in ours {
        match out.get(&k) {
            Some(t) if !further(&r, t) => {}
            _ => {
                out.insert(k, r);
            }
        }
    }
    out
}

/// The row a shard's open checkpoint chain gives (what its writer knows is published).
pub fn row_of(ck: &ShardCheckpoint) -> Row {
    let state = ck.state();
    let (position, all_published) = ck.published_through();
    Row {
        shard_id: identity::split_key(&state.shard_id).0.to_string(),
        position,
        finished: state.finished && all_published,
        records: state.records,
        updated_at_ms: chrono::Utc::now().timestamp_millis(),
    }
}

/// The row of a checkpoint read from the store, made safe: its committed
/// files are published first (idempotent; `hourly`: only those of closed
/// hours are, so the row stops before the first file still staged).
async fn checked_row(archive: &Archive, c: &Checkpoint, hourly: bool) -> Result<Row> {
    let mut first_unpublished: Option<Position> = None;
    for e in &c.publish {
        let staged = stored_path(archive, &e.staged)?;
        let path = stored_path(archive, &e.path)?;
        if !hourly {
            archive.publish(&staged, &path, e.size).await?;
            continue;
        }
        match archive.store.head(&path).await {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                let first = path
                    .filename()
                    .and_then(parse_data_file_name)
                    .map(|d| d.first)
                    .ok_or_else(|| Error::CorruptState {
                        object: archive.describe(&path),
                        message: "a committed file without a data file name".into(),
                    })?;
                if first_unpublished.as_ref().is_none_or(|f| first < *f) {
                    first_unpublished = Some(first);
                }
            }
            Err(e) => return Err(Error::store(archive.describe(&path), e)),
        }
    }
    let (position, all) = match first_unpublished {
        None => (c.position.clone(), true),
        Some(f) => (before(&f), false),
    };
    Ok(Row {
        shard_id: identity::split_key(&c.shard_id).0.to_string(),
        position,
        finished: c.finished && all,
        records: c.records,
        updated_at_ms: chrono::Utc::now().timestamp_millis(),
    })
}

/// The positions table of one stream, written by its lease holder.
#[derive(Debug)]
pub struct PositionsTable {
    archive: Archive,
    id: StreamId,
    /// The rows and the number of changes made to them.
    rows: std::sync::Mutex<(u64, BTreeMap<String, Row>)>,
    /// How many changes the table in the store holds (held while writing).
    written: tokio::sync::Mutex<u64>,
    /// Other archivers write rows of the same table (shared archivers):
    /// every write reads the table, keeps the further row of each shard and
    /// replaces it only if nobody replaced it meanwhile.
    shared: bool,
}

impl PositionsTable {
    /// Build the table of the current incarnation from its checkpoints and
    /// write it. Rows of the table in the store that match a checkpoint
    /// exactly are taken as they are (they were written after their files
    /// were published). A finished shard's other checkpoint has its committed
    /// files published (or, hourly, checked) first: no task of its own will
    /// write its row. An unfinished shard keeps its previous row (or none
    /// yet) until its task opens it, which publishes what it committed and
    /// writes the row — moments later; a previous row is never ahead of the
    /// files.
    pub async fn start(
        archive: &Archive,
        id: StreamId,
        suffix: &str,
        checkpoints: &[Checkpoint],
        hourly: bool,
        shared: bool,
    ) -> Result<Self> {
        let previous = match read(archive, &id.stream).await {
            Ok(Some((prev_id, rows))) if prev_id == id => rows,
            Ok(_) => BTreeMap::new(),
            Err(e) => {
                tracing::warn!(stream = %id.stream, "rebuilding the positions table: {e}");
                BTreeMap::new()
            }
        };
        let current: Vec<(Checkpoint, Option<Row>)> = checkpoints
            .iter()
            .filter(|c| identity::split_key(&c.shard_id).1 == suffix)
            .map(|c| {
                let prev = previous.get(identity::split_key(&c.shard_id).0).cloned();
                (c.clone(), prev)
            })
            .collect();
        let rows: Vec<Row> = futures::stream::iter(current)
            .map(|(c, prev)| async move {
                match prev {
                    Some(r)
                        if r.position == c.position
                            && r.finished == c.finished
                            && r.records == c.records =>
                    {
                        Ok(r)
                    }
                    // A finished shard has no task to write its row: make it now.
                    _ if c.finished => checked_row(archive, &c, hourly).await,
                    // Its task writes the row as soon as it opens the shard;
                    // until then the previous row (never ahead of the files).
                    Some(r) => Ok(r),
                    None => Ok(Row {
                        shard_id: identity::split_key(&c.shard_id).0.to_string(),
                        position: None,
                        finished: false,
                        records: 0,
                        updated_at_ms: chrono::Utc::now().timestamp_millis(),
                    }),
                }
            })
            .buffer_unordered(CHECK_CONCURRENCY)
            .collect::<Vec<Result<Row>>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        let rows: BTreeMap<String, Row> =
            rows.into_iter().map(|r| (r.shard_id.clone(), r)).collect();
        let table = PositionsTable {
            archive: archive.clone(),
            id,
            rows: std::sync::Mutex::new((1, rows)),
            written: tokio::sync::Mutex::new(0),
            shared,
        };
        table.write_through(1).await?;
        Ok(table)
    }

    /// Set a shard's row and return once the table in the store holds it.
    pub async fn update(&self, row: Row) -> Result<()> {
        let change = {
            let mut g = self.rows.lock().map_err(|_| poisoned())?;
            if g.1.get(&row.shard_id).is_some_and(|r| same(r, &row)) {
                return Ok(());
            }
            g.0 += 1;
            g.1.insert(row.shard_id.clone(), row);
            g.0
        };
        self.write_through(change).await
    }

    /// Write the table unless a write that started after `change` was made
    /// already holds it.
    async fn write_through(&self, change: u64) -> Result<()> {
        let mut written = self.written.lock().await;
        if *written >= change {
            return Ok(());
        }
        let (upto, rows) = {
            let g = self.rows.lock().map_err(|_| poisoned())?;
            (g.0, g.1.clone())
        };
        let path = self.archive.layout.positions(&self.id.stream);
        let name = self.archive.describe(&path);
        if self.shared {
            self.write_merged(&path, rows).await?;
        } else {
            let body = encode(&self.id, &rows, &name)?;
            self.archive.put_bytes(&path, body.into()).await?;
            self.archive.sync_local(&path).await?;
        }
        *written = upto;
        Ok(())
    }

    /// Merge `rows` into the table in the store and replace it, unless
    /// another writer replaced it meanwhile (then again): a conditional
    /// update on S3, under an exclusive file lock on a local directory.
    async fn write_merged(
        &self,
        path: &object_store::path::Path,
        rows: BTreeMap<String, Row>,
    ) -> Result<()> {
        use object_store::{PutMode, UpdateVersion};
        let name = self.archive.describe(path);
        let stream = self.id.stream.clone();
        if let crate::config::ArchiveLocation::Local(root) = &self.archive.location {
            let lock_path = root.join(path.as_ref()).with_extension("lock");
            let lock = tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                if let Some(d) = lock_path.parent() {
                    std::fs::create_dir_all(d)?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)?;
                f.lock()?;
                Ok(f)
            })
            .await
            .map_err(|e| Error::Usage(format!("internal error: lock task failed: {e}")))?
            .map_err(|source| Error::Io {
                path: format!("{name} (its lock file)").into(),
                source,
            })?;
            let theirs = read(&self.archive, &stream).await?;
            let body = encode(&self.id, &merge(&self.id, theirs, rows), &name)?;
            let res = async {
                self.archive.put_bytes(path, body.into()).await?;
                self.archive.sync_local(path).await
            }
            .await;
            drop(lock);
            return res;
        }
        for _ in 0..100 {
            let got =
                crate::archive::store::with_retry(&name, || self.archive.store.get(path)).await;
            let (theirs, version) = match got {
                Ok(r) => {
                    let etag = r.meta.e_tag.clone();
                    let bytes = r.bytes().await.map_err(|e| Error::store(&name, e))?;
                    (Some(decode(&stream, bytes, &name)?), etag)
                }
                Err(object_store::Error::NotFound { .. }) => (None, None),
                Err(e) => return Err(Error::store(&name, e)),
            };
            let mode = match (&theirs, version) {
                (Some(_), Some(e_tag)) => PutMode::Update(UpdateVersion {
                    e_tag: Some(e_tag),
                    version: None,
                }),
                (Some(_), None) => PutMode::Overwrite,
                (None, _) => PutMode::Create,
            };
            let body = encode(&self.id, &merge(&self.id, theirs, rows.clone()), &name)?;
            let store = self.archive.store.as_ref();
            match crate::archive::store::put_conditional(store, &name, path, body.into(), mode)
                .await
            {
                Ok(_) => return Ok(()),
                Err(object_store::Error::Precondition { .. })
                | Err(object_store::Error::AlreadyExists { .. }) => {
                    tracing::debug!("{name} was replaced meanwhile: merging again");
                }
                Err(e) => return Err(Error::store(&name, e)),
            }
        }
        Err(Error::CorruptState {
            object: name,
            message: "replaced by other archivers 100 times in a row while writing it".into(),
        })
    }
}

/// Two rows that say the same (the time of the change aside).
fn same(a: &Row, b: &Row) -> bool {
    a.position == b.position && a.finished == b.finished && a.records == b.records
}

fn poisoned() -> Error {
    Error::Usage("internal error: the positions table's lock is poisoned".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_steps_back_one_position() {
        let p = |s: &str, k| Position::new(s, k);
        assert_eq!(before(&p("100", 3)), Some(p("100", 2)));
        assert_eq!(before(&p("100", 0)), Some(p("99", i64::MAX)));
        assert_eq!(before(&p("1", 0)), Some(p("0", i64::MAX)));
        assert_eq!(before(&p("0", 0)), None);
        let big = "49590338271490256608559692538361571095921575989136588898";
        let b = before(&p(big, 0)).unwrap_or_else(|| p("", 0));
        assert_eq!(
            b.sequence_number,
            "49590338271490256608559692538361571095921575989136588897"
        );
        assert!(
            b < p(big, 0)
                && p(
                    "49590338271490256608559692538361571095921575989136588897",
                    5
                ) <= b
        );
    }

    #[test]
    fn sequence_keys_order_like_positions() {
        let a = sequence_key("999");
        let b = sequence_key("1000");
        assert_eq!(a.len(), SEQUENCE_KEY_WIDTH);
        assert!(a < b);
    }

    #[test]
    fn the_table_round_trips() {
        let id = StreamId {
            stream: "orders".into(),
            arn: "arn:aws:kinesis:eu-west-1:1:stream/orders".into(),
            created_ms: 7,
        };
        let mut rows = BTreeMap::new();
        for (s, pos, fin) in [
            ("shardId-000000000000", Some(Position::new("12", 0)), true),
            ("shardId-000000000001", None, false),
        ] {
            rows.insert(
                s.to_string(),
                Row {
                    shard_id: s.into(),
                    position: pos,
                    finished: fin,
                    records: 3,
                    updated_at_ms: 9,
                },
            );
        }
        let bytes = encode(&id, &rows, "t").unwrap_or_default();
        let b = ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes));
        assert!(b.is_ok());
    }
}
