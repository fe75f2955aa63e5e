//! Q4_1 weights times f32 activations, the way llama.cpp does it on the CPU: activations
//! are quantized per 32-block to 8 bits (Q8_1: scale and scaled sum), and every block
//! dot product is an integer dot product of 4-bit and 8-bit values, with AVX2 when the
//! CPU has it. candle has no SIMD path for Q4_1 (its scalar `vec_dot_unopt` made decode
//! 5x slower than llama.cpp on the same file).
//!
//! Weights are repacked at load time into structure-of-arrays form (f32 scales and mins,
//! packed nibbles), so the inner loop converts no half floats.
use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;
const BLOCK_BYTES: usize = 20;

/// A `[n, k]` Q4_1 matrix, repacked.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    pub n: usize,
    pub k: usize,
    /// `[n * k/32]` block scales.
    d: Vec<f32>,
    /// `[n * k/32]` block minimums.
    m: Vec<f32>,
    /// `[n * k/32 * 16]` packed nibbles: byte j holds element j (low) and j+16 (high).
    qs: Vec<u8>,
}

/// A `[n, k]` matrix of i8 values with one f32 scale per 16 values (ggml's Q8_0 has one
/// per 32, stored twice; Q5_0 and Q6_K repack into it exactly), repacked for the kernels.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    pub n: usize,
    pub k: usize,
    /// `[n * k/16]` scales: block b's halves are `d[2b]` and `d[2b+1]`.
    d: Vec<f32>,
    qs: Vec<i8>,
}

impl Q8_0Matrix {
    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * (k / QK) * 34 {
            return None;
        }
        let nb = n * (k / QK);
        let mut d = Vec::with_capacity(nb * 2);
        let mut qs = Vec::with_capacity(nb * QK);
        for b in bytes.chunks_exact(34) {
            let s = f16::from_le_bytes([b[0], b[1]]).to_f32();
            d.extend([s, s]);
            qs.extend(b[2..34].iter().map(|&x| x as i8));
        }
        Some(Self { n, k, d, qs })
    }

    /// A ggml `block_q5_0` matrix (f16 d, 32 high bits, 16 bytes of low nibbles) as Q8_0:
    /// every Q5_0 value `q - 16` (-16..15) fits an i8 under the same scale, so the
    /// conversion is exact and the Q8_0 kernel runs it (candle's Q5_0 dot is scalar).
    pub fn from_q5_0_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * (k / QK) * 22 {
            return None;
        }
        let nb = n * (k / QK);
        let mut d = Vec::with_capacity(nb * 2);
        let mut qs = Vec::with_capacity(nb * QK);
        for b in bytes.chunks_exact(22) {
            let s = f16::from_le_bytes([b[0], b[1]]).to_f32();
            d.extend([s, s]);
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            let lo = &b[6..22];
            let mut block = [0i8; QK];
            for j in 0..16 {
                let h0 = (((qh >> j) << 4) & 0x10) as u8;
                let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                block[j] = ((lo[j] & 0x0F) | h0) as i8 - 16;
                block[j + 16] = ((lo[j] >> 4) | h1) as i8 - 16;
            }
            qs.extend_from_slice(&block);
        }
        Some(Self { n, k, d, qs })
    }

    /// ggml `block_q6_K` bytes (256 values: 128 bytes of low nibbles, 64 of high 2-bit
    /// pairs, 16 i8 scales, f16 d): value `(d·sc)·(q − 32)` with one scale per 16 values,
    /// so it repacks exactly (scale `d·sc` in f32, as ggml computes it).
    pub fn from_q6_k_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        const QKK: usize = 256;
        const BYTES: usize = 210;
        if k % QKK != 0 || bytes.len() != n * (k / QKK) * BYTES {
            return None;
        }
        let mut d = Vec::with_capacity(n * k / 16);
        let mut qs = vec![0i8; n * k];
        let mut o = 0;
        for b in bytes.chunks_exact(BYTES) {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let dd = f16::from_le_bytes([b[208], b[209]]).to_f32();
            for half in 0..2 {
                let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
                let y = &mut qs[o + half * 128..o + half * 128 + 128];
                for l in 0..32 {
                    y[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    y[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                }
                // Values l+32·g (g = 0..4) use scales sc[2g] (l < 16) and sc[2g+1]: in
                // 16-value order that is sc[0..8] as is.
                for s in &sc[..8] {
                    d.push(dd * (*s as i8) as f32);
                }
            }
            o += QKK;
        }
        Some(Self { n, k, d, qs })
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.qs.iter().enumerate().map(|(i, &q)| self.d[i / 16] * q as f32).collect()
    }

    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let kb = self.k / QK;
        let k = self.k;
        let isa = isa();
        tiled(x, rows, self.n, k, |a, j, r0, out| {
            let (wd, wq) = (&self.d[j * kb * 2..(j + 1) * kb * 2], &self.qs[j * k..(j + 1) * k]);
            #[cfg(target_arch = "x86_64")]
            match isa {
                // SAFETY: the features were detected; rows r0..r0+out.len() exist in `a`.
                Isa::Vnni => return unsafe { dot4_q8_0_vnni(wd, wq, a, r0, kb, out) },
                Isa::Avx2 => return unsafe { dot4_q8_0_avx2(wd, wq, a, r0, kb, out) },
                Isa::Scalar => {}
            }
            for (i, o) in out.iter_mut().enumerate() {
                let r = r0 + i;
                *o = dot_row_q8_scalar(wd, wq, &a.d[r * kb..(r + 1) * kb], &a.q[r * k..(r + 1) * k]);
            }
        })
    }
}

