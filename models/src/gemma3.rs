//! Gemma 3 (text): the base of Ukraine's national LLM and of MamayLM and Lapa.
//!
//! Differences from the Llama family, each as transformers' `Gemma3ForCausalLM` does it:
//! - embeddings scaled by sqrt(hidden_size), the scale cast to the model dtype first;
//! - RMSNorm computes `x * (1 + w)` in f32 (we keep the effective weight `1 + w`: GGUF
//!   stores it so, a HF checkpoint stores `w`), four norms per block (input,
//!   post-attention, pre- and post-feed-forward) and a per-head RMSNorm on Q and K;
//! - GELU with the tanh approximation, computed in f32;
//! - interleaved sliding-window (local) and global attention layers (`layer_types`, or
//!   every `sliding_window_pattern`-th layer global), each kind with its own RoPE
//!   (`rope_local_base_freq` on local layers, `rope_theta` with the rope scaling on
//!   global ones);
//! - attention scaled by `query_pre_attn_scalar^-1/2`, optional attention and final
//!   logit soft-capping; tied embeddings.
//!
//! The forward takes the same packed ids and [`KvCache`] as the Llama family, so the
//! server's paged cache, scoring and training run it unchanged.
use candle_core::{DType, Device, Module, Result, Tensor};
use serde_json::{json, Value};
use std::path::Path;

use crate::cache::{AttnParams, KvCache};
use crate::config::RopeScaling;
use crate::error::{Error, Result as HResult};
use crate::gguf::GgufFile;
use crate::linear::Linear;
use crate::llama::Rope;
use crate::weights::WeightSource;

#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    /// Global layers' RoPE base and scaling.
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    /// Local (sliding-window) layers' RoPE base.
    pub rope_local_base_freq: f64,
    pub sliding_window: usize,
    /// Per layer: true for sliding-window attention.
    pub sliding: Vec<bool>,
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Every `pattern`-th layer (1-based) is global, as llama.cpp and older configs say.
fn pattern_layers(n: usize, pattern: usize) -> Vec<bool> {
    (0..n).map(|i| pattern == 0 || (i + 1) % pattern != 0).collect()
}

fn f(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(|x| x.as_f64())
}
fn u(v: &Value, k: &str) -> Option<usize> {
    v.get(k).and_then(|x| x.as_u64()).map(|x| x as usize)
}
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect(),
        _ => vec![],
    }
}

