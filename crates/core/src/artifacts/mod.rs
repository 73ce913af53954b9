//! Artifacts (SPEC §4): per aggregate type a JSON Schema, business rules, custom commands and
//! a lifecycle state machine. [`ArtifactSet::load`] parses and checks a whole set from its
//! files' contents (no I/O here: the caller reads the directory) and reports every problem
//! with its file, location and message; a set is used whole or not at all.

pub mod decide;
pub mod expr;
pub mod instance;
pub mod lifecycle;
pub mod locate;
pub mod permissions;
pub mod process;
pub mod rules;
pub mod schema;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::ids::TypeName;
use expr::{Expr, ExprLimits};
use lifecycle::Lifecycle;
use permissions::Permissions;
use process::Process;
use rules::Rule;
use schema::Schema;

pub use crate::limits::FILE_BYTES_MAX;
pub use crate::limits::FILES_MAX;

/// One problem in an artifact set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The file, relative to the set's root (`types/order/rules.yaml`).
    pub file: String,
    /// Where in the file: `line L column C` for syntax errors, else a JSON Pointer into the
    /// parsed file (`/rules/0/require`); empty for the whole file.
    pub location: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    /// One line: `file at location: message`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let message = self.message.split_whitespace().collect::<Vec<_>>().join(" ");
        if self.location.is_empty() {
            write!(f, "{}: {message}", self.file)
        } else {
            write!(f, "{} at {}: {message}", self.file, self.location)
        }
    }
}

/// A loaded, checked artifact set.
#[derive(Clone, Debug, Default)]
pub struct ArtifactSet {
    types: BTreeMap<TypeName, TypeArtifacts>,
    /// `permissions.yaml`, or the rule of its absence.
    permissions: Permissions,
    /// Process managers by name (`processes/<name>.yaml`).
    processes: BTreeMap<String, Process>,
}

/// Everything defined for one aggregate type.
#[derive(Clone, Debug, Default)]
pub struct TypeArtifacts {
    /// The document schema.
    pub schema: Option<Schema>,
    /// Business rules, in file order.
    pub rules: Vec<Rule>,
    /// Custom commands by name.
    pub commands: BTreeMap<String, CustomCommand>,
    /// The lifecycle state machine.
    pub lifecycle: Option<Lifecycle>,
    /// Document fields to index for filtered lists (`indexes.yaml`, SPEC §5).
    pub indexes: Vec<crate::query::FieldPath>,
}

/// A custom command (SPEC §4.2, `type: logic`).
#[derive(Clone, Debug)]
pub struct CustomCommand {
    /// Its name (the file name without extension).
    pub name: String,
    /// Schema of its payload (the command body).
    pub payload: Option<Schema>,
    /// Whether it may run on an aggregate that does not exist yet.
    pub creates: bool,
    /// Preconditions, each with the message given when it is false.
    pub require: Vec<(Expr, String)>,
    /// The events it emits.
    pub emit: Vec<EmitSpec>,
}

/// One event a custom command emits.
#[derive(Clone, Debug)]
pub struct EmitSpec {
    /// The domain event type (past tense, e.g. `OrderShipped`).
    pub event: String,
    /// The patch, whose values are literals or expressions.
    pub patch: Vec<PatchOpSpec>,
}

/// One operation of an emitted patch.
#[derive(Clone, Debug)]
pub struct PatchOpSpec {
    /// `add`, `remove`, `replace`, `move`, `copy` or `test`.
    pub op: String,
    /// Target pointer.
    pub path: String,
    /// Source pointer of `move`/`copy`.
    pub from: Option<String>,
    /// The value: a literal, or an expression computed per command.
    pub value: Option<OpValue>,
}

/// A patch operation's value.
#[derive(Clone, Debug)]
pub enum OpValue {
    /// Used as written.
    Literal(Value),
    /// Computed by CEL over the command's bindings.
    Expr(Expr),
}

impl ArtifactSet {
    /// Every document field some type declares an index on, once each.
    pub fn indexed_fields(&self) -> Vec<crate::query::FieldPath> {
        let mut fields: Vec<crate::query::FieldPath> =
            self.types.values().flat_map(|a| a.indexes.iter().cloned()).collect();
        fields.sort();
        fields.dedup();
        fields
    }

    /// An empty set: every type is free JSON.
    pub fn empty() -> ArtifactSet {
        ArtifactSet::default()
    }

