//! Prompt rows through Intel AMX-BF16: a second arithmetic for the rows of a forward
//! pass that belong to a prompt.
//!
//! The quantized kernels ([`super::q4_1`]) compute every row as an exact integer sum per
//! 32-value block followed by that block's float scaling, and the scaling (about four
//! vector operations per row and block) bounds them: on an AMX machine a 16x16x32 tile
//! multiply of int8 costs about as much as the same work on AVX-512 VNNI, because both
//! spend most of it scaling. A prompt's rows are many, so they take another arithmetic:
//! the weights dequantized once to bf16 (the value `d·q + m` of the block, rounded to
//! nearest even), the activations rounded to bf16 the same way, and AMX's `tdpbf16ps`
//! accumulating in f32 over the whole reduction, in 32x32 register blocks, with no
//! per-block step at all (`hromada bench gemm --rows 512` measures both).
//!
//! Which rows take it is a property of the row, never of the batch: a row whose token
//! belongs to its sequence's prompt (`RopeCtx::prompt_rows`) takes bf16, a generated
//! token's row takes the integer kernels, whatever else the forward pass carries. Within
//! each arithmetic a row's result does not depend on the other rows, bit for bit (each
//! output element is the same sequence of tile multiplies over the reduction, whatever
//! the tile's height), so a continuously batched server still returns what the same
//! request returns alone. The bf16 copy of a matrix is built the first time a prompt row
//! reaches it (the LM head, which only ever sees integer rows here, never gets one),
//! within [`budget_bytes`].
//!
//! A feed-forward block's gate and up projections take one pass ([`matmul_glu_rows`]):
//! each task's tile pair is the same panel of both matrices, and the gated activation
//! is applied to the sums in the epilogue, so the two products are never stored.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use super::q4_1::OutPtr;

/// Columns per panel (one tile's 16 f32 outputs per row).
const NR: usize = 16;
/// Reduction values per tile step (16 rows of bf16 pairs).
const KS: usize = 32;

/// bf16 (round to nearest even; NaN stays a quiet NaN) of an f32.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) as u16) | 0x40;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A `[n, k]` matrix in bf16, packed for the tile multiply: panel p (16 columns), step s
/// (32 reduction values), pair j, column l, half t at `((p·steps + s)·16 + j)·32 + 2l + t`
/// holds `W[16p + l][32s + 2j + t]` (AMX's pair-interleaved B operand, one 1 KB tile per
/// panel step).
#[derive(Debug)]
pub struct Bf16Panels {
    pub n: usize,
    pub k: usize,
    data: Lines,
}

/// bf16 values in 64-byte aligned lines: a tile row load that straddles two cache lines
/// costs two, which halved the tile multiply's rate.
#[derive(Debug)]
struct Lines(Vec<Line>);

#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct Line([u16; 32]);

impl Lines {
    fn zeroed(len: usize) -> Self {
        Self(vec![Line([0; 32]); len.div_ceil(32)])
    }
    fn as_ptr(&self) -> *const u16 {
        self.0.as_ptr() as *const u16
    }
    fn as_mut_slice(&mut self, len: usize) -> &mut [u16] {
        // SAFETY: the lines are contiguous u16 values (align 64, no padding: 32 x 2 bytes),
        // at least `len` of them.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u16, len.min(self.0.len() * 32)) }
    }
    fn get(&self, i: usize) -> u16 {
        self.0[i / 32].0[i % 32]
    }
}

impl Bf16Panels {
    /// From dense row-major f32 values; None unless `n` is a multiple of 16 and `k` of 32.
    pub fn pack(w: &[f32], n: usize, k: usize) -> Option<Self> {
        if !n.is_multiple_of(NR) || !k.is_multiple_of(KS) || n == 0 || k == 0 || w.len() != n * k {
            return None;
        }
        let steps = k / KS;
        let mut lines = Lines::zeroed(n * k);
        let data = lines.as_mut_slice(n * k);
        for col in 0..n {
            let (p, l) = (col / NR, col % NR);
            for (i, &v) in w[col * k..(col + 1) * k].iter().enumerate() {
                let (s, r) = (i / KS, i % KS);
                data[((p * steps + s) * 16 + r / 2) * 32 + 2 * l + r % 2] = to_bf16(v);
            }
        }
        Some(Self { n, k, data: lines })
    }

