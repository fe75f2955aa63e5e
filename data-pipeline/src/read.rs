//! Readers: JSONL (plain, .gz, .zst), Parquet, text files (one document per file or per
//! line) and JSON files with a path to the documents. Readers stream: a file is never
//! loaded whole unless its format needs it (a JSON document, one text document per file).
//! A broken record (invalid JSON, no text field) becomes a `Record::Broken` with its line,
//! which the executor counts and writes to the rejected sink; invalid UTF-8 is decoded
//! lossily and reported.

use crate::config::{InputConfig, InputFormat};
use crate::error::{Error, Result};
use crate::Document;
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Record {
    Doc {
        doc: Document,
        /// 1-based line (JSONL, text lines) or record number.
        line: u64,
        /// The bytes were not valid UTF-8 and were decoded with U+FFFD replacements.
        invalid_utf8: bool,
    },
    Broken {
        line: u64,
        kind: &'static str,
        message: String,
        /// The raw record (lossy UTF-8), kept for the rejected sink.
        raw: String,
    },
}

/// The input files, sorted, for a file, a directory (recursive) or a `dir/prefix*suffix` glob.
pub fn list_files(cfg: &InputConfig) -> Result<Vec<PathBuf>> {
    let p = &cfg.path;
    let mut files = Vec::new();
    let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    if name.contains('*') {
        let dir = p.parent().unwrap_or(Path::new("."));
        let (pre, suf) = name.split_once('*').unwrap_or((&name, ""));
        let suf = suf.trim_start_matches('*');
        walk(dir, &mut files, false)?;
        files.retain(|f| {
            let n = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            n.starts_with(pre) && n.ends_with(suf) && n.len() >= pre.len() + suf.len()
        });
    } else if p.is_dir() {
        walk(p, &mut files, true)?;
    } else if p.is_file() {
        files.push(p.clone());
    } else {
        return Err(Error::io(p, std::io::Error::new(std::io::ErrorKind::NotFound, "input path not found")));
    }
    if !cfg.extensions.is_empty() {
        files.retain(|f| {
            let n = f.to_string_lossy();
            cfg.extensions.iter().any(|e| n.ends_with(e.as_str()))
        });
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::format(p, "no input files"));
    }
    Ok(files)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, recursive: bool) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in rd {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let path = e.path();
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            continue;
        }
        if path.is_dir() {
            if recursive {
                walk(&path, out, true)?;
            }
        } else {
            out.push(path);
        }
    }
    Ok(())
}

pub fn detect_format(path: &Path, cfg: &InputConfig) -> InputFormat {
    if cfg.format != InputFormat::Auto {
        return cfg.format;
    }
    let n = path.to_string_lossy().to_lowercase();
    let n = n.trim_end_matches(".gz").trim_end_matches(".zst").trim_end_matches(".zstd");
    if n.ends_with(".jsonl") || n.ends_with(".ndjson") || n.ends_with(".jsonl.json") {
        InputFormat::Jsonl
    } else if n.ends_with(".parquet") {
        InputFormat::Parquet
    } else if n.ends_with(".json") {
        InputFormat::Json
    } else {
        InputFormat::Text
    }
}

/// A reader over a possibly compressed file that counts the compressed bytes read.
fn open(path: &Path) -> Result<Box<dyn Read + Send>> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let n = path.to_string_lossy().to_lowercase();
    Ok(if n.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 16, f)))
    } else if n.ends_with(".zst") || n.ends_with(".zstd") {
        Box::new(zstd::stream::read::Decoder::new(f).map_err(|e| Error::io(path, e))?)
    } else {
        Box::new(f)
    })
}

/// A short name for ids: the path relative to the input root.
pub fn rel_name(path: &Path, root: &Path) -> String {
    let r = if root.is_dir() { path.strip_prefix(root).unwrap_or(path) } else { path.file_name().map(Path::new).unwrap_or(path) };
    r.to_string_lossy().to_string()
}

