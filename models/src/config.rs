//! Model configuration: parsed from a Hugging Face `config.json` or from GGUF metadata,
//! and written back as `config.json` by `convert`.
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// Architectures the model core implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Mistral,
    Qwen2,
}

impl Arch {
    pub const SUPPORTED_HF: &'static str = "llama, mistral, qwen2";

    pub fn from_hf_model_type(t: &str) -> Option<Self> {
        match t {
            "llama" => Some(Arch::Llama),
            "mistral" => Some(Arch::Mistral),
            "qwen2" => Some(Arch::Qwen2),
            _ => None,
        }
    }

    pub fn hf_model_type(&self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
        }
    }

    pub fn hf_architecture(&self) -> &'static str {
        match self {
            Arch::Llama => "LlamaForCausalLM",
            Arch::Mistral => "MistralForCausalLM",
            Arch::Qwen2 => "Qwen2ForCausalLM",
        }
    }
}

/// RoPE scaling (HF `rope_scaling` / `rope_parameters`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    Linear { factor: f64 },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The Llama family's hyper-parameters (Llama 2/3, SmolLM2, Mistral, Qwen2/2.5).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Q/K/V projections carry a bias (Qwen2, Llama with `attention_bias`).
    pub attention_bias: bool,
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn get_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| Error::config(path, format!("`{key}` is missing or not a non-negative integer")))
}

fn opt_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(|x| x.as_u64()).map(|x| x as usize)
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

fn parse_rope_scaling(v: &Value, path: &Path) -> Result<Option<RopeScaling>> {
    let obj = match v {
        Value::Object(o) => o,
        _ => return Ok(None),
    };
    let ty = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let f = |k: &str| obj.get(k).and_then(|x| x.as_f64());
    match ty {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: f("factor").unwrap_or(1.0),
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: f("factor").unwrap_or(8.0),
            low_freq_factor: f("low_freq_factor").unwrap_or(1.0),
            high_freq_factor: f("high_freq_factor").unwrap_or(4.0),
            original_max_position_embeddings: obj
                .get("original_max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(8192) as usize,
        })),
        other => Err(Error::config(
            path,
            format!("rope scaling type `{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

impl LlamaConfig {
    /// Parse a HF `config.json` (already read as JSON) of a Llama-family model.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| Error::config(path, "`model_type` is missing"))?;
        let arch = Arch::from_hf_model_type(model_type).ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            arch: model_type.to_string(),
            supported: Arch::SUPPORTED_HF.to_string(),
        })?;
        let hidden_size = get_usize(v, "hidden_size", path)?;
        let num_attention_heads = get_usize(v, "num_attention_heads", path)?;
        if num_attention_heads == 0 {
            return Err(Error::config(path, "`num_attention_heads` is 0"));
        }
        let num_key_value_heads = opt_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(
                path,
                format!("`num_attention_heads` ({num_attention_heads}) is not a multiple of `num_key_value_heads` ({num_key_value_heads})"),
            ));
        }
        let head_dim = opt_usize(v, "head_dim").unwrap_or(hidden_size / num_attention_heads);
        // transformers 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters");
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(|x| x.as_f64())
            .unwrap_or(10_000.0);
        let rope_scaling = match (v.get("rope_scaling"), rope_params) {
            (Some(s), _) if !s.is_null() => parse_rope_scaling(s, path)?,
            (_, Some(p)) => parse_rope_scaling(p, path)?,
            _ => None,
        };
        let attention_bias = match arch {
            Arch::Qwen2 => true,
            _ => v.get("attention_bias").and_then(|x| x.as_bool()).unwrap_or(false),
        };
        let sliding_window = match arch {
            Arch::Qwen2 if !v.get("use_sliding_window").and_then(|x| x.as_bool()).unwrap_or(false) => None,
            _ => opt_usize(v, "sliding_window"),
        };
        Ok(Self {
            arch,
            vocab_size: get_usize(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size", path)?,
            num_hidden_layers: get_usize(v, "num_hidden_layers", path)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(4096),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(|x| x.as_bool()).unwrap_or(false),
            attention_bias,
            sliding_window,
            bos_token_id: ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: ids(v.get("eos_token_id")),
        })
    }

    /// Read the hyper-parameters of a GGUF with architecture `llama` or `qwen2`.
    pub fn from_gguf(g: &GgufFile, arch_name: &str) -> Result<Self> {
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            "mistral" => Arch::Mistral,
            other => {
                return Err(Error::UnknownArchitecture {
                    path: g.path().to_path_buf(),
                    arch: other.to_string(),
                    supported: "llama, qwen2, mistral".into(),
                })
            }
        };
        let k = |s: &str| format!("{arch_name}.{s}");
        let hidden_size = g.usize(&k("embedding_length"))?;
        let num_attention_heads = g.usize(&k("attention.head_count"))?;
        let num_key_value_heads = g
            .opt_usize(&k("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Gguf {
                path: g.path().to_path_buf(),
                msg: format!("bad head counts: {num_attention_heads} heads, {num_key_value_heads} kv heads"),
            });
        }
        let head_dim = g
            .opt_usize(&k("attention.key_length"))?
            .unwrap_or(hidden_size / num_attention_heads);
        let (emb_dims, _) = g.tensor_info("token_embd.weight")?;
        let vocab_size = *emb_dims.first().unwrap_or(&0);
        let rope_scaling = match g.opt_str(&k("rope.scaling.type")).as_deref() {
            Some("linear") => Some(RopeScaling::Linear {
                factor: g.opt_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0),
            }),
            _ => None,
        };
        let tie = !g.has_tensor("output.weight");
        let eos = g.opt_u64("tokenizer.ggml.eos_token_id")?.map(|x| x as u32);
        Ok(Self {
            arch,
            vocab_size,
            hidden_size,
            intermediate_size: g.usize(&k("feed_forward_length"))?,
            num_hidden_layers: g.usize(&k("block_count"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: g.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
            rope_theta: g.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_scaling,
            max_position_embeddings: g.opt_usize(&k("context_length"))?.unwrap_or(4096),
            tie_word_embeddings: tie,
            attention_bias: g.has_tensor("blk.0.attn_q.bias"),
            sliding_window: None,
            bos_token_id: g.opt_u64("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_ids: eos.into_iter().collect(),
        })
    }

    /// RoPE inverse frequencies (length head_dim/2), with scaling applied.
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let old = *original_max_position_embeddings as f64;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// The HF `config.json` for this model (what `convert` writes).
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let mut v = json!({
            "architectures": [self.arch.hf_architecture()],
            "model_type": self.arch.hf_model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "torch_dtype": torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": if self.eos_token_ids.len() == 1 { json!(self.eos_token_ids[0]) } else { json!(self.eos_token_ids) },
        });
        let scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor}),
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}),
        };
        if let Some(o) = v.as_object_mut() {
            o.insert("rope_scaling".into(), scaling);
            if let Some(w) = self.sliding_window {
                o.insert("sliding_window".into(), json!(w));
                if self.arch == Arch::Qwen2 {
                    o.insert("use_sliding_window".into(), json!(true));
                }
            }
        }
        v
    }
}

