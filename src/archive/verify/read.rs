//! What `verify` reads of a data file: its Parquet footer, and nothing else.
//!
//! The footer is fetched with ranged reads of the object's end (one GET of
//! its last [`FOOTER_HINT`] bytes, a second only for a larger footer): the
//! row count, the flush segments `fluxcap` wrote into the key-value
//! metadata, and the exact row-group statistics of `sequence_number`. The
//! data pages are never read, so the memory of a verification grows with
//! the number of files, not with the number of records.

use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::async_reader::MetadataFetch;
use parquet::errors::ParquetError;
use parquet::file::metadata::ParquetMetaDataReader;
use parquet::file::statistics::Statistics;

use crate::archive::footer::{decode_position, key_values, segments_of};
use crate::error::{Error, Result};
use crate::record::{Position, cmp_sequence};

/// Bytes fetched from the end of a file in the first read of its footer.
pub const FOOTER_HINT: usize = 16 * 1024;

/// Footers read at once.
pub const READ_CONCURRENCY: usize = 32;

/// One flush part of a file, decoded from its footer.
#[derive(Debug, Clone)]
pub struct FileSegment {
    /// Position before the flush (`None`: the start of the shard).
    pub prev: Option<Position>,
    /// Last record of the flush.
    pub last: Option<Position>,
    /// Records of the whole flush (all of its files).
    pub flush_records: u64,
    /// Records of the flush in this file.
    pub count: u64,
}

/// What a data file's footer says.
#[derive(Debug, Clone)]
pub struct Footer {
    /// Rows in the file.
    pub rows: u64,
    /// The flush parts it holds.
    pub segments: Vec<FileSegment>,
    /// The numerically lowest exact row-group minimum of `sequence_number`
    /// (a value the file holds), when the statistics are exact.
    pub lowest: Option<String>,
    /// The numerically highest exact row-group maximum of `sequence_number`.
    pub highest: Option<String>,
}

/// Ranged reads of one object, for the footer reader.
struct RangedObject {
    store: Arc<dyn ObjectStore>,
    location: Path,
}

impl MetadataFetch for RangedObject {
    fn fetch(
        &mut self,
        range: std::ops::Range<u64>,
    ) -> BoxFuture<'_, parquet::errors::Result<Bytes>> {
        async move {
            self.store
                .get_range(&self.location, range)
                .await
                .map_err(|e| ParquetError::External(Box::new(e)))
        }
        .boxed()
    }
}

fn not_found(e: &ParquetError) -> bool {
    match e {
        ParquetError::External(inner) => matches!(
            inner.downcast_ref::<object_store::Error>(),
            Some(object_store::Error::NotFound { .. })
        ),
        _ => false,
    }
}

/// Read the footer of `location` (`size` bytes) from `store`; `name` names
/// it in errors. `None` when the object does not exist.
pub async fn read_footer(
    store: Arc<dyn ObjectStore>,
    location: Path,
    size: u64,
    name: &str,
) -> Result<Option<Footer>> {
    let fetch = RangedObject { store, location };
    let meta = match ParquetMetaDataReader::new()
        .with_prefetch_hint(Some(FOOTER_HINT))
        .load_and_finish(fetch, size)
        .await
    {
        Ok(m) => m,
        Err(e) if not_found(&e) => return Ok(None),
        Err(source) => {
            return Err(Error::Parquet {
                object: name.to_string(),
                source,
            });
        }
    };
    let fm = meta.file_metadata();
    let rows = u64::try_from(fm.num_rows()).map_err(|_| Error::CorruptState {
        object: name.to_string(),
        message: format!("negative row count {}", fm.num_rows()),
    })?;
    let kv = key_values(fm);
    let segments = segments_of(&kv, rows)
        .into_iter()
        .map(|s| FileSegment {
            prev: decode_position(&s.prev),
            last: decode_position(&s.last),
            flush_records: s.records,
            count: s.count,
        })
        .collect();
    let Some(col) = fm
        .schema_descr()
        .columns()
        .iter()
        .position(|c| c.name() == "sequence_number")
    else {
        return Err(Error::CorruptState {
            object: name.to_string(),
            message: "not an archive file: no sequence_number column".into(),
        });
    };
    let (mut lowest, mut highest): (Option<String>, Option<String>) = (None, None);
    for rg in meta.row_groups() {
        let Some(Statistics::ByteArray(s)) = rg.column(col).statistics() else {
            continue;
        };
        if s.min_is_exact()
            && let Some(v) = s.min_opt().and_then(|v| v.as_utf8().ok())
            && lowest.as_deref().is_none_or(|l| cmp_sequence(v, l).is_lt())
        {
            lowest = Some(v.to_string());
        }
        if s.max_is_exact()
            && let Some(v) = s.max_opt().and_then(|v| v.as_utf8().ok())
            && highest
                .as_deref()
                .is_none_or(|h| cmp_sequence(v, h).is_gt())
        {
            highest = Some(v.to_string());
        }
    }
    Ok(Some(Footer {
        rows,
        segments,
        lowest,
        highest,
    }))
}