/// Shared driver: quantize `x` once, split output columns across threads; each task
/// computes a `[rows, chunk]` tile, four activation rows at a time, so each weight block
/// is loaded and unpacked once per four rows (this is what makes batching pay).
fn tiled(x: &[f32], rows: usize, n: usize, k: usize, dot: impl Fn(&Q8Rows, usize, usize, &mut [f32]) + Sync) -> Vec<f32> {
    let a = quantize_rows(x, rows, k);
    let mut out = vec![0f32; rows * n];
    let threads = rayon::current_num_threads().max(1);
    let chunk = n.div_ceil(threads * 4).clamp(16, 1024);
    let tiles: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(chunk))
        .into_par_iter()
        .map(|c| {
            let j0 = c * chunk;
            let j1 = (j0 + chunk).min(n);
            let w = j1 - j0;
            let mut tile = vec![0f32; rows * w];
            let mut acc = [0f32; 4];
            for j in j0..j1 {
                let mut r0 = 0;
                while r0 < rows {
                    let g = (rows - r0).min(4);
                    dot(&a, j, r0, &mut acc[..g]);
                    for i in 0..g {
                        tile[(r0 + i) * w + (j - j0)] = acc[i];
                    }
                    r0 += g;
                }
            }
            (j0, tile)
        })
        .collect();
    for (j0, tile) in tiles {
        let w = tile.len() / rows.max(1);
        for r in 0..rows {
            out[r * n + j0..r * n + j0 + w].copy_from_slice(&tile[r * w..(r + 1) * w]);
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_q4_1_avx2(wd: &[f32], wm: &[f32], wq: &[u8], a: &Q8Rows, r0: usize, kb: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let g = out.len().min(4);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut accm = [0f32; 4];
    let k = kb * QK;
    for b in 0..kb {
        let raw = _mm_loadu_si128(wq.as_ptr().add(b * 16) as *const __m128i);
        let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
        let d = *wd.get_unchecked(b);
        let m = *wm.get_unchecked(b);
        for i in 0..g {
            let r = r0 + i;
            let qa = _mm256_loadu_si256(a.q.as_ptr().add(r * k + b * QK) as *const __m256i);
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(qw, qa), ones);
            let scale = _mm256_set1_ps(d * *a.d.get_unchecked(r * kb + b));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[i]);
            accm[i] += m * *a.s.get_unchecked(r * kb + b);
        }
    }
    for i in 0..g {
        out[i] = hsum(acc[i]) + accm[i];
    }
}

