//! List queries over the read model (SPEC §5): field paths, filters, sort keys and projections,
//! parsed from query-string pairs, plus the reference semantics every store backend must agree
//! with ([`Filter::matches`], [`SortSlot`]).
//!
//! Semantics, the same on every backend:
//! - A filter value is a JSON scalar when it parses as one (`100`, `1.5`, `true`, `null`,
//!   `"quoted text"`), otherwise the text as a string (`paid`). A filter matches only values of
//!   the same JSON type: `qty=5` matches the number 5, not the string `"5"` (write `qty="5"`).
//! - Range operators (`gt`, `gte`, `lt`, `lte`) compare numbers numerically and strings by
//!   Unicode code point (byte order of UTF-8), and apply to numbers and strings only.
//! - Sorting orders values by kind first — missing, null, false, true, numbers, strings, then
//!   arrays and objects (which tie among themselves) — then by value; ties are broken by id,
//!   ascending, so every order is total and stable.

use std::cmp::Ordering;
use std::fmt;

use serde_json::Value;

pub use crate::limits::FIELDS_MAX;
pub use crate::limits::FILTERS_MAX;
pub use crate::limits::IN_VALUES_MAX;
pub use crate::limits::PATH_SEGMENTS_MAX;
pub use crate::limits::SEGMENT_BYTES_MAX;
pub use crate::limits::SORT_KEYS_MAX;
pub use crate::limits::VALUE_BYTES_MAX;

/// A query that cannot be run: which parameter, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct QueryError {
    /// The query parameter at fault.
    pub parameter: String,
    /// What is wrong with it.
    pub message: String,
}

impl QueryError {
    fn new(parameter: &str, message: impl Into<String>) -> QueryError {
        QueryError { parameter: parameter.to_owned(), message: message.into() }
    }
}

/// A path to a field inside a document: dot-separated property names (`customer.id`), each
/// made of ASCII letters, digits, `_` and `-`. Validated, so backends may write it into SQL.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FieldPath(Vec<String>);

impl FieldPath {
    /// Parses `a.b.c`.
    pub fn parse(raw: &str) -> Result<FieldPath, String> {
        let segments: Vec<String> = raw.split('.').map(str::to_owned).collect();
        if segments.len() > PATH_SEGMENTS_MAX {
            return Err(format!("a field path has at most {PATH_SEGMENTS_MAX} segments"));
        }
        for s in &segments {
            if s.is_empty() {
                return Err(format!("'{raw}' is not a field path: empty segment"));
            }
            if s.len() > SEGMENT_BYTES_MAX {
                return Err(format!("a field path segment has at most {SEGMENT_BYTES_MAX} bytes"));
            }
            if !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                return Err(format!(
                    "'{raw}' is not a field path: segments are made of ASCII letters, digits, '_' and '-'"
                ));
            }
        }
        if segments[0] == "_meta" {
            return Err("fields under _meta cannot be queried; use id, or a document field".into());
        }
        Ok(FieldPath(segments))
    }

    /// The segments.
    pub fn segments(&self) -> &[String] {
        &self.0
    }

    /// The value at this path in `doc`, if present.
    pub fn get<'a>(&self, doc: &'a Value) -> Option<&'a Value> {
        self.0.iter().try_fold(doc, |v, s| v.as_object()?.get(s))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// What a filter or sort key addresses: the aggregate id, or a document field.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    /// The aggregate id (a string).
    Id,
    /// A field of the document.
    Doc(FieldPath),
}

impl Field {
    /// Parses `id` or a field path.
    pub fn parse(raw: &str) -> Result<Field, String> {
        if raw == "id" { Ok(Field::Id) } else { FieldPath::parse(raw).map(Field::Doc) }
    }

    /// The field's value for an aggregate with this id and document.
    pub fn get<'a>(&self, id: &'a Value, doc: &'a Value) -> Option<&'a Value> {
        match self {
            Field::Id => Some(id),
            Field::Doc(p) => p.get(doc),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Id => f.write_str("id"),
            Field::Doc(p) => p.fmt(f),
        }
    }
}

