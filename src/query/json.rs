//! SQL functions over payloads: the JSON functions of `datafusion-functions-json`
//! made to accept the binary `data` column directly, and `text(data)` to show a
//! payload as text.
//!
//! The JSON crate only accepts string arguments, while payloads are stored as
//! Parquet `BINARY`. Rather than copy payloads into strings for every query,
//! each JSON function is wrapped: a binary first argument is reinterpreted as
//! UTF-8 (invalid UTF-8 becomes NULL, so a stray binary record never fails a
//! query) and handed to the original implementation. The crate's `->`, `->>`
//! and `?` operators and its cast rewrites are kept, pointed at the wrappers.

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringBuilder};
use arrow::compute::CastOptions;
use arrow::datatypes::{DataType, FieldRef};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{DFSchema, Result as DfResult, ScalarValue, plan_err};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::FunctionRewrite;
use datafusion::logical_expr::planner::{ExprPlanner, PlannerResult, RawBinaryExpr};
use datafusion::logical_expr::{
    AggregateUDF, ColumnarValue, Expr, HigherOrderUDF, ReturnFieldArgs, ScalarFunctionArgs,
    ScalarUDF, ScalarUDFImpl, Signature, Volatility, WindowUDF,
};
use datafusion::prelude::SessionContext;

/// Register the JSON functions (binary-aware), `text()` and the rule that
/// parses a payload once for all the JSON getters of a node
/// ([`super::json_fuse`]) on `ctx`.
pub fn register(ctx: &SessionContext) -> DfResult<()> {
    register_with(ctx, super::json_fuse::enabled())
}

/// [`register`], with the fusion rule or without it.
pub fn register_with(ctx: &SessionContext, fuse: bool) -> DfResult<()> {
    let mut capture = Capture::default();
    datafusion_functions_json::register_all(&mut capture)?;
    let wrapped: HashMap<String, Arc<ScalarUDF>> = capture
        .udfs
        .iter()
        .map(|u| {
            let w = Arc::new(ScalarUDF::new_from_impl(BinaryJson { inner: u.clone() }));
            (u.name().to_string(), w)
        })
        .collect();
    let wrapped = Arc::new(wrapped);
    let state_ref = ctx.state_ref();
    let mut state = state_ref.write();
    for udf in wrapped.values() {
        state.register_udf(udf.clone())?;
    }
    for r in capture.rewrites {
        state.register_function_rewrite(Arc::new(RewriteToBinary {
            inner: r,
            udfs: wrapped.clone(),
        }))?;
    }
    for p in capture.planners {
        state.register_expr_planner(Arc::new(PlanToBinary {
            inner: p,
            udfs: wrapped.clone(),
        }))?;
    }
    for f in [BytesFn::text(), BytesFn::octet_length()] {
        state.register_udf(Arc::new(ScalarUDF::new_from_impl(f)))?;
    }
    drop(state);
    if fuse {
        ctx.add_optimizer_rule(Arc::new(super::json_fuse::FuseJson::new(&wrapped)));
    }
    Ok(())
}

/// Collects what `register_all` registers, so it can be wrapped.
#[derive(Default)]
struct Capture {
    udfs: Vec<Arc<ScalarUDF>>,
    rewrites: Vec<Arc<dyn FunctionRewrite + Send + Sync>>,
    planners: Vec<Arc<dyn ExprPlanner>>,
}