/// The instruction set the kernels use, detected once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Vnni,
    Avx2,
    Scalar,
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            if avx2 && std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512vl") {
                return Isa::Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// As `dot4_q4_1_avx2`, with AVX-512 VNNI's `vpdpbusd` (u8 x i8 -> i32 in one
/// instruction); the min term is a separate dot product over the block sums.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn dot4_q4_1_vnni(wd: &[f32], wm: &[f32], wq: &[u8], a: &Q8Rows, r0: usize, kb: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let mask = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    let g = out.len().min(4);
    let mut acc = [_mm256_setzero_ps(); 4];
    let k = kb * QK;
    for b in 0..kb {
        let raw = _mm_loadu_si128(wq.as_ptr().add(b * 16) as *const __m128i);
        let qw = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), mask);
        let d = *wd.get_unchecked(b);
        for i in 0..g {
            let r = r0 + i;
            let qa = _mm256_loadu_si256(a.q.as_ptr().add(r * k + b * QK) as *const __m256i);
            let p32 = _mm256_dpbusd_epi32(zero, qw, qa);
            let scale = _mm256_set1_ps(d * *a.d.get_unchecked(r * kb + b));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[i]);
        }
    }
    for i in 0..g {
        let r = r0 + i;
        let sums = &a.s[r * kb..(r + 1) * kb];
        // The min term, sum_b m_b * s_b, eight blocks per instruction.
        let mut mv = _mm256_setzero_ps();
        let mut b = 0;
        while b + 8 <= kb {
            mv = _mm256_fmadd_ps(_mm256_loadu_ps(wm.as_ptr().add(b)), _mm256_loadu_ps(sums.as_ptr().add(b)), mv);
            b += 8;
        }
        let mut m = hsum(mv);
        while b < kb {
            m += *wm.get_unchecked(b) * *sums.get_unchecked(b);
            b += 1;
        }
        out[i] = hsum(acc[i]) + m;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_q8_0_avx2(wd: &[f32], wq: &[i8], a: &Q8Rows, r0: usize, kb: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let g = out.len().min(4);
    let mut acc = [_mm256_setzero_ps(); 4];
    let k = kb * QK;
    for b in 0..kb {
        let w = _mm256_loadu_si256(wq.as_ptr().add(b * QK) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        // Lanes 0-3 sum bytes 0-15 (the first half's scale), lanes 4-7 bytes 16-31.
        let d = _mm256_setr_m128(_mm_set1_ps(*wd.get_unchecked(2 * b)), _mm_set1_ps(*wd.get_unchecked(2 * b + 1)));
        for i in 0..g {
            let r = r0 + i;
            let qa = _mm256_loadu_si256(a.q.as_ptr().add(r * k + b * QK) as *const __m256i);
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qa, w)), ones);
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(r * kb + b)));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[i]);
        }
    }
    for i in 0..g {
        out[i] = hsum(acc[i]);
    }
}

