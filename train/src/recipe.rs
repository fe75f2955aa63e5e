//! The fine-tuning recipe, top to bottom: load the model, build the data, make the model
//! trainable (LoRA or full), then for every optimizer step run the micro-batches, clip,
//! update, log, evaluate and checkpoint; at the end export the adapter (PEFT) and the
//! merged model (Hugging Face directory).
//!
//! Gradient accumulation: every micro-batch's loss is the *sum* of its token losses
//! divided by the number of target tokens in the whole step (all micro-batches), so k
//! micro-batches give exactly the gradient of one batch of k (not the mean of per-batch
//! means, the bug transformers fixed in 2024).
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use hromada_models::cache::Segments;
use hromada_models::model::Model;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};
use serde_json::json;

use crate::checkpoint::{self, TrainState};
use crate::config::{Task, TrainConfig};
use crate::data::{self, DataStats, Row, IGNORE};
use crate::error::{Error, Result};
use crate::optim::{grad_norm, lr_at, AdamW, Param};
use crate::params;

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub steps: usize,
    pub interrupted: bool,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub first_val_loss: Option<f64>,
    pub output: PathBuf,
    pub checkpoint: Option<PathBuf>,
}

/// Sum of the token losses (nats) of `rows`, packed into one forward pass, and the
/// number of target tokens. Each sample is its own causal segment.
pub fn loss_sum(model: &Model, rows: &[&Row], differentiable: bool) -> Result<(Tensor, usize)> {
    let dev = model.device().clone();
    let (ids, labels, lens) = pack_rows(rows);
    if labels.iter().all(|&l| l == IGNORE) {
        return Ok((Tensor::zeros((), DType::F32, &dev)?, 0));
    }
    let n = ids.len();
    let hidden = model.forward(&Tensor::from_vec(ids, n, &dev)?, &mut Segments::new(lens, differentiable))?;
    head_loss(model, &hidden, &labels)
}

