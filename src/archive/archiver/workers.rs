//! Shared archivers: any number of `fluxcap archive --shared` processes (on
//! one host or several) archive one stream together, each shard owned by
//! one of them at a time. The archive store is the only state.
//!
//! ```text
//!  <stream>/_fluxcap/workers/<id>/<epoch>.json   heartbeat of archiver <id>, renewed
//!                                                every lease_ttl/3 (a lease, see `lease`)
//!  <stream>/_fluxcap/owners/<shard>/<epoch>.json
//!                                                immutable claims, created conditionally
//!                                                (one per epoch); the highest epoch says
//!                                                who holds the shard: an archiver id,
//!                                                `free` or `done`
//!
//!  every round (lease_ttl/4, and when a shard task ends):
//!    LIST workers/  → live archivers: those whose heartbeat changed within
//!                     lease_ttl + a margin on our monotonic clock (or whose pid runs,
//!                     same host); a dead one's heartbeat is removed, so that it
//!                     cannot renew it if it was only paused
//!    LIST owners/   → who holds what
//!    target = ⌈ shards that can be archived now / live archivers ⌉
//!    more than target, or 2 more than another archiver
//!                    → stop a shard task (it flushes and commits), claim `free`,
//!                      and leave that shard to the others for a few rounds
//!    fewer           → claim a `free` shard, or one of a dead archiver, as
//!                      <epoch+1>-<me>; a lost race (the name exists) is no claim
//!    shard finished  → claim `done`: its children may start, whoever runs them
//! ```
//!
//! Claims save work; they are not what keeps the archive exact. A claim's
//! epoch is the lease epoch its holder writes the shard's checkpoints
//! under: above every epoch the chain holds, so the take-over generation of a
//! new holder fences a previous one that was only paused (see `checkpoint`),
//! and a paused archiver finds its heartbeat gone and stops.
//!
//! One archiver per stream (the stream's lease) stays the default; the two
//! ways exclude each other: a shared archiver is refused while a single one
//! holds the stream's lease, and a single one while a shared one lives.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::archive::checkpoint::{create_object, read_json};
use crate::archive::layout::parse_generation;
use crate::archive::lease::{self, LeaseRecord};
use crate::archive::store::Archive;
use crate::error::{Error, Result};

/// Who holds a shard, by its latest claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Holder {
    /// The archiver with this id.
    Worker(String),
    /// Nobody: the next archiver with room may claim it.
    Free,
    /// Archived to its end: nobody needs to.
    Done,
}

impl Holder {
    fn name(&self) -> &str {
        match self {
            Holder::Worker(id) => id,
            Holder::Free => "free",
            Holder::Done => "done",
        }
    }

    fn parse(s: &str) -> Holder {
        match s {
            "free" => Holder::Free,
            "done" => Holder::Done,
            id => Holder::Worker(id.to_string()),
        }
    }
}

/// The latest claim of a shard.
#[derive(Debug, Clone)]
pub(super) struct Claim {
    /// Its epoch (the shard's lease epoch while a worker holds it).
    pub epoch: u64,
    /// Its holder.
    pub holder: Holder,
    /// Objects of earlier claims, removed by the next claim.
    older: Vec<Path>,
}

/// What a claim object says.
#[derive(Serialize, Deserialize)]
struct ClaimBody {
    /// Format version ([`CLAIM_VERSION`]).
    version: u32,
    /// Checkpoint key of the shard.
    shard: String,
    /// The claim's epoch (its object's name).
    epoch: u64,
    /// An archiver id, `free` or `done`.
    holder: String,
    /// Host and process of the archiver that wrote it (for people).
    host: String,
    pid: u32,
    /// When it was written (RFC 3339).
    at: String,
}

/// Format version of claim objects.
const CLAIM_VERSION: u32 = 1;

/// Another archiver's heartbeat as watched from here.
#[derive(Debug)]
struct Watched {
    /// The heartbeat object's latest epoch object.
    path: Path,
    /// What the listing said of it (ETag, modification time, size).
    seen: (Option<String>, i64, u64),
    /// When `seen` was first seen, on our monotonic clock.
    since: Instant,
    /// Its holder's identity (read once).
    record: Option<LeaseRecord>,
}

/// One shared archiver's view of a stream's archivers and claims.
#[derive(Debug)]
pub(super) struct Coordinator {
    archive: Archive,
    stream: String,
    /// This archiver's id.
    me: String,
    ttl: Duration,
    /// Lowest epoch a claim may follow (the highest checkpoint epoch at start).
    min_epoch: u64,
    /// Claims by checkpoint key, as last listed (and changed by us since).
    claims: BTreeMap<String, Claim>,
    /// Other archivers by id, as last listed.
    workers: HashMap<String, Watched>,
    /// Holder named by each claim object read so far (they never change).
    holders: HashMap<Path, Holder>,
}

