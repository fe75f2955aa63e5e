//! Gradients: every trainable parameter kind against finite differences (f64, tiny random
//! model), gradient accumulation equal to one big batch, and gradients through a
//! quantized GGUF base (QLoRA-style).
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use hromada_models::config::LlamaConfig;
use hromada_models::llama::Llama;
use hromada_models::model::Model;
use hromada_models::weights::WeightSource;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};
use hromada_train::config::LoraSection;
use hromada_train::data::{Row, Sample};
use hromada_train::optim::Param;
use hromada_train::{params, recipe};

#[path = "../../tests/support/tmpdir.rs"]
mod tmpdir;

fn tmpdir(name: &str) -> tmpdir::TmpDir {
    tmpdir::tmpdir(&format!("train-{name}"))
}

/// A tiny qwen2-type model (Q/K/V biases, tied embeddings) in f64, real SmolLM2 tokenizer.
fn tiny_f64(name: &str) -> Model {
    let dir = tmpdir(name);
    let tok = hromada_models::model::load_tokenizer("smollm2-135m").expect("run scripts/setup.sh first");
    hromada_models::testing::write_tiny(&dir, &tok.json, 300, 16, 2, "qwen2", serde_json::json!({})).unwrap();
    let cfg_path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let cfg = LlamaConfig::from_hf_json(&v, &cfg_path).unwrap();
    let ws = WeightSource::safetensors_dir(&dir, DType::F64, &Device::Cpu).unwrap();
    Model::Llama(Box::new(Llama::load(cfg, &ws).unwrap()))
}

fn rows(seed: u64, vocab: u32) -> Vec<Row> {
    let mut rng = hromada_models::sampling::Rng::new(seed);
    let mut s = |n: usize, trained_from: usize| {
        let ids: Vec<u32> = (0..n).map(|_| (rng.next_u64() % vocab as u64) as u32).collect();
        let mask: Vec<bool> = (0..n).map(|i| i >= trained_from).collect();
        Sample::from_mask(ids, &mask)
    };
    vec![Row { samples: vec![s(7, 3), s(5, 0)] }, Row { samples: vec![s(11, 6)] }]
}

fn mean_loss(model: &Model, rows: &[Row]) -> f64 {
    let refs: Vec<&Row> = rows.iter().collect();
    let (l, k) = recipe::loss_sum(model, &refs, true).unwrap();
    l.to_scalar::<f64>().unwrap() / k as f64
}

fn set_elem(v: &Var, i: usize, x: f64) {
    let t = v.as_tensor();
    let mut data = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    data[i] = x;
    v.set(&Tensor::from_vec(data, t.shape(), t.device()).unwrap()).unwrap();
}

/// Central differences on `picks` elements of each parameter against backprop.
fn check(model: &Model, params: &[Param], rows: &[Row], picks: usize) -> usize {
    let refs: Vec<&Row> = rows.iter().collect();
    let (_, grads, _) = recipe::step_grads(model, params, &[refs]).unwrap();
    let mut rng = hromada_models::sampling::Rng::new(3);
    let mut checked = 0;
    for p in params {
        let g = grads.get(&p.name).unwrap_or_else(|| panic!("no gradient for {}", p.name));
        let g = g.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let n = p.var.elem_count();
        for _ in 0..picks.min(n) {
            let i = (rng.next_u64() % n as u64) as usize;
            let x0 = p.var.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap()[i];
            let h = 1e-5;
            set_elem(&p.var, i, x0 + h);
            let lp = mean_loss(model, rows);
            set_elem(&p.var, i, x0 - h);
            let lm = mean_loss(model, rows);
            set_elem(&p.var, i, x0);
            let fd = (lp - lm) / (2.0 * h);
            let err = (fd - g[i]).abs();
            assert!(err <= 1e-7 + 1e-5 * fd.abs().max(g[i].abs()), "{}[{i}]: backprop {} vs finite differences {fd} (|diff| {err:e})", p.name, g[i]);
            checked += 1;
        }
    }
    checked
}