    /// The artifacts of one type, if any are defined.
    pub fn for_type(&self, t: &TypeName) -> Option<&TypeArtifacts> {
        self.types.get(t)
    }

    /// The set's permissions (`permissions.yaml`; [`Permissions::absent`] without it).
    pub fn permissions(&self) -> &Permissions {
        &self.permissions
    }

    /// The process managers, by name.
    pub fn processes(&self) -> &BTreeMap<String, Process> {
        &self.processes
    }

    /// The types that have artifacts.
    pub fn types(&self) -> impl Iterator<Item = (&TypeName, &TypeArtifacts)> {
        self.types.iter()
    }

    /// Parses and checks a set from `(relative path, content)` pairs. Files outside the
    /// layout of SPEC §4 are problems too, so a typo never goes unnoticed.
    pub fn load(files: &BTreeMap<String, String>) -> Result<ArtifactSet, Vec<Problem>> {
        ArtifactSet::load_with(files, &ExprLimits::default())
    }

    /// [`ArtifactSet::load`] with expressions compiled under `limits` (which they keep for
    /// their evaluations).
    pub fn load_with(files: &BTreeMap<String, String>, limits: &ExprLimits) -> Result<ArtifactSet, Vec<Problem>> {
        if files.len() > FILES_MAX {
            return Err(vec![Problem {
                file: String::new(),
                location: String::new(),
                message: format!("the set has {} files, over the limit of {FILES_MAX}", files.len()),
            }]);
        }
        let mut loader = Loader {
            limits,
            set: ArtifactSet::default(),
            problems: Vec::new(),
            rules_files: BTreeMap::new(),
            lifecycle_files: BTreeMap::new(),
            indexes_files: BTreeMap::new(),
            rule_targets: BTreeMap::new(),
            broken_commands: Default::default(),
            permissions_file: None,
            process_refs: Vec::new(),
        };
        for (path, text) in files {
            loader.file(path, text);
        }
        loader.check_references();
        loader.check_processes();
        loader.permissions();
        if loader.problems.is_empty() { Ok(loader.set) } else { Err(loader.problems) }
    }
}

/// An artifact set being read: what is loaded so far, every problem found, and what the checks
/// across files need.
struct Loader<'a> {
    limits: &'a ExprLimits,
    set: ArtifactSet,
    problems: Vec<Problem>,
    /// The file that defined each type's rules, lifecycle and indexes (`.yaml`, `.yml` or `.json`).
    rules_files: BTreeMap<TypeName, String>,
    lifecycle_files: BTreeMap<TypeName, String>,
    indexes_files: BTreeMap<TypeName, String>,
    rule_targets: BTreeMap<TypeName, Vec<rules::RuleTargets>>,
    /// Commands whose file exists but has problems of its own: other files that name them are
    /// not told the command is missing (its file's problems say what is wrong).
    broken_commands: std::collections::BTreeSet<(TypeName, String)>,
    /// `permissions.yaml` as parsed, checked once every type is loaded.
    permissions_file: Option<(String, Value)>,
    /// What each process file names, checked once every type is loaded.
    process_refs: Vec<(String, Vec<process::Reference>)>,
}

