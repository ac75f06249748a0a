//! The one record type and its Arrow schema.
//!
//! Writer, query and replay all use [`schema`]; its column names are a public
//! contract (other engines and users' SQL rely on them). A record is
//! identified by `(shard_id, sequence_number, subsequence_number)`.

use std::cmp::Ordering;
use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BinaryBuilder, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;

/// Column names, in schema order.
pub mod col {
    /// Shard the record was read from.
    pub const SHARD_ID: &str = "shard_id";
    /// Kinesis sequence number, exact decimal string.
    pub const SEQUENCE_NUMBER: &str = "sequence_number";
    /// Index inside a KPL aggregate, 0 otherwise.
    pub const SUBSEQUENCE_NUMBER: &str = "subsequence_number";
    /// Partition key (of the user record for KPL aggregates).
    pub const PARTITION_KEY: &str = "partition_key";
    /// Explicit hash key, when the producer set one.
    pub const EXPLICIT_HASH_KEY: &str = "explicit_hash_key";
    /// Approximate arrival time, UTC milliseconds.
    pub const ARRIVAL: &str = "approximate_arrival_timestamp";
    /// Payload bytes exactly as received.
    pub const DATA: &str = "data";
    /// Partition column: arrival date, `YYYY-MM-DD` (UTC). Only in paths and SQL tables.
    pub const DT: &str = "dt";
    /// Partition column: arrival hour, `HH` (UTC). Only in paths and SQL tables.
    pub const HR: &str = "hr";
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new(col::SHARD_ID, DataType::Utf8, false),
        Field::new(col::SEQUENCE_NUMBER, DataType::Utf8, false),
        Field::new(col::SUBSEQUENCE_NUMBER, DataType::Int64, false),
        Field::new(col::PARTITION_KEY, DataType::Utf8, false),
        Field::new(col::EXPLICIT_HASH_KEY, DataType::Utf8, true),
        Field::new(
            col::ARRIVAL,
            DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
            false,
        ),
        Field::new(col::DATA, DataType::Binary, false),
    ]))
});

/// The archive's Arrow schema (partition columns `dt`/`hr` live only in paths).
pub fn schema() -> SchemaRef {
    SCHEMA.clone()
}

/// The in-memory type of a record column in the SQL engine: strings and bytes
/// as Arrow view types, which the Parquet reader fills without copying values
/// (the files keep plain `BINARY`/`UTF8`).
fn view_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8 => DataType::Utf8View,
        DataType::Binary => DataType::BinaryView,
        other => other.clone(),
    }
}

static QUERY_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(
        SCHEMA
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_data_type(view_type(f.data_type())))
            .collect::<Vec<_>>(),
    ))
});

static TABLE_SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields: Vec<Field> = QUERY_SCHEMA
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(col::DT, DataType::Utf8, false));
    fields.push(Field::new(col::HR, DataType::Utf8, false));
    Arc::new(Schema::new(fields))
});

/// The record columns as the SQL engine reads them from the files (view types).
pub fn query_file_schema() -> SchemaRef {
    QUERY_SCHEMA.clone()
}

/// The schema of the SQL tables: the record columns (view types), then the
/// partition columns `dt` and `hr` derived from the arrival time.
pub fn table_schema() -> SchemaRef {
    TABLE_SCHEMA.clone()
}

/// A batch of [`schema()`] as a batch of [`table_schema()`]: view types, plus
/// the `dt`/`hr` columns computed from the arrival time.
pub fn with_partition_columns(
    batch: &RecordBatch,
) -> Result<RecordBatch, arrow::error::ArrowError> {
    use arrow::array::AsArray;
    let arrival = batch
        .column(5)
        .as_primitive::<arrow::datatypes::TimestampMillisecondType>();
    let mut dt = StringBuilder::with_capacity(arrival.len(), arrival.len() * 10);
    let mut hr = StringBuilder::with_capacity(arrival.len(), arrival.len() * 2);
    for ms in arrival.values().iter() {
        let (d, h) = crate::archive::layout::partition_of(*ms);
        dt.append_value(d);
        hr.append_value(h);
    }
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns() + 2);
    for (c, f) in batch.columns().iter().zip(QUERY_SCHEMA.fields()) {
        cols.push(arrow::compute::cast(c, f.data_type())?);
    }
    cols.push(Arc::new(dt.finish()));
    cols.push(Arc::new(hr.finish()));
    RecordBatch::try_new(table_schema(), cols)
}

/// One Kinesis user record (a KPL aggregate is several of these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Shard it was read from.
    pub shard_id: Arc<str>,
    /// Sequence number of the Kinesis record that carried it.
    pub sequence_number: Arc<str>,
    /// Index inside a KPL aggregate; 0 for plain records.
    pub subsequence_number: i64,
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key, if any.
    pub explicit_hash_key: Option<String>,
    /// Approximate arrival timestamp, epoch milliseconds UTC.
    pub arrival_ms: i64,
    /// Payload.
    pub data: Bytes,
}

impl Record {
    /// The record's position in its shard.
    pub fn position(&self) -> Position {
        Position {
            sequence_number: self.sequence_number.to_string(),
            subsequence_number: self.subsequence_number,
        }
    }

