//! Reading JSON text from clients so that what is stored is exactly what was sent: one scan of
//! the text before it is parsed refuses what `serde_json` would silently change or choke on.
//!
//! - nesting deeper than the limit (refused before parsing, so a body nested 100 000 deep gets
//!   the same `too-deep` answer as one nested 65 deep, not the parser's recursion error);
//! - duplicate member names (I-JSON, RFC 7493 §2.3: the parser would keep the last one);
//! - numbers that would not come back as sent: an integer outside `i64`/`u64`, a decimal with
//!   more precision than a 64-bit float holds, `-0` (it would come back as `-0.0`). A number is
//!   kept when the text written back denotes the same decimal value (`1.50` may come back as
//!   `1.5`, `1e2` as `100.0`); anything else is refused, never rounded.
//!
//! NUL characters are refused on parsed values ([`check_strings`]), because values reach the
//! core by other roads too (Socket.IO, artifact expressions): PostgreSQL cannot store U+0000 in
//! `jsonb`, and both backends must give the same answer to the same request.

use serde_json::Value;

use crate::error::{DomainError, LimitKind, Violation};

use crate::limits::JSON_VIOLATIONS_MAX as VIOLATIONS_MAX;

/// Why a JSON text was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Not JSON at all.
    #[error("not valid JSON: {0}")]
    Syntax(#[source] serde_json::Error),
    /// Valid JSON that cannot be stored faithfully, or nested too deep (a [`DomainError`]:
    /// `LimitExceeded` for depth, `UnstorableValue` for numbers).
    #[error(transparent)]
    Refused(DomainError),
    /// Valid JSON with member names repeated in one object (every one listed).
    #[error("duplicate member names: {}", .0.iter().map(|v| v.pointer.as_str()).collect::<Vec<_>>().join(", "))]
    DuplicateKeys(Vec<Violation>),
}

/// Parses client JSON, refusing depth over `depth_max` (the text's own depth: a value at the
/// top is 0 deep, `[]` is 1), duplicate member names and numbers that would not be kept.
/// Pointers in the violations are relative to the text's top value.
pub fn parse(text: &[u8], depth_max: usize) -> Result<Value, JsonError> {
    let scan = scan(text, depth_max);
    if let Scan::TooDeep = scan {
        let message = format!("JSON nesting depth exceeds the limit of {depth_max}");
        return Err(JsonError::Refused(DomainError::over_limit(
            LimitKind::JsonDepth,
            depth_max,
            depth_max + 1,
            message,
        )));
    }
    let value: Value = serde_json::from_slice(text).map_err(JsonError::Syntax)?;
    match scan {
        Scan::Done { duplicates, numbers } => {
            if !duplicates.is_empty() {
                return Err(JsonError::DuplicateKeys(duplicates));
            }
            if !numbers.is_empty() {
                return Err(JsonError::Refused(DomainError::UnstorableValue(numbers)));
            }
            Ok(value)
        }
        // The scan stops at what it does not understand; the parser accepted it, so nothing the
        // scan checks can be wrong in it… except that the scan gave up. It never gives up on
        // text the parser accepts (a test feeds both the same inputs), so this is unreachable
        // in practice; refuse rather than store something unchecked.
        Scan::Malformed | Scan::TooDeep => Err(JsonError::Refused(DomainError::InvalidDocument(vec![Violation::new(
            "",
            "the JSON text could not be checked",
        )]))),
    }
}

/// Refuses U+0000 in any string or member name of `v`, listing where (pointers relative to `v`,
/// under `base`). Iterative, so a deep value cannot exhaust the stack.
pub fn check_strings(v: &Value, base: &str) -> Result<(), DomainError> {
    if !has_nul(v) {
        return Ok(());
    }
    check_nul(vec![(v, base.to_owned())], Vec::new())
}

/// Whether any string or member name in `v` holds U+0000. No allocation per value: this runs on
/// every command, and the pointers are only worked out when something is found.
fn has_nul(v: &Value) -> bool {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        match v {
            Value::String(s) if s.contains('\0') => return true,
            Value::Array(a) => stack.extend(a.iter()),
            Value::Object(o) => {
                for (k, c) in o {
                    if k.contains('\0') {
                        return true;
                    }
                    stack.push(c);
                }
            }
            _ => {}
        }
    }
    false
}