/// A range comparison.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Range {
    /// Greater than.
    Gt,
    /// Greater than or equal.
    Gte,
    /// Less than.
    Lt,
    /// Less than or equal.
    Lte,
}

impl Range {
    /// The SQL operator.
    pub fn sql(self) -> &'static str {
        match self {
            Range::Gt => ">",
            Range::Gte => ">=",
            Range::Lt => "<",
            Range::Lte => "<=",
        }
    }

    fn holds(self, o: Ordering) -> bool {
        match self {
            Range::Gt => o == Ordering::Greater,
            Range::Gte => o != Ordering::Less,
            Range::Lt => o == Ordering::Less,
            Range::Lte => o != Ordering::Greater,
        }
    }
}

/// The operators a filter may use, as written in `field[op]=value`.
pub const OPERATORS: &[&str] = &["eq", "gt", "gte", "lt", "lte", "in", "exists", "prefix"];

/// One condition on a field.
#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    /// The field equals one of these scalars (one value for `eq`, several for `in`).
    In {
        /// The field.
        field: Field,
        /// The values, each a JSON scalar.
        values: Vec<Value>,
    },
    /// The field compares with a number or a string.
    Range {
        /// The field.
        field: Field,
        /// The comparison.
        op: Range,
        /// A number or a string.
        value: Value,
    },
    /// The field is present (with any value, `null` included) or absent.
    Exists {
        /// The field.
        field: Field,
        /// `true`: present; `false`: absent.
        present: bool,
    },
    /// The field is a string starting with this text.
    Prefix {
        /// The field.
        field: Field,
        /// The prefix.
        prefix: String,
    },
}

/// Parses one filter value: a JSON scalar when it parses as one, else the text as a string.
pub fn parse_value(parameter: &str, raw: &str) -> Result<Value, QueryError> {
    if raw.len() > VALUE_BYTES_MAX {
        return Err(QueryError::new(parameter, format!("a filter value has at most {VALUE_BYTES_MAX} bytes")));
    }
    let v = match serde_json::from_str::<Value>(raw) {
        Ok(Value::Array(_) | Value::Object(_)) => {
            return Err(QueryError::new(parameter, "a filter value is a number, a string, true, false or null"));
        }
        Ok(v) => v,
        Err(_) => Value::String(raw.to_owned()),
    };
    if v.as_str().is_some_and(|s| s.contains('\0')) {
        return Err(nul(parameter));
    }
    Ok(v)
}

/// No stored string holds U+0000 (it is refused on the way in), and PostgreSQL cannot bind one.
fn nul(parameter: &str) -> QueryError {
    QueryError::new(parameter, "a filter value may not contain U+0000 (NUL); no stored string holds one")
}

/// Splits an `in` list on commas outside double-quoted strings.
fn split_list(raw: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in raw.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&raw[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&raw[start..]);
    parts
}

