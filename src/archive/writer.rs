//! Parquet writer: Arrow record batches → zstd Parquet objects.
//!
//! Settings follow the interop rules every reader of the archive needs
//! (v1 pages, zstd, dictionary where it pays, page statistics, bloom filters
//! on the lookup columns, flat schema with only Drill/Hive-safe types). Objects
//! go through `object_store`, so the local directory and S3 behave alike;
//! large objects are uploaded in parts.

use std::sync::Arc;

use arrow::array::RecordBatch;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

use crate::config::ArchiveConfig;
use crate::error::{Error, Result};
use crate::record::{col, schema};

/// Objects larger than this are uploaded with a multipart upload.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
const PART_SIZE: usize = 8 << 20;

/// How Parquet files are encoded.
#[derive(Debug, Clone)]
pub struct ParquetSettings {
    /// zstd level (1..=22).
    pub zstd_level: i32,
    /// Maximum rows per row group.
    pub row_group_rows: usize,
    /// Data page size limit, bytes.
    pub data_page_size: usize,
    /// Bloom filters on partition_key and sequence_number.
    pub bloom_filters: bool,
}

impl Default for ParquetSettings {
    fn default() -> Self {
        ParquetSettings {
            zstd_level: 3,
            row_group_rows: 262_144,
            data_page_size: 1 << 20,
            bloom_filters: true,
        }
    }
}

impl From<&ArchiveConfig> for ParquetSettings {
    fn from(a: &ArchiveConfig) -> Self {
        ParquetSettings {
            zstd_level: a.zstd_level,
            row_group_rows: a.row_group_rows,
            data_page_size: a.data_page_size.0 as usize,
            bloom_filters: a.bloom_filters,
        }
    }
}

impl ParquetSettings {
    /// Writer properties for a file of about `rows` rows with extra footer metadata.
    pub fn writer_properties(
        &self,
        rows: usize,
        metadata: Vec<KeyValue>,
    ) -> Result<WriterProperties> {
        let level = ZstdLevel::try_new(self.zstd_level).map_err(|source| Error::Parquet {
            object: "(writer settings)".into(),
            source,
        })?;
        let data = ColumnPath::from(col::DATA);
        let seq = ColumnPath::from(col::SEQUENCE_NUMBER);
        let pk = ColumnPath::from(col::PARTITION_KEY);
        let arrival = ColumnPath::from(col::ARRIVAL);
        let mut b = WriterProperties::builder()
            .set_writer_version(WriterVersion::PARQUET_1_0)
            .set_compression(Compression::ZSTD(level))
            .set_dictionary_enabled(true)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_max_row_group_row_count(Some(self.row_group_rows))
            .set_data_page_size_limit(self.data_page_size)
            .set_created_by(format!("fluxcap {}", env!("CARGO_PKG_VERSION")))
            .set_key_value_metadata(Some(metadata))
            // Payloads, sequence numbers and arrival times are (nearly)
            // unique: a dictionary would be built up to its page limit
            // (131,072 timestamps per row group) and thrown away. On the
            // arrival times this cost 2.5% of the encoding instructions and
            // made the column bigger than plain + zstd (scripts/bench-encode).
            // Statistics on payloads are useless.
            .set_column_dictionary_enabled(data.clone(), false)
            .set_column_statistics_enabled(data, EnabledStatistics::None)
            .set_column_dictionary_enabled(seq.clone(), false)
            .set_column_dictionary_enabled(arrival, false);
        if self.bloom_filters {
            let ndv = rows.clamp(1, self.row_group_rows) as u64;
            for c in [seq, pk] {
                b = b
                    .set_column_bloom_filter_enabled(c.clone(), true)
                    .set_column_bloom_filter_fpp(c.clone(), 0.01)
                    .set_column_bloom_filter_max_ndv(c, ndv);
            }
        }
        Ok(b.build())
    }

    /// Encode batches (all of [`schema`]) into one Parquet file in memory.
    pub fn encode(
        &self,
        batches: &[RecordBatch],
        metadata: Vec<KeyValue>,
        object: &str,
    ) -> Result<Vec<u8>> {
        self.encode_owned(batches.to_vec(), metadata, object)
    }

    /// [`Self::encode`], dropping each batch once it is written (its
    /// memory is freed before the file is assembled, when no one else
    /// holds it): the archiver's flushes take records + file, not more.
    pub fn encode_owned(
        &self,
        batches: Vec<RecordBatch>,
        metadata: Vec<KeyValue>,
        object: &str,
    ) -> Result<Vec<u8>> {
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        let bytes: usize = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        let mut props = self.writer_properties(rows, metadata)?;
        // Values go into a page in mini-batches of `write_batch_size` rows
        // (1024 by default) before its size is checked: with large payloads
        // a page would hold a whole flush, uncompressed, beside its
        // compressed copy. Mini-batches of about a page keep pages near
        // their limit.
        let per_row = bytes / rows.max(1);
        if let Some(mini) = self.data_page_size.checked_div(per_row) {
            let mini = mini.clamp(1, 1024);
            if mini < 1024 {
                props = props.into_builder().set_write_batch_size(mini).build();
            }
        }
        let perr = |source| Error::Parquet {
            object: object.to_string(),
            source,
        };
        let mut out = Vec::with_capacity(bytes / 3 + 4096);
        let mut w = ArrowWriter::try_new(&mut out, schema(), Some(props)).map_err(perr)?;
        for b in batches {
            w.write(&b).map_err(perr)?;
        }
        w.close().map_err(perr)?;
        Ok(out)
    }
}