/// As `dot4_q8_0_avx2`, with `vpdpbusd`: |w| (u8) times x carrying w's sign (i8),
/// accumulated in i32 without the i16 saturation of `maddubs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512vnni,avx512vl")]
unsafe fn dot4_q8_0_vnni(wd: &[f32], wq: &[i8], a: &Q8Rows, r0: usize, kb: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let zero = _mm256_setzero_si256();
    let g = out.len().min(4);
    let mut acc = [_mm256_setzero_ps(); 4];
    let k = kb * QK;
    for b in 0..kb {
        let w = _mm256_loadu_si256(wq.as_ptr().add(b * QK) as *const __m256i);
        let aw = _mm256_sign_epi8(w, w);
        let d = _mm256_setr_m128(_mm_set1_ps(*wd.get_unchecked(2 * b)), _mm_set1_ps(*wd.get_unchecked(2 * b + 1)));
        for i in 0..g {
            let r = r0 + i;
            let qa = _mm256_loadu_si256(a.q.as_ptr().add(r * k + b * QK) as *const __m256i);
            let p32 = _mm256_dpbusd_epi32(zero, aw, _mm256_sign_epi8(qa, w));
            let scale = _mm256_mul_ps(d, _mm256_set1_ps(*a.d.get_unchecked(r * kb + b)));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), scale, acc[i]);
        }
    }
    for i in 0..g {
        out[i] = hsum(acc[i]);
    }
}

/// Scalar fallback for CPUs without AVX2 (and the reference for the SIMD paths).
fn dot_row_q8_scalar(wd: &[f32], wq: &[i8], ad: &[f32], aq: &[i8]) -> f32 {
    let mut acc = 0f32;
    for b in 0..ad.len() {
        for h in 0..2 {
            let isum: i32 = (h * 16..h * 16 + 16).map(|i| wq[b * QK + i] as i32 * aq[b * QK + i] as i32).sum();
            acc += wd[2 * b + h] * ad[b] * isum as f32;
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn hsum(acc: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let hi = _mm256_extractf128_ps(acc, 1);
    let lo = _mm256_castps256_ps128(acc);
    let s = _mm_add_ps(hi, lo);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// Activations quantized per 32-block: `x ≈ d * q`, `s = d * sum(q)`.
struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    q: Vec<i8>,
}

impl Q4_1Matrix {
    /// From GGUF Q4_1 bytes (ggml's `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles).
    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * (k / QK) * BLOCK_BYTES {
            return None;
        }
        let nb = n * (k / QK);
        let mut d = Vec::with_capacity(nb);
        let mut m = Vec::with_capacity(nb);
        let mut qs = Vec::with_capacity(nb * 16);
        for b in bytes.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            qs.extend_from_slice(&b[4..20]);
        }
        Some(Self { n, k, d, m, qs })
    }

    /// ggml `block_q4_K` bytes (256 values: f16 d and dmin, 12 bytes of 6-bit sub-block
    /// scales and minimums, 128 bytes of nibbles) as Q4_1: each 32-value sub-block is
    /// `(d·sc)·q − dmin·m`, i.e. a Q4_1 block with scale `d·sc` and minimum `−dmin·m`
    /// (computed in f32 as ggml does), so the repacking is exact.
    pub fn from_q4_k_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        const QKK: usize = 256;
        const BYTES: usize = 144;
        if k % QKK != 0 || bytes.len() != n * (k / QKK) * BYTES {
            return None;
        }
        let nb = n * (k / QK);
        let mut d = Vec::with_capacity(nb);
        let mut m = Vec::with_capacity(nb);
        let mut qs = Vec::with_capacity(nb * 16);
        for b in bytes.chunks_exact(BYTES) {
            let dd = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
            let sc = &b[4..16];
            let q = &b[16..144];
            let scale_min = |j: usize| -> (u8, u8) {
                if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    ((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4))
                }
            };
            for c in 0..4 {
                let chunk = &q[c * 32..c * 32 + 32];
                for (half, shift) in [(0usize, 0u8), (1, 4)] {
                    let (s, mn) = scale_min(2 * c + half);
                    d.push(dd * s as f32);
                    m.push(-(dmin * mn as f32));
                    let nib = |l: usize| (chunk[l] >> shift) & 0x0F;
                    for j in 0..16 {
                        qs.push(nib(j) | (nib(j + 16) << 4));
                    }
                }
            }
        }
        Some(Self { n, k, d, m, qs })
    }

    /// Dense f32 values (row-major `[n, k]`), for checks and exports.
    pub fn dequantize(&self) -> Vec<f32> {
        let nb = self.n * (self.k / QK);
        let mut out = vec![0f32; self.n * self.k];
        for b in 0..nb {
            let q = &self.qs[b * 16..b * 16 + 16];
            let o = &mut out[b * QK..(b + 1) * QK];
            for j in 0..16 {
                o[j] = self.d[b] * (q[j] & 0x0F) as f32 + self.m[b];
                o[j + 16] = self.d[b] * (q[j] >> 4) as f32 + self.m[b];
            }
        }
        out
    }

    /// `dst[r, j] = sum_i x[r, i] * W[j, i]` for `x`: `[rows, k]` row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        debug_assert_eq!(x.len(), rows * k);
        let kb = k / QK;
        let isa = isa();
        tiled(x, rows, n, k, |a, j, r0, out| {
            let (wd, wm, wq) = (&self.d[j * kb..(j + 1) * kb], &self.m[j * kb..(j + 1) * kb], &self.qs[j * kb * 16..(j + 1) * kb * 16]);
            // SAFETY (both): the features were detected; rows r0..r0+out.len() exist in `a`.
            #[cfg(target_arch = "x86_64")]
            match isa {
                Isa::Vnni => return unsafe { dot4_q4_1_vnni(wd, wm, wq, a, r0, kb, out) },
                Isa::Avx2 => return unsafe { dot4_q4_1_avx2(wd, wm, wq, a, r0, kb, out) },
                Isa::Scalar => {}
            }
            for (i, o) in out.iter_mut().enumerate() {
                let r = r0 + i;
                *o = dot_row_scalar(wd, wm, wq, &a.d[r * kb..(r + 1) * kb], &a.s[r * kb..(r + 1) * kb], &a.q[r * k..(r + 1) * k]);
            }
        })
    }
}

