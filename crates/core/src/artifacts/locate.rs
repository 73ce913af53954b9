//! Where a problem's JSON Pointer lands in a YAML file's text, so `sourced check` can print
//! `file:line:column: message` (issue 18).
//!
//! The files are small block-style YAML, so the text is read by indentation, not parsed again:
//! a mapping's keys are the lines whose content starts at its column, a sequence's items the
//! lines whose `- ` is at its column (an item's first key may sit on the dash's line). A node
//! written inline (a scalar, a flow `{…}` or `[…]`) cannot be descended into: the position of
//! the deepest node found is the answer, which is still the line the problem is on. `None` when
//! not even the first step is found.

/// One content line: its number (1-based), indentation, and the text after it.
struct Line<'a> {
    number: usize,
    indent: usize,
    text: &'a str,
}

impl Line<'_> {
    /// `- …`: the column of what follows the dash.
    fn after_dash(&self) -> Option<usize> {
        (self.text == "-" || self.text.starts_with("- ")).then(|| self.indent + 2)
    }

    /// The column where this line's content starts (after a dash, if any).
    fn content_col(&self) -> usize {
        self.after_dash().unwrap_or(self.indent)
    }

    /// The content after the dash, if any.
    fn content(&self) -> &str {
        if self.after_dash().is_some() { self.text.get(2..).unwrap_or("").trim_start() } else { self.text }
    }
}

/// A node: lines `from..to` of `lines`, at column `col` (a sequence's: its dashes').
#[derive(Clone, Copy)]
struct Node {
    from: usize,
    to: usize,
    col: usize,
    sequence: bool,
}

/// 1-based (line, column) of `pointer` (`/transitions/0/guard`) in YAML `text`.
pub fn locate(text: &str, pointer: &str) -> Option<(usize, usize)> {
    let lines: Vec<Line<'_>> = text
        .lines()
        .enumerate()
        .filter_map(|(i, raw)| {
            let text = raw.trim_start_matches(' ');
            let skip = text.is_empty() || text.starts_with('#') || text == "---";
            (!skip).then(|| Line { number: i + 1, indent: raw.len() - text.len(), text: text.trim_end() })
        })
        .collect();
    let first = lines.first()?;
    let mut node = Node {
        from: 0,
        to: lines.len(),
        col: first.indent,
        sequence: first.after_dash().is_some() && first.indent == 0,
    };
    let mut found = None;
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        let (at, child) = match step(&lines, node, &segment) {
            Some(s) => s,
            None => return found,
        };
        found = Some((lines[at].number, node.col + 1));
        match child {
            Some(c) => node = c,
            None => return found,
        }
    }
    found
}

/// The line of `segment` in `node`, and its value's node when it is written as a block.
fn step(lines: &[Line<'_>], node: Node, segment: &str) -> Option<(usize, Option<Node>)> {
    if node.sequence {
        let index: usize = segment.parse().ok()?;
        let items: Vec<usize> =
            (node.from..node.to).filter(|&i| lines[i].indent == node.col && lines[i].after_dash().is_some()).collect();
        let at = *items.get(index)?;
        let end = items.get(index + 1).copied().unwrap_or(node.to);
        let inline = lines[at].content();
        let child = if inline.is_empty() {
            block_after(lines, at, end, node.col)
        } else if is_key(inline) {
            let col = node.col + 2;
            Some(Node { from: at, to: end, col, sequence: false })
        } else {
            None
        };
        return Some((at, child));
    }
    let at = (node.from..node.to)
        .find(|&i| lines[i].content_col() == node.col && key_of(lines[i].content()) == Some(segment))?;
    let end = (at + 1..node.to)
        .find(|&i| lines[i].indent < node.col || (lines[i].indent == node.col && lines[i].after_dash().is_none()))
        .unwrap_or(node.to);
    let rest = lines[at].content().split_once(':').map_or("", |(_, r)| r.trim());
    let child = if rest.is_empty() || rest.starts_with('#') { block_after(lines, at, end, node.col) } else { None };
    Some((at, child))
}

/// The block node on the lines after `at` (up to `end`), belonging to a key or dash at `col`.
fn block_after(lines: &[Line<'_>], at: usize, end: usize, col: usize) -> Option<Node> {
    let first = lines.get(at + 1).filter(|_| at + 1 < end)?;
    let sequence = first.after_dash().is_some();
    if first.indent < col || (!sequence && first.indent == col) {
        return None;
    }
    let child_col = first.indent;
    let to = (at + 2..end)
        .find(|&i| {
            lines[i].indent < child_col || (sequence && lines[i].indent == child_col && lines[i].after_dash().is_none())
        })
        .unwrap_or(end);
    Some(Node { from: at + 1, to, col: child_col, sequence })
}

fn is_key(text: &str) -> bool {
    key_of(text).is_some()
}

/// The key a `key: …` line names (plain or quoted).
fn key_of(text: &str) -> Option<&str> {
    let (key, _) = text.split_once(':')?;
    let key = key.trim_end();
    let unquoted = key
        .strip_prefix('"')
        .and_then(|k| k.strip_suffix('"'))
        .or_else(|| key.strip_prefix('\'').and_then(|k| k.strip_suffix('\'')));
    match unquoted {
        Some(k) => Some(k),
        None if !key.is_empty() && !key.starts_with(['{', '[', '"', '\'']) && !key.contains(' ') => Some(key),
        None => None,
    }
}

#[cfg(test)]
mod tests {
    use super::locate;

    const PROCESS: &str = "\
# a comment
start:
  type: order
  guard: \"document.total > 0\"
states: [a, b]
final:
  - a
  - b
transitions:
  - from: a
    on: Paid
    to: b
    do:
      - command: {target: order, id: key, name: pay}
  -
    from: b
    after: 30m
";

    #[test]
    fn pointers_land_on_their_lines() {
        let cases = [
            ("/start", Some((2, 1))),
            ("/start/guard", Some((4, 3))),
            ("/states/1", Some((5, 1))),
            ("/final/1", Some((8, 3))),
            ("/transitions/0/on", Some((11, 5))),
            ("/transitions/0/do/0/command", Some((14, 9))),
            ("/transitions/0/do/0/command/name", Some((14, 9))),
            ("/transitions/1", Some((15, 3))),
            ("/transitions/1/after", Some((17, 5))),
            ("/transitions/2", Some((9, 1))),
            ("/nowhere", None),
            ("", None),
        ];
        for (pointer, expected) in cases {
            assert_eq!(locate(PROCESS, pointer), expected, "{pointer}");
        }
    }

    #[test]
    fn a_sequence_at_its_keys_column_and_quoted_keys() {
        let text = "rules:\n- id: a\n  expr: x\n- id: b\n  expr: y\n\"odd key\": 1\n";
        assert_eq!(locate(text, "/rules/1/expr"), Some((5, 3)));
        assert_eq!(locate(text, "/odd key"), Some((6, 1)));
        assert_eq!(locate("", "/a"), None);
    }
}
