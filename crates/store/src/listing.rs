//! List queries in SQL (SPEC §5): one builder, two dialects. Every value is a bound
//! parameter; field paths, validated by [`sourced_core::query::FieldPath`], are the only text
//! written into the SQL (so an index on the same expression can serve the query).
//!
//! The SQL reproduces the reference semantics of [`sourced_core::query`] exactly: a filter
//! matches only values of its own JSON type, and a sort key orders by the three parts of a
//! [`SortSlot`] (kind rank, number, text by code point), then by id.

use serde_json::Value;
use sourced_core::query::{Field, FieldPath, Filter, SortKey, SortSlot};

use crate::{ListCursor, ListQuery};

/// The SQL dialect of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dialect {
    Sqlite,
    Postgres,
}

/// A bound parameter.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Param {
    Text(String),
    Int(i64),
    Float(f64),
    /// A JSON scalar as JSON text (PostgreSQL compares it as `jsonb`).
    Json(String),
    /// A number as decimal text (PostgreSQL compares it as `numeric`).
    Numeric(serde_json::Number),
}

/// A statement and its parameters, in order.
#[derive(Debug, Default)]
pub(crate) struct Sql {
    pub text: String,
    pub params: Vec<Param>,
}

/// The SQL expressions of one field.
struct Expr {
    /// The value as SQL (`json_extract` in SQLite, `jsonb` in PostgreSQL).
    value: String,
    /// The JSON type of the value (`json_type` / `jsonb_typeof`).
    kind: String,
    /// The value as text (PostgreSQL's `#>>`; SQLite's `json_extract` already is).
    text: String,
}

impl Dialect {
    fn table(self) -> &'static str {
        match self {
            Dialect::Sqlite => "documents",
            Dialect::Postgres => "sourced_documents",
        }
    }

    /// The indexed expression of a document field.
    pub(crate) fn field_value(self, path: &FieldPath) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract(state, '{}')", sqlite_path(path)),
            Dialect::Postgres => format!("(state::jsonb #> '{}')", pg_path(path)),
        }
    }

    fn expr(self, path: &FieldPath) -> Expr {
        match self {
            Dialect::Sqlite => {
                let p = sqlite_path(path);
                let value = format!("json_extract(state, '{p}')");
                Expr { kind: format!("json_type(state, '{p}')"), text: value.clone(), value }
            }
            Dialect::Postgres => {
                let p = pg_path(path);
                // The read model keeps the document as `json` (its key order is the user's);
                // the cast is immutable, so an index on the same expression serves the query.
                Expr {
                    value: format!("(state::jsonb #> '{p}')"),
                    kind: format!("jsonb_typeof(state::jsonb #> '{p}')"),
                    text: format!("(state::jsonb #>> '{p}')"),
                }
            }
        }
    }

    /// The DDL of the index that serves filters on `path`: one per path, for every type.
    pub(crate) fn index_ddl(self, path: &FieldPath) -> (String, String) {
        let name = format!("{}_f{:016x}", self.table(), crate::fnv1a(path.to_string().as_bytes()));
        let ddl = format!(
            "CREATE INDEX IF NOT EXISTS {name} ON {} (tenant, type, {}, agg_id)",
            self.table(),
            self.field_value(path)
        );
        (name, ddl)
    }
}

fn sqlite_path(path: &FieldPath) -> String {
    let mut p = String::from("$");
    for s in path.segments() {
        p.push_str(".\"");
        p.push_str(s);
        p.push('"');
    }
    p
}

fn pg_path(path: &FieldPath) -> String {
    format!("{{{}}}", path.segments().join(","))
}

struct Builder {
    dialect: Dialect,
    sql: Sql,
}

impl Builder {
    fn bind(&mut self, p: Param) -> String {
        let cast = match (&p, self.dialect) {
            (_, Dialect::Sqlite) => "",
            (Param::Text(_), _) => "::text",
            (Param::Int(_), _) => "::int8",
            (Param::Float(_), _) => "::float8",
            (Param::Json(_), _) => "::text::jsonb",
            (Param::Numeric(_), _) => "::text::numeric",
        };
        self.sql.params.push(p);
        match self.dialect {
            Dialect::Sqlite => format!("?{}", self.sql.params.len()),
            Dialect::Postgres => format!("${}{cast}", self.sql.params.len()),
        }
    }