impl Gemma3Config {
    /// A HF `config.json` of `gemma3_text`, or of `gemma3` (the text part in `text_config`).
    pub fn from_hf_json(v: &Value, path: &Path) -> HResult<Self> {
        let top = v;
        let v = v.get("text_config").filter(|t| t.is_object()).unwrap_or(v);
        let need = |k: &str| u(v, k).ok_or_else(|| Error::config(path, format!("`{k}` is missing or not a non-negative integer")));
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        let num_key_value_heads = u(v, "num_key_value_heads").unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::config(path, format!("bad head counts: {num_attention_heads} heads, {num_key_value_heads} kv heads")));
        }
        let head_dim = u(v, "head_dim").unwrap_or(256);
        let n = need("num_hidden_layers")?;
        let sliding = match v.get("layer_types").and_then(|x| x.as_array()) {
            Some(a) => {
                if a.len() != n {
                    return Err(Error::config(path, format!("`layer_types` has {} entries for {n} layers", a.len())));
                }
                a.iter().map(|t| t.as_str() == Some("sliding_attention")).collect()
            }
            None => pattern_layers(n, u(v, "sliding_window_pattern").unwrap_or(6)),
        };
        // transformers 5: rope_parameters {sliding_attention: {...}, full_attention: {...}};
        // older: rope_theta, rope_local_base_freq, rope_scaling.
        let rp = v.get("rope_parameters");
        let global = rp.and_then(|p| p.get("full_attention"));
        let local = rp.and_then(|p| p.get("sliding_attention"));
        let rope_theta = global.and_then(|g| f(g, "rope_theta")).or_else(|| f(v, "rope_theta")).unwrap_or(1_000_000.0);
        let rope_local_base_freq = local.and_then(|g| f(g, "rope_theta")).or_else(|| f(v, "rope_local_base_freq")).unwrap_or(10_000.0);
        let scaling_src = match v.get("rope_scaling") {
            Some(s) if !s.is_null() => Some(s),
            _ => global,
        };
        let rope_scaling = match scaling_src {
            Some(s) => match s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str()).unwrap_or("default") {
                "default" => None,
                "linear" => Some(RopeScaling::Linear { factor: f(s, "factor").unwrap_or(1.0) }),
                other => return Err(Error::config(path, format!("Gemma 3 rope scaling `{other}` is not supported (default, linear)"))),
            },
            None => None,
        };
        Ok(Self {
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: n,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f(v, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            rope_local_base_freq,
            sliding_window: u(v, "sliding_window").unwrap_or(4096),
            sliding,
            query_pre_attn_scalar: f(v, "query_pre_attn_scalar").unwrap_or(head_dim as f64),
            attn_logit_softcapping: f(v, "attn_logit_softcapping"),
            final_logit_softcapping: f(v, "final_logit_softcapping"),
            max_position_embeddings: u(v, "max_position_embeddings").unwrap_or(32_768),
            bos_token_id: ids(v.get("bos_token_id").or_else(|| top.get("bos_token_id"))).first().copied(),
            eos_token_ids: {
                let e = ids(v.get("eos_token_id"));
                if e.is_empty() { ids(top.get("eos_token_id")) } else { e }
            },
        })
    }

    /// From a GGUF's `gemma3.*` metadata (llama.cpp's conventions: the local RoPE base is
    /// not stored and is 10,000; every 6th layer is global; the attention scale is
    /// 1/sqrt(head_dim) except for the 27B model, 1/sqrt(hidden/heads)).
    pub fn from_gguf(g: &GgufFile) -> HResult<Self> {
        let k = |s: &str| format!("gemma3.{s}");
        let hidden_size = g.usize(&k("embedding_length"))?;
        let num_attention_heads = g.usize(&k("attention.head_count"))?;
        let num_key_value_heads = g.opt_usize(&k("attention.head_count_kv"))?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(Error::Gguf {
                path: g.path().to_path_buf(),
                msg: format!("bad head counts: {num_attention_heads} heads, {num_key_value_heads} kv heads"),
            });
        }
        let head_dim = g.opt_usize(&k("attention.key_length"))?.unwrap_or(256);
        let n = g.usize(&k("block_count"))?;
        let (emb_dims, _) = g.tensor_info("token_embd.weight")?;
        let rope_scaling = match g.opt_str(&k("rope.scaling.type")).as_deref() {
            Some("linear") => Some(RopeScaling::Linear { factor: g.opt_f64(&k("rope.scaling.factor"))?.unwrap_or(1.0) }),
            _ => None,
        };
        let qpas = if n == 62 { (hidden_size / num_attention_heads) as f64 } else { head_dim as f64 };
        Ok(Self {
            vocab_size: *emb_dims.first().unwrap_or(&0),
            hidden_size,
            intermediate_size: g.usize(&k("feed_forward_length"))?,
            num_hidden_layers: n,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: g.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            rope_theta: g.opt_f64(&k("rope.freq_base"))?.unwrap_or(1_000_000.0),
            rope_scaling,
            rope_local_base_freq: 10_000.0,
            sliding_window: g.opt_usize(&k("attention.sliding_window"))?.unwrap_or(4096),
            sliding: pattern_layers(n, 6),
            query_pre_attn_scalar: qpas,
            attn_logit_softcapping: g.opt_f64(&k("attn_logit_softcapping"))?,
            final_logit_softcapping: g.opt_f64(&k("final_logit_softcapping"))?,
            max_position_embeddings: g.opt_usize(&k("context_length"))?.unwrap_or(32_768),
            bos_token_id: g.opt_u64("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_ids: g.opt_u64("tokenizer.ggml.eos_token_id")?.map(|x| x as u32).into_iter().collect(),
        })
    }

    fn inv_freq(&self, base: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / base.powf(2.0 * i as f64 / d as f64);
                match scaling {
                    Some(RopeScaling::Linear { factor }) => f / factor,
                    _ => f,
                }
            })
            .collect()
    }

    /// The HF `config.json` (`Gemma3ForCausalLM`, `gemma3_text`).
    pub fn to_hf_json(&self, torch_dtype: &str) -> Value {
        let layer_types: Vec<&str> = self.sliding.iter().map(|s| if *s { "sliding_attention" } else { "full_attention" }).collect();
        let global = match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) => json!({"rope_type": "linear", "factor": factor, "rope_theta": self.rope_theta}),
            _ => json!({"rope_type": "default", "rope_theta": self.rope_theta}),
        };
        json!({
            "architectures": ["Gemma3ForCausalLM"],
            "model_type": "gemma3_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}, "full_attention": global},
            "rope_theta": self.rope_theta,
            "rope_local_base_freq": self.rope_local_base_freq,
            "sliding_window": self.sliding_window,
            "layer_types": layer_types,
            // transformers wants an integer here.
            "query_pre_attn_scalar": if self.query_pre_attn_scalar.fract() == 0.0 { json!(self.query_pre_attn_scalar as u64) } else { json!(self.query_pre_attn_scalar) },
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": true,
            "attention_bias": false,
            "torch_dtype": torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": if self.eos_token_ids.len() == 1 { json!(self.eos_token_ids[0]) } else { json!(self.eos_token_ids) },
            "pad_token_id": 0,
        })
    }
}

