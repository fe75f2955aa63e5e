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
    hromada_models::device::cuda(0).unwrap_or_else(|e| panic!("these tests need a CUDA GPU (cuda:0): {e}"))
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
/// GPU in f32 identical at >= 99% of positions (the bar; measured on an H200:
/// 286/286); in bf16, whose activations keep 8 bits of mantissa, at >= 92%, the golden
/// README's figure for reduced-precision compute (llama.cpp's quantized path agrees at
/// 92-93%; the CPU's Q4_1 path is held to the same bar; measured on an H200: 93.7%).
#[test]
fn gpu_and_cpu_argmax_agree_on_the_golden_prompts() {
    let cpu = model(&Device::Cpu, DTypeChoice::F32);
    for (dtype, need) in [(DTypeChoice::F32, 0.99), (DTypeChoice::BF16, 0.92)] {
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

/// ‖a − b‖ / ‖b‖ over two tensors of one shape (any devices, any float dtypes).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_device(&Device::Cpu).unwrap().to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let (a, b) = (f(a), f(b));
    assert_eq!(a.len(), b.len(), "shapes differ");
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// The building blocks of the forward pass, one at a time, on the GPU against the CPU
/// (f32, fresh random inputs at the model's shapes, 1 to 1000 rows): the embedding
/// lookup, RMSNorm, a dense projection, RoPE, the gated activation, the residual add,
/// dense causal attention with grouped heads, and log-softmax with a gather. A failure
/// names the operation and the row count.
#[test]
fn gpu_ops_match_cpu() {
    use hromada_models::cache::dense_attention;
    use hromada_models::kernels::ops;
    let dev = gpu();
    let mut rng = Rng(99);
    let (hidden, inter, vocab, h, n_kv, d) = (576usize, 1536usize, 49152usize, 9usize, 3usize, 64usize);
    let both = |v: Vec<f32>, shape: &[usize]| -> (Tensor, Tensor) {
        let c = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        let g = c.to_device(&dev).unwrap();
        (c, g)
    };
    let emb = both(rng.vec(vocab * hidden), &[vocab, hidden]);
    let w = both(rng.vec(inter * hidden), &[inter, hidden]);
    let norm_w = both(rng.vec(hidden), &[hidden]);
    let mut failures = Vec::new();
    let mut check = |what: &str, n: usize, g: &Tensor, c: &Tensor| {
        let r = rel_diff(g, c);
        println!("{what:<28} n={n:<5} rel {r:.3e}");
        if !(r <= 1e-5) {
            failures.push(format!("{what} at n={n}: rel {r:e}"));
        }
    };
    for n in [1usize, 7, 130, 1000] {
        let ids: Vec<u32> = (0..n).map(|_| ((rng.next() + 1.0) * 0.5 * (vocab - 1) as f32) as u32).collect();
        let (ic, ig) = (Tensor::new(ids.as_slice(), &Device::Cpu).unwrap(), Tensor::new(ids.as_slice(), &dev).unwrap());
        check("embedding index_select", n, &emb.1.index_select(&ig, 0).unwrap(), &emb.0.index_select(&ic, 0).unwrap());
        let x = both(rng.vec(n * hidden), &[n, hidden]);
        check("rms_norm", n, &ops::rms_norm(&x.1, &norm_w.1, 1e-5).unwrap(), &ops::rms_norm(&x.0, &norm_w.0, 1e-5).unwrap());
        check("x · wᵀ", n, &x.1.matmul(&w.1.t().unwrap()).unwrap(), &x.0.matmul(&w.0.t().unwrap()).unwrap());
        let y = both(rng.vec(n * hidden), &[n, hidden]);
        check("add", n, &ops::add(&x.1, &y.1).unwrap(), &ops::add(&x.0, &y.0).unwrap());
        let gate = both(rng.vec(n * inter), &[n, inter]);
        let up = both(rng.vec(n * inter), &[n, inter]);
        check("silu_mul", n, &ops::silu_mul(&gate.1, &up.1).unwrap(), &ops::silu_mul(&gate.0, &up.0).unwrap());
        let q = both(rng.vec(n * h * d), &[n, h, d]);
        let cs = both(rng.vec(n * d / 2), &[n, d / 2]);
        let sn = both(rng.vec(n * d / 2), &[n, d / 2]);
        check("rope", n, &ops::rope(&q.1, &cs.1, &sn.1).unwrap(), &ops::rope(&q.0, &cs.0, &sn.0).unwrap());
        let k = both(rng.vec(n_kv * n * d), &[n_kv, n, d]);
        let v = both(rng.vec(n_kv * n * d), &[n_kv, n, d]);
        let p = AttnParams { n_heads: h, n_kv_heads: n_kv, head_dim: d, scale: 0.125, sliding_window: None, softcap: None };
        check("dense_attention", n, &dense_attention(&q.1, &k.1, &v.1, 0, &p, false).unwrap(), &dense_attention(&q.0, &k.0, &v.0, 0, &p, false).unwrap());
        let logits = both(rng.vec(n * 4096).iter().map(|x| x * 8.0).collect(), &[n, 4096]);
        let lsm_g = candle_nn::ops::log_softmax(&logits.1, candle_core::D::Minus1).unwrap();
        let lsm_c = candle_nn::ops::log_softmax(&logits.0, candle_core::D::Minus1).unwrap();
        check("log_softmax", n, &lsm_g, &lsm_c);
        let tg: Vec<u32> = (0..n as u32).map(|i| (i * 37) % 4096).collect();
        let (tc, tgg) = (Tensor::from_vec(tg.clone(), (n, 1), &Device::Cpu).unwrap(), Tensor::from_vec(tg, (n, 1), &dev).unwrap());
        check("gather", n, &lsm_g.gather(&tgg, 1).unwrap(), &lsm_c.gather(&tc, 1).unwrap());
        let am_g = lsm_g.argmax(candle_core::D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        let am_c = lsm_c.argmax(candle_core::D::Minus1).unwrap().to_vec1::<u32>().unwrap();
        let same = am_g.iter().zip(&am_c).filter(|(a, b)| a == b).count();
        // Rows whose argmax differs, as a "relative difference" of (1 + rows) against 1.
        check("argmax (rows differing)", n, &Tensor::new(&[(1 + n - same) as f32], &Device::Cpu).unwrap(), &Tensor::new(&[1f32], &Device::Cpu).unwrap());
    }
    assert!(failures.is_empty(), "GPU ops differ from the CPU: {failures:?}");
}

/// The f32 model's forward on the GPU, block by block and step by step inside each block,
/// against the CPU, each step fed the CPU's input: the first step that differs is the bug.
#[test]
fn gpu_forward_matches_cpu_step_by_step() {
    use hromada_models::cache::Segments;
    use hromada_models::kernels::ops;
    use hromada_models::linear::Linear;
    use hromada_models::llama::Rope;
    use hromada_models::model::Model;
    let cpu = model(&Device::Cpu, DTypeChoice::F32);
    let g = model(&gpu(), DTypeChoice::F32);
    let (Model::Llama(mc), Model::Llama(mg)) = (&cpu.model, &g.model) else { panic!("SmolLM2 is a Llama") };
    let ids: Vec<u32> = golden_prompts().concat();
    let n = ids.len();
    let dev = gpu();
    let up = |t: &Tensor| t.to_device(&dev).unwrap();
    let mut worst = Vec::new();
    let mut note = |what: String, gt: &Tensor, ct: &Tensor| {
        let r = rel_diff(gt, ct);
        if !(r <= 1e-5) || what.starts_with("layer 0 ") {
            println!("{what:<40} rel {r:.3e}");
        }
        if !(r <= 1e-5) {
            worst.push((what, r));
        }
    };
    let ic = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
    let ig = Tensor::new(ids.as_slice(), &dev).unwrap();
    let xc0 = mc.embed(&ic).unwrap();
    note("embed".into(), &mg.embed(&ig).unwrap(), &xc0);
    let (mut sc, mut sg) = (Segments::single(n, false), Segments::single(n, false));
    let ctx_c = mc.rope_ctx(n, &mut sc).unwrap();
    let ctx_g = mg.rope_ctx(n, &mut sg).unwrap();
    note("rope cos".into(), &ctx_g.global.0, &ctx_c.global.0);
    note("rope sin".into(), &ctx_g.global.1, &ctx_c.global.1);
    let mut x = xc0;
    for i in 0..mc.layers.len() {
        let (lc, lg) = (&mc.layers[i], &mg.layers[i]);
        let xg = up(&x);
        let hc = lc.input_layernorm.forward(&x, false).unwrap();
        note(format!("layer {i} input norm"), &lg.input_layernorm.forward(&xg, false).unwrap(), &hc);
        let hg = up(&hc);
        let (a, ag) = (&lc.self_attn, &lg.self_attn);
        let p = a.params;
        let qkv_c = Linear::forward_many_rows(&hc, &[&a.q_proj, &a.k_proj, &a.v_proj], &ctx_c.prompt_rows).unwrap();
        let qkv_g = Linear::forward_many_rows(&hg, &[&ag.q_proj, &ag.k_proj, &ag.v_proj], &ctx_g.prompt_rows).unwrap();
        for (j, name) in ["q", "k", "v"].iter().enumerate() {
            note(format!("layer {i} {name} projection"), &qkv_g[j], &qkv_c[j]);
        }
        let q = qkv_c[0].reshape((n, p.n_heads, p.head_dim)).unwrap();
        let k = qkv_c[1].reshape((n, p.n_kv_heads, p.head_dim)).unwrap();
        let v = qkv_c[2].reshape((n, p.n_kv_heads, p.head_dim)).unwrap();
        let qr = Rope::apply(&q, &ctx_c.global.0, &ctx_c.global.1, false).unwrap();
        let kr = Rope::apply(&k, &ctx_c.global.0, &ctx_c.global.1, false).unwrap();
        note(format!("layer {i} q rope"), &Rope::apply(&up(&q), &ctx_g.global.0, &ctx_g.global.1, false).unwrap(), &qr);
        use hromada_models::cache::KvCache;
        let oc = Segments::single(n, false).attend(i, &qr, &kr, &v, &p).unwrap();
        let og = Segments::single(n, false).attend(i, &up(&qr), &up(&kr), &up(&v), &p).unwrap();
        note(format!("layer {i} attention"), &og, &oc);
        let prc = a.o_proj.forward_rows(&oc, &ctx_c.prompt_rows).unwrap();
        note(format!("layer {i} o projection"), &ag.o_proj.forward_rows(&up(&oc), &ctx_g.prompt_rows).unwrap(), &prc);
        let x1 = ops::add(&x, &prc).unwrap();
        let h2 = lc.post_attention_layernorm.forward(&x1, false).unwrap();
        let guc = Linear::forward_glu_rows(&h2, &lc.mlp.gate_proj, &lc.mlp.up_proj, &ctx_c.prompt_rows, ops::Glu::Silu).unwrap();
        note(format!("layer {i} gated MLP"), &Linear::forward_glu_rows(&up(&h2), &lg.mlp.gate_proj, &lg.mlp.up_proj, &ctx_g.prompt_rows, ops::Glu::Silu).unwrap(), &guc);
        let dc = lc.mlp.down_proj.forward_rows(&guc, &ctx_c.prompt_rows).unwrap();
        note(format!("layer {i} down projection"), &lg.mlp.down_proj.forward_rows(&up(&guc), &ctx_g.prompt_rows).unwrap(), &dc);
        let out_c = ops::add(&x1, &dc).unwrap();
        // The whole block on each device from the same input.
        note(format!("layer {i} block"), &mg.block(i, &xg, &ctx_g, &mut Segments::single(n, false)).unwrap(), &mc.block(i, &x, &ctx_c, &mut Segments::single(n, false)).unwrap());
        x = out_c;
    }
    let lc = cpu.model.logits(&cpu.model.forward(&ic, &mut Segments::single(n, false)).unwrap()).unwrap();
    let lg = g.model.logits(&g.model.forward(&ig, &mut Segments::single(n, false)).unwrap()).unwrap();
    note("whole forward, logits".into(), &lg, &lc);
    let worst_list: Vec<String> = worst.iter().take(12).map(|(w, r)| format!("{w}: {r:.2e}")).collect();
    assert!(worst.is_empty(), "{} steps differ by more than 1e-5, first: {worst_list:?}", worst.len());
}