    /// A number bound for comparison with a document's number.
    fn bind_number(&mut self, n: &serde_json::Number) -> String {
        match self.dialect {
            Dialect::Sqlite => match n.as_i64() {
                Some(i) => self.bind(Param::Int(i)),
                None => self.bind(Param::Float(n.as_f64().unwrap_or(0.0))),
            },
            Dialect::Postgres => self.bind(Param::Numeric(n.clone())),
        }
    }

    fn push(&mut self, s: &str) {
        self.sql.text.push_str(s);
    }

    /// The condition of one filter.
    fn filter(&mut self, filter: &Filter) -> String {
        match (filter.field(), filter) {
            (Field::Id, Filter::Exists { present, .. }) => bool_sql(*present).into(),
            (Field::Id, Filter::In { values, .. }) => {
                let ids: Vec<String> = values
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|s| {
                        let p = self.bind(Param::Text(s.to_owned()));
                        format!("agg_id = {p}")
                    })
                    .collect();
                any(ids)
            }
            (Field::Id, Filter::Range { op, value, .. }) => match value.as_str() {
                Some(s) => {
                    let p = self.bind(Param::Text(s.to_owned()));
                    format!("agg_id {} {p}", op.sql())
                }
                None => bool_sql(false).into(),
            },
            (Field::Id, Filter::Prefix { prefix, .. }) => self.prefix("agg_id", prefix),
            (Field::Doc(path), _) => self.doc_filter(path, filter),
        }
    }

    fn doc_filter(&mut self, path: &FieldPath, filter: &Filter) -> String {
        let e = self.dialect.expr(path);
        let (kind, value) = (&e.kind, &e.value);
        match (self.dialect, filter) {
            (_, Filter::Exists { present: true, .. }) => format!("{kind} IS NOT NULL"),
            (_, Filter::Exists { present: false, .. }) => format!("{kind} IS NULL"),
            (Dialect::Sqlite, Filter::In { values, .. }) => {
                let conds = values
                    .iter()
                    .map(|v| match v {
                        Value::Number(n) => {
                            let p = self.bind_number(n);
                            format!("({value} = {p} AND {kind} IN ('integer', 'real'))")
                        }
                        Value::String(s) => {
                            let p = self.bind(Param::Text(s.clone()));
                            format!("({value} = {p} AND {kind} = 'text')")
                        }
                        Value::Bool(true) => format!("({value} = 1 AND {kind} = 'true')"),
                        Value::Bool(false) => format!("({value} = 0 AND {kind} = 'false')"),
                        // json_extract gives NULL for JSON null (and for no value): the
                        // first term lets an index serve this branch too.
                        _ => format!("({value} IS NULL AND {kind} = 'null')"),
                    })
                    .collect();
                any(conds)
            }
            (Dialect::Postgres, Filter::In { values, .. }) => {
                let conds = values
                    .iter()
                    .map(|v| {
                        let p = self.bind(Param::Json(v.to_string()));
                        format!("{value} = {p}")
                    })
                    .collect();
                any(conds)
            }
            (_, Filter::Range { op, value: Value::Number(n), .. }) => {
                let p = self.bind_number(n);
                match self.dialect {
                    Dialect::Sqlite => format!("({value} {} {p} AND {kind} IN ('integer', 'real'))", op.sql()),
                    // jsonb compares numbers exactly; the bound value is numeric, so as jsonb.
                    Dialect::Postgres => {
                        format!("({value} {} to_jsonb({p}) AND {kind} = 'number')", op.sql())
                    }
                }
            }
            (_, Filter::Range { op, value: Value::String(s), .. }) => {
                let p = self.bind(Param::Text(s.clone()));
                match self.dialect {
                    Dialect::Sqlite => format!("({value} {} {p} AND {kind} = 'text')", op.sql()),
                    Dialect::Postgres => {
                        format!("({} COLLATE \"C\" {} {p} AND {kind} = 'string')", e.text, op.sql())
                    }
                }
            }
            (_, Filter::Range { .. }) => bool_sql(false).into(),
            (_, Filter::Prefix { prefix, .. }) => {
                let text_kind = if self.dialect == Dialect::Sqlite { "text" } else { "string" };
                let cond = self.prefix(&e.text, prefix);
                format!("({cond} AND {kind} = '{text_kind}')")
            }
        }
    }

    fn prefix(&mut self, text: &str, prefix: &str) -> String {
        let p = self.bind(Param::Text(prefix.to_owned()));
        match self.dialect {
            // The range lets an index on the expression serve it; substr makes it exact.
            Dialect::Sqlite => format!("({text} >= {p} AND substr({text}, 1, length({p})) = {p})"),
            Dialect::Postgres => format!("starts_with({text}, {p})"),
        }
    }

    /// The three parts of a sort key's slot, as SQL.
    fn slot(&self, field: &Field) -> [String; 3] {
        let path = match field {
            Field::Id => {
                return ["5".into(), "0".into(), "agg_id".into()];
            }
            Field::Doc(path) => path,
        };
        let e = self.dialect.expr(path);
        let k = &e.kind;
        match self.dialect {
            Dialect::Sqlite => [
                format!(
                    "(CASE {k} WHEN 'null' THEN 1 WHEN 'false' THEN 2 WHEN 'true' THEN 3 WHEN 'integer' THEN 4 \
                     WHEN 'real' THEN 4 WHEN 'text' THEN 5 WHEN 'array' THEN 6 WHEN 'object' THEN 6 ELSE 0 END)"
                ),
                format!("(CASE WHEN {k} IN ('integer', 'real') THEN {} ELSE 0 END)", e.value),
                format!("(CASE WHEN {k} = 'text' THEN {} ELSE '' END)", e.value),
            ],
            Dialect::Postgres => [
                format!(
                    "(CASE {k} WHEN 'null' THEN 1 WHEN 'boolean' THEN (CASE WHEN {v} = 'true'::jsonb THEN 3 ELSE 2 \
                     END) WHEN 'number' THEN 4 WHEN 'string' THEN 5 WHEN 'array' THEN 6 WHEN 'object' THEN 6 \
                     ELSE 0 END)",
                    v = e.value
                ),
                format!("(CASE WHEN {k} = 'number' THEN ({})::numeric ELSE 0 END)", e.value),
                format!("((CASE WHEN {k} = 'string' THEN {} ELSE '' END) COLLATE \"C\")", e.text),
            ],
        }
    }

    /// `(a, b, c) op (?, ?, ?)` for a slot against a cursor's slot.
    fn slot_cmp(&mut self, slot: &[String; 3], op: &str, at: &SortSlot) -> String {
        let r = self.bind(Param::Int(at.rank));
        let n = self.bind_number(&at.num);
        let t = self.bind(Param::Text(at.text.clone()));
        format!("({}, {}, {}) {op} ({r}, {n}, {t})", slot[0], slot[1], slot[2])
    }

    /// Rows strictly after the cursor in the order `keys`, then id.
    fn after(&mut self, keys: &[SortKey], cursor: &ListCursor) -> String {
        let slots: Vec<[String; 3]> = keys.iter().map(|k| self.slot(&k.field)).collect();
        let mut alternatives = Vec::new();
        for i in 0..=keys.len() {
            let mut conds = Vec::new();
            for (slot, at) in slots.iter().zip(&cursor.slots).take(i) {
                conds.push(self.slot_cmp(slot, "=", at));
            }
            if i < keys.len() {
                let op = if keys[i].descending { "<" } else { ">" };
                conds.push(self.slot_cmp(&slots[i], op, &cursor.slots[i]));
            } else {
                let p = self.bind(Param::Text(cursor.id.as_str().to_owned()));
                conds.push(format!("agg_id > {p}"));
            }
            alternatives.push(format!("({})", conds.join(" AND ")));
        }
        any(alternatives)
    }

    /// `WHERE` of a query: tenant, type, deletion, filters.
    fn conditions(&mut self, query: &ListQuery) -> Vec<String> {
        let tenant = self.bind(Param::Text(query.tenant.as_str().to_owned()));
        let ty = self.bind(Param::Text(query.type_name.as_str().to_owned()));
        let mut conds = vec![format!("tenant = {tenant}"), format!("type = {ty}")];
        if !query.include_deleted {
            conds.push(match self.dialect {
                Dialect::Sqlite => "deleted = 0".into(),
                Dialect::Postgres => "NOT deleted".into(),
            });
        }
        for f in &query.filters {
            conds.push(self.filter(f));
        }
        conds
    }
}

