//! Running a planned replay: reading the ordered selection, annotating each
//! record, sending it to the sink (the Kinesis writer, a JSON-lines file or
//! standard output, or only counting for a dry run: [`sink`]), and saving
//! progress as acknowledgements come back (what is saved, and what a resume
//! skips: [`crate::replay::acks`]). While the reader waits for a full target
//! shard, the other shards' acknowledgements are still taken in and saved.
//!
//! A line target acknowledges a record once its bytes are written through to
//! the file or pipe (not while they sit in the buffer). When the reader of
//! standard output goes away (`--to - | head`), the write fails with a
//! broken pipe: the run stops there, cleanly ([`Stop::OutputClosed`]), with
//! the records written through counted as sent.

use std::collections::{BTreeMap, HashSet};
use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Int64Type};
use bytes::Bytes;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::archive::store::Archive;
use crate::config::Config;
use crate::consistency::{self, Annotation};
use crate::error::{Error, Result};
use crate::kinesis::writer::{Ack, OutRecord, ShardStats};
use crate::query::QuerySession;
use crate::replay::acks::{Acks, Resume};
use crate::replay::follow::{self, Followed};
use crate::replay::order::{self, Start};
use crate::replay::report::{estimate, progress_bar, report};
use crate::replay::select::{self, Columns, Row, cast};
use crate::replay::state::{self, Manifest, Phase, Progress};
use crate::replay::target::{Line, Target};

mod sink;
use crate::replay::{Observer, ReplayOptions, Summary};
use sink::LineError;
pub(super) use sink::Sink;

/// How a run that did not fail ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// Every selected record was sent (or counted).
    Complete,
    /// The reader of the output went away (a broken pipe).
    OutputClosed,
}

/// What earlier runs of a resumed replay left in the store.
#[derive(Debug, Default)]
pub(super) struct Earlier {
    /// Their progress.
    pub(super) progress: Option<Progress>,
    /// Their rejected list (`rejected.jsonl`).
    pub(super) rejected: Vec<String>,
}

pub(super) struct Run {
    cfg: Config,
    archive: Archive,
    manifest: Manifest,
    opts: ReplayOptions,
    target: Target,
    /// Records before this ordinal were sent by earlier runs.
    start: u64,
    progress: Progress,
    /// What earlier runs had acknowledged (not sent again).
    resume: Resume,
    mark: Acks,
    /// Records the target cannot take, earlier runs' first (`rejected.jsonl`).
    rejected: Vec<String>,
    /// Their (shard, sequence, sub-sequence): a record rejected again (sent
    /// again after a resume) is listed once.
    rejected_keys: HashSet<(String, String, i64)>,
    /// How many of `rejected` are in the store.
    rejected_saved: usize,
    enveloped: u64,
    sent_records: u64,
    sent_bytes: u64,
    started: Instant,
    last_save: Instant,
    last_saved_sent: u64,
    last_log: Instant,
    bar: Option<indicatif::ProgressBar>,
    shards: Vec<ShardStats>,
    /// The manifest is in the store (progress may be saved).
    recorded: bool,
    /// Someone watching (the HTTP server).
    observer: Option<Arc<Observer>>,
    /// Dry run into Kinesis, in order: the records of the busiest key.
    busiest_key: Option<u64>,
    /// The stream name annotations carry.
    label: String,
    /// `--follow`: what was forwarded after the horizon.
    follow: Followed,
    /// `--follow` was stopped (its normal end): resumable, not done.
    stopped_following: bool,
    /// No progress save now: a followed batch is half sent, and its shard's
    /// position is only known once all of it is.
    pub(super) hold_saves: bool,
}

