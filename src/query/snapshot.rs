//! A point-in-time view of a stream's checkpoints, taken once per scan.
//!
//! It is what makes `archive.<s>` show only committed files and makes
//! `archive.<s> ∪ live.<s>` free of duplicates and gaps — see the module
//! documentation of [`crate::query`].

use std::collections::HashMap;

use crate::archive::checkpoint::{self, Checkpoint, PublishEntry};
use crate::archive::store::Archive;
use crate::error::{Error, Result};
use crate::record::Position;

/// The latest checkpoint of every shard of one stream, read at one moment.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Checkpoint per checkpoint key (the shard id, plus the incarnation
    /// suffix for a re-created stream, see [`crate::archive::identity`]).
    pub shards: HashMap<String, Checkpoint>,
    /// Suffix of the stream's current incarnation ("" for the first).
    pub suffix: String,
    /// ARN and creation time (epoch ms) of the incarnation the archiver
    /// last saw, when recorded.
    pub incarnation: Option<(String, i64)>,
}

impl Snapshot {
    /// Read the checkpoints of `stream`. A generation that disappears between
    /// the listing and the read (an archiver committing two flushes meanwhile)
    /// makes it list again.
    pub async fn load(archive: &Archive, stream: &str) -> Result<Self> {
        let mut attempt = 0;
        loop {
            match checkpoint::load_all(archive, stream).await {
                Ok(all) => {
                    let id = crate::archive::identity::load(archive, stream).await?;
                    return Ok(Snapshot {
                        shards: all.into_iter().map(|c| (c.shard_id.clone(), c)).collect(),
                        suffix: id.current_suffix().to_string(),
                        incarnation: id
                            .incarnations
                            .last()
                            .filter(|i| i.created_ms > 0)
                            .map(|i| (i.arn.clone(), i.created_ms)),
                    });
                }
                Err(Error::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) if attempt < 5 => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// The view of a stream that was deleted and re-created as `created_ms`
    /// since the archiver last ran: nothing of it is archived yet (its
    /// checkpoints, under a new suffix, do not exist).
    pub fn of_new_incarnation(&self, created_ms: i64) -> Snapshot {
        Snapshot {
            shards: self.shards.clone(),
            suffix: format!(".r{created_ms}"),
            incarnation: None,
        }
    }

    /// The checkpoint of Kinesis shard `shard` in the current incarnation.
    pub fn checkpoint(&self, shard: &str) -> Option<&Checkpoint> {
        self.shards
            .get(&crate::archive::identity::shard_key(shard, &self.suffix))
    }

    /// The committed position of Kinesis shard `shard`: records up to it are archived.
    pub fn committed(&self, shard: &str) -> Option<&Position> {
        self.checkpoint(shard).and_then(|c| c.position.as_ref())
    }

    /// Whether a data file named for checkpoint key `key` whose first record is `first` belongs to
    /// a committed flush. Flushes of a shard are sequential, so a file is
    /// committed exactly when it starts at or before the committed position;
    /// files of a flush in progress (or of a crashed one, not yet cleaned up)
    /// start after it.
    pub fn is_committed(&self, key: &str, first: &Position) -> bool {
        self.shards.get(key).is_some_and(|c| c.covers(first))
    }

    /// Committed files of every shard that may not be published yet.
    pub fn unpublished(&self) -> impl Iterator<Item = &PublishEntry> {
        self.shards.values().flat_map(|c| c.publish.iter())
    }

    /// Whether `shard` is closed and completely archived.
    pub fn finished(&self, shard: &str) -> bool {
        self.checkpoint(shard).is_some_and(|c| c.finished)
    }
}
