//! The one linear layer of every architecture: dense, quantized, optionally wrapped with a
//! LoRA adapter. Weights are `[out, in]` as in PyTorch; `forward` computes `x W^T + b`.
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use std::sync::Arc;

/// Weight storage.
#[derive(Debug, Clone)]
pub enum Weight {
    /// A dense tensor `[out, in]` (f32/bf16/f16). It may be a `Var` for full fine-tuning.
    Dense(Tensor),
    /// A GGUF quantized tensor, multiplied without dequantizing (activations must be f32).
    Quantized(Arc<QTensor>, QMatMul),
    /// Q4_1 on the CPU through hromada's own SIMD kernel (candle's is scalar).
    Q4_1(Arc<crate::kernels::q4_1::Q4_1Matrix>),
    /// Q8_0 on the CPU through the same kernel family.
    Q8_0(Arc<crate::kernels::q4_1::Q8_0Matrix>),
}

/// A LoRA adapter: `y += (x A^T) B^T * alpha / r` (PEFT's `lora_A`, `lora_B`).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    /// Dropout applied to the adapter input during training (0 disables it).
    pub dropout: f32,
    pub training: bool,
    /// Seed of the dropout mask of the coming forward pass: the trainer sets it per
    /// micro-batch so a resumed run draws exactly the same masks.
    pub dropout_seed: u64,
}

impl LoraAdapter {
    /// PEFT's initialisation: A Kaiming-uniform (`a = sqrt(5)`, i.e. U(-1/sqrt(in), 1/sqrt(in))),
    /// B zero, so the adapted layer starts equal to the base.
    pub fn init_peft(in_dim: usize, out_dim: usize, rank: usize, alpha: f64, dropout: f32, dtype: DType, device: &candle_core::Device, rng: &mut crate::sampling::Rng) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let a: Vec<f64> = (0..rank * in_dim).map(|_| (rng.next_f64() * 2.0 - 1.0) * bound).collect();
        Ok(Self {
            a: Tensor::from_vec(a, (rank, in_dim), device)?.to_dtype(dtype)?,
            b: Tensor::zeros((out_dim, rank), dtype, device)?,
            scale: alpha / rank as f64,
            dropout,
            training: false,
            dropout_seed: 0,
        })
    }
}

/// Inverted dropout with a mask drawn from `seed` (SplitMix64), reproducible across runs.
fn seeded_dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let n = x.elem_count();
    let keep = 1.0 - p as f64;
    let mut state = seed;
    let mask: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64;
            if u < keep { (1.0 / keep) as f32 } else { 0.0 }
        })
        .collect();
    let m = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x * m
}

/// hromada's CPU quantized matmul as a candle op with a backward pass: gradients flow to
/// the input through the frozen quantized weight (dequantized only transiently, one layer
/// at a time), so LoRA trains on a quantized GGUF base (QLoRA-style).
struct KernelMatmul {
    weight: Weight,
    in_dim: usize,
    out_dim: usize,
}

impl KernelMatmul {
    fn run(&self, x: &[f32], rows: usize) -> Vec<f32> {
        match &self.weight {
            Weight::Q4_1(m) => m.matmul(x, rows),
            Weight::Q8_0(m) => m.matmul(x, rows),
            _ => Vec::new(),
        }
    }
    fn dense(&self) -> Vec<f32> {
        match &self.weight {
            Weight::Q4_1(m) => m.dequantize(),
            Weight::Q8_0(m) => m.dequantize(),
            _ => Vec::new(),
        }
    }
}

