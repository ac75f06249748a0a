//! Which incarnation of a stream the archive holds.
//!
//! A stream deleted and re-created under the same name is a new stream that
//! reuses shard ids. Its records must never be mistaken for the old ones
//! (finished checkpoints would make the archiver skip its shards). The
//! archiver records each incarnation it meets, by ARN and creation time, in
//! `<stream>/_fluxcap/identity.json`, and keys the checkpoints and file names
//! of every incarnation after the first apart:
//!
//! ```text
//!  incarnation 1 (or an archive older than this file):  shardId-000000000000
//!  a later one, created at T (epoch ms):                 shardId-000000000000.r<T>
//!     <stream>/_fluxcap/checkpoints/shardId-000000000000.r<T>/…
//!     <stream>/dt=…/hr=…/shardId-000000000000.r<T>_<first-seq>_<first-sub>_<count>.parquet
//! ```
//!
//! The `shard_id` column keeps the Kinesis shard id; the old incarnation's
//! files and checkpoints are left exactly as they are.

use serde::{Deserialize, Serialize};

use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::kinesis::{Backoff, Client, Failure, classify, stream_error};

/// Format version of the identity object.
pub const IDENTITY_VERSION: u32 = 1;

/// One incarnation of the stream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Incarnation {
    /// The stream's ARN.
    pub arn: String,
    /// Its creation time, epoch ms.
    pub created_ms: i64,
    /// Appended to shard ids to form checkpoint keys ("" for the first).
    pub suffix: String,
    /// When the archiver first met it (RFC 3339).
    pub first_seen: String,
}

/// Every incarnation the archive holds, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StreamIdentity {
    /// Format version.
    pub version: u32,
    /// Incarnations, oldest first; the last one is current.
    pub incarnations: Vec<Incarnation>,
}

impl StreamIdentity {
    /// The suffix of the current incarnation ("" when none is recorded).
    pub fn current_suffix(&self) -> &str {
        self.incarnations.last().map_or("", |i| i.suffix.as_str())
    }
}

/// The checkpoint key of Kinesis shard `shard` in the incarnation with `suffix`.
pub fn shard_key(shard: &str, suffix: &str) -> String {
    format!("{shard}{suffix}")
}

/// Split a checkpoint key into the Kinesis shard id and the incarnation suffix.
pub fn split_key(key: &str) -> (&str, &str) {
    match key.find(".r") {
        Some(i) if key[i + 2..].bytes().all(|b| b.is_ascii_digit()) && key.len() > i + 2 => {
            (&key[..i], &key[i..])
        }
        _ => (key, ""),
    }
}

/// Read the recorded identity (empty when none is recorded yet).
pub async fn load(archive: &Archive, stream: &str) -> Result<StreamIdentity> {
    let path = archive.layout.identity(stream);
    match archive.get_bytes(&path).await {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| Error::CorruptState {
            object: archive.describe(&path),
            message: e.to_string(),
        }),
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => Ok(StreamIdentity::default()),
        Err(e) => Err(e),
    }
}

/// The stream's ARN and creation time, from DescribeStreamSummary.
pub async fn describe(
    client: &Client,
    stream: &str,
    max_backoff: std::time::Duration,
) -> Result<(String, i64)> {
    let mut backoff = Backoff::new(max_backoff);
    loop {
        match client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
        {
            Ok(r) => {
                let d = r.stream_description_summary();
                let arn = d.map(|d| d.stream_arn().to_string()).unwrap_or_default();
                let created = d
                    .and_then(|d| d.stream_creation_timestamp().to_millis().ok())
                    .unwrap_or(0);
                return Ok((arn, created));
            }
            Err(e) => match classify(&e) {
                Failure::Retry(_) if backoff.attempts() < 10 => {
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                other => return Err(stream_error("DescribeStreamSummary", stream, other)),
            },
        }
    }
}

/// Make the stream's current incarnation the archive's current one (the
/// lease holder calls this before it opens any shard). Returns the identity
/// and whether the stream was re-created since the archive last saw it.
pub async fn record_current(
    archive: &Archive,
    stream: &str,
    arn: &str,
    created_ms: i64,
    latest_state_ms: Option<i64>,
) -> Result<(StreamIdentity, bool)> {
    let mut id = load(archive, stream).await?;
    if id.incarnations.is_empty() && latest_state_ms.is_some_and(|t| t < created_ms) {
        // Checkpoints from before this file existed, all older than the
        // stream: they belong to an earlier incarnation of the same name.
        id.incarnations.push(Incarnation {
            arn: "(unknown: archived before incarnations were recorded)".into(),
            created_ms: 0,
            suffix: String::new(),
            first_seen: chrono::Utc::now().to_rfc3339(),
        });
    }
    let same = id
        .incarnations
        .last()
        .is_some_and(|i| i.arn == arn && i.created_ms == created_ms);
    if same {
        return Ok((id, false));
    }
    let recreated = !id.incarnations.is_empty();
    // The first incarnation keeps plain shard ids: archives written before
    // this file existed are its data.
    let suffix = if recreated {
        format!(".r{created_ms}")
    } else {
        String::new()
    };
    id.version = IDENTITY_VERSION;
    id.incarnations.push(Incarnation {
        arn: arn.into(),
        created_ms,
        suffix,
        first_seen: chrono::Utc::now().to_rfc3339(),
    });
    let path = archive.layout.identity(stream);
    let body = serde_json::to_vec_pretty(&id).map_err(|e| Error::CorruptState {
        object: archive.describe(&path),
        message: e.to_string(),
    })?;
    archive.put_bytes(&path, body.into()).await?;
    archive.sync_local(&path).await?;
    Ok((id, recreated))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_back() {
        assert_eq!(
            split_key("shardId-000000000001"),
            ("shardId-000000000001", "")
        );
        let k = shard_key("shardId-000000000001", ".r1764460000123");
        assert_eq!(split_key(&k), ("shardId-000000000001", ".r1764460000123"));
        assert_eq!(split_key("odd.rname"), ("odd.rname", ""));
    }
}
