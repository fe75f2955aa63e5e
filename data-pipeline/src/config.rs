//! The pipeline file (YAML):
//!
//! ```yaml
//! input:
//!   path: ../shared/data/uk/laws/seed   # a file, a directory or a glob (`dir/*.jsonl.gz`)
//!   format: json                        # auto (by extension), jsonl, text, parquet, json
//!   json_path: provisions[*].content    # json: which values are documents
//! output:
//!   path: out/laws
//!   format: jsonl.zst                   # jsonl, jsonl.gz, jsonl.zst, parquet
//!   rejected: true                      # also write dropped documents with their reason
//! tasks: 8                              # input files are split into this many slices
//! steps:
//!   - normalise: {}
//!   - langid: {threshold: 0.9}
//!   - quality: {}
//!   - pii: {}
//!   - dedup: {bands: 14, rows: 8}
//!   - tokenize: {tokenizer: smollm2-135m}
//! ```
//! Every key has a default; `--set key.path=value` on the command line overrides any of
//! them (the value is parsed as YAML), and `hromada data run` prints the effective config.

use crate::dedup::DedupConfig;
use crate::error::{Error, Result};
use crate::shards::TokenizeConfig;
use crate::steps::{langid::LangidConfig, normalise::NormaliseConfig, pii::PiiConfig, quality::QualityConfig};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub input: InputConfig,
    pub output: OutputConfig,
    /// Number of slices the input files are split into (files go round robin). The
    /// output has one file per slice, so this and not the core count fixes the output.
    #[serde(default)]
    pub tasks: Option<usize>,
    #[serde(default)]
    pub steps: Vec<StepConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InputFormat {
    #[default]
    Auto,
    Jsonl,
    Text,
    Parquet,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// A file, a directory (walked recursively, sorted) or a glob with `*` in the file name.
    pub path: PathBuf,
    #[serde(default)]
    pub format: InputFormat,
    /// JSONL/Parquet: the field holding the text.
    #[serde(default = "default_text_key")]
    pub text_key: String,
    /// JSONL/Parquet: the field holding the id (else `file/line`).
    #[serde(default = "default_id_key")]
    pub id_key: String,
    /// Text files: one document per file (default) or per non-empty line.
    #[serde(default)]
    pub per_line: bool,
    /// JSON files: the path of the documents, e.g. `provisions[*].content`.
    #[serde(default)]
    pub json_path: Option<String>,
    /// JSON files: fields of the top-level object copied into every document's metadata.
    #[serde(default)]
    pub json_metadata: Vec<String>,
    /// Only files whose name ends with one of these (directories), e.g. [".txt"].
    #[serde(default)]
    pub extensions: Vec<String>,
    /// Stop after this many documents per task (for trials).
    #[serde(default)]
    pub limit: Option<u64>,
}

impl InputConfig {
    /// `path` in `format`, every other key at its default.
    pub fn new(path: impl Into<PathBuf>, format: InputFormat) -> Self {
        Self {
            path: path.into(),
            format,
            text_key: default_text_key(),
            id_key: default_id_key(),
            per_line: false,
            json_path: None,
            json_metadata: Vec::new(),
            extensions: Vec::new(),
            limit: None,
        }
    }
}