impl Filter {
    /// Parses one query-string pair: `field=value` (equality) or `field[op]=value`.
    pub fn parse(key: &str, raw: &str) -> Result<Filter, QueryError> {
        let (name, op) = match key.strip_suffix(']').and_then(|k| k.split_once('[')) {
            Some((name, op)) => (name, op),
            None => (key, "eq"),
        };
        let field = Field::parse(name).map_err(|m| QueryError::new(key, m))?;
        let scalar = || parse_value(key, raw);
        let ordered = |v: Value| match v {
            Value::Number(_) | Value::String(_) => Ok(v),
            _ => Err(QueryError::new(key, format!("{op} compares numbers and strings only"))),
        };
        Ok(match op {
            "eq" => Filter::In { field, values: vec![scalar()?] },
            "in" => {
                let parts = split_list(raw);
                if parts.len() > IN_VALUES_MAX {
                    return Err(QueryError::new(key, format!("in takes at most {IN_VALUES_MAX} values")));
                }
                let values = parts.into_iter().map(|p| parse_value(key, p)).collect::<Result<Vec<_>, _>>()?;
                Filter::In { field, values }
            }
            "gt" => Filter::Range { field, op: Range::Gt, value: ordered(scalar()?)? },
            "gte" => Filter::Range { field, op: Range::Gte, value: ordered(scalar()?)? },
            "lt" => Filter::Range { field, op: Range::Lt, value: ordered(scalar()?)? },
            "lte" => Filter::Range { field, op: Range::Lte, value: ordered(scalar()?)? },
            "exists" => match raw {
                "true" | "" => Filter::Exists { field, present: true },
                "false" => Filter::Exists { field, present: false },
                _ => return Err(QueryError::new(key, "exists takes true or false")),
            },
            "prefix" => {
                if raw.is_empty() || raw.len() > VALUE_BYTES_MAX {
                    return Err(QueryError::new(key, format!("a prefix has 1 to {VALUE_BYTES_MAX} bytes")));
                }
                if raw.contains('\0') {
                    return Err(nul(key));
                }
                Filter::Prefix { field, prefix: raw.to_owned() }
            }
            other => {
                return Err(QueryError::new(
                    key,
                    format!("unknown operator '{other}'; known operators: {}", OPERATORS.join(", ")),
                ));
            }
        })
    }

    /// The field the filter tests.
    pub fn field(&self) -> &Field {
        match self {
            Filter::In { field, .. }
            | Filter::Range { field, .. }
            | Filter::Exists { field, .. }
            | Filter::Prefix { field, .. } => field,
        }
    }

    /// The reference semantics: whether an aggregate with this id and document matches.
    pub fn matches(&self, id: &str, doc: &Value) -> bool {
        let id = Value::String(id.to_owned());
        let value = self.field().get(&id, doc);
        match (self, value) {
            (Filter::Exists { present, .. }, v) => v.is_some() == *present,
            (_, None) => false,
            (Filter::In { values, .. }, Some(v)) => values.iter().any(|w| scalar_eq(v, w)),
            (Filter::Range { op, value: bound, .. }, Some(v)) => {
                same_kind(v, bound) && compare_scalars(v, bound).is_some_and(|o| op.holds(o))
            }
            (Filter::Prefix { prefix, .. }, Some(v)) => v.as_str().is_some_and(|s| s.starts_with(prefix.as_str())),
        }
    }
}

fn same_kind(a: &Value, b: &Value) -> bool {
    matches!((a, b), (Value::Number(_), Value::Number(_)) | (Value::String(_), Value::String(_)))
}

fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(_), Value::Number(_)) => compare_scalars(a, b) == Some(Ordering::Equal),
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

/// Compares two numbers (exactly when both are integers) or two strings (by code point).
fn compare_scalars(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => Some(x.cmp(&y)),
            _ => x.as_f64()?.partial_cmp(&y.as_f64()?),
        },
        (Value::String(x), Value::String(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        _ => None,
    }
}

/// One sort key: a field and a direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SortKey {
    /// The field.
    pub field: Field,
    /// Descending instead of ascending.
    pub descending: bool,
}

/// Parses `sort=a,-b`: fields separated by commas, `-` for descending.
pub fn parse_sort(raw: &str) -> Result<Vec<SortKey>, QueryError> {
    let mut keys = Vec::new();
    for part in raw.split(',') {
        let (name, descending) = match part.strip_prefix('-') {
            Some(n) => (n, true),
            None => (part.strip_prefix('+').unwrap_or(part), false),
        };
        let field = Field::parse(name).map_err(|m| QueryError::new("sort", m))?;
        if keys.iter().any(|k: &SortKey| k.field == field) {
            return Err(QueryError::new("sort", format!("'{field}' appears twice")));
        }
        let is_id = field == Field::Id;
        keys.push(SortKey { field, descending });
        if is_id {
            break; // ids are unique: later keys could never decide
        }
    }
    if keys.len() > SORT_KEYS_MAX {
        return Err(QueryError::new("sort", format!("at most {SORT_KEYS_MAX} sort keys")));
    }
    Ok(keys)
}