impl FunctionRegistry for Capture {
    fn udfs(&self) -> HashSet<String> {
        self.udfs.iter().map(|u| u.name().to_string()).collect()
    }
    fn udafs(&self) -> HashSet<String> {
        HashSet::new()
    }
    fn udwfs(&self) -> HashSet<String> {
        HashSet::new()
    }
    fn udf(&self, name: &str) -> DfResult<Arc<ScalarUDF>> {
        match self.udfs.iter().find(|u| u.name() == name) {
            Some(u) => Ok(u.clone()),
            None => plan_err!("no function {name}"),
        }
    }
    fn udaf(&self, name: &str) -> DfResult<Arc<AggregateUDF>> {
        plan_err!("no aggregate {name}")
    }
    fn udwf(&self, name: &str) -> DfResult<Arc<WindowUDF>> {
        plan_err!("no window function {name}")
    }
    fn higher_order_function_names(&self) -> HashSet<String> {
        HashSet::new()
    }
    fn higher_order_function(&self, name: &str) -> DfResult<Arc<HigherOrderUDF>> {
        plan_err!("no higher-order function {name}")
    }
    fn register_udf(&mut self, udf: Arc<ScalarUDF>) -> DfResult<Option<Arc<ScalarUDF>>> {
        self.udfs.push(udf);
        Ok(None)
    }
    fn register_function_rewrite(
        &mut self,
        rewrite: Arc<dyn FunctionRewrite + Send + Sync>,
    ) -> DfResult<()> {
        self.rewrites.push(rewrite);
        Ok(())
    }
    fn expr_planners(&self) -> Vec<Arc<dyn ExprPlanner>> {
        self.planners.clone()
    }
    fn register_expr_planner(&mut self, planner: Arc<dyn ExprPlanner>) -> DfResult<()> {
        self.planners.push(planner);
        Ok(())
    }
}

/// Replace calls to the original JSON functions in `expr` by their wrappers.
fn retarget(expr: Expr, udfs: &HashMap<String, Arc<ScalarUDF>>) -> DfResult<Transformed<Expr>> {
    expr.transform(|e| match e {
        Expr::ScalarFunction(f) => match udfs.get(f.func.name()) {
            Some(w) if !Arc::ptr_eq(w, &f.func) => {
                Ok(Transformed::yes(Expr::ScalarFunction(ScalarFunction {
                    func: w.clone(),
                    args: f.args,
                })))
            }
            _ => Ok(Transformed::no(Expr::ScalarFunction(f))),
        },
        other => Ok(Transformed::no(other)),
    })
}

#[derive(Debug)]
struct PlanToBinary {
    inner: Arc<dyn ExprPlanner>,
    udfs: Arc<HashMap<String, Arc<ScalarUDF>>>,
}

impl ExprPlanner for PlanToBinary {
    fn plan_binary_op(
        &self,
        expr: RawBinaryExpr,
        schema: &DFSchema,
    ) -> DfResult<PlannerResult<RawBinaryExpr>> {
        Ok(match self.inner.plan_binary_op(expr, schema)? {
            PlannerResult::Planned(e) => PlannerResult::Planned(retarget(e, &self.udfs)?.data),
            original => original,
        })
    }
}

#[derive(Debug)]
struct RewriteToBinary {
    inner: Arc<dyn FunctionRewrite + Send + Sync>,
    udfs: Arc<HashMap<String, Arc<ScalarUDF>>>,
}

impl FunctionRewrite for RewriteToBinary {
    fn name(&self) -> &'static str {
        "fluxcap_json_binary"
    }

    fn rewrite(
        &self,
        expr: Expr,
        schema: &DFSchema,
        config: &ConfigOptions,
    ) -> DfResult<Transformed<Expr>> {
        let t = self.inner.rewrite(expr, schema, config)?;
        if !t.transformed {
            return Ok(t);
        }
        Ok(Transformed::yes(retarget(t.data, &self.udfs)?.data))
    }
}

/// The string type a binary type is read as.
fn as_string_type(t: &DataType) -> Option<DataType> {
    match t {
        DataType::Binary => Some(DataType::Utf8),
        DataType::LargeBinary => Some(DataType::LargeUtf8),
        DataType::BinaryView => Some(DataType::Utf8View),
        _ => None,
    }
}

/// A JSON function that also accepts a binary first argument.
#[derive(Debug, PartialEq, Eq, Hash)]
struct BinaryJson {
    inner: Arc<ScalarUDF>,
}

