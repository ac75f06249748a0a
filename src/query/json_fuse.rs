//! Each JSON payload parsed once per row, however many JSON functions a
//! query calls on it.
//!
//! `SELECT json_get_str(data, 'type'), count(*) FROM t WHERE
//! json_get_int(data, 'qty') > 3 AND json_get_str(data, 'country') = 'DE'
//! GROUP BY 1` calls three JSON getters, and each parses the payload again.
//! The [`FuseJson`] optimizer rule finds, in a projection, an aggregate, a
//! filter, or an aggregate/projection together with the filter below it
//! (directly, or under a view's alias and projections that only pass columns
//! through), the getter calls on one payload column with literal paths, and
//! replaces them by one `json_multi(data, <spec>...)` call, computed in a
//! projection inserted below the filter (or the node), that returns a struct
//! with one field per distinct call; each call becomes
//! `json_multi_field(<struct column>, <index>)`.
//!
//! `json_multi` walks a payload once: it scans the top-level object's keys
//! until every requested first key is found, then walks each remaining path
//! from that key's value. The result of every field follows the rules of the
//! function it replaces (the first of duplicate keys wins; a text key on an
//! array is an index if it spells one; negative indexes count from the end;
//! a parse error after the value a path reaches does not matter, one before
//! it makes the result NULL; invalid UTF-8 is NULL, and `json_contains` is
//! false, as with the wrapped functions of [`super::json`]).
//!
//! `json_multi` and `json_multi_field` are declared volatile although they
//! are pure functions: that is what keeps DataFusion's other rules (logical
//! and physical filter push-down, projection merging, common subexpression
//! elimination) from inlining `json_multi` back into each of its uses, which
//! would parse the payload once per use again. A fused predicate is
//! therefore not pushed into the Parquet scan as a row filter: it is
//! evaluated on the decoded batches.
//!
//! Fused: `json_get_str`, `json_get_int`, `json_get_float`, `json_get_bool`,
//! `json_as_text` (`->>`) and `json_contains` (`?`) with a column as payload
//! and string or integer literals as path. Not fused: `json_get` (`->`, its
//! union result), the other JSON functions, paths that are not literals, and
//! calls spread over nodes other than a filter and its parent.
//! `FLUXCAP_JSON_FUSION=off` in the environment disables the rule (for
//! measuring it).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder,
    StructArray,
};
use arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{
    Column, DFSchema, ExprSchema, Result as DfResult, ScalarValue, exec_err, internal_err, plan_err,
};
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::{
    Aggregate, ColumnarValue, Expr, ExprSchemable, Filter, LogicalPlan, Projection,
    ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, SubqueryAlias,
    Volatility,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use jiter::{Jiter, JiterError, NumberAny, NumberInt, Peek};

/// The environment variable that turns the rule off when set to `off`.
pub const FUSION_ENV: &str = "FLUXCAP_JSON_FUSION";

/// Whether the environment leaves fusion on.
pub fn enabled() -> bool {
    !matches!(
        std::env::var(FUSION_ENV).as_deref(),
        Ok("off" | "0" | "false")
    )
}

/// A JSON getter `json_multi` can compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Getter {
    Str,
    Int,
    Float,
    Bool,
    Text,
    Contains,
}

impl Getter {
    const ALL: [Getter; 6] = [
        Getter::Str,
        Getter::Int,
        Getter::Float,
        Getter::Bool,
        Getter::Text,
        Getter::Contains,
    ];

    fn name(self) -> &'static str {
        match self {
            Getter::Str => "json_get_str",
            Getter::Int => "json_get_int",
            Getter::Float => "json_get_float",
            Getter::Bool => "json_get_bool",
            Getter::Text => "json_as_text",
            Getter::Contains => "json_contains",
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.name() == name)
    }

    fn data_type(self) -> DataType {
        match self {
            Getter::Str | Getter::Text => DataType::Utf8,
            Getter::Int => DataType::Int64,
            Getter::Float => DataType::Float64,
            Getter::Bool | Getter::Contains => DataType::Boolean,
        }
    }
}

/// One step of a path: an object key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Step {
    Key(String),
    Index(isize),
}

/// One field of `json_multi`'s result: a getter and its path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Spec {
    /// The function the field computes.
    getter: Getter,
    /// Its path from the payload's root.
    path: Vec<Step>,
}

impl Spec {
    /// The spec of a call `getter(payload, args...)`, if the args are a
    /// literal path.
    fn of_call(getter: Getter, args: &[Expr]) -> Option<Self> {
        let mut path = Vec::with_capacity(args.len());
        for a in args {
            let Expr::Literal(v, _) = a else {
                return None;
            };
            path.push(match v {
                ScalarValue::Utf8(Some(s))
                | ScalarValue::LargeUtf8(Some(s))
                | ScalarValue::Utf8View(Some(s)) => Step::Key(s.clone()),
                ScalarValue::Int64(Some(i)) => Step::Index(isize::try_from(*i).ok()?),
                ScalarValue::UInt64(Some(i)) => Step::Index(isize::try_from(*i).ok()?),
                _ => return None,
            });
        }
        if getter == Getter::Contains && path.is_empty() {
            return None;
        }
        Some(Spec { getter, path })
    }