/// Packed inputs of `rows`: ids, labels, segment lengths.
fn pack_rows(rows: &[&Row]) -> (Vec<u32>, Vec<u32>, Vec<usize>) {
    let (mut ids, mut labels, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for r in rows {
        for s in &r.samples {
            ids.extend_from_slice(&s.ids);
            labels.extend_from_slice(&s.labels);
            lens.push(s.ids.len());
        }
    }
    (ids, labels, lens)
}

/// Summed token loss of the final hidden states `hidden` against `labels`.
fn head_loss(model: &Model, hidden: &Tensor, labels: &[u32]) -> Result<(Tensor, usize)> {
    let dev = model.device().clone();
    let (pos, tgt): (Vec<u32>, Vec<u32>) = labels.iter().enumerate().filter(|(_, &l)| l != IGNORE).map(|(i, &l)| (i as u32, l)).unzip();
    if pos.is_empty() {
        return Ok((Tensor::zeros((), hidden.dtype(), &dev)?, 0));
    }
    let k = pos.len();
    let h = hidden.index_select(&Tensor::from_vec(pos, k, &dev)?, 0)?;
    let logits = model.logits(&h)?;
    let lsm = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = lsm.gather(&Tensor::from_vec(tgt, (k, 1), &dev)?, 1)?;
    Ok((picked.sum_all()?.neg()?, k))
}

fn accumulate(grads: &mut HashMap<String, Tensor>, params: &[Param], g: &candle_core::backprop::GradStore) -> Result<()> {
    for p in params {
        if let Some(gp) = g.get(p.var.as_tensor()) {
            let acc = match grads.remove(&p.name) {
                Some(prev) => (prev + gp)?,
                None => gp.clone(),
            };
            grads.insert(p.name.clone(), acc);
        }
    }
    Ok(())
}

/// Activation checkpointing: run the blocks without keeping their graphs (storing only
/// each block's input), then backpropagate block by block from the top, recomputing one
/// block's graph at a time. Peak memory holds one block's activations instead of all;
/// the compute is about one extra forward pass. Adds `scale ×` the gradients of the
/// micro-batch's summed loss to `grads`; returns (loss sum, targets).
fn recompute_grads(model: &Model, params: &[Param], rows: &[&Row], scale: f64, grads: &mut HashMap<String, Tensor>) -> Result<(f64, usize)> {
    let dev = model.device().clone();
    let (ids, labels, lens) = pack_rows(rows);
    let n = ids.len();
    let ids = Tensor::from_vec(ids, n, &dev)?;
    let mut seg = Segments::new(lens, true);
    let ctx = model.rope_ctx(n, &mut seg)?;
    let mut xs = vec![model.embed(&ids)?.detach()];
    for i in 0..model.num_layers() {
        let x = model.block(i, &xs[i], &ctx, &mut seg)?.detach();
        xs.push(x);
    }
    let top = candle_core::Var::from_tensor(&xs[model.num_layers()])?;
    let hidden = model.final_norm(top.as_tensor(), true)?;
    let (ls, k) = head_loss(model, &hidden, &labels)?;
    if k == 0 {
        return Ok((0.0, 0));
    }
    let loss = ls.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let g = (ls * scale)?.backward()?;
    accumulate(grads, params, &g)?;
    let mut gx = g.get(top.as_tensor()).cloned().ok_or_else(|| Error::Other("no gradient reached the last block".into()))?;
    for i in (0..model.num_layers()).rev() {
        let xi = candle_core::Var::from_tensor(&xs[i])?;
        let out = model.block(i, xi.as_tensor(), &ctx, &mut seg)?;
        let g = (out * gx.detach())?.sum_all()?.backward()?;
        accumulate(grads, params, &g)?;
        gx = match g.get(xi.as_tensor()) {
            Some(t) => t.clone(),
            None => gx.zeros_like()?,
        };
    }
    // The embedding (a parameter in full fine-tuning).
    let e = model.embed(&ids)?;
    let g = (e * gx.detach())?.sum_all()?.backward()?;
    accumulate(grads, params, &g)?;
    Ok((loss, k))
}

/// Gradients of one optimizer step over `micro_batches`, normalised by the step's
/// total target tokens. Returns (mean loss per token, gradients by name, target tokens).
/// `recompute`: activation checkpointing (same gradients, less memory).
pub fn step_grads_with(model: &Model, params: &[Param], micro_batches: &[Vec<&Row>], recompute: bool) -> Result<(f64, HashMap<String, Tensor>, usize)> {
    if !recompute {
        return step_grads(model, params, micro_batches);
    }
    let total: usize = micro_batches.iter().flat_map(|mb| mb.iter()).map(|r| r.n_targets()).sum();
    let mut grads = HashMap::new();
    let mut loss = 0f64;
    if total == 0 {
        return Ok((0.0, grads, 0));
    }
    for mb in micro_batches {
        loss += recompute_grads(model, params, mb, 1.0 / total as f64, &mut grads)?.0;
    }
    Ok((loss / total as f64, grads, total))
}

/// Gradients of one optimizer step over `micro_batches`, normalised by the step's
/// total target tokens. Returns (mean loss per token, gradients by name, target tokens).
pub fn step_grads(model: &Model, params: &[Param], micro_batches: &[Vec<&Row>]) -> Result<(f64, HashMap<String, Tensor>, usize)> {
    let total: usize = micro_batches.iter().flat_map(|mb| mb.iter()).map(|r| r.n_targets()).sum();
    let mut grads: HashMap<String, Tensor> = HashMap::new();
    let mut loss = 0f64;
    if total == 0 {
        return Ok((0.0, grads, 0));
    }
    for mb in micro_batches {
        let (ls, k) = loss_sum(model, mb, true)?;
        if k == 0 {
            continue;
        }
        loss += ls.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g = (ls / total as f64)?.backward()?;
        accumulate(&mut grads, params, &g)?;
    }
    Ok((loss / total as f64, grads, total))
}

/// Mean validation loss per target token.
pub fn eval_loss(model: &mut Model, rows: &[Row], micro_batch_size: usize) -> Result<Option<f64>> {
    if rows.is_empty() {
        return Ok(None);
    }
    params::set_lora_mode(model, false, 0);
    let (mut s, mut n) = (0f64, 0usize);
    for chunk in rows.chunks(micro_batch_size.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let (ls, k) = loss_sum(model, &refs, false)?;
        s += ls.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        n += k;
    }
    Ok((n > 0).then(|| s / n as f64))
}

/// The dataset: (train rows, validation rows, stats).
fn build_data(task: Task, cfg: &TrainConfig, lm: &LoadedModel, config_path: &Path) -> Result<(Vec<Row>, Vec<Row>, DataStats)> {
    let d = &cfg.data;
    let mut stats = DataStats::default();
    let load = |p: &str, stats: &mut DataStats| -> Result<Vec<data::Sample>> {
        let path = Path::new(p);
        match task {
            Task::Sft => data::load_sft(lm, path, d.seq_len, d.assistant_only_loss, d.max_samples, stats),
            Task::Pretrain => data::load_shards(path, lm.model.vocab_size(), d.seq_len, d.max_samples, stats),
        }
    };
    let samples = load(&d.train, &mut stats)?;
    if samples.is_empty() {
        return Err(Error::config(config_path, format!("data.train `{}` gives no training samples (empty, or nothing to train on)", d.train)));
    }
    let (mut train, val) = if d.validation.is_empty() {
        data::split(samples, d.val_fraction, cfg.run.seed)
    } else {
        (samples, load(&d.validation, &mut stats)?)
    };
    if train.is_empty() {
        return Err(Error::config(config_path, "no training samples are left after the validation split".to_string()));
    }
    data::shuffle(&mut train, cfg.run.seed);
    let train_rows = data::pack(train, d.seq_len, d.packing);
    let val_rows = data::pack(val, d.seq_len, d.packing);
    stats.rows = train_rows.len();
    stats.tokens = train_rows.iter().map(|r| r.len()).sum();
    stats.target_tokens = train_rows.iter().map(|r| r.n_targets()).sum();
    Ok((train_rows, val_rows, stats))
}

/// Row index (into the train rows) of global row position `pos`: epoch `pos / n` uses
/// its own seeded permutation.
struct RowOrder {
    n: usize,
    seed: u64,
    cache: HashMap<usize, Vec<usize>>,
}

impl RowOrder {
    fn row(&mut self, pos: usize) -> usize {
        let epoch = pos / self.n;
        let (n, seed) = (self.n, self.seed);
        let perm = self.cache.entry(epoch).or_insert_with(|| {
            let mut p: Vec<usize> = (0..n).collect();
            data::shuffle(&mut p, seed.wrapping_add(1000 + epoch as u64));
            p
        });
        perm[pos % n]
    }
}

fn append_jsonl(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
    writeln!(f, "{v}").map_err(|e| Error::io(path, e))
}

/// Keep only metric rows with `step <= step` (a resumed run rewrites what came after
/// its checkpoint).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_some_and(|s| s as usize <= step))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    let body = if kept.is_empty() { String::new() } else { kept.join("\n") + "\n" };
    std::fs::write(&tmp, body).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn read_curves(path: &Path) -> (Vec<(usize, f64)>, Vec<(usize, f64)>) {
    let (mut t, mut v) = (Vec::new(), Vec::new());
    for l in std::fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(j) = serde_json::from_str::<serde_json::Value>(l) else { continue };
        let Some(s) = j.get("step").and_then(|s| s.as_u64()) else { continue };
        if let Some(x) = j.get("loss").and_then(|x| x.as_f64()) {
            t.push((s as usize, x));
        }
        if let Some(x) = j.get("val_loss").and_then(|x| x.as_f64()) {
            v.push((s as usize, x));
        }
    }
    (t, v)
}

