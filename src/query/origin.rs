//! Replayed copies, known as copies: every table (`archive.S`, `live.S`,
//! `S`) has the decoded replay annotation ([`crate::consistency::decode`])
//! as columns, NULL for original records.
//!
//! ```text
//!   record columns …, data ─▶ fluxcap_origin(data) ─▶ replay_id, origin_shard_id,
//!                                                   origin_sequence_number,
//!                                                   origin_subsequence_number,
//!                                                   origin_lineage_depth
//! ```
//!
//! The columns are computed by a view over the stream's table, so a query
//! that does not name them never decodes a payload (the optimizer prunes
//! them), and filters on the record columns still reach the scans.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int32Builder, Int64Builder, StringBuilder, StructArray,
};
use arrow::datatypes::{DataType, Field, Fields};
use datafusion::catalog::TableProvider;
use datafusion::catalog::default_table_source::provider_as_source;
use datafusion::catalog::view::ViewTable;
use datafusion::common::{Result as DfResult, TableReference, exec_err};
use datafusion::functions::core::expr_fn::get_field;
use datafusion::logical_expr::{
    ColumnarValue, LogicalPlanBuilder, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility,
};
use datafusion::prelude::{Expr, col};

use crate::consistency::{Decoded, decode};
use crate::error::{Error, Result};
use crate::record;

/// Id of the replay that sent the copy.
pub const REPLAY_ID: &str = "replay_id";
/// The original's shard.
pub const ORIGIN_SHARD_ID: &str = "origin_shard_id";
/// The original's sequence number.
pub const ORIGIN_SEQUENCE_NUMBER: &str = "origin_sequence_number";
/// The original's sub-sequence number.
pub const ORIGIN_SUBSEQUENCE_NUMBER: &str = "origin_subsequence_number";
/// The lineage depth of the original's shard.
pub const ORIGIN_LINEAGE_DEPTH: &str = "origin_lineage_depth";

/// The decoding function's name.
pub const ORIGIN_FN: &str = "fluxcap_origin";

fn fields() -> Fields {
    Fields::from(vec![
        Field::new(REPLAY_ID, DataType::Utf8, true),
        Field::new(ORIGIN_SHARD_ID, DataType::Utf8, true),
        Field::new(ORIGIN_SEQUENCE_NUMBER, DataType::Utf8, true),
        Field::new(ORIGIN_SUBSEQUENCE_NUMBER, DataType::Int64, true),
        Field::new(ORIGIN_LINEAGE_DEPTH, DataType::Int32, true),
    ])
}

/// The names of the annotation columns, in table order.
pub fn columns() -> [&'static str; 5] {
    [
        REPLAY_ID,
        ORIGIN_SHARD_ID,
        ORIGIN_SEQUENCE_NUMBER,
        ORIGIN_SUBSEQUENCE_NUMBER,
        ORIGIN_LINEAGE_DEPTH,
    ]
}

/// `fluxcap_origin(data)`: the annotation of a replayed copy as a struct
/// of the annotation columns (all NULL for an original).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct OriginFn {
    field: String,
    signature: Signature,
}

impl OriginFn {
    /// Decode annotations carried in the member `field`.
    pub fn new(field: &str) -> Self {
        OriginFn {
            field: field.to_string(),
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for OriginFn {
    fn name(&self) -> &str {
        ORIGIN_FN
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Struct(fields()))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let Some(data) = arrays.first() else {
            return exec_err!("{ORIGIN_FN} takes (data)");
        };
        let data = arrow::compute::cast(data, &DataType::Binary)?;
        let data = data.as_binary::<i32>();
        let n = data.len();
        let mut id = StringBuilder::with_capacity(n, 0);
        let mut shard = StringBuilder::with_capacity(n, 0);
        let mut seq = StringBuilder::with_capacity(n, 0);
        let mut sub = Int64Builder::with_capacity(n);
        let mut depth = Int32Builder::with_capacity(n);
        for i in 0..n {
            let a = if data.is_null(i) {
                None
            } else {
                match decode(data.value(i), &self.field) {
                    Decoded::Replayed { annotation, .. } => Some(annotation),
                    Decoded::Original(_) => None,
                }
            };
            match a {
                Some(a) => {
                    id.append_value(&a.replay_id);
                    shard.append_value(&a.shard_id);
                    seq.append_value(&a.sequence_number);
                    sub.append_value(a.subsequence_number);
                    depth.append_value(i32::try_from(a.lineage_depth).unwrap_or(i32::MAX));
                }
                None => {
                    id.append_null();
                    shard.append_null();
                    seq.append_null();
                    sub.append_null();
                    depth.append_null();
                }
            }
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(id.finish()),
            Arc::new(shard.finish()),
            Arc::new(seq.finish()),
            Arc::new(sub.finish()),
            Arc::new(depth.finish()),
        ];
        Ok(ColumnarValue::Array(Arc::new(StructArray::try_new(
            fields(),
            cols,
            None,
        )?)))
    }
}

/// `raw` (a stream's table with the record columns) with the annotation
/// columns added, as the view registered under `name`.
pub fn view(
    name: &str,
    raw: Arc<dyn TableProvider>,
    field: &str,
) -> Result<Arc<dyn TableProvider>> {
    let udf = Arc::new(ScalarUDF::new_from_impl(OriginFn::new(field)));
    let mut exprs: Vec<Expr> = raw
        .schema()
        .fields()
        .iter()
        .map(|f| col(f.name().as_str()))
        .collect();
    let origin = udf.call(vec![col(record::col::DATA)]);
    for c in columns() {
        exprs.push(get_field(origin.clone(), c).alias(c));
    }
    let err = |e: datafusion::error::DataFusionError| Error::Query {
        message: format!("building the table {name}: {e}"),
    };
    let plan = LogicalPlanBuilder::scan(TableReference::bare(name), provider_as_source(raw), None)
        .and_then(|b| b.project(exprs))
        .and_then(|b| b.build())
        .map_err(err)?;
    Ok(Arc::new(ViewTable::new(plan, None)))
}
