//! SQL over archived and live records, on an embedded DataFusion.
//!
//! For each configured stream `S` the session has three tables, all with the
//! record columns plus the partition columns `dt` and `hr`:
//!
//! * `archive.S` — the committed Parquet files ([`archive_table`]);
//! * `live.S` — the records in Kinesis that are not archived yet ([`live`]);
//! * `S` — both, as one table with every record exactly once.
//!
//! ## Why `S` has no duplicates and no gaps
//!
//! Each scan of `S` reads the stream's checkpoints once ([`Snapshot`]) and
//! splits every shard's sequence space at its committed position `P`:
//!
//! ```text
//!   shard records:  r1 r2 … rP │ rP+1 … tip
//!                   ───────────┼──────────────
//!   archive.S:      files whose first record ≤ P (committed flushes only)
//!   live.S:                    │ GetRecords from just after P to the tip
//!                              │ (records that arrived before the query started)
//! ```
//!
//! An archiver committing a flush `P → Q` during the query writes files whose
//! first record is after `P`, so the archive side ignores them and the live
//! side reads those records from Kinesis instead: a record is de-duplicated on
//! its (shard_id, sequence_number, subsequence_number) by construction, with
//! no second copy of any data and no hash table over the result. Files of a
//! crashed, unrecovered flush also start after `P` and are ignored the same way.
//!
//! The session is read-only: DDL, DML (`INSERT`, `COPY`), and statements such
//! as `SET` are refused after parsing and planning, before anything runs.
//! Statements are parsed and planned within the limits of [`guard`] (length,
//! nesting depth, on a thread with a large stack).

pub mod archive_table;
pub mod bounds;
pub mod cli;
pub mod guard;
pub mod json;
pub mod json_fuse;
pub mod live;
pub mod ordered_agg;
pub mod origin;
pub mod output;
pub mod snapshot;
pub mod tail_reader;
pub mod view;

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{MemorySchemaProvider, SchemaProvider, Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::error::DataFusionError;
use datafusion::execution::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, LogicalPlan, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::union::UnionExec;
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{DFParser, Statement};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;

use crate::archive::store::Archive;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::query::archive_table::ArchiveTable;
use crate::query::live::{LiveSettings, LiveTable};
use crate::record;

pub use snapshot::Snapshot;
pub use view::View;

/// The URL the archive's object store is registered under.
const STORE_URL: &str = "fluxcap://archive";

/// A SQL session over the configured streams.
pub struct QuerySession {
    /// The DataFusion context (catalog, functions, object store).
    pub ctx: SessionContext,
    /// Every table, qualified as SQL names it (`archive.orders`, `live.orders`, `orders`).
    pub tables: Vec<String>,
    /// Length and depth limits of statements (`query.max_statement_bytes`, `query.max_expression_depth`).
    pub limits: guard::StatementLimits,
    /// The one view every statement shares ([`SessionOptions::pinned`]);
    /// `None`: each statement gets its own.
    pub view: Option<Arc<View>>,
    /// The archive the session reads.
    pub archive: Archive,
    /// The Kinesis client of live reads.
    pub kinesis: crate::kinesis::Client,
    /// `archiver.max_backoff`, for ListShards.
    max_backoff: std::time::Duration,
}

/// Build the session and catalog for `cfg`: the one place the CLI, replay and
/// the HTTP server get their SQL engine from.
pub async fn session(cfg: &Config) -> Result<QuerySession> {
    session_with(cfg, &SessionOptions::default()).await
}

/// What differs between sessions of the same configuration.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Read live records as of this time (epoch ms) instead of each scan's
    /// start: a replay fixes it once so that a resumed run selects the same
    /// records.
    pub as_of_ms: Option<i64>,
    /// Build a session even when no stream is configured (replay of Parquet files).
    pub streams_optional: bool,
    /// The archive to read (`None`: opened from the configuration).
    pub archive: Option<Archive>,
    /// The Kinesis client for live records (`None`: built from the configuration).
    pub kinesis: Option<aws_sdk_kinesis::Client>,
    /// The HTTP server's limits (`None`: the CLI's, i.e. `query.memory_limit` and no others).
    pub server: Option<ServerLimits>,
    /// Every statement of the session sees one view ([`View`]): one
    /// checkpoint snapshot per stream, one horizon and one live read (a
    /// replay). Otherwise each statement gets its own.
    pub pinned: bool,
    /// The time (epoch ms) that `now()`, `current_timestamp`, `current_date`,
    /// `current_time` and `today()` return in every statement, instead of
    /// each statement's start: a replay pins them to its own start so that
    /// a resumed run selects the same records.
    pub now_ms: Option<i64>,
}

