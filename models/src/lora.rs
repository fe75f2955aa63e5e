//! LoRA adapters in PEFT's on-disk format, so an adapter trained here loads in PEFT and
//! one trained with PEFT loads here.
//!
//! A PEFT LoRA directory holds `adapter_config.json` (`peft_type: "LORA"`, `r`,
//! `lora_alpha`, `target_modules`, `use_rslora`, optional `rank_pattern` /
//! `alpha_pattern`...) and `adapter_model.safetensors` with, for every adapted module
//! `M` (its Hugging Face name, e.g. `model.layers.0.self_attn.q_proj`), the tensors
//! `base_model.model.M.lora_A.weight` (`[r, in]`) and `base_model.model.M.lora_B.weight`
//! (`[out, r]`). The adapted layer computes `W x + (alpha / r) B A x` (`alpha / sqrt(r)`
//! with rsLoRA).
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::linear::{Linear, LoraAdapter};
use crate::model::Model;

/// PEFT's tensor-name prefix for a causal LM.
pub const PEFT_PREFIX: &str = "base_model.model.";

pub fn peft_a_name(module: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_A.weight")
}
pub fn peft_b_name(module: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_B.weight")
}

/// PEFT's module matching: a list entry matches a module whose name equals it or ends
/// with `.entry`; a single string is a regular expression matched against the full name.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    List(Vec<String>),
    Regex(String),
}

impl TargetModules {
    pub fn matches(&self, module: &str) -> bool {
        match self {
            TargetModules::List(l) => l.iter().any(|t| module == t || module.ends_with(&format!(".{t}"))),
            TargetModules::Regex(r) => regex::Regex::new(&format!("^(?:{r})$")).map(|re| re.is_match(module)).unwrap_or(false),
        }
    }
    pub fn to_json(&self) -> Value {
        match self {
            TargetModules::List(l) => json!(l),
            TargetModules::Regex(r) => json!(r),
        }
    }
}

/// The fields of `adapter_config.json` that define the computation.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f32,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
    /// Per-module overrides (PEFT's `rank_pattern`, `alpha_pattern`): key is a suffix of
    /// the module name.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
}

impl LoraConfig {
    fn pattern<T: Copy>(p: &[(String, T)], module: &str) -> Option<T> {
        p.iter().find(|(k, _)| module == k || module.ends_with(&format!(".{k}"))).map(|(_, v)| *v)
    }
    pub fn rank_for(&self, module: &str) -> usize {
        Self::pattern(&self.rank_pattern, module).unwrap_or(self.r)
    }
    pub fn scale_for(&self, module: &str) -> f64 {
        let r = self.rank_for(module) as f64;
        let alpha = Self::pattern(&self.alpha_pattern, module).unwrap_or(self.alpha);
        if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        }
    }

    /// `adapter_config.json` as PEFT writes it.
    pub fn to_peft_json(&self, base_model: &str) -> Value {
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": self.target_modules.to_json(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": self.use_rslora,
            "use_dora": false,
            "modules_to_save": null,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": self.rank_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "alpha_pattern": self.alpha_pattern.iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
            "revision": null,
        })
    }

    pub fn from_peft_json(v: &Value, path: &Path) -> Result<Self> {
        let bad = |m: String| Error::config(path, m);
        match v.get("peft_type").and_then(|x| x.as_str()) {
            Some("LORA") => {}
            other => return Err(bad(format!("peft_type {other:?} is not supported (LORA)"))),
        }
        if v.get("use_dora").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("use_dora: true (DoRA) is not supported".into()));
        }
        if v.get("fan_in_fan_out").and_then(|x| x.as_bool()) == Some(true) {
            return Err(bad("fan_in_fan_out: true (Conv1D layers) is not supported".into()));
        }
        let r = v.get("r").and_then(|x| x.as_u64()).filter(|&r| r > 0).ok_or_else(|| bad("`r` is missing or not a positive integer".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(|x| x.as_f64()).unwrap_or(8.0);
        let target_modules = match v.get("target_modules") {
            Some(Value::Array(a)) => TargetModules::List(a.iter().filter_map(|x| x.as_str().map(String::from)).collect()),
            Some(Value::String(s)) => TargetModules::Regex(s.clone()),
            _ => return Err(bad("`target_modules` is missing".into())),
        };
        let map_pat = |k: &str| -> Vec<(String, Value)> {
            v.get(k).and_then(|x| x.as_object()).map(|o| o.iter().map(|(a, b)| (a.clone(), b.clone())).collect()).unwrap_or_default()
        };
        Ok(Self {
            r,
            alpha,
            dropout: v.get("lora_dropout").and_then(|x| x.as_f64()).unwrap_or(0.0) as f32,
            target_modules,
            use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()).unwrap_or(false),
            rank_pattern: map_pat("rank_pattern").into_iter().filter_map(|(k, x)| x.as_u64().map(|n| (k, n as usize))).collect(),
            alpha_pattern: map_pat("alpha_pattern").into_iter().filter_map(|(k, x)| x.as_f64().map(|n| (k, n))).collect(),
        })
    }
}

