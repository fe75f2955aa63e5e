//! Paged K/V storage and variable-length attention over block tables (CPU).
//!
//! K/V live in fixed-size blocks (`block_size` token slots each) per layer; a sequence
//! owns a block table. One forward pass carries any mix of prefill chunks and decode
//! tokens from many sequences (packed along the token axis); each token attends to the
//! keys of its own sequence only, read straight from the blocks (no gather copy).
use candle_core::{DType, Device, Result, Tensor};
use hromada_models::cache::{AttnParams, KvCache};
use half::f16;
use hromada_models::kernels::attn::{self, attend_paged, write_kv, write_kv_q8, KvElem, PagedLayout, RowSpec, Scales};
use rayon::prelude::*;

use crate::block_manager::BlockId;

/// One layer's K or V blocks in host memory: f32, or f16 (half the bytes a decode step
/// streams, as llama.cpp's default cache; widened to f32 as the attention reads it).
#[derive(Debug)]
enum CpuStore {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// 8-bit values and one f32 scale per (slot, K/V head) row.
    Q8(Vec<i8>, Vec<f32>),
}


/// The element type of the paged cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvCacheDType {
    /// On the CPU: 8-bit for quantized models, f16 for half-precision models, f32 for f32
    /// models (the parity path). On a GPU: bf16 for bf16/f16 models, else f32.
    #[default]
    Auto,
    F32,
    F16,
    /// 8-bit values with one scale per (slot, K/V head), on the CPU (llama.cpp's `q8_0`
    /// cache type): a quarter of f32's bytes, half of f16's. The `auto` choice for
    /// quantized weights: their own rounding is far larger (measured in BENCHMARKS.md:
    /// +0.0003 bits per byte on Ukrainian text against f16), and a batched decode step
    /// reads half the K/V bytes.
    Q8,
}

impl std::str::FromStr for KvCacheDType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" | "half" => Ok(Self::F16),
            "q8" | "q8_0" | "int8" | "i8" => Ok(Self::Q8),
            other => Err(format!("unknown KV cache dtype `{other}` (expected auto, f32, f16 or q8)")),
        }
    }
}

/// K/V storage for all layers.
#[derive(Debug)]
pub struct PagedKv {
    pub block_size: usize,
    pub num_blocks: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    /// Per layer, on the CPU.
    k: Vec<CpuStore>,
    v: Vec<CpuStore>,
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

    /// What a CPU cache for this model holds under `choice` (F32, F16 or Q8): `auto` is
    /// 8-bit with quantized weights where the integer attention kernels run (AVX-512
    /// VNNI; elsewhere the 8-bit store takes a scalar kernel, so f16), f16 with
    /// half-precision activations, else f32.
    pub fn cpu_kind(choice: KvCacheDType, dtype: DType, weights_quantized: bool) -> KvCacheDType {
        match choice {
            KvCacheDType::Auto if weights_quantized && attn::q8::vectorized() => KvCacheDType::Q8,
            KvCacheDType::Auto if weights_quantized => KvCacheDType::F16,
            KvCacheDType::Auto if matches!(dtype, DType::BF16 | DType::F16) => KvCacheDType::F16,
            KvCacheDType::Auto => KvCacheDType::F32,
            other => other,
        }
    }

    /// `kind` for a CPU cache of this block size and head dim. The 8-bit store's layout
    /// needs both to be multiples of 4 ([`PagedLayout::q8_fits`]): where they are not, an
    /// 8-bit cache the user asked for (`requested` Q8) is refused by name, and one that
    /// `auto` chose becomes f16.
    pub fn fit_kind(kind: KvCacheDType, requested: KvCacheDType, block_size: usize, head_dim: usize) -> std::result::Result<KvCacheDType, String> {
        let layout = PagedLayout { block_size, n_kv: 1, head_dim, num_blocks: 1 };
        match kind {
            KvCacheDType::Q8 if !layout.q8_fits() && requested == KvCacheDType::Q8 => {
                Err(format!("--kv-cache-dtype q8 needs a block size and a head dim that are multiples of 4 (block size {block_size}, head dim {head_dim})"))
            }
            KvCacheDType::Q8 if !layout.q8_fits() => Ok(KvCacheDType::F16),
            k => Ok(k),
        }
    }