impl Loader<'_> {
    fn problem(&mut self, file: &str, location: String, message: String) {
        self.problems.push(Problem { file: file.to_owned(), location, message });
    }

    /// Reads one file into the set, or records why not.
    fn file(&mut self, path: &str, text: &str) {
        if text.len() > FILE_BYTES_MAX {
            let message = format!("the file is {} bytes, over the limit of {FILE_BYTES_MAX}", text.len());
            return self.problem(path, String::new(), message);
        }
        if matches!(path, "permissions.yaml" | "permissions.yml" | "permissions.json") {
            return self.permissions_file(path, text);
        }
        let (t, kind) = match classify(path) {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(message) => return self.problem(path, String::new(), message),
        };
        let doc = match parse_document(path, text) {
            Ok(v) => v,
            Err((location, message)) => return self.problem(path, location, message),
        };
        if let Kind::Process(name) = kind {
            return self.process(path, name, &doc);
        }
        // One rules file, lifecycle and indexes file per type: a second (rules.yaml beside
        // rules.yml) would silently replace the first.
        let defined_in = match kind {
            Kind::Rules => Some(("rules", &mut self.rules_files)),
            Kind::Lifecycle => Some(("lifecycle", &mut self.lifecycle_files)),
            Kind::Indexes => Some(("indexes", &mut self.indexes_files)),
            _ => None,
        };
        if let Some((what, defined_in)) = defined_in {
            if let Some(first) = defined_in.get(&t) {
                let message = format!("type '{t}' already has its {what} in {first}; keep one file");
                return self.problem(path, String::new(), message);
            }
            defined_in.insert(t.clone(), path.to_owned());
        }
        for (location, message) in self.add(t, kind, &doc) {
            self.problem(path, location, message);
        }
    }

    /// Compiles one parsed file of type `t` into the set; its problems, located in the file.
    fn add(&mut self, t: TypeName, kind: Kind, doc: &Value) -> Vec<(String, String)> {
        let limits = self.limits;
        let entry = self.set.types.entry(t.clone()).or_default();
        let mut local = Vec::new();
        match kind {
            Kind::Schema => match Schema::compile(doc) {
                Ok(s) => entry.schema = Some(s),
                Err(e) => local.extend(e),
            },
            Kind::Rules => {
                let (r, targets, e) = rules::parse(doc, limits);
                entry.rules = r;
                self.rule_targets.insert(t, targets);
                local.extend(e);
            }
            Kind::Lifecycle => {
                let (l, e) = Lifecycle::parse(doc, limits);
                entry.lifecycle = l;
                local.extend(e);
            }
            Kind::Indexes => match parse_indexes(doc) {
                Ok(fields) => entry.indexes = fields,
                Err(e) => local.extend(e),
            },
            Kind::Process(_) => {}
            Kind::Command(name) => match entry.commands.entry(name) {
                std::collections::btree_map::Entry::Occupied(o) => {
                    local.push((String::new(), format!("command '{}' is defined twice", o.key())));
                }
                std::collections::btree_map::Entry::Vacant(v) => match parse_command(v.key(), doc, limits) {
                    Ok(c) => {
                        v.insert(c);
                    }
                    Err(e) => {
                        self.broken_commands.insert((t, v.key().clone()));
                        local.extend(e);
                    }
                },
            },
        }
        local
    }

    /// Whether type `t` lacks the command `name` that a lifecycle or rule names (generic
    /// commands always exist; a command whose own file is broken is reported there).
    fn lacks_command(&self, t: &TypeName, a: &TypeArtifacts, name: &str) -> bool {
        let generic = matches!(name, "create" | "patch" | "replace" | "delete");
        !generic && !self.broken_commands.contains(&(t.clone(), name.to_owned())) && !a.commands.contains_key(name)
    }

    /// Compiles one process file; what it names is checked by [`Loader::check_processes`].
    fn process(&mut self, path: &str, name: String, doc: &Value) {
        if self.set.processes.contains_key(&name) {
            let message = format!("process '{name}' is defined twice; keep one file");
            return self.problem(path, String::new(), message);
        }
        let (p, refs, problems) = process::parse(&name, doc, self.limits);
        for (location, message) in problems {
            self.problem(path, location, message);
        }
        self.process_refs.push((path.to_owned(), refs));
        if let Some(p) = p {
            self.set.processes.insert(name, p);
        }
    }

    /// Checks what process files name: the events exist (a custom command of the type emits
    /// them, or they are generic) and so do the commands.
    fn check_processes(&mut self) {
        let none = TypeArtifacts::default();
        let mut found = Vec::new();
        for (file, refs) in &self.process_refs {
            for r in refs {
                let (at, message) = match r {
                    process::Reference::Event { at, type_name, event } => {
                        let a = self.set.types.get(type_name).unwrap_or(&none);
                        let generic = matches!(
                            event.as_str(),
                            crate::event::CREATED | crate::event::PATCHED | crate::event::DELETED
                        );
                        let emitted = a.commands.values().any(|c| c.emit.iter().any(|e| e.event == *event));
                        let broken = self.broken_commands.iter().any(|(t, _)| t == type_name);
                        if generic || emitted || broken {
                            continue;
                        }
                        let message = format!(
                            "no command of type '{type_name}' emits '{event}' (a process hears created, patched, \
                             deleted, or an event a custom command emits)"
                        );
                        (at, message)
                    }
                    process::Reference::Command { at, target, name } => {
                        if !self.lacks_command(target, self.set.types.get(target).unwrap_or(&none), name) {
                            continue;
                        }
                        (at, format!("no command '{name}' is defined for type '{target}'"))
                    }
                };
                found.push(Problem { file: file.clone(), location: at.clone(), message });
            }
        }
        self.problems.extend(found);
    }

    /// Keeps the parsed permissions file for [`Loader::permissions`].
    fn permissions_file(&mut self, path: &str, text: &str) {
        if let Some((first, _)) = &self.permissions_file {
            let message = format!("the set already has its permissions in {first}; keep one file");
            return self.problem(path, String::new(), message);
        }
        match parse_document(path, text) {
            Ok(doc) => self.permissions_file = Some((path.to_owned(), doc)),
            Err((location, message)) => self.problem(path, location, message),
        }
    }

    /// Checks the permissions file against the loaded types and keeps it.
    fn permissions(&mut self) {
        let Some((path, doc)) = self.permissions_file.take() else { return };
        match Permissions::parse(&doc, &self.set.types) {
            Ok(p) => self.set.permissions = p,
            Err(all) => {
                for (location, message) in all {
                    self.problem(&path, location, message);
                }
            }
        }
    }

    /// Checks across files: lifecycles and rules name commands that exist.
    fn check_references(&mut self) {
        let mut found = Vec::new();
        for (t, a) in &self.set.types {
            for (i, tr) in a.lifecycle.iter().flat_map(|l| l.transitions.iter().enumerate()) {
                for name in tr.on.iter().filter(|n| self.lacks_command(t, a, n)) {
                    found.push(Problem {
                        file: self.lifecycle_files.get(t).cloned().unwrap_or_default(),
                        location: format!("/transitions/{i}/on"),
                        message: format!("no command '{name}' is defined for type '{t}'"),
                    });
                }
            }
            // Every rule's targets, also those of a rule whose expression did not compile.
            for r in self.rule_targets.get(t).into_iter().flatten() {
                for name in r.on.iter().filter(|n| self.lacks_command(t, a, n)) {
                    found.push(Problem {
                        file: self.rules_files.get(t).cloned().unwrap_or_default(),
                        location: format!("/rules/{}/on", r.index),
                        message: format!("rule '{}' names command '{name}', which type '{t}' does not define", r.name),
                    });
                }
            }
        }
        self.problems.extend(found);
    }
}

