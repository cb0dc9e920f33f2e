//! containerd's filter language, for `Walk` (`ctr snapshots ls`, containerd's GC, CRI).
//!
//! Grammar (containerd `filters/parser.go`):
//!
//! ```text
//! filters   := filter*                    (a request's list: OR of its filters)
//! filter    := selector ("," selector)*   (AND)
//! selector  := fieldpath [operator value] (no operator: the field is present)
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! quoted    := "…" with Go escapes; for "~=" also /…/ and |…|
//! ```
//!
//! Matching follows containerd's selector semantics exactly: `==` needs the field present,
//! `!=` compares the value (an absent field reads as ""), `~=` is an unanchored regex.
//! Snapshot fields are `kind`, `name`, `parent` and `labels.<key>`.

use regex::Regex;

/// A parse failure, with the byte offset into the filter string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("filter {input:?}: at {pos}: {msg}")]
pub struct FilterError {
    input: String,
    pos: usize,
    msg: String,
}

#[derive(Debug, Clone)]
enum Op {
    Present,
    Equal(String),
    NotEqual(String),
    Matches(Regex),
}

#[derive(Debug, Clone)]
struct Selector {
    fieldpath: Vec<String>,
    op: Op,
}

/// A parsed request filter list: matches when any of its filters does.
#[derive(Debug, Clone, Default)]
pub struct FilterSet {
    /// Each inner list is an AND of selectors; an empty set matches everything.
    any: Vec<Vec<Selector>>,
}

impl FilterSet {
    /// Parses a request's filter strings. An empty string matches everything.
    pub fn parse<S: AsRef<str>>(filters: &[S]) -> Result<FilterSet, FilterError> {
        let mut any = Vec::new();
        for f in filters {
            let f = f.as_ref();
            if f.is_empty() {
                return Ok(FilterSet::default());
            }
            any.push(Parser { s: f, pos: 0 }.selectors()?);
        }
        Ok(FilterSet { any })
    }

    /// Whether an object matches; `field` resolves a field path to its value, or `None`
    /// when the object has no such field.
    pub fn matches(&self, field: impl Fn(&[String]) -> Option<String>) -> bool {
        self.any.is_empty()
            || self.any.iter().any(|all| {
                all.iter().all(|sel| {
                    let value = field(&sel.fieldpath);
                    match &sel.op {
                        Op::Present => value.is_some(),
                        Op::Equal(v) => value.as_deref() == Some(v.as_str()),
                        Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
                        Op::Matches(re) => re.is_match(value.as_deref().unwrap_or("")),
                    }
                })
            })
    }
}

struct Parser<'a> {
    s: &'a str,
    pos: usize,
}

fn is_field_char(c: char) -> bool {
    c == '_' || c.is_ascii_alphanumeric()
}

