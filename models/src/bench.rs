//! `hromada bench generate`: prompt processing (ppN) and decode (tgN) tok/s at batch 1,
//! measured as llama.cpp's `llama-bench` does (random tokens, an empty cache for each
//! test, decode one token at a time), and optionally `llama-bench` itself in the same run.
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::cache::SeqKvCache;
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::sampling::Rng;

#[derive(Debug, Clone, Serialize)]
pub struct Stat {
    pub test: String,
    pub tok_per_s: f64,
    pub stddev: f64,
    pub samples: Vec<f64>,
}

fn stat(test: String, samples: Vec<f64>) -> Stat {
    let n = samples.len().max(1) as f64;
    let mean = samples.iter().sum::<f64>() / n;
    let var = samples.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    Stat { test, tok_per_s: mean, stddev: var.sqrt(), samples }
}

fn random_tokens(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect()
}

/// Run `reps` repetitions (after one warm-up) of ppN and tgN.
pub fn bench_generate(m: &LoadedModel, pp: usize, tg: usize, reps: usize) -> Result<Vec<Stat>> {
    let device = m.model.device().clone();
    let vocab = m.model.vocab_size();
    let mut rng = Rng::new(42);
    let mut out = Vec::new();
    if pp > 0 {
        let mut samples = Vec::new();
        for r in 0..=reps {
            let toks = random_tokens(&mut rng, pp, vocab);
            let mut cache = SeqKvCache::new(m.model.num_layers(), m.context_length);
            cache.set_prompt_len(pp);
            let t = Instant::now();
            let h = m.model.forward(&Tensor::new(toks.as_slice(), &device)?, &mut cache)?;
            let n = h.dim(0)?;
            let _ = m.model.logits(&h.narrow(0, n - 1, 1)?)?.to_vec2::<f32>()?;
            if r > 0 {
                samples.push(pp as f64 / t.elapsed().as_secs_f64());
            }
        }
        out.push(stat(format!("pp{pp}"), samples));
    }
    if tg > 0 {
        let mut samples = Vec::new();
        for r in 0..=reps {
            let toks = random_tokens(&mut rng, tg, vocab);
            let mut cache = SeqKvCache::new(m.model.num_layers(), m.context_length);
            let t = Instant::now();
            for &tok in &toks {
                let h = m.model.forward(&Tensor::new(&[tok], &device)?, &mut cache)?;
                let _ = m.model.logits(&h)?.to_vec2::<f32>()?;
            }
            if r > 0 {
                samples.push(tg as f64 / t.elapsed().as_secs_f64());
            }
        }
        out.push(stat(format!("tg{tg}"), samples));
    }
    Ok(out)
}

/// Run llama.cpp's `llama-bench` on the same GGUF and return its pp/tg rows.
pub fn run_llama_bench(bin: &Path, gguf: &Path, pp: usize, tg: usize, reps: usize, threads: usize) -> Result<Vec<Stat>> {
    let output = Command::new(bin)
        .args(["-m", &gguf.to_string_lossy(), "-p", &pp.to_string(), "-n", &tg.to_string()])
        .args(["-r", &reps.to_string(), "-t", &threads.to_string(), "-o", "json"])
        .output()
        .map_err(|e| Error::io(bin, e))?;
    if !output.status.success() {
        return Err(Error::InvalidArgument(format!(
            "{} failed: {}",
            bin.display(),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let v: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| Error::InvalidArgument(format!("cannot parse llama-bench JSON: {e}")))?;
    let mut out = Vec::new();
    for row in v.as_array().into_iter().flatten() {
        let n_prompt = row["n_prompt"].as_u64().unwrap_or(0);
        let n_gen = row["n_gen"].as_u64().unwrap_or(0);
        let test = if n_prompt > 0 { format!("pp{n_prompt}") } else { format!("tg{n_gen}") };
        let samples: Vec<f64> = row["samples_ts"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default();
        let mut s = stat(test, samples);
        if let (Some(avg), Some(sd)) = (row["avg_ts"].as_f64(), row["stddev_ts"].as_f64()) {
            s.tok_per_s = avg;
            s.stddev = sd;
        }
        out.push(s);
    }
    Ok(out)
}
