"""The archive's record schema (src/record.rs), for the Python benchmark scripts."""
import pyarrow as pa

SCHEMA = pa.schema([
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("sequence_number", pa.string(), nullable=False),
    pa.field("subsequence_number", pa.int64(), nullable=False),
    pa.field("partition_key", pa.string(), nullable=False),
    pa.field("explicit_hash_key", pa.string(), nullable=True),
    pa.field("approximate_arrival_timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("data", pa.binary(), nullable=False),
])
