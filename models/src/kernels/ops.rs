//! The inference forward pass's elementwise work on the CPU (RMSNorm, RoPE, the gated
//! activations, residual adds), run on hromada's compute pool.
//!
//! candle's CPU backend runs these ops on a second thread pool of its own whose workers
//! spin after every op; on a 2-core machine they took a core away from the matmul
//! kernels running on this pool (about a fifth of prefill time), and its SiLU called
//! libm's `expf` per value. Here each op is one pass over contiguous f32 rows, split
//! into row chunks on this pool when it is large, with AVX2 where the CPU has it.
//!
//! Every function takes and returns candle tensors and falls back to candle's op for
//! anything but contiguous f32 tensors on the CPU, so callers need no second path.
use candle_core::{DType, Result, Storage, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Elements below which an op runs on the calling thread (a decode step's rows).
const PAR_MIN: usize = 1 << 13;

/// A tensor's values in place, from its `storage_and_layout()`: Some when they are
/// contiguous f32 on the CPU.
pub fn cpu_f32<'a>(storage: &'a Storage, layout: &candle_core::Layout) -> Option<&'a [f32]> {
    let Storage::Cpu(candle_core::CpuStorage::F32(v)) = storage else { return None };
    let (a, b) = layout.contiguous_offsets()?;
    v.get(a..b)
}

/// Runs `f(slices...)` over the contiguous f32 CPU data of `ts`, or returns None.
fn with_f32<R>(ts: &[&Tensor], f: impl FnOnce(&[&[f32]]) -> R) -> Option<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[f32]> = Vec::with_capacity(ts.len());
    for (g, l) in &guards {
        slices.push(cpu_f32(g, l)?);
    }
    Some(f(&slices))
}

/// A new buffer of `n` values, filled by `f(first_row, chunk)` over chunks of whole rows of
/// `width` values, in parallel when the work is large. The buffer is not zeroed first
/// (zeroing a prompt's activations cost about 3% of its forward pass): every `f` writes
/// its whole chunk.
fn filled(n: usize, width: usize, f: impl Fn(usize, &mut [MaybeUninit<f32>]) + Sync) -> Vec<f32> {
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let out = &mut v.spare_capacity_mut()[..n];
    let rows = n / width.max(1);
    if n < PAR_MIN || rows < 2 {
        f(0, out);
    } else {
        let per = (PAR_MIN / width).max(1);
        out.par_chunks_mut(per * width).enumerate().for_each(|(c, ch)| f(c * per, ch));
    }
    // SAFETY: the chunks cover all n values and every caller's `f` writes its whole chunk.
    unsafe { v.set_len(n) };
    v
}

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let hidden = w.elem_count();
    // Only whole rows (`filled` writes every value); anything else goes to candle.
    let fits = hidden > 0 && x.elem_count().is_multiple_of(hidden);
    let res = if !fits {
        None
    } else {
        with_f32(&[x, w], |s| {
            let (xs, ws) = (s[0], s[1]);
            filled(xs.len(), hidden, |r0, ch| {
                for (i, o) in ch.chunks_exact_mut(hidden).enumerate() {
                    let row = &xs[(r0 + i) * hidden..(r0 + i + 1) * hidden];
                    let ss = sum_sq(row);
                    let inv = 1.0 / ((ss / hidden as f32) + eps as f32).sqrt();
                    for ((o, &v), &g) in o.iter_mut().zip(row).zip(ws) {
                        o.write(v * inv * g);
                    }
                }
            })
        })
    };
    match res {
        Some(v) => Tensor::from_vec(v, x.shape(), x.device()),
        _ => candle_nn::ops::rms_norm(&x.contiguous()?, &w.to_dtype(x.dtype())?, eps as f32),
    }
}

/// Σ v², sixteen partial sums (vectorised by the compiler on any target).
fn sum_sq(v: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ch = v.chunks_exact(16);
    for c in &mut ch {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += x * x;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &x in ch.remainder() {
        s += x * x;
    }
    s
}

/// Rotary embedding, halves rotated (Llama/HF layout): `x`: `[n, heads, d]`, `cos`/`sin`:
/// `[n, d/2]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, h, d) = x.dims3()?;
    let half = d / 2;
    // Only shapes the kernel writes completely (`filled`); anything else goes to candle.
    let fits = d % 2 == 0 && cos.elem_count() == n * half && sin.elem_count() == n * half;
    let res = if !fits {
        None
    } else {
        with_f32(&[x, cos, sin], |s| {
            let (xs, cs, ss) = (s[0], s[1], s[2]);
            filled(xs.len(), h * d, |t0, ch| {
                for (i, o) in ch.chunks_exact_mut(h * d).enumerate() {
                    let t = t0 + i;
                    let (c, sn) = (&cs[t * half..(t + 1) * half], &ss[t * half..(t + 1) * half]);
                    for hh in 0..h {
                        let src = &xs[(t * h + hh) * d..(t * h + hh + 1) * d];
                        let dst = &mut o[hh * d..(hh + 1) * d];
                        let (x1, x2) = src.split_at(half);
                        let (d1, d2) = dst.split_at_mut(half);
                        for j in 0..half {
                            d1[j].write(x1[j] * c[j] - x2[j] * sn[j]);
                            d2[j].write(x1[j] * sn[j] + x2[j] * c[j]);
                        }
                    }
                }
            })
        })
    };
    match res {
        Some(v) => Tensor::from_vec(v, (n, h, d), x.device()),
        _ => {
            let x = x.unsqueeze(0)?.contiguous()?;
            candle_nn::rotary_emb::rope_thd(&x, cos, sin)?.squeeze(0)
        }
    }
}

