//! Loading a model: resolve a name or path, read config, weights, tokenizer, chat
//! template and generation config, and build the architecture.
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::cache::KvCache;
use crate::chat::{ChatTemplate, CHATML_TEMPLATE};
use crate::config::{Arch, GenerationConfig, LlamaConfig};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::gemma3::{Gemma3, Gemma3Config};
use crate::llama::Llama;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightSource;

/// The weight precision asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeChoice {
    /// GGUF: keep quantized; HF directory: the checkpoint's dtype (f32 for f32, else bf16).
    #[default]
    Auto,
    F32,
    BF16,
    F16,
    /// GGUF weights kept quantized (an error for a HF directory).
    Quantized,
}

impl std::str::FromStr for DTypeChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "quantized" | "q" | "gguf" => Ok(Self::Quantized),
            other => Err(Error::InvalidArgument(format!(
                "unknown dtype `{other}` (expected auto, f32, bf16, f16 or quantized)"
            ))),
        }
    }
}

/// Short names of the models the setup script fetches.
pub const SHORT_NAMES: &[(&str, &str, &str)] = &[
    ("smollm2-135m", "smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3-270m", "gemma3-270m", "gemma-3-270m-q4_k_m.gguf"),
];

/// The default model of every command.
pub const DEFAULT_MODEL: &str = "smollm2-135m";

/// Where the setup script puts models: `$HROMADA_CACHE`, else `$XDG_CACHE_HOME/hromada`,
/// else `~/.cache/hromada`.
pub fn cache_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HROMADA_CACHE") {
        return PathBuf::from(d);
    }
    if let Ok(d) = std::env::var("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("hromada");
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".cache").join("hromada")
}

/// Resolve a path, a short name, or a Hub repo id present in the hub cache.
pub fn resolve(name_or_path: &str) -> Result<PathBuf> {
    let p = PathBuf::from(name_or_path);
    if p.exists() {
        return Ok(p);
    }
    for (short, dir, file) in SHORT_NAMES {
        if name_or_path == *short {
            let f = cache_dir().join("models").join(dir).join(file);
            if f.exists() {
                return Ok(f);
            }
            return Err(Error::ModelNotFound(format!(
                "{name_or_path} (expected {}; run scripts/setup.sh)",
                f.display()
            )));
        }
    }
    if name_or_path.contains('/') {
        if let Some(d) = crate::hub::cached_snapshot(name_or_path, None) {
            return Ok(d);
        }
    }
    Err(Error::ModelNotFound(name_or_path.to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    HfDir,
    Gguf,
}

/// RoPE cos/sin gathered once per forward pass for its positions (`local`: Gemma's
/// sliding-window layers' own base), and whether the pass must be differentiable.
#[derive(Debug, Clone)]
pub struct RopeCtx {
    pub global: (Tensor, Tensor),
    pub local: Option<(Tensor, Tensor)>,
    pub differentiable: bool,
    /// Per row: a prompt token's (`KvCache::prompt_rows`; empty: none).
    pub prompt_rows: Vec<bool>,
}

/// An architecture instance. Every architecture has the same packed forward.
#[derive(Debug, Clone)]
pub enum Model {
    Llama(Box<Llama>),
    Gemma3(Box<Gemma3>),
}

impl Model {
    pub fn forward(&self, ids: &Tensor, cache: &mut dyn KvCache) -> candle_core::Result<Tensor> {
        // Every architecture: embeddings, its blocks, the final norm.
        crate::kernels::pool().install(|| {
            let ctx = self.rope_ctx(ids.dim(0)?, cache)?;
            // Quantized inference runs on this pool's kernels alone; keep its workers
            // awake between them (not for dense weights, whose matmuls candle runs on
            // another pool, nor for training).
            let warm = (self.weights_quantized() && !ctx.differentiable).then(crate::kernels::KeepWarm::start);
            let mut x = self.embed(ids)?;
            for i in 0..self.num_layers() {
                if let Some(w) = &warm {
                    w.ensure();
                }
                x = self.block(i, &x, &ctx, cache)?;
            }
            self.final_norm(&x, ctx.differentiable)
        })
    }
    pub fn logits(&self, hidden: &Tensor) -> candle_core::Result<Tensor> {
        crate::kernels::pool().install(|| match self {
            Model::Llama(m) => m.logits(hidden),
            Model::Gemma3(m) => m.logits(hidden),
        })
    }
    /// The forward pass in pieces (`embed`, `rope_ctx`, `block` per layer, `final_norm`),
    /// for activation checkpointing: `forward` is exactly their composition.
    pub fn embed(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Model::Llama(m) => m.embed(ids),
            Model::Gemma3(m) => m.embed(ids),
        }
    }
    pub fn rope_ctx(&self, n: usize, cache: &mut dyn KvCache) -> candle_core::Result<RopeCtx> {
        match self {
            Model::Llama(m) => m.rope_ctx(n, cache),
            Model::Gemma3(m) => m.rope_ctx(n, cache),
        }
    }
    pub fn block(&self, i: usize, x: &Tensor, ctx: &RopeCtx, cache: &mut dyn KvCache) -> candle_core::Result<Tensor> {
        crate::kernels::pool().install(|| match self {
            Model::Llama(m) => m.block(i, x, ctx, cache),
            Model::Gemma3(m) => m.block(i, x, ctx, cache),
        })
    }
    pub fn final_norm(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        match self {
            Model::Llama(m) => m.norm.forward(x, differentiable),
            Model::Gemma3(m) => m.norm.forward(x, differentiable),
        }
    }
    pub fn num_layers(&self) -> usize {
        match self {
            Model::Llama(m) => m.cfg.num_hidden_layers,
            Model::Gemma3(m) => m.cfg.num_hidden_layers,
        }
    }
    pub fn device(&self) -> &Device {
        match self {
            Model::Llama(m) => &m.device,
            Model::Gemma3(m) => &m.device,
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            Model::Llama(m) => m.dtype,
            Model::Gemma3(m) => m.dtype,
        }
    }
    /// Compute in `dtype` whatever the weights are stored in (mixed precision: f32 master
    /// weights, bf16 activations). Embeddings, RoPE tables and every linear layer cast to
    /// it; norms compute in f32 internally; the logits come out in f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        match self {
            Model::Llama(m) => m.dtype = dtype,
            Model::Gemma3(m) => m.dtype = dtype,
        }
    }
    pub fn vocab_size(&self) -> usize {
        match self {
            Model::Llama(m) => m.cfg.vocab_size,
            Model::Gemma3(m) => m.cfg.vocab_size,
        }
    }
    /// Whether the linear layers hold quantized weights (a GGUF kept quantized).
    pub fn weights_quantized(&self) -> bool {
        match self {
            Model::Llama(m) => m.layers.first().is_some_and(|l| l.self_attn.q_proj.is_quantized()),
            Model::Gemma3(m) => m.layers.first().is_some_and(|l| l.q_proj.is_quantized()),
        }
    }
    /// (n_kv_heads, head_dim) per layer, for sizing caches.
    pub fn kv_shape(&self) -> (usize, usize) {
        match self {
            Model::Llama(m) => (m.cfg.num_key_value_heads, m.cfg.head_dim),
            Model::Gemma3(m) => (m.cfg.num_key_value_heads, m.cfg.head_dim),
        }
    }
}

