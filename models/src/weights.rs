//! Where weights come from: safetensors (one file or shards) or a GGUF file, addressed by
//! Hugging Face tensor names so architectures never see a file format.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::linear::Linear;

pub enum WeightSource {
    Safetensors {
        files: Vec<(PathBuf, MmapedSafetensors)>,
        routing: HashMap<String, usize>,
        dtype: DType,
        device: Device,
    },
    Gguf {
        file: GgufFile,
        /// Keep matmul weights quantized (otherwise dequantize to `dtype`).
        quantized: bool,
        /// Gemma's four norms per block map to other GGUF names than Llama's two.
        gemma: bool,
        /// llama.cpp permuted Q/K rows for interleaved RoPE (`llama` architecture).
        rope_permuted: bool,
        dtype: DType,
        device: Device,
    },
}

/// HF name -> GGUF name (llama.cpp's tensor naming).
pub fn hf_to_gguf_name(name: &str, gemma: bool) -> String {
    let (stem, suffix) = match name.rsplit_once('.') {
        Some((s, x @ ("weight" | "bias"))) => (s, x),
        _ => (name, "weight"),
    };
    let mapped = match stem {
        "model.embed_tokens" => "token_embd".to_string(),
        "model.norm" => "output_norm".to_string(),
        "lm_head" => "output".to_string(),
        _ => {
            if let Some(rest) = stem.strip_prefix("model.layers.") {
                let (idx, part) = rest.split_once('.').unwrap_or((rest, ""));
                let p = match part {
                    "input_layernorm" => "attn_norm",
                    "self_attn.q_proj" => "attn_q",
                    "self_attn.k_proj" => "attn_k",
                    "self_attn.v_proj" => "attn_v",
                    "self_attn.o_proj" => "attn_output",
                    "self_attn.q_norm" => "attn_q_norm",
                    "self_attn.k_norm" => "attn_k_norm",
                    "post_attention_layernorm" if gemma => "post_attention_norm",
                    "post_attention_layernorm" => "ffn_norm",
                    "pre_feedforward_layernorm" => "ffn_norm",
                    "post_feedforward_layernorm" => "post_ffw_norm",
                    "mlp.gate_proj" => "ffn_gate",
                    "mlp.up_proj" => "ffn_up",
                    "mlp.down_proj" => "ffn_down",
                    other => other,
                };
                format!("blk.{idx}.{p}")
            } else {
                stem.to_string()
            }
        }
    };
    format!("{mapped}.{suffix}")
}

fn st_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

impl WeightSource {
    /// Open `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn safetensors_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index.exists() {
            let t = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: serde_json::Value = serde_json::from_str(&t)
                .map_err(|e| Error::config(&index, format!("invalid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "`weight_map` is missing"))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files.into_iter().map(|f| dir.join(f)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
                .collect();
            found.sort();
            if found.is_empty() {
                return Err(Error::MissingFile {
                    path: single,
                    what: "the model directory has no *.safetensors weights".into(),
                });
            }
            found
        };
        let mut files = Vec::new();
        let mut routing = HashMap::new();
        for (i, p) in paths.into_iter().enumerate() {
            if !p.exists() {
                return Err(Error::MissingFile {
                    path: p,
                    what: "listed in model.safetensors.index.json".into(),
                });
            }
            // SAFETY: read-only map of a file that is not modified while loaded.
            let st = unsafe { MmapedSafetensors::new(&p) }.map_err(|e| st_err(&p, e))?;
            for (name, _) in st.tensors() {
                routing.insert(name, i);
            }
            files.push((p, st));
        }
        Ok(Self::Safetensors {
            files,
            routing,
            dtype,
            device: device.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        match self {
            Self::Safetensors { dtype, .. } | Self::Gguf { dtype, .. } => *dtype,
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Self::Safetensors { device, .. } | Self::Gguf { device, .. } => device,
        }
    }

    pub fn path(&self) -> PathBuf {
        match self {
            Self::Safetensors { files, .. } => files.first().map(|f| f.0.clone()).unwrap_or_default(),
            Self::Gguf { file, .. } => file.path().to_path_buf(),
        }
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Self::Safetensors { routing, .. } => routing.contains_key(hf_name),
            Self::Gguf { file, gemma, .. } => file.has_tensor(&hf_to_gguf_name(hf_name, *gemma)),
        }
    }

    /// A dense tensor of the model dtype. `permute_heads`: undo llama.cpp's Q/K row
    /// permutation with this many heads (GGUF `llama` only).
    pub fn tensor(&self, hf_name: &str, permute_heads: Option<usize>) -> Result<Tensor> {
        match self {
            Self::Safetensors { files, routing, dtype, device } => {
                let i = *routing.get(hf_name).ok_or_else(|| Error::MissingTensor {
                    path: files.first().map(|f| f.0.clone()).unwrap_or_default(),
                    name: hf_name.to_string(),
                })?;
                let (path, st) = &files[i];
                let t = st.load(hf_name, device).map_err(|e| st_err(path, format!("tensor `{hf_name}`: {e}")))?;
                Ok(t.to_dtype(*dtype)?)
            }
            Self::Gguf { file, rope_permuted, dtype, device, gemma, .. } => {
                let name = hf_to_gguf_name(hf_name, *gemma);
                let q = match (permute_heads, rope_permuted) {
                    (Some(h), true) => file.qtensor_unpermute_rows(&name, h, device)?,
                    _ => file.qtensor(&name, device)?,
                };
                Ok(q.dequantize(device)?.to_dtype(*dtype)?)
            }
        }
    }

    pub fn opt_tensor(&self, hf_name: &str) -> Result<Option<Tensor>> {
        if self.contains(hf_name) {
            self.tensor(hf_name, None).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A linear layer `{prefix}.weight` (+ `{prefix}.bias` if `bias`).
    pub fn linear(&self, prefix: &str, bias: bool, permute_heads: Option<usize>) -> Result<Linear> {
        let wname = format!("{prefix}.weight");
        let b = if bias {
            let bname = format!("{prefix}.bias");
            let b = self.tensor(&bname, None)?;
            let b = match (permute_heads, self) {
                (Some(h), Self::Gguf { rope_permuted: true, .. }) => unpermute_vec(&b, h)?,
                _ => b,
            };
            Some(b)
        } else {
            None
        };
        match self {
            Self::Gguf { file, quantized: true, rope_permuted, device, gemma, .. } => {
                let name = hf_to_gguf_name(&wname, *gemma);
                let q = match (permute_heads, rope_permuted) {
                    (Some(h), true) => file.qtensor_unpermute_rows(&name, h, device)?,
                    _ => file.qtensor(&name, device)?,
                };
                if matches!(q.dtype(), candle_core::quantized::GgmlDType::Q4_1 | candle_core::quantized::GgmlDType::Q8_0 | candle_core::quantized::GgmlDType::Q5_0 | candle_core::quantized::GgmlDType::Q4K | candle_core::quantized::GgmlDType::Q6K) && device.is_cpu() {
                    Ok(Linear::quantized_cpu_q4_1(q, b)?)
                } else {
                    Ok(Linear::quantized(q, b)?)
                }
            }
            _ => Ok(Linear::dense(self.tensor(&wname, permute_heads)?, b)?),
        }
    }
}

fn unpermute_vec(b: &Tensor, n_head: usize) -> Result<Tensor> {
    let n = b.dim(0)?;
    let d = n / n_head;
    Ok(b.reshape((n_head, d / 2, 2))?.transpose(1, 2)?.reshape(n)?)
}