impl Run {
    pub(super) fn new(
        cfg: &Config,
        archive: Archive,
        manifest: Manifest,
        earlier: Earlier,
        opts: ReplayOptions,
        target: Target,
        observer: Option<Arc<Observer>>,
    ) -> Self {
        let Earlier { progress, rejected } = earlier;
        let rejected_keys = rejected
            .iter()
            .filter_map(|l| state::rejected_key(l))
            .collect();
        let rejected_saved = rejected.len();
        let start = progress.as_ref().map(|p| p.sent).unwrap_or(0);
        let progress = progress.unwrap_or(Progress {
            phase: Phase::Running,
            sent: 0,
            total: None,
            bytes: 0,
            file_offset: None,
            rejected: 0,
            shards: Vec::new(),
            error: None,
            updated_ms: 0,
            host: crate::archive::lease::hostname(),
            pid: std::process::id(),
            selection_done: false,
            follow: BTreeMap::new(),
            through: None,
            targets: Vec::new(),
        });
        let resume = Resume::new(progress.through.as_deref(), &progress.targets);
        let mark = Acks::new(start, progress.bytes, &resume);
        if let Some(o) = &observer {
            o.sent.store(start, Ordering::Relaxed);
        }
        let follow = Followed::new(progress.follow.clone());
        Run {
            busiest_key: None,
            label: manifest.source.stream_label(),
            follow,
            stopped_following: false,
            hold_saves: false,
            observer,
            cfg: cfg.clone(),
            archive,
            manifest,
            opts,
            target,
            start,
            progress,
            resume,
            mark,
            rejected,
            rejected_keys,
            rejected_saved,
            enveloped: 0,
            sent_records: 0,
            sent_bytes: 0,
            started: Instant::now(),
            last_save: Instant::now(),
            last_saved_sent: start,
            last_log: Instant::now(),
            bar: None,
            shards: Vec::new(),
            recorded: false,
        }
    }