    /// Bytes one (slot, K/V head) row of keys or values takes in a CPU cache of `kind`.
    pub fn cpu_row_bytes(kind: KvCacheDType, head_dim: usize) -> usize {
        match kind {
            KvCacheDType::F16 => 2 * head_dim,
            KvCacheDType::Q8 => head_dim + 4,
            _ => 4 * head_dim,
        }
    }

    /// A CPU cache of f16 (`kind` F16) or 8-bit (Q8) values; f32 otherwise.
    pub fn new_cpu(kind: KvCacheDType, layers: usize, num_blocks: usize, block_size: usize, n_kv: usize, head_dim: usize) -> Self {
        let layout = PagedLayout { block_size, n_kv, head_dim, num_blocks };
        let n = layout.len();
        let store = || match kind {
            KvCacheDType::F16 => CpuStore::F16(vec![f16::ZERO; n]),
            KvCacheDType::Q8 => CpuStore::Q8(vec![0i8; n], vec![0f32; layout.scales_len()]),
            _ => CpuStore::F32(vec![0f32; n]),
        };
        Self {
            block_size,
            num_blocks,
            n_kv,
            head_dim,
            k: (0..layers).map(|_| store()).collect(),
            v: (0..layers).map(|_| store()).collect(),
            #[cfg(feature = "cuda")]
            gpu: None,
        }
    }

    /// The blocks on `device`: host memory for the CPU, device memory for a GPU (in bf16
    /// when the model computes in bf16 or f16).
    pub fn new(layers: usize, num_blocks: usize, block_size: usize, n_kv: usize, head_dim: usize, device: &Device, dtype: DType) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let n = num_blocks * block_size * n_kv * head_dim;
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
        Ok(Self::new_cpu(KvCacheDType::F32, layers, num_blocks, block_size, n_kv, head_dim))
    }

    /// The shape of each layer's CPU stores.
    pub fn layout(&self) -> PagedLayout {
        PagedLayout { block_size: self.block_size, n_kv: self.n_kv, head_dim: self.head_dim, num_blocks: self.num_blocks }
    }

    /// How many blocks fit in `bytes` (K and V, all layers, `row_bytes` per (slot, K/V
    /// head) row: `head_dim · elem_bytes`, or [`Self::cpu_row_bytes`]).
    pub fn blocks_for_budget(bytes: usize, layers: usize, block_size: usize, n_kv: usize, row_bytes: usize) -> usize {
        let per_block = 2 * layers * block_size * n_kv * row_bytes;
        bytes / per_block.max(1)
    }
}

/// One sequence's part of a batch: tokens `start..start + len` (positions), its blocks.
#[derive(Debug, Clone)]
pub struct BatchSeq {
    pub start: usize,
    pub len: usize,
    pub table: Vec<BlockId>,
    /// The sequence's prompt length: its rows at positions below it are prompt rows
    /// (`KvCache::prompt_rows`), the others generated tokens' (also when recomputed
    /// after a preemption).
    pub prompt_len: usize,
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
        s.table.get(pos / bs).filter(|&&b| (b as usize) < self.kv.num_blocks).map(|&b| b as usize * bs + pos % bs)
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

    fn prompt_rows(&self, _n_tokens: usize) -> Vec<bool> {
        if self.seqs.iter().all(|s| s.start >= s.prompt_len) {
            return Vec::new();
        }
        self.seqs.iter().flat_map(|s| (s.start..s.start + s.len).map(|p| p < s.prompt_len)).collect()
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
        let layout = self.kv.layout();
        let mut tok = Vec::with_capacity(n);
        let mut t = 0;
        for (si, s) in self.seqs.iter().enumerate() {
            for i in 0..s.len {
                let pos = s.start + i;
                let slot = self.slot(s, pos).ok_or_else(|| candle_core::Error::Msg(format!("no block for position {pos}")))?;
                let (kn, vn) = (&kv_new[t * row..(t + 1) * row], &vv_new[t * row..(t + 1) * row]);
                match (&mut self.kv.k[layer], &mut self.kv.v[layer]) {
                    (CpuStore::F32(ks), CpuStore::F32(vs)) => write_kv(ks, vs, &layout, slot, kn, vn),
                    (CpuStore::F16(ks), CpuStore::F16(vs)) => write_kv(ks, vs, &layout, slot, kn, vn),
                    (CpuStore::Q8(ks, kss), CpuStore::Q8(vs, vss)) => write_kv_q8(ks, kss, vs, vss, &layout, slot, kn, vn),
                    _ => candle_core::bail!("paged cache layer {layer}: K and V stores differ in dtype"),
                }
                tok.push((si, pos));
                t += 1;
            }
        }
        let rep = h / n_kv;
        let spec = RowSpec { head_dim: d, scale: p.scale as f32, softcap: p.softcap.map(|c| c as f32) };
        let mut out = vec![0f32; n * h * d];
        let (seqs, window) = (&self.seqs, p.sliding_window);
        match (&self.kv.k[layer], &self.kv.v[layer]) {
            (CpuStore::F32(ks), CpuStore::F32(vs)) => attend_tokens(ks, vs, None, &layout, seqs, &tok, &qv, &mut out, rep, window, spec),
            (CpuStore::F16(ks), CpuStore::F16(vs)) => attend_tokens(ks, vs, None, &layout, seqs, &tok, &qv, &mut out, rep, window, spec),
            (CpuStore::Q8(ks, kss), CpuStore::Q8(vs, vss)) => attend_tokens(ks, vs, Some(Scales { k: kss, v: vss }), &layout, seqs, &tok, &qv, &mut out, rep, window, spec),
            _ => candle_core::bail!("paged cache layer {layer}: K and V stores differ in dtype"),
        }
        Tensor::from_vec(out, (n, h * d), &dev)?.to_dtype(q.dtype())
    }
}