    /// The spec as the literal argument of `json_multi`: a JSON array of the
    /// function's name and the path's steps, e.g. `["json_get_int","a",0]`.
    fn encode(&self) -> String {
        let mut items = vec![serde_json::Value::from(self.getter.name())];
        for s in &self.path {
            items.push(match s {
                Step::Key(k) => serde_json::Value::from(k.as_str()),
                Step::Index(i) => serde_json::Value::from(*i as i64),
            });
        }
        serde_json::Value::Array(items).to_string()
    }

    fn decode(text: &str) -> DfResult<Self> {
        let bad = || plan_err!("json_multi: bad field spec {text}");
        let Ok(serde_json::Value::Array(items)) = serde_json::from_str(text) else {
            return bad();
        };
        let Some(getter) = items
            .first()
            .and_then(|v| v.as_str())
            .and_then(Getter::from_name)
        else {
            return bad();
        };
        let mut path = Vec::with_capacity(items.len());
        for v in &items[1..] {
            path.push(match v {
                serde_json::Value::String(s) => Step::Key(s.clone()),
                serde_json::Value::Number(n) => {
                    match n.as_i64().and_then(|i| isize::try_from(i).ok()) {
                        Some(i) => Step::Index(i),
                        None => return bad(),
                    }
                }
                _ => return bad(),
            });
        }
        Ok(Spec { getter, path })
    }
}

/// The specs of a `json_multi` call from its literal arguments.
fn specs_of(args: &[Option<&ScalarValue>]) -> DfResult<Vec<Spec>> {
    args.iter()
        .skip(1)
        .map(|a| match a {
            Some(ScalarValue::Utf8(Some(s))) => Spec::decode(s),
            _ => plan_err!("json_multi takes literal field specs"),
        })
        .collect()
}

fn struct_fields(specs: &[Spec]) -> Fields {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| Field::new(i.to_string(), s.getter.data_type(), true))
        .collect()
}

/// `json_multi(payload, spec...)`: every spec's getter evaluated on one parse
/// of each payload, as a struct with one field per spec (see the module doc).
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct JsonMulti {
    signature: Signature,
}

impl JsonMulti {
    /// The function (one instance serves every call; specs are arguments).
    pub fn new() -> Self {
        JsonMulti {
            signature: Signature::variadic_any(Volatility::Volatile),
        }
    }
}

impl Default for JsonMulti {
    fn default() -> Self {
        Self::new()
    }
}

impl ScalarUDFImpl for JsonMulti {
    fn name(&self) -> &str {
        "json_multi"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        internal_err!("json_multi's type comes from return_field_from_args")
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        let specs = specs_of(args.scalar_arguments)?;
        Ok(Arc::new(Field::new(
            self.name(),
            DataType::Struct(struct_fields(&specs)),
            false,
        )))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let mut literal = Vec::with_capacity(args.args.len());
        for a in &args.args {
            literal.push(match a {
                ColumnarValue::Scalar(s) => Some(s),
                ColumnarValue::Array(_) => None,
            });
        }
        let plan = Plan::new(specs_of(&literal)?);
        match args.args.first() {
            Some(ColumnarValue::Array(a)) => Ok(ColumnarValue::Array(plan.evaluate(a)?)),
            Some(ColumnarValue::Scalar(s)) => {
                let a = plan.evaluate(&s.to_array()?)?;
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&a, 0)?))
            }
            None => exec_err!("json_multi takes a payload"),
        }
    }
}

/// `json_multi_field(struct, index)`: one field of `json_multi`'s result.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct JsonMultiField {
    signature: Signature,
}

impl JsonMultiField {
    /// The function.
    pub fn new() -> Self {
        JsonMultiField {
            signature: Signature::any(2, Volatility::Volatile),
        }
    }
}

impl Default for JsonMultiField {
    fn default() -> Self {
        Self::new()
    }
}

/// The field index of a `json_multi_field` call.
fn field_index(arg: Option<&ScalarValue>) -> DfResult<usize> {
    match arg {
        Some(ScalarValue::Int64(Some(i))) => match usize::try_from(*i) {
            Ok(i) => Ok(i),
            Err(_) => plan_err!("json_multi_field: bad index {i}"),
        },
        _ => plan_err!("json_multi_field takes a literal index"),
    }
}

impl ScalarUDFImpl for JsonMultiField {
    fn name(&self) -> &str {
        "json_multi_field"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn return_type(&self, _arg_types: &[DataType]) -> DfResult<DataType> {
        internal_err!("json_multi_field's type comes from return_field_from_args")
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        let i = field_index(args.scalar_arguments.get(1).copied().flatten())?;
        match args.arg_fields.first().map(|f| f.data_type()) {
            Some(DataType::Struct(fields)) => match fields.get(i) {
                Some(f) => Ok(Arc::new(Field::new(
                    self.name(),
                    f.data_type().clone(),
                    true,
                ))),
                None => plan_err!("json_multi_field: no field {i}"),
            },
            other => plan_err!("json_multi_field takes a struct, got {other:?}"),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let i = match args.args.get(1) {
            Some(ColumnarValue::Scalar(s)) => field_index(Some(s))?,
            _ => return exec_err!("json_multi_field takes a literal index"),
        };
        let child = |a: &ArrayRef| -> DfResult<ArrayRef> {
            let Some(s) = a.as_struct_opt() else {
                return exec_err!("json_multi_field takes a struct");
            };
            if i >= s.num_columns() {
                return exec_err!("json_multi_field: no field {i}");
            }
            Ok(s.column(i).clone())
        };
        match args.args.first() {
            Some(ColumnarValue::Array(a)) => Ok(ColumnarValue::Array(child(a)?)),
            Some(ColumnarValue::Scalar(s)) => {
                let c = child(&s.to_array()?)?;
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&c, 0)?))
            }
            None => exec_err!("json_multi_field takes a struct"),
        }
    }
}

