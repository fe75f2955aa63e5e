//! The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (attention bias).
//!
//! Packed layout: a forward pass takes `n` token ids (one or many sequences, flattened)
//! and a [`KvCache`] that supplies their positions and performs attention. Two paths:
//! fused candle kernels for inference, plain differentiable ops when the cache asks for
//! them (training), computing the same function.
use candle_core::{DType, Device, Module, Result, Tensor, D};

use crate::cache::{AttnParams, KvCache};
use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::weights::WeightSource;

#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn forward(&self, x: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable {
            let dt = x.dtype();
            // f32 as the reference computes it; f64 stays f64 (gradient checks).
            let xf = if dt == DType::F64 { x.clone() } else { x.to_dtype(DType::F32)? };
            let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
            let xn = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            xn.to_dtype(dt)?.broadcast_mul(&self.weight.to_dtype(dt)?)
        } else {
            crate::kernels::ops::rms_norm(x, &self.weight.to_dtype(x.dtype())?, self.eps)
        }
    }
}

/// RoPE tables `[max_pos, head_dim/2]` computed as transformers does (f32).
#[derive(Debug, Clone)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rope {
    pub fn new(inv_freq: &[f64], max_pos: usize, dtype: DType, device: &Device) -> Result<Self> {
        let inv: Vec<f32> = inv_freq.iter().map(|&f| f as f32).collect();
        let half = inv.len();
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for &f in &inv {
                let a = (p as f32 * f) as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_pos, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (max_pos, half), device)?.to_dtype(dtype)?,
        })
    }

    /// Apply to `x`: `[n, heads, d]` with `cos`/`sin` already gathered for the n positions.
    pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, differentiable: bool) -> Result<Tensor> {
        if differentiable {
            let (n, h, d) = x.dims3()?;
            let x = x.transpose(0, 1)?.unsqueeze(0)?; // [1, h, n, d]
            let y = candle_nn::rotary_emb::rope_slow(&x, cos, sin)?;
            y.squeeze(0)?.transpose(0, 1)?.reshape((n, h, d))
        } else {
            crate::kernels::ops::rope(x, cos, sin)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub params: AttnParams,
}

#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rope: Rope,
    pub dtype: DType,
    pub device: Device,
}

/// Longest RoPE table precomputed; longer contexts are refused by the caches.
const MAX_ROPE_TABLE: usize = 131_072;