/// Read one file, calling `emit` for each record until it returns false.
/// I/O errors in the middle of a file (a truncated .gz) end the file with one `Broken`
/// record describing where it stopped.
pub fn read_file(
    path: &Path,
    root: &Path,
    cfg: &InputConfig,
    emit: &mut dyn FnMut(Record) -> bool,
) -> Result<()> {
    let name = rel_name(path, root);
    match detect_format(path, cfg) {
        InputFormat::Jsonl | InputFormat::Auto => read_jsonl(path, &name, cfg, emit),
        InputFormat::Text => read_text(path, &name, cfg, emit),
        InputFormat::Json => read_json(path, &name, cfg, emit),
        InputFormat::Parquet => read_parquet(path, &name, cfg, emit),
    }
}

fn lossy(bytes: &[u8]) -> (String, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), false),
        Err(_) => (String::from_utf8_lossy(bytes).into_owned(), true),
    }
}

fn read_jsonl(path: &Path, name: &str, cfg: &InputConfig, emit: &mut dyn FnMut(Record) -> bool) -> Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, open(path)?);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => {
                emit(Record::Broken {
                    line: line + 1,
                    kind: "read_error",
                    message: format!("reading stopped: {e}"),
                    raw: String::new(),
                });
                return Ok(());
            }
        }
        line += 1;
        let bytes = trim_newline(&buf);
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let (text, invalid_utf8) = lossy(bytes);
        let rec = match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(obj)) => match doc_from_object(obj, cfg, name, line) {
                Ok(doc) => Record::Doc { doc, line, invalid_utf8 },
                Err(msg) => Record::Broken { line, kind: "missing_text", message: msg, raw: text },
            },
            Ok(_) => Record::Broken {
                line,
                kind: "not_an_object",
                message: "a JSONL line must be a JSON object".into(),
                raw: text,
            },
            Err(e) => Record::Broken { line, kind: "invalid_json", message: e.to_string(), raw: text },
        };
        if !emit(rec) {
            return Ok(());
        }
    }
}

fn trim_newline(b: &[u8]) -> &[u8] {
    let b = b.strip_suffix(b"\n").unwrap_or(b);
    b.strip_suffix(b"\r").unwrap_or(b)
}

/// `{text, id, metadata?, ...}`: other top-level fields go into metadata, so nothing is lost.
fn doc_from_object(mut obj: Map<String, Value>, cfg: &InputConfig, name: &str, line: u64) -> std::result::Result<Document, String> {
    let text = match obj.remove(&cfg.text_key) {
        Some(Value::String(s)) => s,
        Some(Value::Null) | None => return Err(format!("no `{}` field", cfg.text_key)),
        Some(other) => return Err(format!("`{}` is not a string but {}", cfg.text_key, json_kind(&other))),
    };
    let id = match obj.remove(&cfg.id_key) {
        Some(Value::String(s)) => s,
        Some(Value::Number(n)) => n.to_string(),
        Some(other) if !other.is_null() => other.to_string(),
        _ => format!("{name}:{line}"),
    };
    let mut metadata = match obj.remove("metadata") {
        Some(Value::Object(m)) => m,
        Some(other) if !other.is_null() => {
            let mut m = Map::new();
            m.insert("metadata".into(), other);
            m
        }
        _ => Map::new(),
    };
    for (k, v) in obj {
        metadata.entry(k).or_insert(v);
    }
    Ok(Document { id, text, metadata })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_text(path: &Path, name: &str, cfg: &InputConfig, emit: &mut dyn FnMut(Record) -> bool) -> Result<()> {
    let mut r = BufReader::with_capacity(1 << 20, open(path)?);
    if cfg.per_line {
        let mut buf = Vec::new();
        let mut line = 0u64;
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    emit(Record::Broken { line: line + 1, kind: "read_error", message: format!("reading stopped: {e}"), raw: String::new() });
                    return Ok(());
                }
            }
            line += 1;
            let bytes = trim_newline(&buf);
            if bytes.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let (text, invalid_utf8) = lossy(bytes);
            if !emit(Record::Doc { doc: Document::new(format!("{name}:{line}"), text), line, invalid_utf8 }) {
                return Ok(());
            }
        }
    }
    let mut bytes = Vec::new();
    if let Err(e) = r.read_to_end(&mut bytes) {
        emit(Record::Broken { line: 1, kind: "read_error", message: format!("reading stopped: {e}"), raw: String::new() });
        return Ok(());
    }
    let (text, invalid_utf8) = lossy(&bytes);
    emit(Record::Doc { doc: Document::new(name.to_string(), text), line: 1, invalid_utf8 });
    Ok(())
}

