//! Paged K/V storage and variable-length attention over block tables (CPU).
//!
//! K/V live in fixed-size blocks (`block_size` token slots each) per layer; a sequence
//! owns a block table. One forward pass carries any mix of prefill chunks and decode
//! tokens from many sequences (packed along the token axis); each token attends to the
//! keys of its own sequence only, read straight from the blocks (no gather copy).
use candle_core::{DType, Device, Result, Tensor};
use hromada_models::cache::{AttnParams, KvCache};
use rayon::prelude::*;

use crate::block_manager::BlockId;

/// K/V storage for all layers.
#[derive(Debug)]
pub struct PagedKv {
    pub block_size: usize,
    pub num_blocks: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    /// On a GPU the blocks live in device memory instead (`k`, `v` stay empty).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::paged_cuda::CudaKv>,
}

impl PagedKv {
    /// Bytes per cached value for a model computing in `dtype` on `device`: f32 on the
    /// CPU and for f32 models; bf16 for bf16/f16 models on a GPU.
    pub fn elem_bytes(device: &Device, dtype: DType) -> usize {
        if device.is_cpu() || dtype == DType::F32 || dtype == DType::F64 {
            4
        } else {
            2
        }
    }

    /// The blocks on `device`: host memory for the CPU, device memory for a GPU (in bf16
    /// when the model computes in bf16 or f16).
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, n_kv: usize, head_dim: usize, device: &Device, dtype: DType) -> Result<Self> {
        let n = num_blocks * block_size * n_kv * head_dim;
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            if head_dim > crate::paged_cuda::MAX_HEAD_DIM {
                candle_core::bail!("head dim {head_dim} is above the GPU attention kernel's {}", crate::paged_cuda::MAX_HEAD_DIM);
            }
            let kv_dtype = if Self::elem_bytes(device, dtype) == 2 { crate::paged_cuda::KvDType::BF16 } else { crate::paged_cuda::KvDType::F32 };
            let gpu = crate::paged_cuda::CudaKv::new(dev, layers, n, kv_dtype)?;
            return Ok(Self { block_size, num_blocks, n_kv, head_dim, k: Vec::new(), v: Vec::new(), gpu: Some(gpu) });
        }
        let _ = dtype;
        if !device.is_cpu() {
            candle_core::bail!("the paged K/V cache runs on the CPU or a CUDA GPU, not {device:?}");
        }
        Ok(Self {
            block_size,
            num_blocks,
            n_kv,
            head_dim,
            k: (0..layers).map(|_| vec![0f32; n]).collect(),
            v: (0..layers).map(|_| vec![0f32; n]).collect(),
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    /// How many blocks fit in `bytes` (K and V, all layers, `elem_bytes` per value).
    pub fn blocks_for_budget(bytes: usize, layers: usize, block_size: usize, n_kv: usize, head_dim: usize, elem_bytes: usize) -> usize {
        let per_block = 2 * layers * block_size * n_kv * head_dim * elem_bytes;
        bytes / per_block.max(1)
    }
}

/// One sequence's part of a batch: tokens `start..start + len` (positions), its blocks.
#[derive(Debug, Clone)]
pub struct BatchSeq {
    pub start: usize,
    pub len: usize,
    pub table: Vec<BlockId>,
}

/// A batch bound to the storage: what the model's attention layers call.
pub struct PagedBatch<'a> {
    pub kv: &'a mut PagedKv,
    pub seqs: Vec<BatchSeq>,
    /// The batch's slots and block tables in GPU memory, uploaded at the first layer.
    #[cfg(feature = "cuda")]
    meta: Option<crate::paged_cuda::BatchMeta>,
}

impl<'a> PagedBatch<'a> {
    pub fn new(kv: &'a mut PagedKv, seqs: Vec<BatchSeq>) -> Self {
        Self {
            kv,
            seqs,
            #[cfg(feature = "cuda")]
            meta: None,
        }
    }

    fn slot(&self, s: &BatchSeq, pos: usize) -> Option<usize> {
        let bs = self.kv.block_size;
        s.table.get(pos / bs).map(|&b| b as usize * bs + pos % bs)
    }
}