impl Parser<'_> {
    fn err<T>(&self, msg: impl Into<String>) -> Result<T, FilterError> {
        Err(FilterError {
            input: self.s.to_string(),
            pos: self.pos,
            msg: msg.into(),
        })
    }

    fn peek(&self) -> Option<char> {
        self.s[self.pos..].chars().next()
    }

    fn skip_ws(&mut self) {
        while let Some(c) = self.peek().filter(|c| c.is_whitespace()) {
            self.pos += c.len_utf8();
        }
    }

    fn take_while(&mut self, f: impl Fn(char) -> bool) -> &str {
        let start = self.pos;
        while let Some(c) = self.peek().filter(|&c| f(c)) {
            self.pos += c.len_utf8();
        }
        &self.s[start..self.pos]
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, FilterError> {
        let mut all = vec![self.selector()?];
        loop {
            self.skip_ws();
            match self.peek() {
                None => return Ok(all),
                Some(',') => {
                    self.pos += 1;
                    all.push(self.selector()?);
                }
                Some(c) => return self.err(format!("unexpected input: {c:?}")),
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, FilterError> {
        let fieldpath = self.fieldpath()?;
        self.skip_ws();
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector {
                fieldpath,
                op: Op::Present,
            });
        }
        let op = self
            .take_while(|c| matches!(c, '=' | '!' | '~'))
            .to_string();
        self.skip_ws();
        let regex = op == "~=";
        let value = self.value(regex)?;
        let op = match op.as_str() {
            "==" => Op::Equal(value),
            "!=" => Op::NotEqual(value),
            "~=" => match Regex::new(&value) {
                Ok(re) => Op::Matches(re),
                Err(e) => return self.err(format!("bad regular expression {value:?}: {e}")),
            },
            "" => return self.err("expected an operator (==, !=, ~=) or a separator"),
            other => return self.err(format!("unknown operator {other:?}")),
        };
        Ok(Selector { fieldpath, op })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, FilterError> {
        let mut path = vec![self.field()?];
        loop {
            self.skip_ws();
            if self.peek() != Some('.') {
                return Ok(path);
            }
            self.pos += 1;
            path.push(self.field()?);
        }
    }

    fn field(&mut self) -> Result<String, FilterError> {
        self.skip_ws();
        if self.peek() == Some('"') {
            return self.quoted();
        }
        let f = self.take_while(is_field_char);
        if f.is_empty() {
            return self.err("expected a field or a quoted field");
        }
        Ok(f.to_string())
    }

    fn value(&mut self, alt_quotes: bool) -> Result<String, FilterError> {
        match self.peek() {
            Some('"') => self.quoted(),
            Some('/' | '|') if alt_quotes => self.quoted(),
            Some('/' | '|') => self.err("invalid quote: /…/ and |…| are only allowed with ~="),
            _ => {
                let v = self.take_while(|c| c != ',' && !c.is_whitespace());
                if v.is_empty() {
                    return self.err("expected a value");
                }
                Ok(v.to_string())
            }
        }
    }

    /// A quoted string starting at the current position, Go escapes resolved.
    fn quoted(&mut self) -> Result<String, FilterError> {
        let quote = self.peek().unwrap_or('"');
        self.pos += quote.len_utf8();
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return self.err("unterminated quoted string");
            };
            self.pos += c.len_utf8();
            if c == quote {
                return Ok(out);
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(e) = self.peek() else {
                return self.err("unterminated escape");
            };
            self.pos += e.len_utf8();
            let simple = match e {
                'a' => Some('\x07'),
                'b' => Some('\x08'),
                'f' => Some('\x0c'),
                'n' => Some('\n'),
                'r' => Some('\r'),
                't' => Some('\t'),
                'v' => Some('\x0b'),
                '\\' => Some('\\'),
                c if c == quote => Some(c),
                _ => None,
            };
            if let Some(ch) = simple {
                out.push(ch);
                continue;
            }
            let (radix, digits) = match e {
                '0'..='7' => {
                    self.pos -= 1;
                    (8, 3)
                }
                'x' => (16, 2),
                'u' => (16, 4),
                'U' => (16, 8),
                other => return self.err(format!("unknown escape \\{other}")),
            };
            let end = self.pos + digits;
            let code = self
                .s
                .get(self.pos..end)
                .and_then(|d| u32::from_str_radix(d, radix).ok())
                .and_then(char::from_u32);
            match code {
                Some(ch) => {
                    out.push(ch);
                    self.pos = end;
                }
                None => return self.err("bad numeric escape"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cas::index::{DiskUsage, Kind, Record};
    use std::collections::BTreeMap;

    /// An active snapshot `a-wl` over `p-wl`, as Walk's lookup sees it.
    fn rec() -> Record {
        Record {
            id: 3,
            kind: Kind::Active,
            parent: Some("p-wl".into()),
            labels: BTreeMap::from([
                ("l".into(), "2".into()),
                ("containerd.io/gc.root".into(), "check-walk".into()),
            ]),
            created: std::time::SystemTime::UNIX_EPOCH,
            updated: std::time::SystemTime::UNIX_EPOCH,
            usage: DiskUsage::default(),
            logical_bytes: 0,
        }
    }

    fn m(filters: &[&str]) -> bool {
        let r = rec();
        FilterSet::parse(filters)
            .unwrap()
            .matches(|path| crate::convert::field("a-wl", &r, path))
    }

    #[test]
    fn containerd_walk_cases() {
        assert!(m(&[]));
        assert!(m(&[""]));
        assert!(m(&["labels.\"containerd.io/gc.root\"==check-walk"]));
        assert!(m(&[
            "kind==active,labels.\"containerd.io/gc.root\"==check-walk"
        ]));
        assert!(!m(&[
            "kind==view,labels.\"containerd.io/gc.root\"==check-walk"
        ]));
        assert!(m(&["name==p", "name==a-wl"]));
        assert!(m(&["name==a-wl,labels.l"]));
        assert!(!m(&["parent==p"]));
        assert!(m(&[
            "parent!=\"\",labels.\"containerd.io/gc.root\"==check-walk"
        ]));
        assert!(m(&["labels.l==2"]));
        assert!(!m(&["labels.missing"]));
        assert!(m(&["labels.missing!=x"]));
        assert!(!m(&["labels.missing==\"\""]));
    }

    #[test]
    fn regex_and_quotes() {
        assert!(m(&["name~=^a-"]));
        assert!(m(&["name~=/w[l]$/"]));
        assert!(m(&["name~=|^a|"]));
        assert!(!m(&["name~=^p"]));
        assert!(m(&["name == \"a-\\x77l\" , kind==active"]));
        assert!(m(&["labels.\"containerd.io/gc.root\"~=\"check\""]));
    }

    #[test]
    fn syntax_errors_are_reported() {
        for bad in [
            "name=",
            "name==",
            "name==/x/",
            "name=>x",
            ",name==x",
            "name==x y",
            "name==\"x",
            "name~=(",
            ".name",
        ] {
            assert!(
                FilterSet::parse(&[bad]).is_err(),
                "{bad:?} should not parse"
            );
        }
    }
}
