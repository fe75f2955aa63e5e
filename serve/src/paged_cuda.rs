//! The paged K/V cache on a CUDA device: the same blocks and block tables as the CPU path
//! (`paged.rs`), stored in GPU memory and read by the kernels of
//! `kernels/paged_attention.cu` (compiled once per process with NVRTC).
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc;
use candle_core::cuda::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDevice, CudaStorage};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use hromada_models::cache::AttnParams;
use std::sync::OnceLock;

use crate::paged::BatchSeq;

const SRC: &str = include_str!("kernels/paged_attention.cu");
const MODULE: &str = "hromada_paged_attention";
/// Head dimensions the attention kernel handles (32 lanes x 8 values).
pub const MAX_HEAD_DIM: usize = 256;

fn cuda_err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA: {e}"))
}

fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let r = PTX.get_or_init(|| {
        // compute_80: PTX that the driver compiles for Ampere, Hopper and later.
        let opts = cudarc::nvrtc::CompileOptions { arch: Some("compute_80"), ..Default::default() };
        cudarc::nvrtc::compile_ptx_with_opts(SRC, opts).map(|p| p.to_src()).map_err(|e| format!("{e:?}"))
    });
    match r {
        Ok(s) => Ok(s.as_str()),
        Err(e) => Err(cuda_err(format!("compiling paged_attention.cu with NVRTC: {e}"))),
    }
}

/// How the cache stores K/V: f32, or bf16 (half the memory; rounded to nearest even).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDType {
    F32,
    BF16,
}

impl KvDType {
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::BF16 => 2,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
        }
    }
}

enum Buf {
    F32(CudaSlice<f32>),
    BF16(CudaSlice<u16>),
}

/// K and V of every layer: `[slots, n_kv * head_dim]` each, in `dtype`.
pub struct CudaKv {
    pub dev: CudaDevice,
    pub dtype: KvDType,
    k: Vec<Buf>,
    v: Vec<Buf>,
}

impl std::fmt::Debug for CudaKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKv").field("layers", &self.k.len()).field("dtype", &self.dtype).finish()
    }
}

impl CudaKv {
    pub fn new(dev: &CudaDevice, layers: usize, elems: usize, dtype: KvDType) -> Result<Self> {
        let alloc = || -> Result<Buf> {
            Ok(match dtype {
                KvDType::F32 => Buf::F32(dev.alloc_zeros::<f32>(elems)?),
                KvDType::BF16 => Buf::BF16(dev.alloc_zeros::<u16>(elems)?),
            })
        };
        let mut k = Vec::with_capacity(layers);
        let mut v = Vec::with_capacity(layers);
        for _ in 0..layers {
            k.push(alloc()?);
            v.push(alloc()?);
        }
        Ok(Self { dev: dev.clone(), dtype, k, v })
    }
}

/// A forward pass's token-to-sequence map and block tables, uploaded once per pass.
pub struct BatchMeta {
    slots: CudaSlice<i32>,
    tok_seq: CudaSlice<i32>,
    tok_pos: CudaSlice<i32>,
    tables: CudaSlice<i32>,
    n: usize,
    max_blocks: usize,
}

impl BatchMeta {
    pub fn new(dev: &CudaDevice, seqs: &[BatchSeq], block_size: usize) -> Result<Self> {
        let max_blocks = seqs.iter().map(|s| s.table.len()).max().unwrap_or(0).max(1);
        let (mut slots, mut tok_seq, mut tok_pos) = (Vec::new(), Vec::new(), Vec::new());
        let mut tables = vec![0i32; seqs.len().max(1) * max_blocks];
        for (si, s) in seqs.iter().enumerate() {
            for (bi, &b) in s.table.iter().enumerate() {
                tables[si * max_blocks + bi] = i32::try_from(b).map_err(cuda_err)?;
            }
            for pos in s.start..s.start + s.len {
                let Some(&b) = s.table.get(pos / block_size) else {
                    candle_core::bail!("no block for position {pos}");
                };
                slots.push(i32::try_from(b as usize * block_size + pos % block_size).map_err(cuda_err)?);
                tok_seq.push(si as i32);
                tok_pos.push(pos as i32);
            }
        }
        let n = slots.len();
        Ok(Self {
            slots: dev.clone_htod(&slots)?,
            tok_seq: dev.clone_htod(&tok_seq)?,
            tok_pos: dev.clone_htod(&tok_pos)?,
            tables: dev.clone_htod(&tables)?,
            n,
            max_blocks,
        })
    }
}

struct PagedAttention<'a> {
    k_cache: &'a Buf,
    v_cache: &'a Buf,
    dtype: KvDType,
    meta: &'a BatchMeta,
    block_size: usize,
    p: AttnParams,
}

fn push_buf<'a>(b: &mut cudarc::driver::LaunchArgs<'a>, buf: &'a Buf) {
    match buf {
        Buf::F32(x) => {
            b.arg(x);
        }
        Buf::BF16(x) => {
            b.arg(x);
        }
    }
}

