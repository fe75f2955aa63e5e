//! Tasks are data: one YAML file per task names the dataset (by path), the prompt
//! (minijinja templates over each document's fields), the choices and the gold answer,
//! the metrics, and the few-shot source. A new data set needs a YAML file, not code.
//!
//! ```yaml
//! task: zno_uk
//! dataset: {path: ${HROMADA_SHARED}/data/eval/zno/data/zno.test.jsonl, format: jsonl}
//! output_type: multiple_choice          # | loglikelihood_rolling | generate_until
//! doc_to_text: "{{ question }}\nВідповідь:"
//! doc_to_choice: "answers | map(attribute='marker') | list"   # an expression
//! doc_to_target: "correct_answers[0]"   # an expression: a choice's index or its text
//! target_delimiter: " "                 # between the prompt and a continuation
//! group_by: "subject"                   # an expression: results also per group
//! fewshot: {seed: 1234, delimiter: "\n\n"}
//! ```
//!
//! Paths are relative to the YAML file; `${VAR}` expands environment variables, and
//! `${HROMADA_SHARED}` defaults to `../shared` next to the repository.
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

use minijinja::{Environment, Value as JValue};
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum OutputType {
    MultipleChoice,
    LoglikelihoodRolling,
    GenerateUntil,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    pub path: String,
    /// `jsonl` (one object per line), `json` (one object per file, a file or a directory
    /// of `*.json`) or `text` (one document per file: `text`, `file`).
    pub format: String,
    #[serde(default)]
    pub extensions: Vec<String>,
    /// `json` only: every element of this array field is a document (its fields, plus
    /// `parent`: the file's other fields, and `file`).
    #[serde(default)]
    pub records: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FewshotSpec {
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default = "default_fewshot_delim")]
    pub delimiter: String,
}

fn default_seed() -> u64 {
    1234
}
fn default_fewshot_delim() -> String {
    "\n\n".into()
}
fn default_target_delim() -> String {
    " ".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollingSpec {
    /// Tokens per window (default: the model's context, at most 2048).
    #[serde(default)]
    pub max_length: usize,
    /// Tokens scored per window after the first (default: half a window: the other half
    /// is context carried over from the previous window).
    #[serde(default)]
    pub stride: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub task: String,
    #[serde(default)]
    pub description: String,
    pub dataset: DatasetSpec,
    pub output_type: OutputType,
    pub doc_to_text: String,
    #[serde(default)]
    pub doc_to_choice: Option<String>,
    #[serde(default)]
    pub doc_to_target: Option<String>,
    #[serde(default = "default_target_delim")]
    pub target_delimiter: String,
    #[serde(default)]
    pub group_by: Option<String>,
    /// Display names of group values (`A: news`).
    #[serde(default)]
    pub group_names: BTreeMap<String, String>,
    #[serde(default)]
    pub fewshot: Option<FewshotSpec>,
    #[serde(default)]
    pub rolling: Option<RollingSpec>,
    /// generate_until: stop strings and the token budget.
    #[serde(default)]
    pub until: Vec<String>,
    #[serde(default = "default_gen_toks")]
    pub max_gen_toks: usize,
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default = "default_version")]
    pub version: String,
}

fn default_gen_toks() -> usize {
    256
}
fn default_version() -> String {
    "1.0".into()
}

/// A loaded task: its spec, documents, compiled templates.
pub struct Task {
    pub spec: TaskSpec,
    pub file: PathBuf,
    pub docs: Vec<Doc>,
    env: Environment<'static>,
}

/// One document with where it came from (for messages).
#[derive(Debug, Clone)]
pub struct Doc {
    pub fields: Value,
    pub source: PathBuf,
    pub line: usize,
}

/// Expand `${VAR}`; `${HROMADA_SHARED}` defaults to `../shared` beside the repository.
pub fn expand_vars(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            out.push_str(&rest[i..]);
            return out;
        };
        let name = &rest[i + 2..i + j];
        let val = std::env::var(name).ok().or_else(|| (name == "HROMADA_SHARED").then(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared").to_string()));
        out.push_str(&val.unwrap_or_default());
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    out
}

fn env() -> Environment<'static> {
    let mut e = Environment::new();
    e.set_trim_blocks(false);
    e.set_keep_trailing_newline(true);
    e.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    e
}