    /// The first value of panel `p` (16 columns, `k/32` tile steps of 1 KB).
    fn panel(&self, p: usize) -> *const u16 {
        // `wrapping_add`: the kernels only dereference panels below n/16.
        self.data.as_ptr().wrapping_add(p * (self.k / KS) * 512)
    }

    /// `W[col][i]` as f32 (tests).
    pub fn get(&self, col: usize, i: usize) -> f32 {
        let steps = self.k / KS;
        let (p, l, s, r) = (col / NR, col % NR, i / KS, i % KS);
        from_bf16(self.data.get(((p * steps + s) * 16 + r / 2) * 32 + 2 * l + r % 2))
    }
}

/// A matrix's bf16 copy, made on first use (None: not eligible, or over the budget).
#[derive(Debug, Default)]
pub struct LazyBf16(OnceLock<Option<Bf16Panels>>);

impl Clone for LazyBf16 {
    /// A clone starts without a copy (it is rebuilt on first use, within the budget).
    fn clone(&self) -> Self {
        Self::default()
    }
}

static USED: AtomicUsize = AtomicUsize::new(0);

/// The most bytes of bf16 copies a process makes (`HROMADA_PROMPT_BF16_MB`, default
/// 4096): twice the weights' parameter count, so models up to about two billion
/// parameters in the blocks' linear layers take the path. Matrices met after the budget
/// is spent keep the integer kernels for every row; the order they are met in (a first
/// prompt's forward pass, layer by layer) is the same in every run.
pub fn budget_bytes() -> usize {
    static B: OnceLock<usize> = OnceLock::new();
    *B.get_or_init(|| std::env::var("HROMADA_PROMPT_BF16_MB").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(4096).saturating_mul(1 << 20))
}

impl LazyBf16 {
    /// The copy, making it from `dense()` the first time (when the path is enabled, the
    /// shape fits and the budget allows).
    pub fn get_or_make(&self, n: usize, k: usize, dense: impl FnOnce() -> Vec<f32>) -> Option<&Bf16Panels> {
        self.0
            .get_or_init(|| {
                if !enabled() || !n.is_multiple_of(NR) || !k.is_multiple_of(KS) {
                    return None;
                }
                let bytes = n * k * 2;
                let prev = USED.fetch_add(bytes, Ordering::SeqCst);
                if prev + bytes > budget_bytes() {
                    USED.fetch_sub(bytes, Ordering::SeqCst);
                    return None;
                }
                Bf16Panels::pack(&dense(), n, k)
            })
            .as_ref()
    }
}

/// Whether prompt rows take this path: the CPU has AMX-BF16 and the OS grants the tile
/// state, and `HROMADA_PROMPT_BF16` is not `0`.
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("HROMADA_PROMPT_BF16").as_deref() != Ok("0") && amx_bf16())
}

#[cfg(target_arch = "x86_64")]
fn amx_bf16() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the vector steps use AVX-512F.
    #[allow(unused_unsafe)]
    let c = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    (c.edx >> 22) & 1 == 1 && (c.edx >> 24) & 1 == 1 && super::has_avx512() && super::q4_1::request_tile_state()
}

#[cfg(not(target_arch = "x86_64"))]
fn amx_bf16() -> bool {
    false
}

/// `x` (`rows x k`, f32) times `w`ᵀ into `out` (`rows` rows of stride `ldo`, columns
/// `0..w.n` written), panels split across the compute pool. Requires [`enabled`].
pub fn matmul_into(x: &[f32], rows: usize, w: &Bf16Panels, out: &mut [f32], ldo: usize) {
    if rows == 0 || x.len() < rows * w.k || ldo < w.n || out.len() < (rows - 1) * ldo + w.n {
        return;
    }
    // SAFETY: `out` holds the rows x ldo span checked above.
    unsafe { matmul_rows(&Rows::new(&x[..rows * w.k], rows, w.k), w, out.as_mut_ptr(), ldo) }
}

/// Activation rows rounded to bf16 once, for every matrix of a layer that takes them
/// (q, k and v; gate and up).
pub struct Rows {
    a: Lines,
    rows: usize,
    k: usize,
}