impl candle_core::CustomOp1 for KernelMatmul {
    fn name(&self) -> &'static str {
        "hromada-qmatmul"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = match s {
            candle_core::CpuStorage::F32(v) => v,
            _ => candle_core::bail!("hromada-qmatmul takes f32 activations"),
        };
        let x = match l.contiguous_offsets() {
            Some((a, b)) => &x[a..b],
            None => candle_core::bail!("hromada-qmatmul takes contiguous activations"),
        };
        let rows = x.len() / self.in_dim;
        let mut dims = l.dims().to_vec();
        if let Some(d) = dims.last_mut() {
            *d = self.out_dim;
        }
        Ok((candle_core::CpuStorage::F32(self.run(x, rows)), candle_core::Shape::from(dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let w = Tensor::from_vec(self.dense(), (self.out_dim, self.in_dim), arg.device())?;
        let rows = arg.elem_count() / self.in_dim;
        let g = grad_res.reshape((rows, self.out_dim))?.matmul(&w)?;
        Ok(Some(g.reshape(arg.shape())?))
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    lora: Option<LoraAdapter>,
    in_dim: usize,
    out_dim: usize,
}

impl Linear {
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Self {
            weight: Weight::Dense(weight),
            bias,
            lora: None,
            in_dim,
            out_dim,
        })
    }

    pub fn quantized(q: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let q = Arc::new(q);
        let mm = QMatMul::from_arc(q.clone())?;
        Ok(Self {
            weight: Weight::Quantized(q, mm),
            bias,
            lora: None,
            in_dim,
            out_dim,
        })
    }

    /// A Q4_1, Q8_0, Q5_0 (repacked exactly as Q8_0) Q4_K (exactly as Q4_1) or Q6_K
    /// (exactly, scales per 16) GGUF tensor on the CPU: hromada's SIMD kernels; anything
    /// else: candle's QMatMul.
    pub fn quantized_cpu_q4_1(q: QTensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        let data = q.data()?;
        use candle_core::quantized::GgmlDType as G;
        let w = match q.dtype() {
            G::Q4_1 => crate::kernels::q4_1::Q4_1Matrix::from_ggml_bytes(&data, out_dim, in_dim).map(|m| Weight::Q4_1(Arc::new(m))),
            G::Q8_0 => crate::kernels::q4_1::Q8_0Matrix::from_ggml_bytes(&data, out_dim, in_dim).map(|m| Weight::Q8_0(Arc::new(m))),
            G::Q5_0 => crate::kernels::q4_1::Q8_0Matrix::from_q5_0_bytes(&data, out_dim, in_dim).map(|m| Weight::Q8_0(Arc::new(m))),
            G::Q4K => crate::kernels::q4_1::Q4_1Matrix::from_q4_k_bytes(&data, out_dim, in_dim).map(|m| Weight::Q4_1(Arc::new(m))),
            G::Q6K => crate::kernels::q4_1::Q8_0Matrix::from_q6_k_bytes(&data, out_dim, in_dim).map(|m| Weight::Q8_0(Arc::new(m))),
            _ => None,
        };
        match w {
            Some(weight) => Ok(Self {
                weight,
                bias,
                lora: None,
                in_dim,
                out_dim,
            }),
            None => Self::quantized(q, bias),
        }
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    pub fn weight(&self) -> &Weight {
        &self.weight
    }
    pub fn lora(&self) -> Option<&LoraAdapter> {
        self.lora.as_ref()
    }
    pub fn is_quantized(&self) -> bool {
        matches!(self.weight, Weight::Quantized(..) | Weight::Q4_1(..) | Weight::Q8_0(..))
    }

    /// Attach (or replace) a LoRA adapter.
    pub fn set_lora(&mut self, lora: Option<LoraAdapter>) {
        self.lora = lora;
    }

    /// Replace the dense weight (e.g. with a `Var` for full fine-tuning).
    pub fn set_weight(&mut self, weight: Tensor) -> Result<()> {
        let (o, i) = weight.dims2()?;
        if (o, i) != (self.out_dim, self.in_dim) {
            candle_core::bail!(
                "new weight {o}x{i} does not match the layer's {}x{}",
                self.out_dim,
                self.in_dim
            );
        }
        self.weight = Weight::Dense(weight);
        Ok(())
    }

    pub fn set_bias(&mut self, bias: Option<Tensor>) {
        self.bias = bias;
    }

    /// The weight as a dense tensor of `dtype` (dequantized if needed), without LoRA.
    pub fn dense_weight(&self, dtype: DType) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => w.to_dtype(dtype),
            Weight::Quantized(q, _) => q.dequantize(&q.device())?.to_dtype(dtype),
            Weight::Q4_1(m) => Tensor::from_vec(m.dequantize(), (m.n, m.k), &candle_core::Device::Cpu)?.to_dtype(dtype),
            Weight::Q8_0(m) => Tensor::from_vec(m.dequantize(), (m.n, m.k), &candle_core::Device::Cpu)?.to_dtype(dtype),
        }
    }