/// What the server's session limits beyond the CLI's.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Memory of all queries of the session, bytes (0: no limit).
    pub memory_limit: u64,
    /// Allow `WITH RECURSIVE`.
    pub recursive_ctes: bool,
    /// Most rows of one `range()`/`generate_series()` call.
    pub max_series_rows: u64,
}

/// [`session`] with options.
pub async fn session_with(cfg: &Config, opts: &SessionOptions) -> Result<QuerySession> {
    let archive = match &opts.archive {
        Some(a) => a.clone(),
        None => Archive::open(cfg).await?,
    };
    let client = match &opts.kinesis {
        Some(c) => c.clone(),
        None => crate::kinesis::client(cfg).await,
    };
    let streams = if opts.streams_optional && cfg.streams.is_empty() {
        Vec::new()
    } else {
        cfg.selected_streams(None)?
    };
    let q = &cfg.query;
    // Four partitions per core by default: archives are many small files, and
    // while one partition opens a file and reads its footer another decodes
    // (measured: 2 partitions on 2 cores are ~1.3x slower than 8 on the
    // scripts/bench-query archive).
    let partitions = if q.target_partitions == 0 {
        4 * std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        q.target_partitions
    };
    let memory_limit = opts.server.map_or(q.memory_limit.0, |s| s.memory_limit);
    let mut options = engine_options()?;
    if let Some(s) = &opts.server {
        options.execution.enable_recursive_ctes = s.recursive_ctes;
    }
    if memory_limit > 0
        && std::env::var_os("DATAFUSION_EXECUTION_SORT_SPILL_RESERVATION_BYTES").is_none()
    {
        // Every sorting partition reserves this much up front for merging
        // its spills; the default (10 MB) times many partitions can exceed a
        // small pool before anything spills.
        let per = (memory_limit as usize / (4 * partitions)).clamp(256 * 1024, 10 << 20);
        options.execution.sort_spill_reservation_bytes = per;
    }
    let view = opts
        .pinned
        .then(|| Arc::new(View::new(opts.as_of_ms, true)));
    let mut config = SessionConfig::from(options)
        .with_target_partitions(partitions)
        .with_information_schema(true);
    if let Some(v) = &view {
        config = config.with_extension(v.clone());
    }
    if let Some(t) = opts.as_of_ms {
        config = config.with_extension(Arc::new(AsOf(t)));
    }
    if let Some(t) = opts.now_ms {
        config = config.with_extension(Arc::new(PinnedNow(t)));
    }
    let mut runtime = RuntimeEnvBuilder::new();
    if memory_limit > 0 {
        runtime = runtime.with_memory_limit(memory_limit as usize, 1.0);
    }
    let runtime = runtime.build_arc().map_err(|e| Error::Query {
        message: e.to_string(),
    })?;
    let ctx = SessionContext::new_with_config_rt(config, runtime);
    let url = ObjectStoreUrl::parse(STORE_URL).map_err(|e| Error::Query {
        message: e.to_string(),
    })?;
    ctx.register_object_store(
        url.as_ref(),
        Arc::new(crate::archive::store::StagedFallback(archive.store.clone())),
    );
    ctx.register_udf(bounds::seq_range_udf());
    ctx.register_udf(datafusion::logical_expr::ScalarUDF::new_from_impl(
        origin::OriginFn::new(&cfg.replay.annotation_field),
    ));
    json::register(&ctx).map_err(|e| Error::Query {
        message: format!("registering JSON functions: {e}"),
    })?;
    // first_value/last_value with an ORDER BY: a grouped accumulator
    // comparing keys as bytes (see ordered_agg).
    ordered_agg::register(&ctx);
    if let Some(s) = &opts.server {
        for name in ["range", "generate_series"] {
            let inner = ctx.table_function(name).map_err(|e| Error::Query {
                message: format!("the engine has no {name}(): {e}"),
            })?;
            ctx.register_udtf(
                name,
                Arc::new(guard::BoundedSeries {
                    inner: inner.function().clone(),
                    name,
                    max_rows: s.max_series_rows,
                }),
            );
        }
    }

    let settings = LiveSettings {
        limit: cfg.archiver.max_records_per_call,
        max_backoff: cfg.archiver.max_backoff.0,
        attempts: q.live_retry_attempts,
        read_share: q.live_read_share,
    };
    let archive_schema = Arc::new(MemorySchemaProvider::new());
    let live_schema = Arc::new(MemorySchemaProvider::new());
    let mut tables = Vec::new();
    let register = |schema: &dyn SchemaProvider, name: &str, t: Arc<dyn TableProvider>| {
        schema
            .register_table(name.to_string(), t)
            .map(|_| ())
            .map_err(|e| Error::Query {
                message: format!("registering table {name}: {e}"),
            })
    };
    for s in &streams {
        let archived = Arc::new(ArchiveTable::new(archive.clone(), &s.name, url.clone()));
        let live = Arc::new(LiveTable::new(client.clone(), &s.name, settings.clone()));
        let table = |side| -> Arc<dyn TableProvider> {
            Arc::new(StreamTable {
                archive: archive.clone(),
                stream: s.name.clone(),
                side,
                archived: archived.clone(),
                live: live.clone(),
            })
        };
        let field = cfg.replay.annotation_field.as_str();
        let view = |side| origin::view(&s.name, table(side), field);
        register(archive_schema.as_ref(), &s.name, view(Side::Archive)?)?;
        register(live_schema.as_ref(), &s.name, view(Side::Live)?)?;
        ctx.register_table(s.name.as_str(), view(Side::Both)?)
            .map_err(|e| Error::Query {
                message: format!("registering table {}: {e}", s.name),
            })?;
        tables.push(format!("archive.{}", quote(&s.name)));
        tables.push(format!("live.{}", quote(&s.name)));
        tables.push(quote(&s.name));
    }
    let catalog = ctx.catalog("datafusion").ok_or_else(|| Error::Query {
        message: "the default catalog is missing".into(),
    })?;
    for (name, schema) in [("archive", archive_schema), ("live", live_schema)] {
        catalog
            .register_schema(name, schema)
            .map_err(|e| Error::Query {
                message: format!("registering schema {name}: {e}"),
            })?;
    }
    Ok(QuerySession {
        ctx,
        tables,
        limits: guard::StatementLimits {
            max_bytes: usize::try_from(q.max_statement_bytes.0).unwrap_or(usize::MAX),
            max_depth: q.max_expression_depth,
        },
        view,
        archive,
        kinesis: client,
        max_backoff: cfg.archiver.max_backoff.0,
    })
}

