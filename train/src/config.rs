//! The training config: one TOML file, every key defaulted, every key overridable from
//! the command line (`--set optim.lr=1e-4`), unknown keys rejected naming the file.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Chat SFT from JSONL (`messages` or `prompt`/`completion`).
    Sft,
    /// Continued pretraining from token shards.
    Pretrain,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub method: MethodSection,
    pub lora: LoraSection,
    pub optim: OptimSection,
    pub run: RunSection,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            data: DataSection::default(),
            method: MethodSection::default(),
            lora: LoraSection::default(),
            optim: OptimSection::default(),
            run: RunSection::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A model directory, a GGUF file, a short name or a cached Hub repo id.
    pub path: String,
    /// Base weights: `f32` (dequantized if GGUF), or `quantized` (GGUF only, LoRA only:
    /// the frozen base stays quantized, QLoRA-style).
    pub dtype: String,
    /// Where to train: `cpu`, `cuda`, `cuda:N` or `auto` (the GPU when the binary has
    /// CUDA and one answers).
    pub device: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { path: "smollm2-135m".into(), dtype: "f32".into(), device: "auto".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// SFT: a JSONL file; pretrain: a token-shard file or directory.
    pub train: String,
    /// A separate validation file (same format); empty: split `val_fraction` off `train`.
    pub validation: String,
    pub val_fraction: f64,
    /// Tokens per packed row.
    pub seq_len: usize,
    /// Pack several samples into one row (each attends only to itself).
    pub packing: bool,
    /// SFT: train on assistant tokens only (false: on every token).
    pub assistant_only_loss: bool,
    /// Use at most this many samples (0: all).
    pub max_samples: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: String::new(),
            validation: String::new(),
            val_fraction: 0.1,
            seq_len: 512,
            packing: true,
            assistant_only_loss: true,
            max_samples: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MethodSection {
    /// `lora` or `full`.
    pub kind: String,
}

impl Default for MethodSection {
    fn default() -> Self {
        Self { kind: "lora".into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f32,
    /// Module names as PEFT matches them (`q_proj` matches `model.layers.3.self_attn.q_proj`);
    /// `all-linear` targets every linear layer but the output head.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "k_proj".into(), "v_proj".into(), "o_proj".into()],
            use_rslora: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    /// Decoupled (AdamW); never applied to norms and biases.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this (0: off).
    pub grad_clip: f64,
    /// `cosine`, `linear` or `constant`, after `warmup_steps` of linear warm-up.
    pub schedule: String,
    pub warmup_steps: usize,
    /// The cosine/linear schedule ends at `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            lr: 2e-4,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            schedule: "cosine".into(),
            warmup_steps: 10,
            min_lr_ratio: 0.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSection {
    pub output: String,
    /// Optimizer steps (0: `epochs` passes over the training rows).
    pub max_steps: usize,
    pub epochs: usize,
    /// Packed rows per forward pass.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    pub seed: u64,
    pub log_every: usize,
    /// Validation loss every N steps (0: only at the end).
    pub eval_every: usize,
    /// Checkpoint every N steps (0: only at the end and on SIGTERM/SIGINT).
    pub save_every: usize,
    /// Checkpoints kept (older ones are deleted).
    pub keep_checkpoints: usize,
    /// Write a merged Hugging Face model directory next to the adapter.
    pub export_merged: bool,
    /// Stop after this many steps as if interrupted (testing the resume path).
    pub stop_after: usize,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (less memory, about one more forward pass of compute).
    pub activation_checkpointing: bool,
    /// `no`, `bf16` or `fp16` (accelerate's names): the forward and backward passes
    /// compute in that dtype while the trainable weights, their gradients and the AdamW
    /// moments stay f32 (master weights); the loss is taken in f32. Meant for GPUs with
    /// bf16 tensor cores; it runs on the CPU too (slower there than f32).
    pub mixed_precision: String,
}

impl Default for RunSection {
    fn default() -> Self {
        Self {
            output: "runs/train".into(),
            max_steps: 0,
            epochs: 1,
            micro_batch_size: 1,
            grad_accum: 1,
            seed: 42,
            log_every: 1,
            eval_every: 0,
            save_every: 0,
            keep_checkpoints: 2,
            export_merged: true,
            stop_after: 0,
            mixed_precision: "no".into(),
            activation_checkpointing: false,
        }
    }
}

/// Parse `value` as TOML (a number, bool, array...), else take it as a string.
fn parse_value(value: &str) -> toml::Value {
    let doc = format!("v = {value}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(value.to_string())),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

impl TrainConfig {
    /// Read `path` (TOML), apply `overrides` (`a.b=v`), validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::config(path, e.to_string()))?;
        for o in overrides {
            let (key, value) = o.split_once('=').ok_or_else(|| Error::config(path, format!("override `{o}` is not KEY=VALUE")))?;
            let parts: Vec<&str> = key.trim().split('.').collect();
            let mut t = &mut table;
            for p in &parts[..parts.len() - 1] {
                let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
                t = entry.as_table_mut().ok_or_else(|| Error::config(path, format!("override `{o}`: `{p}` is not a section")))?;
            }
            let last = parts[parts.len() - 1].to_string();
            t.insert(last, parse_value(value.trim()));
        }
        let cfg: TrainConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(path, e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |m: String| Err(Error::config(path, m));
        if self.data.train.is_empty() {
            return bad("data.train is empty: name the training data".into());
        }
        if self.data.seq_len < 2 {
            return bad(format!("data.seq_len = {} (needs at least 2)", self.data.seq_len));
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad(format!("data.val_fraction = {} (0 <= f < 1)", self.data.val_fraction));
        }
        match self.method.kind.as_str() {
            "lora" | "full" => {}
            k => return bad(format!("method.kind = `{k}` (lora or full)")),
        }
        match self.model.dtype.as_str() {
            "f32" => {}
            "quantized" if self.method.kind == "lora" => {}
            "quantized" => return bad("model.dtype = quantized needs method.kind = lora (a quantized base stays frozen)".into()),
            d => return bad(format!("model.dtype = `{d}` (f32 or quantized; for bf16 compute set run.mixed_precision = \"bf16\")")),
        }
        if !matches!(self.run.mixed_precision.as_str(), "no" | "bf16" | "fp16") {
            return bad(format!("run.mixed_precision = `{}` (no, bf16 or fp16)", self.run.mixed_precision));
        }
        if self.method.kind == "lora" && (self.lora.rank == 0 || self.lora.target_modules.is_empty()) {
            return bad("lora.rank must be > 0 and lora.target_modules non-empty".into());
        }
        match self.optim.schedule.as_str() {
            "cosine" | "linear" | "constant" => {}
            s => return bad(format!("optim.schedule = `{s}` (cosine, linear or constant)")),
        }
        if self.optim.lr <= 0.0 || !self.optim.lr.is_finite() {
            return bad(format!("optim.lr = {} (must be positive)", self.optim.lr));
        }
        if self.run.micro_batch_size == 0 || self.run.grad_accum == 0 {
            return bad("run.micro_batch_size and run.grad_accum must be >= 1".into());
        }
        if self.run.max_steps == 0 && self.run.epochs == 0 {
            return bad("set run.max_steps or run.epochs".into());
        }
        Ok(())
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.run.output)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}