    /// Approximate bytes of memory this record occupies in a buffer.
    pub fn mem_size(&self) -> usize {
        self.data.len()
            + self.partition_key.len()
            + self.explicit_hash_key.as_ref().map_or(0, String::len)
            + self.sequence_number.len()
            + 48
    }
}

/// A position in a shard: (sequence number, sub-sequence number).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Exact decimal sequence number.
    pub sequence_number: String,
    /// Index inside a KPL aggregate.
    pub subsequence_number: i64,
}

impl Position {
    /// Build from parts.
    pub fn new(seq: impl Into<String>, sub: i64) -> Self {
        Position {
            sequence_number: seq.into(),
            subsequence_number: sub,
        }
    }
}

impl Ord for Position {
    fn cmp(&self, other: &Self) -> Ordering {
        cmp_sequence(&self.sequence_number, &other.sequence_number)
            .then(self.subsequence_number.cmp(&other.subsequence_number))
    }
}

impl PartialOrd for Position {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Compare two Kinesis sequence numbers (decimal strings of up to 128 digits)
/// numerically, without converting them to a machine integer.
pub fn cmp_sequence(a: &str, b: &str) -> Ordering {
    let a = a.trim_start_matches('0');
    let b = b.trim_start_matches('0');
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

/// Accumulates records into Arrow columns of [`schema`].
#[derive(Debug)]
pub struct RecordBatchBuilder {
    shard_id: StringBuilder,
    sequence_number: StringBuilder,
    subsequence_number: Int64Builder,
    partition_key: StringBuilder,
    explicit_hash_key: StringBuilder,
    arrival: TimestampMillisecondBuilder,
    data: BinaryBuilder,
    rows: usize,
    mem: usize,
}

impl Default for RecordBatchBuilder {
    fn default() -> Self {
        Self::with_capacity(0, 0)
    }
}

impl RecordBatchBuilder {
    /// A builder with room for `rows` records holding `data_bytes` of payload.
    pub fn with_capacity(rows: usize, data_bytes: usize) -> Self {
        RecordBatchBuilder {
            shard_id: StringBuilder::with_capacity(rows, rows * 20),
            sequence_number: StringBuilder::with_capacity(rows, rows * 56),
            subsequence_number: Int64Builder::with_capacity(rows),
            partition_key: StringBuilder::with_capacity(rows, rows * 16),
            explicit_hash_key: StringBuilder::with_capacity(rows, 0),
            arrival: TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC"),
            data: BinaryBuilder::with_capacity(rows, data_bytes),
            rows: 0,
            mem: 0,
        }
    }

    /// Append one record.
    pub fn push(&mut self, r: &Record) {
        self.shard_id.append_value(&r.shard_id);
        self.sequence_number.append_value(&r.sequence_number);
        self.subsequence_number.append_value(r.subsequence_number);
        self.partition_key.append_value(&r.partition_key);
        self.explicit_hash_key
            .append_option(r.explicit_hash_key.as_deref());
        self.arrival.append_value(r.arrival_ms);
        self.data.append_value(&r.data);
        self.rows += 1;
        self.mem += r.mem_size();
    }

    /// Records appended since the last [`finish`](Self::finish).
    pub fn len(&self) -> usize {
        self.rows
    }

    /// True when nothing has been appended.
    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// Approximate memory held.
    pub fn mem_size(&self) -> usize {
        self.mem
    }

    /// Build the batch and reset the builder.
    pub fn finish(&mut self) -> RecordBatch {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.shard_id.finish()),
            Arc::new(self.sequence_number.finish()),
            Arc::new(self.subsequence_number.finish()),
            Arc::new(self.partition_key.finish()),
            Arc::new(self.explicit_hash_key.finish()),
            Arc::new(self.arrival.finish()),
            Arc::new(self.data.finish()),
        ];
        self.rows = 0;
        self.mem = 0;
        // The columns match the schema by construction.
        RecordBatch::try_new(schema(), cols)
            .unwrap_or_else(|e| unreachable!("schema mismatch: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_compare_numerically() {
        assert_eq!(cmp_sequence("9", "10"), Ordering::Less);
        let a = "49590338271490256608559692538361571095921575989136588898";
        let b = "49590338271490256608559692540925702759324208523137515618";
        assert_eq!(cmp_sequence(a, b), Ordering::Less);
        let long = "1".repeat(128);
        assert_eq!(cmp_sequence(&long, b), Ordering::Greater);
        assert!(Position::new(a, 3) < Position::new(a, 4));
        assert!(Position::new(a, 9) < Position::new(b, 0));
    }

    #[test]
    fn builder_makes_schema_batches() {
        let mut b = RecordBatchBuilder::default();
        b.push(&Record {
            shard_id: "shardId-000000000000".into(),
            sequence_number: "1".into(),
            subsequence_number: 0,
            partition_key: "k".into(),
            explicit_hash_key: None,
            arrival_ms: 1_700_000_000_000,
            data: Bytes::from_static(b"{}"),
        });
        let batch = b.finish();
        assert_eq!(batch.num_rows(), 1);
        assert_eq!(batch.schema(), schema());
        assert!(b.is_empty());
    }
}