/// What a file of the set is, by its path: a type's schema, rules, lifecycle, indexes or
/// command, or a process (its type is unused); `None` for files the set ignores (READMEs,
/// hidden files).
fn classify(path: &str) -> Result<Option<(TypeName, Kind)>, String> {
    let parts: Vec<&str> = path.split('/').collect();
    let (type_name, kind) = match parts.as_slice() {
        ["types", t, "schema.json"] => (*t, Kind::Schema),
        ["types", t, "rules.yaml" | "rules.yml" | "rules.json"] => (*t, Kind::Rules),
        ["types", t, "lifecycle.yaml" | "lifecycle.yml" | "lifecycle.json"] => (*t, Kind::Lifecycle),
        ["types", t, "indexes.yaml" | "indexes.yml" | "indexes.json"] => (*t, Kind::Indexes),
        ["types", t, "commands", file] => (*t, Kind::Command(command_name(file)?)),
        ["processes", file] => {
            let name = process_name(file)?;
            return Ok(Some((TypeName::parse("processes-file").expect("a valid type name"), Kind::Process(name))));
        }
        ["README.md" | "readme.md" | ".gitignore"] => return Ok(None),
        _ if parts.iter().any(|s| s.starts_with('.')) => return Ok(None),
        _ => {
            return Err("not part of an artifact set: expected types/<type>/schema.json, rules.yaml, lifecycle.yaml, \
                        indexes.yaml, commands/<name>.yaml, processes/<name>.yaml, or permissions.yaml"
                .into());
        }
    };
    let t = TypeName::parse(type_name)
        .map_err(|e| format!("'{type_name}' is not a valid aggregate type: {}", e.message))?;
    if type_name.starts_with(process::TYPE_PREFIX) {
        return Err(format!("'{type_name}': types named {}… hold process instances", process::TYPE_PREFIX));
    }
    Ok(Some((t, kind)))
}

/// The name of a process from its file name: `payment-deadline.yaml` → `payment-deadline`.
fn process_name(file: &str) -> Result<String, String> {
    let Some(stem) =
        file.strip_suffix(".yaml").or_else(|| file.strip_suffix(".yml")).or_else(|| file.strip_suffix(".json"))
    else {
        return Err(format!("'{file}': a process file is <name>.yaml, <name>.yml or <name>.json"));
    };
    if !process::valid_name(stem) {
        let most = crate::limits::TYPE_NAME_LEN_MAX - process::TYPE_PREFIX.len();
        return Err(format!(
            "'{stem}' is not a process name: it must match [a-z][a-z0-9_-]{{0,{}}} (the file name is the name)",
            most - 1
        ));
    }
    Ok(stem.to_owned())
}

