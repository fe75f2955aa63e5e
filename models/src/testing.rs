//! Small real artefacts for tests of this and other crates: a tiny Llama-architecture
//! Hugging Face directory with random weights and a real tokenizer.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Write a 1-layer Llama directory (`hidden`-wide, random weights, seed-stable) to `dir`,
/// with `tokenizer_json` (a tokenizer.json document) as its tokenizer.
pub fn write_tiny_llama(dir: &Path, tokenizer_json: &serde_json::Value, vocab: usize, hidden: usize, layers: usize) -> Result<()> {
    write_tiny(dir, tokenizer_json, vocab, hidden, layers, "llama", serde_json::json!({}))
}

/// As [`write_tiny_llama`] for any Llama-family `model_type` (`qwen2` gets Q/K/V biases);
/// `extra` is merged into config.json (e.g. `{"sliding_window": 4}`).
pub fn write_tiny(
    dir: &Path,
    tokenizer_json: &serde_json::Value,
    vocab: usize,
    hidden: usize,
    layers: usize,
    model_type: &str,
    extra: serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let w = |name: &str, bytes: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    w("tokenizer.json", tokenizer_json.to_string())?;
    let inter = hidden * 2;
    let mut cfg = serde_json::json!({"model_type": model_type,
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": 2, "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": true,
        "torch_dtype": "float32", "rope_theta": 10000.0});
    if let (Some(c), Some(e)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    w("config.json", cfg.to_string())?;
    let d = Device::Cpu;
    let mut rng = crate::sampling::Rng::new(7);
    let mut r = |shape: &[usize]| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((rng.next_f64() - 0.5) * 0.2) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &d)?)
    };
    let ones = |n: usize| Tensor::ones(n, DType::F32, &d);
    let hd = hidden / 2;
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), r(&[vocab, hidden])?);
    t.insert("model.norm.weight".to_string(), ones(hidden)?);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        t.insert(format!("{p}.input_layernorm.weight"), ones(hidden)?);
        t.insert(format!("{p}.post_attention_layernorm.weight"), ones(hidden)?);
        t.insert(format!("{p}.self_attn.q_proj.weight"), r(&[hidden, hidden])?);
        t.insert(format!("{p}.self_attn.k_proj.weight"), r(&[hd, hidden])?);
        t.insert(format!("{p}.self_attn.v_proj.weight"), r(&[hd, hidden])?);
        t.insert(format!("{p}.self_attn.o_proj.weight"), r(&[hidden, hidden])?);
        if model_type == "qwen2" {
            t.insert(format!("{p}.self_attn.q_proj.bias"), r(&[hidden])?);
            t.insert(format!("{p}.self_attn.k_proj.bias"), r(&[hd])?);
            t.insert(format!("{p}.self_attn.v_proj.bias"), r(&[hd])?);
        }
        t.insert(format!("{p}.mlp.gate_proj.weight"), r(&[inter, hidden])?);
        t.insert(format!("{p}.mlp.up_proj.weight"), r(&[inter, hidden])?);
        t.insert(format!("{p}.mlp.down_proj.weight"), r(&[hidden, inter])?);
    }
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &p).map_err(|e| Error::Safetensors { path: p.clone(), msg: e.to_string() })
}

/// Write a tiny Gemma 3 (`gemma3_text`) directory with random weights: `layers` blocks
/// alternating sliding-window (window 4) and global attention, HF's norm convention
/// (`w`, applied as `1 + w`), final-logit soft-capping at 30.
pub fn write_tiny_gemma3(dir: &Path, tokenizer_json: &serde_json::Value, vocab: usize, hidden: usize, layers: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let w = |name: &str, bytes: String| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))
    };
    w("tokenizer.json", tokenizer_json.to_string())?;
    let (heads, kv, hd, inter) = (2usize, 1usize, 8usize, hidden * 2);
    let types: Vec<&str> = (0..layers).map(|i| if i % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    let cfg = serde_json::json!({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 4, "layer_types": types,
        "query_pre_attn_scalar": hd, "final_logit_softcapping": 30.0, "attn_logit_softcapping": null,
        "max_position_embeddings": 256, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2});
    w("config.json", cfg.to_string())?;
    let d = Device::Cpu;
    let mut rng = crate::sampling::Rng::new(11);
    let mut r = |shape: &[usize], s: f64| -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| ((rng.next_f64() - 0.5) * s) as f32).collect();
        Ok(Tensor::from_vec(v, shape, &d)?)
    };
    let mut t = HashMap::new();
    t.insert("model.embed_tokens.weight".to_string(), r(&[vocab, hidden], 0.2)?);
    t.insert("model.norm.weight".to_string(), r(&[hidden], 0.2)?);
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for n in ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"] {
            t.insert(format!("{p}.{n}.weight"), r(&[hidden], 0.2)?);
        }
        t.insert(format!("{p}.self_attn.q_norm.weight"), r(&[hd], 0.2)?);
        t.insert(format!("{p}.self_attn.k_norm.weight"), r(&[hd], 0.2)?);
        t.insert(format!("{p}.self_attn.q_proj.weight"), r(&[heads * hd, hidden], 0.2)?);
        t.insert(format!("{p}.self_attn.k_proj.weight"), r(&[kv * hd, hidden], 0.2)?);
        t.insert(format!("{p}.self_attn.v_proj.weight"), r(&[kv * hd, hidden], 0.2)?);
        t.insert(format!("{p}.self_attn.o_proj.weight"), r(&[hidden, heads * hd], 0.2)?);
        t.insert(format!("{p}.mlp.gate_proj.weight"), r(&[inter, hidden], 0.2)?);
        t.insert(format!("{p}.mlp.up_proj.weight"), r(&[inter, hidden], 0.2)?);
        t.insert(format!("{p}.mlp.down_proj.weight"), r(&[hidden, inter], 0.2)?);
    }
    let p = dir.join("model.safetensors");
    candle_core::safetensors::save(&t, &p).map_err(|e| Error::Safetensors { path: p.clone(), msg: e.to_string() })
}