/// `silu(g) · u` (SwiGLU), one pass.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let res = if g.shape() == u.shape() { with_f32(&[g, u], |s| map2(s[0], s[1], Act::Silu)) } else { None };
    match res {
        Some(v) => Tensor::from_vec(v, g.shape(), g.device()),
        None => g.silu()? * u,
    }
}

/// `gelu_tanh(g) · u` (GeGLU with the tanh approximation, as Gemma), one pass.
pub fn gelu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let res = if g.shape() == u.shape() { with_f32(&[g, u], |s| map2(s[0], s[1], Act::Gelu)) } else { None };
    match res {
        Some(v) => Tensor::from_vec(v, g.shape(), g.device()),
        None => g.gelu()? * u,
    }
}

/// `a + b` for equal shapes.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let res = if a.shape() == b.shape() { with_f32(&[a, b], |s| map2(s[0], s[1], Act::Add)) } else { None };
    match res {
        Some(v) => Tensor::from_vec(v, a.shape(), a.device()),
        None => a + b,
    }
}

#[derive(Clone, Copy)]
enum Act {
    Silu,
    Gelu,
    Add,
}

fn map2(a: &[f32], b: &[f32], act: Act) -> Vec<f32> {
    let width = 4096;
    filled(a.len(), width, |r0, ch| {
        let (a, b) = (&a[r0 * width..r0 * width + ch.len()], &b[r0 * width..r0 * width + ch.len()]);
        #[cfg(target_arch = "x86_64")]
        if super::has_avx2() {
            let out = ch.as_mut_ptr() as *mut f32;
            // SAFETY: AVX2, FMA and F16C were detected (AVX-512F too for the wide
            // kernel); the slices and `ch` have equal length, and the kernels write all
            // of `ch`: the wide one its whole 16-lane blocks, the narrow one the rest.
            unsafe {
                let done = if super::has_avx512() { map2_avx512(a, b, out, act) } else { 0 };
                map2_avx2(&a[done..], &b[done..], out.add(done), act);
            }
            return;
        }
        for ((o, &x), &y) in ch.iter_mut().zip(a).zip(b) {
            o.write(match act {
                Act::Silu => x / (1.0 + (-x).exp()) * y,
                Act::Gelu => gelu_tanh(x) * y,
                Act::Add => x + y,
            });
        }
    })
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// [`map2_avx2`] sixteen lanes at a time, with the same steps per lane (so the same bits);
/// returns how many leading values it wrote (whole blocks of 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map2_avx512(a: &[f32], b: &[f32], out: *mut f32, act: Act) -> usize {
    use std::arch::x86_64::*;
    let mut i = 0;
    while i + 16 <= a.len() {
        let (x, y) = (_mm512_loadu_ps(a.as_ptr().add(i)), _mm512_loadu_ps(b.as_ptr().add(i)));
        _mm512_storeu_ps(out.add(i), act512(x, y, act));
        i += 16;
    }
    i
}

/// One sixteen-lane step of [`map2_avx512`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline]
unsafe fn act512(x: std::arch::x86_64::__m512, y: std::arch::x86_64::__m512, act: Act) -> std::arch::x86_64::__m512 {
    use super::simd::exp512;
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    match act {
        Act::Silu => _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)))), y),
        Act::Gelu => {
            let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
            let z = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI), _mm512_fmadd_ps(_mm512_set1_ps(0.044715), x3, x));
            let e = exp512(_mm512_mul_ps(_mm512_set1_ps(-2.0), z));
            _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), y)
        }
        Act::Add => _mm512_add_ps(x, y),
    }
}

/// The gated activation of a feed-forward block: `act(g) · u`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// SiLU (Llama, Qwen, SmolLM2).
    Silu,
    /// GELU with the tanh approximation (Gemma).
    Gelu,
}

impl Glu {
    fn act(self) -> Act {
        match self {
            Glu::Silu => Act::Silu,
            Glu::Gelu => Act::Gelu,
        }
    }
}

/// `act(g) · u` elementwise over equal-length slices (the pass [`silu_mul`] and
/// [`gelu_mul`] make).
pub(crate) fn glu_slices(g: &[f32], u: &[f32], act: Glu) -> Vec<f32> {
    map2(g, u, act.act())
}