    /// The weight with the LoRA delta merged in (`W + scale * B A`).
    pub fn merged_weight(&self, dtype: DType) -> Result<Tensor> {
        let w = self.dense_weight(DType::F32)?;
        let w = match &self.lora {
            None => w,
            Some(l) => {
                let delta = l.b.to_dtype(DType::F32)?.matmul(&l.a.to_dtype(DType::F32)?)?;
                (w + (delta * l.scale)?)?
            }
        };
        w.to_dtype(dtype)
    }

    fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Dense(w) => {
                let w = if w.dtype() != x.dtype() { w.to_dtype(x.dtype())? } else { w.clone() };
                match x.rank() {
                    2 => x.matmul(&w.t()?)?,
                    _ => x.broadcast_matmul(&w.t()?)?,
                }
            }
            Weight::Quantized(_, mm) => {
                if x.dtype() == DType::F32 {
                    mm.forward(x)?
                } else {
                    mm.forward(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?
                }
            }
            Weight::Q4_1(_) | Weight::Q8_0(_) => {
                let op = KernelMatmul { weight: self.weight.clone(), in_dim: self.in_dim, out_dim: self.out_dim };
                x.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)?.to_dtype(x.dtype())?
            }
        };
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        }
    }
}

impl Linear {
    /// `x` through several layers of the same input width at once (q/k/v, gate/up): with
    /// hromada's quantized CPU kernels and no LoRA, one activation quantization and one
    /// parallel pass over all their weights (`kernels::q4_1::matmul_many`); otherwise each
    /// layer's own forward. The results equal the separate forwards bit for bit.
    pub fn forward_many(x: &Tensor, layers: &[&Linear]) -> Result<Vec<Tensor>> {
        Self::forward_many_rows(x, layers, &[])
    }

    /// One layer's inference forward with the rows' kinds (`RopeCtx::prompt_rows`): as
    /// `forward`, except that prompt rows may take the bf16 tile path.
    pub fn forward_rows(&self, x: &Tensor, prompt: &[bool]) -> Result<Tensor> {
        if prompt.is_empty() {
            return self.forward(x);
        }
        let mut v = Self::forward_many_rows(x, &[self], prompt)?;
        v.pop().ok_or_else(|| candle_core::Error::Msg("linear forward gave no output".into()))
    }

    /// A feed-forward block's gated activation `act(x · gateᵀ) · (x · upᵀ)` with the
    /// rows' kinds (as [`Linear::forward_many_rows`]): with hromada's quantized CPU
    /// kernels, one pass (`kernels::q4_1::matmul_glu_rows`, whose prompt rows get the
    /// activation in the bf16 tile kernel's epilogue); otherwise the two forwards and
    /// `ops::silu_mul` / `ops::gelu_mul`. The same bits either way.
    pub fn forward_glu_rows(x: &Tensor, gate: &Linear, up: &Linear, prompt: &[bool], act: crate::kernels::ops::Glu) -> Result<Tensor> {
        use crate::kernels::ops::{self, Glu};
        if let (Some(g), Some(u), None, None) = (gate.qmat(), up.qmat(), &gate.bias, &up.bias) {
            if let Some(out) = with_cpu_rows(x, gate.in_dim, |v, rows| crate::kernels::q4_1::matmul_glu_rows(v, rows, g, u, prompt, act))? {
                return Tensor::from_vec(out, dims_with_last(x, gate.out_dim), x.device());
            }
        }
        match Self::forward_many_rows(x, &[gate, up], prompt)?.as_slice() {
            [g, u] => match act {
                Glu::Silu => ops::silu_mul(g, u),
                Glu::Gelu => ops::gelu_mul(g, u),
            },
            _ => candle_core::bail!("gate/up projection count"),
        }
    }