enum Kind {
    Schema,
    Rules,
    Lifecycle,
    Indexes,
    Command(String),
    Process(String),
}

pub use crate::limits::INDEXES_PER_TYPE_MAX;

/// `indexes.yaml`: `fields: [customer.id, status]`, document fields to index (SPEC §5).
fn parse_indexes(doc: &Value) -> Result<Vec<crate::query::FieldPath>, Vec<(String, String)>> {
    let Some(m) = doc.as_object() else {
        return Err(vec![(String::new(), "an indexes file is an object with 'fields'".into())]);
    };
    let mut problems = Vec::new();
    for k in m.keys().filter(|k| *k != "fields") {
        problems.push((format!("/{k}"), format!("unknown key '{k}'; an indexes file has only 'fields'")));
    }
    let Some(list) = m.get("fields").and_then(Value::as_array) else {
        let what = if m.contains_key("fields") { "must be" } else { "is required:" };
        problems.push((
            "/fields".into(),
            format!("'fields' {what} a list of document field paths, e.g. [status, customer.id]"),
        ));
        return Err(problems);
    };
    if list.len() > INDEXES_PER_TYPE_MAX {
        problems.push(("/fields".into(), format!("at most {INDEXES_PER_TYPE_MAX} indexed fields per type")));
    }
    let mut fields = Vec::new();
    for (i, f) in list.iter().enumerate() {
        match f.as_str().map(crate::query::FieldPath::parse) {
            Some(Ok(path)) if !fields.contains(&path) => fields.push(path),
            Some(Ok(path)) => problems.push((format!("/fields/{i}"), format!("'{path}' is listed twice"))),
            Some(Err(m)) => problems.push((format!("/fields/{i}"), m)),
            None => problems.push((format!("/fields/{i}"), "a field path is a string such as customer.id".into())),
        }
    }
    if problems.is_empty() { Ok(fields) } else { Err(problems) }
}

fn command_name(file: &str) -> Result<String, String> {
    let Some(stem) =
        file.strip_suffix(".yaml").or_else(|| file.strip_suffix(".yml")).or_else(|| file.strip_suffix(".json"))
    else {
        return Err(format!("'{file}': a command file is <name>.yaml, <name>.yml or <name>.json"));
    };
    let shape = !stem.is_empty()
        && stem.len() <= 64
        && stem.as_bytes()[0].is_ascii_lowercase()
        && stem.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if !shape {
        return Err(format!(
            "'{stem}' is not a command name: it must match [a-z][a-z0-9_-]{{0,63}} (the file name is the name)"
        ));
    }
    if RESERVED_COMMAND_NAMES.contains(&stem) {
        return Err(format!(
            "'{stem}' cannot be a command name: POST /{{type}}/{{id}}/{stem} is one of the service's own routes \
             (reserved: {})",
            RESERVED_COMMAND_NAMES.join(", ")
        ));
    }
    Ok(stem.to_owned())
}

/// Names a custom command cannot take: the routes under `/{type}/{id}/`.
const RESERVED_COMMAND_NAMES: &[&str] = &["events", "diff"];

/// Parses YAML or JSON (by extension) into JSON; the error carries `line L column C`.
fn parse_document(path: &str, text: &str) -> Result<Value, (String, String)> {
    if path.ends_with(".json") {
        serde_json::from_str(text)
            .map_err(|e| (format!("line {} column {}", e.line(), e.column()), format!("invalid JSON: {e}")))
    } else {
        let v: Value = yaml_serde::from_str(text).map_err(|e| {
            let location = e.location().map(|l| format!("line {} column {}", l.line(), l.column())).unwrap_or_default();
            (location, format!("invalid YAML: {e}"))
        })?;
        Ok(v)
    }
}

