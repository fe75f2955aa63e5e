//! `hromada bench train`: training throughput (tokens/s) and peak memory for LoRA and
//! full fine-tuning, on the same data and config as `scripts/bench_train_torch.py`
//! (PyTorch + PEFT) so both run in one benchmark: rows of `seq_len` tokens of brown-uk
//! text, every token a target, AdamW, `batch` rows per step, `warmup` steps untimed.
use std::path::Path;
use std::time::Instant;

use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};

use crate::config::{LoraSection, OptimSection};
use crate::data::{Row, Sample};
use crate::error::{Error, Result};
use crate::optim::AdamW;
use crate::{params, recipe};

#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainBench {
    pub mode: String,
    pub device: String,
    pub mixed_precision: String,
    pub activation_checkpointing: bool,
    pub seq_len: usize,
    pub batch: usize,
    pub steps: usize,
    pub tokens_per_s: f64,
    pub peak_rss_gib: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    pub trainable_parameters: usize,
}

/// Peak resident memory (VmHWM) of this process, GiB.
pub fn peak_rss_gib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / (1024.0 * 1024.0))
        .unwrap_or(0.0)
}

/// Reset the peak (Linux: writing 5 to clear_refs), so each mode reports its own.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Rows of `seq_len` tokens from the text files under `corpus` (sorted, first `files`).
pub fn corpus_rows(lm: &LoadedModel, corpus: &Path, files: usize, seq_len: usize) -> Result<Vec<Row>> {
    let mut paths: Vec<_> = std::fs::read_dir(corpus).map_err(|e| Error::io(corpus, e))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "txt")).collect();
    paths.sort();
    let mut text = String::new();
    for p in paths.iter().take(files) {
        text.push_str(&std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?);
        text.push_str("\n\n");
    }
    let ids = lm.tokenizer.encode(&text, false)?;
    Ok(ids.chunks_exact(seq_len).map(|c| Row { samples: vec![Sample::from_mask(c.to_vec(), &vec![true; seq_len])] }).collect())
}

/// What `hromada bench train` measures.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: String,
    /// `lora` or `full`.
    pub mode: String,
    pub corpus: std::path::PathBuf,
    pub seq_len: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
    pub rank: usize,
    pub recompute: bool,
    pub device: candle_core::Device,
    /// `no`, `bf16` or `fp16` (f32 master weights).
    pub mixed_precision: String,
}

pub fn run(o: &BenchOptions) -> Result<TrainBench> {
    let (mode, seq_len, batch, steps, warmup, rank, recompute) = (o.mode.as_str(), o.seq_len, o.batch, o.steps, o.warmup, o.rank, o.recompute);
    let lm = LoadedModel::load(&o.model, &LoadOptions { dtype: DTypeChoice::F32, device: o.device.clone() })?;
    let rows = corpus_rows(&lm, &o.corpus, 200, seq_len)?;
    if rows.len() < batch {
        return Err(Error::Other(format!("{}: only {} rows of {seq_len} tokens", o.corpus.display(), rows.len())));
    }
    reset_peak();
    let mut m = lm.model;
    let ps = match mode {
        "lora" => {
            let cfg = LoraSection { rank, alpha: 2.0 * rank as f64, target_modules: vec!["all-linear".into()], ..LoraSection::default() };
            params::attach_lora(&mut m, &cfg, 0, Path::new("bench"))?.1
        }
        "full" => params::full_params(&mut m)?,
        other => return Err(Error::Other(format!("mode `{other}` (lora or full)"))),
    };
    params::apply_mixed_precision(&mut m, &o.mixed_precision, mode == "lora")?;
    let n_trainable = ps.iter().map(|p| p.var.elem_count()).sum();
    let mut opt = AdamW::new(OptimSection { lr: 1e-4, weight_decay: 0.0, ..OptimSection::default() }, &ps)?;
    let (mut first, mut last) = (f64::NAN, f64::NAN);
    let mut t0 = Instant::now();
    for i in 0..warmup + steps {
        if i == warmup {
            t0 = Instant::now();
        }
        let start = (i * batch) % (rows.len() - batch + 1);
        let mb: Vec<&Row> = rows[start..start + batch].iter().collect();
        let (loss, grads, _) = recipe::step_grads_with(&m, &ps, &[mb], recompute)?;
        opt.step(&ps, &grads, 1e-4)?;
        if i == 0 {
            first = loss;
        }
        last = loss;
    }
    let dt = t0.elapsed().as_secs_f64();
    Ok(TrainBench {
        mode: mode.into(),
        device: hromada_models::device::describe(&o.device),
        mixed_precision: o.mixed_precision.clone(),
        activation_checkpointing: recompute,
        seq_len,
        batch,
        steps,
        tokens_per_s: (steps * batch * seq_len) as f64 / dt,
        peak_rss_gib: peak_rss_gib(),
        loss_first: first,
        loss_last: last,
        trainable_parameters: n_trainable,
    })
}