impl KvCache for PagedBatch<'_> {
    fn positions(&mut self, n_tokens: usize, device: &Device) -> Result<Tensor> {
        let total: usize = self.seqs.iter().map(|s| s.len).sum();
        if total != n_tokens {
            candle_core::bail!("batch covers {total} tokens, the forward pass has {n_tokens}");
        }
        let pos: Vec<u32> = self.seqs.iter().flat_map(|s| (s.start..s.start + s.len).map(|p| p as u32)).collect();
        Tensor::from_vec(pos, n_tokens, device)
    }

    fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
        let (n, h, d) = q.dims3()?;
        let n_kv = self.kv.n_kv;
        if d != self.kv.head_dim || k.dim(1)? != n_kv {
            candle_core::bail!("K/V shape {:?} does not match the paged cache ({n_kv} heads of {})", k.dims(), self.kv.head_dim);
        }
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.kv.gpu {
            if self.meta.is_none() {
                self.meta = Some(crate::paged_cuda::BatchMeta::new(&gpu.dev, &self.seqs, self.kv.block_size)?);
            }
            let Some(meta) = &self.meta else { candle_core::bail!("batch metadata missing") };
            return crate::paged_cuda::attend(gpu, meta, self.kv.block_size, layer, q, k, v, p);
        }
        let dev = q.device().clone();
        let qv = q.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let kv_new = k.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let vv_new = v.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let row = n_kv * d;
        // Write the new keys/values into their slots; map each token to (seq, position).
        let mut tok = Vec::with_capacity(n);
        let mut t = 0;
        for (si, s) in self.seqs.iter().enumerate() {
            for i in 0..s.len {
                let pos = s.start + i;
                let slot = self.slot(s, pos).ok_or_else(|| candle_core::Error::Msg(format!("no block for position {pos}")))?;
                self.kv.k[layer][slot * row..(slot + 1) * row].copy_from_slice(&kv_new[t * row..(t + 1) * row]);
                self.kv.v[layer][slot * row..(slot + 1) * row].copy_from_slice(&vv_new[t * row..(t + 1) * row]);
                tok.push((si, pos));
                t += 1;
            }
        }
        let kst = &self.kv.k[layer];
        let vst = &self.kv.v[layer];
        let bs = self.kv.block_size;
        let rep = h / n_kv;
        let seqs = &self.seqs;
        let mut out = vec![0f32; n * h * d];
        out.par_chunks_mut(d).enumerate().for_each_init(Vec::new, |scores: &mut Vec<f32>, (idx, o)| {
            let (ti, head) = (idx / h, idx % h);
            let (si, pos) = tok[ti];
            let s = &seqs[si];
            let g = head / rep;
            let qh = &qv[(ti * h + head) * d..(ti * h + head + 1) * d];
            let first = p.sliding_window.map_or(0, |w| (pos + 1).saturating_sub(w));
            scores.clear();
            let mut mx = f32::NEG_INFINITY;
            for j in first..=pos {
                let slot = s.table[j / bs] as usize * bs + j % bs;
                let kr = &kst[slot * row + g * d..slot * row + (g + 1) * d];
                let mut dot = 0f32;
                for (a, b) in qh.iter().zip(kr) {
                    dot += a * b;
                }
                let mut sc = dot * p.scale as f32;
                if let Some(cap) = p.softcap {
                    sc = (sc / cap as f32).tanh() * cap as f32;
                }
                mx = mx.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - mx).exp();
                sum += *sc;
            }
            let inv = 1.0 / sum;
            for (jj, j) in (first..=pos).enumerate() {
                let slot = s.table[j / bs] as usize * bs + j % bs;
                let vr = &vst[slot * row + g * d..slot * row + (g + 1) * d];
                let w = scores[jj] * inv;
                for (a, b) in o.iter_mut().zip(vr) {
                    *a += w * b;
                }
            }
        });
        Tensor::from_vec(out, (n, h * d), &dev)?.to_dtype(q.dtype())
    }
}