/// Activations to Q8 blocks (one f32 scale per 32 values, round to nearest even), with the
/// scaled block sums the Q4_1 min term needs. Blocks are quantized in parallel chunks,
/// eight floats per instruction where AVX2 is there.
fn quantize_rows(x: &[f32], rows: usize, k: usize) -> Q8Rows {
    let nb = rows * (k / QK);
    let mut d = vec![0f32; nb];
    let mut s = vec![0f32; nb];
    let mut q = vec![0i8; rows * k];
    const CH: usize = 64;
    let simd = isa() != Isa::Scalar;
    let chunk = |c: usize, qc: &mut [i8], dc: &mut [f32], sc: &mut [f32]| {
        for (i, (db, sb)) in dc.iter_mut().zip(sc.iter_mut()).enumerate() {
            let b = c * CH + i;
            let xs = &x[b * QK..(b + 1) * QK];
            let qs = &mut qc[i * QK..(i + 1) * QK];
            #[cfg(target_arch = "x86_64")]
            let (scale, sum) = if simd {
                // SAFETY: isa() checked AVX2 and FMA; xs and qs hold QK values.
                unsafe { quantize_block_avx2(xs, qs) }
            } else {
                quantize_block(xs, qs)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (scale, sum) = {
                let _ = simd;
                quantize_block(xs, qs)
            };
            *db = scale;
            *sb = scale * sum as f32;
        }
    };
    if nb <= CH {
        // One chunk (decode: a row or two): no task to hand to the pool.
        chunk(0, &mut q, &mut d, &mut s);
    } else {
        q.par_chunks_mut(QK * CH).zip(d.par_chunks_mut(CH)).zip(s.par_chunks_mut(CH)).enumerate().for_each(|(c, ((qc, dc), sc))| chunk(c, qc, dc, sc));
    }
    Q8Rows { d, s, q }
}

fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(xs) {
        let qi = (v * inv).round_ties_even() as i32;
        *o = qi as i8;
        sum += qi;
    }
    (scale, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    let p = xs.as_ptr();
    let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
    let sign = _mm256_set1_ps(-0.0);
    let mut m = _mm256_andnot_ps(sign, v[0]);
    for vi in &v[1..] {
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, *vi));
    }
    let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    let m1 = _mm_max_ss(m2, _mm_movehdup_ps(m2));
    let amax = _mm_cvtss_f32(m1);
    let scale = amax / 127.0;
    let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
    let mut iv = [_mm256_setzero_si256(); 4];
    for (o, vi) in iv.iter_mut().zip(&v) {
        let r = _mm256_round_ps(_mm256_mul_ps(*vi, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        *o = _mm256_cvtps_epi32(r);
    }
    let s = _mm256_add_epi32(_mm256_add_epi32(iv[0], iv[1]), _mm256_add_epi32(iv[2], iv[3]));
    let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
    let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
    let sum = _mm_cvtsi128_si32(s1);
    // i32 -> i16 -> i8 packs work per 128-bit lane; one permute restores the order.
    let p16a = _mm256_packs_epi32(iv[0], iv[1]);
    let p16b = _mm256_packs_epi32(iv[2], iv[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let out = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, out);
    (scale, sum)
}

fn dot_row_scalar(wd: &[f32], wm: &[f32], wq: &[u8], ad: &[f32], asum: &[f32], aq: &[i8]) -> f32 {
    let mut acc = 0f32;
    for b in 0..wd.len() {
        let q = &wq[b * 16..b * 16 + 16];
        let a = &aq[b * QK..(b + 1) * QK];
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (q[j] & 0x0F) as i32 * a[j] as i32 + (q[j] >> 4) as i32 * a[j + 16] as i32;
        }
        acc += wd[b] * ad[b] * isum as f32 + wm[b] * asum[b];
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ggml_q4_1(w: &[f32], n: usize, k: usize) -> Vec<u8> {
        // Reference quantizer (ggml's quantize_row_q4_1).
        let mut out = Vec::new();
        for r in 0..n {
            for b in 0..k / QK {
                let xs = &w[r * k + b * QK..r * k + (b + 1) * QK];
                let min = xs.iter().cloned().fold(f32::INFINITY, f32::min);
                let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                for j in 0..16 {
                    let lo = (((xs[j] - min) * id + 0.5) as u8).min(15);
                    let hi = (((xs[j + 16] - min) * id + 0.5) as u8).min(15);
                    out.push(lo | (hi << 4));
                }
            }
        }
        out
    }

    #[test]
    fn q4_k_repacked_as_q4_1_is_exact() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (n, k) = (5, 512);
        let mut rng = crate::sampling::Rng::new(9);
        let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.3) as f32 * 2.0).collect();
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q4K).unwrap();
        let want: Vec<f32> = q.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let m = Q4_1Matrix::from_q4_k_bytes(&q.data().unwrap(), n, k).unwrap();
        assert_eq!(m.dequantize(), want);
    }

    #[test]
    fn q6_k_repacked_is_exact_and_multiplies_like_its_dequantization() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (n, k, rows) = (7, 512, 3);
        let mut rng = crate::sampling::Rng::new(11);
        let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32 * 2.0).collect();
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q6K).unwrap();
        let want: Vec<f32> = q.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let m = Q8_0Matrix::from_q6_k_bytes(&q.data().unwrap(), n, k).unwrap();
        assert_eq!(m.dequantize(), want);
        let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let y = m.matmul(&x, rows);
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * want[j * k + i]).sum();
                assert!((y[r * n + j] - exact).abs() < 0.05, "{r},{j}: {} vs {exact}", y[r * n + j]);
            }
        }
    }

    #[test]
    fn q5_0_repacked_as_q8_0_is_exact() {
        use candle_core::quantized::{GgmlDType, QTensor};
        let (n, k) = (6, 64);
        let mut rng = crate::sampling::Rng::new(5);
        let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let t = candle_core::Tensor::from_vec(w, (n, k), &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let want: Vec<f32> = q.dequantize(&candle_core::Device::Cpu).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let m = Q8_0Matrix::from_q5_0_bytes(&q.data().unwrap(), n, k).unwrap();
        assert_eq!(m.dequantize(), want);
    }

    #[test]
    fn simd_activation_quantization_equals_scalar() {
        let mut state = 7u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
        };
        let (rows, k) = (5, 4 * QK);
        let mut x: Vec<f32> = (0..rows * k).map(|_| next()).collect();
        x[3] = 0.0;
        x[QK..2 * QK].iter_mut().for_each(|v| *v = 0.0); // an all-zero block
        let a = quantize_rows(&x, rows, k);
        for b in 0..rows * k / QK {
            let mut q = [0i8; QK];
            let (d, sum) = quantize_block(&x[b * QK..(b + 1) * QK], &mut q);
            assert_eq!(&a.q[b * QK..(b + 1) * QK], &q[..], "block {b}");
            assert_eq!(a.d[b], d);
            assert_eq!(a.s[b], d * sum as f32);
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference_and_scalar_path() {
        // k = 320: ten blocks, so the 8-wide loops and their remainders both run.
        let (n, k, rows) = (37, 320, 5);
        let mut rng = crate::sampling::Rng::new(3);
        let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32 * 3.0).collect();
        let m = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&w, n, k), n, k).unwrap();
        let wd = m.dequantize();
        let y = m.matmul(&x, rows);
        let mut worst = 0f32;
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
                worst = worst.max((y[r * n + j] - exact).abs());
            }
        }
        // Only the 8-bit activation rounding separates the two.
        assert!(worst < 0.1, "max error {worst}");
        // The SIMD kernel this CPU runs and the scalar fallback agree to float rounding.
        let a = quantize_rows(&x, rows, k);
        let kb = k / QK;
        for r in 0..rows {
            for j in 0..n {
                let args = (&m.d[j * kb..(j + 1) * kb], &m.m[j * kb..(j + 1) * kb], &m.qs[j * kb * 16..(j + 1) * kb * 16]);
                let s = dot_row_scalar(args.0, args.1, args.2, &a.d[r * kb..(r + 1) * kb], &a.s[r * kb..(r + 1) * kb], &a.q[r * k..(r + 1) * k]);
                let v = y[r * n + j];
                assert!((s - v).abs() <= 1e-4 * s.abs().max(1.0), "{s} vs {v}");
            }
        }
        assert!(Q4_1Matrix::from_ggml_bytes(&[0u8; 7], 1, 32).is_none());
        // Batch invariance: a row's result does not depend on the other rows, bit for bit
        // (seeded sampling in a continuously batched server relies on it).
        for r in 0..rows {
            let alone = m.matmul(&x[r * k..(r + 1) * k], 1);
            assert_eq!(&y[r * n..(r + 1) * n], &alone[..], "row {r} differs when batched");
        }
        // Q8_0: the same check against its dequantized values.
        let mut bytes = Vec::new();
        for r in 0..n {
            for b in 0..k / QK {
                let xs = &w[r * k + b * QK..r * k + (b + 1) * QK];
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                bytes.extend(xs.iter().map(|v| (v / d).round() as i8 as u8));
            }
        }
        let q8 = Q8_0Matrix::from_ggml_bytes(&bytes, n, k).unwrap();
        let wd = q8.dequantize();
        let y = q8.matmul(&x, rows);
        for r in 0..rows {
            assert_eq!(&y[r * n..(r + 1) * n], &q8.matmul(&x[r * k..(r + 1) * k], 1)[..], "q8_0 row {r} batched");
        }
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
                assert!((y[r * n + j] - exact).abs() < 0.1, "q8_0 {r},{j}");
            }
        }
    }
}
