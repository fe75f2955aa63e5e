//! Small SIMD building blocks shared by the CPU kernels (AVX2 + FMA, detected at run
//! time by the callers), and the vocabulary-wide log-sum-exp of sampling and scoring.

/// `ln Σ_i e^{v_i}`, the normaliser of a log-softmax over `v`. With AVX2 the
/// exponentials run eight lanes at a time in f32 (about 1 ulp each) and are summed in
/// f64; otherwise in f64 throughout. Either way the result is within ~1e-6 of the exact
/// value, and it depends only on `v`. Non-finite maxima (all `-inf`, or a NaN) give NaN
/// or `-inf` as the plain formula would.
pub fn log_sum_exp(v: &[f32]) -> f64 {
    let m = max_f32(v);
    if !m.is_finite() {
        return m as f64;
    }
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() && v.len() >= 8 {
        // SAFETY: AVX2 and FMA were detected.
        return m as f64 + unsafe { sum_exp_avx2(v, m) }.ln();
    }
    let md = m as f64;
    md + v.iter().map(|&x| (x as f64 - md).exp()).sum::<f64>().ln()
}

/// The largest value, NaNs ignored (as a fold of `f32::max`; `-inf` for none). With AVX2,
/// eight lanes at a time: the scalar fold's NaN handling makes it a serial chain of several
/// instructions per value, about 60 us over a 49152-token vocabulary.
pub fn max_f32(v: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 was detected.
        return unsafe { max_avx2(v) };
    }
    v.iter().cloned().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn max_avx2(v: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (p, n) = (v.as_ptr(), v.len());
    // `max(x, m)` returns m where x is NaN, so NaNs are skipped as by the scalar fold.
    let mut m = [_mm256_set1_ps(f32::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (u, m) in m.iter_mut().enumerate() {
            *m = _mm256_max_ps(_mm256_loadu_ps(p.add(i + 8 * u)), *m);
        }
        i += 32;
    }
    while i + 8 <= n {
        m[0] = _mm256_max_ps(_mm256_loadu_ps(p.add(i)), m[0]);
        i += 8;
    }
    let mut lanes = [0f32; 32];
    for (u, m) in m.iter().enumerate() {
        _mm256_storeu_ps(lanes.as_mut_ptr().add(8 * u), *m);
    }
    v[i..].iter().chain(&lanes).cloned().fold(f32::NEG_INFINITY, f32::max)
}

/// The unnormalised softmax of `v` at temperature `1/s`: `e^{(v_i − max)·s}` for every
/// entry, 0 for NaN, `-inf` and anything below `e^-87` (f32's normal range). With AVX2
/// eight lanes at a time (about 1 ulp); the result depends only on `v`, `max` and `s`.
pub fn softmax_weights(v: &[f32], max: f32, s: f32) -> Vec<f32> {
    let mut out = vec![0f32; v.len()];
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2() {
        // SAFETY: AVX2 and FMA were detected; both slices have v.len() entries.
        i = unsafe { softmax_weights_avx2(v, max, s, &mut out) };
    }
    for (o, &x) in out[i..].iter_mut().zip(&v[i..]) {
        let e = (x - max) * s;
        *o = if e >= -87.0 { e.exp() } else { 0.0 };
    }
    out
}

/// The whole eight-lane blocks of [`softmax_weights`]; returns how many entries it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_weights_avx2(v: &[f32], max: f32, s: f32, out: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let (mv, sv, lo) = (_mm256_set1_ps(max), _mm256_set1_ps(s), _mm256_set1_ps(-87.0));
    let mut i = 0;
    while i + 8 <= v.len() {
        let x = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v.as_ptr().add(i)), mv), sv);
        // Ordered compare: NaN lanes (and -inf, and underflow) are zeroed.
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_and_ps(exp256(x), keep));
        i += 8;
    }
    i
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sum_exp_avx2(v: &[f32], m: f32) -> f64 {
    use std::arch::x86_64::*;
    let mv = _mm256_set1_ps(m);
    let p = v.as_ptr();
    let n = v.len();
    // Four f32 accumulators of eight lanes over blocks of 1024 values, each block's
    // total added in f64, so no long f32 sum loses precision.
    let mut total = 0f64;
    let mut i = 0;
    while i + 8 <= n {
        let end = (i + 1024).min(n - n % 8);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut u = 0;
        while i < end {
            acc[u & 3] = _mm256_add_ps(acc[u & 3], exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mv)));
            i += 8;
            u += 1;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        total += hsum256(s) as f64;
    }
    while i < n {
        total += ((v[i] - m) as f64).exp();
        i += 1;
    }
    total
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// `e^x` for eight lanes with `x <= 0` (scores minus their maximum): Cephes' expf
/// (range reduction by ln 2 in two parts, a degree-5 polynomial, 2^n through the
/// exponent bits), about 1 ulp; inputs below -87.3 give 0-ish (`2^-126` scale).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn exp256(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.336_55));
    let x = _mm256_min_ps(x, _mm256_set1_ps(88.0));
    let n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_2e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
    let r2 = _mm256_mul_ps(r, r);
    let e = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    // 2^n: n in [-126, 127] after the clamps, so the biased exponent stays in 1..=254.
    let ni = _mm256_cvtps_epi32(n);
    let pow2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
    _mm256_mul_ps(e, pow2)
}