fn default_text_key() -> String {
    "text".into()
}
fn default_id_key() -> String {
    "id".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OutputFormat {
    #[serde(rename = "jsonl")]
    Jsonl,
    #[serde(rename = "jsonl.gz")]
    JsonlGz,
    #[default]
    #[serde(rename = "jsonl.zst")]
    JsonlZst,
    #[serde(rename = "parquet")]
    Parquet,
    /// Token shards only (needs a `tokenize` step).
    #[serde(rename = "none")]
    None,
}

impl OutputFormat {
    pub fn extension(self) -> &'static str {
        match self {
            OutputFormat::Jsonl => "jsonl",
            OutputFormat::JsonlGz => "jsonl.gz",
            OutputFormat::JsonlZst => "jsonl.zst",
            OutputFormat::Parquet => "parquet",
            OutputFormat::None => "none",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: OutputFormat,
    /// Write dropped documents, each with `metadata.drop = {step, reason}`, under `rejected/`.
    #[serde(default)]
    pub rejected: bool,
    /// Write `report.html` beside `stats.json`.
    #[serde(default = "yes")]
    pub report: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StepConfig {
    Normalise(#[serde(default)] NormaliseConfig),
    Langid(#[serde(default)] LangidConfig),
    Quality(#[serde(default)] QualityConfig),
    Pii(#[serde(default)] PiiConfig),
    Dedup(#[serde(default)] DedupConfig),
    Tokenize(TokenizeConfig),
}

impl StepConfig {
    pub fn name(&self) -> &'static str {
        match self {
            StepConfig::Normalise(_) => "normalise",
            StepConfig::Langid(_) => "langid",
            StepConfig::Quality(_) => "quality",
            StepConfig::Pii(_) => "pii",
            StepConfig::Dedup(_) => "dedup",
            StepConfig::Tokenize(_) => "tokenize",
        }
    }
}

impl PipelineConfig {
    /// Read a pipeline file, apply `key.path=value` overrides, and check it.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, path, overrides)
    }

    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        let cerr = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let mut doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(text).map_err(|e| cerr(e.to_string()))?;
        for o in overrides {
            apply_override(&mut doc, o).map_err(cerr)?;
        }
        // Through JSON: serde_yaml_ng's Value only maps enums from YAML tags, and step
        // lists are written as `- normalise: {}`.
        let json = serde_json::to_value(&doc).map_err(|e| cerr(e.to_string()))?;
        let mut cfg: PipelineConfig = serde_json::from_value(json).map_err(|e| cerr(e.to_string()))?;
        // Relative paths are relative to the pipeline file's directory.
        let base = path.parent().unwrap_or(Path::new("."));
        if cfg.input.path.is_relative() {
            cfg.input.path = base.join(&cfg.input.path);
        }
        if cfg.output.path.is_relative() {
            cfg.output.path = base.join(&cfg.output.path);
        }
        cfg.check().map_err(cerr)?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let names: Vec<&str> = self.steps.iter().map(|s| s.name()).collect();
        for (i, n) in names.iter().enumerate() {
            if *n == "tokenize" && i + 1 != names.len() {
                return Err("`tokenize` must be the last step".into());
            }
            if *n == "dedup" && names[..i].contains(&"dedup") {
                return Err("only one `dedup` step is allowed".into());
            }
        }
        if self.output.format == OutputFormat::None && !names.contains(&"tokenize") {
            return Err("output.format `none` needs a `tokenize` step".into());
        }
        if self.tasks == Some(0) {
            return Err("tasks must be at least 1".into());
        }
        Ok(())
    }

    pub fn to_yaml(&self) -> String {
        // Through JSON so steps print as `- normalise: {...}`, the form the file uses.
        serde_json::to_value(self)
            .map_err(|e| e.to_string())
            .and_then(|v| serde_yaml_ng::to_string(&v).map_err(|e| e.to_string()))
            .unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }

    pub fn has_dedup(&self) -> bool {
        self.steps.iter().any(|s| matches!(s, StepConfig::Dedup(_)))
    }
}

/// `a.b.c=value`: set a nested key (steps are addressed by index: `steps.2.langid.threshold`).
fn apply_override(doc: &mut serde_yaml_ng::Value, o: &str) -> std::result::Result<(), String> {
    use serde_yaml_ng::Value;
    let (key, val) = o
        .split_once('=')
        .ok_or_else(|| format!("override `{o}` is not key=value"))?;
    let val: Value = serde_yaml_ng::from_str(val).map_err(|e| format!("override `{o}`: {e}"))?;
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = doc;
    for (i, p) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let next = match cur {
            Value::Sequence(seq) => {
                let idx: usize = p
                    .parse()
                    .map_err(|_| format!("override `{o}`: `{p}` is not a list index"))?;
                seq.get_mut(idx)
                    .ok_or_else(|| format!("override `{o}`: no list item {idx}"))?
            }
            Value::Mapping(map) => {
                let k = Value::String(p.to_string());
                if !map.contains_key(&k) {
                    map.insert(k.clone(), if last { Value::Null } else { Value::Mapping(Default::default()) });
                }
                map.get_mut(&k)
                    .ok_or_else(|| format!("override `{o}`: cannot set `{p}`"))?
            }
            Value::Null => {
                *cur = Value::Mapping(Default::default());
                if let Value::Mapping(map) = cur {
                    let k = Value::String(p.to_string());
                    map.insert(k.clone(), if last { Value::Null } else { Value::Mapping(Default::default()) });
                    map.get_mut(&k)
                        .ok_or_else(|| format!("override `{o}`: cannot set `{p}`"))?
                } else {
                    return Err(format!("override `{o}`: cannot set `{p}`"));
                }
            }
            _ => return Err(format!("override `{o}`: `{p}` is inside a scalar")),
        };
        cur = next;
    }
    *cur = val;
    Ok(())
}