impl Rows {
    /// `x` (`rows x k`) in bf16, the rows split across the compute pool.
    pub fn new(x: &[f32], rows: usize, k: usize) -> Self {
        let n = rows * k;
        let mut a = Lines(Vec::with_capacity(n.div_ceil(32)));
        if x.len() >= n && k.is_multiple_of(32) {
            // SAFETY: capacity for n/32 lines (k is a multiple of 32, so n is); each task
            // writes whole rows, every value, before the length covers them.
            let p = OutPtr(a.0.as_mut_ptr() as *mut f32);
            let per = rows.div_ceil(rayon::current_num_threads().max(1) * 2).max(1);
            use rayon::prelude::*;
            (0..rows.div_ceil(per)).into_par_iter().for_each(|t| {
                let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
                let dst = p.get() as *mut u16;
                // SAFETY: rows r0..r1 of the allocation, written by this task only.
                unsafe { convert(&x[r0 * k..r1 * k], dst.add(r0 * k)) };
            });
            unsafe { a.0.set_len(n / 32) };
        }
        Self { a, rows, k }
    }

    /// The row count, when these rows were made with reduction length `k` (else 0).
    fn rows_for(&self, k: usize) -> usize {
        if self.k == k && self.a.0.len() * 32 == self.rows * k {
            self.rows
        } else {
            0
        }
    }
}

/// `rows` times `w`ᵀ into `out` (`rows.rows` rows of stride `ldo`, columns `0..w.n`
/// written; it may be uninitialized: every written element is stored, none read).
///
/// # Safety
/// `out` is valid for writes of `(rows.rows - 1)·ldo + w.n` f32 values.
pub unsafe fn matmul_rows(rows: &Rows, w: &Bf16Panels, out: *mut f32, ldo: usize) {
    let (k, a, rows) = (w.k, &rows.a, rows.rows_for(w.k));
    if rows == 0 || ldo < w.n || !enabled() {
        return;
    }
    let op = OutPtr(out);
    let (steps, panels) = (k / KS, w.n / NR);
    super::on_pool(panels.div_ceil(2), |pp| {
        let p0 = 2 * pp;
        // The next pair's weights are fetched into L2 while this pair computes.
        let next = if p0 + 2 < panels { (w.panel(p0 + 2), (panels - p0 - 2).min(2) * steps * 1024) } else { (w.panel(p0), 0) };
        // SAFETY: AMX-BF16 was granted (`enabled`); `a` holds rows x k values; the
        // panels are inside `w`; each call writes only its own panels' columns (p0·16
        // and up, inside 0..w.n) of rows 0..rows, inside `out`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            let second = (p0 + 1 < panels).then(|| w.panel(p0 + 1));
            amx::panels(a, rows, k, w.panel(p0), second, [next, (next.0, 0)], op.get(), ldo, p0 * NR, Epilogue::Store)
        };
    });
}

/// `act(rows · gateᵀ) · (rows · upᵀ)` into `out` (`rows.rows` rows of stride `ldo`,
/// columns `0..gate.n` written, none read): a feed-forward block's gated activation
/// straight from the tile sums. Each task takes one panel of `gate` and the same panel
/// of `up` as its tile pair, so the activation is applied to sums still in L1 and only
/// its result is stored; the bits equal [`matmul_rows`] of each matrix followed by
/// `ops::glu_slices`. False (nothing written) unless the shapes match and the path is
/// enabled.
///
/// # Safety
/// `out` is valid for writes of `(rows.rows - 1)·ldo + gate.n` f32 values.
pub unsafe fn matmul_glu_rows(rows: &Rows, gate: &Bf16Panels, up: &Bf16Panels, out: *mut f32, ldo: usize, act: super::ops::Glu) -> bool {
    let (k, a, rows) = (gate.k, &rows.a, rows.rows_for(gate.k));
    if rows == 0 || up.k != k || up.n != gate.n || ldo < gate.n || !enabled() {
        return false;
    }
    let (steps, panels) = (k / KS, gate.n / NR);
    let op = OutPtr(out);
    super::on_pool(panels, |p| {
        let bytes = if p + 1 < panels { steps * 1024 } else { 0 };
        let next = [(gate.panel((p + 1).min(panels - 1)), bytes), (up.panel((p + 1).min(panels - 1)), bytes)];
        // SAFETY: as in `matmul_rows`; this call writes columns p·16..p·16 + 16.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            amx::panels(a, rows, k, gate.panel(p), Some(up.panel(p)), next, op.get(), ldo, p * NR, Epilogue::Glu(act))
        };
    });
    true
}

