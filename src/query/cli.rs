//! `fluxcap sql`: run SQL from the command line, a file, standard input, or
//! an interactive prompt (history, multi-line statements ended by `;`).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::time::Instant;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::query::output::{self, Format, Sink};
use crate::query::{QuerySession, session};

/// Arguments of `fluxcap sql`.
#[derive(Debug, Default)]
pub struct SqlArgs {
    /// SQL given on the command line.
    pub query: Option<String>,
    /// A file of SQL statements (`-` for standard input).
    pub file: Option<PathBuf>,
    /// Output format; default from `-o`'s extension, else a table on a
    /// terminal and JSON lines otherwise.
    pub format: Option<Format>,
    /// Write results to this file instead of standard output.
    pub output: Option<PathBuf>,
}

/// Run `fluxcap sql`.
pub async fn run(cfg: &Config, args: SqlArgs) -> Result<()> {
    let text = match (&args.query, &args.file) {
        (Some(_), Some(_)) => {
            return Err(Error::Usage(
                "give either a query or -f FILE, not both".into(),
            ));
        }
        (Some(q), None) => Some(q.clone()),
        (None, Some(f)) if f.as_os_str() == "-" => Some(read_stdin()?),
        (None, Some(f)) => Some(std::fs::read_to_string(f).map_err(|e| Error::Io {
            path: f.clone(),
            source: e,
        })?),
        (None, None) if std::io::stdin().is_terminal() => None,
        (None, None) => Some(read_stdin()?),
    };
    let format = match (args.format, &args.output) {
        (Some(f), _) => f,
        (None, Some(p)) => Format::from_path(p).ok_or_else(|| {
            Error::Usage(format!(
                "cannot tell the format of {} from its extension: add --format table|json|csv|parquet",
                p.display()
            ))
        })?,
        (None, None) if std::io::stdout().is_terminal() => Format::Table,
        (None, None) => Format::Json,
    };
    let sink = match &args.output {
        Some(p) => Sink::File(p.clone()),
        None => Sink::Stdout,
    };
    let session = session(cfg).await?;
    match text {
        Some(sql) => {
            let statements = session.parse(&sql).await?;
            if statements.is_empty() {
                return Err(Error::Usage("no SQL statement given".into()));
            }
            if statements.len() > 1 && args.output.is_some() {
                return Err(Error::Usage(
                    "-o writes the result of one statement; the input has several".into(),
                ));
            }
            for s in statements {
                run_one(&session, s, format, &sink).await?;
            }
            Ok(())
        }
        None => repl(&session, format, &sink).await,
    }
}

fn read_stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .map_err(|e| Error::Io {
            path: "<stdin>".into(),
            source: e,
        })?;
    Ok(s)
}

/// Plan and run one statement, then report rows and time on stderr.
async fn run_one(
    session: &QuerySession,
    statement: datafusion::sql::parser::Statement,
    format: Format,
    sink: &Sink,
) -> Result<u64> {
    let started = Instant::now();
    let progress = output::Progress::new(format, sink);
    let df = session.plan(statement).await?;
    let stream = df.execute_stream().await.map_err(|e| session.error(e))?;
    let rows = output::write(stream, format, sink, &progress, |e| session.error(e)).await?;
    progress.clear();
    eprintln!(
        "{rows} row{} in {:.3} s",
        if rows == 1 { "" } else { "s" },
        started.elapsed().as_secs_f64()
    );
    Ok(rows)
}

fn history_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    let dir = base.join("fluxcap");
    std::fs::create_dir_all(&dir).ok()?;
    Some(dir.join("sql_history"))
}

const HELP: &str = "\
Statements end with `;` and may span lines. Tables:
  archive.<stream>   archived records      live.<stream>   records not archived yet
  <stream>           both, each record once
Columns: shard_id, sequence_number, subsequence_number, partition_key,
  explicit_hash_key, approximate_arrival_timestamp, data, dt, hr
Payloads: text(data), json_get_str(data, 'field'), data->>'field', json_get_int(...)
Commands: \\d (list tables), \\q (quit), \\? (this help). Ctrl-C cancels, Ctrl-D quits.";

/// The interactive prompt.
async fn repl(session: &QuerySession, format: Format, sink: &Sink) -> Result<()> {
    use rustyline::error::ReadlineError;
    let mut editor = rustyline::DefaultEditor::new()
        .map_err(|e| Error::Usage(format!("cannot start the interactive prompt: {e}")))?;
    let history = history_file();
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    eprintln!(
        "fluxcap sql — tables: {}. \\? for help.",
        session.tables.join(", ")
    );
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "fluxcap> "
        } else {
            "      -> "
        };
        let line = tokio::task::block_in_place(|| editor.readline(prompt));
        match line {
            Ok(line) => {
                let t = line.trim();
                if buffer.is_empty() {
                    match t {
                        "" => continue,
                        "\\q" | "quit" | "exit" => break,
                        "\\?" | "help" => {
                            eprintln!("{HELP}");
                            continue;
                        }
                        "\\d" => {
                            for t in &session.tables {
                                println!("{t}");
                            }
                            continue;
                        }
                        _ => {}
                    }
                }
                buffer.push_str(&line);
                buffer.push('\n');
                if !t.ends_with(';') {
                    continue;
                }
                let sql = std::mem::take(&mut buffer);
                let _ = editor.add_history_entry(sql.trim());
                let statements = match session.parse(&sql).await {
                    Ok(s) => s,
                    Err(e) => {
                        eprintln!("error: {e}");
                        continue;
                    }
                };
                for s in statements {
                    tokio::select! {
                        r = run_one(session, s, format, sink) => {
                            if let Err(e) = r {
                                eprintln!("error: {e}");
                                break;
                            }
                        }
                        _ = tokio::signal::ctrl_c() => {
                            eprintln!("cancelled");
                            break;
                        }
                    }
                }
            }
            Err(ReadlineError::Interrupted) => buffer.clear(),
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                return Err(Error::Usage(format!("interactive prompt failed: {e}")));
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}