#[test]
fn full_fine_tuning_gradients_match_finite_differences() {
    let mut m = tiny_f64("gradfull");
    let ps = params::full_params(&mut m).unwrap();
    let kinds = ["model.embed_tokens.weight", "input_layernorm.weight", "q_proj.weight", "q_proj.bias", "k_proj.bias", "down_proj.weight", "model.norm.weight"];
    for k in kinds {
        assert!(ps.iter().any(|p| p.name.ends_with(k)), "no trainable parameter of kind {k}");
    }
    let rows = rows(1, 300);
    assert!(check(&m, &ps, &rows, 3) >= ps.len() * 3);
}

#[test]
fn lora_gradients_match_finite_differences() {
    let mut m = tiny_f64("gradlora");
    let cfg = LoraSection { rank: 4, alpha: 8.0, target_modules: vec!["all-linear".into()], ..LoraSection::default() };
    let (_, ps) = params::attach_lora(&mut m, &cfg, 5, std::path::Path::new("test")).unwrap();
    // B starts at zero (PEFT), which makes A's gradient zero: give B values to test A too.
    let mut rng = hromada_models::sampling::Rng::new(9);
    for p in ps.iter().filter(|p| p.name.ends_with("lora_B")) {
        let n = p.var.elem_count();
        let v: Vec<f64> = (0..n).map(|_| rng.next_f64() - 0.5).collect();
        p.var.set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap()).unwrap();
    }
    assert_eq!(ps.len(), 2 * 7 * 2, "A and B on 7 linear layers of 2 blocks");
    let rows = rows(2, 300);
    assert!(check(&m, &ps, &rows, 2) > 0);
}

#[test]
fn k_micro_batches_equal_one_batch_of_k() {
    let mut m = tiny_f64("accum");
    let ps = params::full_params(&mut m).unwrap();
    let rows = rows(4, 300);
    // Very different target counts per row: a per-micro-batch mean would weight them wrongly.
    assert_ne!(rows[0].n_targets(), rows[1].n_targets());
    let (l1, g1, n1) = recipe::step_grads(&m, &ps, &[vec![&rows[0], &rows[1]]]).unwrap();
    let (l2, g2, n2) = recipe::step_grads(&m, &ps, &[vec![&rows[0]], vec![&rows[1]]]).unwrap();
    assert_eq!(n1, n2);
    assert!((l1 - l2).abs() < 1e-12, "loss {l1} vs {l2}");
    let mut worst = 0f64;
    for p in &ps {
        let a = g1[&p.name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = g2[&p.name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / (1e-12 + x.abs().max(y.abs())));
        }
    }
    assert!(worst < 1e-9, "accumulated gradients differ from the one-batch gradients (rel {worst:e})");
    // The 2024 bug (mean of per-micro-batch means) gives another loss here: the test bites.
    let per_mb: Vec<f64> = rows.iter().map(|r| mean_loss(&m, std::slice::from_ref(r))).collect();
    let buggy = (per_mb[0] + per_mb[1]) / 2.0;
    assert!((buggy - l1).abs() > 1e-4, "the rows are too alike for this test to detect the bug");
}