/// What the tile kernel does with a row block's sums.
#[derive(Debug, Clone, Copy)]
enum Epilogue {
    /// Stored as they are: the first panel's at the given column, the second's 16 on.
    Store,
    /// `act(first) · second`, 16 columns.
    Glu(super::ops::Glu),
}

/// [`to_bf16`] of every value into `out` (sixteen lanes at a time where AVX-512 runs;
/// the same bits).
///
/// # Safety
/// `out` is valid for `x.len()` writes.
unsafe fn convert(x: &[f32], out: *mut u16) {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx512() {
        return to_bf16_avx512(x, out);
    }
    for (i, &v) in x.iter().enumerate() {
        *out.add(i) = to_bf16(v);
    }
}

/// [`to_bf16`] of every value, in aligned lines (tests).
#[cfg(test)]
fn to_bf16_vec(x: &[f32]) -> Lines {
    let mut lines = Lines::zeroed(x.len());
    let out = lines.as_mut_slice(x.len());
    // SAFETY: `out` holds x.len() values.
    unsafe { convert(x, out.as_mut_ptr()) };
    lines
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn to_bf16_avx512(x: &[f32], out: *mut u16) {
    use std::arch::x86_64::*;
    let n = x.len();
    let mut i = 0;
    while i + 16 <= n {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        let b = _mm512_castps_si512(v);
        let lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7FFF)), lsb), 16);
        let nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        let q = _mm512_or_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(0x40));
        let r = _mm512_mask_blend_epi32(nan, r, q);
        _mm256_storeu_si256(out.add(i) as *mut __m256i, _mm512_cvtepi32_epi16(r));
        i += 16;
    }
    while i < n {
        *out.add(i) = to_bf16(x[i]);
        i += 1;
    }
}


