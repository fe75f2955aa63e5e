//! The attention/KV-cache interface.
//!
//! Architectures never own their K/V: every attention layer hands its new queries, keys
//! and values (after RoPE, in the packed `[tokens, heads, head_dim]` layout) to a
//! [`KvCache`], which stores K/V however it likes and returns the attention output.
//! This module has the contiguous single-sequence cache used by `generate` and the
//! cache-less [`Segments`] context used for scoring and training (several packed
//! documents, causal within each, differentiable). The paged, batched cache of the
//! server implements the same trait.
use candle_core::{DType, Device, Result, Tensor, D};

/// Static facts about one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnParams {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplier applied to `q k^T`.
    pub scale: f64,
    /// A key is visible to query position `p` iff `p - window < key_pos <= p`.
    pub sliding_window: Option<usize>,
    /// `tanh(s / cap) * cap` on the attention scores (Gemma 2 style), if set.
    pub softcap: Option<f64>,
}

pub trait KvCache: Send {
    /// Absolute positions (for RoPE) of the `n_tokens` tokens of the coming forward pass,
    /// as a `u32` tensor of length `n_tokens` on `device`.
    fn positions(&mut self, n_tokens: usize, device: &Device) -> Result<Tensor>;

    /// Store the new keys/values of `layer` and attend. `q`: `[n, n_heads, d]`, `k`, `v`:
    /// `[n, n_kv_heads, d]`. Returns `[n, n_heads * d]`.
    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor>;

    /// Whether the forward pass must use differentiable ops only (training).
    fn differentiable(&self) -> bool {
        false
    }

    /// Which of the coming forward pass's `n_tokens` rows are prompt tokens (they may
    /// take the bf16 tile path, `kernels::bf16`); empty: none are. Called after
    /// `positions`. A row's kind must follow from its own sequence alone, never from the
    /// rest of the batch.
    fn prompt_rows(&self, _n_tokens: usize) -> Vec<bool> {
        Vec::new()
    }
}

/// Additive mask `[rows, n_keys]` for `n_q` queries at positions `q_start..` against keys
/// at positions `0..n_keys`, repeated `rep` times (grouped-query rows).
fn causal_mask(
    n_q: usize,
    q_start: usize,
    n_keys: usize,
    window: Option<usize>,
    rep: usize,
    device: &Device,
) -> Result<Option<Tensor>> {
    let needs = (0..n_q).any(|i| {
        let p = q_start + i;
        n_keys > p + 1 || window.is_some_and(|w| p >= w)
    });
    if !needs {
        return Ok(None);
    }
    let mut m = vec![0f32; n_q * n_keys];
    for i in 0..n_q {
        let p = q_start + i;
        for j in 0..n_keys {
            let visible = j <= p && window.is_none_or(|w| j + w > p);
            if !visible {
                m[i * n_keys + j] = f32::NEG_INFINITY;
            }
        }
    }
    let t = Tensor::from_vec(m, (n_q, n_keys), device)?;
    let t = if rep > 1 {
        t.unsqueeze(0)?.repeat((rep, 1, 1))?.reshape((rep * n_q, n_keys))?
    } else {
        t
    };
    Ok(Some(t))
}

/// Dense attention of `q` (`[n, h, d]`, positions `q_start..q_start+n`) over `k`, `v`
/// (`[n_kv, T, d]`, positions `0..T`). Grouped-query heads are handled by reshaping the
/// queries, so K/V are never copied. Returns `[n, h * d]`.
pub fn dense_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    q_start: usize,
    p: &AttnParams,
    differentiable: bool,
) -> Result<Tensor> {
    let (n, h, d) = q.dims3()?;
    let n_kv = p.n_kv_heads;
    let rep = h / n_kv;
    let t = k.dim(1)?;
    // [n, h, d] -> [h, n, d] -> [n_kv, rep * n, d]: rows of group g are (head g*rep + r, token).
    let q = q.transpose(0, 1)?.contiguous()?.reshape((n_kv, rep * n, d))?;
    let scores = (q.matmul(&k.t()?)? * p.scale)?;
    let scores = match p.softcap {
        Some(cap) => ((scores / cap)?.tanh()? * cap)?,
        None => scores,
    };
    let scores = match causal_mask(n, q_start, t, p.sliding_window, rep, q.device())? {
        Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
        None => scores,
    };
    let probs = if differentiable {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else if scores.dtype() == DType::F32 {
        candle_nn::ops::softmax_last_dim(&scores)?
    } else {
        // Softmax in f32 for half-precision activations, as the reference does.
        candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype())?
    };
    let out = probs.matmul(&v.contiguous()?)?; // [n_kv, rep*n, d]
    out.reshape((h, n, d))?.transpose(0, 1)?.reshape((n, h * d))
}

/// A growable contiguous K/V cache for one sequence (batch 1), as llama.cpp's and
/// candle's single-sequence caches.
#[derive(Debug, Clone)]
pub struct SeqKvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    lens: Vec<usize>,
    max_len: usize,
    /// Positions below this are the prompt's (see [`KvCache::prompt_rows`]); 0 until
    /// [`SeqKvCache::set_prompt_len`].
    prompt_len: usize,
}