fn f32_slice<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<cudarc::driver::CudaView<'a, f32>> {
    if !l.is_contiguous() {
        candle_core::bail!("paged attention: {what} must be contiguous");
    }
    let sl = s.as_cuda_slice::<f32>()?;
    Ok(sl.slice(l.start_offset()..l.start_offset() + l.shape().elem_count()))
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "hromada-paged-attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the CUDA paged attention got CPU tensors (the CPU path is PagedBatch's own)")
    }

    fn cuda_fwd(&self, qs: &CudaStorage, ql: &Layout, ks: &CudaStorage, kl: &Layout, vs: &CudaStorage, vl: &Layout) -> Result<(CudaStorage, Shape)> {
        let (n, h, d) = ql.shape().dims3()?;
        let n_kv = kl.shape().dims3()?.1;
        if n != self.meta.n || d > MAX_HEAD_DIM || n_kv == 0 || h % n_kv != 0 {
            candle_core::bail!("paged attention: {n} tokens ({h} heads, {n_kv} K/V heads, dim {d}) for a batch of {} tokens (dim <= {MAX_HEAD_DIM})", self.meta.n);
        }
        let dev = qs.device().clone();
        let (q, k, v) = (f32_slice(qs, ql, "q")?, f32_slice(ks, kl, "k")?, f32_slice(vs, vl, "v")?);
        let ptx = ptx()?;
        let row = (n_kv * d) as i32;
        let (ni, hi, nkvi, di) = (n as i32, h as i32, n_kv as i32, d as i32);
        // 1. New K/V into their slots.
        let sfx = self.dtype.suffix();
        let write = dev.get_or_load_custom_func(&format!("hromada_write_kv_{sfx}"), MODULE, ptx)?;
        let mut b = write.builder();
        b.arg(&k);
        b.arg(&v);
        push_buf(&mut b, self.k_cache);
        push_buf(&mut b, self.v_cache);
        b.arg(&self.meta.slots);
        b.arg(&ni);
        b.arg(&row);
        let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: ((n_kv * d).clamp(32, 256) as u32, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: the kernel reads n * row values of k and v, and writes rows of the caches
        // at slots the block manager handed to these sequences (checked in BatchMeta::new).
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        // 2. Attention over the blocks.
        // SAFETY: fully written by the kernel below (one (token, head) per thread block).
        let out = unsafe { dev.alloc::<f32>(n * h * d)? };
        let attn = dev.get_or_load_custom_func(&format!("hromada_paged_attention_{sfx}"), MODULE, ptx)?;
        let mut b = attn.builder();
        let (bs, mb) = (self.block_size as i32, self.meta.max_blocks as i32);
        let scale = self.p.scale as f32;
        let softcap = self.p.softcap.unwrap_or(0.0) as f32;
        let window = self.p.sliding_window.map_or(0, |w| w.min(i32::MAX as usize) as i32);
        b.arg(&out);
        b.arg(&q);
        push_buf(&mut b, self.k_cache);
        push_buf(&mut b, self.v_cache);
        b.arg(&self.meta.tok_seq);
        b.arg(&self.meta.tok_pos);
        b.arg(&self.meta.tables);
        b.arg(&ni);
        b.arg(&hi);
        b.arg(&nkvi);
        b.arg(&di);
        b.arg(&bs);
        b.arg(&mb);
        b.arg(&scale);
        b.arg(&softcap);
        b.arg(&window);
        let cfg = LaunchConfig { grid_dim: ((n * h) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: indices come from BatchMeta (positions within each table) and the shapes above.
        unsafe { b.launch(cfg) }.map_err(cuda_err)?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((n, h * d))))
    }
}

/// Store the new K/V of `layer` and attend, all on the GPU. `q`: `[n, h, d]`, `k`, `v`:
/// `[n, n_kv, d]`; returns `[n, h * d]` in q's dtype.
pub fn attend(kv: &CudaKv, meta: &BatchMeta, block_size: usize, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, p: &AttnParams) -> Result<Tensor> {
    let dt = q.dtype();
    let (n, h, d) = q.dims3()?;
    if n == 0 {
        // Nothing to launch (a grid of zero blocks is a launch error).
        return Tensor::zeros((0, h * d), dt, q.device());
    }
    let f = |t: &Tensor| -> Result<Tensor> { t.to_dtype(DType::F32)?.contiguous() };
    let (q32, k32, v32) = (f(q)?, f(k)?, f(v)?);
    let (Some(k_cache), Some(v_cache)) = (kv.k.get(layer), kv.v.get(layer)) else {
        candle_core::bail!("paged attention: no layer {layer} in the cache");
    };
    let op = PagedAttention { k_cache, v_cache, dtype: kv.dtype, meta, block_size, p: *p };
    q32.apply_op3_no_bwd(&k32, &v32, &op)?.to_dtype(dt)
}