impl Task {
    /// Read a task YAML and its documents. Errors name the file (and the line for data).
    pub fn load(file: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        let spec: TaskSpec = serde_yaml_ng::from_str(&text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            Error::task(file, line, format!("invalid task: {e}"))
        })?;
        let need = |f: &Option<String>, name: &str| -> Result<()> {
            if f.is_none() {
                return Err(Error::task(file, 0, format!("{:?} needs `{name}`", spec.output_type)));
            }
            Ok(())
        };
        if spec.output_type == OutputType::MultipleChoice {
            need(&spec.doc_to_choice, "doc_to_choice")?;
            need(&spec.doc_to_target, "doc_to_target")?;
        }
        let mut env = env();
        env.add_template_owned("text".to_string(), spec.doc_to_text.clone()).map_err(|e| Error::task(file, 0, format!("doc_to_text: {e}")))?;
        for (what, expr) in [("doc_to_choice", &spec.doc_to_choice), ("doc_to_target", &spec.doc_to_target), ("group_by", &spec.group_by)] {
            if let Some(x) = expr {
                env.compile_expression(x).map_err(|e| Error::task(file, 0, format!("{what}: {e}")))?;
            }
        }
        let base = file.parent().unwrap_or(Path::new("."));
        let data_path = {
            let p = PathBuf::from(expand_vars(&spec.dataset.path));
            if p.is_absolute() { p } else { base.join(p) }
        };
        let docs = load_docs(&spec.dataset, &data_path, file)?;
        if docs.is_empty() {
            return Err(Error::task(file, 0, format!("the dataset {} has no documents", data_path.display())));
        }
        Ok(Self { spec, file: file.to_path_buf(), docs, env })
    }

    fn err(&self, d: &Doc, msg: String) -> Error {
        Error::task(&d.source, d.line, format!("task {}: {msg}", self.spec.task))
    }

    pub fn text(&self, d: &Doc) -> Result<String> {
        let t = self.env.get_template("text").map_err(|e| self.err(d, e.to_string()))?;
        t.render(JValue::from_serialize(&d.fields)).map_err(|e| self.err(d, format!("doc_to_text: {e}")))
    }

    fn eval_expr(&self, d: &Doc, what: &str, expr: &str) -> Result<JValue> {
        let x = self.env.compile_expression(expr).map_err(|e| self.err(d, format!("{what}: {e}")))?;
        x.eval(JValue::from_serialize(&d.fields)).map_err(|e| self.err(d, format!("{what}: {e}")))
    }

    pub fn choices(&self, d: &Doc) -> Result<Vec<String>> {
        let expr = self.spec.doc_to_choice.as_deref().unwrap_or("[]");
        let v = self.eval_expr(d, "doc_to_choice", expr)?;
        let list: Vec<String> = v.try_iter().map_err(|e| self.err(d, format!("doc_to_choice is not a list: {e}")))?.map(|x| x.to_string()).collect();
        if list.len() < 2 {
            return Err(self.err(d, format!("doc_to_choice gives {} choices", list.len())));
        }
        Ok(list)
    }

    /// The gold choice's index: the expression gives an index or a choice's text.
    pub fn target(&self, d: &Doc, choices: &[String]) -> Result<usize> {
        let expr = self.spec.doc_to_target.as_deref().unwrap_or("0");
        let v = self.eval_expr(d, "doc_to_target", expr)?;
        if let Some(i) = v.as_i64() {
            return usize::try_from(i).ok().filter(|&i| i < choices.len()).ok_or_else(|| self.err(d, format!("doc_to_target {i} is out of range")));
        }
        let s = v.to_string();
        choices.iter().position(|c| *c == s).ok_or_else(|| self.err(d, format!("doc_to_target `{s}` is none of the choices {choices:?}")))
    }

    pub fn target_text(&self, d: &Doc) -> Result<String> {
        let expr = self.spec.doc_to_target.as_deref().unwrap_or("''");
        Ok(self.eval_expr(d, "doc_to_target", expr)?.to_string())
    }

    pub fn group(&self, d: &Doc) -> Result<Option<String>> {
        let Some(expr) = &self.spec.group_by else { return Ok(None) };
        let g = self.eval_expr(d, "group_by", expr)?.to_string();
        Ok(Some(self.spec.group_names.get(&g).cloned().unwrap_or(g)))
    }
}

