//! The model core's contracts beyond parity: the differentiable path computes the same
//! function as the fused one, packing and the KV cache change nothing, LoRA wraps any
//! linear layer (merged == wrapped, gradients reach the adapter), and the other Llama
//! family members (Qwen2 biases, Mistral sliding window) run.
mod common;

use candle_core::{DType, Device, Tensor, Var};
use hromada_models::cache::{KvCache, Segments, SeqKvCache};
use hromada_models::linear::LoraAdapter;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel, Model};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

fn forward(m: &LoadedModel, ids: &[u32], cache: &mut dyn KvCache) -> Tensor {
    let t = Tensor::new(ids, &Device::Cpu).unwrap();
    let h = m.model.forward(&t, cache).unwrap();
    m.model.logits(&h).unwrap()
}

fn smollm2_f32() -> LoadedModel {
    let p = common::model_path("smollm2-135m");
    LoadedModel::load(p.to_str().unwrap(), &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap()
}

#[test]
fn differentiable_path_packing_and_cache_agree_with_fused_full_forward() {
    let m = smollm2_f32();
    let a = m.tokenizer.encode("Верховна Рада України ухвалила закон", false).unwrap();
    let b = m.tokenizer.encode("The quick brown fox", false).unwrap();
    let fused = forward(&m, &a, &mut Segments::single(a.len(), false));
    let diff = forward(&m, &a, &mut Segments::single(a.len(), true));
    assert!(max_diff(&fused, &diff) < 1e-4, "differentiable path differs by {}", max_diff(&fused, &diff));
    // Two documents packed in one pass = each alone.
    let ab: Vec<u32> = a.iter().chain(&b).copied().collect();
    let packed = forward(&m, &ab, &mut Segments::new(vec![a.len(), b.len()], false));
    let fb = forward(&m, &b, &mut Segments::single(b.len(), false));
    assert!(max_diff(&packed.narrow(0, 0, a.len()).unwrap(), &fused) < 1e-4);
    assert!(max_diff(&packed.narrow(0, a.len(), b.len()).unwrap(), &fb) < 1e-4);
    // Prefill in chunks through the KV cache = one full pass.
    let mut cache = SeqKvCache::new(m.model.num_layers(), m.context_length);
    let c1 = forward(&m, &a[..3], &mut cache);
    let c2 = forward(&m, &a[3..], &mut cache);
    assert_eq!(cache.len(), a.len());
    let chunked = Tensor::cat(&[c1, c2], 0).unwrap();
    assert!(max_diff(&chunked, &fused) < 1e-4, "cache differs by {}", max_diff(&chunked, &fused));
}

#[test]
fn lora_wraps_linear_layers_merges_exactly_and_gets_gradients() {
    let mut m = smollm2_f32();
    let ids = m.tokenizer.encode("Київ — столиця", false).unwrap();
    let base = forward(&m, &ids, &mut Segments::single(ids.len(), false));
    let Model::Llama(l) = &mut m.model else { panic!("a Llama-family model") };
    let mut vars = Vec::new();
    let mut rng = hromada_models::sampling::Rng::new(11);
    for (name, lin) in l.linears_mut() {
        if !(name.ends_with("q_proj") || name.ends_with("v_proj")) {
            continue;
        }
        let r = 4;
        let av: Vec<f32> = (0..r * lin.in_dim()).map(|_| (rng.next_f64() - 0.5) as f32 * 0.1).collect();
        let bv: Vec<f32> = (0..lin.out_dim() * r).map(|_| (rng.next_f64() - 0.5) as f32 * 0.1).collect();
        let a = Var::from_tensor(&Tensor::from_vec(av, (r, lin.in_dim()), &Device::Cpu).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::from_vec(bv, (lin.out_dim(), r), &Device::Cpu).unwrap()).unwrap();
        lin.set_lora(Some(LoraAdapter { a: a.as_tensor().clone(), b: b.as_tensor().clone(), scale: 2.0, dropout: 0.0, training: false, dropout_seed: 0 }));
        vars.push((a, b));
    }
    let with_lora = forward(&m, &ids, &mut Segments::single(ids.len(), true));
    assert!(max_diff(&with_lora, &base) > 1e-3, "the adapter changes the output");
    // Gradients reach every adapter matrix through the differentiable path.
    let loss = with_lora.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (a, b) in &vars {
        for v in [a, b] {
            let g = grads.get(v.as_tensor()).expect("gradient for a LoRA matrix");
            assert!(g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        }
    }
    // Merging W + s·BA gives the same function (f32).
    let Model::Llama(l) = &mut m.model else { panic!("a Llama-family model") };
    for (_, lin) in l.linears_mut() {
        if lin.lora().is_some() {
            let w = lin.merged_weight(DType::F32).unwrap();
            lin.set_lora(None);
            lin.set_weight(w).unwrap();
        }
    }
    let merged = forward(&m, &ids, &mut Segments::single(ids.len(), false));
    assert!(max_diff(&merged, &with_lora) <= 1e-4, "merged differs by {}", max_diff(&merged, &with_lora));
}

fn tiny(name: &str, model_type: &str, extra: serde_json::Value) -> LoadedModel {
    let dir = common::tmpdir(name);
    let g = hromada_models::gguf::GgufFile::open(common::model_path("smollm2-135m")).unwrap();
    let tok = hromada_models::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    hromada_models::testing::write_tiny(&dir, &tok.json, tok.vocab_size(), 32, 2, model_type, extra).unwrap();
    LoadedModel::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap()
}

#[test]
fn qwen2_biases_are_used() {
    let q = tiny("qwen2", "qwen2", serde_json::json!({}));
    let Model::Llama(l) = &q.model else { panic!("a Llama-family model") };
    assert!(l.layers[0].self_attn.q_proj.bias().is_some() && l.cfg.attention_bias);
    let ids: Vec<u32> = (100..120).collect();
    let with_bias = forward(&q, &ids, &mut Segments::single(ids.len(), false));
    let mut q2 = q.clone();
    let Model::Llama(l) = &mut q2.model else { panic!("a Llama-family model") };
    for layer in l.layers.iter_mut() {
        layer.self_attn.q_proj.set_bias(None);
        layer.self_attn.k_proj.set_bias(None);
        layer.self_attn.v_proj.set_bias(None);
    }
    let without = forward(&q2, &ids, &mut Segments::single(ids.len(), false));
    assert!(max_diff(&with_bias, &without) > 1e-4);
}

#[test]
fn mistral_sliding_window_masks_old_keys_in_full_and_cached_passes() {
    let w = 4;
    let m = tiny("mistral", "mistral", serde_json::json!({"sliding_window": w}));
    let Model::Llama(l) = &m.model else { panic!("a Llama-family model") };
    assert_eq!(l.cfg.sliding_window, Some(w));
    let ids: Vec<u32> = (200..212).collect();
    let windowed = forward(&m, &ids, &mut Segments::single(ids.len(), false));
    let mut full = m.clone();
    let Model::Llama(l) = &mut full.model else { panic!("a Llama-family model") };
    for layer in l.layers.iter_mut() {
        layer.self_attn.params.sliding_window = None;
    }
    let unwindowed = forward(&full, &ids, &mut Segments::single(ids.len(), false));
    // Positions < w see every key either way; later ones must differ.
    assert!(max_diff(&windowed.narrow(0, 0, w).unwrap(), &unwindowed.narrow(0, 0, w).unwrap()) < 1e-6);
    for p in w..ids.len() {
        let d = max_diff(&windowed.narrow(0, p, 1).unwrap(), &unwindowed.narrow(0, p, 1).unwrap());
        assert!(d > 1e-6, "position {p} ignores the window");
    }
    // Token-by-token decode through the cache applies the same window.
    let mut cache = SeqKvCache::new(m.model.num_layers(), m.context_length);
    let rows: Vec<Tensor> = ids.iter().map(|&t| forward(&m, &[t], &mut cache)).collect();
    let stepped = Tensor::cat(&rows, 0).unwrap();
    assert!(max_diff(&stepped, &windowed) < 1e-5);
}