/// How `json_multi` evaluates its specs: the distinct first keys it scans
/// the root object for, and for each spec which of them it starts from.
struct Plan {
    specs: Vec<Spec>,
    /// Distinct first keys of the specs whose path starts with a key.
    keys: Vec<String>,
    /// Per spec, its first key's index in `keys`.
    first: Vec<Option<usize>>,
}

/// A column of `json_multi`'s result under construction.
enum Col {
    Str(StringBuilder),
    Int(Int64Builder),
    Float(Float64Builder),
    Bool(BooleanBuilder),
}

impl Col {
    fn finish(self) -> ArrayRef {
        match self {
            Col::Str(mut b) => Arc::new(b.finish()),
            Col::Int(mut b) => Arc::new(b.finish()),
            Col::Float(mut b) => Arc::new(b.finish()),
            Col::Bool(mut b) => Arc::new(b.finish()),
        }
    }
}

impl Plan {
    fn new(specs: Vec<Spec>) -> Self {
        let mut keys: Vec<String> = Vec::new();
        let first = specs
            .iter()
            .map(|s| match s.path.first() {
                Some(Step::Key(k)) => Some(match keys.iter().position(|x| x == k) {
                    Some(i) => i,
                    None => {
                        keys.push(k.clone());
                        keys.len() - 1
                    }
                }),
                _ => None,
            })
            .collect();
        Plan { specs, keys, first }
    }

    fn evaluate(&self, payloads: &ArrayRef) -> DfResult<ArrayRef> {
        let n = payloads.len();
        let mut cols: Vec<Col> = self
            .specs
            .iter()
            .map(|s| match s.getter {
                Getter::Str | Getter::Text => Col::Str(StringBuilder::with_capacity(n, 0)),
                Getter::Int => Col::Int(Int64Builder::with_capacity(n)),
                Getter::Float => Col::Float(Float64Builder::with_capacity(n)),
                Getter::Bool | Getter::Contains => Col::Bool(BooleanBuilder::with_capacity(n)),
            })
            .collect();
        let mut starts = vec![None; self.keys.len()];
        let mut row = |bytes: Option<&[u8]>| {
            let json = bytes.and_then(|b| std::str::from_utf8(b).ok());
            self.row(json, &mut starts, &mut cols);
        };
        match payloads.data_type() {
            DataType::Binary => payloads.as_binary::<i32>().iter().for_each(&mut row),
            DataType::LargeBinary => payloads.as_binary::<i64>().iter().for_each(&mut row),
            DataType::BinaryView => payloads.as_binary_view().iter().for_each(&mut row),
            DataType::Utf8 => payloads
                .as_string::<i32>()
                .iter()
                .for_each(|s| row(s.map(str::as_bytes))),
            DataType::LargeUtf8 => payloads
                .as_string::<i64>()
                .iter()
                .for_each(|s| row(s.map(str::as_bytes))),
            DataType::Utf8View => payloads
                .as_string_view()
                .iter()
                .for_each(|s| row(s.map(str::as_bytes))),
            DataType::Null => (0..n).for_each(|_| row(None)),
            other => return exec_err!("json_multi: unexpected payload type {other}"),
        }
        let fields = struct_fields(&self.specs);
        let arrays = cols.into_iter().map(Col::finish).collect();
        Ok(Arc::new(StructArray::try_new(fields, arrays, None)?))
    }

    /// Append one payload's values to `cols`.
    fn row(&self, json: Option<&str>, starts: &mut [Option<usize>], cols: &mut [Col]) {
        starts.iter_mut().for_each(|s| *s = None);
        let mut scanned = false;
        if let Some(json) = json
            && !self.keys.is_empty()
        {
            let mut jiter = Jiter::new(json.as_bytes());
            if let Ok(Peek::Object) = jiter.peek() {
                scan_object(&mut jiter, &self.keys, starts);
                scanned = true;
            }
        }
        for ((spec, first), col) in self.specs.iter().zip(&self.first).zip(cols.iter_mut()) {
            match (json, first) {
                (Some(json), Some(k)) if scanned => {
                    let sub = starts[*k].and_then(|s| json.get(s..));
                    match sub {
                        Some(sub) => {
                            let mut jiter = Jiter::new(sub.as_bytes());
                            let found = match jiter.peek() {
                                Ok(peek) => walk(jiter, peek, &spec.path[1..]),
                                Err(_) => None,
                            };
                            append(col, spec.getter, sub, found);
                        }
                        None => append(col, spec.getter, json, None),
                    }
                }
                (Some(json), _) => {
                    let mut jiter = Jiter::new(json.as_bytes());
                    let found = match jiter.peek() {
                        Ok(peek) => walk(jiter, peek, &spec.path),
                        Err(_) => None,
                    };
                    append(col, spec.getter, json, found);
                }
                (None, _) => append(col, spec.getter, "", None),
            }
        }
    }
}