/// One step of a JSON path: a key, every element, or one element.
#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    All,
    Index(usize),
}

fn parse_path(p: &str) -> std::result::Result<Vec<Seg>, String> {
    let mut segs = Vec::new();
    for part in p.split('.').filter(|s| !s.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segs.push(Seg::Key(key.to_string()));
        }
        while let Some(r) = rest.strip_prefix('[') {
            let end = r.find(']').ok_or_else(|| format!("json_path `{p}`: unclosed ["))?;
            let inner = &r[..end];
            segs.push(if inner == "*" {
                Seg::All
            } else {
                Seg::Index(inner.parse().map_err(|_| format!("json_path `{p}`: bad index `{inner}`"))?)
            });
            rest = &r[end + 1..];
        }
        if !rest.is_empty() {
            return Err(format!("json_path `{p}`: unexpected `{rest}`"));
        }
    }
    Ok(segs)
}

/// Walk `segs`, calling `f(path, value, parent object)` for every match.
fn select<'a>(v: &'a Value, segs: &[Seg], path: String, parent: Option<&'a Map<String, Value>>, f: &mut dyn FnMut(String, &'a Value, Option<&'a Map<String, Value>>) -> bool) -> bool {
    let Some((first, rest)) = segs.split_first() else {
        return f(path, v, parent);
    };
    match (first, v) {
        (Seg::Key(k), Value::Object(m)) => match m.get(k) {
            Some(child) => select(child, rest, if path.is_empty() { k.clone() } else { format!("{path}.{k}") }, Some(m), f),
            None => true,
        },
        (Seg::All, Value::Array(a)) => {
            for (i, child) in a.iter().enumerate() {
                if !select(child, rest, format!("{path}[{i}]"), parent, f) {
                    return false;
                }
            }
            true
        }
        (Seg::Index(i), Value::Array(a)) => match a.get(*i) {
            Some(child) => select(child, rest, format!("{path}[{i}]"), parent, f),
            None => true,
        },
        _ => true,
    }
}

fn read_json(path: &Path, name: &str, cfg: &InputConfig, emit: &mut dyn FnMut(Record) -> bool) -> Result<()> {
    let mut bytes = Vec::new();
    if let Err(e) = open(path)?.read_to_end(&mut bytes) {
        emit(Record::Broken { line: 1, kind: "read_error", message: format!("reading stopped: {e}"), raw: String::new() });
        return Ok(());
    }
    let (text, invalid_utf8) = lossy(&bytes);
    let root: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            emit(Record::Broken { line: e.line() as u64, kind: "invalid_json", message: e.to_string(), raw: String::new() });
            return Ok(());
        }
    };
    let Some(jp) = cfg.json_path.as_deref() else {
        // The whole file is one record.
        let rec = match root {
            Value::Object(obj) => match doc_from_object(obj, cfg, name, 1) {
                Ok(doc) => Record::Doc { doc, line: 1, invalid_utf8 },
                Err(msg) => Record::Broken { line: 1, kind: "missing_text", message: msg, raw: String::new() },
            },
            _ => Record::Broken { line: 1, kind: "not_an_object", message: "set input.json_path to say where the documents are".into(), raw: String::new() },
        };
        emit(rec);
        return Ok(());
    };
    let segs = parse_path(jp).map_err(|m| Error::Config { path: path.to_path_buf(), msg: m })?;
    let mut shared = Map::new();
    if let Value::Object(top) = &root {
        for k in &cfg.json_metadata {
            if let Some(v) = top.get(k) {
                shared.insert(k.clone(), v.clone());
            }
        }
    }
    let last_key = match segs.last() {
        Some(Seg::Key(k)) => Some(k.clone()),
        _ => None,
    };
    let mut n = 0u64;
    select(&root, &segs, String::new(), None, &mut |p, v, parent| {
        n += 1;
        let rec = match v {
            Value::String(s) => {
                let mut doc = Document::new(format!("{name}#{p}"), s.clone());
                doc.metadata = shared.clone();
                // Sibling scalar fields (e.g. a provision's title) come along.
                if let (Some(parent), Some(k)) = (parent, last_key.as_ref()) {
                    for (pk, pv) in parent {
                        if pk != k && !pv.is_object() && !pv.is_array() {
                            doc.metadata.entry(pk.clone()).or_insert_with(|| pv.clone());
                        }
                    }
                }
                Record::Doc { doc, line: n, invalid_utf8 }
            }
            Value::Null => Record::Broken { line: n, kind: "missing_text", message: format!("{p} is null"), raw: String::new() },
            other => Record::Broken { line: n, kind: "missing_text", message: format!("{p} is {}, not a string", json_kind(other)), raw: other.to_string() },
        };
        emit(rec)
    });
    Ok(())
}

