//! Where a run's records go: the Kinesis writer (acknowledgements come back
//! on a channel), a JSON-lines file or standard output (a line counts as
//! sent once it is written through), or nowhere for a dry run (counted per
//! target shard).

use std::io::Write;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Run, share};
use crate::error::{Error, Result};
use crate::kinesis::writer::{Ack, ShardStats, TargetShards, Writer, WriterSettings};
use crate::replay::acks::Range;
use crate::replay::target::Target;

/// The open target of a run.
pub(in crate::replay) enum Sink {
    /// PutRecords into a stream, one sender per target shard.
    Kinesis {
        writer: Writer,
        acks: mpsc::UnboundedReceiver<Ack>,
        ack_tx: mpsc::UnboundedSender<Ack>,
    },
    /// Counted only, per target shard.
    DryRun {
        shards: Option<TargetShards>,
        per_shard: Vec<ShardStats>,
    },
    /// JSON lines into a file or standard output.
    Lines {
        out: std::io::BufWriter<Box<dyn Write + Send>>,
        path: Option<std::path::PathBuf>,
        /// Bytes written to `out` (buffered ones included).
        offset: u64,
        /// Records whose line is still in `out`'s buffer: (ordinal, size,
        /// offset after the line).
        pending: Vec<(u64, usize, u64)>,
    },
}

/// What writing to a line target can end in.
pub(super) enum LineError {
    /// The reader went away.
    Closed,
    /// Any other failure.
    Io(std::io::Error),
}

impl From<std::io::Error> for LineError {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            LineError::Closed
        } else {
            LineError::Io(e)
        }
    }
}

impl Run {
    pub(super) async fn sink(&mut self) -> Result<Sink> {
        let resume_offset = self.progress.file_offset.unwrap_or(0);
        match &self.target {
            Target::Kinesis(name) => {
                let mut c = self.cfg.clone();
                let r = &self.cfg.replay;
                if let Some(x) = &r.target_region {
                    c.aws.region = x.clone();
                }
                if let Some(x) = &r.target_profile {
                    c.aws.profile = Some(x.clone());
                }
                if let Some(x) = &r.target_endpoint {
                    c.aws.kinesis_endpoint = Some(x.clone());
                }
                let client = crate::kinesis::client(&c).await;
                let shards =
                    TargetShards::discover(&client, name, self.cfg.archiver.max_backoff.0).await?;
                if self.opts.dry_run {
                    let per_shard = shards
                        .shards
                        .iter()
                        .map(|s| ShardStats {
                            shard_id: s.shard_id.clone(),
                            ..Default::default()
                        })
                        .collect();
                    return Ok(Sink::DryRun {
                        shards: Some(shards),
                        per_shard,
                    });
                }
                self.mark.set_ranges(
                    shards
                        .shards
                        .iter()
                        .map(|s| Range {
                            shard_id: s.shard_id.clone(),
                            start: s.start,
                            end: s.end,
                        })
                        .collect(),
                );
                let (ack_tx, acks) = mpsc::unbounded_channel();
                let settings = WriterSettings {
                    shard_records_per_sec: r.shard_records_per_second,
                    shard_bytes_per_sec: r.shard_bytes_per_second.0,
                    rate: self.manifest.rate,
                    max_attempts: r.retry_attempts,
                    max_backoff: self.cfg.archiver.max_backoff.0,
                    share: share(&self.cfg, &self.manifest, &self.target),
                    unordered: self.manifest.unordered,
                };
                let writer = Writer::start(
                    client,
                    name,
                    shards,
                    settings,
                    ack_tx.clone(),
                    CancellationToken::new(),
                );
                Ok(Sink::Kinesis {
                    writer,
                    acks,
                    ack_tx,
                })
            }
            _ if self.opts.dry_run => Ok(Sink::DryRun {
                shards: None,
                per_shard: vec![ShardStats {
                    shard_id: self.manifest.target.clone(),
                    ..Default::default()
                }],
            }),
            Target::File(path) => {
                let io = |e| Error::Io {
                    path: path.clone(),
                    source: e,
                };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(self.start == 0)
                    .open(path)
                    .map_err(io)?;
                if self.start > 0 {
                    // Drop whatever was written after the last saved progress.
                    f.set_len(resume_offset).map_err(io)?;
                }
                let mut f = f;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(resume_offset)).map_err(io)?;
                Ok(Sink::Lines {
                    out: std::io::BufWriter::with_capacity(1 << 20, Box::new(f)),
                    path: Some(path.clone()),
                    offset: resume_offset,
                    pending: Vec::new(),
                })
            }
            Target::Stdout => Ok(Sink::Lines {
                out: std::io::BufWriter::with_capacity(1 << 16, Box::new(std::io::stdout())),
                path: None,
                offset: 0,
                pending: Vec::new(),
            }),
        }
    }

    /// The lines in `pending` are written through: acknowledge them.
    pub(super) fn acked_lines(&mut self, pending: &mut Vec<(u64, usize, u64)>, file: bool) {
        for (idx, size, end) in pending.drain(..) {
            self.sent_records += 1;
            self.sent_bytes += size as u64;
            self.mark.ack(idx, size);
            if file {
                self.progress.file_offset = Some(end);
            }
        }
    }
}
