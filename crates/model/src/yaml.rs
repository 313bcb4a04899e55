//! A YAML tree that keeps every node's position, built from `saphyr-parser` events.
//!
//! The config reader walks this tree itself instead of going through serde, so it can report
//! every error in one pass (serde stops at the first) and point at the line and column of each.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

/// Where a node starts: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl std::fmt::Display for Pos {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// A YAML value with its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The value.
    pub value: Value,
    /// Where it starts.
    pub pos: Pos,
}

/// The shape of a node.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `~`, `null`, or an empty value.
    Null,
    /// Any scalar; `quoted` is true for quoted or block scalars (never null, bool or number).
    Scalar {
        /// The text.
        text: String,
        /// Quoted or block style.
        quoted: bool,
    },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in document order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// A short description of the node's kind, for "expected X, found Y" messages.
    pub fn kind(&self) -> &'static str {
        match &self.value {
            Value::Null => "nothing",
            Value::Scalar { .. } => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    /// The scalar text, if this is a scalar.
    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }
}

/// A YAML syntax error.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message} ({pos})")]
pub struct SyntaxError {
    /// What the parser said.
    pub message: String,
    /// Where.
    pub pos: Pos,
}

fn pos(span: &Span) -> Pos {
    Pos {
        line: span.start.line(),
        column: span.start.col() + 1,
    }
}

/// Limits that keep a hostile file from exhausting memory (alias expansion, depth).
const MAX_NODES: usize = 1_000_000;
const MAX_DEPTH: usize = 128;

/// Parses one YAML document (an empty file is `Null`). Anchors and aliases are expanded,
/// within a node budget. Duplicate mapping keys are reported by the config reader.
pub fn parse(src: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder {
        anchors: HashMap::new(),
        stack: Vec::new(),
        root: None,
        nodes: 0,
    };
    let mut docs = 0;
    for ev in Parser::new_from_str(src) {
        let (ev, span) = ev.map_err(|e| SyntaxError {
            message: e.info().to_string(),
            pos: Pos {
                line: e.marker().line(),
                column: e.marker().col() + 1,
            },
        })?;
        match ev {
            Event::DocumentStart(_) => {
                docs += 1;
                if docs > 1 {
                    return Err(SyntaxError {
                        message: "more than one YAML document; put everything in one".into(),
                        pos: pos(&span),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, ScalarStyle::Plain);
                let value = if !quoted && matches!(&*text, "" | "~" | "null" | "Null" | "NULL") {
                    Value::Null
                } else {
                    Value::Scalar {
                        text: text.into_owned(),
                        quoted,
                    }
                };
                builder.push(
                    Node {
                        value,
                        pos: pos(&span),
                    },
                    anchor,
                )?;
            }
            Event::SequenceStart(anchor, _) => builder.open(
                Node {
                    value: Value::Seq(Vec::new()),
                    pos: pos(&span),
                },
                anchor,
            )?,
            Event::MappingStart(anchor, _) => builder.open(
                Node {
                    value: Value::Map(Vec::new()),
                    pos: pos(&span),
                },
                anchor,
            )?,
            Event::SequenceEnd | Event::MappingEnd => builder.close()?,
            Event::Alias(id) => {
                let node = builder
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| SyntaxError {
                        message: "alias to an unknown anchor".into(),
                        pos: pos(&span),
                    })?;
                builder.nodes += count(&node);
                if builder.nodes > MAX_NODES {
                    return Err(SyntaxError {
                        message: "document expands to too many nodes (alias bomb?)".into(),
                        pos: pos(&span),
                    });
                }
                builder.push(node, 0)?;
            }
            _ => {}
        }
    }
    Ok(builder.root.unwrap_or(Node {
        value: Value::Null,
        pos: Pos { line: 1, column: 1 },
    }))
}

fn count(n: &Node) -> usize {
    match &n.value {
        Value::Seq(v) => 1 + v.iter().map(count).sum::<usize>(),
        Value::Map(v) => 1 + v.iter().map(|(k, v)| count(k) + count(v)).sum::<usize>(),
        _ => 1,
    }
}

struct Frame {
    node: Node,
    anchor: usize,
    pending_key: Option<Node>,
}

struct Builder {
    anchors: HashMap<usize, Node>,
    stack: Vec<Frame>,
    root: Option<Node>,
    nodes: usize,
}

impl Builder {
    fn open(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(SyntaxError {
                message: format!("nesting deeper than {MAX_DEPTH} levels"),
                pos: node.pos,
            });
        }
        self.stack.push(Frame {
            node,
            anchor,
            pending_key: None,
        });
        Ok(())
    }

    fn close(&mut self) -> Result<(), SyntaxError> {
        let frame = self
            .stack
            .pop()
            .expect("parser balances start and end events");
        self.push(frame.node, frame.anchor)
    }

    fn push(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        self.nodes += 1;
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                message: "document has too many nodes".into(),
                pos: node.pos,
            });
        }
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(frame) => match &mut frame.node.value {
                Value::Seq(items) => items.push(node),
                Value::Map(entries) => match frame.pending_key.take() {
                    None => frame.pending_key = Some(node),
                    Some(key) => entries.push((key, node)),
                },
                _ => unreachable!("only collections are on the stack"),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_positions_of_nested_values() {
        let n = parse("a:\n  b: [1, 2]\n  c: x\n").unwrap();
        let Value::Map(top) = &n.value else { panic!() };
        let Value::Map(inner) = &top[0].1.value else {
            panic!()
        };
        assert_eq!(inner[1].1.pos, Pos { line: 3, column: 6 });
        let Value::Seq(items) = &inner[0].1.value else {
            panic!()
        };
        assert_eq!(
            items[1].pos,
            Pos {
                line: 2,
                column: 10
            }
        );
    }

    #[test]
    fn nulls_and_quoted_scalars_differ() {
        let n = parse("a: ~\nb: '~'\nc:\n").unwrap();
        let Value::Map(m) = &n.value else { panic!() };
        assert_eq!(m[0].1.value, Value::Null);
        assert!(matches!(m[1].1.value, Value::Scalar { quoted: true, .. }));
        assert_eq!(m[2].1.value, Value::Null);
    }

    #[test]
    fn expands_aliases_and_reports_syntax_errors_with_position() {
        let n = parse("a: &x [1]\nb: *x\n").unwrap();
        let Value::Map(m) = &n.value else { panic!() };
        assert_eq!(m[0].1.value, m[1].1.value);
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.pos.line >= 1, "{e}");
    }

    #[test]
    fn alias_bombs_are_refused() {
        let mut doc = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            let p = i - 1;
            doc.push_str(&format!(
                "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        assert!(parse(&doc).unwrap_err().message.contains("too many"));
    }
}