fn read_parquet(path: &Path, name: &str, cfg: &InputConfig, emit: &mut dyn FnMut(Record) -> bool) -> Result<()> {
    use arrow_array::cast::AsArray;
    use arrow_array::Array;
    use arrow_schema::DataType;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let perr = |msg: String| Error::Parquet { path: path.to_path_buf(), msg };
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| perr(e.to_string()))?;
    let reader = builder.with_batch_size(1024).build().map_err(|e| perr(e.to_string()))?;
    let mut row = 0u64;
    for batch in reader {
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                emit(Record::Broken { line: row + 1, kind: "read_error", message: format!("reading stopped: {e}"), raw: String::new() });
                return Ok(());
            }
        };
        let schema = batch.schema();
        let text_idx = schema.index_of(&cfg.text_key).map_err(|_| perr(format!("no `{}` column", cfg.text_key)))?;
        let id_idx = schema.index_of(&cfg.id_key).ok();
        for r in 0..batch.num_rows() {
            row += 1;
            let get = |col: usize| -> Option<Value> {
                let a = batch.column(col);
                if a.is_null(r) {
                    return None;
                }
                Some(match a.data_type() {
                    DataType::Utf8 => Value::String(a.as_string::<i32>().value(r).to_string()),
                    DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(r).to_string()),
                    DataType::Utf8View => Value::String(a.as_string_view().value(r).to_string()),
                    DataType::Int64 => Value::from(a.as_primitive::<arrow_array::types::Int64Type>().value(r)),
                    DataType::Int32 => Value::from(a.as_primitive::<arrow_array::types::Int32Type>().value(r)),
                    DataType::UInt64 => Value::from(a.as_primitive::<arrow_array::types::UInt64Type>().value(r)),
                    DataType::Float64 => serde_json::json!(a.as_primitive::<arrow_array::types::Float64Type>().value(r)),
                    DataType::Float32 => serde_json::json!(a.as_primitive::<arrow_array::types::Float32Type>().value(r)),
                    DataType::Boolean => Value::Bool(a.as_boolean().value(r)),
                    _ => return None,
                })
            };
            let rec = match get(text_idx) {
                Some(Value::String(text)) => {
                    let id = match id_idx.and_then(get) {
                        Some(Value::String(s)) => s,
                        Some(v) => v.to_string(),
                        None => format!("{name}:{row}"),
                    };
                    let mut doc = Document::new(id, text);
                    for (c, field) in schema.fields().iter().enumerate() {
                        if c == text_idx || Some(c) == id_idx {
                            continue;
                        }
                        if field.name() == "metadata" {
                            if let Some(Value::String(s)) = get(c) {
                                if let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&s) {
                                    for (k, v) in m {
                                        doc.metadata.entry(k).or_insert(v);
                                    }
                                    continue;
                                }
                            }
                        }
                        if let Some(v) = get(c) {
                            doc.metadata.insert(field.name().clone(), v);
                        }
                    }
                    Record::Doc { doc, line: row, invalid_utf8: false }
                }
                _ => Record::Broken { line: row, kind: "missing_text", message: format!("row {row}: `{}` is null or not a string", cfg.text_key), raw: String::new() },
            };
            if !emit(rec) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        assert_eq!(parse_path("provisions[*].content").unwrap(), vec![Seg::Key("provisions".into()), Seg::All, Seg::Key("content".into())]);
        assert_eq!(parse_path("a[2][*]").unwrap(), vec![Seg::Key("a".into()), Seg::Index(2), Seg::All]);
        assert!(parse_path("a[x]").is_err());
        assert!(parse_path("a[1").is_err());
    }
}