    /// [`Linear::forward_many`] with the rows' kinds: rows flagged in `prompt` (a prompt
    /// token's; empty: none) take the bf16 tile path where the CPU has it
    /// (`kernels::q4_1::matmul_many_rows`), the others the integer kernels.
    pub fn forward_many_rows(x: &Tensor, layers: &[&Linear], prompt: &[bool]) -> Result<Vec<Tensor>> {
        use crate::kernels::q4_1::{matmul_many, matmul_many_rows};
        let mats: Option<Vec<_>> = layers.iter().map(|l| l.qmat()).collect();
        if let (Some(mats), Some(first)) = (mats, layers.first()) {
            let outs = with_cpu_rows(x, first.in_dim, |v, rows| if prompt.len() == rows { matmul_many_rows(v, rows, &mats, prompt) } else { matmul_many(v, rows, &mats) })?;
            if let Some(outs) = outs {
                return layers
                    .iter()
                    .zip(outs)
                    .map(|(l, o)| {
                        let y = Tensor::from_vec(o, dims_with_last(x, l.out_dim), x.device())?;
                        match &l.bias {
                            None => Ok(y),
                            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
                        }
                    })
                    .collect();
            }
        }
        layers.iter().map(|l| l.forward(x)).collect()
    }

    /// The weights as hromada's quantized CPU kernels take them (Q4_1 or Q8_0, no LoRA).
    fn qmat(&self) -> Option<crate::kernels::q4_1::QMat<'_>> {
        use crate::kernels::q4_1::QMat;
        match (&self.weight, &self.lora) {
            (Weight::Q4_1(m), None) => Some(QMat::Q4(m)),
            (Weight::Q8_0(m), None) => Some(QMat::Q8(m)),
            _ => None,
        }
    }
}

/// `f(values, rows)` over `x` as rows of `in_dim` f32 values when it is an f32 tensor on
/// the CPU of that width (made contiguous first); None otherwise, or when `f` gives None.
fn with_cpu_rows<R>(x: &Tensor, in_dim: usize, f: impl FnOnce(&[f32], usize) -> Option<R>) -> Result<Option<R>> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.dim(candle_core::D::Minus1)? != in_dim {
        return Ok(None);
    }
    let xc = x.contiguous()?;
    let rows = xc.elem_count() / in_dim.max(1);
    let (st, l) = xc.storage_and_layout();
    Ok(crate::kernels::ops::cpu_f32(&st, l).and_then(|v| f(v, rows)))
}

/// `x`'s shape with its last dimension set to `n`.
fn dims_with_last(x: &Tensor, n: usize) -> Vec<usize> {
    let mut dims = x.dims().to_vec();
    if let Some(d) = dims.last_mut() {
        *d = n;
    }
    dims
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base_forward(x)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let xin = if l.training && l.dropout > 0.0 {
                    seeded_dropout(x, l.dropout, l.dropout_seed)?
                } else {
                    x.clone()
                };
                let xin = xin.to_dtype(l.a.dtype())?;
                let h = match xin.rank() {
                    2 => xin.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?,
                    _ => xin.broadcast_matmul(&l.a.t()?)?.broadcast_matmul(&l.b.t()?)?,
                };
                let dt = y.dtype();
                y + (h * l.scale)?.to_dtype(dt)?
            }
        }
    }
}
