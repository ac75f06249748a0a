//! Limits on what a statement may be before it is planned, so that no SQL
//! text — from `fluxcap sql`, a replay's `where`/`key`/`tombstone`, or the
//! HTTP API — can exhaust the stack or run without end:
//!
//! * the text is at most `query.max_statement_bytes` long;
//! * parsing, the depth check and planning run on a thread with a large
//!   stack ([`on_big_stack`]), and a too-deep syntax tree is also dropped
//!   there (dropping a tree is recursive, too);
//! * expressions, subqueries, set operations (`UNION …`) and joins nest at
//!   most `query.max_expression_depth` levels ([`check_depth`]) — `1+1+…+1`
//!   is one level per `+`;
//! * `range()` and `generate_series()` produce at most a given number of rows
//!   ([`BoundedSeries`], used by the server).
//!
//! DataFusion's own recursion protection (the `recursive_protection`
//! feature) grows the stack of its planner and optimizer as a second line.

use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::common::{Result as DfResult, ScalarValue, plan_err};
use datafusion::logical_expr::Expr as DfExpr;
use datafusion::sql::parser::{CopyToSource, Statement};
use datafusion::sql::sqlparser::ast::{
    Expr, Query, SetExpr, TableFactor, TableWithJoins, Visit, Visitor,
};

use crate::error::{Error, Result};

/// Stack size of the thread statements are parsed and planned on.
pub const PLAN_STACK_BYTES: usize = 256 << 20;

/// What a statement may be.
#[derive(Debug, Clone, Copy)]
pub struct StatementLimits {
    /// Longest text, in bytes.
    pub max_bytes: usize,
    /// Deepest nesting.
    pub max_depth: usize,
}

impl Default for StatementLimits {
    fn default() -> Self {
        StatementLimits {
            max_bytes: 256 << 10,
            max_depth: 256,
        }
    }
}

impl StatementLimits {
    /// Refuse a text longer than the limit.
    pub fn check_length(&self, sql: &str) -> Result<()> {
        if sql.len() > self.max_bytes {
            return Err(Error::TooComplex {
                message: format!(
                    "the statement is {} bytes long; at most {} are accepted (query.max_statement_bytes)",
                    sql.len(),
                    self.max_bytes
                ),
            });
        }
        Ok(())
    }
}

/// Run `f` on a fresh thread with a [`PLAN_STACK_BYTES`] stack, with the
/// current Tokio runtime available to it, and await its result.
pub async fn on_big_stack<T, F>(f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&tokio::runtime::Handle) -> Result<T> + Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fluxcap-plan".into())
        .stack_size(PLAN_STACK_BYTES)
        .spawn(move || {
            let _ = tx.send(f(&handle));
        })
        .map_err(|e| Error::Query {
            message: format!("cannot start the planning thread: {e}"),
        })?;
    rx.await.map_err(|_| Error::Query {
        message: "the planning thread stopped without an answer".into(),
    })?
}