#[test]
fn lora_on_a_quantized_gguf_base_gets_gradients_through_the_frozen_layers() {
    let q = LoadedModel::load("smollm2-135m", &LoadOptions { dtype: DTypeChoice::Quantized, ..Default::default() }).expect("run scripts/setup.sh first");
    let d = LoadedModel::load("smollm2-135m", &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap();
    let cfg = LoraSection { rank: 4, alpha: 8.0, target_modules: vec!["q_proj".into(), "v_proj".into()], ..LoraSection::default() };
    let ids: Vec<u32> = q.tokenizer.encode("Київ — столиця України, найбільше місто країни.", false).unwrap();
    let sample = Sample::from_mask(ids.clone(), &vec![true; ids.len()]);
    let row = Row { samples: vec![sample] };
    let grads_of = |mut m: Model| -> HashMap<String, Tensor> {
        let (_, ps) = params::attach_lora(&mut m, &cfg, 1, std::path::Path::new("test")).unwrap();
        let (_, g, _) = recipe::step_grads(&m, &ps, &[vec![&row]]).unwrap();
        g
    };
    let gq = grads_of(q.model);
    let gd = grads_of(d.model);
    // Layer 0's B gradient exists only if it flowed back through 29 frozen quantized blocks.
    let name = "model.layers.0.self_attn.q_proj.lora_B";
    let a = gq[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = gd[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    assert!(na > 0.0 && na.is_finite(), "no gradient reached layer 0 through the quantized base");
    // Same direction as through the dequantized (f32) base: quantization error only.
    let cos: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>() / (na * nb);
    assert!(cos > 0.9, "gradient through the quantized base points elsewhere (cosine {cos})");
}

#[test]
fn activation_checkpointing_gives_the_same_gradients() {
    let mut m = tiny_f64("recompute");
    let ps = params::full_params(&mut m).unwrap();
    let rows = rows(6, 300);
    let mbs = [vec![&rows[0]], vec![&rows[1]]];
    let (l1, g1, n1) = recipe::step_grads_with(&m, &ps, &mbs, false).unwrap();
    let (l2, g2, n2) = recipe::step_grads_with(&m, &ps, &mbs, true).unwrap();
    assert_eq!(n1, n2);
    assert!((l1 - l2).abs() < 1e-12, "loss {l1} vs {l2}");
    assert_eq!(g1.len(), g2.len());
    for p in &ps {
        let a = g1[&p.name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let b = g2[&p.name].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs() / (1e-12 + x.abs().max(y.abs()))).fold(0f64, f64::max);
        assert!(worst < 1e-9, "{}: recomputed gradient differs (rel {worst:e})", p.name);
    }
}

/// A tiny Gemma 3 in f64 (sliding and global layers, q/k norms, soft-capped logits).
fn tiny_gemma3_f64(name: &str) -> Model {
    let dir = tmpdir(name);
    let tok = hromada_models::model::load_tokenizer("smollm2-135m").expect("run scripts/setup.sh first");
    hromada_models::testing::write_tiny_gemma3(&dir, &tok.json, 300, 16, 2).unwrap();
    let cfg_path = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let cfg = hromada_models::gemma3::Gemma3Config::from_hf_json(&v, &cfg_path).unwrap();
    let ws = WeightSource::safetensors_dir(&dir, DType::F64, &Device::Cpu).unwrap();
    Model::Gemma3(Box::new(hromada_models::gemma3::Gemma3::load(cfg, &ws, false).unwrap()))
}

#[test]
fn gemma3_full_and_lora_gradients_match_finite_differences() {
    let mut m = tiny_gemma3_f64("gemmafull");
    let ps = params::full_params(&mut m).unwrap();
    for k in ["self_attn.q_norm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "mlp.gate_proj.weight", "model.embed_tokens.weight"] {
        assert!(ps.iter().any(|p| p.name.ends_with(k)), "no trainable parameter of kind {k}");
    }
    // Rows longer than the sliding window (4) so both attention kinds matter.
    let rows = rows(8, 300);
    assert!(check(&m, &ps, &rows, 2) >= ps.len() * 2);
    let mut m = tiny_gemma3_f64("gemmalora");
    let cfg = LoraSection { rank: 2, alpha: 4.0, target_modules: vec!["all-linear".into()], ..LoraSection::default() };
    let (_, ps) = params::attach_lora(&mut m, &cfg, 5, std::path::Path::new("test")).unwrap();
    for p in ps.iter().filter(|p| p.name.ends_with("lora_B")) {
        let v = Tensor::ones(p.var.shape(), DType::F64, &Device::Cpu).unwrap();
        p.var.set(&(v * 0.1).unwrap()).unwrap();
    }
    assert!(check(&m, &ps, &rows, 1) > 0);
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[test]
fn bf16_mixed_precision_follows_f32_with_f32_master_weights() {
    // LoRA on the real SmolLM2: the base frozen in bf16, compute in bf16, A/B and their
    // gradients f32; loss and gradient directions as in an all-f32 step.
    let load = || LoadedModel::load("smollm2-135m", &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).expect("run scripts/setup.sh first").model;
    let (mut a, mut b) = (load(), load());
    let cfg = LoraSection { rank: 8, alpha: 16.0, target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()], ..LoraSection::default() };
    let tok = hromada_models::model::load_tokenizer("smollm2-135m").unwrap();
    let ids = tok.encode("Статтю 5 Закону України «Про звернення громадян» застосовують до всіх органів влади.", false).unwrap();
    let row = Row { samples: vec![Sample::from_mask(ids.clone(), &vec![true; ids.len()])] };
    let mut grads = Vec::new();
    for (m, mixed) in [(&mut a, false), (&mut b, true)] {
        let (_, ps) = params::attach_lora(m, &cfg, 3, std::path::Path::new("test")).unwrap();
        let mut rng = hromada_models::sampling::Rng::new(11);
        for p in ps.iter().filter(|p| p.name.ends_with("lora_B")) {
            let v: Vec<f32> = (0..p.var.elem_count()).map(|_| (rng.next_f64() as f32 - 0.5) * 0.02).collect();
            p.var.set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap()).unwrap();
        }
        if mixed {
            params::apply_mixed_precision(m, "bf16", true).unwrap();
            let bases: Vec<DType> = m.linears_mut().into_iter().filter_map(|(_, l)| match l.weight() {
                hromada_models::linear::Weight::Dense(w) => Some(w.dtype()),
                _ => None,
            }).collect();
            assert!(bases.iter().all(|d| *d == DType::BF16), "frozen base not in bf16");
        }
        assert!(ps.iter().all(|p| p.var.dtype() == DType::F32), "master weights must stay f32");
        let (loss, g, _) = recipe::step_grads(m, &ps, &[vec![&row]]).unwrap();
        grads.push((loss, g, ps));
    }
    let (l32, g32, ps) = &grads[0];
    let (l16, g16, _) = &grads[1];
    assert!(l16.is_finite() && (l16 - l32).abs() / l32 < 0.02, "bf16 loss {l16} vs f32 {l32}");
    assert!(l16 != l32, "the bf16 step computed exactly the f32 loss: was bf16 used at all?");
    let mut cs = Vec::new();
    for p in ps {
        assert_eq!(g16[&p.name].dtype(), DType::F32, "{}: gradient of a master weight must be f32", p.name);
        cs.push((cosine(&g32[&p.name], &g16[&p.name]), p.name.clone()));
    }
    // bf16 rounds every activation to 8 mantissa bits, and how the CPU's bf16 matmul
    // rounds differs between machines (0.947 was the worst single gradient on an AVX-512
    // BF16 machine): every gradient points the same way (> 0.9), and on the whole closely.
    cs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mean = cs.iter().map(|c| c.0).sum::<f64>() / cs.len() as f64;
    eprintln!("bf16 vs f32 gradient cosines: mean {mean:.4}, worst {:?}", &cs[..3.min(cs.len())]);
    assert!(cs[0].0 > 0.9, "{}: bf16 gradient direction differs (cosine {})", cs[0].1, cs[0].0);
    assert!(mean > 0.98, "mean bf16 gradient cosine {mean}");
}

#[test]
fn bf16_mixed_precision_full_fine_tuning_keeps_master_weights() {
    let (mut a, mut b) = (tiny_f64("mp32"), tiny_f64("mp16"));
    let pa = params::full_params(&mut a).unwrap();
    let pb = params::full_params(&mut b).unwrap();
    params::apply_mixed_precision(&mut b, "bf16", false).unwrap();
    let rows = rows(8, 300);
    let mbs = [vec![&rows[0], &rows[1]]];
    let (l1, g1, _) = recipe::step_grads(&a, &pa, &mbs).unwrap();
    let (l2, g2, _) = recipe::step_grads(&b, &pb, &mbs).unwrap();
    assert!((l1 - l2).abs() / l1 < 0.02 && l1 != l2, "bf16 loss {l2} vs {l1}");
    let mut worst = 1f64;
    for p in &pb {
        assert_eq!(p.var.dtype(), DType::F64);
        assert_eq!(g2[&p.name].dtype(), DType::F64, "{}: master gradient dtype", p.name);
        worst = worst.min(cosine(&g1[&p.name], &g2[&p.name]));
    }
    assert!(worst > 0.9, "a bf16 gradient points elsewhere (worst cosine {worst})");
}