/// [`check_strings`] on the members of an object (an envelope before it is taken apart).
pub fn check_members(m: &serde_json::Map<String, Value>, base: &str) -> Result<(), DomainError> {
    if !m.iter().any(|(k, v)| k.contains('\0') || has_nul(v)) {
        return Ok(());
    }
    let mut found = Vec::new();
    let mut stack = Vec::with_capacity(m.len());
    for (k, c) in m.iter().rev() {
        let p = format!("{base}/{}", escape_token(k));
        if k.contains('\0') {
            found.push(Violation::new(p.clone(), "member names may not contain U+0000 (NUL)"));
        }
        stack.push((c, p));
    }
    check_nul(stack, found)
}

fn check_nul(mut stack: Vec<(&Value, String)>, mut found: Vec<Violation>) -> Result<(), DomainError> {
    while let Some((v, at)) = stack.pop() {
        if found.len() >= VIOLATIONS_MAX {
            break;
        }
        match v {
            Value::String(s) if s.contains('\0') => {
                found.push(Violation::new(at, "strings may not contain U+0000 (NUL)"));
            }
            Value::Array(a) => stack.extend(a.iter().enumerate().rev().map(|(i, c)| (c, format!("{at}/{i}")))),
            Value::Object(o) => {
                for (k, c) in o.iter().rev() {
                    let p = format!("{at}/{}", escape_token(k));
                    if k.contains('\0') {
                        found.push(Violation::new(p.clone(), "member names may not contain U+0000 (NUL)"));
                    }
                    stack.push((c, p));
                }
            }
            _ => {}
        }
    }
    if found.is_empty() { Ok(()) } else { Err(DomainError::UnstorableValue(found)) }
}

/// A member name as a JSON Pointer reference token (RFC 6901 §4).
pub fn escape_token(k: &str) -> std::borrow::Cow<'_, str> {
    if k.contains(['~', '/']) { k.replace('~', "~0").replace('/', "~1").into() } else { k.into() }
}

enum Scan {
    Done { duplicates: Vec<Violation>, numbers: Vec<Violation> },
    TooDeep,
    Malformed,
}

/// One open container: an object with the names seen so far, or an array with its next index.
enum Open {
    Object { names: std::collections::HashSet<String>, current: String },
    Array { index: usize },
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && matches!(self.b[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    /// A string at the cursor; returns its raw text (with quotes).
    fn string(&mut self) -> Option<&[u8]> {
        let start = self.i;
        if self.peek() != Some(b'"') {
            return None;
        }
        self.i += 1;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    return Some(&self.b[start..self.i]);
                }
                b'\\' => self.i += 2,
                _ => self.i += 1,
            }
        }
    }

    fn number(&mut self) -> Option<&str> {
        let start = self.i;
        while self.i < self.b.len() && matches!(self.b[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
            self.i += 1;
        }
        if self.i == start { None } else { std::str::from_utf8(&self.b[start..self.i]).ok() }
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        if self.b[self.i..].starts_with(word) {
            self.i += word.len();
            Some(())
        } else {
            None
        }
    }
}

fn pointer(stack: &[Open]) -> String {
    let mut p = String::new();
    for o in stack {
        p.push('/');
        match o {
            Open::Object { current, .. } => p.push_str(&escape_token(current)),
            Open::Array { index } => p.push_str(&index.to_string()),
        }
    }
    p
}