/// Everything a stage needs to run a model.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub chat_template: Option<ChatTemplate>,
    pub generation_config: GenerationConfig,
    /// The HF `config.json` equivalent.
    pub hf_config: serde_json::Value,
    pub path: PathBuf,
    pub format: Format,
    pub context_length: usize,
    /// A short id for APIs (`smollm2-135m`, the directory or file stem).
    pub id: String,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub dtype: DTypeChoice,
    pub device: Device,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DTypeChoice::Auto,
            device: Device::Cpu,
        }
    }
}

/// The compute dtype for a HF directory: as asked, or the checkpoint's.
fn hf_dtype(hf_config: &serde_json::Value, opts: &LoadOptions, dir: &Path) -> Result<DType> {
    Ok(match opts.dtype {
        DTypeChoice::F32 => DType::F32,
        DTypeChoice::BF16 => DType::BF16,
        DTypeChoice::F16 => DType::F16,
        DTypeChoice::Quantized => {
            return Err(Error::InvalidArgument(format!(
                "{}: `--dtype quantized` needs a GGUF file; this is a safetensors directory",
                dir.display()
            )))
        }
        DTypeChoice::Auto => match hf_config
            .get("torch_dtype")
            .or_else(|| hf_config.get("dtype"))
            .or_else(|| hf_config.get("text_config").and_then(|t| t.get("torch_dtype").or_else(|| t.get("dtype"))))
            .and_then(|v| v.as_str())
        {
            Some("float32") | None => DType::F32,
            Some("float16") => DType::F16,
            _ => DType::BF16,
        },
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let t = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&t).map_err(|e| Error::config(path, format!("invalid JSON: {e}")))
}

fn model_id(name: &str, path: &Path) -> String {
    if SHORT_NAMES.iter().any(|(s, _, _)| *s == name) {
        return name.to_string();
    }
    path.file_stem()
        .or_else(|| path.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| name.to_string())
}

impl LoadedModel {
    /// Load by path, short name or cached Hub repo id.
    pub fn load(name_or_path: &str, opts: &LoadOptions) -> Result<Self> {
        let path = resolve(name_or_path)?;
        let mut m = if path.is_dir() {
            Self::load_hf_dir(&path, opts)?
        } else {
            Self::load_gguf(&path, opts)?
        };
        m.id = model_id(name_or_path, &path);
        Ok(m)
    }

    pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let arch = g.str("general.architecture")?;
        let dtype = match opts.dtype {
            DTypeChoice::Auto | DTypeChoice::Quantized => None,
            DTypeChoice::F32 => Some(DType::F32),
            DTypeChoice::BF16 => Some(DType::BF16),
            DTypeChoice::F16 => Some(DType::F16),
        };
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let chat_template = match g.opt_str("tokenizer.chat_template") {
            Some(src) => Some(template(&src, &tokenizer)?),
            // Gemma GGUFs often carry no template: use Gemma's turn format.
            None if arch == "gemma3" => Some(template(crate::chat::GEMMA_TEMPLATE, &tokenizer)?),
            None => None,
        };
        let (quantized, dtype, device) = (dtype.is_none(), dtype.unwrap_or(DType::F32), opts.device.clone());
        // Per architecture: (model, BOS id, context length, HF config.json).
        let (model, bos_token_id, context_length, hf_config) = if arch == "gemma3" {
            let cfg = Gemma3Config::from_gguf(&g)?;
            let ws = WeightSource::Gguf { file: g, quantized, gemma: true, rope_permuted: false, dtype, device };
            let meta = (cfg.bos_token_id, cfg.max_position_embeddings, cfg.to_hf_json("float32"));
            (Model::Gemma3(Box::new(Gemma3::load(cfg, &ws, true)?)), meta.0, meta.1, meta.2)
        } else {
            let (cfg, rope_permuted) = match arch.as_str() {
                "llama" | "mistral" => (LlamaConfig::from_gguf(&g, &arch)?, true),
                "qwen2" => (LlamaConfig::from_gguf(&g, &arch)?, false),
                other => {
                    return Err(Error::UnknownArchitecture {
                        path: path.to_path_buf(),
                        arch: other.to_string(),
                        supported: "llama, mistral, qwen2, gemma3".into(),
                    })
                }
            };
            let ws = WeightSource::Gguf { file: g, quantized, gemma: false, rope_permuted, dtype, device };
            let meta = (cfg.bos_token_id, cfg.max_position_embeddings, cfg.to_hf_json("float32"));
            (Model::Llama(Box::new(Llama::load(cfg, &ws)?)), meta.0, meta.1, meta.2)
        };
        let generation_config = GenerationConfig {
            bos_token_id,
            eos_token_id: tokenizer.special.eos_ids(),
            ..Default::default()
        };
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            generation_config,
            hf_config,
            path: path.to_path_buf(),
            format: Format::Gguf,
            context_length,
            id: String::new(),
        })
    }

    pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::MissingFile {
                path: cfg_path,
                what: "a Hugging Face model directory needs config.json".into(),
            });
        }
        let hf_config = read_json(&cfg_path)?;
        let model_type = hf_config
            .get("model_type")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Error::config(&cfg_path, "`model_type` is missing"))?;
        if model_type == "gemma3_text" || model_type == "gemma3" {
            return Self::load_gemma3_dir(dir, &hf_config, &cfg_path, opts);
        }
        let arch = Arch::from_hf_model_type(model_type).ok_or_else(|| Error::UnknownArchitecture {
            path: cfg_path.clone(),
            arch: model_type.to_string(),
            supported: Arch::SUPPORTED_HF.into(),
        })?;
        let cfg = LlamaConfig::from_hf_json(&hf_config, &cfg_path)?;
        let dtype = hf_dtype(&hf_config, opts, dir)?;
        let generation_config = GenerationConfig::from_file(&dir.join("generation_config.json"))?.unwrap_or_default();
        let mut eos = cfg.eos_token_ids.clone();
        for e in &generation_config.eos_token_id {
            if !eos.contains(e) {
                eos.push(*e);
            }
        }
        let tokenizer = Tokenizer::from_dir(dir, &eos, cfg.bos_token_id)?;
        let chat_template = match hf_chat_template(dir)? {
            Some(src) => Some(template(&src, &tokenizer)?),
            None => None,
        };
        let ws = WeightSource::safetensors_dir(dir, dtype, &opts.device)?;
        let context_length = cfg.max_position_embeddings;
        let model = match arch {
            Arch::Llama | Arch::Mistral | Arch::Qwen2 => Model::Llama(Box::new(Llama::load(cfg, &ws)?)),
        };
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            generation_config,
            hf_config,
            path: dir.to_path_buf(),
            format: Format::HfDir,
            context_length,
            id: String::new(),
        })
    }

    fn load_gemma3_dir(dir: &Path, hf_config: &serde_json::Value, cfg_path: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = Gemma3Config::from_hf_json(hf_config, cfg_path)?;
        let dtype = hf_dtype(hf_config, opts, dir)?;
        let generation_config = GenerationConfig::from_file(&dir.join("generation_config.json"))?.unwrap_or_default();
        let mut eos = cfg.eos_token_ids.clone();
        for e in &generation_config.eos_token_id {
            if !eos.contains(e) {
                eos.push(*e);
            }
        }
        let tokenizer = Tokenizer::from_dir(dir, &eos, cfg.bos_token_id)?;
        let chat_template = match hf_chat_template(dir)? {
            Some(src) => Some(template(&src, &tokenizer)?),
            None => Some(template(crate::chat::GEMMA_TEMPLATE, &tokenizer)?),
        };
        let ws = WeightSource::safetensors_dir(dir, dtype, &opts.device)?;
        let context_length = cfg.max_position_embeddings;
        let model = Model::Gemma3(Box::new(Gemma3::load(cfg, &ws, false)?));
        Ok(Self {
            model,
            tokenizer,
            chat_template,
            generation_config,
            hf_config: hf_config.clone(),
            path: dir.to_path_buf(),
            format: Format::HfDir,
            context_length,
            id: String::new(),
        })
    }

    /// Token ids of a chat conversation, rendered by the model's template (ChatML when
    /// it has none) and tokenized without adding special tokens, as transformers does.
    pub fn encode_chat(&self, messages: &[crate::chat::Message], add_generation_prompt: bool) -> Result<Vec<u32>> {
        let text = self.render_chat(messages, add_generation_prompt)?;
        self.tokenizer.encode(&text, false)
    }

    pub fn render_chat(&self, messages: &[crate::chat::Message], add_generation_prompt: bool) -> Result<String> {
        match &self.chat_template {
            Some(t) => t.apply(messages, add_generation_prompt),
            None => template(CHATML_TEMPLATE, &self.tokenizer)?.apply(messages, add_generation_prompt),
        }
    }

    /// Ids that end generation by default.
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut v = self.tokenizer.special.eos_ids();
        for e in &self.generation_config.eos_token_id {
            if !v.contains(e) {
                v.push(*e);
            }
        }
        v
    }
}

