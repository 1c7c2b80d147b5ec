//! The client's output formats: `-o json|wide|name` and `--format TEMPLATE`, shared by
//! every listing verb (`ls`, `inspect`, `runs`, `approvals`, `conversation`, …).
//!
//! A verb flattens [`OutputArgs`] into its arguments, turns them into a [`Format`] with
//! [`OutputArgs::format`], and prints its items with [`Format`]'s helpers: a table
//! (narrow or wide) of its own, the items' API JSON, their names, or a template filled
//! from each item's API JSON.

use std::fmt::Write as _;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// What `-o` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputKind {
    /// The API's JSON, keys sorted.
    Json,
    /// The table with more columns.
    Wide,
    /// One name (or id) per line.
    Name,
}

/// The output flags of a listing verb.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OutputArgs {
    /// Output format: json (the API's JSON, keys sorted), wide (a table with more columns)
    /// or name (one name or id per line) [default: the table].
    #[arg(short = 'o', long = "output", value_enum, value_name = "FORMAT")]
    pub output: Option<OutputKind>,
    /// A template printed once per item, fields named as in the JSON output:
    /// '{{.name}}\t{{.status}}', '{{.exit.code}}', '{{json .env}}' (\t and \n are a tab
    /// and a newline; a missing field prints <no value>) [default: none].
    #[arg(long, value_name = "TEMPLATE", conflicts_with = "output")]
    pub format: Option<String>,
}

impl OutputArgs {
    /// The format asked for; `json` is the verb's `--json` flag, kept as an alias of
    /// `-o json`.
    pub fn format(&self, json: bool) -> Result<Format> {
        if json && (self.output.is_some() || self.format.is_some()) {
            bail!("--json is -o json: give one of --json, -o and --format");
        }
        Ok(match (&self.output, &self.format) {
            (_, Some(text)) => Format::Template(Template::parse(text)?),
            (Some(OutputKind::Json), None) => Format::Json,
            (Some(OutputKind::Wide), None) => Format::Wide,
            (Some(OutputKind::Name), None) => Format::Name,
            (None, None) if json => Format::Json,
            (None, None) => Format::Table,
        })
    }
}

/// How a verb prints its items.
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    /// Its table.
    Table,
    /// Its table with more columns.
    Wide,
    /// The API's JSON.
    Json,
    /// One name or id per line.
    Name,
    /// A template per item.
    Template(Template),
}

impl Format {
    /// Whether a table is asked for, and whether wide.
    pub fn table(&self) -> Option<bool> {
        match self {
            Format::Table => Some(false),
            Format::Wide => Some(true),
            _ => None,
        }
    }

    /// Prints a whole list at once: a table from `table(wide)`, a pretty JSON array,
    /// the items' `name`s, or the template once per item.
    pub fn print_list<T: Serialize>(
        &self,
        items: &[T],
        table: impl FnOnce(bool) -> String,
        name: impl Fn(&T) -> String,
    ) -> Result<()> {
        print!("{}", self.render_list(items, table, name)?);
        Ok(())
    }

    /// What [`Format::print_list`] prints.
    pub fn render_list<T: Serialize>(
        &self,
        items: &[T],
        table: impl FnOnce(bool) -> String,
        name: impl Fn(&T) -> String,
    ) -> Result<String> {
        Ok(match self {
            Format::Table => table(false),
            Format::Wide => table(true),
            Format::Json => format!("{}\n", serde_json::to_string_pretty(&json_of(items)?)?),
            Format::Name => items.iter().map(|i| name(i) + "\n").collect(),
            Format::Template(t) => {
                let mut out = String::new();
                for item in items {
                    out.push_str(&t.render(&json_of(item)?));
                    out.push('\n');
                }
                out
            }
        })
    }

    /// One item of a stream (`conversation -f`): its `line` (narrow or wide), a line of
    /// JSON, its name, or the template.
    pub fn render_one<T: Serialize>(
        &self,
        item: &T,
        line: impl FnOnce(bool) -> String,
        name: impl FnOnce(&T) -> String,
    ) -> Result<String> {
        Ok(match self {
            Format::Table => line(false),
            Format::Wide => line(true),
            Format::Json => json_of(item)?.to_string(),
            Format::Name => name(item),
            Format::Template(t) => t.render(&json_of(item)?),
        })
    }
}

/// An item as the JSON output shows it: the API's JSON, keys sorted.
pub fn json_of<T: Serialize + ?Sized>(item: &T) -> Result<Value> {
    serde_json::to_value(item).context("turning the answer back into JSON")
}

/// Rows as a table: columns padded to their widest cell (counted in characters), two
/// spaces apart, trailing spaces cut.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A `--format` template: text with `{{.field.sub}}` and `{{json .field}}` actions
/// (`{{.}}` is the whole item), filled from an item's JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Field { path: Vec<String>, json: bool },
}