/// Deserializes part of an artifact file; the problem is serde's message at the JSON Pointer of
/// the part that does not fit (`/rules/0` for an unknown key of the first rule).
pub(crate) fn from_json<T: for<'de> Deserialize<'de>>(v: &Value, pointer: &str) -> Result<T, Vec<(String, String)>> {
    serde_path_to_error::deserialize(v.clone()).map_err(|e| {
        let mut at = pointer.to_owned();
        for segment in e.path() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => at.push_str(&format!("/{index}")),
                serde_path_to_error::Segment::Map { key } => {
                    at.push('/');
                    at.push_str(&key.replace('~', "~0").replace('/', "~1"));
                }
                serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
            }
        }
        vec![(at, e.into_inner().to_string())]
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    payload: Option<Value>,
    #[serde(default)]
    creates: bool,
    #[serde(default)]
    require: Vec<RawRequire>,
    emit: Vec<RawEmit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequire {
    expr: String,
    message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmit {
    event: String,
    #[serde(default)]
    patch: Vec<RawOp>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOp {
    op: String,
    path: String,
    from: Option<String>,
    value: Option<Value>,
    expr: Option<String>,
}

fn parse_command(name: &str, doc: &Value, limits: &ExprLimits) -> Result<CustomCommand, Vec<(String, String)>> {
    let raw: RawCommand = from_json(doc, "")?;
    let mut problems = Vec::new();
    let payload = match raw.payload.as_ref().map(Schema::compile) {
        Some(Ok(s)) => Some(s),
        Some(Err(all)) => {
            problems.extend(all.into_iter().map(|(pointer, m)| (format!("/payload{pointer}"), m)));
            None
        }
        None => None,
    };
    let mut require = Vec::new();
    for (i, r) in raw.require.iter().enumerate() {
        match Expr::compile_with(&r.expr, limits) {
            Ok(e) => require.push((e, r.message.clone())),
            Err(m) => problems.push((format!("/require/{i}/expr"), m)),
        }
    }
    if raw.emit.is_empty() {
        problems.push(("/emit".to_owned(), "a command must emit at least one event".to_owned()));
    }
    let mut emit = Vec::new();
    for (i, e) in raw.emit.iter().enumerate() {
        let valid_event = !e.event.is_empty()
            && e.event.len() <= crate::event::EVENT_TYPE_LEN_MAX
            && !matches!(e.event.as_str(), crate::event::CREATED | crate::event::PATCHED | crate::event::DELETED)
            && e.event.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !valid_event {
            problems.push((
                format!("/emit/{i}/event"),
                format!(
                    "'{}' is not a valid domain event type (letters, digits, . _ -; not created/patched/deleted)",
                    e.event
                ),
            ));
        }
        let mut ops = Vec::new();
        for (j, op) in e.patch.iter().enumerate() {
            let at = format!("/emit/{i}/patch/{j}");
            if !matches!(op.op.as_str(), "add" | "remove" | "replace" | "move" | "copy" | "test") {
                problems.push((format!("{at}/op"), format!("unknown patch op '{}'", op.op)));
            }
            if !(op.path.is_empty() || op.path.starts_with('/')) {
                problems.push((format!("{at}/path"), "a path is a JSON Pointer: empty or starting with /".to_owned()));
            }
            if crate::patch::is_server_owned(&op.path) {
                problems.push((format!("{at}/path"), format!("'{}' is owned by the server", op.path)));
            }
            let needs_value = matches!(op.op.as_str(), "add" | "replace" | "test");
            let value = match (&op.value, &op.expr) {
                (Some(_), Some(_)) => {
                    problems.push((at.clone(), "give value or expr, not both".to_owned()));
                    None
                }
                (Some(v), None) => Some(OpValue::Literal(v.clone())),
                (None, Some(src)) => match Expr::compile_with(src, limits) {
                    Ok(e) => Some(OpValue::Expr(e)),
                    Err(m) => {
                        problems.push((format!("{at}/expr"), m));
                        None
                    }
                },
                (None, None) => {
                    if needs_value {
                        problems.push((at.clone(), format!("'{}' needs a value or an expr", op.op)));
                    }
                    None
                }
            };
            if matches!(op.op.as_str(), "move" | "copy") && op.from.is_none() {
                problems.push((at.clone(), format!("'{}' needs from", op.op)));
            }
            ops.push(PatchOpSpec { op: op.op.clone(), path: op.path.clone(), from: op.from.clone(), value });
        }
        emit.push(EmitSpec { event: e.event.clone(), patch: ops });
    }
    if problems.is_empty() {
        Ok(CustomCommand { name: name.to_owned(), payload, creates: raw.creates, require, emit })
    } else {
        Err(problems)
    }
}
