//! `hromada convert`: a GGUF (or any loaded model) written out as a Hugging Face model
//! directory that transformers' `from_pretrained` loads.
use std::collections::HashMap;
use std::path::Path;

use candle_core::DType;
use serde_json::json;

use crate::error::{Error, Result};
use crate::model::{LoadedModel, Model};

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Write `m` to `out` as config.json, model.safetensors, tokenizer.json,
/// tokenizer_config.json and generation_config.json, weights in `dtype`.
pub fn write_hf_dir(m: &LoadedModel, out: &Path, dtype: DType) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (tensors, cfg) = match &m.model {
        Model::Llama(l) => (l.named_tensors(dtype)?, l.cfg.to_hf_json(dtype_name(dtype))),
        Model::Gemma3(g) => (g.named_tensors(dtype)?, g.cfg.to_hf_json(dtype_name(dtype))),
    };
    let st_path = out.join("model.safetensors");
    let map: HashMap<String, candle_core::Tensor> = tensors.into_iter().collect();
    let tmp = out.join("model.safetensors.tmp");
    // transformers expects the `format: pt` metadata that PyTorch writers add.
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let mut named: Vec<(&String, &candle_core::Tensor)> = map.iter().collect();
    named.sort_by(|a, b| a.0.cmp(b.0));
    safetensors::serialize_to_file(named, Some(meta), &tmp)
        .map_err(|e| Error::Safetensors { path: tmp.clone(), msg: e.to_string() })?;
    std::fs::rename(&tmp, &st_path).map_err(|e| Error::io(&st_path, e))?;
    let pretty = |v: &serde_json::Value| serde_json::to_vec_pretty(v).unwrap_or_default();
    write_atomic(&out.join("config.json"), &pretty(&cfg))?;
    write_atomic(&out.join("tokenizer.json"), &pretty(&m.tokenizer.json))?;
    let tcfg = m
        .tokenizer
        .tokenizer_config(m.chat_template.as_ref().map(|t| t.source()), m.context_length);
    write_atomic(&out.join("tokenizer_config.json"), &pretty(&tcfg))?;
    let eos = m.eos_ids();
    let gen = json!({
        "bos_token_id": m.tokenizer.special.bos.as_ref().map(|b| b.0),
        "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) },
        "transformers_version": "4.56.0",
    });
    write_atomic(&out.join("generation_config.json"), &pretty(&gen))?;
    Ok(())
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}