/// The f32 reference of one output (tests): the same bf16 operands, accumulated in the
/// order of the tile multiply's definition (step by step, pair by pair).
pub fn reference_dot(a_row: &[f32], w: &Bf16Panels, col: usize) -> f32 {
    let mut acc = 0f32;
    for (i, &v) in a_row.iter().enumerate().take(w.k) {
        acc += from_bf16(to_bf16(v)) * w.get(col, i);
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{Epilogue, Lines, KS, NR};
    use std::arch::asm;

    /// Palette 1: tmm0-3 sums (C, `ra`/`rb` rows x 16 f32), tmm4/5 activations (A0: `ra`
    /// rows, A1: `rb` rows, 32 bf16 each), tmm6/7 weights (16 pairs x 16 columns).
    fn config(ra: usize, rb: usize) -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: usize| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&64u16.to_le_bytes());
            c[48 + t] = rows as u8;
        };
        for (t, r) in [(0, ra), (1, ra), (2, rb), (3, rb), (4, ra), (5, rb), (6, 16), (7, 16)] {
            set(t, r);
        }
        c
    }

    /// A 16x16 f32 tile parked in memory for the epilogue.
    #[repr(C, align(64))]
    struct Parked([f32; 256]);

    /// All rows, in blocks of 32 (two row tiles), against the panel at `b0` and, when
    /// given, the one at `b1` (two tiles of 16 columns; `k/32` steps of 1 KB each), the
    /// sums finished by `epi` into `out` from column `col`. While they compute, the
    /// bytes of `next` (up to two regions: the weights the task takes next) are fetched
    /// into L2, a few lines per tile step.
    ///
    /// SAFETY: AMX-BF16 granted; `a` holds `rows x k` bf16; `b0` (and `b1`) hold `k/32`
    /// KB; `next` lies inside the weights; `out` has `rows` rows of stride `ldo` with the
    /// epilogue's columns from `col` writable; `Epilogue::Glu` comes with `b1`.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn panels(a: &Lines, rows: usize, k: usize, b0: *const u16, b1: Option<*const u16>, next: [(*const u16, usize); 2], out: *mut f32, ldo: usize, col: usize, epi: Epilogue) {
        let steps = k / KS;
        let two = b1.is_some();
        let b1 = b1.unwrap_or(b0);
        let sa = k * 2;
        let so = ldo * 4;
        let next_bytes = next[0].1 + next[1].1;
        let lines_per_step = (next_bytes / 64).div_ceil(rows.div_ceil(32) * steps);
        let mut fetched = 0;
        // The activation's four tiles, each written by a tile store before it is read.
        let mut park = std::mem::MaybeUninit::<[Parked; 4]>::uninit();
        let t = park.as_mut_ptr() as *mut f32;
        let t = [t, t.add(256), t.add(512), t.add(768)];
        let mut r0 = 0;
        while r0 < rows {
            let ra = (rows - r0).min(16);
            let rb = (rows - r0 - ra).min(16);
            // Tile heights are part of the configuration; 0 rows is not a valid one, so
            // a lone row tile configures (and never touches) a one-row second tile.
            super::super::q4_1::tile_config(0x1_0000 | (ra << 8) | rb.max(1), || config(ra, rb.max(1)));
            let a0 = a.as_ptr().add(r0 * k);
            let a1 = a.as_ptr().add((r0 + ra) * k);
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            for s in 0..steps {
                for _ in 0..lines_per_step {
                    if fetched < next_bytes {
                        let (base, off) = if fetched < next[0].1 { (next[0].0, fetched) } else { (next[1].0, fetched - next[0].1) };
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>((base as *const i8).add(off));
                        fetched += 64;
                    }
                }
                let (x0, x1) = (a0.add(s * KS), a1.add(s * KS));
                let (w0, w1) = (b0.add(s * 512), b1.add(s * 512));
                match (rb > 0, two) {
                    (true, true) => asm!(
                        "tileloadd tmm4, [{x0} + {sa}*1]",
                        "tileloadd tmm5, [{x1} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tileloadd tmm7, [{w1} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        "tdpbf16ps tmm3, tmm5, tmm7",
                        x0 = in(reg) x0, x1 = in(reg) x1, w0 = in(reg) w0, w1 = in(reg) w1, sa = in(reg) sa, sw = in(reg) 64usize,
                        options(nostack, readonly)
                    ),
                    (true, false) => asm!(
                        "tileloadd tmm4, [{x0} + {sa}*1]",
                        "tileloadd tmm5, [{x1} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm2, tmm5, tmm6",
                        x0 = in(reg) x0, x1 = in(reg) x1, w0 = in(reg) w0, sa = in(reg) sa, sw = in(reg) 64usize,
                        options(nostack, readonly)
                    ),
                    (false, true) => asm!(
                        "tileloadd tmm4, [{x0} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tileloadd tmm7, [{w1} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        "tdpbf16ps tmm1, tmm4, tmm7",
                        x0 = in(reg) x0, w0 = in(reg) w0, w1 = in(reg) w1, sa = in(reg) sa, sw = in(reg) 64usize,
                        options(nostack, readonly)
                    ),
                    (false, false) => asm!(
                        "tileloadd tmm4, [{x0} + {sa}*1]",
                        "tileloadd tmm6, [{w0} + {sw}*1]",
                        "tdpbf16ps tmm0, tmm4, tmm6",
                        x0 = in(reg) x0, w0 = in(reg) w0, sa = in(reg) sa, sw = in(reg) 64usize,
                        options(nostack, readonly)
                    ),
                }
            }
            let o0 = out.add(r0 * ldo + col);
            let o1 = out.add((r0 + ra) * ldo + col);
            match epi {
                Epilogue::Store => {
                    asm!("tilestored [{o} + {s}*1], tmm0", o = in(reg) o0, s = in(reg) so, options(nostack));
                    if two {
                        asm!("tilestored [{o} + {s}*1], tmm1", o = in(reg) o0.add(NR), s = in(reg) so, options(nostack));
                    }
                    if rb > 0 {
                        asm!("tilestored [{o} + {s}*1], tmm2", o = in(reg) o1, s = in(reg) so, options(nostack));
                        if two {
                            asm!("tilestored [{o} + {s}*1], tmm3", o = in(reg) o1.add(NR), s = in(reg) so, options(nostack));
                        }
                    }
                }
                Epilogue::Glu(act) => {
                    asm!("tilestored [{o} + {s}*1], tmm0", o = in(reg) t[0], s = in(reg) 64usize, options(nostack));
                    asm!("tilestored [{o} + {s}*1], tmm1", o = in(reg) t[1], s = in(reg) 64usize, options(nostack));
                    if rb > 0 {
                        asm!("tilestored [{o} + {s}*1], tmm2", o = in(reg) t[2], s = in(reg) 64usize, options(nostack));
                        asm!("tilestored [{o} + {s}*1], tmm3", o = in(reg) t[3], s = in(reg) 64usize, options(nostack));
                    }
                    for r in 0..ra {
                        crate::kernels::ops::glu16(t[0].add(r * NR), t[1].add(r * NR), o0.add(r * ldo), act);
                    }
                    for r in 0..rb {
                        crate::kernels::ops::glu16(t[2].add(r * NR), t[3].add(r * NR), o1.add(r * ldo), act);
                    }
                }
            }
            r0 += ra + rb;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
        assert_eq!(to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
        assert_eq!(to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
        assert_eq!(to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(to_bf16(-2.5), 0xC020);
    }

    #[test]
    fn vector_rounding_matches_the_scalar_one() {
        let mut v: Vec<f32> = (0..1000).map(|i| f32::from_bits(0x3F80_0000u32.wrapping_add((i as u32) * 0x1_0001_7))).collect();
        v.extend([f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, f32::MIN_POSITIVE / 3.0, f32::MAX, f32::from_bits(0x3F80_8000), f32::from_bits(0x3F81_8000)]);
        let want: Vec<u16> = v.iter().map(|&x| to_bf16(x)).collect();
        let got = to_bf16_vec(&v);
        assert_eq!((0..v.len()).map(|i| got.get(i)).collect::<Vec<_>>(), want);
    }

    #[test]
    fn pack_rejects_shapes_the_tiles_cannot_take() {
        assert!(Bf16Panels::pack(&[0.0; 15 * 32], 15, 32).is_none());
        assert!(Bf16Panels::pack(&[0.0; 16 * 31], 16, 31).is_none());
        let w: Vec<f32> = (0..32 * 64).map(|i| i as f32).collect();
        let p = Bf16Panels::pack(&w, 32, 64).expect("packs");
        for col in [0, 5, 16, 31] {
            for i in [0, 1, 31, 32, 63] {
                assert_eq!(p.get(col, i), from_bf16(to_bf16(w[col * 64 + i])));
            }
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Against the f32 reference of the same bf16 operands, and a row's result the same
    /// bit for bit whatever the number of rows of the call (1 to 45: lone row tiles,
    /// pairs, remainders) and with an odd panel count.
    #[test]
    fn tile_gemm_matches_reference_and_is_row_independent() {
        if !enabled() {
            eprintln!("skipped: no AMX-BF16 here (the integer kernels take every row)");
            return;
        }
        let mut seed = 7u64;
        for (n, k) in [(48usize, 96usize), (64, 576)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let p = Bf16Panels::pack(&w, n, k).expect("packs");
            let x: Vec<f32> = (0..45 * k).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut full = vec![0f32; 45 * n];
            crate::kernels::pool().install(|| matmul_into(&x, 45, &p, &mut full, n));
            for r in 0..45 {
                for c in 0..n {
                    let want = reference_dot(&x[r * k..(r + 1) * k], &p, c);
                    let got = full[r * n + c];
                    assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {r} col {c}: {got} vs {want}");
                }
            }
            for rows in [1usize, 2, 15, 16, 17, 31, 32, 33] {
                for start in [0usize, 3, 45 - rows] {
                    let mut part = vec![0f32; rows * n];
                    matmul_into(&x[start * k..(start + rows) * k], rows, &p, &mut part, n);
                    for r in 0..rows {
                        assert_eq!(part[r * n..(r + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), full[(start + r) * n..(start + r + 1) * n].iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "rows {rows} from {start}: row {r}");
                    }
                }
            }
            // A wider output stride (the caller's rows are longer than this matrix's).
            let mut wide = vec![-1f32; 3 * (n + 16)];
            matmul_into(&x[..3 * k], 3, &p, &mut wide, n + 16);
            for r in 0..3 {
                assert_eq!(&wide[r * (n + 16)..r * (n + 16) + n], &full[r * n..(r + 1) * n]);
                assert!(wide[r * (n + 16) + n..(r + 1) * (n + 16)].iter().all(|&v| v == -1.0), "columns past n untouched");
            }
        }
    }
}