/// Scan the object `jiter` is at (its opening brace peeked) for `keys`,
/// recording where the value of each one's first occurrence starts. Stops
/// when every key is found, at the object's end, or at a parse error.
fn scan_object(jiter: &mut Jiter, keys: &[String], starts: &mut [Option<usize>]) {
    let mut missing = keys.len();
    let mut key = jiter.known_object();
    while let Ok(Some(k)) = key {
        let wanted = keys.iter().position(|w| w == k);
        if let Some(i) = wanted
            && starts[i].is_none()
        {
            starts[i] = Some(jiter.current_index());
            missing -= 1;
            if missing == 0 {
                return;
            }
        }
        if jiter.next_skip().is_err() {
            return;
        }
        key = jiter.next_key();
    }
}

/// Follow `path` from the value `jiter` is at; `None` if it leads nowhere.
fn walk<'j>(mut jiter: Jiter<'j>, mut peek: Peek, path: &[Step]) -> Option<(Jiter<'j>, Peek)> {
    for step in path {
        peek = match (step, peek) {
            (Step::Key(want), Peek::Object) => {
                let mut key = jiter.known_object().ok()??;
                while key != want {
                    jiter.next_skip().ok()?;
                    key = jiter.next_key().ok()??;
                }
                jiter.peek().ok()?
            }
            (Step::Index(i), Peek::Array) => array_step(&mut jiter, *i)?,
            // a key that spells an integer indexes an array
            (Step::Key(k), Peek::Array) => array_step(&mut jiter, k.parse().ok()?)?,
            _ => return None,
        };
    }
    Some((jiter, peek))
}

/// Enter the array `jiter` is at and move to element `index` (negative:
/// from the end).
fn array_step(jiter: &mut Jiter, index: isize) -> Option<Peek> {
    let index = match usize::try_from(index) {
        Ok(i) => i,
        Err(_) => array_len(&mut jiter.clone())
            .ok()?
            .checked_add_signed(index)?,
    };
    let mut item = jiter.known_array().ok()??;
    for _ in 0..index {
        jiter.known_skip(item).ok()?;
        item = jiter.array_step().ok()??;
    }
    Some(item)
}

fn array_len(jiter: &mut Jiter) -> Result<usize, JiterError> {
    let mut next = jiter.known_array()?;
    let mut n = 0;
    while let Some(peek) = next {
        jiter.known_skip(peek)?;
        n += 1;
        next = jiter.array_step()?;
    }
    Ok(n)
}

/// An integral float as an `i64` (no rounding, no saturation).
fn float_to_int(f: f64) -> Option<i64> {
    const LIMIT: f64 = 9_223_372_036_854_775_808.0; // 2^63
    (f.fract() == 0.0 && (-LIMIT..LIMIT).contains(&f)).then_some(f as i64)
}