fn scan(text: &[u8], depth_max: usize) -> Scan {
    let mut s = Scanner { b: text, i: 0 };
    let mut stack: Vec<Open> = Vec::new();
    let mut duplicates = Vec::new();
    let mut numbers = Vec::new();
    // Expecting a value (true) or what follows one (false).
    let mut want_value = true;
    loop {
        s.ws();
        if want_value {
            match s.peek() {
                Some(b'{') => {
                    s.i += 1;
                    if stack.len() >= depth_max {
                        return Scan::TooDeep;
                    }
                    s.ws();
                    if s.peek() == Some(b'}') {
                        s.i += 1;
                        want_value = false;
                        continue;
                    }
                    stack.push(Open::Object { names: Default::default(), current: String::new() });
                    if !member_name(&mut s, &mut stack, &mut duplicates) {
                        return Scan::Malformed;
                    }
                    continue;
                }
                Some(b'[') => {
                    s.i += 1;
                    if stack.len() >= depth_max {
                        return Scan::TooDeep;
                    }
                    s.ws();
                    if s.peek() == Some(b']') {
                        s.i += 1;
                        want_value = false;
                        continue;
                    }
                    stack.push(Open::Array { index: 0 });
                    continue;
                }
                Some(b'"') => {
                    if s.string().is_none() {
                        return Scan::Malformed;
                    }
                }
                Some(b't') => {
                    if s.literal(b"true").is_none() {
                        return Scan::Malformed;
                    }
                }
                Some(b'f') => {
                    if s.literal(b"false").is_none() {
                        return Scan::Malformed;
                    }
                }
                Some(b'n') => {
                    if s.literal(b"null").is_none() {
                        return Scan::Malformed;
                    }
                }
                Some(_) => {
                    let Some(n) = s.number() else { return Scan::Malformed };
                    if let Some(why) = unfaithful_number(n)
                        && numbers.len() < VIOLATIONS_MAX
                    {
                        numbers.push(Violation::new(pointer(&stack), why));
                    }
                }
                None => return Scan::Malformed,
            }
            want_value = false;
            continue;
        }
        // After a value: the end of the text, or a separator or closer of the open container.
        let Some(top) = stack.last_mut() else {
            return if s.peek().is_none() { Scan::Done { duplicates, numbers } } else { Scan::Malformed };
        };
        match (s.peek(), top) {
            (Some(b','), Open::Array { index }) => {
                s.i += 1;
                *index += 1;
                want_value = true;
            }
            (Some(b','), Open::Object { .. }) => {
                s.i += 1;
                if !member_name(&mut s, &mut stack, &mut duplicates) {
                    return Scan::Malformed;
                }
                want_value = true;
            }
            (Some(b']'), Open::Array { .. }) | (Some(b'}'), Open::Object { .. }) => {
                s.i += 1;
                stack.pop();
            }
            _ => return Scan::Malformed,
        }
    }
}

/// Reads `"name":` into the open object on top of the stack, noting a repeated name.
fn member_name(s: &mut Scanner<'_>, stack: &mut [Open], duplicates: &mut Vec<Violation>) -> bool {
    s.ws();
    let Some(raw) = s.string() else { return false };
    let name = if raw.contains(&b'\\') {
        match serde_json::from_slice::<String>(raw) {
            Ok(n) => n,
            Err(_) => return false,
        }
    } else {
        match std::str::from_utf8(&raw[1..raw.len() - 1]) {
            Ok(n) => n.to_owned(),
            Err(_) => return false,
        }
    };
    s.ws();
    if s.peek() != Some(b':') {
        return false;
    }
    s.i += 1;
    let Some(Open::Object { names, current }) = stack.last_mut() else { return false };
    let repeated = !names.insert(name.clone());
    *current = name;
    if repeated && duplicates.len() < VIOLATIONS_MAX {
        let p = pointer(stack);
        duplicates.push(Violation::new(p, "this member name appears more than once in its object"));
    }
    true
}

/// Why a JSON number literal would not come back as sent, or `None` when it would.
fn unfaithful_number(text: &str) -> Option<String> {
    let integer = !text.contains(['.', 'e', 'E']);
    if integer {
        if text == "-0" {
            return Some("-0 cannot be kept (it would be stored as -0.0); send 0 or -0.0".to_owned());
        }
        if text.parse::<i64>().is_ok() || text.parse::<u64>().is_ok() {
            return None;
        }
    }
    // What the parser makes of it, and what the store would write back.
    let back = match serde_json::from_str::<Value>(text) {
        Ok(v) => v.to_string(),
        Err(_) => return None, // the parser will refuse it itself
    };
    if decimal(text) == decimal(&back) {
        None
    } else {
        Some(format!(
            "the number {} cannot be stored exactly (it would become {back}); numbers must be integers \
             from -2^63 to 2^64-1, or decimals a 64-bit float holds exactly to their last digit",
            if text.len() > 40 { format!("{}…", &text[..40]) } else { text.to_owned() }
        ))
    }
}

