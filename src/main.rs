//! The `fluxcap` binary: parse arguments, set up logging, call one library
//! function per subcommand, map its error to an exit code and one message.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use fluxcap::archive::archiver::{self, ArchiveOptions};
use fluxcap::config::{self, Sources};
use fluxcap::{Error, Result};

/// Archive Kinesis streams to zstd Parquet, query them with SQL, replay them.
#[derive(Debug, Parser)]
#[command(name = "fluxcap", version, about)]
struct Cli {
    /// Configuration file with overrides of conf/defaults.toml.
    #[arg(long, short = 'c', global = true, env = "FLUXCAP_CONFIG")]
    config: Option<PathBuf>,
    /// Override `archive.location` (directory or s3://bucket/prefix).
    #[arg(long, global = true)]
    archive: Option<String>,
    /// Override `aws.region`.
    #[arg(long, global = true)]
    region: Option<String>,
    /// Set any configuration key, e.g. `--set archive.zstd_level=5` (repeatable).
    #[arg(long = "set", global = true, value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// More log output (-v info, -vv debug). FLUXCAP_LOG takes a full filter.
    #[arg(long, short, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show the effective configuration.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Archive every shard of the configured streams (until SIGINT/SIGTERM, or `--once`).
    Archive {
        /// Catch every shard up to its tip as of the start, commit, and exit.
        #[arg(long)]
        once: bool,
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// Share the streams with other `--shared` archivers, shard by shard
        /// (same as `archiver.shared = true`).
        #[arg(long)]
        shared: bool,
    },
    /// Per-shard archive state, lag and retention risk.
    Status {
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
    },
    /// Run SQL over archived and live records (`archive.S`, `live.S`, `S`).
    ///
    /// Without a query or -f, starts an interactive prompt on a terminal,
    /// or reads SQL from standard input.
    Sql {
        /// The SQL to run (one or more statements separated by `;`).
        query: Option<String>,
        /// Read SQL from this file (`-` for standard input).
        #[arg(long, short = 'f', value_name = "FILE")]
        file: Option<PathBuf>,
        /// Output format [default: table on a terminal, else json; or from -o's extension].
        #[arg(long, value_enum)]
        format: Option<fluxcap::query::output::Format>,
        /// Write the result to FILE (format from its extension: .json/.jsonl, .csv, .parquet).
        #[arg(long, short = 'o', value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Replay records into a Kinesis stream or a file: bounded, filtered,
    /// compacted, annotated, paced and resumable.
    Replay(Box<fluxcap::replay::ReplayOptions>),
    /// Print catalog DDL (Hive, Glue, Athena) or the Drill storage plugin for the archive.
    Catalog(fluxcap::cluster::catalog::CatalogOptions),
    /// EMR cluster resources for Drill and Hive over the archive.
    Cluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// Serve the HTTP API and web UI (search, replay, monitoring).
    Serve {
        /// Address to listen on [default: server.bind, 127.0.0.1:8080].
        #[arg(long, value_name = "ADDR")]
        bind: Option<String>,
    },
    /// Check the archive against its checkpoints: every gap or duplicate, per shard.
    Verify {
        /// Only this stream.
        #[arg(long)]
        stream: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Start each shard where the last verify proved it (kept in the
        /// store): only files after that are read.
        #[arg(long)]
        since_last: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterAction {
    /// Generate the Drill bootstrap action, Drill's storage plugins and the
    /// archive's Hive DDL, and upload them to `cluster.resources`.
    UploadResources {
        /// Write them to this local folder instead (to inspect them).
        #[arg(long, value_name = "DIR")]
        output_dir: Option<PathBuf>,
    },
    /// Launch an EMR cluster with Drill over the archive; prints its id.
    Launch,
    /// Clusters this tool launched that are not terminated.
    List {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Wait until the cluster is ready and Drill answers (checked over SSH on the primary node).
    Wait {
        /// Cluster id (j-…).
        id: String,
        /// Give up after this long.
        #[arg(long, default_value = "30m", value_parser = fluxcap::config::HumanDuration::parse)]
        timeout: fluxcap::config::HumanDuration,
        /// Do not wait for Drill (only for the cluster's state).
        #[arg(long)]
        skip_drill: bool,
    },
    /// Forward Drill's web UI and REST API (port 8047) and JDBC/ODBC port (31010) to localhost over SSH.
    Tunnel {
        /// Cluster id.
        id: String,
    },
    /// Open a shell on the primary node.
    Ssh {
        /// Cluster id.
        id: String,
    },
    /// Terminate a cluster (or every cluster this tool launched).
    Terminate {
        /// Cluster id.
        id: Option<String>,
        /// Every active cluster this tool launched.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigAction {
    /// Print the effective configuration (defaults + file + environment + flags) as TOML.
    Show,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Table,
    Json,
}

fn init_tracing(verbose: u8, quiet: bool) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "error",
        // The AWS SDK warns on every failed credential lookup; our own error says it once.
        (false, 0) => "fluxcap=info,warn,aws_config=error",
        (false, 1) => "fluxcap=debug,info",
        _ => "debug",
    };
    let filter = std::env::var("FLUXCAP_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn load_config(cli: &Cli) -> Result<config::Config> {
    let mut sources = Sources::from_env(cli.config.clone());
    if let Some(a) = &cli.archive {
        sources
            .overrides
            .push(("archive.location".into(), a.clone()));
    }
    if let Some(r) = &cli.region {
        sources.overrides.push(("aws.region".into(), r.clone()));
    }
    for kv in &cli.set {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Error::Usage(format!("--set expects KEY=VALUE, got {kv:?}")))?;
        sources
            .overrides
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    config::load(&sources)
}

/// Cancelled on the first SIGINT or SIGTERM.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutting down: flushing and committing (press Ctrl-C again to abort)");
        t.cancel();
        let _ = tokio::signal::ctrl_c().await;
        std::process::exit(130);
    });
    token
}

async fn run(cli: Cli) -> Result<()> {
    let cfg = load_config(&cli)?;
    match cli.command {
        Command::Config {
            action: ConfigAction::Show,
        } => {
            print!("{}", cfg.to_toml());
            Ok(())
        }
        Command::Archive {
            once,
            stream,
            shared,
        } => {
            let cancel = shutdown_token();
            let opts = ArchiveOptions {
                once,
                stream,
                shared: shared || cfg.archiver.shared,
            };
            let summary = archiver::run(&cfg, opts, cancel).await?;
            eprintln!(
                "archived {} records ({:.1} MB of payload) in {} files{}{}",
                summary.records,
                summary.bytes as f64 / 1e6,
                summary.files,
                if summary.invalid_json > 0 {
                    format!(
                        "; {} payloads were not valid JSON (archived as is)",
                        summary.invalid_json
                    )
                } else {
                    String::new()
                },
                if summary.retries > 0 {
                    format!("; {} calls retried", summary.retries)
                } else {
                    String::new()
                },
            );
            Ok(())
        }
        Command::Status { stream, format } => {
            let report = fluxcap::archive::status::status(&cfg, stream.as_deref()).await?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                ),
                Format::Table => print!("{}", report.to_table()),
            }
            Ok(())
        }
        Command::Sql {
            query,
            file,
            format,
            output,
        } => {
            fluxcap::query::cli::run(
                &cfg,
                fluxcap::query::cli::SqlArgs {
                    query,
                    file,
                    format,
                    output,
                },
            )
            .await
        }
        Command::Replay(opts) => fluxcap::replay::run(&cfg, *opts, shutdown_token()).await,
        Command::Catalog(opts) => {
            let text = fluxcap::cluster::catalog::generate(&cfg, &opts).await?;
            print!("{text}");
            Ok(())
        }
        Command::Cluster {
            action: ClusterAction::UploadResources { output_dir },
        } => {
            let written = fluxcap::cluster::resources::upload(&cfg, output_dir.as_deref()).await?;
            for w in &written {
                println!("{w}");
            }
            if output_dir.is_none() {
                let base = fluxcap::cluster::resources::base_url(&cfg)?;
                let mut args = fluxcap::cluster::resources::bootstrap_args(&cfg)?;
                if let Some(i) = args.iter().position(|a| a == "--sha256")
                    && args.get(i + 1).is_some_and(|v| v.is_empty())
                {
                    args[i + 1] = "<cluster.drill_sha256>".into();
                }
                eprintln!(
                    "bootstrap action: {base}/bootstrap-drill.sh {}",
                    args.join(" ")
                );
            }
            Ok(())
        }
        Command::Cluster {
            action: ClusterAction::Launch,
        } => {
            let id = fluxcap::cluster::emr::launch(&cfg).await?;
            println!("{id}");
            eprintln!("next: fluxcap cluster wait {id}   (then: fluxcap cluster tunnel {id})");
            Ok(())
        }
        Command::Cluster {
            action: ClusterAction::List { json },
        } => {
            let all = fluxcap::cluster::emr::list(&cfg).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
            } else {
                for c in &all {
                    println!(
                        "{:<18} {:<16} {:<14} {}",
                        c.id,
                        c.name,
                        c.state,
                        c.primary_dns.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(())
        }
        Command::Cluster {
            action:
                ClusterAction::Wait {
                    id,
                    timeout,
                    skip_drill,
                },
        } => {
            let c = fluxcap::cluster::emr::wait(&cfg, &id, timeout.0, skip_drill).await?;
            println!("{} {}", c.id, c.state);
            Ok(())
        }
        Command::Cluster {
            action: action @ (ClusterAction::Tunnel { .. } | ClusterAction::Ssh { .. }),
        } => {
            let (id, tunnel) = match action {
                ClusterAction::Tunnel { id } => (id, true),
                ClusterAction::Ssh { id } => (id, false),
                _ => return Ok(()),
            };
            let cmd = fluxcap::cluster::emr::ssh_command(&cfg, &id, tunnel).await?;
            if tunnel {
                eprintln!(
                    "Drill: http://localhost:8047/  (REST: POST http://localhost:8047/query.json), JDBC/ODBC: localhost:31010; Ctrl-C closes the tunnel"
                );
            }
            let status = std::process::Command::new(&cmd[0])
                .args(&cmd[1..])
                .status()
                .map_err(|e| Error::Io {
                    path: cmd[0].clone().into(),
                    source: e,
                })?;
            if !status.success() {
                return Err(Error::Usage(format!("{} exited with {status}", cmd[0])));
            }
            Ok(())
        }
        Command::Cluster {
            action: ClusterAction::Terminate { id, all },
        } => {
            let ids: Vec<String> = match (id, all) {
                (Some(id), _) => vec![id],
                (None, true) => fluxcap::cluster::emr::list(&cfg)
                    .await?
                    .into_iter()
                    .map(|c| c.id)
                    .collect(),
                (None, false) => {
                    return Err(Error::Usage(
                        "give a cluster id, or --all for every cluster this tool launched".into(),
                    ));
                }
            };
            fluxcap::cluster::emr::terminate(&cfg, &ids).await?;
            for id in &ids {
                println!("terminating {id}");
            }
            Ok(())
        }
        Command::Serve { bind } => {
            let cancel = shutdown_token();
            fluxcap::server::serve(&cfg, fluxcap::server::ServeOptions { bind }, cancel).await
        }
        Command::Verify {
            stream,
            format,
            since_last,
        } => {
            let opts = fluxcap::archive::verify::VerifyOptions { since_last };
            let report = fluxcap::archive::verify::verify(&cfg, stream.as_deref(), opts).await?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                ),
                Format::Table => print!("{}", report.to_text()),
            }
            if report.problems() > 0 {
                return Err(Error::VerifyFailed {
                    problems: report.problems(),
                });
            }
            Ok(())
        }
    }
}

/// glibc gives every thread its own malloc arena and rarely returns freed
/// memory from them; a few arenas keep the archiver's RSS close to its memory
/// budget. Its mmap threshold also grows with every large block freed (up to
/// 32 MiB), after which GetRecords responses and Parquet files of several
/// MiB are carved from the arenas and fragment them: a fixed threshold keeps
/// large blocks in their own mappings, returned to the system when freed
/// (measured: peak RSS of `tests/it/memory_budget.rs` 95 → 77 MiB).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1024 * 1024);
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    init_tracing(cli.verbose, cli.quiet);
    // Blocking threads (local-directory I/O, encoding, fsync) are few: with
    // hundreds of shards flushing at once, tokio's default of up to 512 threads
    // would hold a stack and allocator caches each, outside the memory budget.
    let blocking = std::thread::available_parallelism().map_or(2, |n| n.get()) * 8;
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking.max(16))
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
