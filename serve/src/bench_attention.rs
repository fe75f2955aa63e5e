//! `hromada bench attention`: the paged attention of one decode step on the CPU, alone.
//!
//! A cache of `kv_cache_mib` in the chosen element type, `seqs` sequences of `context`
//! tokens whose blocks are scattered over the whole cache (as a long-running server's
//! block manager leaves them), and one new token per sequence: each timed step calls the
//! server's own attention (`PagedBatch::attend`: write the new K/V, then attend) for
//! every layer, on the compute pool, as a decode step does. Reports the best and median
//! step time and the K/V bytes read per second. The defaults are SmolLM2-135M's shape.
//! `contiguous` lays each sequence's blocks side by side instead.
use std::time::Instant;

use candle_core::{Device, Tensor};
use hromada_models::cache::{AttnParams, KvCache};
use serde::Serialize;

use crate::paged::{BatchSeq, KvCacheDType, PagedBatch, PagedKv};

#[derive(Debug, Clone)]
pub struct AttnBenchConfig {
    pub layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub seqs: usize,
    pub context: usize,
    pub block_size: usize,
    pub kv_cache_mib: usize,
    pub reps: usize,
    /// Each sequence's blocks consecutive (as an allocator that kept a sequence's blocks
    /// together would leave them) instead of scattered.
    pub contiguous: bool,
}

