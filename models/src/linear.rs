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
            Weight::Q4_1(m) => kernel_matmul(x, self.in_dim, self.out_dim, |xf, rows| m.matmul(xf, rows))?,
            Weight::Q8_0(m) => kernel_matmul(x, self.in_dim, self.out_dim, |xf, rows| m.matmul(xf, rows))?,
        };
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        }
    }
}

/// Run one of hromada's CPU kernels on `x` (`[..., in]`), returning `[..., out]`.
fn kernel_matmul(x: &Tensor, in_dim: usize, out_dim: usize, mm: impl Fn(&[f32], usize) -> Vec<f32>) -> Result<Tensor> {
    let rows = x.elem_count() / in_dim;
    let xf = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut dims = x.dims().to_vec();
    if let Some(l) = dims.last_mut() {
        *l = out_dim;
    }
    Tensor::from_vec(mm(&xf, rows), dims, x.device())?.to_dtype(x.dtype())
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base_forward(x)?;
        match &self.lora {
            None => Ok(y),
            Some(l) => {
                let xin = if l.training && l.dropout > 0.0 {
                    candle_nn::ops::dropout(x, l.dropout)?
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
