//! The per-stream lease: one archiver per stream at a time, so that a second
//! one fails fast instead of fencing itself in the middle of a run.
//!
//! ```text
//!  <stream>/_fluxcap/lease/<epoch>.json   immutable name, created conditionally;
//!                                         the highest epoch is the holder
//!  acquire: latest epoch e ── released? ─────────────────┐
//!             │ same host, boot and PID namespace:       │
//!             │   pid alive → held (exit 4), dead → ─────┤
//!             │ elsewhere: watch it on our monotonic     │
//!             │   clock for ttl + margin: renewed →      │ revoke e (conditional update),
//!             │   held (exit 4), unchanged → ────────────┤ create e+1 (conditional create)
//!  renew (every ttl/3): no epoch above ours, then a conditional update of
//!             our object (If-Match the version we wrote); any change → fenced
//!  validity:  the instant *before* the renewal request + ttl, on the
//!             monotonic clock; no commit starts within `margin` of its end
//! ```
//!
//! The lease saves work; it is not what keeps the archive exact. Checkpoint
//! generations are written with conditional creates and carry the lease
//! epoch, so a holder that lost its lease without noticing (paused, or its
//! clock wrong) cannot commit or publish anything (see `checkpoint`).
//! Process ids are trusted only when the holder ran on this host, since its
//! last boot, in this PID namespace; any other holder is judged by watching
//! its renewals, never by comparing wall clocks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, UpdateVersion};
use serde::{Deserialize, Serialize};

use crate::archive::checkpoint::{create_object, read_json};
use crate::archive::layout::parse_generation;
use crate::archive::store::{Archive, put_conditional, with_retry};
use crate::config::ArchiveLocation;
use crate::error::{Error, Result};

/// Format version of lease objects.
pub const LEASE_VERSION: u32 = 2;

/// A lease epoch object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LeaseRecord {
    /// Format version.
    pub version: u32,
    /// Epoch (object name); increases with every new holder.
    pub epoch: u64,
    /// Random id of the holding process.
    pub owner: String,
    /// Host name of the holder.
    pub host: String,
    /// Process id of the holder (meaningful only in its PID namespace).
    pub pid: u32,
    /// Boot id of the holder's kernel (`/proc/sys/kernel/random/boot_id`).
    #[serde(default)]
    pub boot_id: String,
    /// PID namespace of the holder (`/proc/self/ns/pid`).
    #[serde(default)]
    pub pid_namespace: String,
    /// When the holder started (RFC 3339).
    pub started_at: String,
    /// Lease end by the holder's wall clock, epoch ms (informational); 0 once
    /// released or revoked.
    pub expires_at_ms: i64,
    /// Renewals so far: a watcher sees the holder alive when it changes.
    #[serde(default)]
    pub renewals: u64,
    /// The epoch that revoked this lease after it lapsed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<u64>,
}

impl LeaseRecord {
    /// "host …, pid …, since …" (for messages).
    pub fn describe(&self) -> String {
        format!(
            "host {}, pid {}, since {}",
            self.host, self.pid, self.started_at
        )
    }

    fn released(&self) -> bool {
        self.expires_at_ms == 0 || self.revoked_by.is_some()
    }
}

/// Who this process is, as far as a PID means anything.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    host: String,
    boot_id: String,
    pid_namespace: String,
}

impl Identity {
    fn current() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
        Identity {
            host: hostname(),
            boot_id: read("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            pid_namespace: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        }
    }

    /// Whether `rec`'s pid can be checked here: same host, same boot, same
    /// PID namespace (all known).
    fn shares_pids_with(&self, rec: &LeaseRecord) -> bool {
        !self.boot_id.is_empty()
            && !self.pid_namespace.is_empty()
            && rec.host == self.host
            && rec.boot_id == self.boot_id
            && rec.pid_namespace == self.pid_namespace
    }
}

/// This host's name.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown-host".into())
}

/// What `/proc` says of a process of this PID namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    /// Running or sleeping: it will renew.
    Alive,
    /// Stopped (SIGSTOP, a debugger): it may never run again.
    Stopped,
    /// Gone, or a zombie.
    Dead,
}

