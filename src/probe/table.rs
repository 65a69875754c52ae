//! A small CSV reader and writer: a header row, comma-separated fields, fields quoted with
//! `"` that may hold commas, line breaks and doubled quotes (`""`), `\n` or `\r\n` line ends
//! and an optional UTF-8 byte-order mark.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A CSV table: its header and its rows of text cells, all of the header's width.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The file it was read from (used in error messages).
    pub path: PathBuf,
    /// Column names, from the header row.
    pub headers: Vec<String>,
    /// Data rows; `rows[i].len() == headers.len()`.
    pub rows: Vec<Vec<String>>,
    /// The 1-based line on which each data row starts (for error messages).
    pub lines: Vec<usize>,
}

impl Table {
    /// Reads a CSV file.
    pub fn read(path: impl AsRef<Path>) -> Result<Table> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(bytes)
            .map_err(|e| Error::file(path, format!("not UTF-8 text ({e})")))?;
        Table::parse(&text, path)
    }

    /// Parses CSV text; `path` names the source in errors.
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<Table> {
        let path = path.as_ref();
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let records = parse_records(text).map_err(|m| Error::file(path, m))?;
        let mut records = records.into_iter();
        let (_, headers) = records
            .next()
            .ok_or_else(|| Error::file(path, "empty CSV file: no header row"))?;
        let headers: Vec<String> = headers.into_iter().map(|h| h.trim().to_string()).collect();
        for (i, h) in headers.iter().enumerate() {
            if headers[..i].contains(h) {
                return Err(Error::field(
                    path,
                    h,
                    format!(
                        "column name appears twice in the header (columns {} and {})",
                        headers[..i].iter().position(|x| x == h).unwrap() + 1,
                        i + 1
                    ),
                ));
            }
        }
        let mut rows = Vec::new();
        let mut lines = Vec::new();
        for (line, rec) in records {
            // A blank line (a single empty field) is skipped.
            if rec.len() == 1 && rec[0].is_empty() && headers.len() != 1 {
                continue;
            }
            if rec.len() != headers.len() {
                return Err(Error::file(
                    path,
                    format!(
                        "line {line}: {} fields but the header has {} columns",
                        rec.len(),
                        headers.len()
                    ),
                ));
            }
            rows.push(rec);
            lines.push(line);
        }
        Ok(Table {
            path: path.to_path_buf(),
            headers,
            rows,
            lines,
        })
    }

    /// The index of column `name`, or an error naming the file and the column and listing
    /// the columns there are.
    pub fn column_index(&self, name: &str) -> Result<usize> {
        self.headers.iter().position(|h| h == name).ok_or_else(|| {
            Error::field(
                &self.path,
                name,
                format!(
                    "no such column; available columns: {}",
                    self.headers
                        .iter()
                        .map(|h| format!("`{h}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        })
    }

    /// The cells of column `name`, one per row.
    pub fn column(&self, name: &str) -> Result<Vec<&str>> {
        let i = self.column_index(name)?;
        Ok(self.rows.iter().map(|r| r[i].as_str()).collect())
    }
}

/// Splits CSV text into records, each with the 1-based line it starts on.
fn parse_records(text: &str) -> std::result::Result<Vec<(usize, Vec<String>)>, String> {
    let mut records = Vec::new();
    let mut fields: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1usize;
    let mut start_line = 1usize;
    let mut in_quotes = false;
    let mut quoted_field = false; // the current field was quoted (text after it is an error)
    let mut at_field_start = true;
    let mut any = false; // anything seen in the current record
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push('\n');
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if at_field_start => {
                in_quotes = true;
                quoted_field = true;
                at_field_start = false;
                any = true;
            }
            ',' => {
                fields.push(std::mem::take(&mut field));
                at_field_start = true;
                quoted_field = false;
                any = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                records.push((start_line, std::mem::take(&mut fields)));
                line += 1;
                start_line = line;
                at_field_start = true;
                quoted_field = false;
                any = false;
            }
            _ => {
                if quoted_field {
                    return Err(format!(
                        "line {line}: unexpected `{c}` after a closing quote (a quote inside a \
                         quoted field must be doubled)"
                    ));
                }
                field.push(c);
                at_field_start = false;
                any = true;
            }
        }
    }
    if in_quotes {
        return Err(format!("line {start_line}: a quoted field is never closed"));
    }
    if any || !field.is_empty() {
        fields.push(field);
        records.push((start_line, fields));
    }
    Ok(records)
}

/// Quotes a cell for CSV when it needs it.
pub fn quote(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) || cell.starts_with(' ') || cell.ends_with(' ') {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_string()
    }
}

/// Renders a header and rows as CSV text (`\n` line ends).
pub fn to_csv<S: AsRef<str>>(headers: &[S], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let line =
        |cells: &mut dyn Iterator<Item = &str>| cells.map(quote).collect::<Vec<_>>().join(",");
    out.push_str(&line(&mut headers.iter().map(|h| h.as_ref())));
    out.push('\n');
    for r in rows {
        out.push_str(&line(&mut r.iter().map(|s| s.as_str())));
        out.push('\n');
    }
    out
}

/// Writes a CSV file atomically (temporary file in the same directory, then rename).
pub fn write_csv<S: AsRef<str>>(
    path: impl AsRef<Path>,
    headers: &[S],
    rows: &[Vec<String>],
) -> Result<()> {
    let path = path.as_ref();
    for (i, r) in rows.iter().enumerate() {
        if r.len() != headers.len() {
            return Err(Error::file(
                path,
                format!(
                    "row {i} has {} cells but there are {} columns",
                    r.len(),
                    headers.len()
                ),
            ));
        }
    }
    super::npy::write_atomic(path, to_csv(headers, rows).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_fields() {
        let t = Table::parse(
            "\u{feff}id,text,score\r\n1,\"a, b\",0.5\r\n2,\"say \"\"hi\"\"\nnext line\",\r\n\n3,plain,1\n",
            "t.csv",
        )
        .unwrap();
        assert_eq!(t.headers, ["id", "text", "score"]);
        assert_eq!(t.rows.len(), 3);
        assert_eq!(t.rows[0], ["1", "a, b", "0.5"]);
        assert_eq!(t.rows[1], ["2", "say \"hi\"\nnext line", ""]);
        assert_eq!(t.rows[2], ["3", "plain", "1"]);
        assert_eq!(t.lines, [2, 3, 6]);
    }

    #[test]
    fn errors_name_file_and_columns() {
        let t = Table::parse("a,b\n1,2\n", "r.csv").unwrap();
        let e = t.column_index("c").unwrap_err().to_string();
        assert!(
            e.contains("r.csv") && e.contains("`c`") && e.contains("`a`, `b`"),
            "{e}"
        );
        let e = Table::parse("a,b\n1,2,3\n", "r.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.csv") && e.contains("line 2"), "{e}");
        let e = Table::parse("a,b\n\"1,2\n", "r.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never closed"), "{e}");
        let e = Table::parse("a,a\n1,2\n", "r.csv").unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn write_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("o.csv");
        let rows = vec![vec!["x, y".to_string(), "q\"uote".to_string()]];
        write_csv(&p, &["k", "v"], &rows).unwrap();
        let t = Table::read(&p).unwrap();
        assert_eq!(t.rows, rows);
    }
}