/// Upload `bytes` to `path`, in parts when large. The object appears only when
/// complete (S3 completes the upload atomically; the local store renames a
/// staged file), so a reader never sees half an object.
pub async fn put_object(store: &Arc<dyn ObjectStore>, path: &Path, bytes: Bytes) -> Result<()> {
    let serr = |e| Error::store(path, e);
    if bytes.len() <= MULTIPART_THRESHOLD {
        store
            .put(path, PutPayload::from(bytes))
            .await
            .map_err(serr)?;
        return Ok(());
    }
    let upload = store.put_multipart(path).await.map_err(serr)?;
    let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let res = async {
        for chunk in bytes.chunks(PART_SIZE) {
            w.wait_for_capacity(4).await?;
            w.put(bytes.slice_ref(chunk));
        }
        Ok::<_, object_store::Error>(())
    }
    .await;
    match res {
        Ok(()) => {
            w.finish().await.map_err(serr)?;
            Ok(())
        }
        Err(e) => {
            // Do not leave the parts behind (they are billed until aborted).
            if let Err(a) = w.abort().await {
                tracing::warn!("could not abort the multipart upload of {path}: {a}");
            }
            Err(serr(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Record, RecordBatchBuilder};
    use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
    use parquet::file::reader::{FileReader, SerializedFileReader};

    fn sample(n: usize) -> RecordBatch {
        let mut b = RecordBatchBuilder::default();
        for i in 0..n {
            b.push(&Record {
                shard_id: "shardId-000000000000".into(),
                sequence_number: format!(
                    "4959033827149025660855969253836157109592157598913658{i:04}"
                )
                .into(),
                subsequence_number: 0,
                partition_key: format!("key-{}", i % 17),
                explicit_hash_key: (i % 5 == 0).then(|| "123".to_string()),
                arrival_ms: 1_795_611_600_000 + i as i64,
                data: Bytes::from(format!("{{\"i\":{i}}}")),
            });
        }
        b.finish()
    }

    /// The Drill rules: legacy ConvertedType on the timestamp, UTF8 on every
    /// string, no unsigned or nested types, zstd, v1 pages, bloom filters.
    #[test]
    fn files_follow_the_reader_rules() {
        let s = ParquetSettings::default();
        let bytes = s
            .encode(
                &[sample(1000)],
                vec![KeyValue::new("fluxcap.test".into(), "1".to_string())],
                "mem",
            )
            .unwrap();
        let r = SerializedFileReader::new(Bytes::from(bytes)).unwrap();
        let md = r.metadata();
        let fm = md.file_metadata();
        assert_eq!(fm.version(), 1, "PARQUET_1_0");
        assert!(
            fm.key_value_metadata()
                .unwrap()
                .iter()
                .any(|kv| kv.key == "fluxcap.test")
        );
        let sd = fm.schema_descr();
        for c in sd.columns() {
            let bt = c.self_type().get_basic_info();
            assert!(
                c.max_rep_level() == 0 && c.max_def_level() <= 1,
                "flat schema: {}",
                c.name()
            );
            match c.name() {
                "shard_id" | "sequence_number" | "partition_key" | "explicit_hash_key" => {
                    assert_eq!(c.physical_type(), PhysicalType::BYTE_ARRAY);
                    assert_eq!(bt.converted_type(), ConvertedType::UTF8, "{}", c.name());
                }
                "subsequence_number" => {
                    assert_eq!(c.physical_type(), PhysicalType::INT64);
                    assert!(
                        !matches!(bt.logical_type_ref(), Some(LogicalType::Integer(t)) if !t.is_signed)
                    );
                }
                "approximate_arrival_timestamp" => {
                    assert_eq!(c.physical_type(), PhysicalType::INT64);
                    assert_eq!(bt.converted_type(), ConvertedType::TIMESTAMP_MILLIS);
                }
                "data" => {
                    assert_eq!(c.physical_type(), PhysicalType::BYTE_ARRAY);
                    assert_eq!(bt.converted_type(), ConvertedType::NONE);
                }
                other => panic!("unexpected column {other}"),
            }
        }
        let rg = md.row_group(0);
        for c in rg.columns() {
            assert!(matches!(c.compression(), Compression::ZSTD(_)));
        }
        let names: Vec<_> = sd.columns().iter().map(|c| c.name().to_string()).collect();
        let idx = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert!(
            rg.column(idx("partition_key"))
                .bloom_filter_offset()
                .is_some()
        );
        assert!(
            rg.column(idx("sequence_number"))
                .bloom_filter_offset()
                .is_some()
        );
        assert!(rg.column(idx("data")).bloom_filter_offset().is_none());
        // No dictionary on the (nearly) unique columns; one on partition_key.
        for c in ["data", "sequence_number", "approximate_arrival_timestamp"] {
            assert!(rg.column(idx(c)).dictionary_page_offset().is_none(), "{c}");
        }
        assert!(
            rg.column(idx("partition_key"))
                .dictionary_page_offset()
                .is_some()
        );
        assert!(
            md.column_index().is_some()
                || md.offset_index().is_some()
                || rg.column(0).column_index_offset().is_some()
        );
    }

    #[test]
    fn row_groups_respect_the_limit() {
        let s = ParquetSettings {
            row_group_rows: 300,
            ..Default::default()
        };
        let bytes = s.encode(&[sample(1000)], vec![], "mem").unwrap();
        let r = SerializedFileReader::new(Bytes::from(bytes)).unwrap();
        assert_eq!(r.metadata().num_row_groups(), 4);
    }
}
