//! Checkpoints: `OUTPUT/checkpoints/step-NNNNNN/` with the trainable weights
//! (`trainable.safetensors`), the optimizer moments (`optimizer.safetensors`) and
//! `state.json` (step, optimizer step count, RNG seed, data position, config). A
//! checkpoint is written into `step-NNNNNN.tmp/` and renamed when complete, so a
//! directory with its final name is whole; `--resume` takes the newest one.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::optim::{AdamW, Param};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: usize,
    /// AdamW's update count (steps minus skipped non-finite ones).
    pub opt_t: u64,
    /// Micro-batches consumed: the data position (row order derives from the seed).
    pub micro_batches: usize,
    pub seed: u64,
    pub total_steps: usize,
    pub tokens_seen: u64,
    pub skipped_steps: usize,
    /// The effective config, TOML.
    pub config: String,
}

fn ckpt_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.to_path_buf(), msg: msg.into() }
}

fn save_tensors(path: &Path, named: Vec<(String, Tensor)>) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into_iter().collect();
    let mut named = named;
    named.sort_by(|a, b| a.0.cmp(&b.0));
    safetensors::serialize_to_file(named.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), path).map_err(|e| ckpt_err(path, e.to_string()))?;
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| Error::io(path, e))
}

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Write a checkpoint and keep only the newest `keep` (at least one).
pub fn save(output: &Path, state: &TrainState, params: &[Param], opt: &AdamW, keep: usize) -> Result<PathBuf> {
    let root = checkpoints_dir(output);
    let dir = root.join(format!("step-{:06}", state.step));
    let tmp = root.join(format!("step-{:06}.tmp", state.step));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_tensors(&tmp.join("trainable.safetensors"), params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect())?;
    save_tensors(&tmp.join("optimizer.safetensors"), opt.state_tensors())?;
    let sp = tmp.join("state.json");
    let text = serde_json::to_string_pretty(state).map_err(|e| ckpt_err(&sp, e.to_string()))?;
    std::fs::write(&sp, text).map_err(|e| Error::io(&sp, e))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&tmp, &dir).map_err(|e| Error::io(&dir, e))?;
    let all = list(output)?;
    let keep = keep.max(1);
    if all.len() > keep {
        for (_, old) in &all[..all.len() - keep] {
            std::fs::remove_dir_all(old).map_err(|e| Error::io(old, e))?;
        }
    }
    Ok(dir)
}

/// Complete checkpoints, oldest first.
pub fn list(output: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = checkpoints_dir(output);
    if !root.exists() {
        return Ok(vec![]);
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(&root).map_err(|e| Error::io(&root, e))? {
        let p = e.map_err(|e| Error::io(&root, e))?.path();
        let name = p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        if let Some(n) = name.strip_prefix("step-").and_then(|s| s.parse::<usize>().ok()) {
            if p.join("state.json").exists() {
                v.push((n, p));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Load a checkpoint into `params` (by name, shapes checked) and `opt`.
pub fn load(dir: &Path, params: &[Param], opt: &mut AdamW) -> Result<TrainState> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| ckpt_err(&sp, format!("invalid state.json: {e}")))?;
    let tp = dir.join("trainable.safetensors");
    let t = candle_core::safetensors::load(&tp, &Device::Cpu).map_err(|e| ckpt_err(&tp, e.to_string()))?;
    for p in params {
        let w = t.get(&p.name).ok_or_else(|| ckpt_err(&tp, format!("lacks `{}`: saved by a run with another method or target modules?", p.name)))?;
        if w.dims() != p.var.as_tensor().dims() {
            return Err(ckpt_err(&tp, format!("`{}` has shape {:?}, the model needs {:?}", p.name, w.dims(), p.var.dims())));
        }
        p.var.set(&w.to_device(p.var.device())?)?;
    }
    if t.len() != params.len() {
        return Err(ckpt_err(&tp, format!("holds {} tensors, this run trains {}", t.len(), params.len())));
    }
    let op = dir.join("optimizer.safetensors");
    let o = candle_core::safetensors::load(&op, &Device::Cpu).map_err(|e| ckpt_err(&op, e.to_string()))?;
    opt.load_state(&o, state.opt_t).map_err(|e| ckpt_err(&op, e.to_string()))?;
    Ok(state)
}