/// What a missing field prints, as docker's templates do.
pub const NO_VALUE: &str = "<no value>";

impl Template {
    /// Reads a template; an action that is not `.path` or `json .path` is an error
    /// saying where.
    pub fn parse(text: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(Part::Text(unescape(&rest[..open])));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .with_context(|| format!("--format {text:?}: the action at {:?} has no closing }}}}", &rest[open..]))?;
            let action = after[..close].trim();
            let (json, field) = match action.strip_prefix("json ") {
                Some(field) => (true, field.trim()),
                None => (false, action),
            };
            let Some(path) = field.strip_prefix('.') else {
                bail!(
                    "--format {text:?}: {{{{{action}}}}} is not a field: write {{{{.name}}}}, {{{{.exit.code}}}} or \
                     {{{{json .env}}}} (fields as in -o json)"
                );
            };
            let path: Vec<String> =
                if path.is_empty() { Vec::new() } else { path.split('.').map(str::to_owned).collect() };
            if path.iter().any(|p| p.is_empty() || p.contains(char::is_whitespace)) {
                bail!("--format {text:?}: {{{{{action}}}}} is not a field path like .exit.code");
            }
            parts.push(Part::Field { path, json });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(unescape(rest)));
        }
        Ok(Self { parts })
    }

    /// The template filled from `item`: strings as they are, other values as JSON,
    /// `null` (and a field of `null`) as nothing, a missing field as [`NO_VALUE`]; `json`
    /// prints JSON always.
    pub fn render(&self, item: &Value) -> String {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field { path, json } => {
                    let value = path.iter().try_fold(item, |v, key| match v {
                        Value::Object(map) => map.get(key),
                        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
                        // A field of nothing (`.exit.code` before any exit) is nothing.
                        Value::Null => Some(&Value::Null),
                        _ => None,
                    });
                    match value {
                        None => out.push_str(NO_VALUE),
                        Some(v) if *json => out.push_str(&v.to_string()),
                        Some(Value::String(s)) => out.push_str(s),
                        Some(Value::Null) => {}
                        Some(v) => out.push_str(&v.to_string()),
                    }
                }
            }
        }
        out
    }
}

/// `\t`, `\n` and `\\` in a template's text, as a shell user writes them.
fn unescape(text: &str) -> String {
    text.replace("\\\\", "\u{0}").replace("\\t", "\t").replace("\\n", "\n").replace('\u{0}', "\\")
}

/// A short duration in whole units: `45s`, `12m`, `3h`, `2d`.
pub fn short_duration(secs: i64) -> String {
    match secs.max(0) {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn templates_fill_fields_nested_fields_and_json() {
        let item = json!({"name": "a", "exit": {"code": 3}, "env": {"K": "V"}, "reason": null, "runs": [{"id": 7}]});
        let t = Template::parse("{{.name}}\\t{{ .exit.code }} {{json .env}} [{{.reason}}] {{.nope}} {{.runs.0.id}}")
            .expect("parses");
        assert_eq!(t.render(&item), "a\t3 {\"K\":\"V\"} [] <no value> 7");
        assert_eq!(Template::parse("[{{.reason.code}}]").expect("parses").render(&item), "[]");
        assert_eq!(Template::parse("{{json .}}").expect("parses").render(&json!({"a": 1})), "{\"a\":1}");
        assert_eq!(Template::parse("plain").expect("parses").render(&item), "plain");
    }

    #[test]
    fn a_bad_template_says_what_is_wrong() {
        let e = Template::parse("{{.name").expect_err("unclosed").to_string();
        assert!(e.contains("no closing }}"), "{e}");
        let e = Template::parse("{{name}}").expect_err("no dot").to_string();
        assert!(e.contains("{{name}} is not a field") && e.contains("{{.name}}"), "{e}");
        let e = Template::parse("{{.a..b}}").expect_err("empty key").to_string();
        assert!(e.contains("not a field path"), "{e}");
    }

    #[test]
    fn tables_pad_by_characters() {
        let rows = vec![vec!["A".to_owned(), "B".into()], vec!["漢字".into(), "x".into()]];
        // 漢字 is two characters wide in the count (not six bytes).
        assert_eq!(table(&rows), "A   B\n漢字  x\n");
    }

    #[test]
    fn json_is_an_alias_of_o_json_and_conflicts_with_the_others() {
        let args = OutputArgs::default();
        assert_eq!(args.format(true).expect("ok"), Format::Json);
        assert_eq!(args.format(false).expect("ok"), Format::Table);
        let args = OutputArgs { output: Some(OutputKind::Name), format: None };
        assert!(args.format(true).is_err());
        assert_eq!(args.format(false).expect("ok"), Format::Name);
    }
}
