//! Writing query results: an aligned table, JSON lines, CSV or Parquet.
//!
//! Payload columns are bytes. The table shows them as text (invalid UTF-8
//! shown as U+FFFD) because that is what a person wants to read; JSON lines
//! and CSV carry them as standard base64 so that nothing is lost; Parquet
//! keeps them binary.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use base64::Engine;
use datafusion::execution::SendableRecordBatchStream;
use futures::StreamExt;

use crate::error::{Error, Result};

/// An output format of `fluxcap sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Aligned columns, for a terminal.
    Table,
    /// One JSON object per line.
    Json,
    /// Comma-separated values with a header line.
    Csv,
    /// A Parquet file (needs `-o FILE`).
    Parquet,
}

impl Format {
    /// The format a file name implies, if any.
    pub fn from_path(p: &Path) -> Option<Format> {
        match p.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "json" | "jsonl" | "ndjson" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "parquet" | "pq" => Some(Format::Parquet),
            "txt" => Some(Format::Table),
            _ => None,
        }
    }
}

/// How binary columns are turned into text.
#[derive(Debug, Clone, Copy)]
enum BinaryAs {
    Text,
    Base64,
}

fn binary_to_string(batch: &RecordBatch, how: BinaryAs) -> Result<RecordBatch> {
    let schema = batch.schema();
    if !schema.fields().iter().any(|f| is_binary(f.data_type())) {
        return Ok(batch.clone());
    }
    let mut fields = Vec::with_capacity(schema.fields().len());
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for (f, c) in schema.fields().iter().zip(batch.columns()) {
        if !is_binary(f.data_type()) {
            fields.push(f.as_ref().clone());
            cols.push(c.clone());
            continue;
        }
        let mut b = StringBuilder::with_capacity(c.len(), 0);
        let mut push = |v: Option<&[u8]>| match v {
            None => b.append_null(),
            Some(bytes) => match how {
                BinaryAs::Text => b.append_value(String::from_utf8_lossy(bytes)),
                BinaryAs::Base64 => {
                    b.append_value(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
            },
        };
        match c.data_type() {
            DataType::Binary => c.as_binary::<i32>().iter().for_each(&mut push),
            DataType::LargeBinary => c.as_binary::<i64>().iter().for_each(&mut push),
            DataType::BinaryView => c.as_binary_view().iter().for_each(&mut push),
            _ => {}
        }
        fields.push(Field::new(f.name(), DataType::Utf8, f.is_nullable()));
        cols.push(Arc::new(b.finish()));
    }
    Ok(RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?)
}

/// `batch` with binary columns as base64 text (for JSON and CSV).
pub fn base64_binary(batch: &RecordBatch) -> Result<RecordBatch> {
    binary_to_string(batch, BinaryAs::Base64)
}

/// `schema` with view types replaced by their plain equivalents.
fn plain_schema(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| {
                let t = match f.data_type() {
                    DataType::Utf8View => DataType::Utf8,
                    DataType::BinaryView => DataType::Binary,
                    other => other.clone(),
                };
                f.as_ref().clone().with_data_type(t)
            })
            .collect::<Vec<_>>(),
    ))
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView
    )
}

fn io_err(path: &str, e: std::io::Error) -> Error {
    Error::Io {
        path: path.into(),
        source: e,
    }
}

/// Where results go.
pub enum Sink {
    /// Standard output.
    Stdout,
    /// A file (created or truncated).
    File(std::path::PathBuf),
}

impl Sink {
    fn name(&self) -> String {
        match self {
            Sink::Stdout => "<stdout>".into(),
            Sink::File(p) => p.display().to_string(),
        }
    }

    fn open(&self) -> Result<Box<dyn Write + Send>> {
        Ok(match self {
            Sink::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            Sink::File(p) => Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).map_err(|e| io_err(&p.display().to_string(), e))?,
            )),
        })
    }
}

/// A spinner on stderr while a query runs (elapsed time, rows so far), shown
/// only when stderr is a terminal and results do not stream to that terminal.
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A spinner if it would not interleave with results on the terminal.
    pub fn new(format: Format, sink: &Sink) -> Self {
        use std::io::IsTerminal;
        let results_on_terminal = matches!(sink, Sink::Stdout)
            && format != Format::Table
            && std::io::stdout().is_terminal();
        if !std::io::stderr().is_terminal() || results_on_terminal {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}") {
            bar.set_style(style);
        }
        bar.set_message("running");
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress(Some(bar))
    }

    fn rows(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.set_message(format!("{n} rows"));
        }
    }

    /// Remove the spinner (before results or the summary line are printed).
    pub fn clear(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.clear();
    }
}