/// Parses `fields=a,b.c`: the document fields a list returns (besides `id` and `_meta`).
pub fn parse_fields(raw: &str) -> Result<Vec<FieldPath>, QueryError> {
    let fields = raw
        .split(',')
        .map(|f| FieldPath::parse(f).map_err(|m| QueryError::new("fields", m)))
        .collect::<Result<Vec<_>, _>>()?;
    if fields.len() > FIELDS_MAX {
        return Err(QueryError::new("fields", format!("at most {FIELDS_MAX} fields")));
    }
    Ok(fields)
}

/// The document cut down to `fields` (each kept at its path when present).
pub fn project(doc: &Value, fields: &[FieldPath]) -> Value {
    let mut out = Value::Object(serde_json::Map::new());
    for field in fields {
        let Some(value) = field.get(doc) else { continue };
        let mut at = &mut out;
        let (last, parents) = field.segments().split_last().expect("a field path has a segment");
        for s in parents {
            let Value::Object(m) = at else { break };
            at = m.entry(s.clone()).or_insert_with(|| Value::Object(serde_json::Map::new()));
        }
        if let Value::Object(m) = at {
            m.insert(last.clone(), value.clone());
        }
    }
    out
}

/// Where a value falls in the sort order: its kind's rank, then its number, then its text.
/// Backends compute the same three parts in SQL; a cursor carries them for each sort key.
#[derive(Clone, Debug, PartialEq)]
pub struct SortSlot {
    /// 0 missing, 1 null, 2 false, 3 true, 4 number, 5 string, 6 array or object.
    pub rank: i64,
    /// The number (0 unless a number).
    pub num: serde_json::Number,
    /// The string ("" unless a string).
    pub text: String,
}

impl SortSlot {
    /// The slot of a field's value.
    pub fn of(value: Option<&Value>) -> SortSlot {
        let zero = serde_json::Number::from(0);
        let (rank, num, text) = match value {
            None => (0, zero, String::new()),
            Some(Value::Null) => (1, zero, String::new()),
            Some(Value::Bool(false)) => (2, zero, String::new()),
            Some(Value::Bool(true)) => (3, zero, String::new()),
            Some(Value::Number(n)) => (4, n.clone(), String::new()),
            Some(Value::String(s)) => (5, zero, s.clone()),
            Some(Value::Array(_) | Value::Object(_)) => (6, zero, String::new()),
        };
        SortSlot { rank, num, text }
    }

    /// The reference order of slots (ascending).
    pub fn compare(&self, other: &SortSlot) -> Ordering {
        self.rank
            .cmp(&other.rank)
            .then_with(|| {
                compare_scalars(&Value::Number(self.num.clone()), &Value::Number(other.num.clone()))
                    .unwrap_or(Ordering::Equal)
            })
            .then_with(|| self.text.as_bytes().cmp(other.text.as_bytes()))
    }
}

