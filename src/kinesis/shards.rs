//! Shard discovery (paginated ListShards) and lineage.
//!
//! Kinesis resharding closes shards and opens children: a split has one
//! parent, a merge two (`ParentShardId`, `AdjacentParentShardId`). To keep
//! per-key order a child is read only once all its parents are finished.

use std::collections::{BTreeMap, HashSet};

use crate::error::Result;
use crate::kinesis::{Backoff, Client, Failure, classify};

/// What ListShards says about one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// Shard id.
    pub shard_id: String,
    /// Parents (0, 1 or 2).
    pub parents: Vec<String>,
    /// The shard is closed (it has an ending sequence number).
    pub closed: bool,
    /// Hash key range start (decimal).
    pub hash_start: String,
    /// Hash key range end (decimal).
    pub hash_end: String,
}

/// All shards of `stream`, following pagination.
pub async fn list_shards(
    client: &Client,
    stream: &str,
    max_backoff: std::time::Duration,
) -> Result<Vec<ShardInfo>> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    let mut backoff = Backoff::new(max_backoff);
    loop {
        // With a NextToken the request must not name the stream.
        let req = match &token {
            Some(t) => client.list_shards().next_token(t).max_results(1000),
            None => client.list_shards().stream_name(stream).max_results(1000),
        };
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => match classify(&e) {
                Failure::Retry(m) if backoff.attempts() < 30 => {
                    tracing::debug!(stream, "ListShards retry: {m}");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                other => return Err(super::stream_error("ListShards", stream, other)),
            },
        };
        backoff.reset();
        for s in resp.shards() {
            let mut parents = Vec::new();
            if let Some(p) = s.parent_shard_id() {
                parents.push(p.to_string());
            }
            if let Some(p) = s.adjacent_parent_shard_id() {
                parents.push(p.to_string());
            }
            let range = s.hash_key_range();
            out.push(ShardInfo {
                shard_id: s.shard_id().to_string(),
                parents,
                closed: s
                    .sequence_number_range()
                    .and_then(|r| r.ending_sequence_number())
                    .is_some(),
                hash_start: range
                    .map(|r| r.starting_hash_key().to_string())
                    .unwrap_or_default(),
                hash_end: range
                    .map(|r| r.ending_hash_key().to_string())
                    .unwrap_or_default(),
            });
        }
        match resp.next_token() {
            Some(t) if !t.is_empty() => token = Some(t.to_string()),
            _ => break,
        }
    }
    // Some servers repeat a shard across pages; keep one of each.
    let mut seen = HashSet::new();
    out.retain(|s| seen.insert(s.shard_id.clone()));
    Ok(out)
}

/// True when every parent of `shard` is finished. A parent that is neither
/// listed nor checkpointed has aged out of the stream's retention: its
/// records are gone, so it cannot hold the child back.
pub fn parents_done(
    shard: &ShardInfo,
    listed: &BTreeMap<String, ShardInfo>,
    finished: &HashSet<String>,
    checkpointed: &HashSet<String>,
) -> bool {
    shard
        .parents
        .iter()
        .all(|p| finished.contains(p) || (!listed.contains_key(p) && !checkpointed.contains(p)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: &str, parents: &[&str]) -> ShardInfo {
        ShardInfo {
            shard_id: id.into(),
            parents: parents.iter().map(|p| p.to_string()).collect(),
            closed: false,
            hash_start: "0".into(),
            hash_end: "1".into(),
        }
    }

    #[test]
    fn children_wait_for_all_parents() {
        let listed: BTreeMap<_, _> = [s("a", &[]), s("b", &[]), s("c", &["a", "b"])]
            .into_iter()
            .map(|x| (x.shard_id.clone(), x))
            .collect();
        let child = &listed["c"];
        let mut fin = HashSet::new();
        assert!(!parents_done(child, &listed, &fin, &HashSet::new()));
        fin.insert("a".to_string());
        assert!(!parents_done(child, &listed, &fin, &HashSet::new()));
        fin.insert("b".to_string());
        assert!(parents_done(child, &listed, &fin, &HashSet::new()));
        // A parent gone from the stream and never archived has expired.
        let orphan = s("d", &["gone"]);
        assert!(parents_done(
            &orphan,
            &listed,
            &HashSet::new(),
            &HashSet::new()
        ));
    }
}
