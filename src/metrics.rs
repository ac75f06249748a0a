//! Counters shared by the archiver's tasks, rendered as progress output and as
//! Prometheus metrics (`GET /metrics`, bound to 127.0.0.1 by default).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Per-shard figures.
#[derive(Debug, Default)]
pub struct ShardStats {
    /// Records archived (committed) by this process.
    pub records: AtomicU64,
    /// Payload bytes archived by this process.
    pub bytes: AtomicU64,
    /// MillisBehindLatest of the last GetRecords (-1 unknown).
    pub millis_behind: AtomicI64,
    /// 0 reading, 1 waiting for parents (unused), 2 finished, 3 stopped.
    pub state: AtomicI64,
}

/// Process-wide figures.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records read from Kinesis (user records).
    pub records_read: AtomicU64,
    /// Records committed to the archive.
    pub records_archived: AtomicU64,
    /// Payload bytes committed.
    pub bytes_archived: AtomicU64,
    /// Parquet bytes written.
    pub bytes_written: AtomicU64,
    /// Data files committed.
    pub files: AtomicU64,
    /// Flushes committed.
    pub flushes: AtomicU64,
    /// Retried calls (throttling, faults).
    pub retries: Arc<AtomicU64>,
    /// Errors that stopped a task.
    pub errors: AtomicU64,
    /// Payloads of `json` streams that are not valid JSON (archived anyway).
    pub invalid_json: AtomicU64,
    /// Bytes buffered in memory now.
    pub buffered_bytes: AtomicI64,
    shards: Mutex<BTreeMap<(String, String), Arc<ShardStats>>>,
}

impl Stats {
    /// The figures of one shard (created on first use).
    pub fn shard(&self, stream: &str, shard: &str) -> Arc<ShardStats> {
        let mut m = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        m.entry((stream.to_string(), shard.to_string()))
            .or_insert_with(|| {
                let s = ShardStats::default();
                s.millis_behind.store(-1, Ordering::Relaxed);
                Arc::new(s)
            })
            .clone()
    }

    fn snapshot(&self) -> Vec<((String, String), Arc<ShardStats>)> {
        let m = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Prometheus text exposition.
    pub fn render_prometheus(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        g(
            &mut o,
            "fluxcap_records_read_total",
            "counter",
            "User records read from Kinesis.",
            self.records_read.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_records_archived_total",
            "counter",
            "Records committed to the archive.",
            self.records_archived.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_bytes_archived_total",
            "counter",
            "Payload bytes committed to the archive.",
            self.bytes_archived.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_parquet_bytes_written_total",
            "counter",
            "Parquet bytes written.",
            self.bytes_written.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_files_total",
            "counter",
            "Data files committed.",
            self.files.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_flushes_total",
            "counter",
            "Flushes committed.",
            self.flushes.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_retries_total",
            "counter",
            "Calls retried after throttling or a transient fault.",
            self.retries.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_errors_total",
            "counter",
            "Errors that stopped a task.",
            self.errors.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_invalid_json_total",
            "counter",
            "Payloads of json streams that are not valid JSON (archived as is).",
            self.invalid_json.load(Ordering::Relaxed),
        );
        g(
            &mut o,
            "fluxcap_buffered_bytes",
            "gauge",
            "Bytes buffered in memory.",
            self.buffered_bytes.load(Ordering::Relaxed).max(0) as u64,
        );
        let shards = self.snapshot();
        let _ = writeln!(
            o,
            "# HELP fluxcap_shard_millis_behind_latest MillisBehindLatest of the last read.\n# TYPE fluxcap_shard_millis_behind_latest gauge"
        );
        for ((stream, shard), s) in &shards {
            let _ = writeln!(
                o,
                "fluxcap_shard_millis_behind_latest{{stream=\"{stream}\",shard=\"{shard}\"}} {}",
                s.millis_behind.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            o,
            "# HELP fluxcap_shard_records_archived_total Records committed per shard.\n# TYPE fluxcap_shard_records_archived_total counter"
        );
        for ((stream, shard), s) in &shards {
            let _ = writeln!(
                o,
                "fluxcap_shard_records_archived_total{{stream=\"{stream}\",shard=\"{shard}\"}} {}",
                s.records.load(Ordering::Relaxed)
            );
        }
        o
    }

    fn line(&self, started: Instant) -> String {
        let shards = self.snapshot();
        let max_lag = shards
            .iter()
            .map(|(_, s)| s.millis_behind.load(Ordering::Relaxed))
            .max()
            .unwrap_or(-1);
        let done = shards
            .iter()
            .filter(|(_, s)| s.state.load(Ordering::Relaxed) == 2)
            .count();
        let recs = self.records_archived.load(Ordering::Relaxed);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        // Per-shard lag: every shard when few, the three furthest behind otherwise.
        let mut lags: Vec<(String, i64)> = shards
            .iter()
            .filter(|(_, s)| s.state.load(Ordering::Relaxed) == 0)
            .map(|((_, shard), s)| (shard.clone(), s.millis_behind.load(Ordering::Relaxed)))
            .filter(|(_, l)| *l >= 0)
            .collect();
        lags.sort_by_key(|(_, l)| -*l);
        let lag_list: Vec<String> = lags
            .iter()
            .take(if lags.len() <= 6 { 6 } else { 3 })
            .map(|(s, l)| {
                format!(
                    "{}={:.1}s",
                    s.trim_start_matches("shardId-"),
                    *l as f64 / 1000.0
                )
            })
            .collect();
        format!(
            "read {} · archived {} records ({:.1} MB) in {} files · {:.0} rec/s · shards {} ({} finished) · max lag {}{}",
            self.records_read.load(Ordering::Relaxed),
            recs,
            self.bytes_archived.load(Ordering::Relaxed) as f64 / 1e6,
            self.files.load(Ordering::Relaxed),
            recs as f64 / secs,
            shards.len(),
            done,
            if max_lag < 0 {
                "?".to_string()
            } else {
                format!("{:.1}s", max_lag as f64 / 1000.0)
            },
            if lag_list.is_empty() {
                String::new()
            } else {
                format!(" [{}]", lag_list.join(" "))
            },
        )
    }
}

/// Show progress until `cancel`: a live line on a terminal, log lines otherwise.
pub fn spawn_progress(
    stats: Arc<Stats>,
    every: Duration,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new_spinner();
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            loop {
                bar.set_message(stats.line(started));
                bar.tick();
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
            bar.finish_and_clear();
        } else {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => tracing::info!("progress: {}", stats.line(started)),
                }
            }
        }
    })
}

/// Serve `GET /metrics` on `addr` until `cancel`. Returns the bound address.
pub async fn serve(
    stats: Arc<Stats>,
    addr: SocketAddr,
    cancel: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Io {
            path: format!("metrics endpoint {addr}").into(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Io {
        path: format!("metrics endpoint {addr}").into(),
        source,
    })?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let stats = stats.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4",
                    )],
                    stats.render_prometheus(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async move { cancel.cancelled().await })
            .await;
    });
    Ok(local)
}