fn template(src: &str, tok: &Tokenizer) -> Result<ChatTemplate> {
    let bos = tok.special.bos.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
    let eos = tok.special.eos.as_ref().map(|(_, s)| s.clone()).unwrap_or_default();
    ChatTemplate::new(src, bos, eos)
}

/// The chat template of a HF directory: `chat_template.jinja`, `chat_template.json`, or
/// `tokenizer_config.json`'s `chat_template` (a string or a list of named templates).
fn hf_chat_template(dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja).map(Some).map_err(|e| Error::io(&jinja, e));
    }
    for (file, key) in [("chat_template.json", "chat_template"), ("tokenizer_config.json", "chat_template")] {
        let p = dir.join(file);
        if !p.exists() {
            continue;
        }
        let v = read_json(&p)?;
        match v.get(key) {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .or_else(|| list.first());
                if let Some(s) = pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Load only the tokenizer of a model (a path, short name or cached Hub repo id): from a
/// GGUF file's metadata, or a directory's tokenizer.json with the EOS/BOS ids of its
/// config.json and generation_config.json. No weights are read.
pub fn load_tokenizer(name_or_path: &str) -> Result<Tokenizer> {
    let path = resolve(name_or_path)?;
    if !path.is_dir() {
        let g = GgufFile::open(&path)?;
        return Tokenizer::from_gguf(&g);
    }
    let cfg_path = path.join("config.json");
    let (mut eos, bos) = if cfg_path.exists() {
        let hf = read_json(&cfg_path)?;
        let ids = |v: Option<&serde_json::Value>| -> Vec<u32> {
            match v {
                Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
                _ => Vec::new(),
            }
        };
        (ids(hf.get("eos_token_id")), ids(hf.get("bos_token_id")).first().copied())
    } else {
        (Vec::new(), None)
    };
    if let Some(gc) = GenerationConfig::from_file(&path.join("generation_config.json"))? {
        for e in gc.eos_token_id {
            if !eos.contains(&e) {
                eos.push(e);
            }
        }
    }
    Tokenizer::from_dir(&path, &eos, bos)
}
