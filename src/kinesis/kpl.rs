//! KPL aggregation: de-aggregation of records made by the Kinesis Producer
//! Library (and compatible encoders), and an encoder for replay and tests.
//!
//! An aggregated record is `F3 89 9A C2` + protobuf `AggregatedRecord` +
//! MD5(protobuf). Anything whose magic or MD5 does not match — or whose
//! protobuf does not decode — is an ordinary record and is kept as is.

use bytes::Bytes;
use md5::{Digest, Md5};
use prost::Message;

/// The 4-byte magic that starts an aggregated record.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// `AggregatedRecord` (proto2) from the KPL's aggregation format.
#[derive(Clone, PartialEq, Message)]
pub struct AggregatedRecord {
    /// Partition keys referenced by index.
    #[prost(string, repeated, tag = "1")]
    pub partition_key_table: Vec<String>,
    /// Explicit hash keys referenced by index.
    #[prost(string, repeated, tag = "2")]
    pub explicit_hash_key_table: Vec<String>,
    /// The user records.
    #[prost(message, repeated, tag = "3")]
    pub records: Vec<AggRecord>,
}

/// One user record inside an aggregate.
#[derive(Clone, PartialEq, Message)]
pub struct AggRecord {
    /// Index into `partition_key_table`.
    #[prost(uint64, required, tag = "1")]
    pub partition_key_index: u64,
    /// Index into `explicit_hash_key_table`.
    #[prost(uint64, optional, tag = "2")]
    pub explicit_hash_key_index: Option<u64>,
    /// Payload.
    #[prost(bytes = "bytes", required, tag = "3")]
    pub data: Bytes,
    /// Tags (kept by the format, unused here).
    #[prost(message, repeated, tag = "4")]
    pub tags: Vec<Tag>,
}

/// A KPL tag.
#[derive(Clone, PartialEq, Message)]
pub struct Tag {
    /// Key.
    #[prost(string, required, tag = "1")]
    pub key: String,
    /// Value.
    #[prost(string, optional, tag = "2")]
    pub value: Option<String>,
}

/// One user record recovered from a Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Partition key.
    pub partition_key: String,
    /// Explicit hash key.
    pub explicit_hash_key: Option<String>,
    /// Payload.
    pub data: Bytes,
}

/// The user records inside `data` when it is a valid aggregate, else `None`
/// (the caller keeps the Kinesis record as is).
pub fn deaggregate(data: &Bytes) -> Option<Vec<UserRecord>> {
    if data.len() < MAGIC.len() + DIGEST_LEN || data[..4] != MAGIC {
        return None;
    }
    let body = data.slice(4..data.len() - DIGEST_LEN);
    let digest = Md5::digest(&body);
    if digest.as_slice() != &data[data.len() - DIGEST_LEN..] {
        return None;
    }
    let agg = AggregatedRecord::decode(body).ok()?;
    let mut out = Vec::with_capacity(agg.records.len());
    for r in agg.records {
        let pk = agg
            .partition_key_table
            .get(usize::try_from(r.partition_key_index).ok()?)?;
        let ehk = match r.explicit_hash_key_index {
            Some(i) => Some(
                agg.explicit_hash_key_table
                    .get(usize::try_from(i).ok()?)?
                    .clone(),
            ),
            None => None,
        };
        out.push(UserRecord {
            partition_key: pk.clone(),
            explicit_hash_key: ehk,
            data: r.data,
        });
    }
    Some(out)
}

/// Build one aggregated record from user records (the KPL format).
pub fn aggregate(records: &[UserRecord]) -> Vec<u8> {
    let mut agg = AggregatedRecord::default();
    for r in records {
        let pk = match agg
            .partition_key_table
            .iter()
            .position(|k| *k == r.partition_key)
        {
            Some(i) => i,
            None => {
                agg.partition_key_table.push(r.partition_key.clone());
                agg.partition_key_table.len() - 1
            }
        };
        let ehk = r.explicit_hash_key.as_ref().map(|e| {
            match agg.explicit_hash_key_table.iter().position(|k| k == e) {
                Some(i) => i,
                None => {
                    agg.explicit_hash_key_table.push(e.clone());
                    agg.explicit_hash_key_table.len() - 1
                }
            }
        });
        agg.records.push(AggRecord {
            partition_key_index: pk as u64,
            explicit_hash_key_index: ehk.map(|i| i as u64),
            data: r.data.clone(),
            tags: vec![],
        });
    }
    let body = agg.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len() + DIGEST_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&body);
    out.extend_from_slice(&Md5::digest(&body));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ur(pk: &str, ehk: Option<&str>, d: &str) -> UserRecord {
        UserRecord {
            partition_key: pk.into(),
            explicit_hash_key: ehk.map(str::to_string),
            data: Bytes::from(d.to_string()),
        }
    }

    #[test]
    fn round_trip() {
        let recs = vec![
            ur("a", None, "1"),
            ur("b", Some("999"), "2"),
            ur("a", None, "3"),
        ];
        let bytes = Bytes::from(aggregate(&recs));
        assert_eq!(deaggregate(&bytes).unwrap(), recs);
    }

    #[test]
    fn bad_md5_or_magic_is_a_plain_record() {
        let mut bytes = aggregate(&[ur("a", None, "x")]);
        let n = bytes.len();
        bytes[n - 1] ^= 0xff;
        assert!(deaggregate(&Bytes::from(bytes)).is_none());
        assert!(deaggregate(&Bytes::from_static(b"{\"not\":\"kpl\"}")).is_none());
        let mut fake = MAGIC.to_vec();
        fake.extend_from_slice(&[0u8; 16]);
        assert!(deaggregate(&Bytes::from(fake)).is_none());
    }
}