/// Append `getter`'s result for the value `found` (in `base`, the text its
/// parser reads) to `col`.
fn append(col: &mut Col, getter: Getter, base: &str, found: Option<(Jiter<'_>, Peek)>) {
    match (col, getter) {
        (Col::Bool(b), Getter::Contains) => b.append_value(found.is_some()),
        (Col::Str(b), Getter::Str) => match found {
            Some((mut j, Peek::String)) => b.append_option(j.known_str().ok()),
            _ => b.append_null(),
        },
        (Col::Str(b), Getter::Text) => match found {
            Some((_, Peek::Null)) | None => b.append_null(),
            Some((mut j, Peek::String)) => b.append_option(j.known_str().ok()),
            Some((mut j, peek)) => {
                let start = j.current_index();
                let text = j
                    .known_skip(peek)
                    .ok()
                    .and_then(|_| base.get(start..j.current_index()));
                b.append_option(text);
            }
        },
        (Col::Int(b), Getter::Int) => b.append_option(found.and_then(|(mut j, peek)| match peek {
            Peek::String => j.known_str().ok()?.parse::<i64>().ok(),
            Peek::Null
            | Peek::True
            | Peek::False
            | Peek::Infinity
            | Peek::NaN
            | Peek::Array
            | Peek::Object => None,
            _ => match j.known_number(peek).ok()? {
                NumberAny::Int(NumberInt::Int(i)) => Some(i),
                NumberAny::Int(NumberInt::BigInt(b)) => i64::try_from(b).ok(),
                NumberAny::Float(f) => float_to_int(f),
            },
        })),
        (Col::Float(b), Getter::Float) => {
            b.append_option(found.and_then(|(mut j, peek)| match peek {
                Peek::String => j.known_str().ok()?.parse::<f64>().ok(),
                Peek::Null
                | Peek::True
                | Peek::False
                | Peek::Infinity
                | Peek::NaN
                | Peek::Array
                | Peek::Object => None,
                _ => match j.known_number(peek).ok()? {
                    NumberAny::Float(f) => Some(f),
                    NumberAny::Int(i) => Some(f64::from(i)),
                },
            }))
        }
        (Col::Bool(b), Getter::Bool) => {
            b.append_option(found.and_then(|(mut j, peek)| match peek {
                Peek::True | Peek::False => j.known_bool(peek).ok(),
                Peek::String => j.known_str().ok()?.parse::<bool>().ok(),
                _ => None,
            }))
        }
        // the builders are made from the getters, so this cannot happen;
        // a NULL keeps the column's length right if it ever did
        (Col::Str(b), _) => b.append_null(),
        (Col::Int(b), _) => b.append_null(),
        (Col::Float(b), _) => b.append_null(),
        (Col::Bool(b), _) => b.append_null(),
    }
}

/// The optimizer rule that fuses JSON getter calls (see the module doc).
#[derive(Debug)]
pub struct FuseJson {
    /// The registered getters (binary-aware wrappers), by getter.
    getters: Vec<(Getter, Arc<ScalarUDF>)>,
    multi: Arc<ScalarUDF>,
    field: Arc<ScalarUDF>,
}

impl FuseJson {
    /// The rule over the registered JSON functions `udfs` (by name); calls to
    /// any other function of the same name are left alone.
    pub fn new(udfs: &HashMap<String, Arc<ScalarUDF>>) -> Self {
        let getters = Getter::ALL
            .into_iter()
            .filter_map(|g| udfs.get(g.name()).map(|u| (g, u.clone())))
            .collect();
        FuseJson {
            getters,
            multi: Arc::new(ScalarUDF::new_from_impl(JsonMulti::new())),
            field: Arc::new(ScalarUDF::new_from_impl(JsonMultiField::new())),
        }
    }

    /// `e` as a fusable call: its payload column and spec.
    fn call(&self, e: &Expr, schema: &DFSchema) -> Option<(Column, Spec)> {
        let Expr::ScalarFunction(f) = e else {
            return None;
        };
        let getter = self
            .getters
            .iter()
            .find(|(_, u)| u.as_ref() == f.func.as_ref())
            .map(|(g, _)| *g)?;
        let (Expr::Column(c), path) = f.args.split_first()? else {
            return None;
        };
        let payload_ok = matches!(
            schema.field_from_column(c).ok()?.data_type(),
            DataType::Binary
                | DataType::LargeBinary
                | DataType::BinaryView
                | DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
        );
        if !payload_ok || e.get_type(schema).ok()? != getter.data_type() {
            return None;
        }
        Some((c.clone(), Spec::of_call(getter, path)?))
    }

    /// The fusable calls in `exprs` (over `schema`), in order, with repeats.
    fn calls(&self, exprs: &[&Expr], schema: &DFSchema) -> Vec<Call> {
        let mut out = Vec::new();
        for e in exprs {
            // the closure never fails
            let _ = e.apply(|x| {
                if matches!(x, Expr::Lambda(_)) {
                    return Ok(TreeNodeRecursion::Jump);
                }
                if let Some((c, s)) = self.call(x, schema) {
                    out.push(Call {
                        expr: x.clone(),
                        payload: c,
                        spec: s,
                    });
                    return Ok(TreeNodeRecursion::Jump);
                }
                Ok(TreeNodeRecursion::Continue)
            });
        }
        out
    }
}

/// A fusable getter call.
struct Call {
    /// The call.
    expr: Expr,
    /// Its payload column (as the node that will compute `json_multi` sees it).
    payload: Column,
    /// Its getter and path.
    spec: Spec,
}

/// The fusion chosen for one node: the `json_multi` columns to add below it
/// and the replacement of each fused call.
struct Fusion {
    /// `(alias, json_multi call)` per fused payload column.
    columns: Vec<(String, Expr)>,
    /// Each fused call and the `json_multi_field` that replaces it.
    replace: HashMap<Expr, Expr>,
}

impl Fusion {
    /// Fuse the payload columns that `calls` uses at least twice.
    fn plan(rule: &FuseJson, calls: &[Call], config: &dyn OptimizerConfig) -> Option<Fusion> {
        let mut by_payload: Vec<(&Column, Vec<&Call>)> = Vec::new();
        for c in calls {
            match by_payload.iter_mut().find(|(p, _)| *p == &c.payload) {
                Some((_, v)) => v.push(c),
                None => by_payload.push((&c.payload, vec![c])),
            }
        }
        let mut fusion = Fusion {
            columns: Vec::new(),
            replace: HashMap::new(),
        };
        for (payload, uses) in by_payload {
            if uses.len() < 2 {
                continue;
            }
            let alias = config.alias_generator().next("__fluxcap_json");
            let mut specs: Vec<&Spec> = Vec::new();
            for Call {
                expr: e, spec: s, ..
            } in uses
            {
                if fusion.replace.contains_key(e) {
                    continue;
                }
                let i = match specs.iter().position(|x| *x == s) {
                    Some(i) => i,
                    None => {
                        specs.push(s);
                        specs.len() - 1
                    }
                };
                let field = Expr::ScalarFunction(ScalarFunction::new_udf(
                    rule.field.clone(),
                    vec![
                        Expr::Column(Column::from_name(alias.clone())),
                        Expr::Literal(ScalarValue::Int64(Some(i as i64)), None),
                    ],
                ));
                fusion.replace.insert(e.clone(), field);
            }
            let mut args = vec![Expr::Column(payload.clone())];
            args.extend(
                specs
                    .iter()
                    .map(|s| Expr::Literal(ScalarValue::Utf8(Some(s.encode())), None)),
            );
            let multi = Expr::ScalarFunction(ScalarFunction::new_udf(rule.multi.clone(), args));
            fusion.columns.push((alias, multi));
        }
        (!fusion.columns.is_empty()).then_some(fusion)
    }

    /// `input` with the `json_multi` columns added.
    fn below(&self, input: Arc<LogicalPlan>) -> DfResult<Arc<LogicalPlan>> {
        let mut exprs: Vec<Expr> = input
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        exprs.extend(self.columns.iter().map(|(a, m)| m.clone().alias(a)));
        Ok(Arc::new(LogicalPlan::Projection(Projection::try_new(
            exprs, input,
        )?)))
    }

    /// `input`, a filter possibly under nodes that pass columns through
    /// (projections of columns, aliases), with the `json_multi` columns added below the filter and
    /// passed up, and the filter's predicate rewritten.
    fn through(&self, input: Arc<LogicalPlan>) -> DfResult<Arc<LogicalPlan>> {
        match Arc::unwrap_or_clone(input) {
            LogicalPlan::Projection(p) if passes_through(&p) => {
                let mut exprs = p.expr;
                exprs.extend(
                    self.columns
                        .iter()
                        .map(|(a, _)| Expr::Column(Column::from_name(a.clone()))),
                );
                let input = self.through(p.input)?;
                Ok(Arc::new(LogicalPlan::Projection(Projection::try_new(
                    exprs, input,
                )?)))
            }
            LogicalPlan::SubqueryAlias(a) => {
                let input = self.through(a.input)?;
                Ok(Arc::new(LogicalPlan::SubqueryAlias(
                    SubqueryAlias::try_new(input, a.alias)?,
                )))
            }
            LogicalPlan::Filter(f) => {
                let filter = Filter::try_new(self.rewrite(f.predicate)?, self.below(f.input)?)?;
                Ok(Arc::new(LogicalPlan::Filter(filter)))
            }
            _ => internal_err!("a filter was expected"),
        }
    }

    /// `e` with the fused calls replaced.
    fn rewrite(&self, e: Expr) -> DfResult<Expr> {
        Ok(e.transform_down(|x| match self.replace.get(&x) {
            Some(r) => Ok(Transformed::new(r.clone(), true, TreeNodeRecursion::Jump)),
            None => Ok(Transformed::no(x)),
        })?
        .data)
    }

    /// `exprs` rewritten, their names kept.
    fn rewrite_named(&self, exprs: Vec<Expr>, names: &NamePreserver) -> DfResult<Vec<Expr>> {
        exprs
            .into_iter()
            .map(|e| {
                let saved = names.save(&e);
                Ok(saved.restore(self.rewrite(e)?))
            })
            .collect()
    }
}

/// `col`, a column of the output of the first node of `chain`, as the
/// input of its last node sees it (the nodes pass columns through; see [`passes_through`]).
fn lower(col: &Column, chain: &[&LogicalPlan]) -> Option<Column> {
    let mut c = col.clone();
    for node in chain {
        c = match node {
            LogicalPlan::SubqueryAlias(a) => {
                let i = a.schema.index_of_column(&c).ok()?;
                let (q, f) = a.input.schema().qualified_field(i);
                Column::new(q.cloned(), f.name())
            }
            LogicalPlan::Projection(p) => match p.expr.get(p.schema.index_of_column(&c).ok()?) {
                Some(Expr::Column(x)) => x.clone(),
                _ => return None,
            },
            _ => return None,
        };
    }
    Some(c)
}

/// Whether `p` only passes some of its input's columns through.
fn passes_through(p: &Projection) -> bool {
    p.expr.iter().all(|e| matches!(e, Expr::Column(_)))
}

impl FuseJson {
    /// Fuse in `node` (and, for a projection or an aggregate, in the filter
    /// right below it or below projections that pass columns through).
    fn fuse_node(
        &self,
        node: LogicalPlan,
        config: &dyn OptimizerConfig,
    ) -> DfResult<Transformed<LogicalPlan>> {
        let (exprs, input): (Vec<&Expr>, &Arc<LogicalPlan>) = match &node {
            LogicalPlan::Projection(p) => (p.expr.iter().collect(), &p.input),
            LogicalPlan::Aggregate(a) => (
                a.group_expr.iter().chain(a.aggr_expr.iter()).collect(),
                &a.input,
            ),
            LogicalPlan::Filter(f) => {
                let calls = self.calls(&[&f.predicate], f.input.schema());
                let Some(fusion) = Fusion::plan(self, &calls, config) else {
                    return Ok(Transformed::no(node));
                };
                let LogicalPlan::Filter(f) = node else {
                    return internal_err!("a filter was expected");
                };
                let columns: Vec<Expr> = f
                    .input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                let filtered =
                    Filter::try_new(fusion.rewrite(f.predicate)?, fusion.below(f.input)?)?;
                let recovery =
                    Projection::try_new(columns, Arc::new(LogicalPlan::Filter(filtered)))?;
                return Ok(Transformed::yes(LogicalPlan::Projection(recovery)));
            }
            _ => return Ok(Transformed::no(node)),
        };
        let mut calls = self.calls(&exprs, input.schema());
        // the filter below, possibly under nodes that only pass columns
        // through (a view's alias, a projection that prunes columns)
        let mut chain: Vec<&LogicalPlan> = Vec::new();
        let mut below = input;
        loop {
            match below.as_ref() {
                LogicalPlan::Projection(p) if passes_through(p) => {
                    chain.push(below.as_ref());
                    below = &p.input;
                }
                LogicalPlan::SubqueryAlias(a) => {
                    chain.push(below.as_ref());
                    below = &a.input;
                }
                _ => break,
            }
        }
        let below_filter = match below.as_ref() {
            LogicalPlan::Filter(f) => {
                let in_filter = self.calls(&[&f.predicate], f.input.schema());
                if in_filter.is_empty() {
                    false
                } else {
                    // the node's payload columns as the filter sees them
                    calls = calls
                        .into_iter()
                        .filter_map(|c| {
                            let payload = lower(&c.payload, &chain)?;
                            Some(Call { payload, ..c })
                        })
                        .collect();
                    calls.extend(in_filter);
                    true
                }
            }
            _ => false,
        };
        let Some(fusion) = Fusion::plan(self, &calls, config) else {
            return Ok(Transformed::no(node));
        };
        let names = NamePreserver::new(&node);
        let new_input = |input: Arc<LogicalPlan>| -> DfResult<Arc<LogicalPlan>> {
            if below_filter {
                fusion.through(input)
            } else {
                fusion.below(input)
            }
        };
        Ok(Transformed::yes(match node {
            LogicalPlan::Projection(p) => {
                let exprs = fusion.rewrite_named(p.expr, &names)?;
                LogicalPlan::Projection(Projection::try_new(exprs, new_input(p.input)?)?)
            }
            LogicalPlan::Aggregate(a) => {
                let group = fusion.rewrite_named(a.group_expr, &names)?;
                let aggr = fusion.rewrite_named(a.aggr_expr, &names)?;
                LogicalPlan::Aggregate(Aggregate::try_new(new_input(a.input)?, group, aggr)?)
            }
            _ => return internal_err!("a projection or an aggregate was expected"),
        }))
    }
}

impl OptimizerRule for FuseJson {
    fn name(&self) -> &str {
        "fluxcap_fuse_json"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        config: &dyn OptimizerConfig,
    ) -> DfResult<Transformed<LogicalPlan>> {
        plan.transform_down_with_subqueries(|node| self.fuse_node(node, config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{BinaryArray, BinaryViewArray, RecordBatch};
    use arrow::datatypes::Schema;
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    /// Payloads that stress the getters' rules: nesting, indexes, duplicate
    /// keys, wrong types, big numbers, parse errors before and after the
    /// value, invalid UTF-8, JSON null, non-object roots.
    fn payloads() -> Vec<Option<&'static [u8]>> {
        let texts: &[&[u8]] = &[
            br#"{"a":1,"b":"x","c":{"d":[1,2,{"e":"deep"}]}}"#,
            br#"{"a":"42","b":2.0,"a":3,"b":"dup"}"#,
            br#"{"a":1.5,"b":true,"c":null,"d":false}"#,
            br#"{"a":9223372036854775808,"b":-0.0,"c":1e3,"d":-9223372036854775808}"#,
            br#"{"a":12345678901234567890123,"b":1.0e400,"c":2.5e-3}"#,
            br#"[10, {"a": 1}, "2", [5, 6]]"#,
            br#""just a string""#,
            b"null",
            b"42",
            b"",
            b"{",
            br#"{"a":1,"#,
            br#"{"x": [1,2"#,
            br#"{"b": bad, "a": 1}"#,
            br#"{"a": 1} trailing"#,
            br#"{"a": "abc"#,
            b"\xff{\"a\":1}",
            b"{\"a\":\"\xff\",\"b\":1}",
            br#"{"a": "tr\u00fce", "b": "true", "c": "1.5e2", "d": " 5"}"#,
            br#"{"a": {"b": {"c": 7}}, "arr": [[1,2],[3,4]]}"#,
            "{\"a\\\"q\": 1, \"é\": 2, \"a\": [1, 2, 3]}".as_bytes(),
            br#"{"0": "zero", "a": [1,2,3], "c": {"d": []}}"#,
            b"  { \"a\" :  1 , \"b\"  : [ 1 , 2 ] , \"c\" : { \"d\" : [ 0 , 1 , { \"e\" : 2 } ] } }  ",
            br#"{"a": NaN, "b": Infinity}"#,
            br#"{"a": [], "b": {}, "c": {"d": {"0": 1}}}"#,
            br#"{"a": -5, "b": "-5", "c": true, "d": "false"}"#,
            br#"{"a": "\"quoted\" \\ \n", "b": [1, "two", null], "c": {"d": [null, null, null]}}"#,
            br#"{"c": {"d": [1, 2, {"e": 3}], "d": "second"}, "a": 2}"#,
        ];
        let mut v: Vec<Option<&[u8]>> = texts.iter().map(|t| Some(*t)).collect();
        v.push(None);
        v
    }

    const PATHS: &[&str] = &[
        "'a'",
        "'b'",
        "'c'",
        "'d'",
        "'c', 'd', 2, 'e'",
        "'c', 'd', -1",
        "'c', 'd', -4",
        "'c', 'd', '1'",
        "'c', 'd', '-1', 'e'",
        "'arr', 1, 0",
        "0",
        "'0'",
        "1, 'a'",
        "-1, 0",
        "'a', 'b', 'c'",
        "'a\"q'",
        "'é'",
        "'missing'",
        "'a', 0",
        "'b', 1",
    ];

    async fn context(fuse: bool, binary_view: bool) -> SessionContext {
        let ctx = SessionContext::new();
        super::super::json::register_with(&ctx, fuse).unwrap();
        let data: ArrayRef = if binary_view {
            Arc::new(BinaryViewArray::from(payloads()))
        } else {
            Arc::new(BinaryArray::from(payloads()))
        };
        let id: ArrayRef = Arc::new(arrow::array::Int64Array::from_iter_values(
            0..data.len() as i64,
        ));
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("data", data.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![id, data]).unwrap();
        let table = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
        ctx.register_table("t", Arc::new(table)).unwrap();
        ctx
    }

    async fn rows(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    async fn plan(ctx: &SessionContext, sql: &str) -> String {
        let batches = ctx
            .sql(&format!("EXPLAIN {sql}"))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        arrow::util::pretty::pretty_format_batches(&batches)
            .unwrap()
            .to_string()
    }

    /// The same rows with and without fusion, and the fused physical plan
    /// calls one function on the payload, `json_multi` (a call shows as
    /// `f(data@i, ...)`; the getters' names remain as column names).
    async fn same_rows(sql: &str, binary_view: bool) {
        let on = context(true, binary_view).await;
        let off = context(false, binary_view).await;
        assert_eq!(rows(&on, sql).await, rows(&off, sql).await, "{sql}");
        let p = plan(&on, sql).await;
        let physical = p.split("physical_plan").nth(1).unwrap_or_default();
        assert_eq!(physical.matches("(data@").count(), 1, "{sql}\n{p}");
        assert_eq!(
            physical.matches("json_multi(data@").count(),
            1,
            "{sql}\n{p}"
        );
        let p = plan(&off, sql).await;
        assert!(!p.contains("json_multi"), "{p}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn every_getter_on_tricky_payloads_matches_the_functions() {
        let getters = [
            "json_get_str",
            "json_get_int",
            "json_get_float",
            "json_get_bool",
            "json_as_text",
            "json_contains",
        ];
        let mut cols = vec!["id".to_string()];
        for p in PATHS {
            for g in getters {
                cols.push(format!("{g}(data, {p})"));
            }
        }
        let sql = format!("SELECT {} FROM t ORDER BY id", cols.join(", "));
        for view in [true, false] {
            same_rows(&sql, view).await;
        }
        // the operators and casts the crate rewrites to getters
        same_rows(
            "SELECT id, data->>'a', data->>'b', data->>'c' FROM t ORDER BY id",
            true,
        )
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_filter_and_its_aggregate_share_one_parse() {
        same_rows(
            "SELECT json_get_str(data, 'b') AS b, count(*) AS n FROM t \
             WHERE json_get_int(data, 'a') > 0 AND json_get_str(data, 'b') IS NOT NULL GROUP BY 1 ORDER BY 1",
            true,
        )
        .await;
        same_rows(
            "SELECT json_get_str(data, 'b') AS b, count(*) AS n FROM (SELECT id, data FROM t) AS v \
             WHERE json_get_int(data, 'a') > 0 AND json_get_str(data, 'b') IS NOT NULL GROUP BY 1 ORDER BY 1",
            true,
        )
        .await;
        same_rows(
            "SELECT count(*) AS n FROM t WHERE json_get_float(data, 'a') > 0.5 OR json_contains(data, 'c')",
            true,
        )
        .await;
        same_rows(
            "SELECT id FROM t WHERE json_get_int(data, 'a') IS NULL AND (data->>'b') IS NOT NULL ORDER BY id",
            true,
        )
        .await;
        same_rows(
            "SELECT id, json_get_str(data, 'b') AS b FROM t \
             WHERE id > 2 AND json_get_bool(data, 'b') IS NULL ORDER BY id",
            true,
        )
        .await;
        same_rows(
            "SELECT json_get_int(data, 'a') AS a, sum(json_get_float(data, 'b')) AS s, \
             max(json_get_str(data, 'c', 'd', -1)) FROM t GROUP BY 1 ORDER BY 1",
            false,
        )
        .await;
    }

    #[tokio::test(flavor = "current_thread")]
    async fn one_call_is_not_fused() {
        let on = context(true, true).await;
        let sql = "SELECT json_get_str(data, 'b') FROM t WHERE id > 3";
        assert!(!plan(&on, sql).await.contains("json_multi"));
    }

    #[test]
    fn specs_round_trip() {
        let s = Spec {
            getter: Getter::Float,
            path: vec![
                Step::Key("a\"b".into()),
                Step::Index(-2),
                Step::Key("3".into()),
            ],
        };
        assert_eq!(Spec::decode(&s.encode()).unwrap(), s);
        assert!(Spec::decode("[\"nope\"]").is_err());
        assert!(Spec::decode("[\"json_get_int\", 1.5]").is_err());
    }

    #[test]
    fn integral_floats_only() {
        assert_eq!(float_to_int(2e3), Some(2000));
        assert_eq!(float_to_int(-9_223_372_036_854_775_808.0), Some(i64::MIN));
        assert_eq!(float_to_int(9_223_372_036_854_775_808.0), None);
        assert_eq!(float_to_int(1.5), None);
        assert_eq!(float_to_int(f64::NAN), None);
    }
}