fn bool_sql(b: bool) -> &'static str {
    if b { "(1 = 1)" } else { "(1 = 0)" }
}

fn any(conds: Vec<String>) -> String {
    if conds.is_empty() { bool_sql(false).into() } else { format!("({})", conds.join(" OR ")) }
}

/// [`select`], telling SQLite which index to use: the index of the first equality (`eq`,
/// `in`) filter on an indexed field. Without statistics SQLite's planner prefers the primary
/// key (which yields id order), and scans every row of the type for a selective filter; an
/// equality on an index of `(tenant, type, field, agg_id)` yields id order too, from few rows.
pub(crate) fn select_hinted(dialect: Dialect, query: &ListQuery, limit: usize, indexed: &dyn Fn(&str) -> bool) -> Sql {
    let hint = query.filters.iter().find_map(|f| match f {
        Filter::In { field: Field::Doc(path), .. } => {
            let (name, _) = dialect.index_ddl(path);
            indexed(&name).then_some(name)
        }
        _ => None,
    });
    let mut sql = select(dialect, query, limit);
    if let (Some(name), Dialect::Sqlite) = (hint, dialect) {
        let from = format!("FROM {} WHERE", dialect.table());
        sql.text = sql.text.replacen(&from, &format!("FROM {} INDEXED BY {name} WHERE", dialect.table()), 1);
    }
    sql
}