impl Model {
    /// Every linear layer by its Hugging Face module name.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        match self {
            Model::Llama(m) => m.linears_mut(),
            Model::Gemma3(m) => m.linears_mut(),
        }
    }
}

/// Load a PEFT LoRA directory onto `model` (in inference mode). Returns the config and
/// the number of adapted modules. Every tensor in the file must belong to a module of
/// the model with the right shape; a module the config targets but the file lacks, or
/// a tensor for no module, is an error naming it.
pub fn load_peft_adapter(model: &mut Model, dir: &Path) -> Result<(LoraConfig, usize)> {
    let cfg_path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::config(&cfg_path, format!("invalid JSON: {e}")))?;
    let cfg = LoraConfig::from_peft_json(&v, &cfg_path)?;
    let st_path = dir.join("adapter_model.safetensors");
    if !st_path.exists() {
        return Err(Error::MissingFile { path: st_path, what: "a PEFT adapter needs adapter_model.safetensors".into() });
    }
    let device = model.device().clone();
    let dtype = match model.dtype() {
        DType::F64 => DType::F64,
        DType::BF16 => DType::BF16,
        DType::F16 => DType::F16,
        _ => DType::F32,
    };
    let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&st_path, &Device::Cpu)
        .map_err(|e| Error::Safetensors { path: st_path.clone(), msg: e.to_string() })?
        .into_iter()
        // PEFT keeps the adapter name in memory (`lora_A.default.weight`); accept both.
        .map(|(k, t)| (k.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight"), t))
        .collect();
    let mut n = 0;
    for (name, lin) in model.linears_mut() {
        let (an, bn) = (peft_a_name(&name), peft_b_name(&name));
        let (a, b) = match (tensors.remove(&an), tensors.remove(&bn)) {
            (Some(a), Some(b)) => (a, b),
            (None, None) => {
                if cfg.target_modules.matches(&name) {
                    return Err(Error::MissingTensor { path: st_path.clone(), name: an });
                }
                continue;
            }
            (Some(_), None) => return Err(Error::MissingTensor { path: st_path.clone(), name: bn }),
            (None, Some(_)) => return Err(Error::MissingTensor { path: st_path.clone(), name: an }),
        };
        let r = cfg.rank_for(&name);
        let bad = |n: &str, t: &Tensor, want: (usize, usize)| Error::BadTensor {
            path: st_path.clone(),
            name: n.to_string(),
            msg: format!("shape {:?}, the model's {name} needs {want:?}", t.dims()),
        };
        if a.dims() != [r, lin.in_dim()] {
            return Err(bad(&an, &a, (r, lin.in_dim())));
        }
        if b.dims() != [lin.out_dim(), r] {
            return Err(bad(&bn, &b, (lin.out_dim(), r)));
        }
        lin.set_lora(Some(LoraAdapter {
            a: a.to_dtype(dtype)?.to_device(&device)?,
            b: b.to_dtype(dtype)?.to_device(&device)?,
            scale: cfg.scale_for(&name),
            dropout: 0.0,
            training: false,
            dropout_seed: 0,
        }));
        n += 1;
    }
    if let Some(extra) = tensors.keys().min() {
        return Err(Error::BadTensor {
            path: st_path,
            name: extra.clone(),
            msg: "belongs to no linear layer of this model (is the adapter for another base model?)".into(),
        });
    }
    Ok((cfg, n))
}

/// Write the adapters attached to `model` as a PEFT directory (atomically: a temporary
/// directory renamed into place).
pub fn save_peft_adapter(model: &mut Model, cfg: &LoraConfig, base_model: &str, out: &Path) -> Result<usize> {
    let tmp = out.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, lin) in model.linears_mut() {
        if let Some(l) = lin.lora() {
            named.push((peft_a_name(&name), l.a.to_dtype(DType::F32)?.contiguous()?));
            named.push((peft_b_name(&name), l.b.to_dtype(DType::F32)?.contiguous()?));
        }
    }
    let n = named.len() / 2;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let st = tmp.join("adapter_model.safetensors");
    safetensors::serialize_to_file(named.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &st)
        .map_err(|e| Error::Safetensors { path: st.clone(), msg: e.to_string() })?;
    let c = tmp.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&cfg.to_peft_json(base_model)).map_err(|e| Error::config(&c, e.to_string()))?;
    std::fs::write(&c, text).map_err(|e| Error::io(&c, e))?;
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(n)
}