enum TextWriter {
    Json(arrow::json::Writer<Box<dyn Write + Send>, arrow::json::writer::LineDelimited>),
    Csv(Box<arrow::csv::Writer<Box<dyn Write + Send>>>),
}

/// Write every batch of `stream` to `sink` in `format`; returns the row count.
/// A closed standard output (`| head`) ends the output quietly.
pub async fn write(
    mut stream: SendableRecordBatchStream,
    format: Format,
    sink: &Sink,
    progress: &Progress,
    on_error: impl Fn(datafusion::error::DataFusionError) -> Error,
) -> Result<u64> {
    let schema: SchemaRef = stream.schema();
    let name = sink.name();
    let mut rows = 0u64;
    let broken = |e: &std::io::Error| e.kind() == std::io::ErrorKind::BrokenPipe;
    match format {
        Format::Table => {
            let mut batches = Vec::new();
            while let Some(b) = stream.next().await {
                let b = b.map_err(&on_error)?;
                rows += b.num_rows() as u64;
                progress.rows(rows);
                batches.push(binary_to_string(&b, BinaryAs::Text)?);
            }
            if batches.is_empty() {
                let empty = RecordBatch::new_empty(schema.clone());
                batches.push(binary_to_string(&empty, BinaryAs::Text)?);
            }
            let text = arrow::util::pretty::pretty_format_batches(&batches)?;
            progress.clear();
            let mut w = sink.open()?;
            if let Err(e) = writeln!(w, "{text}").and_then(|_| w.flush())
                && !broken(&e)
            {
                return Err(io_err(&name, e));
            }
        }
        Format::Json | Format::Csv => {
            let w = sink.open()?;
            let mut out = if format == Format::Json {
                TextWriter::Json(
                    arrow::json::WriterBuilder::new()
                        .with_explicit_nulls(true)
                        .build::<_, arrow::json::writer::LineDelimited>(w),
                )
            } else {
                TextWriter::Csv(Box::new(
                    arrow::csv::WriterBuilder::new().with_header(true).build(w),
                ))
            };
            while let Some(b) = stream.next().await {
                let b = b.map_err(&on_error)?;
                rows += b.num_rows() as u64;
                progress.rows(rows);
                let b = binary_to_string(&b, BinaryAs::Base64)?;
                let r = match &mut out {
                    TextWriter::Json(j) => j.write(&b),
                    TextWriter::Csv(c) => c.write(&b),
                };
                match r {
                    Ok(()) => {}
                    Err(arrow::error::ArrowError::IoError(_, e)) if broken(&e) => return Ok(rows),
                    Err(e) => return Err(e.into()),
                }
            }
            let flushed = match out {
                TextWriter::Json(mut j) => j
                    .finish()
                    .map_err(std::io::Error::other)
                    .and_then(|_| j.into_inner().flush()),
                TextWriter::Csv(c) => c.into_inner().flush(),
            };
            match flushed {
                Err(e) if !broken(&e) => return Err(io_err(&name, e)),
                _ => {}
            }
        }
        Format::Parquet => {
            let Sink::File(path) = sink else {
                return Err(Error::Usage(
                    "Parquet output needs a file: use -o FILE.parquet".into(),
                ));
            };
            // View types are an in-memory detail: files get plain BINARY/UTF8
            // columns (and embedded Arrow types) that every reader knows.
            let schema = plain_schema(&schema);
            let file = std::fs::File::create(path).map_err(|e| io_err(&name, e))?;
            let props = parquet::file::properties::WriterProperties::builder()
                .set_compression(parquet::basic::Compression::ZSTD(
                    parquet::basic::ZstdLevel::default(),
                ))
                .build();
            let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props))
                .map_err(|e| Error::Parquet {
                    object: name.clone(),
                    source: e,
                })?;
            while let Some(b) = stream.next().await {
                let b = b.map_err(&on_error)?;
                rows += b.num_rows() as u64;
                progress.rows(rows);
                let cols = b
                    .columns()
                    .iter()
                    .zip(schema.fields())
                    .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let b = RecordBatch::try_new(schema.clone(), cols)?;
                w.write(&b).map_err(|e| Error::Parquet {
                    object: name.clone(),
                    source: e,
                })?;
            }
            w.close().map_err(|e| Error::Parquet {
                object: name.clone(),
                source: e,
            })?;
        }
    }
    Ok(rows)
}