/// The state of process `pid` of this PID namespace.
pub fn proc_state(pid: u32) -> ProcState {
    if pid == std::process::id() {
        return ProcState::Alive;
    }
    let p = std::path::Path::new("/proc");
    if !p.exists() {
        return ProcState::Alive; // cannot tell: assume alive
    }
    match std::fs::read_to_string(p.join(pid.to_string()).join("stat")) {
        Ok(stat) => match stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
        {
            Some('Z') | Some('X') => ProcState::Dead,
            Some('T') | Some('t') => ProcState::Stopped,
            _ => ProcState::Alive,
        },
        Err(_) => ProcState::Dead,
    }
}

/// Whether process `pid` of this PID namespace is alive (a zombie is not).
pub fn pid_alive(pid: u32) -> bool {
    proc_state(pid) != ProcState::Dead
}

/// The holder's view of how long its lease is valid, on the monotonic clock.
#[derive(Debug)]
pub struct LeaseClock {
    base: Instant,
    /// End of validity, in ms since `base`; 0 when lost.
    valid_until_ms: AtomicU64,
}

impl LeaseClock {
    fn new(until: Instant) -> Arc<Self> {
        let base = Instant::now();
        let c = LeaseClock {
            base,
            valid_until_ms: AtomicU64::new(0),
        };
        c.extend_to(until);
        Arc::new(c)
    }

    fn extend_to(&self, until: Instant) {
        let ms = until.saturating_duration_since(self.base).as_millis() as u64;
        self.valid_until_ms.store(ms.max(1), Ordering::Release);
    }

    fn lose(&self) {
        self.valid_until_ms.store(0, Ordering::Release);
    }

    /// True while the lease stays valid for at least `margin` more.
    pub fn valid_for(&self, margin: Duration) -> bool {
        let until = self.valid_until_ms.load(Ordering::Acquire);
        let now = self.base.elapsed().as_millis() as u64;
        until > now + margin.as_millis() as u64
    }
}

/// What a lease is held on: a stream (its archiver) or a replay (its
/// sender, so that two resumes of one replay cannot run at once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// `<stream>/_fluxcap/lease/`.
    Stream(String),
    /// `_fluxcap/replays/<id>/lease/`.
    Replay(String),
    /// `<stream>/_fluxcap/workers/<owner>/`: the heartbeat of one of the
    /// stream's shared archivers (see `archive::archiver::workers`).
    Worker {
        /// The stream.
        stream: String,
        /// The archiver's random id.
        owner: String,
    },
}

impl Subject {
    fn dir(&self, archive: &Archive) -> Path {
        match self {
            Subject::Stream(s) => archive.layout.lease_dir(s),
            Subject::Replay(id) => archive
                .layout
                .global_state_dir()
                .join("replays")
                .join(id.as_str())
                .join("lease"),
            Subject::Worker { stream, owner } => {
                archive.layout.workers_dir(stream).join(owner.as_str())
            }
        }
    }

    fn path(&self, archive: &Archive, epoch: u64) -> Path {
        self.dir(archive).join(format!("{epoch:020}.json"))
    }

    /// The error for a lease that someone else holds.
    fn held(&self, owner: String, expires: String) -> Error {
        match self {
            Subject::Stream(s) | Subject::Worker { stream: s, .. } => Error::LeaseHeld {
                stream: s.clone(),
                owner,
                expires,
            },
            Subject::Replay(id) => Error::ReplayHeld {
                id: id.clone(),
                owner,
                expires,
            },
        }
    }

    /// The error for a lease that was taken over while we held it.
    fn fenced(&self, object: String) -> Error {
        match self {
            Subject::Stream(s) | Subject::Worker { stream: s, .. } => Error::Fenced {
                stream: s.clone(),
                object,
            },
            Subject::Replay(id) => Error::ReplayHeld {
                id: id.clone(),
                owner: "another process, which took it over".into(),
                expires: "(unknown)".into(),
            },
        }
    }
}

/// A held lease (per stream, or per replay). Renew it at least every `ttl / 3`.
#[derive(Debug)]
pub struct Lease {
    archive: Archive,
    subject: Subject,
    record: LeaseRecord,
    /// Version (S3 ETag) of our object as last written, for conditional updates.
    version: Option<String>,
    ttl: Duration,
    clock: Arc<LeaseClock>,
}