/// DataFusion settings that differ from its defaults. Any engine setting can
/// still be changed from the environment (`DATAFUSION_EXECUTION_BATCH_SIZE`
/// for `datafusion.execution.batch_size`), which wins over these.
const ENGINE_DEFAULTS: &[(&str, &str)] = &[
    // Evaluate filters while decoding, so columns are decoded only for rows
    // that pass (point lookups by partition_key do not decode payloads).
    ("datafusion.execution.parquet.pushdown_filters", "true"),
    ("datafusion.execution.parquet.reorder_filters", "true"),
];

fn engine_options() -> Result<datafusion::config::ConfigOptions> {
    let bad = |e: DataFusionError| Error::Config {
        file: "environment (DATAFUSION_*)".into(),
        key: "datafusion".into(),
        message: e.strip_backtrace(),
    };
    let mut opts = datafusion::config::ConfigOptions::from_env().map_err(bad)?;
    for (key, value) in ENGINE_DEFAULTS {
        if std::env::var_os(key.to_uppercase().replace('.', "_")).is_none() {
            opts.set(key, value).map_err(bad)?;
        }
    }
    Ok(opts)
}

/// A name as SQL must write it (quoted unless it is a plain lower-case identifier).
pub fn quote(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// What the session refuses.
fn read_only() -> SQLOptions {
    SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false)
}