/// [`exp256`] on sixteen lanes: the same steps, so every lane's result is the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.336_55));
    let x = _mm512_min_ps(x, _mm512_set1_ps(88.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.398_2e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.333_452e-3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.166_579_6e-2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.166_666_65));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5));
    let r2 = _mm512_mul_ps(r, r);
    let e = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    let ni = _mm512_cvtps_epi32(n);
    let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127))));
    _mm512_mul_ps(e, pow2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sum_exp_matches_f64() {
        let mut rng = crate::sampling::Rng::new(4);
        for n in [1usize, 7, 8, 9, 1000, 49_157] {
            let v: Vec<f32> = (0..n).map(|_| (rng.next_f64() * 40.0 - 30.0) as f32).collect();
            let m = v.iter().cloned().fold(f64::NEG_INFINITY, |a, b| a.max(b as f64));
            let want = m + v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let got = log_sum_exp(&v);
            assert!((got - want).abs() < 1e-6, "n={n}: {got} vs {want}");
        }
        let mut v = vec![f32::NEG_INFINITY; 16];
        assert_eq!(log_sum_exp(&v), f64::NEG_INFINITY);
        v[3] = 2.0;
        assert!((log_sum_exp(&v) - 2.0).abs() < 1e-12);
    }

    /// The vectorised maximum equals the scalar fold of `f32::max` (NaNs skipped) at every
    /// length around the unrolled blocks, wherever the maximum sits.
    #[test]
    fn max_equals_the_scalar_fold() {
        let mut rng = crate::sampling::Rng::new(9);
        for n in 0..80usize {
            for at in [0, n / 2, n.saturating_sub(1)] {
                let mut v: Vec<f32> = (0..n).map(|_| (rng.next_f64() * 10.0 - 5.0) as f32).collect();
                if n > 0 {
                    v[at] = 7.5;
                    v[(at + 3) % n] = f32::NAN;
                }
                let want = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                assert_eq!(max_f32(&v).to_bits(), want.to_bits(), "n {n}, max at {at}");
            }
        }
        assert_eq!(max_f32(&[f32::NAN; 20]), f32::NEG_INFINITY);
        assert_eq!(max_f32(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY);
    }

    /// Every lane, SIMD block or tail: within f32 rounding of the f64 formula; NaN and
    /// `-inf` give 0.
    #[test]
    fn softmax_weights_match_f64_and_zero_the_rest() {
        let mut rng = crate::sampling::Rng::new(5);
        for n in [0usize, 1, 7, 8, 9, 17, 1000] {
            let mut v: Vec<f32> = (0..n).map(|_| (rng.next_f64() * 60.0 - 50.0) as f32).collect();
            if n > 4 {
                v[2] = f32::NAN;
                v[n - 1] = f32::NEG_INFINITY;
            }
            let m = max_f32(&v);
            for s in [1.0f32, 0.5, 3.0] {
                let w = softmax_weights(&v, m, s);
                assert_eq!(w.len(), n);
                for (i, (&x, &got)) in v.iter().zip(&w).enumerate() {
                    let e = ((x - m) * s) as f64;
                    if !x.is_finite() || e < -87.0 {
                        assert_eq!(got, 0.0, "n {n} i {i}");
                    } else {
                        let want = e.exp();
                        assert!((got as f64 - want).abs() <= want * 1e-6, "n {n} i {i}: {got} vs {want}");
                    }
                }
            }
        }
    }

    /// The sixteen-lane exponential gives the eight-lane one's bits, lane for lane.
    #[test]
    fn exp512_equals_exp256() {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::has_avx512() {
            let mut x = -120.0f32;
            while x <= 100.0 {
                let lanes: Vec<f32> = (0..16).map(|i| x + i as f32 * 0.0071).collect();
                let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
                // SAFETY: AVX-512F, AVX2 and FMA detected; the arrays hold 16 lanes.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm512_storeu_ps(a.as_mut_ptr(), exp512(_mm512_loadu_ps(lanes.as_ptr())));
                    _mm256_storeu_ps(b.as_mut_ptr(), exp256(_mm256_loadu_ps(lanes.as_ptr())));
                    _mm256_storeu_ps(b.as_mut_ptr().add(8), exp256(_mm256_loadu_ps(lanes.as_ptr().add(8))));
                }
                assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits), "at {x}");
                x += 0.37;
            }
        }
    }

    #[test]
    fn exp_is_accurate_over_the_softmax_range() {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::has_avx2() {
            let mut worst = 0f64;
            let mut x = -100.0f32;
            while x <= 0.0 {
                let lanes = [x, x * 0.5, x * 0.25, x * 0.1, x * 0.01, x * 0.001, -1e-7, 0.0];
                let mut got = [0f32; 8];
                // SAFETY: AVX2 and FMA detected.
                unsafe {
                    use std::arch::x86_64::*;
                    _mm256_storeu_ps(got.as_mut_ptr(), exp256(_mm256_loadu_ps(lanes.as_ptr())));
                }
                for (g, l) in got.iter().zip(lanes) {
                    let want = (l as f64).exp();
                    if want > 1e-30 {
                        worst = worst.max(((*g as f64) - want).abs() / want);
                    }
                }
                x += 0.0137;
            }
            assert!(worst < 4e-7, "relative error {worst}");
        }
    }
}