impl Lease {
    /// Acquire the lease of `stream`, or fail with [`Error::LeaseHeld`]. A
    /// holder that cannot be checked by pid is watched for up to `ttl` plus a
    /// margin; it holds the lease if it renews meanwhile.
    /// The new epoch is above `min_epoch` too (the highest epoch found in the
    /// checkpoints), so that a lease folder removed by hand cannot make a new
    /// holder look older than the state it must take over.
    pub async fn acquire(
        archive: &Archive,
        stream: &str,
        owner: &str,
        ttl: Duration,
        min_epoch: u64,
    ) -> Result<Self> {
        Self::acquire_on(
            archive,
            Subject::Stream(stream.to_string()),
            owner,
            ttl,
            min_epoch,
        )
        .await
    }

    /// [`Lease::acquire`] on any [`Subject`].
    pub async fn acquire_on(
        archive: &Archive,
        subject: Subject,
        owner: &str,
        ttl: Duration,
        min_epoch: u64,
    ) -> Result<Self> {
        let me = Identity::current();
        let dir = subject.dir(archive);
        let (latest, older) = list_epochs(archive, &dir).await?;
        let next_epoch = match &latest {
            None => 1,
            Some((e, path)) => {
                let (rec, version) = read_versioned(archive, path).await?;
                if !rec.released() {
                    let state = me.shares_pids_with(&rec).then(|| proc_state(rec.pid));
                    let lapsed = match state {
                        Some(ProcState::Dead) => true,
                        Some(ProcState::Alive) => false,
                        // Stopped, or another host or namespace: watch its renewals.
                        Some(ProcState::Stopped) | None => watch(archive, path, &rec, ttl).await?,
                    };
                    if !lapsed {
                        return Err(held(&subject, &rec));
                    }
                    tracing::info!(
                        subject = ?subject,
                        "taking over the lease of {} (epoch {e}): it is not renewed any more",
                        rec.describe()
                    );
                    revoke(archive, &subject, path, rec, version, e + 1).await?;
                }
                e + 1
            }
        };
        let next_epoch = next_epoch.max(min_epoch + 1);
        let sent = Instant::now();
        let record = LeaseRecord {
            version: LEASE_VERSION,
            epoch: next_epoch,
            owner: owner.into(),
            host: me.host.clone(),
            pid: std::process::id(),
            boot_id: me.boot_id.clone(),
            pid_namespace: me.pid_namespace.clone(),
            started_at: Utc::now().to_rfc3339(),
            expires_at_ms: Utc::now().timestamp_millis() + ttl.as_millis() as i64,
            renewals: 0,
            revoked_by: None,
        };
        let path = subject.path(archive, next_epoch);
        let body = to_json(archive, &path, &record)?;
        create_object(archive, &path, body)
            .await
            .map_err(|e| match e {
                Error::Fenced { .. } => subject.held(
                    "another process that started at the same moment".into(),
                    "(unknown)".into(),
                ),
                other => other,
            })?;
        let version = archive.store.head(&path).await.ok().and_then(|m| m.e_tag);
        // Older epochs are history; the latest one before ours stays for
        // inspection (and so that its holder finds itself revoked).
        for p in older {
            let _ = archive.store.delete(&p).await;
        }
        Ok(Lease {
            archive: archive.clone(),
            subject,
            record,
            version,
            ttl,
            clock: LeaseClock::new(sent + ttl),
        })
    }

    /// The epoch of this lease (checkpoints and staged files carry it).
    pub fn epoch(&self) -> u64 {
        self.record.epoch
    }

    /// The holder's validity clock (flushes check it before committing).
    pub fn clock(&self) -> Arc<LeaseClock> {
        self.clock.clone()
    }