/// A decimal number's value as (negative, significant digits, exponent of the last digit);
/// zero has no digits. `1.50`, `15e-1` and `1.5` all give (false, "15", -1).
fn decimal(text: &str) -> (bool, String, i64) {
    let (neg, rest) = match text.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, text),
    };
    let (mantissa, exp) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().unwrap_or(0)),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let mut digits: String = int.chars().chain(frac.chars()).collect();
    let mut exp = exp.saturating_sub(frac.len() as i64);
    let lead = digits.len() - digits.trim_start_matches('0').len();
    digits.drain(..lead);
    while digits.ends_with('0') {
        digits.pop();
        exp = exp.saturating_add(1);
    }
    if digits.is_empty() {
        exp = 0;
    }
    (neg, digits, exp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(text: &str) -> String {
        match parse(text.as_bytes(), 5) {
            Ok(_) => "ok".into(),
            Err(JsonError::Syntax(_)) => "syntax".into(),
            Err(JsonError::DuplicateKeys(v)) => {
                format!("dup {}", v.iter().map(|v| v.pointer.as_str()).collect::<Vec<_>>().join(" "))
            }
            Err(JsonError::Refused(DomainError::LimitExceeded { kind: LimitKind::JsonDepth, .. })) => "deep".into(),
            Err(JsonError::Refused(DomainError::UnstorableValue(v))) => {
                format!("number {}", v.iter().map(|v| v.pointer.as_str()).collect::<Vec<_>>().join(" "))
            }
            Err(e) => format!("other {e}"),
        }
    }

    #[test]
    fn texts_from_a_table() {
        let cases = [
            (r#"{"a":1,"b":[1,2,{"c":null}]}"#, "ok"),
            (r#"  {"a" : "x\"}" , "b":true }  "#, "ok"),
            (r#"{"a":1,"a":2}"#, "dup /a"),
            (r#"{"a":{"b":1,"c":2,"b":3},"x":[{"k":1,"k":1}]}"#, "dup /a/b /x/0/k"),
            (r#"{"a":1,"\u0061":2}"#, "dup /a"),
            (r#"{"a/b":1,"a/b":2}"#, "dup /a~1b"),
            (r#"[{"a":1},{"a":1}]"#, "ok"),
            ("123456789012345678901234567890", "number "),
            (r#"{"n":[1,123456789012345678901234567890]}"#, "number /n/1"),
            (r#"{"n":-0}"#, "number /n"),
            (r#"{"n":-0.0}"#, "ok"),
            (r#"{"n":0}"#, "ok"),
            (r#"{"n":18446744073709551615,"m":-9223372036854775808}"#, "ok"),
            (r#"{"n":18446744073709551616}"#, "number /n"),
            (r#"{"n":0.1,"m":1.50,"k":1e2,"j":-2.5E-3,"i":100000000000000000000}"#, "ok"),
            (r#"{"n":0.1000000000000000000001}"#, "number /n"),
            (r#"{"n":3.141592653589793238}"#, "number /n"),
            (r#"{"n":1e-400}"#, "number /n"),
            ("[[[[[1]]]]]", "ok"),
            ("[[[[[[1]]]]]]", "deep"),
            ("[[[[[[", "deep"),
            (r#"{"a":{"b":{"c":{"d":{"e":{}}}}}}"#, "deep"),
            (r#"{"a":{"b":{"c":{"d":{"e":[]}}}}}"#, "deep"),
            (r#"{"a":{"b":{"c":{"d":{"e":1}}}}}"#, "ok"),
            ("{", "syntax"),
            (r#"{"a":1,}"#, "syntax"),
            ("[1 2]", "syntax"),
            ("nul", "syntax"),
            ("", "syntax"),
            ("1e400", "syntax"),
        ];
        for (text, want) in cases {
            assert_eq!(outcome(text), want, "{text}");
        }
    }

    #[test]
    fn a_deep_text_is_refused_without_a_deep_stack() {
        let text = "[".repeat(100_000);
        assert_eq!(outcome(&text), "deep");
        let text = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(outcome(&text), "deep");
    }

    #[test]
    fn nul_is_found_in_values_and_names() {
        let v: Value = serde_json::from_str(r#"{"a":"x\u0000","b":[1,"ok"],"c\u0000":2}"#).unwrap();
        let Err(DomainError::UnstorableValue(found)) = check_strings(&v, "/body") else { panic!() };
        let mut pointers: Vec<_> = found.iter().map(|v| v.pointer.as_str()).collect();
        pointers.sort();
        assert_eq!(pointers, ["/body/a", "/body/c\u{0}"]);
        assert!(check_strings(&serde_json::json!({"a": ["b", {"c": "d"}]}), "").is_ok());
    }

    #[test]
    fn decimals_compare_by_value() {
        assert_eq!(decimal("1.50"), decimal("15e-1"));
        assert_eq!(decimal("100.0"), decimal("1e2"));
        assert_eq!(decimal("0.0"), decimal("0"));
        assert_ne!(decimal("0.1"), decimal("0.10000000000000001"));
    }
}