/// Every token of the batch against its own sequence's keys: one task per token, or per
/// run of consecutive prompt tokens of one sequence (`attn::token_group` of them, which
/// share each key and value read and get the bits they get alone), each group of query
/// heads sharing a K/V head at a time.
#[allow(clippy::too_many_arguments)]
fn attend_tokens<E: KvElem>(
    keys: &[E],
    values: &[E],
    scales: Option<Scales>,
    layout: &PagedLayout,
    seqs: &[BatchSeq],
    tok: &[(usize, usize)],
    qv: &[f32],
    out: &mut [f32],
    rep: usize,
    window: Option<usize>,
    spec: RowSpec,
) {
    let d = layout.head_dim;
    let h = layout.n_kv * rep;
    let first_of = |pos: usize| window.map_or(0, |w| (pos + 1).saturating_sub(w));
    // Runs of consecutive positions of one sequence with the same visible start.
    let most = attn::token_group(rep);
    let mut groups: Vec<(usize, usize)> = Vec::with_capacity(tok.len());
    for (ti, &(si, pos)) in tok.iter().enumerate() {
        match groups.last_mut() {
            Some((t0, cnt)) if *cnt < most && tok[*t0].0 == si && tok[*t0].1 + *cnt == pos && first_of(tok[*t0].1) == first_of(pos) => *cnt += 1,
            _ => groups.push((ti, 1)),
        }
    }
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(groups.len());
    let mut rest = out;
    for &(_, cnt) in &groups {
        let (part, tail) = std::mem::take(&mut rest).split_at_mut(cnt * h * d);
        parts.push(part);
        rest = tail;
    }
    groups.par_iter().zip(parts).for_each_init(Vec::new, |scratch: &mut Vec<f32>, (&(t0, cnt), o)| {
        let (si, pos0) = tok[t0];
        let table = &seqs[si].table;
        let first = first_of(pos0);
        for g in 0..layout.n_kv {
            // The next K/V head's blocks on their way while this one computes.
            if g + 1 < layout.n_kv {
                attn::prefetch_paged(keys, values, scales, layout, g + 1, table, first, pos0 + cnt - 1);
            }
            let heads = g * rep..(g + 1) * rep;
            let (q0, q1) = ((t0 * h + heads.start) * d, ((t0 + cnt - 1) * h + heads.end) * d);
            let (o0, o1) = (heads.start * d, ((cnt - 1) * h + heads.end) * d);
            if cnt > 1 && attn::attend_paged_tokens(&qv[q0..q1], h * d, cnt, rep, keys, values, scales, layout, g, table, first, pos0, spec, scratch, &mut o[o0..o1]) {
                continue;
            }
            for i in 0..cnt {
                let (ti, pos) = (t0 + i, pos0 + i);
                let qs = &qv[(ti * h + heads.start) * d..(ti * h + heads.end) * d];
                attend_paged(qs, keys, values, scales, layout, g, table, first_of(pos), pos, spec, scratch, &mut o[(i * h + heads.start) * d..(i * h + heads.end) * d]);
            }
        }
    });
}