    /// Extend the lease; fails with [`Error::Fenced`] if a newer epoch exists
    /// or our object was changed by someone else.
    pub async fn renew(&mut self) -> Result<()> {
        let sent = Instant::now();
        let dir = self.subject.dir(&self.archive);
        let path = self.subject.path(&self.archive, self.record.epoch);
        let fenced = |me: &Self| {
            me.clock.lose();
            me.subject.fenced(me.archive.describe(&path))
        };
        let (latest, _) = list_epochs(&self.archive, &dir).await?;
        if latest.is_some_and(|(e, _)| e > self.record.epoch) {
            return Err(fenced(self));
        }
        let mut next = self.record.clone();
        next.renewals += 1;
        next.expires_at_ms = Utc::now().timestamp_millis() + self.ttl.as_millis() as i64;
        match self.write(&next).await {
            Ok(()) => {}
            Err(Error::Fenced { .. }) => return Err(fenced(self)),
            Err(e) => return Err(e),
        }
        self.record = next;
        self.clock.extend_to(sent + self.ttl);
        Ok(())
    }

    /// Give the lease up so that the next archiver can start at once.
    pub async fn release(mut self) -> Result<()> {
        self.clock.lose();
        let mut next = self.record.clone();
        next.expires_at_ms = 0;
        match self.write(&next).await {
            Ok(()) | Err(Error::Fenced { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Write our object: a conditional update of the version we wrote on S3,
    /// a plain overwrite on a local directory (which has no such update; the
    /// listing of newer epochs before it does the fencing there).
    async fn write(&mut self, rec: &LeaseRecord) -> Result<()> {
        let path = self.subject.path(&self.archive, rec.epoch);
        let body = Bytes::from(to_json(&self.archive, &path, rec)?);
        match (&self.archive.location, &self.version) {
            (ArchiveLocation::S3 { .. }, Some(etag)) => {
                let mode = PutMode::Update(UpdateVersion {
                    e_tag: Some(etag.clone()),
                    version: None,
                });
                let what = self.archive.describe(&path);
                match put_conditional(self.archive.store.as_ref(), &what, &path, body, mode).await {
                    Ok(e_tag) => {
                        self.version = e_tag;
                        Ok(())
                    }
                    Err(object_store::Error::Precondition { .. })
                    | Err(object_store::Error::NotFound { .. }) => Err(self.subject.fenced(what)),
                    Err(e) => Err(Error::store(what, e)),
                }
            }
            _ => {
                // No conditional update here: at least never undo a
                // revocation (or a removal) that is already there.
                match read_json::<LeaseRecord>(&self.archive, &path).await {
                    Ok(now) if now.revoked_by.is_some() || now.owner != rec.owner => {
                        return Err(self.subject.fenced(self.archive.describe(&path)));
                    }
                    Err(Error::Store {
                        source: object_store::Error::NotFound { .. },
                        ..
                    }) => return Err(self.subject.fenced(self.archive.describe(&path))),
                    _ => {}
                }
                self.archive.put_bytes(&path, body).await?;
                self.archive.sync_local(&path).await
            }
        }
    }

    /// Give the lease up and remove its object (a shared archiver that
    /// stops: nobody needs to see its history).
    pub async fn remove(self) -> Result<()> {
        self.clock.lose();
        let dir = self.subject.dir(&self.archive);
        for o in self.archive.list(&dir).await? {
            let _ = self.archive.store.delete(&o.location).await;
        }
        Ok(())
    }
}

/// What this host can tell of the holder of `rec` by its process id:
/// `Some(true)` when it is dead, `Some(false)` when it runs, `None` when
/// only watching its renewals can tell (another host or PID namespace, or a
/// stopped process).
pub fn pid_verdict(rec: &LeaseRecord) -> Option<bool> {
    if !Identity::current().shares_pids_with(rec) {
        return None;
    }
    match proc_state(rec.pid) {
        ProcState::Dead => Some(true),
        ProcState::Alive => Some(false),
        ProcState::Stopped => None,
    }
}

/// Whether the holder of the lease object at `path` is gone: released,
/// revoked, dead by its pid, or not renewed while watched for `ttl` plus a
/// margin (which this waits for).
pub async fn holder_gone(archive: &Archive, path: &Path, ttl: Duration) -> Result<bool> {
    let rec: LeaseRecord = match read_json(archive, path).await {
        Ok(r) => r,
        Err(Error::Store {
            source: object_store::Error::NotFound { .. },
            ..
        }) => return Ok(true),
        Err(e) => return Err(e),
    };
    if rec.released() {
        return Ok(true);
    }
    match pid_verdict(&rec) {
        Some(dead) => Ok(dead),
        None => watch(archive, path, &rec, ttl).await,
    }
}

/// Read a lease object (any subject).
pub async fn read_record(archive: &Archive, path: &Path) -> Result<LeaseRecord> {
    read_json(archive, path).await
}

fn held(subject: &Subject, rec: &LeaseRecord) -> Error {
    subject.held(
        rec.describe(),
        chrono::DateTime::from_timestamp_millis(rec.expires_at_ms)
            .map(|t| t.to_rfc3339())
            .unwrap_or_default(),
    )
}

fn to_json(archive: &Archive, path: &Path, rec: &LeaseRecord) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(rec).map_err(|e| Error::CorruptState {
        object: archive.describe(path),
        message: e.to_string(),
    })
}

/// The highest epoch object and the ones below the one before it.
async fn list_epochs(archive: &Archive, dir: &Path) -> Result<(Option<(u64, Path)>, Vec<Path>)> {
    let mut epochs: Vec<(u64, Path)> = archive
        .list(dir)
        .await?
        .into_iter()
        .filter_map(|o| Some((parse_generation(o.location.filename()?)?, o.location)))
        .collect();
    epochs.sort();
    let latest = epochs.pop();
    Ok((latest, epochs.into_iter().map(|(_, p)| p).collect()))
}

async fn read_versioned(archive: &Archive, path: &Path) -> Result<(LeaseRecord, Option<String>)> {
    let what = archive.describe(path);
    let got = with_retry(&what, || async {
        let r = archive.store.get(path).await?;
        let etag = r.meta.e_tag.clone();
        Ok((r.bytes().await?, etag))
    })
    .await
    .map_err(|e| Error::store(&what, e))?;
    let rec = serde_json::from_slice(&got.0).map_err(|e| Error::CorruptState {
        object: what,
        message: e.to_string(),
    })?;
    Ok((rec, got.1))
}

/// Watch a lease whose holder cannot be checked by pid, on our monotonic
/// clock: `Ok(true)` when it was neither renewed nor released for `ttl` plus a
/// margin (it has lapsed), `Ok(false)` when its holder renewed it.
async fn watch(archive: &Archive, path: &Path, seen: &LeaseRecord, ttl: Duration) -> Result<bool> {
    let margin = (ttl / 4).max(Duration::from_secs(1));
    let wait = ttl + margin;
    tracing::info!(
        "the lease is held by {}; watching it for up to {:.0?} to see whether it is still renewed",
        seen.describe(),
        wait
    );
    let start = Instant::now();
    let poll = (ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(2));
    while start.elapsed() < wait {
        tokio::time::sleep(poll).await;
        let now: LeaseRecord = match read_json(archive, path).await {
            Ok(r) => r,
            // Deleted: a newer epoch replaced it; the caller lists again.
            Err(Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }) => return Ok(false),
            Err(e) => return Err(e),
        };
        if now.released() {
            return Ok(true);
        }
        if now.renewals != seen.renewals
            || now.owner != seen.owner
            || now.expires_at_ms != seen.expires_at_ms
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Mark a lapsed lease as revoked by `by` before creating the next epoch: a
/// conditional update on S3, so that a holder that renewed meanwhile wins
/// (and then we are refused), and that holder's next renewal fails otherwise.
async fn revoke(
    archive: &Archive,
    subject: &Subject,
    path: &Path,
    mut rec: LeaseRecord,
    version: Option<String>,
    by: u64,
) -> Result<()> {
    rec.revoked_by = Some(by);
    rec.expires_at_ms = 0;
    let body = Bytes::from(to_json(archive, path, &rec)?);
    let what = archive.describe(path);
    match (&archive.location, version) {
        (ArchiveLocation::S3 { .. }, Some(etag)) => {
            let mode = PutMode::Update(UpdateVersion {
                e_tag: Some(etag),
                version: None,
            });
            match put_conditional(archive.store.as_ref(), &what, path, body, mode).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::Precondition { .. }) => Err(subject.held(
                    format!("{} (renewed while we took over)", rec.describe()),
                    "(unknown)".into(),
                )),
                Err(e) => Err(Error::store(what, e)),
            }
        }
        _ => {
            archive.put_bytes(path, body).await?;
            archive.sync_local(path).await
        }
    }
}