impl QuerySession {
    /// Split `sql` into statements (errors carry the parser's line and column).
    /// The PostgreSQL dialect gives `->`/`->>` their usual precedence over `=`.
    /// Too long or too deeply nested statements are refused ([`guard`]).
    pub async fn parse(&self, sql: &str) -> Result<Vec<Statement>> {
        self.limits.check_length(sql)?;
        let limits = self.limits;
        let tables = self.tables.clone();
        let sql = sql.to_string();
        guard::on_big_stack(move |_| {
            let statements: Vec<Statement> =
                DFParser::parse_sql_with_dialect(&sql, &PostgreSqlDialect {})
                    .map(|v| v.into_iter().collect())
                    .map_err(|e| query_error(e, &tables))?;
            for s in &statements {
                // A refused tree is dropped here, on the large stack.
                guard::check_depth(s, limits.max_depth)?;
            }
            Ok(statements)
        })
        .await
    }

    /// Plan one statement (on the large stack), refusing anything that is not a read.
    pub async fn plan(&self, statement: Statement) -> Result<DataFrame> {
        let mut state = self.ctx.state();
        pin_now(&mut state);
        let tables = self.tables.clone();
        let max_depth = self.limits.max_depth;
        let (plan, text) = guard::on_big_stack(move |rt| {
            guard::check_depth(&statement, max_depth)?;
            let text = statement.to_string();
            let plan = rt
                .block_on(state.statement_to_plan(statement))
                .map_err(|e| query_error(e, &tables))?;
            Ok((plan, text))
        })
        .await?;
        if let Err(e) = read_only().verify_plan(&plan) {
            return Err(Error::ReadOnly {
                statement: first_words(&text),
                message: e.strip_backtrace(),
            });
        }
        if matches!(plan, LogicalPlan::Statement(_)) {
            return Err(Error::ReadOnly {
                statement: first_words(&text),
                message: "statements that change the session are not allowed".into(),
            });
        }
        // Queries only from here (DDL and statements were refused above):
        // the statement runs on a copy of the session state that carries its view.
        let mut state = self.ctx.state();
        pin_now(&mut state);
        if self.view.is_none() {
            state
                .config_mut()
                .set_extension(Arc::new(View::new(self.as_of_ms(), false)));
        }
        Ok(DataFrame::new(state, plan))
    }

    /// The live horizon of a new statement's view.
    fn as_of_ms(&self) -> Option<i64> {
        self.ctx
            .state()
            .config()
            .get_extension::<AsOf>()
            .map(|a| a.0)
    }

    /// The checkpoint snapshot of `stream` that the session's statements
    /// see: the pinned view's, or a fresh one.
    pub async fn snapshot(&self, stream: &str) -> Result<Arc<Snapshot>> {
        match &self.view {
            Some(v) => v.snapshot(&self.archive, stream).await,
            None => Ok(Arc::new(Snapshot::load(&self.archive, stream).await?)),
        }
    }

    /// The shards of `stream` in Kinesis as the session's statements see
    /// them (`None`: the stream does not exist).
    pub async fn shards(
        &self,
        stream: &str,
    ) -> Result<Option<Arc<Vec<crate::kinesis::shards::ShardInfo>>>> {
        match &self.view {
            Some(v) => v.shards(&self.kinesis, stream, self.max_backoff).await,
            None => {
                View::new(None, false)
                    .shards(&self.kinesis, stream, self.max_backoff)
                    .await
            }
        }
    }

    /// One SQL statement to a DataFrame.
    pub async fn sql(&self, sql: &str) -> Result<DataFrame> {
        let mut statements = self.parse(sql).await?;
        if statements.len() != 1 {
            return Err(Error::Sql {
                message: format!("expected one SQL statement, got {}", statements.len()),
            });
        }
        let s = statements.remove(0);
        self.plan(s).await
    }

