//! GPU checks (build with `--features cuda`, run on a machine with a CUDA GPU: see
//! scripts/gpu-check.sh). Without a GPU these tests fail with a clear message rather than
//! pass without checking anything; CPU-only builds do not compile them at all.
#![cfg(feature = "cuda")]
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use hromada_models::cache::{AttnParams, KvCache};
use hromada_models::generate::all_logits;
use hromada_models::sampling::SamplingParams;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};
use hromada_serve::engine::{Engine, EngineConfig};
use hromada_serve::paged::{BatchSeq, PagedBatch, PagedKv};
use hromada_serve::scheduler::SchedulerConfig;

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU (cuda:0): {e}"))
}

/// A small deterministic generator (xorshift), values in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

/// Attention of one query against keys/values `0..=pos` (f64), the reference.
fn reference(q: &[f32], keys: &[Vec<f32>], vals: &[Vec<f32>], pos: usize, p: &AttnParams) -> Vec<f64> {
    let first = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
    let mut s: Vec<f64> = (first..=pos)
        .map(|j| {
            let dot: f64 = q.iter().zip(&keys[j]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * p.scale;
            p.softcap.map_or(dot, |c| (dot / c).tanh() * c)
        })
        .collect();
    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut sum = 0.0;
    for x in s.iter_mut() {
        *x = (*x - mx).exp();
        sum += *x;
    }
    let d = q.len();
    let mut out = vec![0f64; d];
    for (jj, j) in (first..=pos).enumerate() {
        for c in 0..d {
            out[c] += s[jj] / sum * vals[j][c] as f64;
        }
    }
    out
}

/// Sequences of different lengths: a first pass prefills part of each, a second pass mixes
/// the rest of some prefills with single decode tokens; both passes are checked on fresh
/// random inputs against the f64 reference, and against the CPU paged path.
/// `model_dtype` picks the cache: f32 for an f32 model (tolerance 1e-5 against f64, and
/// the CPU path to 1e-4), bf16 for a bf16 model (the 1e-2).
fn check_kernel(h: usize, n_kv: usize, d: usize, window: Option<usize>, softcap: Option<f64>, seed: u64, model_dtype: DType) {
    let dev = gpu();
    let mut rng = Rng(seed);
    let bs = 16;
    let num_blocks = 64;
    let p = AttnParams { n_heads: h, n_kv_heads: n_kv, head_dim: d, scale: 1.0 / (d as f64).sqrt(), sliding_window: window, softcap };
    let mut gkv = PagedKv::new(1, num_blocks, bs, n_kv, d, &dev, model_dtype).unwrap();
    let mut ckv = PagedKv::new(1, num_blocks, bs, n_kv, d, &Device::Cpu, DType::F32).unwrap();
    let (tol, cpu_tol) = if model_dtype == DType::F32 { (1e-5, 1e-4) } else { (1e-2, 0.1) };
    // (total length, first-pass length); blocks handed out in a scrambled order.
    let plan = [(70usize, 40usize), (5, 4), (33, 33), (129, 100), (17, 16)];
    let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
    free.swap(3, 40);
    free.swap(10, 20);
    let tables: Vec<Vec<u32>> = plan.iter().map(|(n, _)| (0..n.div_ceil(bs)).map(|_| free.pop().unwrap()).collect()).collect();
    let mut keys: Vec<Vec<Vec<f32>>> = plan.iter().map(|_| Vec::new()).collect();
    let mut vals = keys.clone();
    for pass in 0..2 {
        let mut seqs = Vec::new();
        let (mut qv, mut kv, mut vv) = (Vec::new(), Vec::new(), Vec::new());
        let mut toks = Vec::new();
        for (si, &(n, first)) in plan.iter().enumerate() {
            let (start, len) = if pass == 0 { (0, first) } else { (first, n - first) };
            if len == 0 {
                continue;
            }
            seqs.push(BatchSeq { start, len, table: tables[si].clone(), prompt_len: 0 });
            for i in 0..len {
                let (q, k, v) = (rng.vec(h * d), rng.vec(n_kv * d), rng.vec(n_kv * d));
                keys[si].push(k.clone());
                vals[si].push(v.clone());
                qv.extend_from_slice(&q);
                kv.extend_from_slice(&k);
                vv.extend_from_slice(&v);
                toks.push((si, start + i, q));
            }
        }
        let n = toks.len();
        let t = |x: &Vec<f32>, heads: usize, dv: &Device| Tensor::from_vec(x.clone(), (n, heads, d), dv).unwrap();
        let out_g = PagedBatch::new(&mut gkv, seqs.clone()).attend(0, &t(&qv, h, &dev), &t(&kv, n_kv, &dev), &t(&vv, n_kv, &dev), &p).unwrap();
        let out_c = PagedBatch::new(&mut ckv, seqs.clone()).attend(0, &t(&qv, h, &Device::Cpu), &t(&kv, n_kv, &Device::Cpu), &t(&vv, n_kv, &Device::Cpu), &p).unwrap();
        let g = out_g.to_device(&Device::Cpu).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let c = out_c.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(g.iter().all(|x| x.is_finite()), "non-finite output");
        let (mut num, mut den, mut cpu_diff) = (0f64, 0f64, 0f64);
        for (ti, (si, pos, q)) in toks.iter().enumerate() {
            for head in 0..h {
                let gk = head / (h / n_kv);
                let ks: Vec<Vec<f32>> = keys[*si].iter().map(|k| k[gk * d..(gk + 1) * d].to_vec()).collect();
                let vs: Vec<Vec<f32>> = vals[*si].iter().map(|v| v[gk * d..(gk + 1) * d].to_vec()).collect();
                let r = reference(&q[head * d..(head + 1) * d], &ks, &vs, *pos, &p);
                for col in 0..d {
                    let o = g[(ti * h + head) * d + col] as f64;
                    num += (o - r[col]).powi(2);
                    den += r[col].powi(2);
                    cpu_diff = cpu_diff.max((o - c[(ti * h + head) * d + col] as f64).abs());
                }
            }
        }
        let rel = (num / den).sqrt();
        println!("{model_dtype:?} cache, h={h} n_kv={n_kv} d={d} window={window:?} softcap={softcap:?} pass {pass}: rel {rel:e}, max |gpu-cpu| {cpu_diff:e}");
        assert!(rel <= tol, "{model_dtype:?} cache, h={h} n_kv={n_kv} d={d} window={window:?} softcap={softcap:?} pass {pass}: ||gpu-ref||/||ref|| = {rel:e}");
        assert!(cpu_diff <= cpu_tol, "GPU vs CPU paged attention differ by {cpu_diff}");
    }
}

#[test]
fn paged_attention_kernel_matches_f64_reference() {
    // SmolLM2 (9 heads over 3, dim 64), Gemma 3 270M (4 over 1, dim 256, sliding 512 and a
    // short window that bites), Llama-style 32 over 8 at 128, plain MHA, soft-capping.
    // Each in an f32 cache and in a bf16 cache (bf16/f16 models), fresh inputs each time.
    for (i, dt) in [DType::F32, DType::BF16].into_iter().enumerate() {
        let s = 10 * i as u64;
        check_kernel(9, 3, 64, None, None, s + 1, dt);
        check_kernel(4, 1, 256, Some(512), None, s + 2, dt);
        check_kernel(4, 1, 256, Some(24), None, s + 3, dt);
        check_kernel(32, 8, 128, None, None, s + 4, dt);
        check_kernel(8, 8, 80, None, Some(50.0), s + 5, dt);
    }
}

fn model(dev: &Device, dtype: DTypeChoice) -> Arc<LoadedModel> {
    let p = hromada_models::model::resolve("smollm2-135m").expect("the SmolLM2 GGUF (scripts/setup.sh, or HROMADA_MODELS)");
    Arc::new(LoadedModel::load(p.to_str().unwrap(), &LoadOptions { dtype, device: dev.clone() }).unwrap())
}

fn golden_prompts() -> Vec<Vec<u32>> {
    let shared = std::env::var("HROMADA_SHARED").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let p = shared.join("golden/smollm2-135m-instruct-reference.json");
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap();
    g["prompts"].as_array().unwrap().iter().map(|p| p["input_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { ignore_eos: true, ..SamplingParams::greedy(n) }
}

/// Next-token argmax at every position of every golden prompt against the CPU (f32): the
/// GPU in f32 identical at >= 99% of positions; in bf16 (a lossy dtype, as Q4_1 is on the
/// CPU) at >= 95%.
#[test]
fn gpu_and_cpu_argmax_agree_on_the_golden_prompts() {
    let cpu = model(&Device::Cpu, DTypeChoice::F32);
    for (dtype, need) in [(DTypeChoice::F32, 0.99), (DTypeChoice::BF16, 0.95)] {
        let g = model(&gpu(), dtype);
        let (mut same, mut total) = (0usize, 0usize);
        for ids in golden_prompts() {
            let a = all_logits(&cpu, &ids).unwrap();
            let b = all_logits(&g, &ids).unwrap().to_dtype(DType::F32).unwrap().to_device(&Device::Cpu).unwrap();
            let (am, bm) = (a.argmax(1).unwrap().to_vec1::<u32>().unwrap(), b.argmax(1).unwrap().to_vec1::<u32>().unwrap());
            same += am.iter().zip(&bm).filter(|(x, y)| x == y).count();
            total += am.len();
        }
        let share = same as f64 / total as f64;
        println!("GPU {dtype:?} vs CPU f32: argmax agrees at {same}/{total} positions ({:.2}%)", 100.0 * share);
        assert!(share >= need, "{dtype:?}: argmax agrees at {same}/{total} positions");
    }
}

/// 32 concurrent greedy requests of mixed prompt lengths on the GPU give exactly what the
/// same requests give one at a time (f32 weights).
#[test]
fn gpu_batching_invariance() {
    let m = model(&gpu(), DTypeChoice::F32);
    let base = golden_prompts();
    let prompts: Vec<Vec<u32>> = (0..32).map(|i| {
        let p = &base[i % base.len()];
        p[..p.len() - (i / base.len()) % p.len().max(1) / 2].to_vec()
    }).collect();
    let cfg = EngineConfig { block_size: 16, kv_cache_bytes: 256 << 20, scheduler: SchedulerConfig { max_num_seqs: 32, max_num_batched_tokens: 256 }, ..Default::default() };
    let mut e = Engine::new(m.clone(), cfg.clone()).unwrap();
    for (i, p) in prompts.iter().enumerate() {
        e.add(i as u64, p.clone(), greedy(16), 0).unwrap();
    }
    let all = e.run_to_completion().unwrap();
    assert_eq!(e.blocks.num_used(), 0);
    for (i, p) in prompts.iter().enumerate() {
        let mut solo = Engine::new(m.clone(), cfg.clone()).unwrap();
        solo.add(0, p.clone(), greedy(16), 0).unwrap();
        let alone = solo.run_to_completion().unwrap().remove(&0).unwrap();
        assert_eq!(all[&(i as u64)], alone, "request {i}: batched != alone on the GPU");
    }
}