/// The page query: the rows' columns (`agg_id, version, state, deleted, created_at,
/// updated_at`, with `state` as text), filtered, after the cursor, sorted, limited.
pub(crate) fn select(dialect: Dialect, query: &ListQuery, limit: usize) -> Sql {
    let mut b = Builder { dialect, sql: Sql::default() };
    let mut conds = b.conditions(query);
    if let Some(cursor) = &query.after {
        if query.sort.is_empty() {
            let p = b.bind(Param::Text(cursor.id.as_str().to_owned()));
            conds.push(format!("agg_id > {p}"));
        } else {
            conds.push(b.after(&query.sort, cursor));
        }
    }
    let mut order: Vec<String> = Vec::new();
    for key in &query.sort {
        let dir = if key.descending { "DESC" } else { "ASC" };
        if key.field == Field::Id {
            // The slot's other parts are constants (which ORDER BY would read as column numbers).
            order.push(format!("agg_id {dir}"));
        } else {
            for part in b.slot(&key.field) {
                order.push(format!("{part} {dir}"));
            }
        }
    }
    order.push("agg_id ASC".into());
    let limit = b.bind(Param::Int(i64::try_from(limit).unwrap_or(i64::MAX)));
    let state = match dialect {
        Dialect::Sqlite => "state",
        Dialect::Postgres => "state::text",
    };
    b.push(&format!(
        "SELECT agg_id, version, {state}, deleted, created_at, updated_at FROM {} WHERE {} ORDER BY {} LIMIT {limit}",
        dialect.table(),
        conds.join(" AND "),
        order.join(", ")
    ));
    b.sql
}

/// The count of rows the query's filters match (cursor and limit ignored).
pub(crate) fn count(dialect: Dialect, query: &ListQuery) -> Sql {
    let mut b = Builder { dialect, sql: Sql::default() };
    let conds = b.conditions(query);
    b.push(&format!("SELECT count(*) FROM {} WHERE {}", dialect.table(), conds.join(" AND ")));
    b.sql
}

/// The cursor that continues after a row.
pub(crate) fn cursor_after(sort: &[SortKey], id: &sourced_core::AggregateId, state: &Value) -> ListCursor {
    let id_value = Value::String(id.as_str().to_owned());
    ListCursor { slots: sort.iter().map(|k| SortSlot::of(k.field.get(&id_value, state))).collect(), id: id.clone() }
}