/// Gemma's RMSNorm with the effective weight `1 + w`, computed in f32.
#[derive(Debug, Clone)]
pub struct GemmaRmsNorm {
    /// `1 + w` (f32).
    pub weight: Tensor,
    pub eps: f64,
}

impl GemmaRmsNorm {
    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        let dt = x.dtype();
        let xf = if dt == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
        let y = if differentiable {
            let var = xf.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            xf.broadcast_div(&(var + self.eps)?.sqrt()?)?.broadcast_mul(&self.weight.to_dtype(xf.dtype())?)?
        } else {
            crate::kernels::ops::rms_norm(&xf.contiguous()?, &self.weight, self.eps)?
        };
        y.to_dtype(dt)
    }
}

#[derive(Debug, Clone)]
pub struct Gemma3Block {
    pub input_layernorm: GemmaRmsNorm,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: GemmaRmsNorm,
    pub k_norm: GemmaRmsNorm,
    pub post_attention_layernorm: GemmaRmsNorm,
    pub pre_feedforward_layernorm: GemmaRmsNorm,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub post_feedforward_layernorm: GemmaRmsNorm,
    pub params: AttnParams,
}

#[derive(Debug, Clone)]
pub struct Gemma3 {
    pub cfg: Gemma3Config,
    pub embed_tokens: Tensor,
    pub embed_scale: f64,
    pub layers: Vec<Gemma3Block>,
    pub norm: GemmaRmsNorm,
    pub lm_head: Linear,
    pub rope_local: Rope,
    pub rope_global: Rope,
    pub dtype: DType,
    pub device: Device,
}

const MAX_ROPE_TABLE: usize = 131_072;