    /// Turn an engine error into ours: syntax and planning errors are the
    /// user's to fix (an unknown table lists the tables that exist);
    /// failures while running keep the engine's message.
    pub fn error(&self, e: DataFusionError) -> Error {
        query_error(e, &self.tables)
    }
}

/// Our error inside the engine's (the table providers return these).
pub(crate) fn df_err(e: Error) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

/// See [`QuerySession::error`].
pub fn query_error(e: DataFusionError, tables: &[String]) -> Error {
    let root = e.find_root();
    if let DataFusionError::External(inner) = root
        && let Some(ours) = inner.downcast_ref::<Error>()
    {
        let hint = match ours {
            Error::Kinesis { stream, .. } => format!(
                " (live records could not be read; archive.{} has the archived ones alone)",
                quote(stream)
            ),
            _ => String::new(),
        };
        return Error::Query {
            message: format!("{ours}{hint}"),
        };
    }
    let message = e.strip_backtrace();
    match root {
        DataFusionError::SQL(parse, _) => {
            use datafusion::sql::sqlparser::parser::ParserError;
            Error::Sql {
                message: match parse.as_ref() {
                    ParserError::ParserError(m) | ParserError::TokenizerError(m) => m.clone(),
                    other => other.to_string(),
                },
            }
        }
        DataFusionError::Plan(m) if m.contains("not found") && m.contains("table") => Error::Sql {
            message: format!("{message}\navailable tables: {}", tables.join(", ")),
        },
        DataFusionError::Plan(_)
        | DataFusionError::SchemaError(..)
        | DataFusionError::NotImplemented(_) => Error::Sql { message },
        _ => Error::Query { message },
    }
}

fn first_words(s: &str) -> String {
    s.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The live horizon a session was built with ([`SessionOptions::as_of_ms`]).
#[derive(Debug)]
struct AsOf(i64);

/// The time a session's time functions return ([`SessionOptions::now_ms`]).
#[derive(Debug)]
struct PinnedNow(i64);

/// Give a statement's state the session's pinned start time, if it has one:
/// DataFusion folds `now()` and the other time functions into literals of
/// `query_execution_start_time` while optimizing, which
/// [`SessionContext::state`] sets to the wall clock.
fn pin_now(state: &mut datafusion::execution::SessionState) {
    let Some(ms) = state.config().get_extension::<PinnedNow>().map(|n| n.0) else {
        return;
    };
    if let Some(t) = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms) {
        state.execution_props_mut().query_execution_start_time = Some(t);
    }
}

/// Which part of a stream a table shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `archive.S`
    Archive,
    /// `live.S`
    Live,
    /// `S`: both, split at one snapshot.
    Both,
}

/// The table provider of `archive.S`, `live.S` and `S`: each scan reads the
/// stream's checkpoints once and plans the chosen side(s) against them.
#[derive(Debug)]
struct StreamTable {
    archive: Archive,
    stream: String,
    side: Side,
    archived: Arc<ArchiveTable>,
    live: Arc<LiveTable>,
}

#[async_trait]
impl TableProvider for StreamTable {
    fn schema(&self) -> SchemaRef {
        record::table_schema()
    }

    fn table_type(&self) -> TableType {
        match self.side {
            Side::Both => TableType::View,
            Side::Archive | Side::Live => TableType::Base,
        }
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        // The statement's view (a scan outside of `QuerySession::plan`, e.g.
        // `ctx.table(..)`, gets a view of its own).
        let view = state
            .config()
            .get_extension::<View>()
            .unwrap_or_else(|| Arc::new(View::new(None, false)));
        let snapshot = view
            .snapshot(&self.archive, &self.stream)
            .await
            .map_err(df_err)?;
        let mut plans = Vec::with_capacity(2);
        if self.side != Side::Live {
            plans.push(
                self.archived
                    .scan_at(state, projection, filters, limit, &snapshot)
                    .await?,
            );
        }
        if self.side != Side::Archive {
            plans.push(
                self.live
                    .scan_at(projection, filters, limit, &snapshot, &view)
                    .await?,
            );
        }
        UnionExec::try_new(plans)
    }
}