/// Run (or resume) a training job. `stop` set (SIGTERM/SIGINT) makes the run write a
/// checkpoint after the current step and return `interrupted`.
pub fn run(task: Task, cfg: &TrainConfig, config_path: &Path, resume: bool, stop: Arc<AtomicBool>, progress: bool) -> Result<Outcome> {
    let out = cfg.output_dir();
    let existing = checkpoint::list(&out)?;
    if !resume && !existing.is_empty() {
        return Err(Error::config(config_path, format!("{} already holds checkpoints: pass --resume to continue, or set run.output to a new directory", out.display())));
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    std::fs::write(out.join("config.toml"), cfg.to_toml()).map_err(|e| Error::io(out.join("config.toml"), e))?;

    // 1. Model.
    let dtype = if cfg.model.dtype == "quantized" { DTypeChoice::Quantized } else { DTypeChoice::F32 };
    let device = cfg.model.device.parse::<hromada_models::DeviceChoice>().map_err(|e| Error::config(config_path, format!("model.device: {e}")))?.device()?;
    let mut lm = LoadedModel::load(&cfg.model.path, &LoadOptions { dtype, device })?;
    if cfg.data.seq_len > lm.context_length {
        return Err(Error::config(config_path, format!("data.seq_len = {} exceeds the model's context length {}", cfg.data.seq_len, lm.context_length)));
    }

    // 2. Data.
    let (train_rows, val_rows, stats) = build_data(task, cfg, &lm, config_path)?;
    tracing::info!(samples = stats.samples, rows = stats.rows, tokens = stats.tokens, target_tokens = stats.target_tokens, truncated = stats.truncated, val_rows = val_rows.len(), "data ready");

    // 3. Trainable parameters.
    let (lora_cfg, params) = match cfg.method.kind.as_str() {
        "lora" => {
            let (c, p) = params::attach_lora(&mut lm.model, &cfg.lora, cfg.run.seed, config_path)?;
            (Some(c), p)
        }
        _ => (None, params::full_params(&mut lm.model)?),
    };
    params::apply_mixed_precision(&mut lm.model, &cfg.run.mixed_precision, cfg.method.kind == "lora")?;
    let n_trainable: usize = params.iter().map(|p| p.var.elem_count()).sum();
    tracing::info!(params = params.len(), n_trainable, "trainable parameters");

    // 4. Schedule and optimizer, or the checkpoint's state.
    let rows_per_step = cfg.run.micro_batch_size * cfg.run.grad_accum;
    let total_steps = if cfg.run.max_steps > 0 { cfg.run.max_steps } else { (cfg.run.epochs * train_rows.len()).div_ceil(rows_per_step) };
    let mut opt = AdamW::new(cfg.optim.clone(), &params)?;
    let mut state = TrainState { step: 0, opt_t: 0, micro_batches: 0, seed: cfg.run.seed, total_steps, tokens_seen: 0, skipped_steps: 0, config: cfg.to_toml() };
    let metrics = out.join("metrics.jsonl");
    if let Some((_, dir)) = existing.last() {
        state = checkpoint::load(dir, &params, &mut opt)?;
        if state.seed != cfg.run.seed || state.total_steps != total_steps {
            return Err(Error::Checkpoint { path: dir.clone(), msg: format!("saved with seed {} and {} steps; this config has seed {} and {} steps", state.seed, state.total_steps, cfg.run.seed, total_steps) });
        }
        truncate_metrics(&metrics, state.step)?;
        tracing::info!(step = state.step, "resumed from {}", dir.display());
    } else if metrics.exists() {
        std::fs::remove_file(&metrics).map_err(|e| Error::io(&metrics, e))?;
    }

    // 5. The loop.
    let mut order = RowOrder { n: train_rows.len(), seed: cfg.run.seed, cache: HashMap::new() };
    let bar = if progress { indicatif::ProgressBar::new(total_steps as u64) } else { indicatif::ProgressBar::hidden() };
    bar.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar.set_position(state.step as u64);
    let mut first_val = None;
    if state.step == 0 && cfg.run.eval_every > 0 {
        first_val = eval_loss(&mut lm.model, &val_rows, cfg.run.micro_batch_size)?;
        if let Some(v) = first_val {
            append_jsonl(&metrics, &json!({"step": 0, "val_loss": v}))?;
        }
    }
    let start = Instant::now();
    let mut tokens_this_run = 0u64;
    let mut last_loss = None;
    let mut interrupted = false;
    let mut last_ckpt = None;
    while state.step < total_steps {
        let step = state.step;
        let lr = lr_at(&cfg.optim, step, total_steps);
        let mut mbs: Vec<Vec<&Row>> = Vec::with_capacity(cfg.run.grad_accum);
        for j in 0..cfg.run.grad_accum {
            let base = (state.micro_batches + j) * cfg.run.micro_batch_size;
            mbs.push((0..cfg.run.micro_batch_size).map(|k| &train_rows[order.row(base + k)]).collect());
        }
        params::set_lora_mode(&mut lm.model, true, cfg.run.seed ^ ((state.micro_batches as u64) << 20));
        let (loss, mut grads, n_tokens) = step_grads_with(&lm.model, &params, &mbs, cfg.run.activation_checkpointing)?;
        let norm = grad_norm(&grads)?;
        let skipped = !norm.is_finite() || !loss.is_finite();
        if skipped {
            state.skipped_steps += 1;
            tracing::warn!(step = step + 1, "non-finite loss or gradient (norm {norm}): step skipped");
        } else {
            if cfg.optim.grad_clip > 0.0 && norm > cfg.optim.grad_clip {
                let c = cfg.optim.grad_clip / (norm + 1e-6);
                for g in grads.values_mut() {
                    *g = (&*g * c)?;
                }
            }
            opt.step(&params, &grads, lr)?;
        }
        drop(grads);
        state.step += 1;
        state.opt_t = opt.t;
        state.micro_batches += cfg.run.grad_accum;
        let seen: u64 = mbs.iter().flat_map(|m| m.iter()).map(|r| r.len() as u64).sum();
        state.tokens_seen += seen;
        tokens_this_run += seen;
        let el = start.elapsed().as_secs_f64();
        let tps = tokens_this_run as f64 / el.max(1e-9);
        last_loss = Some(loss);
        append_jsonl(&metrics, &json!({"step": state.step, "loss": loss, "lr": lr, "grad_norm": norm, "target_tokens": n_tokens, "tokens": seen, "tokens_per_s": tps, "elapsed_s": el, "skipped": skipped}))?;
        bar.set_position(state.step as u64);
        bar.set_message(format!("loss {loss:.4} lr {lr:.2e} {tps:.0} tok/s"));
        if !progress && cfg.run.log_every > 0 && state.step % cfg.run.log_every == 0 {
            tracing::info!(step = state.step, loss, lr, grad_norm = norm, tokens_per_s = tps, "train");
        }
        if cfg.run.eval_every > 0 && state.step % cfg.run.eval_every == 0 && state.step < total_steps {
            if let Some(v) = eval_loss(&mut lm.model, &val_rows, cfg.run.micro_batch_size)? {
                append_jsonl(&metrics, &json!({"step": state.step, "val_loss": v}))?;
                bar.println(format!("step {}: validation loss {v:.4}", state.step));
            }
        }
        let stopping = stop.load(Ordering::SeqCst) || (cfg.run.stop_after > 0 && state.step >= cfg.run.stop_after && state.step < total_steps);
        if stopping || (cfg.run.save_every > 0 && state.step % cfg.run.save_every == 0) {
            last_ckpt = Some(checkpoint::save(&out, &state, &params, &opt, cfg.run.keep_checkpoints)?);
        }
        if stopping {
            interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    if interrupted {
        return Ok(Outcome { steps: state.step, interrupted, final_train_loss: last_loss, final_val_loss: None, first_val_loss: first_val, output: out, checkpoint: last_ckpt });
    }

    // 6. Final evaluation, checkpoint, exports, plot.
    let final_val = eval_loss(&mut lm.model, &val_rows, cfg.run.micro_batch_size)?;
    if let Some(v) = final_val {
        append_jsonl(&metrics, &json!({"step": state.step, "val_loss": v}))?;
    }
    if last_ckpt.as_ref().is_none_or(|p| !p.ends_with(format!("step-{:06}", state.step))) {
        last_ckpt = Some(checkpoint::save(&out, &state, &params, &opt, cfg.run.keep_checkpoints)?);
    }
    params::set_lora_mode(&mut lm.model, false, 0);
    let base = lm.path.display().to_string();
    match &lora_cfg {
        Some(c) => {
            hromada_models::lora::save_peft_adapter(&mut lm.model, c, &base, &out.join("adapter"))?;
            if cfg.run.export_merged {
                write_dir(&lm, &out.join("merged"))?;
            }
        }
        None => write_dir(&lm, &out.join("model"))?,
    }
    let (t, v) = read_curves(&metrics);
    if let Err(e) = crate::plot::loss_curve(&out.join("loss.png"), &t, &v) {
        tracing::warn!("{e}");
    }
    let summary = json!({"steps": state.step, "skipped_steps": state.skipped_steps, "tokens_seen": state.tokens_seen,
        "final_train_loss": last_loss, "first_val_loss": first_val, "final_val_loss": final_val, "data": stats,
        "trainable_parameters": n_trainable, "seconds": start.elapsed().as_secs_f64()});
    let sp = out.join("summary.json");
    std::fs::write(&sp, serde_json::to_string_pretty(&summary).unwrap_or_default()).map_err(|e| Error::io(&sp, e))?;
    Ok(Outcome { steps: state.step, interrupted: false, final_train_loss: last_loss, final_val_loss: final_val, first_val_loss: first_val, output: out, checkpoint: last_ckpt })
}

/// A Hugging Face directory of the model as trained (LoRA merged in), written atomically.
fn write_dir(lm: &LoadedModel, dir: &Path) -> Result<()> {
    let tmp = dir.with_extension("tmp");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    hromada_models::convert::write_hf_dir(lm, &tmp, DType::F32)?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

/// SIGTERM/SIGINT set the returned flag (Slurm preemption): the run checkpoints and stops.
pub fn stop_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, flag.clone()).map_err(|e| Error::Other(format!("installing the signal handler: {e}")))?;
    }
    Ok(flag)
}