/// `out[0..16] = act(g[0..16]) · u[0..16]`: the same steps, so the same bits, as
/// [`glu_slices`] gives those lanes where AVX-512 runs (the bf16 tile path's epilogue).
///
/// # Safety
/// AVX-512F, AVX2 and FMA are available; `g` and `u` are valid for 16 reads and `out`
/// for 16 writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) unsafe fn glu16(g: *const f32, u: *const f32, out: *mut f32, act: Glu) {
    use std::arch::x86_64::*;
    _mm512_storeu_ps(out, act512(_mm512_loadu_ps(g), _mm512_loadu_ps(u), act.act()));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn map2_avx2(a: &[f32], b: &[f32], out: *mut f32, act: Act) {
    use super::simd::exp256;
    use std::arch::x86_64::*;
    let n = a.len();
    let one = _mm256_set1_ps(1.0);
    let f = |x: __m256, y: __m256| -> __m256 {
        match act {
            // x / (1 + e^-x)
            Act::Silu => _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x)))), y),
            // 0.5·x·(1 + tanh(z)) = x / (1 + e^{-2z}), z = sqrt(2/pi)·(x + 0.044715·x³)
            Act::Gelu => {
                let x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
                let z = _mm256_mul_ps(_mm256_set1_ps(SQRT_2_OVER_PI), _mm256_fmadd_ps(_mm256_set1_ps(0.044715), x3, x));
                let e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0), z));
                _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), y)
            }
            Act::Add => _mm256_add_ps(x, y),
        }
    };
    let mut i = 0;
    while i + 8 <= n {
        let r = f(_mm256_loadu_ps(a.as_ptr().add(i)), _mm256_loadu_ps(b.as_ptr().add(i)));
        _mm256_storeu_ps(out.add(i), r);
        i += 8;
    }
    if i < n {
        let (mut xa, mut xb, mut xo) = ([0f32; 8], [0f32; 8], [0f32; 8]);
        xa[..n - i].copy_from_slice(&a[i..]);
        xb[..n - i].copy_from_slice(&b[i..]);
        _mm256_storeu_ps(xo.as_mut_ptr(), f(_mm256_loadu_ps(xa.as_ptr()), _mm256_loadu_ps(xb.as_ptr())));
        std::ptr::copy_nonoverlapping(xo.as_ptr(), out.add(i), n - i);
    }
}

/// Whether `t` is an f32 tensor on the CPU (the case these kernels speed up).
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rand(n: usize, seed: u64, scale: f64) -> Vec<f32> {
        let mut rng = crate::sampling::Rng::new(seed);
        (0..n).map(|_| ((rng.next_f64() - 0.5) * scale) as f32).collect()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() / y.abs().max(1.0)).fold(0f32, f32::max)
    }

    #[test]
    fn ops_match_candle_small_and_parallel() {
        let dev = Device::Cpu;
        // 3 rows (serial) and 700 rows (split across the pool), odd widths for the tails.
        for &(rows, hidden) in &[(3usize, 72usize), (700, 576)] {
            let x = Tensor::from_vec(rand(rows * hidden, 1, 6.0), (rows, hidden), &dev).unwrap();
            let y = Tensor::from_vec(rand(rows * hidden, 2, 6.0), (rows, hidden), &dev).unwrap();
            let w = Tensor::from_vec(rand(hidden, 3, 2.0), hidden, &dev).unwrap();
            let want = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
            assert!(max_rel(&rms_norm(&x, &w, 1e-5).unwrap(), &want) < 1e-5);
            assert!(max_rel(&silu_mul(&x, &y).unwrap(), &(x.silu().unwrap() * &y).unwrap()) < 1e-5);
            assert!(max_rel(&gelu_mul(&x, &y).unwrap(), &(x.gelu().unwrap() * &y).unwrap()) < 1e-5);
            assert!(max_rel(&add(&x, &y).unwrap(), &(&x + &y).unwrap()) == 0.0);
            // RoPE: [n, heads, d] with d = 64.
            let (h, d) = (3, 64);
            let q = Tensor::from_vec(rand(rows * h * d, 4, 2.0), (rows, h, d), &dev).unwrap();
            let c = Tensor::from_vec(rand(rows * d / 2, 5, 2.0), (rows, d / 2), &dev).unwrap();
            let s = Tensor::from_vec(rand(rows * d / 2, 6, 2.0), (rows, d / 2), &dev).unwrap();
            let want = candle_nn::rotary_emb::rope_thd(&q.unsqueeze(0).unwrap(), &c, &s).unwrap().squeeze(0).unwrap();
            assert!(max_rel(&rope(&q, &c, &s).unwrap(), &want) < 1e-6);
        }
        // Non-f32 input falls back to candle.
        let x = Tensor::from_vec(rand(16, 7, 2.0), (2, 8), &dev).unwrap().to_dtype(DType::F64).unwrap();
        assert_eq!(add(&x, &x).unwrap().dtype(), DType::F64);
    }
}