impl ScalarUDFImpl for BinaryJson {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }
    fn signature(&self) -> &Signature {
        self.inner.signature()
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        let mut types = arg_types.to_vec();
        if let Some(t) = types.first_mut().and_then(|t| as_string_type(t)) {
            types[0] = t;
        }
        self.inner.return_type(&types)
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        let mut fields = args.arg_fields.to_vec();
        if let Some(f) = fields.first_mut()
            && let Some(t) = as_string_type(f.data_type())
        {
            *f = Arc::new(f.as_ref().clone().with_data_type(t));
        }
        self.inner.return_field_from_args(ReturnFieldArgs {
            arg_fields: &fields,
            scalar_arguments: args.scalar_arguments,
        })
    }
    fn invoke_with_args(&self, mut args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        if let Some(f) = args.arg_fields.first_mut()
            && let Some(t) = as_string_type(f.data_type())
        {
            let lossy = CastOptions {
                safe: true,
                ..Default::default()
            };
            args.args[0] = match &args.args[0] {
                ColumnarValue::Array(a) => {
                    ColumnarValue::Array(arrow::compute::cast_with_options(a, &t, &lossy)?)
                }
                ColumnarValue::Scalar(s) => {
                    ColumnarValue::Scalar(s.cast_to_with_options(&t, &lossy)?)
                }
            };
            *f = Arc::new(f.as_ref().clone().with_data_type(t));
        }
        self.inner.invoke_with_args(args)
    }
}

/// A one-argument function over binary or string values: `text()` and
/// `octet_length()`.
#[derive(Debug)]
struct BytesFn {
    name: &'static str,
    output: DataType,
    apply: fn(&dyn Array) -> DfResult<ArrayRef>,
    signature: Signature,
}

impl PartialEq for BytesFn {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for BytesFn {}

impl std::hash::Hash for BytesFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

impl BytesFn {
    /// `text(bytes)`: a payload as text; invalid UTF-8 sequences become U+FFFD.
    fn text() -> Self {
        Self::new("text", DataType::Utf8, lossy_text)
    }

    /// `octet_length(x)`: bytes in a binary or string value (the built-in
    /// one only takes strings).
    fn octet_length() -> Self {
        Self::new("octet_length", DataType::Int64, octet_length)
    }

    fn new(
        name: &'static str,
        output: DataType,
        apply: fn(&dyn Array) -> DfResult<ArrayRef>,
    ) -> Self {
        BytesFn {
            name,
            output,
            apply,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

/// Binary values as text, invalid UTF-8 shown as U+FFFD (strings pass through).
fn lossy_text(a: &dyn Array) -> DfResult<ArrayRef> {
    fn build<'a>(n: usize, it: impl Iterator<Item = Option<&'a [u8]>>) -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, 0);
        for v in it {
            match v {
                Some(bytes) => b.append_value(String::from_utf8_lossy(bytes)),
                None => b.append_null(),
            }
        }
        Arc::new(b.finish())
    }
    Ok(match a.data_type() {
        DataType::Binary => build(a.len(), a.as_binary::<i32>().iter()),
        DataType::LargeBinary => build(a.len(), a.as_binary::<i64>().iter()),
        DataType::BinaryView => build(a.len(), a.as_binary_view().iter()),
        _ => arrow::compute::cast(a, &DataType::Utf8)?,
    })
}

fn octet_length(a: &dyn Array) -> DfResult<ArrayRef> {
    if a.data_type() == &DataType::Null {
        return Ok(arrow::array::new_null_array(&DataType::Int64, a.len()));
    }
    let n = arrow::compute::kernels::length::length(a)?;
    Ok(arrow::compute::cast(&n, &DataType::Int64)?)
}

impl ScalarUDFImpl for BytesFn {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        match arg_types.first() {
            Some(
                DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Null,
            ) => Ok(self.output.clone()),
            Some(other) => plan_err!("{}() expects binary or string, got {other}", self.name),
            None => plan_err!("{}() takes one argument", self.name),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        match &args.args[0] {
            ColumnarValue::Array(a) => Ok(ColumnarValue::Array((self.apply)(a.as_ref())?)),
            ColumnarValue::Scalar(s) => {
                let a = (self.apply)(s.to_array()?.as_ref())?;
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&a, 0)?))
            }
        }
    }
}