    pub(super) async fn execute(
        &mut self,
        (session, table): (QuerySession, String),
        cancel: &CancellationToken,
    ) -> Result<Stop> {
        let m = self.manifest.clone();
        // A saved position that does not parse (edited by hand) would
        // silently replay everything again: refuse it, before any save.
        if self.progress.through.is_some() && self.resume.through.is_none() {
            let object = state::dir(&self.archive, &m.id).join("progress.json");
            return Err(Error::CorruptState {
                object: self.archive.describe(&object),
                message: "`through` is not a position key (hex)".into(),
            });
        }
        let horizon = m.horizon.is_some();
        let terminal = std::io::stderr().is_terminal() && !self.opts.dry_run && !self.opts.quiet;
        let watched = self.observer.is_some() && !self.opts.dry_run;
        if (terminal || watched) && self.progress.total.is_none() {
            let q = select::sql(&table, &m.selection, horizon, false, 0);
            let b = session
                .sql(&q)
                .await?
                .collect()
                .await
                .map_err(|e| session.error(e))?;
            if let Some(b) = b.first() {
                let n = cast(b.column(0), &DataType::Int64)?;
                let n = n.as_primitive::<Int64Type>();
                if !n.is_empty() && !n.is_null(0) {
                    self.progress.total = Some(n.value(0) as u64);
                }
            }
        }
        if let (Some(o), Some(t)) = (&self.observer, self.progress.total) {
            o.total.store(t, Ordering::Relaxed);
        }
        if terminal {
            self.bar = Some(progress_bar(self.progress.total, self.start));
        }
        let mut sink = self.sink().await?;
        if self.opts.dry_run && matches!(self.target, Target::Kinesis(_)) && !m.unordered {
            let q = select::busiest_key_sql(&table, &m.selection, horizon);
            let b = session
                .sql(&q)
                .await?
                .collect()
                .await
                .map_err(|e| session.error(e))?;
            if let Some(b) = b.first() {
                let n = cast(b.column(0), &DataType::Int64)?;
                let n = n.as_primitive::<Int64Type>();
                if !n.is_empty() && !n.is_null(0) {
                    self.busiest_key = Some(n.value(0) as u64);
                }
            }
        }
        if !self.opts.dry_run {
            // The source and target are usable: from here on the replay exists.
            if self.opts.resume.is_none() {
                state::save_manifest(&self.archive, &self.manifest).await?;
            }
            self.recorded = true;
            self.save(Phase::Running, None).await;
        }
        let mut idx = self.start;
        // A follow that is resumed after its selection was sent only follows.
        let statements = if self.progress.selection_done {
            Vec::new()
        } else {
            // Progress saved without positions (an older version) resumes
            // by skipping the records it counts.
            let old = self.progress.through.is_none() && self.progress.targets.is_empty();
            let start = Start {
                after: self.resume.through.as_deref(),
                offset: if old { self.start } else { 0 },
            };
            order::statements(&session, &table, &m, &start).await?
        };
        for q in &statements {
            tracing::debug!(sql = %q, "replay selection");
            let df = session.sql(q).await?;
            let mut stream = df.execute_stream().await.map_err(|e| session.error(e))?;
            loop {
                let batch = tokio::select! {
                    _ = cancel.cancelled() => return Err(Error::Interrupted),
                    b = stream.next() => b,
                };
                let Some(batch) = batch else { break };
                let batch = batch.map_err(|e| session.error(e))?;
                let cols = Columns::of(&batch)?;
                for i in 0..batch.num_rows() {
                    let row = cols.row(i);
                    let key = row.key();
                    if self.resume.done(&key, row.hash()) {
                        // Acknowledged in an earlier run.
                        self.mark.skipped(key);
                        continue;
                    }
                    if self.emit(&mut sink, &row, idx, cancel).await? {
                        return Ok(Stop::OutputClosed);
                    }
                    idx += 1;
                }
                self.tick();
            }
        }
        if m.follow && !self.opts.dry_run {
            if !self.progress.selection_done {
                self.progress.selection_done = true;
                if self.after_batch(&mut sink).await {
                    return Ok(Stop::OutputClosed);
                }
                self.save(Phase::Running, None).await;
            }
            if follow::run(self, &session, &mut sink, idx, cancel).await? == Stop::OutputClosed {
                return Ok(Stop::OutputClosed);
            }
            self.stopped_following = true;
        }
        // A stopped follow still waits for what it sent.
        let cancel = &if self.stopped_following {
            CancellationToken::new()
        } else {
            cancel.clone()
        };
        match sink {
            Sink::Kinesis {
                writer,
                mut acks,
                ack_tx,
            } => {
                drop(ack_tx);
                let finish = writer.finish();
                tokio::pin!(finish);
                let stats = loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Error::Interrupted),
                        r = &mut finish => break r?,
                        Some(a) = acks.recv() => {
                            self.on_ack(a);
                            if self.due(0) {
                                self.save(Phase::Running, None).await;
                            }
                            self.tick();
                        }
                    }
                };
                while let Ok(a) = acks.try_recv() {
                    self.on_ack(a);
                }
                self.shards = stats;
            }
            Sink::DryRun { per_shard, .. } => self.shards = per_shard,
            Sink::Lines {
                mut out,
                path,
                mut pending,
                ..
            } => match out.flush().map_err(LineError::from) {
                Ok(()) => self.acked_lines(&mut pending, path.is_some()),
                Err(LineError::Closed) => return Ok(Stop::OutputClosed),
                Err(LineError::Io(e)) => {
                    return Err(Error::Io {
                        path: path.unwrap_or_else(|| "<stdout>".into()),
                        source: e,
                    });
                }
            },
        }
        Ok(Stop::Complete)
    }

    /// Send (or write, or count) one selected record as number `idx` of the
    /// output order. `Ok(true)`: the reader of the output went away.
    pub(super) async fn emit(
        &mut self,
        sink: &mut Sink,
        row: &Row<'_>,
        idx: u64,
        cancel: &CancellationToken,
    ) -> Result<bool> {
        // Positions are tracked for the selection (a followed live record
        // is resumed from the per-shard follow positions instead).
        let key = (!self.progress.selection_done).then(|| row.key());
        let m = &self.manifest;
        let text = !m.annotate.binary;
        let max = self.cfg.replay.max_record_size.0 as usize;
        let label = self.label.clone();
        match sink {
            Sink::Lines {
                out,
                path,
                offset,
                pending,
            } => {
                let (data, data_base64) = Line::payload(row.data, text);
                let line = Line {
                    replay_id: m.annotate.enabled.then_some(m.id.as_str()),
                    stream: &label,
                    shard_id: row.shard,
                    sequence_number: row.seq,
                    subsequence_number: row.sub,
                    partition_key: row.pk,
                    explicit_hash_key: row.ehk,
                    approximate_arrival_timestamp: Line::time(row.arrival_ms),
                    data,
                    data_base64,
                    annotations: (m.annotate.enabled && !m.annotate.pairs.is_empty())
                        .then_some(&m.annotate.pairs),
                };
                let mut buf = serde_json::to_vec(&line).map_err(|e| Error::Query {
                    message: format!("encoding a JSON line: {e}"),
                })?;
                buf.push(b'\n');
                let size = row.data.len() + row.pk.len();
                let file = path.is_some();
                // Ok(true): flushed for a progress save.
                let mut write = || -> std::result::Result<bool, LineError> {
                    if out.buffer().len() + buf.len() > out.capacity() {
                        out.flush()?;
                        self.acked_lines(pending, file);
                    }
                    out.write_all(&buf)?;
                    *offset += buf.len() as u64;
                    pending.push((idx, size, *offset));
                    self.mark.sent(idx, 0, key.clone());
                    if out.buffer().is_empty() {
                        // Longer than the buffer: written through.
                        self.acked_lines(pending, file);
                    }
                    if !self.hold_saves && self.due(pending.len() as u64) {
                        out.flush()?;
                        self.acked_lines(pending, file);
                        return Ok(true);
                    }
                    Ok(false)
                };
                let written = write();
                match written {
                    Ok(true) => self.save(Phase::Running, None).await,
                    Ok(false) => {}
                    Err(LineError::Closed) => return Ok(true),
                    Err(LineError::Io(e)) => {
                        return Err(Error::Io {
                            path: path.clone().unwrap_or_else(|| "<stdout>".into()),
                            source: e,
                        });
                    }
                }
            }
            Sink::DryRun { shards, per_shard } => {
                let payload = self.payload(row, &label);
                let size = payload.len() + row.pk.len();
                if matches!(self.target, Target::Kinesis(_)) && size > max {
                    self.reject(row, size);
                } else {
                    let s = shards.as_ref().map_or(0, |t| t.route(row.pk, row.ehk));
                    per_shard[s].records += 1;
                    per_shard[s].bytes += size as u64;
                }
            }
            Sink::Kinesis {
                writer,
                acks,
                ack_tx,
            } => {
                let payload = self.payload(row, &label);
                let size = payload.len() + row.pk.len();
                self.mark
                    .sent(idx, writer.shards.route(row.pk, row.ehk), key);
                if size > max {
                    self.reject(row, size);
                    let _ = ack_tx.send(Ack {
                        idx,
                        shard: usize::MAX,
                        bytes: 0,
                    });
                } else {
                    let rec = OutRecord {
                        idx,
                        partition_key: row.pk.to_string(),
                        explicit_hash_key: row.ehk.map(str::to_string),
                        data: payload,
                    };
                    // While the record's shard is full (throttled), take
                    // the other shards' acknowledgements in and save
                    // progress: a slow shard must not hold it back.
                    let send = writer.send(rec);
                    tokio::pin!(send);
                    loop {
                        tokio::select! {
                            _ = cancel.cancelled() => return Err(Error::Interrupted),
                            r = &mut send => {
                                r?;
                                break;
                            }
                            Some(a) = acks.recv() => {
                                self.on_ack(a);
                                if !self.hold_saves && self.due(0) {
                                    self.save(Phase::Running, None).await;
                                }
                            }
                        }
                    }
                }
                while let Ok(a) = acks.try_recv() {
                    self.on_ack(a);
                }
                if !self.hold_saves && self.due(0) {
                    self.save(Phase::Running, None).await;
                }
            }
        }
        Ok(false)
    }

    fn on_ack(&mut self, a: Ack) {
        if a.shard != usize::MAX {
            self.sent_records += 1;
            self.sent_bytes += a.bytes as u64;
        }
        self.mark.ack(a.idx, a.bytes);
    }

    /// The payload as sent to Kinesis (annotated or not).
    fn payload(&mut self, row: &Row<'_>, label: &str) -> Bytes {
        let a = &self.manifest.annotate;
        // A copy keeps its original's annotation: wrapping it again would
        // give it this replay's position of a copy.
        if !a.enabled || row.copy {
            return Bytes::copy_from_slice(row.data);
        }
        let ann = Annotation {
            replay_id: self.manifest.id.clone(),
            stream: label.to_string(),
            shard_id: row.shard.to_string(),
            lineage_depth: row.depth.max(0) as u32,
            sequence_number: row.seq.to_string(),
            subsequence_number: row.sub,
            arrival: consistency::rfc3339_ms(row.arrival_ms),
            arrival_ms: row.arrival_ms,
            force_overwrite: a.force_overwrite,
            annotations: a.pairs.clone(),
            envelope: None,
        };
        if !a.binary && !a.envelope {
            if let Some(v) = consistency::annotate_json(row.data, &a.field, &ann) {
                return Bytes::from(v);
            }
            self.enveloped += 1;
        }
        Bytes::from(consistency::envelope(row.data, &a.field, &ann))
    }

    fn reject(&mut self, row: &Row<'_>, size: usize) {
        let key = (row.shard.to_string(), row.seq.to_string(), row.sub);
        if !self.rejected_keys.insert(key) {
            // Rejected before (by an earlier run, before its last save).
            return;
        }
        tracing::warn!(
            shard = row.shard,
            sequence_number = row.seq,
            size,
            "record too large for the target ({} bytes > replay.max_record_size {}): not sent",
            size,
            self.cfg.replay.max_record_size.0
        );
        self.rejected.push(
            serde_json::json!({
                "shard_id": row.shard,
                "sequence_number": row.seq,
                "subsequence_number": row.sub,
                "partition_key": row.pk,
                "size": size,
            })
            .to_string(),
        );
    }

    /// Time to save progress, counting `buffered` records that a flush
    /// would acknowledge.
    fn due(&self, buffered: u64) -> bool {
        let next = self.mark.count() + buffered;
        next - self.last_saved_sent >= self.cfg.replay.checkpoint_records
            || (self.last_save.elapsed() >= self.cfg.replay.checkpoint_interval.0
                && next > self.last_saved_sent)
    }

    /// The replay's manifest.
    pub(super) fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The configuration.
    pub(super) fn config(&self) -> &Config {
        &self.cfg
    }

    /// The member annotations are carried in.
    pub(super) fn annotation_field(&self) -> &str {
        &self.manifest.annotate.field
    }

    /// `--follow`: per shard, the last sequence number forwarded and acknowledged.
    pub(super) fn follow_positions(&self) -> &BTreeMap<String, String> {
        &self.follow.positions
    }

    /// `--follow`: `shard` was read up to `seq`; its selected records end before `need`.
    pub(super) fn followed(&mut self, need: u64, shard: &str, seq: String) {
        self.follow.read(need, shard, seq);
    }

    /// `--follow`: after a batch, take acknowledgements in and save the
    /// progress when due (also when nothing of the batch was selected).
    /// `true`: the reader of the output went away.
    pub(super) async fn after_batch(&mut self, sink: &mut Sink) -> bool {
        let mut buffered = 0;
        match sink {
            Sink::Kinesis { acks, .. } => {
                while let Ok(a) = acks.try_recv() {
                    self.on_ack(a);
                }
            }
            Sink::Lines { pending, .. } => buffered = pending.len() as u64,
            Sink::DryRun { .. } => {}
        }
        self.follow.acknowledged(self.mark.next);
        let moved = self.progress.follow != self.follow.positions;
        if !(self.due(buffered)
            || (moved && self.last_save.elapsed() >= self.cfg.replay.checkpoint_interval.0))
        {
            return false;
        }
        if let Sink::Lines {
            out, pending, path, ..
        } = sink
        {
            let file = path.is_some();
            match out.flush().map_err(LineError::from) {
                Ok(()) => self.acked_lines(pending, file),
                Err(LineError::Closed) => return true,
                Err(LineError::Io(e)) => {
                    tracing::warn!("writing the replay's output: {e}");
                    return false;
                }
            }
        }
        self.save(Phase::Running, None).await;
        false
    }

    pub(super) fn tick(&mut self) {
        let done = self.mark.count();
        if let Some(o) = &self.observer {
            o.sent.store(done, Ordering::Relaxed);
            o.sent_this_run.store(self.sent_records, Ordering::Relaxed);
        }
        if let Some(b) = &self.bar {
            b.set_position(done);
        } else if !self.opts.dry_run && self.last_log.elapsed() >= Duration::from_secs(10) {
            self.last_log = Instant::now();
            let secs = self.started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                replay = %self.manifest.id,
                "sent {done} records ({:.0} records/s)",
                self.sent_records as f64 / secs
            );
        }
    }

    /// Save progress (and, first, the records rejected since the last save:
    /// progress never moves past a rejected record that is not listed).
    async fn save(&mut self, phase: Phase, error: Option<String>) {
        if self.rejected.len() > self.rejected_saved {
            match state::save_rejected(&self.archive, &self.manifest.id, &self.rejected).await {
                Ok(_) => self.rejected_saved = self.rejected.len(),
                Err(e) => {
                    tracing::warn!(
                        "could not save the list of rejected records ({e}); progress is not saved either, \
                         so a resumed run rejects them again"
                    );
                    return;
                }
            }
        }
        self.follow.acknowledged(self.mark.next);
        self.progress.follow = self.follow.positions.clone();
        self.progress.phase = phase;
        self.progress.sent = self.mark.count();
        self.progress.bytes = self.mark.bytes;
        if !self.progress.selection_done {
            (self.progress.through, self.progress.targets) = self.mark.marks();
        }
        self.progress.rejected = self.rejected.len() as u64;
        self.progress.error = error;
        self.progress.updated_ms = chrono::Utc::now().timestamp_millis();
        self.progress.host = crate::archive::lease::hostname();
        self.progress.pid = std::process::id();
        if !self.shards.is_empty() {
            self.progress.shards = self.shards.clone();
        }
        if let Err(e) = state::save_progress(&self.archive, &self.manifest.id, &self.progress).await
        {
            tracing::warn!("could not save the replay's progress: {e}");
        }
        self.last_save = Instant::now();
        self.last_saved_sent = self.mark.count();
    }

    pub(super) async fn finish(mut self, result: Result<Stop>) -> Result<Summary> {
        // Watchers see the final counts, also when the run stopped early.
        self.tick();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        let id = self.manifest.id.clone();
        let stop = match result {
            Ok(stop) => stop,
            Err(e) => {
                if self.recorded {
                    let msg = (!matches!(e, Error::Interrupted)).then(|| e.to_string());
                    // A followed batch cut short: the last save is the
                    // last consistent one (output and shard positions agree).
                    if !self.hold_saves {
                        self.save(Phase::Interrupted, msg).await;
                    }
                    if !self.opts.quiet {
                        eprintln!(
                            "replay {id} stopped after {} records; continue with: fluxcap replay --resume {id}",
                            self.mark.count()
                        );
                    }
                }
                return Err(e);
            }
        };
        let secs = self.started.elapsed().as_secs_f64();
        let mut summary = Summary {
            id: id.clone(),
            target: self.manifest.target.clone(),
            dry_run: self.opts.dry_run,
            records: if self.opts.dry_run {
                self.shards.iter().map(|s| s.records).sum()
            } else {
                self.sent_records
            },
            bytes: if self.opts.dry_run {
                self.shards.iter().map(|s| s.bytes).sum()
            } else {
                self.sent_bytes
            },
            rejected: self.rejected.len() as u64,
            enveloped: self.enveloped,
            throttled: self.shards.iter().map(|s| s.throttled).sum(),
            shards: self.shards.clone(),
            seconds: secs,
            estimated_seconds: None,
            busiest_key_records: self.busiest_key,
        };
        if self.opts.dry_run {
            summary.estimated_seconds = Some(estimate(
                &self.cfg.replay,
                &self.target,
                self.manifest.rate,
                share(&self.cfg, &self.manifest, &self.target),
                &summary,
            ));
        } else if stop == Stop::OutputClosed {
            // Its reader has what it wanted: a clean stop, nothing to report.
            if !self.hold_saves {
                self.save(Phase::OutputClosed, None).await;
            }
            tracing::info!(
                "replay {id}: the output was closed after {} records; continue with: fluxcap replay --resume {id}",
                self.mark.count()
            );
            return Ok(summary);
        } else if self.stopped_following {
            self.save(Phase::Interrupted, None).await;
            if !self.opts.quiet {
                eprintln!(
                    "replay {id} stopped following after {} records; continue with: fluxcap replay --resume {id}",
                    self.mark.count()
                );
            }
        } else {
            self.progress.total = Some(self.mark.count());
            self.save(Phase::Done, None).await;
        }
        if !self.opts.quiet {
            report(&summary, &self.opts, &self.target);
        }
        if self.recorded && !self.rejected.is_empty() {
            // Also when this run rejected nothing: earlier runs did.
            return Err(Error::Rejected {
                id: id.clone(),
                count: self.rejected.len() as u64,
                list: self
                    .archive
                    .describe(&state::rejected_path(&self.archive, &id)),
            });
        }
        Ok(summary)
    }
}

/// Share of the target's per-shard limits the writer may use: less when
/// the target is the source stream (`replay.same_stream_share`).
fn share(cfg: &Config, manifest: &Manifest, target: &Target) -> f64 {
    match crate::replay::target::same_stream(&manifest.source, target) {
        Some(_) => cfg.replay.same_stream_share,
        None => 1.0,
    }
}