impl Default for AttnBenchConfig {
    fn default() -> Self {
        Self { layers: 30, n_heads: 9, n_kv_heads: 3, head_dim: 64, seqs: 16, context: 160, block_size: 16, kv_cache_mib: 512, reps: 20, contiguous: false }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AttnBenchResult {
    pub kv_cache_dtype: String,
    pub num_blocks: usize,
    pub best_ms: f64,
    pub median_ms: f64,
    /// K/V bytes a step reads (every visible key and value row of every layer, with the
    /// 8-bit rows' scales) over the best step time.
    pub gb_per_s: f64,
}

/// One decode step's attention, `cfg.reps` times (after two untimed warm-up steps).
pub fn run(kind: KvCacheDType, cfg: &AttnBenchConfig) -> Result<AttnBenchResult, String> {
    let kind = match kind {
        KvCacheDType::Auto => KvCacheDType::F16,
        k => k,
    };
    let c = cfg;
    if c.layers == 0 || c.seqs == 0 || c.reps == 0 || c.block_size == 0 || c.head_dim == 0 || c.n_kv_heads == 0 || c.n_heads % c.n_kv_heads != 0 {
        return Err(format!("bad shape: {c:?} (layers, seqs, reps, block size, head dim and K/V heads > 0; heads a multiple of K/V heads)"));
    }
    let kind = PagedKv::fit_kind(kind, kind, c.block_size, c.head_dim)?;
    let row = PagedKv::cpu_row_bytes(kind, c.head_dim);
    let budget = c.kv_cache_mib.checked_mul(1 << 20).ok_or_else(|| format!("--kv-cache-mib {} is too large", c.kv_cache_mib))?;
    let num_blocks = PagedKv::blocks_for_budget(budget, c.layers, c.block_size, c.n_kv_heads, row);
    let need = c.context.saturating_add(1).div_ceil(c.block_size).saturating_mul(c.seqs);
    if need > num_blocks {
        return Err(format!("{} sequences of {} tokens need {need} blocks; {} MiB holds {num_blocks} (raise --kv-cache-mib)", c.seqs, c.context.saturating_add(1), c.kv_cache_mib));
    }
    let per_seq = need / c.seqs;
    // Scatter: a fixed permutation of all blocks (xorshift), each sequence a run of it;
    // `contiguous`: the identity, each sequence's blocks consecutive in memory.
    let mut perm: Vec<u32> = (0..num_blocks as u32).collect();
    if !c.contiguous {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for i in (1..perm.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            perm.swap(i, (x % (i as u64 + 1)) as usize);
        }
    }
    let seqs: Vec<BatchSeq> = (0..c.seqs).map(|s| BatchSeq { start: c.context, len: 1, table: perm[s * per_seq..(s + 1) * per_seq].to_vec(), prompt_len: 0 }).collect();
    let mut kv = PagedKv::new_cpu(kind, c.layers, num_blocks, c.block_size, c.n_kv_heads, c.head_dim);
    let dev = Device::Cpu;
    let vals = |n: usize, salt: usize| -> Vec<f32> { (0..n).map(|i| (((i * 7919 + salt) % 1999) as f32 / 1999.0) - 0.5).collect() };
    let err = |e: candle_core::Error| e.to_string();
    let q = Tensor::from_vec(vals(c.seqs * c.n_heads * c.head_dim, 1), (c.seqs, c.n_heads, c.head_dim), &dev).map_err(err)?;
    let k = Tensor::from_vec(vals(c.seqs * c.n_kv_heads * c.head_dim, 2), (c.seqs, c.n_kv_heads, c.head_dim), &dev).map_err(err)?;
    let v = Tensor::from_vec(vals(c.seqs * c.n_kv_heads * c.head_dim, 3), (c.seqs, c.n_kv_heads, c.head_dim), &dev).map_err(err)?;
    let params = AttnParams { n_heads: c.n_heads, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim, scale: 1.0 / (c.head_dim as f64).sqrt(), sliding_window: None, softcap: None };
    // Every layer's attention for one batch, on the compute pool as the engine runs it.
    let mut attend_all = |batch: Vec<BatchSeq>, q: &Tensor, k: &Tensor, v: &Tensor| {
        hromada_models::kernels::pool().install(|| {
            let mut batch = PagedBatch::new(&mut kv, batch);
            (0..c.layers).try_for_each(|layer| batch.attend(layer, q, k, v, &params).map(drop)).map_err(err)
        })
    };
    // Fill every sequence's blocks first, through the same path (a prefill): blocks never
    // written would be the kernel's shared zero page and read from cache.
    let n = c.seqs * (c.context + 1);
    let t = |h: usize, salt: usize| Tensor::from_vec(vals(n * h * c.head_dim, salt), (n, h, c.head_dim), &dev);
    let (pq, pk, pv) = (t(c.n_heads, 4).map_err(err)?, t(c.n_kv_heads, 5).map_err(err)?, t(c.n_kv_heads, 6).map_err(err)?);
    let prefill: Vec<BatchSeq> = seqs.iter().map(|s| BatchSeq { start: 0, len: c.context + 1, table: s.table.clone(), prompt_len: 0 }).collect();
    attend_all(prefill, &pq, &pk, &pv)?;
    let mut step = || -> Result<f64, String> {
        let t = Instant::now();
        attend_all(seqs.clone(), &q, &k, &v)?;
        Ok(t.elapsed().as_secs_f64())
    };
    step()?;
    step()?;
    let mut times = (0..c.reps).map(|_| step()).collect::<Result<Vec<f64>, String>>()?;
    times.sort_by(f64::total_cmp);
    let best = times[0];
    let bytes = (c.seqs * (c.context + 1) * c.layers * 2 * c.n_kv_heads * row) as f64;
    Ok(AttnBenchResult {
        kv_cache_dtype: format!("{kind:?}").to_lowercase(),
        num_blocks,
        best_ms: best * 1e3,
        median_ms: times[times.len() / 2] * 1e3,
        gb_per_s: bytes / best / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_every_cache_type_and_refuses_a_cache_too_small() {
        let cfg = AttnBenchConfig { layers: 2, seqs: 3, context: 40, kv_cache_mib: 4, reps: 2, ..Default::default() };
        for kind in [KvCacheDType::F32, KvCacheDType::F16, KvCacheDType::Q8] {
            for contiguous in [false, true] {
                let r = run(kind, &AttnBenchConfig { contiguous, ..cfg.clone() }).unwrap();
                assert!(r.best_ms > 0.0 && r.best_ms <= r.median_ms && r.gb_per_s > 0.0, "{r:?}");
            }
        }
        let small = AttnBenchConfig { kv_cache_mib: 1, context: 4000, ..cfg.clone() };
        assert!(run(KvCacheDType::F16, &small).unwrap_err().contains("raise --kv-cache-mib"));
        let bad = AttnBenchConfig { n_heads: 4, ..cfg };
        assert!(run(KvCacheDType::F16, &bad).unwrap_err().contains("bad shape"));
    }
}