/// Refuse a statement nested deeper than `max` (see the module docs). The
/// walk stops at the first level past `max`, so it never recurses deeper.
pub fn check_depth(statement: &Statement, max: usize) -> Result<()> {
    let mut v = Depth {
        current: 0,
        max,
        too_deep: None,
    };
    let _ = match statement {
        Statement::Statement(s) => s.visit(&mut v),
        Statement::Explain(e) => match e.statement.as_ref() {
            Statement::Statement(s) => s.visit(&mut v),
            other => return check_depth(other, max),
        },
        // Refused as a write after planning, but planned first.
        Statement::CopyTo(c) => match &c.source {
            CopyToSource::Query(q) => q.visit(&mut v),
            CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    };
    match v.too_deep {
        None => Ok(()),
        Some(what) => Err(Error::TooComplex {
            message: format!(
                "the statement nests {what} more than {max} levels deep (query.max_expression_depth); \
                 write long lists with IN (…) or split the query"
            ),
        }),
    }
}

struct Depth {
    current: usize,
    max: usize,
    too_deep: Option<&'static str>,
}

impl Depth {
    fn enter(&mut self, what: &'static str, levels: usize) -> ControlFlow<()> {
        self.current += levels;
        if self.current > self.max {
            self.too_deep = Some(what);
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl Visitor for Depth {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        // Set operations and joins nest without an expression or query
        // node in between: measure them before the walk descends.
        if set_depth(&query.body, self.current + 1, self.max) {
            self.too_deep = Some("set operations or joins");
            return ControlFlow::Break(());
        }
        self.enter("subqueries", 1)
    }

    fn post_visit_query(&mut self, _: &Query) -> ControlFlow<()> {
        self.current -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.enter("expressions", 1)
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<()> {
        self.current -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<()> {
        self.enter("tables", 1)
    }

    fn post_visit_table_factor(&mut self, _: &TableFactor) -> ControlFlow<()> {
        self.current -= 1;
        ControlFlow::Continue(())
    }
}

/// Whether `e` nests set operations, queries or joins past `max` (starting at `depth`).
fn set_depth(e: &SetExpr, depth: usize, max: usize) -> bool {
    if depth > max {
        return true;
    }
    match e {
        SetExpr::SetOperation { left, right, .. } => {
            set_depth(left, depth + 1, max) || set_depth(right, depth + 1, max)
        }
        SetExpr::Query(q) => set_depth(&q.body, depth + 1, max),
        SetExpr::Select(s) => {
            // FROM a, b, c and a JOIN b JOIN c both plan as a left-deep tree.
            let joins: usize = s.from.iter().map(join_depth).sum();
            depth + joins > max
        }
        _ => false,
    }
}

fn join_depth(t: &TableWithJoins) -> usize {
    1 + t.joins.len()
        + match &t.relation {
            TableFactor::NestedJoin {
                table_with_joins, ..
            } => join_depth(table_with_joins),
            _ => 0,
        }
}

/// `range()` / `generate_series()` refusing calls that would produce more
/// than `max_rows` rows (the engine's own functions otherwise).
#[derive(Debug)]
pub struct BoundedSeries {
    /// The engine's function.
    pub inner: Arc<dyn TableFunctionImpl>,
    /// Its SQL name.
    pub name: &'static str,
    /// Most rows one call may produce.
    pub max_rows: u64,
}

impl TableFunctionImpl for BoundedSeries {
    fn call_with_args(&self, args: TableFunctionArgs) -> DfResult<Arc<dyn TableProvider>> {
        if let Some(n) = series_len(args.exprs(), self.name == "generate_series")
            && n > self.max_rows as i128
        {
            return plan_err!(
                "{}() would produce {n} rows; at most {} are allowed here (server.max_series_rows)",
                self.name,
                self.max_rows
            );
        }
        self.inner.call_with_args(args)
    }
}

/// The rows a series call produces (`None`: the engine refuses the
/// arguments or produces nothing); `generate_series` includes its end,
/// `range` does not.
fn series_len(exprs: &[DfExpr], include_end: bool) -> Option<i128> {
    let lit = |e: &DfExpr| match e {
        DfExpr::Literal(v, _) => Some(v.clone()),
        _ => None,
    };
    let args: Vec<ScalarValue> = exprs.iter().map(lit).collect::<Option<_>>()?;
    let int = |v: &ScalarValue| match v {
        ScalarValue::Int64(Some(n)) => Some(*n as i128),
        _ => None,
    };
    // Interval steps in nanoseconds, a month counted as 28 days (more rows: safe side).
    let step_ns = |v: &ScalarValue| match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) => Some(
            i.months as i128 * 28 * 86_400_000_000_000
                + i.days as i128 * 86_400_000_000_000
                + i.nanoseconds as i128,
        ),
        _ => None,
    };
    let count = |start: i128, end: i128, step: i128| {
        if step == 0 {
            return None;
        }
        let span = end - start;
        if span != 0 && (span > 0) != (step > 0) {
            return Some(0);
        }
        let whole = span / step;
        Some(if include_end {
            whole + 1
        } else if span % step == 0 {
            whole
        } else {
            whole + 1
        })
    };
    match args.as_slice() {
        [end] => count(0, int(end)?, 1),
        [start, end] => count(int(start)?, int(end)?, 1),
        [start, end, step] => match (start, end) {
            (ScalarValue::Int64(_), _) => count(int(start)?, int(end)?, int(step)?),
            (
                ScalarValue::TimestampNanosecond(Some(a), _),
                ScalarValue::TimestampNanosecond(Some(b), _),
            ) => count(*a as i128, *b as i128, step_ns(step)?),
            (ScalarValue::Date32(Some(a)), ScalarValue::Date32(Some(b))) => count(
                *a as i128 * 86_400_000_000_000,
                *b as i128 * 86_400_000_000_000,
                step_ns(step)?,
            ),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;
    use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;

    fn parse(sql: &str) -> Statement {
        DFParser::parse_sql_with_dialect(sql, &PostgreSqlDialect {})
            .unwrap()
            .pop_front()
            .unwrap()
    }

    fn deep_ok(sql: &str, max: usize) -> bool {
        let sql = sql.to_string();
        std::thread::Builder::new()
            .stack_size(PLAN_STACK_BYTES)
            .spawn(move || check_depth(&parse(&sql), max).is_ok())
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn depth_counts_operators_subqueries_unions_and_joins() {
        let sum = |n: usize| format!("SELECT {}", vec!["1"; n].join("+"));
        assert!(deep_ok(&sum(50), 64));
        assert!(!deep_ok(&sum(100), 64));
        assert!(!deep_ok(&sum(20_000), 256));
        let unions = |n: usize| vec!["SELECT 1"; n].join(" UNION ALL ");
        assert!(deep_ok(&unions(10), 64));
        assert!(!deep_ok(&unions(100), 64));
        let joins = |n: usize| {
            format!(
                "SELECT 1 FROM t0 {}",
                (1..n)
                    .map(|i| format!("JOIN t{i} ON true"))
                    .collect::<Vec<_>>()
                    .join(" ")
            )
        };
        assert!(deep_ok(&joins(10), 64));
        assert!(!deep_ok(&joins(100), 64));
        let commas = format!(
            "SELECT 1 FROM {}",
            (0..100)
                .map(|i| format!("t{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        assert!(!deep_ok(&commas, 64));
        // Wide is fine: long IN lists and many columns are not deep.
        let wide = format!(
            "SELECT a, b FROM t WHERE a IN ({})",
            (0..5000)
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(",")
        );
        assert!(deep_ok(&wide, 16));
        assert!(!deep_ok(&format!("EXPLAIN {}", sum(100)), 64));
    }

    #[test]
    fn length_is_capped() {
        let l = StatementLimits {
            max_bytes: 10,
            max_depth: 5,
        };
        assert!(l.check_length("SELECT 1").is_ok());
        let e = l.check_length("SELECT 12345").unwrap_err();
        assert!(e.to_string().contains("max_statement_bytes"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn series_lengths() {
        let i = |n: i64| DfExpr::Literal(ScalarValue::Int64(Some(n)), None);
        // generate_series includes its end, range does not.
        assert_eq!(series_len(&[i(10)], true), Some(11));
        assert_eq!(series_len(&[i(10)], false), Some(10));
        assert_eq!(series_len(&[i(5), i(10)], true), Some(6));
        assert_eq!(series_len(&[i(0), i(100), i(10)], true), Some(11));
        assert_eq!(series_len(&[i(0), i(95), i(10)], false), Some(10));
        assert_eq!(series_len(&[i(0), i(100), i(10)], false), Some(10));
        assert_eq!(series_len(&[i(10), i(0)], true), Some(0));
        assert_eq!(series_len(&[i(10), i(0), i(-1)], false), Some(10));
        assert_eq!(series_len(&[i(0), i(10), i(0)], true), None);
        assert_eq!(
            series_len(&[i(0), i(i64::MAX)], false),
            Some(i64::MAX as i128)
        );
    }
}