impl Gemma3 {
    /// `stored_plus_one`: the checkpoint stores the norm weights as `1 + w` (GGUF).
    pub fn load(cfg: Gemma3Config, ws: &WeightSource, stored_plus_one: bool) -> HResult<Self> {
        let dtype = ws.dtype();
        let device = ws.device().clone();
        if cfg.sliding.len() != cfg.num_hidden_layers {
            return Err(Error::InvalidArgument(format!("{} layer types for {} layers", cfg.sliding.len(), cfg.num_hidden_layers)));
        }
        let norm = |name: &str| -> HResult<GemmaRmsNorm> {
            let w = ws.tensor(name, None)?.to_dtype(DType::F32)?;
            let w = if stored_plus_one { w } else { (w + 1.0)? };
            Ok(GemmaRmsNorm { weight: w, eps: cfg.rms_norm_eps })
        };
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let lin = |n: &str| ws.linear(&format!("{p}.{n}"), false, None);
            layers.push(Gemma3Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                q_proj: lin("self_attn.q_proj")?,
                k_proj: lin("self_attn.k_proj")?,
                v_proj: lin("self_attn.v_proj")?,
                o_proj: lin("self_attn.o_proj")?,
                q_norm: norm(&format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: norm(&format!("{p}.self_attn.k_norm.weight"))?,
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                pre_feedforward_layernorm: norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                gate_proj: lin("mlp.gate_proj")?,
                up_proj: lin("mlp.up_proj")?,
                down_proj: lin("mlp.down_proj")?,
                post_feedforward_layernorm: norm(&format!("{p}.post_feedforward_layernorm.weight"))?,
                params: AttnParams {
                    n_heads: nh,
                    n_kv_heads: nkv,
                    head_dim: cfg.head_dim,
                    scale: 1.0 / cfg.query_pre_attn_scalar.sqrt(),
                    sliding_window: cfg.sliding[i].then_some(cfg.sliding_window),
                    softcap: cfg.attn_logit_softcapping,
                },
            });
        }
        let embed_tokens = ws.tensor("model.embed_tokens.weight", None)?;
        // Tied: the output projection is the embedding (quantized if the GGUF is).
        let lm_head = if ws.contains("lm_head.weight") { ws.linear("lm_head", false, None)? } else { ws.linear("model.embed_tokens", false, None)? };
        let act_dtype = if matches!(ws, WeightSource::Gguf { quantized: true, .. }) { DType::F32 } else { dtype };
        // transformers casts sqrt(hidden) to the weights' dtype before multiplying.
        let s = (cfg.hidden_size as f64).sqrt();
        let embed_scale = match act_dtype {
            DType::BF16 => half::bf16::from_f64(s).to_f64(),
            DType::F16 => half::f16::from_f64(s).to_f64(),
            _ => s as f32 as f64,
        };
        let max_pos = cfg.max_position_embeddings.clamp(1, MAX_ROPE_TABLE);
        let rope_local = Rope::new(&cfg.inv_freq(cfg.rope_local_base_freq, None), max_pos, DType::F32, &device)?;
        let rope_global = Rope::new(&cfg.inv_freq(cfg.rope_theta, cfg.rope_scaling.as_ref()), max_pos, DType::F32, &device)?;
        Ok(Self {
            norm: norm("model.norm.weight")?,
            cfg,
            embed_tokens,
            embed_scale,
            layers,
            lm_head,
            rope_local,
            rope_global,
            dtype: act_dtype,
            device,
        })
    }

    /// Scaled input embeddings of `ids` in the activation dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.index_select(ids, 0)?.to_dtype(self.dtype)? * self.embed_scale
    }

    /// Both RoPE tables (global and local layers) gathered for the coming `n` tokens.
    pub fn rope_ctx(&self, n: usize, cache: &mut dyn KvCache) -> Result<crate::model::RopeCtx> {
        let pos = cache.positions(n, &self.device)?;
        let gather = |r: &Rope| -> Result<(Tensor, Tensor)> {
            Ok((r.cos.index_select(&pos, 0)?.to_dtype(self.dtype)?, r.sin.index_select(&pos, 0)?.to_dtype(self.dtype)?))
        };
        Ok(crate::model::RopeCtx { global: gather(&self.rope_global)?, local: Some(gather(&self.rope_local)?), differentiable: cache.differentiable(), prompt_rows: cache.prompt_rows(n) })
    }

    /// Decoder block `i` on the hidden states `x` (`[n, hidden]`).
    pub fn block(&self, i: usize, x: &Tensor, ctx: &crate::model::RopeCtx, cache: &mut dyn KvCache) -> Result<Tensor> {
        let n = x.dim(0)?;
        let diff = ctx.differentiable;
        let l = &self.layers[i];
        let p = &l.params;
        let h = l.input_layernorm.forward(x, diff)?;
        let (q, k, v) = if diff {
            (l.q_proj.forward(&h)?, l.k_proj.forward(&h)?, l.v_proj.forward(&h)?)
        } else {
            let [q, k, v]: [Tensor; 3] = Linear::forward_many_rows(&h, &[&l.q_proj, &l.k_proj, &l.v_proj], &ctx.prompt_rows)?.try_into().map_err(|_| candle_core::Error::Msg("q/k/v projection count".into()))?;
            (q, k, v)
        };
        let q = q.reshape((n, p.n_heads, p.head_dim))?;
        let k = k.reshape((n, p.n_kv_heads, p.head_dim))?;
        let v = v.reshape((n, p.n_kv_heads, p.head_dim))?;
        let q = l.q_norm.forward(&q, diff)?;
        let k = l.k_norm.forward(&k, diff)?;
        let (cos, sin) = match (&ctx.local, p.sliding_window.is_some()) {
            (Some((c, s)), true) => (c, s),
            _ => (&ctx.global.0, &ctx.global.1),
        };
        let q = Rope::apply(&q, cos, sin, diff)?;
        let k = Rope::apply(&k, cos, sin, diff)?;
        let o = cache.attend(i, &q, &k, &v, p)?;
        let o = if diff { l.o_proj.forward(&o)? } else { l.o_proj.forward_rows(&o, &ctx.prompt_rows)? };
        let o = l.post_attention_layernorm.forward(&o, diff)?;
        if !diff && crate::kernels::ops::is_cpu_f32(x) {
            // Inference on the CPU: the elementwise steps on the compute pool (`kernels::ops`).
            use crate::kernels::ops;
            let x1 = ops::add(x, &o)?;
            let h = l.pre_feedforward_layernorm.forward(&x1, diff)?;
            let gu = Linear::forward_glu_rows(&h, &l.gate_proj, &l.up_proj, &ctx.prompt_rows, ops::Glu::Gelu)?;
            let m = l.down_proj.forward_rows(&gu, &ctx.prompt_rows)?;
            return ops::add(&x1, &l.post_feedforward_layernorm.forward(&m, diff)?);
        }
        let x1 = (x + o)?;
        let h = l.pre_feedforward_layernorm.forward(&x1, diff)?;
        let g = l.gate_proj.forward(&h)?;
        let g = if g.dtype() == DType::F64 { g.gelu()? } else { g.to_dtype(DType::F32)?.gelu()?.to_dtype(g.dtype())? };
        let m = l.down_proj.forward(&(g * l.up_proj.forward(&h)?)?)?;
        x1 + l.post_feedforward_layernorm.forward(&m, diff)?
    }

    /// Logits (f32), soft-capped when the config says so.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let l = self.lm_head.forward(hidden)?;
        let l = if l.dtype() == DType::F64 { l } else { l.to_dtype(DType::F32)? };
        match self.cfg.final_logit_softcapping {
            Some(cap) if cap > 0.0 => (l / cap)?.tanh()? * cap,
            _ => Ok(l),
        }
    }

    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), &mut l.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &mut l.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &mut l.v_proj));
            v.push((format!("{p}.self_attn.o_proj"), &mut l.o_proj));
            v.push((format!("{p}.mlp.gate_proj"), &mut l.gate_proj));
            v.push((format!("{p}.mlp.up_proj"), &mut l.up_proj));
            v.push((format!("{p}.mlp.down_proj"), &mut l.down_proj));
        }
        v
    }

    /// Every weight as HF-named dense tensors; norms exported as HF stores them (`w`).
    pub fn named_tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.to_dtype(dtype)?)];
        let nw = |t: &GemmaRmsNorm| -> Result<Tensor> { (&t.weight - 1.0)?.to_dtype(dtype) };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (n, t) in [
                ("input_layernorm", &l.input_layernorm),
                ("self_attn.q_norm", &l.q_norm),
                ("self_attn.k_norm", &l.k_norm),
                ("post_attention_layernorm", &l.post_attention_layernorm),
                ("pre_feedforward_layernorm", &l.pre_feedforward_layernorm),
                ("post_feedforward_layernorm", &l.post_feedforward_layernorm),
            ] {
                v.push((format!("{p}.{n}.weight"), nw(t)?));
            }
            for (n, lin) in [
                ("self_attn.q_proj", &l.q_proj),
                ("self_attn.k_proj", &l.k_proj),
                ("self_attn.v_proj", &l.v_proj),
                ("self_attn.o_proj", &l.o_proj),
                ("mlp.gate_proj", &l.gate_proj),
                ("mlp.up_proj", &l.up_proj),
                ("mlp.down_proj", &l.down_proj),
            ] {
                v.push((format!("{p}.{n}.weight"), lin.merged_weight(dtype)?));
            }
        }
        v.push(("model.norm.weight".to_string(), nw(&self.norm)?));
        Ok(v)
    }
}