/// `generation_config.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GenerationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(default, deserialize_with = "de_ids", skip_serializing_if = "Vec::is_empty")]
    pub eos_token_id: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub do_sample: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
}

fn de_ids<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<u32>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(ids(Some(&v)))
}

impl GenerationConfig {
    pub fn from_file(path: &Path) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let t = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| Error::config(path, format!("invalid generation_config.json: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(extra: Value) -> LlamaConfig {
        let mut v = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 128, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        LlamaConfig::from_hf_json(&v, Path::new("config.json")).unwrap()
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = base(json!({})).inv_freq();
        let scaled = base(json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}))
        .inv_freq();
        assert_eq!(plain.len(), 32);
        // Wavelength 2π/f: short ones (< 8192/4) unchanged, long ones (> 8192) divided by 8.
        for (p, s) in plain.iter().zip(&scaled) {
            let wl = 2.0 * std::f64::consts::PI / p;
            if wl < 2048.0 {
                assert_eq!(p, s);
            } else if wl > 8192.0 {
                assert!((p / 8.0 - s).abs() < 1e-15);
            } else {
                assert!(*s < *p && *s > p / 8.0);
            }
        }
    }

    #[test]
    fn config_errors_name_the_problem() {
        let v = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 2});
        let e = LlamaConfig::from_hf_json(&v, Path::new("x/config.json")).unwrap_err().to_string();
        assert!(e.contains("x/config.json") && e.contains("num_key_value_heads"), "{e}");
        let v = json!({"model_type": "llama", "hidden_size": 8});
        let e = LlamaConfig::from_hf_json(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("num_attention_heads") || e.contains("vocab_size"), "{e}");
        let v = json!({"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        let e = LlamaConfig::from_hf_json(&v, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("yarn"), "{e}");
    }
}