impl SeqKvCache {
    pub fn new(n_layers: usize, max_len: usize) -> Self {
        Self {
            layers: vec![None; n_layers],
            lens: vec![0; n_layers],
            max_len,
            prompt_len: 0,
        }
    }

    /// Mark positions `0..len` as the prompt: their rows take the prompt arithmetic, the
    /// rows of generated tokens after them the decode one, as in the server.
    pub fn set_prompt_len(&mut self, len: usize) {
        self.prompt_len = len;
    }

    /// Tokens stored so far.
    pub fn len(&self) -> usize {
        self.lens.first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&mut self) {
        for l in self.layers.iter_mut() {
            *l = None;
        }
        for l in self.lens.iter_mut() {
            *l = 0;
        }
    }

    /// Drop everything after the first `len` tokens (used to reuse a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        for l in self.lens.iter_mut() {
            *l = (*l).min(len);
        }
    }
}

impl KvCache for SeqKvCache {
    fn positions(&mut self, n_tokens: usize, device: &Device) -> Result<Tensor> {
        let start = self.len();
        if start + n_tokens > self.max_len {
            candle_core::bail!(
                "sequence of {} tokens exceeds the context length {}",
                start + n_tokens,
                self.max_len
            );
        }
        let pos: Vec<u32> = (start..start + n_tokens).map(|p| p as u32).collect();
        Tensor::from_vec(pos, n_tokens, device)
    }

    fn prompt_rows(&self, n_tokens: usize) -> Vec<bool> {
        let start = self.len();
        if start >= self.prompt_len {
            return Vec::new();
        }
        (start..start + n_tokens).map(|p| p < self.prompt_len).collect()
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
        let (n, n_kv, d) = k.dims3()?;
        let len = *self
            .lens
            .get(layer)
            .ok_or_else(|| candle_core::Error::Msg(format!("no cache slot for layer {layer}")))?;
        let k = k.transpose(0, 1)?.contiguous()?; // [n_kv, n, d]
        let v = v.transpose(0, 1)?.contiguous()?;
        let need = len + n;
        let slot = &mut self.layers[layer];
        let cap = slot.as_ref().map(|(kc, _)| kc.dim(1)).transpose()?.unwrap_or(0);
        if need > cap {
            let new_cap = need.max(cap * 2).max(128).min(self.max_len.max(need));
            let kc = Tensor::zeros((n_kv, new_cap, d), k.dtype(), k.device())?;
            let vc = Tensor::zeros((n_kv, new_cap, d), v.dtype(), v.device())?;
            if let Some((ok, ov)) = slot.as_ref() {
                if len > 0 {
                    kc.slice_set(&ok.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                    vc.slice_set(&ov.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
                }
            }
            *slot = Some((kc, vc));
        }
        let (kc, vc) = slot
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("cache slot missing".into()))?;
        kc.slice_set(&k, 1, len)?;
        vc.slice_set(&v, 1, len)?;
        self.lens[layer] = need;
        let k_all = kc.narrow(1, 0, need)?;
        let v_all = vc.narrow(1, 0, need)?;
        dense_attention(q, &k_all, &v_all, len, p, false)
    }
}

/// No cache: the forward pass sees whole documents, packed one after another, each
/// causal on its own and starting at position 0 (scoring, training, sample packing).
#[derive(Debug, Clone)]
pub struct Segments {
    lens: Vec<usize>,
    differentiable: bool,
}

impl Segments {
    /// `lens`: the length of each packed document, in order.
    pub fn new(lens: Vec<usize>, differentiable: bool) -> Self {
        Self { lens, differentiable }
    }
    pub fn single(len: usize, differentiable: bool) -> Self {
        Self::new(vec![len], differentiable)
    }
}

impl KvCache for Segments {
    fn positions(&mut self, n_tokens: usize, device: &Device) -> Result<Tensor> {
        let total: usize = self.lens.iter().sum();
        if total != n_tokens {
            candle_core::bail!("segments cover {total} tokens, the forward pass has {n_tokens}");
        }
        let pos: Vec<u32> = self.lens.iter().flat_map(|&l| 0..l as u32).collect();
        Tensor::from_vec(pos, n_tokens, device)
    }

    fn attend(&mut self, _layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.lens.len());
        let mut start = 0;
        for &l in &self.lens {
            if l == 0 {
                continue;
            }
            let qs = q.narrow(0, start, l)?;
            let ks = k.narrow(0, start, l)?.transpose(0, 1)?.contiguous()?;
            let vs = v.narrow(0, start, l)?.transpose(0, 1)?.contiguous()?;
            outs.push(dense_attention(&qs, &ks, &vs, 0, p, self.differentiable)?);
            start += l;
        }
        if outs.len() == 1 {
            return Ok(outs.remove(0));
        }
        Tensor::cat(&outs, 0)
    }

    fn differentiable(&self) -> bool {
        self.differentiable
    }

    /// Whole documents: every row is a prompt row (scoring), except in training.
    fn prompt_rows(&self, n_tokens: usize) -> Vec<bool> {
        if self.differentiable {
            Vec::new()
        } else {
            vec![true; n_tokens]
        }
    }
}