impl Coordinator {
    pub(super) fn new(
        archive: &Archive,
        stream: &str,
        me: &str,
        ttl: Duration,
        min_epoch: u64,
    ) -> Self {
        Coordinator {
            archive: archive.clone(),
            stream: stream.to_string(),
            me: me.to_string(),
            ttl,
            min_epoch,
            claims: BTreeMap::new(),
            workers: HashMap::new(),
            holders: HashMap::new(),
        }
    }

    /// How long an unchanged heartbeat is watched before its archiver is
    /// taken for dead.
    fn patience(&self) -> Duration {
        self.ttl + (self.ttl / 4).max(Duration::from_secs(1))
    }

    /// List the archivers and the claims again (see the module doc).
    pub(super) async fn refresh(&mut self) -> Result<()> {
        let dir = self.archive.layout.workers_dir(&self.stream);
        // Latest heartbeat object of each other archiver.
        let latest: HashMap<String, object_store::ObjectMeta> = epoch_objects(&self.archive, &dir)
            .await?
            .into_iter()
            .filter(|(id, _)| *id != self.me)
            .filter_map(|(id, objs)| {
                objs.into_iter()
                    .max_by_key(|(e, _)| *e)
                    .map(|(_, o)| (id, o))
            })
            .collect();
        self.workers.retain(|id, _| latest.contains_key(id));
        let patience = self.patience();
        let mut dead = Vec::new();
        for (id, meta) in latest {
            let seen = (
                meta.e_tag.clone(),
                meta.last_modified.timestamp_millis(),
                meta.size,
            );
            let w = self.workers.entry(id.clone()).or_insert_with(|| Watched {
                path: meta.location.clone(),
                seen: seen.clone(),
                since: Instant::now(),
                record: None,
            });
            if w.seen != seen || w.path != meta.location {
                w.seen = seen;
                w.since = Instant::now();
            }
            // Its identity is read once per heartbeat object (a renewal only
            // changes its counters).
            if w.path != meta.location {
                w.path = meta.location.clone();
                w.record = None;
            }
            if w.record.is_none() {
                match lease::read_record(&self.archive, &w.path).await {
                    Ok(r) => w.record = Some(r),
                    // Removed meanwhile (it stopped): the next listing says so.
                    Err(Error::Store {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let released = w
                .record
                .as_ref()
                .is_some_and(|r| r.expires_at_ms == 0 || r.revoked_by.is_some());
            let verdict = w.record.as_ref().and_then(lease::pid_verdict);
            let gone = released
                || match verdict {
                    Some(d) => d,
                    None => w.since.elapsed() > patience,
                };
            if gone {
                dead.push(id);
            }
        }
        for id in dead {
            if let Some(w) = self.workers.remove(&id) {
                let who = w
                    .record
                    .as_ref()
                    .map(|r| format!("host {}, pid {}", r.host, r.pid))
                    .unwrap_or_default();
                tracing::info!(stream = %self.stream, archiver = %id, "archiver {id} ({who}) stopped renewing its heartbeat: its shards are free to take over");
                // Removed, so that it cannot renew it if it was only paused.
                let wdir = dir.clone().join(id.as_str());
                for o in self.archive.list(&wdir).await? {
                    let _ = self.archive.store.delete(&o.location).await;
                }
            }
        }

        let odir = self.archive.layout.owners_dir(&self.stream);
        let objects = epoch_objects(&self.archive, &odir).await?;
        let mut claims: BTreeMap<String, Claim> = BTreeMap::new();
        for (key, objs) in objects {
            let mut objs: Vec<(u64, Path)> =
                objs.into_iter().map(|(e, o)| (e, o.location)).collect();
            objs.sort();
            let Some((epoch, path)) = objs.pop() else {
                continue;
            };
            let holder = match self.holders.get(&path) {
                Some(h) => h.clone(),
                None => match read_json::<ClaimBody>(&self.archive, &path).await {
                    Ok(b) => {
                        let h = Holder::parse(&b.holder);
                        self.holders.insert(path.clone(), h.clone());
                        h
                    }
                    // Replaced and removed meanwhile: the next round sees its successor.
                    Err(Error::Store {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => continue,
                    Err(e) => return Err(e),
                },
            };
            claims.insert(
                key,
                Claim {
                    epoch,
                    holder,
                    older: objs.into_iter().map(|(_, p)| p).collect(),
                },
            );
        }
        // The cache keeps the latest claims only.
        let latest: HashSet<Path> = claims
            .iter()
            .map(|(k, c)| claim_path(&odir, k, c.epoch))
            .collect();
        self.holders.retain(|p, _| latest.contains(p));
        self.claims = claims;
        Ok(())
    }

    /// Ids of the live archivers, this one included.
    pub(super) fn live(&self) -> HashSet<String> {
        let mut s: HashSet<String> = self.workers.keys().cloned().collect();
        s.insert(self.me.clone());
        s
    }

    /// The latest claim of shard `key`, as last listed.
    pub(super) fn claim_of(&self, key: &str) -> Option<&Claim> {
        self.claims.get(key)
    }

    /// Keys of the shards whose latest claim is `done`.
    pub(super) fn done(&self) -> impl Iterator<Item = &String> {
        self.claims
            .iter()
            .filter(|(_, c)| c.holder == Holder::Done)
            .map(|(k, _)| k)
    }

    /// How many shards the live archiver holding the fewest holds (this one
    /// excluded); `None` when this one is alone.
    pub(super) fn fewest_held_by_others(&self) -> Option<usize> {
        let mut counts: HashMap<&str, usize> =
            self.workers.keys().map(|w| (w.as_str(), 0)).collect();
        for c in self.claims.values() {
            if let Holder::Worker(w) = &c.holder
                && let Some(n) = counts.get_mut(w.as_str())
            {
                *n += 1;
            }
        }
        counts.into_values().min()
    }

    /// Whether shard `key` is held by another live archiver.
    pub(super) fn held_by_other(&self, key: &str) -> bool {
        matches!(self.claims.get(key), Some(Claim { holder: Holder::Worker(id), .. })
            if *id != self.me && self.workers.contains_key(id))
    }

    /// Claim shard `key` unless a live archiver holds it or it is done:
    /// its new epoch, with `Some(previous holder)` when that was an archiver
    /// taken for dead; `None` when it cannot be claimed (or the race for it
    /// was lost). A shard this archiver holds already keeps its epoch.
    pub(super) async fn claim(
        &mut self,
        key: &str,
        min_epoch: u64,
    ) -> Result<Option<(u64, Option<String>)>> {
        let latest = self.claims.get(key).cloned();
        let taken_from = match latest.as_ref().map(|c| &c.holder) {
            Some(Holder::Done) => return Ok(None),
            Some(Holder::Worker(id)) if *id == self.me => {
                return Ok(latest.map(|c| (c.epoch, None)));
            }
            Some(Holder::Worker(id)) if self.workers.contains_key(id) => return Ok(None),
            Some(Holder::Worker(id)) => Some(id.clone()),
            Some(Holder::Free) | None => None,
        };
        let epoch = latest
            .as_ref()
            .map_or(0, |c| c.epoch)
            .max(self.min_epoch)
            .max(min_epoch)
            + 1;
        let me = Holder::Worker(self.me.clone());
        if !self.create(key, epoch, &me).await? {
            return Ok(None);
        }
        self.forget_older(key, latest);
        Ok(Some((epoch, taken_from)))
    }

    /// Give shard `key` (held under `epoch`) up: `free` for another
    /// archiver, or `done` once it is archived to its end. Nothing happens
    /// if another archiver took it over meanwhile.
    pub(super) async fn release(&mut self, key: &str, epoch: u64, done: bool) -> Result<()> {
        let holder = if done { Holder::Done } else { Holder::Free };
        let latest = self.claims.get(key).cloned();
        if self.create(key, epoch + 1, &holder).await? {
            self.forget_older(key, latest);
        }
        Ok(())
    }

    /// Create claim `<epoch>-<holder>` of `key`; false when the name exists.
    async fn create(&mut self, key: &str, epoch: u64, holder: &Holder) -> Result<bool> {
        let path = claim_path(&self.archive.layout.owners_dir(&self.stream), key, epoch);
        let body = ClaimBody {
            version: CLAIM_VERSION,
            shard: key.to_string(),
            epoch,
            holder: holder.name().to_string(),
            host: lease::hostname(),
            pid: std::process::id(),
            at: chrono::Utc::now().to_rfc3339(),
        };
        let body = serde_json::to_vec_pretty(&body).map_err(|e| Error::CorruptState {
            object: self.archive.describe(&path),
            message: e.to_string(),
        })?;
        match create_object(&self.archive, &path, body).await {
            Ok(()) => {
                self.holders.insert(path, holder.clone());
                // `forget_older` names what the new claim replaced.
                self.claims.insert(
                    key.to_string(),
                    Claim {
                        epoch,
                        holder: holder.clone(),
                        older: Vec::new(),
                    },
                );
                Ok(true)
            }
            Err(Error::Fenced { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// After a new claim of `key`: remove the objects below the claim it
    /// replaced (that one stays, for inspection).
    fn forget_older(&mut self, key: &str, replaced: Option<Claim>) {
        let Some(replaced) = replaced else { return };
        if let Some(c) = self.claims.get_mut(key) {
            c.older = vec![claim_path(
                &self.archive.layout.owners_dir(&self.stream),
                key,
                replaced.epoch,
            )];
        }
        let store = self.archive.store.clone();
        tokio::spawn(async move {
            for p in replaced.older {
                let _ = store.delete(&p).await;
            }
        });
    }
}

/// How many shards each of `live` archivers should hold for `work` shards.
pub(super) fn target(work: usize, live: usize) -> usize {
    work.div_ceil(live.max(1))
}

/// `<owners>/<key>/<epoch>.json`.
fn claim_path(owners: &Path, key: &str, epoch: u64) -> Path {
    owners.clone().join(key).join(format!("{epoch:020}.json"))
}

/// The `<dir>/<name>/<epoch>.json` objects (heartbeats by archiver id,
/// claims by shard key), by name: (epoch, object) each.
async fn epoch_objects(
    archive: &Archive,
    dir: &Path,
) -> Result<BTreeMap<String, Vec<(u64, object_store::ObjectMeta)>>> {
    let mut objects: BTreeMap<String, Vec<(u64, object_store::ObjectMeta)>> = BTreeMap::new();
    for o in archive.list(dir).await? {
        let rel: Vec<String> = o
            .location
            .prefix_match(dir)
            .map(|p| p.map(|x| x.as_ref().to_string()).collect())
            .unwrap_or_default();
        let [key, file] = rel.as_slice() else {
            continue;
        };
        if let Some(epoch) = parse_generation(file) {
            objects.entry(key.clone()).or_default().push((epoch, o));
        }
    }
    Ok(objects)
}

/// Who holds each shard of `stream` among shared archivers, by checkpoint
/// key: "archiver <id> (host <h>, pid <p>)", "free" or "done" (for
/// `fluxcap status`; empty when no shared archiver ever ran).
pub async fn shard_holders(archive: &Archive, stream: &str) -> Result<BTreeMap<String, String>> {
    let odir = archive.layout.owners_dir(stream);
    let latest = epoch_objects(archive, &odir)
        .await?
        .into_iter()
        .filter_map(|(k, objs)| {
            objs.into_iter()
                .max_by_key(|(e, _)| *e)
                .map(|(e, o)| (k, (e, o.location)))
        });
    let mut out = BTreeMap::new();
    for (key, (_, path)) in latest {
        match read_json::<ClaimBody>(archive, &path).await {
            Ok(b) => {
                let what = match Holder::parse(&b.holder) {
                    Holder::Worker(id) => format!("archiver {id} (host {}, pid {})", b.host, b.pid),
                    other => other.name().to_string(),
                };
                out.insert(key, what);
            }
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The single archiver holding the stream's lease, if one lives (a shared
/// archiver must not start beside it). Watches a holder on another host for
/// up to `ttl` plus a margin.
pub(super) async fn single_archiver(
    archive: &Archive,
    stream: &str,
    ttl: Duration,
) -> Result<Option<LeaseRecord>> {
    let dir = archive.layout.lease_dir(stream);
    let latest = archive
        .list(&dir)
        .await?
        .into_iter()
        .filter_map(|o| Some((parse_generation(o.location.filename()?)?, o.location)))
        .max();
    let Some((_, path)) = latest else {
        return Ok(None);
    };
    if lease::holder_gone(archive, &path, ttl).await? {
        return Ok(None);
    }
    Ok(Some(lease::read_record(archive, &path).await?))
}

/// A live shared archiver of the stream, if any (a single archiver must not
/// start beside it); heartbeats of dead ones are removed. Watches one on
/// another host for up to `ttl` plus a margin.
pub(super) async fn shared_archiver(
    archive: &Archive,
    stream: &str,
    ttl: Duration,
) -> Result<Option<LeaseRecord>> {
    let dir = archive.layout.workers_dir(stream);
    for o in archive.list(&dir).await? {
        if o.location.filename().and_then(parse_generation).is_none() {
            continue;
        }
        if lease::holder_gone(archive, &o.location, ttl).await? {
            let _ = archive.store.delete(&o.location).await;
            continue;
        }
        match lease::read_record(archive, &o.location).await {
            Ok(r) => return Ok(Some(r)),
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holders_round_trip() {
        for h in [Holder::Free, Holder::Done, Holder::Worker("0af3".into())] {
            assert_eq!(Holder::parse(h.name()), h);
        }
        let p = claim_path(&Path::from("s/_fluxcap/owners"), "shardId-000000000001", 42);
        assert_eq!(p.filename().and_then(parse_generation), Some(42), "{p}");
    }

    #[test]
    fn targets_cover_the_work() {
        assert_eq!(target(16, 3), 6);
        assert_eq!(target(16, 2), 8);
        assert_eq!(target(0, 3), 0);
        assert_eq!(target(5, 0), 5);
    }
}