fn load_docs(spec: &DatasetSpec, path: &Path, task_file: &Path) -> Result<Vec<Doc>> {
    let files = |exts: &[&str]| -> Result<Vec<PathBuf>> {
        if path.is_file() {
            return Ok(vec![path.to_path_buf()]);
        }
        let rd = std::fs::read_dir(path).map_err(|e| Error::task(task_file, 0, format!("dataset {}: {e}", path.display())))?;
        let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file() && exts.iter().any(|x| p.to_string_lossy().ends_with(x))).collect();
        v.sort();
        Ok(v)
    };
    let mut docs = Vec::new();
    match spec.format.as_str() {
        "jsonl" => {
            for f in files(&[".jsonl"])? {
                let fh = std::fs::File::open(&f).map_err(|e| Error::io(&f, e))?;
                for (i, line) in std::io::BufReader::new(fh).lines().enumerate() {
                    let line = line.map_err(|e| Error::io(&f, e))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let v: Value = serde_json::from_str(&line).map_err(|e| Error::task(&f, i + 1, format!("invalid JSON: {e}")))?;
                    if !v.is_object() {
                        return Err(Error::task(&f, i + 1, "a document must be a JSON object"));
                    }
                    docs.push(Doc { fields: v, source: f.clone(), line: i + 1 });
                }
            }
        }
        "json" => {
            for f in files(&[".json"])? {
                let t = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
                let mut v: Value = serde_json::from_str(&t).map_err(|e| Error::task(&f, e.line(), format!("invalid JSON: {e}")))?;
                let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                let Some(o) = v.as_object_mut() else { return Err(Error::task(&f, 1, "a document must be a JSON object")) };
                o.insert("file".into(), Value::String(name.clone()));
                match &spec.records {
                    None => docs.push(Doc { fields: v, source: f.clone(), line: 0 }),
                    Some(field) => {
                        let recs = match o.remove(field) {
                            Some(Value::Array(a)) => a,
                            _ => return Err(Error::task(&f, 0, format!("dataset.records: `{field}` is not an array here"))),
                        };
                        let parent = Value::Object(o.clone());
                        for r in recs {
                            let mut r = match r {
                                Value::Object(m) => m,
                                other => [("value".to_string(), other)].into_iter().collect(),
                            };
                            r.insert("parent".into(), parent.clone());
                            r.insert("file".into(), Value::String(name.clone()));
                            docs.push(Doc { fields: Value::Object(r), source: f.clone(), line: 0 });
                        }
                    }
                }
            }
        }
        "text" => {
            let exts: Vec<&str> = if spec.extensions.is_empty() { vec![".txt"] } else { spec.extensions.iter().map(|s| s.as_str()).collect() };
            for f in files(&exts)? {
                let bytes = std::fs::read(&f).map_err(|e| Error::io(&f, e))?;
                let text = String::from_utf8(bytes).map_err(|e| Error::task(&f, 0, format!("not UTF-8: {e}")))?;
                let name = f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                docs.push(Doc { fields: serde_json::json!({"text": text, "file": name}), source: f.clone(), line: 0 });
            }
        }
        other => return Err(Error::task(task_file, 0, format!("dataset.format `{other}` (jsonl, json or text)"))),
    }
    Ok(docs)
}

/// Find a task by name (`zno_uk` -> `DIR/zno_uk.yaml` in the task directories) or path.
pub fn find(name: &str, dirs: &[PathBuf]) -> Result<PathBuf> {
    let p = PathBuf::from(name);
    if p.is_file() {
        return Ok(p);
    }
    for d in dirs {
        for ext in ["yaml", "yml"] {
            let c = d.join(format!("{name}.{ext}"));
            if c.is_file() {
                return Ok(c);
            }
        }
    }
    Err(Error::Other(format!("task `{name}` not found (looked in {})", dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "))))
}