impl Llama {
    pub fn load(cfg: LlamaConfig, ws: &WeightSource) -> crate::error::Result<Self> {
        let dtype = ws.dtype();
        let device = ws.device().clone();
        let nh = cfg.num_attention_heads;
        let nkv = cfg.num_key_value_heads;
        let params = AttnParams {
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: cfg.head_dim,
            scale: 1.0 / (cfg.head_dim as f64).sqrt(),
            sliding_window: cfg.sliding_window,
            softcap: None,
        };
        let norm = |name: &str| -> crate::error::Result<RmsNorm> {
            Ok(RmsNorm {
                weight: ws.tensor(name, None)?,
                eps: cfg.rms_norm_eps,
            })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = cfg.attention_bias;
            layers.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: ws.linear(&format!("{p}.self_attn.q_proj"), bias, Some(nh))?,
                    k_proj: ws.linear(&format!("{p}.self_attn.k_proj"), bias, Some(nkv))?,
                    v_proj: ws.linear(&format!("{p}.self_attn.v_proj"), bias, None)?,
                    o_proj: ws.linear(&format!("{p}.self_attn.o_proj"), false, None)?,
                    params,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: ws.linear(&format!("{p}.mlp.gate_proj"), false, None)?,
                    up_proj: ws.linear(&format!("{p}.mlp.up_proj"), false, None)?,
                    down_proj: ws.linear(&format!("{p}.mlp.down_proj"), false, None)?,
                },
            });
        }
        let embed_tokens = ws.tensor("model.embed_tokens.weight", None)?;
        let lm_head = if !cfg.tie_word_embeddings && ws.contains("lm_head.weight") {
            ws.linear("lm_head", false, None)?
        } else {
            // Tied: the output projection is the embedding (quantized if the GGUF is).
            ws.linear("model.embed_tokens", false, None)?
        };
        let max_pos = cfg.max_position_embeddings.clamp(1, MAX_ROPE_TABLE);
        let rope_dtype = if dtype == DType::F32 { DType::F32 } else { dtype };
        let rope = Rope::new(&cfg.inv_freq(), max_pos, rope_dtype, &device)?;
        let act_dtype = if matches!(ws, WeightSource::Gguf { quantized: true, .. }) { DType::F32 } else { dtype };
        Ok(Self {
            norm: norm("model.norm.weight")?,
            cfg,
            embed_tokens,
            layers,
            lm_head,
            rope,
            dtype: act_dtype,
            device,
        })
    }

    /// The input embeddings of `ids` in the activation dtype.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed_tokens.index_select(ids, 0)?.to_dtype(self.dtype)
    }

    /// RoPE tables gathered for the positions the cache gives the coming `n` tokens.
    pub fn rope_ctx(&self, n: usize, cache: &mut dyn KvCache) -> Result<crate::model::RopeCtx> {
        let pos = cache.positions(n, &self.device)?;
        let cos = self.rope.cos.index_select(&pos, 0)?.to_dtype(self.dtype)?;
        let sin = self.rope.sin.index_select(&pos, 0)?.to_dtype(self.dtype)?;
        Ok(crate::model::RopeCtx { global: (cos, sin), local: None, differentiable: cache.differentiable(), prompt_rows: cache.prompt_rows(n) })
    }

    /// Decoder block `i` on the hidden states `x` (`[n, hidden]`).
    pub fn block(&self, i: usize, x: &Tensor, ctx: &crate::model::RopeCtx, cache: &mut dyn KvCache) -> Result<Tensor> {
        let n = x.dim(0)?;
        let diff = ctx.differentiable;
        let (cos, sin) = &ctx.global;
        let layer = &self.layers[i];
        let h = layer.input_layernorm.forward(x, diff)?;
        let a = &layer.self_attn;
        let p = &a.params;
        let (q, k, v) = if diff {
            (a.q_proj.forward(&h)?, a.k_proj.forward(&h)?, a.v_proj.forward(&h)?)
        } else {
            let [q, k, v]: [Tensor; 3] = Linear::forward_many_rows(&h, &[&a.q_proj, &a.k_proj, &a.v_proj], &ctx.prompt_rows)?.try_into().map_err(|_| candle_core::Error::Msg("q/k/v projection count".into()))?;
            (q, k, v)
        };
        let q = q.reshape((n, p.n_heads, p.head_dim))?;
        let k = k.reshape((n, p.n_kv_heads, p.head_dim))?;
        let v = v.reshape((n, p.n_kv_heads, p.head_dim))?;
        let q = Rope::apply(&q, cos, sin, diff)?;
        let k = Rope::apply(&k, cos, sin, diff)?;
        let o = cache.attend(i, &q, &k, &v, p)?;
        let m = &layer.mlp;
        if diff {
            let x1 = (x + a.o_proj.forward(&o)?)?;
            let h = layer.post_attention_layernorm.forward(&x1, diff)?;
            let g = m.gate_proj.forward(&h)?.silu()?;
            let u = m.up_proj.forward(&h)?;
            return x1 + m.down_proj.forward(&(g * u)?)?;
        }
        // Inference: the elementwise steps on the compute pool (`kernels::ops`).
        use crate::kernels::ops;
        let x1 = ops::add(x, &a.o_proj.forward_rows(&o, &ctx.prompt_rows)?)?;
        let h = layer.post_attention_layernorm.forward(&x1, diff)?;
        let gu = Linear::forward_glu_rows(&h, &m.gate_proj, &m.up_proj, &ctx.prompt_rows, ops::Glu::Silu)?;
        ops::add(&x1, &m.down_proj.forward_rows(&gu, &ctx.prompt_rows)?)
    }

    /// Logits (f32) for hidden states `[m, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let l = self.lm_head.forward(hidden)?;
        if l.dtype() == DType::F64 {
            return Ok(l);
        }
        l.to_dtype(DType::F32)
    }

    /// All linear layers by their HF name prefix (for LoRA targeting and export).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), &mut l.self_attn.q_proj));
            v.push((format!("{p}.self_attn.k_proj"), &mut l.self_attn.k_proj));
            v.push((format!("{p}.self_attn.v_proj"), &mut l.self_attn.v_proj));
            v.push((format!("{p}.self_attn.o_proj"), &mut l.self_attn.o_proj));
            v.push((format!("{p}.mlp.gate_proj"), &mut l.mlp.gate_proj));
            v.push((format!("{p}.mlp.up_proj"), &mut l.mlp.up_proj));
            v.push((format!("{p}.mlp.down_proj"), &mut l.mlp.down_proj));
        }
        v
    }

    /// Every weight as HF-named dense tensors (for `convert` and merged exports).
    pub fn named_tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed_tokens.to_dtype(dtype)?)];
        let lin = |v: &mut Vec<(String, Tensor)>, name: String, l: &Linear| -> Result<()> {
            v.push((format!("{name}.weight"), l.merged_weight(dtype)?));
            if let Some(b) = l.bias() {
                v.push((format!("{name}.bias"), b.to_dtype(dtype)?));
            }
            Ok(())
        };
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.input_layernorm.weight"), l.input_layernorm.weight.to_dtype(dtype)?));
            v.push((format!("{p}.post_attention_layernorm.weight"), l.post_attention_layernorm.weight.to_dtype(dtype)?));
            lin(&mut v, format!("{p}.self_attn.q_proj"), &l.self_attn.q_proj)?;
            lin(&mut v, format!("{p}.self_attn.k_proj"), &l.self_attn.k_proj)?;
            lin(&mut v, format!("{p}.self_attn.v_proj"), &l.self_attn.v_proj)?;
            lin(&mut v, format!("{p}.self_attn.o_proj"), &l.self_attn.o_proj)?;
            lin(&mut v, format!("{p}.mlp.gate_proj"), &l.mlp.gate_proj)?;
            lin(&mut v, format!("{p}.mlp.up_proj"), &l.mlp.up_proj)?;
            lin(&mut v, format!("{p}.mlp.down_proj"), &l.mlp.down_proj)?;
        }
        v.push(("model.norm.weight".to_string(), self.norm.weight.to_dtype(dtype)?));
        if !self.cfg.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), self.lm_head.merged_weight(dtype)?));
        }
        Ok(v)
    }
}
