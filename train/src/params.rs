//! Making a loaded model trainable: LoRA adapters on the targeted linear layers (base
//! frozen), or every weight a variable (full fine-tuning).
use candle_core::{DType, Tensor, Var};
use hromada_models::linear::{LoraAdapter, Weight};
use hromada_models::lora::{LoraConfig, TargetModules};
use hromada_models::model::Model;
use hromada_models::sampling::Rng;

use crate::config::LoraSection;
use crate::error::{Error, Result};
use crate::optim::{decays, Param};

/// The short names of a model's linear layers (`q_proj`, ...), for messages.
fn module_kinds(model: &mut Model) -> Vec<String> {
    let mut k: Vec<String> = model.linears_mut().into_iter().filter_map(|(n, _)| n.rsplit('.').next().map(String::from)).collect();
    k.sort();
    k.dedup();
    k
}

pub fn lora_config(s: &LoraSection) -> LoraConfig {
    LoraConfig {
        r: s.rank,
        alpha: s.alpha,
        dropout: s.dropout,
        target_modules: TargetModules::List(s.target_modules.clone()),
        use_rslora: s.use_rslora,
        rank_pattern: vec![],
        alpha_pattern: vec![],
    }
}

/// Attach PEFT-initialised adapters to every targeted linear layer. Layers kept in
/// candle's quantized format (no backward pass) are dequantized first; hromada's own
/// quantized kernels stay quantized and pass gradients through.
pub fn attach_lora(model: &mut Model, s: &LoraSection, seed: u64, config_path: &std::path::Path) -> Result<(LoraConfig, Vec<Param>)> {
    let kinds = module_kinds(model);
    let mut targets = s.target_modules.clone();
    if targets.iter().any(|t| t == "all-linear") {
        targets = kinds.clone();
    }
    let names: Vec<String> = model.linears_mut().into_iter().map(|(n, _)| n).collect();
    for t in &targets {
        if !names.iter().any(|n| TargetModules::List(vec![t.clone()]).matches(n)) {
            return Err(Error::config(config_path, format!("lora.target_modules: `{t}` is not a linear layer of this model (it has: {})", kinds.join(", "))));
        }
    }
    let cfg = lora_config(&LoraSection { target_modules: targets, ..s.clone() });
    let mut rng = Rng::new(seed);
    let mut params = Vec::new();
    let dev = model.device().clone();
    let master = master_dtype(model);
    for (name, lin) in model.linears_mut() {
        if !cfg.target_modules.matches(&name) {
            continue;
        }
        if let Weight::Quantized(..) = lin.weight() {
            let w = lin.dense_weight(DType::F32)?;
            lin.set_weight(w)?;
        }
        let mut l = LoraAdapter::init_peft(lin.in_dim(), lin.out_dim(), cfg.rank_for(&name), cfg.alpha, s.dropout, master, &dev, &mut rng)?;
        l.scale = cfg.scale_for(&name);
        let a = Var::from_tensor(&l.a)?;
        let b = Var::from_tensor(&l.b)?;
        l.a = a.as_tensor().clone();
        l.b = b.as_tensor().clone();
        l.training = true;
        lin.set_lora(Some(l));
        params.push(Param { name: format!("{name}.lora_A"), var: a, decay: true });
        params.push(Param { name: format!("{name}.lora_B"), var: b, decay: true });
    }
    Ok((cfg, params))
}

/// Set every adapter's training flag and the dropout seed of the coming forward pass.
pub fn set_lora_mode(model: &mut Model, training: bool, seed: u64) {
    for (i, (_, lin)) in model.linears_mut().into_iter().enumerate() {
        if let Some(l) = lin.lora() {
            let mut l = l.clone();
            l.training = training;
            l.dropout_seed = seed.wrapping_mul(0x9E37_79B9).wrapping_add(i as u64);
            lin.set_lora(Some(l));
        }
    }
}