/// The reference order of two aggregates under `keys`, ties broken by id ascending.
pub fn compare_rows(keys: &[SortKey], a: (&str, &Value), b: (&str, &Value)) -> Ordering {
    let (ida, idb) = (Value::String(a.0.to_owned()), Value::String(b.0.to_owned()));
    for key in keys {
        let o = SortSlot::of(key.field.get(&ida, a.1)).compare(&SortSlot::of(key.field.get(&idb, b.1)));
        let o = if key.descending { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    a.0.as_bytes().cmp(b.0.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn filters_parse() {
        let f = |k: &str, v: &str| Filter::parse(k, v);
        let path = |p: &str| Field::Doc(FieldPath::parse(p).unwrap());
        assert_eq!(f("status", "paid").unwrap(), Filter::In { field: path("status"), values: vec![json!("paid")] });
        assert_eq!(f("qty", "5").unwrap(), Filter::In { field: path("qty"), values: vec![json!(5)] });
        assert_eq!(f("qty", "\"5\"").unwrap(), Filter::In { field: path("qty"), values: vec![json!("5")] });
        assert_eq!(
            f("total[gte]", "100").unwrap(),
            Filter::Range { field: path("total"), op: Range::Gte, value: json!(100) }
        );
        assert_eq!(
            f("s[in]", "a,\"b,c\",3,null").unwrap(),
            Filter::In { field: path("s"), values: vec![json!("a"), json!("b,c"), json!(3), json!(null)] }
        );
        assert_eq!(f("id[prefix]", "o-").unwrap(), Filter::Prefix { field: Field::Id, prefix: "o-".into() });
        assert_eq!(f("a.b[exists]", "false").unwrap(), Filter::Exists { field: path("a.b"), present: false });
        let e = f("a[near]", "1").unwrap_err();
        assert!(e.message.contains("unknown operator 'near'") && e.message.contains("prefix"), "{e}");
        assert!(f("a[gt]", "true").is_err());
        assert!(f("a..b", "1").is_err());
        assert!(f("a b", "1").is_err());
        assert!(f("_meta.version", "1").is_err());
        assert!(f("a", "[1]").is_err());
        assert!(f("a[exists]", "maybe").is_err());
    }

    #[test]
    fn reference_semantics() {
        let doc = json!({"n": 5, "f": 2.5, "s": "abc", "t": true, "z": null, "o": {"x": 1}});
        let m = |k: &str, v: &str| Filter::parse(k, v).unwrap().matches("id-1", &doc);
        assert!(m("n", "5") && m("n", "5.0") && !m("n", "\"5\""));
        assert!(m("n[gt]", "4.5") && !m("n[gt]", "5") && m("n[gte]", "5"));
        assert!(m("s[lt]", "abd") && !m("s[lt]", "5") && !m("n[lt]", "abc"));
        assert!(m("t", "true") && !m("t", "1") && m("z", "null") && !m("missing", "null"));
        assert!(m("z[exists]", "true") && m("missing[exists]", "false") && m("o.x", "1"));
        assert!(m("s[prefix]", "ab") && !m("n[prefix]", "5") && m("id[prefix]", "id-"));
        assert!(m("s[in]", "x,abc") && !m("s[in]", "x,y"));
    }

    #[test]
    fn sort_order_is_by_kind_then_value_then_id() {
        let keys = parse_sort("v").unwrap();
        let docs = [
            ("a", json!({})),
            ("b", json!({"v": null})),
            ("c", json!({"v": false})),
            ("d", json!({"v": true})),
            ("e", json!({"v": -1.5})),
            ("f", json!({"v": 2})),
            ("g", json!({"v": "A"})),
            ("h", json!({"v": "a"})),
            ("i", json!({"v": [1]})),
            ("j", json!({"v": {"x": 1}})),
        ];
        for w in docs.windows(2) {
            assert_eq!(compare_rows(&keys, (w[0].0, &w[0].1), (w[1].0, &w[1].1)), Ordering::Less, "{w:?}");
        }
        let desc = parse_sort("-v,id").unwrap();
        assert_eq!(desc.len(), 2);
        assert_eq!(compare_rows(&desc, ("a", &json!({"v": 1})), ("b", &json!({"v": 2}))), Ordering::Greater);
        assert!(parse_sort("a,a").is_err() && parse_sort("a,b,c,d,e").is_err());
    }

    #[test]
    fn projection_keeps_paths() {
        let doc = json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 4});
        let fields = parse_fields("a,b.c,missing").unwrap();
        assert_eq!(project(&doc, &fields), json!({"a": 1, "b": {"c": 2}}));
    }
}