/// Trainable weights are f32 (master weights), or f64 for a model loaded in f64
/// (gradient checks).
pub fn master_dtype(model: &Model) -> DType {
    if model.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Full fine-tuning: every weight becomes an f32 variable named as in the HF checkpoint.
/// Tied output heads share the embedding's variable. Needs dense weights.
pub fn full_params(model: &mut Model) -> Result<Vec<Param>> {
    let master = master_dtype(model);
    let var = |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(master)?)?) };
    let mut out = Vec::new();
    let mut push = |name: String, v: &Var| out.push(Param { decay: decays(&name), name, var: v.clone() });
    macro_rules! lin {
        ($name:expr, $l:expr) => {{
            let name: String = $name;
            if $l.is_quantized() {
                return Err(Error::Other(format!("{name} is quantized: full fine-tuning needs model.dtype = f32")));
            }
            let v = var(&$l.dense_weight(master)?)?;
            $l.set_weight(v.as_tensor().clone())?;
            push(format!("{name}.weight"), &v);
            if let Some(b) = $l.bias() {
                let vb = var(b)?;
                $l.set_bias(Some(vb.as_tensor().clone()));
                push(format!("{name}.bias"), &vb);
            }
        }};
    }
    match model {
        Model::Llama(m) => {
            let e = var(&m.embed_tokens)?;
            m.embed_tokens = e.as_tensor().clone();
            push("model.embed_tokens.weight".into(), &e);
            if m.cfg.tie_word_embeddings {
                m.lm_head.set_weight(e.as_tensor().clone())?;
            } else {
                lin!("lm_head".to_string(), m.lm_head);
            }
            for (i, l) in m.layers.iter_mut().enumerate() {
                let p = format!("model.layers.{i}");
                for (n, norm) in [("input_layernorm", &mut l.input_layernorm), ("post_attention_layernorm", &mut l.post_attention_layernorm)] {
                    let v = var(&norm.weight)?;
                    norm.weight = v.as_tensor().clone();
                    push(format!("{p}.{n}.weight"), &v);
                }
                lin!(format!("{p}.self_attn.q_proj"), l.self_attn.q_proj);
                lin!(format!("{p}.self_attn.k_proj"), l.self_attn.k_proj);
                lin!(format!("{p}.self_attn.v_proj"), l.self_attn.v_proj);
                lin!(format!("{p}.self_attn.o_proj"), l.self_attn.o_proj);
                lin!(format!("{p}.mlp.gate_proj"), l.mlp.gate_proj);
                lin!(format!("{p}.mlp.up_proj"), l.mlp.up_proj);
                lin!(format!("{p}.mlp.down_proj"), l.mlp.down_proj);
            }
            let v = var(&m.norm.weight)?;
            m.norm.weight = v.as_tensor().clone();
            push("model.norm.weight".into(), &v);
        }
        Model::Gemma3(m) => {
            let e = var(&m.embed_tokens)?;
            m.embed_tokens = e.as_tensor().clone();
            push("model.embed_tokens.weight".into(), &e);
            m.lm_head.set_weight(e.as_tensor().clone())?;
            for (i, l) in m.layers.iter_mut().enumerate() {
                let p = format!("model.layers.{i}");
                // Gemma's norms hold `1 + w`; the variable is that sum (same gradient as `w`;
                // norms get no weight decay, so the offset never matters).
                for (n, norm) in [
                    ("input_layernorm", &mut l.input_layernorm),
                    ("self_attn.q_norm", &mut l.q_norm),
                    ("self_attn.k_norm", &mut l.k_norm),
                    ("post_attention_layernorm", &mut l.post_attention_layernorm),
                    ("pre_feedforward_layernorm", &mut l.pre_feedforward_layernorm),
                    ("post_feedforward_layernorm", &mut l.post_feedforward_layernorm),
                ] {
                    let v = var(&norm.weight)?;
                    norm.weight = v.as_tensor().clone();
                    push(format!("{p}.{n}.weight"), &v);
                }
                lin!(format!("{p}.self_attn.q_proj"), l.q_proj);
                lin!(format!("{p}.self_attn.k_proj"), l.k_proj);
                lin!(format!("{p}.self_attn.v_proj"), l.v_proj);
                lin!(format!("{p}.self_attn.o_proj"), l.o_proj);
                lin!(format!("{p}.mlp.gate_proj"), l.gate_proj);
                lin!(format!("{p}.mlp.up_proj"), l.up_proj);
                lin!(format!("{p}.mlp.down_proj"), l.down_proj);
            }
            let v = var(&m.norm.weight)?;
            m.norm.weight = v.as_tensor().clone();
            push("model.norm.weight".into(), &v);
        }
    }
    Ok(out)
}

/// Mixed precision with LoRA: the frozen dense base weights are stored in `dtype` (as
/// PEFT users load the base in bf16), while LoRA's A and B stay f32 master weights.
/// Quantized base weights stay as they are. Returns how many layers were cast.
pub fn cast_frozen_base(model: &mut Model, dtype: DType) -> Result<usize> {
    let mut n = 0;
    for (_, lin) in model.linears_mut() {
        if let Weight::Dense(w) = lin.weight() {
            if w.dtype() != dtype {
                let w = w.to_dtype(dtype)?;
                lin.set_weight(w)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The compute dtype `run.mixed_precision` asks for (None: compute in the weights' dtype).
pub fn mixed_precision_dtype(mode: &str) -> Option<DType> {
    match mode {
        "bf16" => Some(DType::BF16),
        "fp16" => Some(DType::F16),
        _ => None,
    }
}

/// Apply `run.mixed_precision` to a model whose trainable parameters are attached: the
/// forward/backward compute dtype, and for LoRA a frozen base in that dtype.
pub fn apply_mixed_precision(model: &mut Model, mode: &str, lora: bool) -> Result<()> {
    if let Some(dt) = mixed_precision_dtype(mode) {
        if lora {
            cast_frozen_base(model, dt)?;
        }
        model.set_compute_dtype(dt);
    }
    Ok(())
}
