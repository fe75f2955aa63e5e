//! Quantized weights times f32 activations on the CPU, as a small integer GEMM.
//!
//! Activations are quantized per 32-block to 8 bits (one f32 scale per block, as
//! llama.cpp's Q8 activations), so every block's dot product is an exact integer sum and
//! only the per-block scaling is floating point. Weights are repacked at load time into
//! *panels* of 16 output columns: for each 32-value block of the reduction axis, a panel
//! holds the 16 columns' values interleaved four at a time, which is the operand layout
//! of AVX-512 VNNI's `vpdpbusd` (16 lanes, each a 4-byte u8·i8 dot product). One
//! instruction then multiplies 64 weight bytes by four activation bytes broadcast to
//! every lane, and a tile of up to eight activation rows reuses each unpacked panel
//! block: the weight traffic of a prefill or a batched decode step is paid once per
//! eight rows, not once per row.
//!
//! Two weight formats share the scheme:
//! - [`Q4_1Matrix`]: 4-bit values `q` (0..15) with a scale and a minimum per block,
//!   `w = d·q + m` (GGUF Q4_1, and Q4_K repacked exactly);
//! - [`Q8_0Matrix`]: 8-bit values with one scale per 16 values (GGUF Q8_0 and Q5_0, whose
//!   two halves share the scale, and Q6_K, repacked exactly). They are stored offset by
//!   128 as unsigned bytes, the operand `vpdpbusd` multiplies, and the offset is taken
//!   back out of the integer sum exactly (`Σ(w+128)·a − 128·Σa`).
//!
//! Arithmetic per output element, whatever the kernel (AVX-512 VNNI, AVX2, scalar) and
//! whatever the number of rows in the call: for each block in order, the exact integer
//! sum, then `acc = fma(isum, d_w·d_a, acc)` (and `acc = fma(m, d_a·Σa, acc)` for Q4_1).
//! A row's result therefore never depends on the other rows of the batch, bit for bit,
//! which seeded sampling in a continuously batched server relies on.
use half::f16;
use rayon::prelude::*;

pub const QK: usize = 32;
/// Output columns per panel (one 512-bit register of i32/f32 lanes).
const NR: usize = 16;
/// Activation rows per register tile: 16 with AVX-512 (32 vector registers: 16
/// accumulators, 8 unpacked weight vectors, temporaries), so a decode step of 16
/// sequences streams each weight panel once; 8 otherwise.
fn mr(isa: Isa) -> usize {
    if matches!(isa, Isa::Vnni | Isa::Amx) {
        16
    } else {
        8
    }
}
const BLOCK_BYTES: usize = 20;
/// How many blocks ahead the AVX-512 kernels prefetch weights (about a DRAM latency of
/// work at decode batch sizes).
const PF_BLOCKS: usize = 4;

/// Calls `$f::<R>` for the tile height `$rt` (1..=16), so each height has its own fully
/// unrolled register tile.
macro_rules! dispatch_rows {
    ($rt:expr, $f:ident $(::<$c:tt>)?, $($arg:expr),*) => {
        match $rt {
            1 => $f::<$($c,)? 1>($($arg),*),
            2 => $f::<$($c,)? 2>($($arg),*),
            3 => $f::<$($c,)? 3>($($arg),*),
            4 => $f::<$($c,)? 4>($($arg),*),
            5 => $f::<$($c,)? 5>($($arg),*),
            6 => $f::<$($c,)? 6>($($arg),*),
            7 => $f::<$($c,)? 7>($($arg),*),
            8 => $f::<$($c,)? 8>($($arg),*),
            9 => $f::<$($c,)? 9>($($arg),*),
            10 => $f::<$($c,)? 10>($($arg),*),
            11 => $f::<$($c,)? 11>($($arg),*),
            12 => $f::<$($c,)? 12>($($arg),*),
            13 => $f::<$($c,)? 13>($($arg),*),
            14 => $f::<$($c,)? 14>($($arg),*),
            15 => $f::<$($c,)? 15>($($arg),*),
            _ => $f::<$($c,)? 16>($($arg),*),
        }
    };
}

/// Bytes (u8 or i8) on 64-byte boundaries. Tile loads read 64-byte rows (and the VNNI
/// kernels 64-byte vectors); a row that straddles two cache lines costs two accesses,
/// which halved the bf16 tile multiply's rate until its operands were aligned.
#[derive(Clone, Default)]
pub(crate) struct Aligned<T: Byte> {
    lines: Vec<Line64>,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line64([u8; 64]);

/// One-byte element types with every bit pattern valid.
pub(crate) trait Byte: Copy + Default {
    fn bits(self) -> u8;
}
impl Byte for u8 {
    fn bits(self) -> u8 {
        self
    }
}
impl Byte for i8 {
    fn bits(self) -> u8 {
        self as u8
    }
}

impl<T: Byte> Aligned<T> {
    pub(crate) fn filled(len: usize, v: T) -> Self {
        Self { lines: vec![Line64([v.bits(); 64]); len.div_ceil(64)], len, _t: std::marker::PhantomData }
    }
}

impl<T: Byte> std::ops::Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: T is one byte with every bit pattern valid; the lines hold >= len bytes.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const T, self.len) }
    }
}

impl<T: Byte> std::ops::DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as in `deref`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut T, self.len) }
    }
}

impl<T: Byte> std::fmt::Debug for Aligned<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aligned({} bytes)", self.len)
    }
}

/// A `[n, k]` matrix of 4-bit values with a scale and a minimum per 32-block, in panels.
#[derive(Debug, Clone)]
pub struct Q4_1Matrix {
    pub n: usize,
    pub k: usize,
    /// `[panels * kb * 16]`: panel p, block b, column l at `(p·kb + b)·16 + l`.
    d: Vec<f32>,
    m: Vec<f32>,
    /// `[panels * kb * 256]`: per panel block, four 64-byte chunks; chunk j byte `4l + i`
    /// holds column l's value `4j + i` (low nibble) and `16 + 4j + i` (high nibble).
    qs: Aligned<u8>,
    /// The bf16 copy prompt rows take (`kernels::bf16`), made on first use.
    bf16: super::bf16::LazyBf16,
}

/// A `[n, k]` matrix of i8 values with one f32 scale per 16 values, in panels.
#[derive(Debug, Clone)]
pub struct Q8_0Matrix {
    pub n: usize,
    pub k: usize,
    /// Scales, `u` per block (`u` = 1 when `uniform`, else 2, one per half): panel p,
    /// block b, unit h, column l at `((p·kb + b)·u + h)·16 + l`.
    d: Vec<f32>,
    /// `[panels * kb * 512]`: per panel block, eight 64-byte groups; group g byte `4l + i`
    /// holds column l's value `4g + i` plus 128, as u8.
    qs: Aligned<u8>,
    /// Both halves of every block share one scale (Q8_0, Q5_0): one scaling per block.
    uniform: bool,
    /// The bf16 copy prompt rows take (`kernels::bf16`), made on first use.
    bf16: super::bf16::LazyBf16,
}

/// Activations quantized per 32-block: `x ≈ d·q`; `s = d·Σq` (the Q4_1 minimum term);
/// and per block the Q8 offset corrections `−128·Σq` over values 0..16, 16..32 and all
/// 32 (the starting values of the VNNI kernel's integer sums over u8 = w + 128 weights).
struct Q8Rows {
    d: Vec<f32>,
    s: Vec<f32>,
    corr: Vec<i32>,
    q: Vec<i8>,
    /// For the AMX kernel (else empty): `q` regrouped so that each 16-row tile's block
    /// is one contiguous `rt x 32` run: row tile at `r0·k`, block b row i at
    /// `r0·k + (b·rt + i)·32`.
    tiled: Aligned<i8>,
}

/// Scatter per-column values `val(col, u)` (u: a unit index along k) into panel order:
/// `[panels][units][16]`, zero for the padding columns past `n`.
fn panel_scales(n: usize, units: usize, val: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut out = vec![0f32; panels * units * NR];
    for col in 0..n {
        let (p, l) = (col / NR, col % NR);
        for u in 0..units {
            out[(p * units + u) * NR + l] = val(col, u);
        }
    }
    out
}

impl Q4_1Matrix {
    /// From row-major 4-bit values (`q[col·k + i]`, 0..15) and per-block `d`, `m`
    /// (`[n · k/32]`, row-major).
    fn pack(n: usize, k: usize, q: &[u8], d: &[f32], m: &[f32]) -> Self {
        let kb = k / QK;
        let panels = n.div_ceil(NR);
        let mut qs = Aligned::filled(panels * kb * 256, 0u8);
        for col in 0..n {
            let (p, l) = (col / NR, col % NR);
            for b in 0..kb {
                let src = &q[col * k + b * QK..col * k + (b + 1) * QK];
                let dst = &mut qs[(p * kb + b) * 256..(p * kb + b + 1) * 256];
                for j in 0..4 {
                    for i in 0..4 {
                        dst[j * 64 + 4 * l + i] = src[4 * j + i] | (src[16 + 4 * j + i] << 4);
                    }
                }
            }
        }
        Self {
            n,
            k,
            d: panel_scales(n, kb, |c, b| d[c * kb + b]),
            m: panel_scales(n, kb, |c, b| m[c * kb + b]),
            qs,
            bf16: Default::default(),
        }
    }

    /// From GGUF Q4_1 bytes (ggml's `block_q4_1`: f16 d, f16 m, 16 bytes of nibbles).
    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * (k / QK) * BLOCK_BYTES {
            return None;
        }
        let nb = n * (k / QK);
        let (mut d, mut m) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        let mut q = Vec::with_capacity(n * k);
        for b in bytes.chunks_exact(BLOCK_BYTES) {
            d.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
            m.push(f16::from_le_bytes([b[2], b[3]]).to_f32());
            q.extend(b[4..20].iter().map(|x| x & 0x0F));
            q.extend(b[4..20].iter().map(|x| x >> 4));
        }
        Some(Self::pack(n, k, &q, &d, &m))
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
        let (mut d, mut m) = (Vec::with_capacity(nb), Vec::with_capacity(nb));
        let mut qv = Vec::with_capacity(n * k);
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
                    qv.extend(chunk.iter().map(|x| (x >> shift) & 0x0F));
                }
            }
        }
        Some(Self::pack(n, k, &qv, &d, &m))
    }

    /// Dense f32 values (row-major `[n, k]`), for checks, exports and the backward pass.
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k / QK;
        let mut out = vec![0f32; self.n * self.k];
        for col in 0..self.n {
            let (p, l) = (col / NR, col % NR);
            for b in 0..kb {
                let pb = p * kb + b;
                let blk = &self.qs[pb * 256..(pb + 1) * 256];
                let (d, m) = (self.d[pb * NR + l], self.m[pb * NR + l]);
                let o = &mut out[col * self.k + b * QK..col * self.k + (b + 1) * QK];
                for j in 0..4 {
                    for i in 0..4 {
                        let byte = blk[j * 64 + 4 * l + i];
                        o[4 * j + i] = d * (byte & 0x0F) as f32 + m;
                        o[16 + 4 * j + i] = d * (byte >> 4) as f32 + m;
                    }
                }
            }
        }
        out
    }

    /// `dst[r, j] = Σ_i x[r, i] · W[j, i]` for `x`: `[rows, k]` row-major.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.k);
        self.matmul_isa(x, rows, isa())
    }

    fn matmul_isa(&self, x: &[f32], rows: usize, isa: Isa) -> Vec<f32> {
        matmul_one(self.into(), x, rows, isa)
    }

    /// Rows `r0..r0 + rt` (rt <= 16) times panel `p`, into `out` (row stride `ldo`),
    /// writing the first `cols` columns of the panel.
    #[allow(clippy::too_many_arguments)]
    fn tile(&self, isa: Isa, p: usize, r0: usize, rt: usize, a: &Q8Rows, out: *mut f32, ldo: usize, cols: usize) {
        let kb = self.k / QK;
        let (wq, wd, wm) = (&self.qs[p * kb * 256..(p + 1) * kb * 256], &self.d[p * kb * NR..(p + 1) * kb * NR], &self.m[p * kb * NR..(p + 1) * kb * NR]);
        let k = self.k;
        let (aq, ad, asum) = (&a.q[r0 * k..(r0 + rt) * k], &a.d[r0 * kb..(r0 + rt) * kb], &a.s[r0 * kb..(r0 + rt) * kb]);
        #[cfg(target_arch = "x86_64")]
        match isa {
            // SAFETY: the features were detected; the slices hold rt rows and kb blocks,
            // and `out` has rt rows of stride ldo with `cols` writable columns.
            Isa::Amx if rt >= amx::MIN_ROWS && a.tiled.len() == a.q.len() && a.q.len() >= amx::MIN_CALL_ROWS * k => {
                let at = &a.tiled[r0 * k..(r0 + rt) * k];
                return unsafe { amx::q4(wq, r0 == 0, wd, wm, at, ad, asum, kb, rt, out, ldo, cols) };
            }
            Isa::Vnni | Isa::Amx => return unsafe { dispatch_rows!(rt, q4_vnni, wq, wd, wm, aq, ad, asum, kb, out, ldo, cols) },
            Isa::Avx2 => return unsafe { dispatch_rows!(rt, q4_avx2, wq, wd, wm, aq, ad, asum, kb, out, ldo, cols) },
            Isa::Scalar => {}
        }
        for i in 0..rt {
            for l in 0..cols {
                let mut acc = 0f32;
                for b in 0..kb {
                    let blk = &wq[b * 256..(b + 1) * 256];
                    let av = &aq[i * k + b * QK..i * k + (b + 1) * QK];
                    let mut isum = 0i32;
                    for j in 0..4 {
                        for t in 0..4 {
                            let byte = blk[j * 64 + 4 * l + t];
                            isum += (byte & 0x0F) as i32 * av[4 * j + t] as i32 + (byte >> 4) as i32 * av[16 + 4 * j + t] as i32;
                        }
                    }
                    acc = (isum as f32).mul_add(wd[b * NR + l] * ad[i * kb + b], acc);
                    acc = wm[b * NR + l].mul_add(asum[i * kb + b], acc);
                }
                // SAFETY: row i < rt and column l < cols are inside `out`.
                unsafe { *out.add(i * ldo + l) = acc };
            }
        }
    }
}

impl Q8_0Matrix {
    /// From row-major i8 values and per-16 scales (`[n · k/16]`, row-major).
    fn pack(n: usize, k: usize, q: &[i8], d16: &[f32], uniform: bool) -> Self {
        let kb = k / QK;
        let panels = n.div_ceil(NR);
        let mut qs = Aligned::filled(panels * kb * 512, 128u8);
        for col in 0..n {
            let (p, l) = (col / NR, col % NR);
            for b in 0..kb {
                let src = &q[col * k + b * QK..col * k + (b + 1) * QK];
                let dst = &mut qs[(p * kb + b) * 512..(p * kb + b + 1) * 512];
                for g in 0..8 {
                    for i in 0..4 {
                        dst[g * 64 + 4 * l + i] = (src[4 * g + i] as u8) ^ 0x80;
                    }
                }
            }
        }
        let d = if uniform { panel_scales(n, kb, |c, b| d16[c * 2 * kb + 2 * b]) } else { panel_scales(n, 2 * kb, |c, u| d16[c * 2 * kb + u]) };
        Self { n, k, d, qs, uniform, bf16: Default::default() }
    }

    /// Scale units per block: 1 (one scale per 32 values) or 2 (per 16).
    fn units(&self) -> usize {
        if self.uniform {
            1
        } else {
            2
        }
    }

    pub fn from_ggml_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * (k / QK) * 34 {
            return None;
        }
        let nb = n * (k / QK);
        let mut d = Vec::with_capacity(nb * 2);
        let mut q = Vec::with_capacity(nb * QK);
        for b in bytes.chunks_exact(34) {
            let s = f16::from_le_bytes([b[0], b[1]]).to_f32();
            d.extend([s, s]);
            q.extend(b[2..34].iter().map(|&x| x as i8));
        }
        Some(Self::pack(n, k, &q, &d, true))
    }

    /// A ggml `block_q5_0` matrix (f16 d, 32 high bits, 16 bytes of low nibbles) as Q8_0:
    /// every Q5_0 value `q - 16` (-16..15) fits an i8 under the same scale, so the
    /// conversion is exact.
    pub fn from_q5_0_bytes(bytes: &[u8], n: usize, k: usize) -> Option<Self> {
        if k % QK != 0 || bytes.len() != n * (k / QK) * 22 {
            return None;
        }
        let nb = n * (k / QK);
        let mut d = Vec::with_capacity(nb * 2);
        let mut q = Vec::with_capacity(nb * QK);
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
            q.extend_from_slice(&block);
        }
        Some(Self::pack(n, k, &q, &d, true))
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
        Some(Self::pack(n, k, &qs, &d, false))
    }

    /// Dense f32 values (row-major `[n, k]`).
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.k / QK;
        let mut out = vec![0f32; self.n * self.k];
        for col in 0..self.n {
            let (p, l) = (col / NR, col % NR);
            for b in 0..kb {
                let pb = p * kb + b;
                let blk = &self.qs[pb * 512..(pb + 1) * 512];
                let o = &mut out[col * self.k + b * QK..col * self.k + (b + 1) * QK];
                for v in 0..QK {
                    let q = (blk[(v / 4) * 64 + 4 * l + v % 4] ^ 0x80) as i8;
                    let u = self.units();
                    o[v] = self.d[(pb * u + (v / 16) * (u - 1)) * NR + l] * q as f32;
                }
            }
        }
        out
    }

    pub fn matmul(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.k);
        self.matmul_isa(x, rows, isa())
    }

    fn matmul_isa(&self, x: &[f32], rows: usize, isa: Isa) -> Vec<f32> {
        matmul_one(self.into(), x, rows, isa)
    }

    #[allow(clippy::too_many_arguments)]
    fn tile(&self, isa: Isa, p: usize, r0: usize, rt: usize, a: &Q8Rows, out: *mut f32, ldo: usize, cols: usize) {
        let kb = self.k / QK;
        let u = self.units();
        let (wq, wd) = (&self.qs[p * kb * 512..(p + 1) * kb * 512], &self.d[p * kb * u * NR..(p + 1) * kb * u * NR]);
        let k = self.k;
        let (aq, ad, sums) = (&a.q[r0 * k..(r0 + rt) * k], &a.d[r0 * kb..(r0 + rt) * kb], &a.corr[r0 * 3 * kb..(r0 + rt) * 3 * kb]);
        #[cfg(target_arch = "x86_64")]
        match (isa, self.uniform) {
            // SAFETY: as in Q4_1Matrix::tile.
            (Isa::Amx, true) if rt >= amx::MIN_ROWS && a.tiled.len() == a.q.len() => {
                let at = &a.tiled[r0 * k..(r0 + rt) * k];
                return unsafe { amx::q8(wq, wd, sums, at, ad, kb, rt, out, ldo, cols) };
            }
            (Isa::Vnni | Isa::Amx, true) => return unsafe { dispatch_rows!(rt, q8_vnni::<false>, wq, wd, sums, aq, ad, kb, out, ldo, cols) },
            (Isa::Vnni | Isa::Amx, false) => return unsafe { dispatch_rows!(rt, q8_vnni::<true>, wq, wd, sums, aq, ad, kb, out, ldo, cols) },
            (Isa::Avx2, true) => return unsafe { dispatch_rows!(rt, q8_avx2::<false>, wq, wd, sums, aq, ad, kb, out, ldo, cols) },
            (Isa::Avx2, false) => return unsafe { dispatch_rows!(rt, q8_avx2::<true>, wq, wd, sums, aq, ad, kb, out, ldo, cols) },
            _ => {}
        }
        for i in 0..rt {
            for l in 0..cols {
                let mut acc = 0f32;
                for b in 0..kb {
                    let blk = &wq[b * 512..(b + 1) * 512];
                    let av = &aq[i * k + b * QK..i * k + (b + 1) * QK];
                    let half = |h: usize| -> i32 { (h * 16..h * 16 + 16).map(|v| ((blk[(v / 4) * 64 + 4 * l + v % 4] ^ 0x80) as i8) as i32 * av[v] as i32).sum() };
                    let da = ad[i * kb + b];
                    if self.uniform {
                        acc = ((half(0) + half(1)) as f32).mul_add(wd[b * NR + l] * da, acc);
                    } else {
                        acc = (half(0) as f32).mul_add(wd[b * 2 * NR + l] * da, acc);
                        acc = (half(1) as f32).mul_add(wd[(b * 2 + 1) * NR + l] * da, acc);
                    }
                }
                // SAFETY: row i < rt and column l < cols are inside `out`.
                unsafe { *out.add(i * ldo + l) = acc };
            }
        }
    }
}


/// A reference to either matrix kind, for [`matmul_many`].
#[derive(Debug, Clone, Copy)]
pub enum QMat<'a> {
    Q4(&'a Q4_1Matrix),
    Q8(&'a Q8_0Matrix),
}

impl<'a> From<&'a Q4_1Matrix> for QMat<'a> {
    fn from(m: &'a Q4_1Matrix) -> Self {
        QMat::Q4(m)
    }
}

impl<'a> From<&'a Q8_0Matrix> for QMat<'a> {
    fn from(m: &'a Q8_0Matrix) -> Self {
        QMat::Q8(m)
    }
}

impl QMat<'_> {
    /// The fewest rows of a call in which this matrix takes the AMX kernel (where the CPU
    /// has it): Q4_1 panels are unpacked once per call, so two tiles' worth; 8-bit panels
    /// with one scale per 32 values need no unpacking, so one tile; others never.
    #[cfg(target_arch = "x86_64")]
    fn amx_min_rows(&self) -> usize {
        match self {
            QMat::Q4(_) => amx::MIN_CALL_ROWS,
            QMat::Q8(m) if m.uniform => amx::MIN_ROWS,
            QMat::Q8(_) => usize::MAX,
        }
    }
    fn n(&self) -> usize {
        match self {
            QMat::Q4(m) => m.n,
            QMat::Q8(m) => m.n,
        }
    }
    fn k(&self) -> usize {
        match self {
            QMat::Q4(m) => m.k,
            QMat::Q8(m) => m.k,
        }
    }
}

impl QMat<'_> {
    /// The matrix's bf16 copy for prompt rows (made on first use), where that path runs.
    fn bf16(&self) -> Option<&super::bf16::Bf16Panels> {
        match self {
            QMat::Q4(m) => m.bf16.get_or_make(m.n, m.k, || m.dequantize()),
            QMat::Q8(m) => m.bf16.get_or_make(m.n, m.k, || m.dequantize()),
        }
    }
}

/// [`matmul_many`] for a forward pass whose rows are of two kinds: `prompt[r]` true for
/// a row of a prompt token, which takes the bf16 tile path (`kernels::bf16`) for every
/// matrix that has one; all other rows, and every row of a matrix without one, take the
/// integer kernels. A row's result depends only on its kind, never on the other rows.
pub fn matmul_many_rows(x: &[f32], rows: usize, mats: &[QMat], prompt: &[bool]) -> Option<Vec<Vec<f32>>> {
    let k = mats.first()?.k();
    if prompt.len() != rows || !prompt.iter().any(|&p| p) || !super::bf16::enabled() || x.len() != rows * k || mats.iter().any(|m| m.k() != k) {
        return matmul_many(x, rows, mats);
    }
    let copies: Vec<Option<&super::bf16::Bf16Panels>> = mats.iter().map(|m| m.bf16()).collect();
    if copies.iter().all(|c| c.is_none()) {
        return matmul_many(x, rows, mats);
    }
    // Every element is written below: each row belongs to one run, and a run writes all
    // columns of its rows, through one kernel or the other.
    let mut outs: Vec<Uninit> = mats.iter().map(|m| Uninit::new(rows * m.n())).collect();
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| o.ptr()).collect();
    for (a, b, p) in runs(prompt) {
        let xs = &x[a * k..b * k];
        // The integer kernels for this run: every matrix when it is a run of generated
        // tokens, else only those without a bf16 copy.
        let int_mats: Vec<(usize, QMat)> = mats.iter().enumerate().filter(|(i, _)| !p || copies[*i].is_none()).map(|(i, m)| (i, *m)).collect();
        if !int_mats.is_empty() {
            let just: Vec<QMat> = int_mats.iter().map(|(_, m)| *m).collect();
            let res = matmul_many(xs, b - a, &just)?;
            for ((i, m), r) in int_mats.iter().zip(res) {
                let n = m.n();
                // SAFETY: rows a..b of output i (rows x n) are inside it; `r` has (b-a)·n.
                unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), ptrs[*i].get().add(a * n), (b - a) * n) };
            }
        }
        if p {
            // The run's rows in bf16 once, for every matrix that takes them.
            let tiles = super::bf16::Rows::new(xs, b - a, k);
            for (i, c) in copies.iter().enumerate() {
                if let Some(w) = c {
                    // SAFETY: rows a..b of output i (stride n = w.n) are inside it.
                    unsafe { super::bf16::matmul_rows(&tiles, w, ptrs[i].get().add(a * w.n), w.n) };
                }
            }
        }
    }
    Some(outs.into_iter().map(Uninit::finish).collect())
}

/// Runs `(start, end, kind)` of consecutive rows of one kind, in order.
fn runs(prompt: &[bool]) -> Vec<(usize, usize, bool)> {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    for (r, &p) in prompt.iter().enumerate() {
        match runs.last_mut() {
            Some((_, end, kind)) if *kind == p => *end = r + 1,
            _ => runs.push((r, r + 1, p)),
        }
    }
    runs
}

/// A feed-forward block's `act(x · gateᵀ) · (x · upᵀ)` with the rows' kinds, as
/// [`matmul_many_rows`] of the two matrices followed by `ops::glu_slices`, bit for bit.
/// When both matrices have bf16 copies, a prompt row's activation is applied in the
/// tile kernel's epilogue (`bf16::matmul_glu_rows`): the two products are never stored.
/// None if the shapes differ.
pub fn matmul_glu_rows(x: &[f32], rows: usize, gate: QMat, up: QMat, prompt: &[bool], act: super::ops::Glu) -> Option<Vec<f32>> {
    use super::ops::glu_slices;
    let (k, n) = (gate.k(), gate.n());
    if up.k() != k || up.n() != n || x.len() != rows * k {
        return None;
    }
    let bf16 = prompt.len() == rows && prompt.iter().any(|&p| p) && super::bf16::enabled();
    let (Some(gw), Some(uw)) = (if bf16 { (gate.bf16(), up.bf16()) } else { (None, None) }) else {
        let [g, u]: [Vec<f32>; 2] = matmul_many_rows(x, rows, &[gate, up], prompt)?.try_into().ok()?;
        return Some(glu_slices(&g, &u, act));
    };
    // Every element is written below: each run writes all columns of its rows.
    let mut out = Uninit::new(rows * n);
    let ptr = out.ptr();
    for (a, b, p) in runs(prompt) {
        let xs = &x[a * k..b * k];
        if p {
            let tiles = super::bf16::Rows::new(xs, b - a, k);
            // SAFETY: rows a..b of the output (stride n = gw.n) are inside it.
            if !unsafe { super::bf16::matmul_glu_rows(&tiles, gw, uw, ptr.get().add(a * n), n, act) } {
                return None;
            }
        } else {
            let [g, u]: [Vec<f32>; 2] = matmul_many(xs, b - a, &[gate, up])?.try_into().ok()?;
            let r = glu_slices(&g, &u, act);
            // SAFETY: rows a..b of the output are inside it; `r` has (b-a)·n values.
            unsafe { std::ptr::copy_nonoverlapping(r.as_ptr(), ptr.get().add(a * n), (b - a) * n) };
        }
    }
    Some(out.finish())
}

/// `x · W_iᵀ` for several matrices of the same input width (a layer's q, k and v
/// projections; its gate and up projections): the activations are quantized once and
/// every matrix's panels go to the pool as one parallel pass. Each result is bit for bit
/// what `matmul` on that matrix returns. None if the widths differ.
pub fn matmul_many(x: &[f32], rows: usize, mats: &[QMat]) -> Option<Vec<Vec<f32>>> {
    matmul_many_isa(x, rows, mats, isa())
}

/// `matmul_many` with a chosen kernel (every matmul goes through here): the quantized
/// activations, then every matrix's panels split across the pool, each task taking its
/// panels over all rows in register tiles, a panel's weights staying in L1 while the
/// activations stream from L2.
fn matmul_many_isa(x: &[f32], rows: usize, mats: &[QMat], isa: Isa) -> Option<Vec<Vec<f32>>> {
    let k = mats.first()?.k();
    if mats.iter().any(|m| m.k() != k) || x.len() != rows * k {
        return None;
    }
    let mut a = quantize_rows(x, rows, k);
    // The tile layout of the activations, only when some matrix will take AMX.
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Amx && mats.iter().any(|m| rows >= m.amx_min_rows()) {
        a.tiled = amx::tile_rows(&a.q, rows, k, mr(isa));
    }
    let mut outs: Vec<Uninit> = mats.iter().map(|m| Uninit::new(rows * m.n())).collect();
    if rows == 0 {
        return Some(outs.into_iter().map(Uninit::finish).collect());
    }
    // Global panel index -> (matrix, local panel).
    let mut starts = Vec::with_capacity(mats.len() + 1);
    let mut total = 0;
    for m in mats {
        starts.push(total);
        total += m.n().div_ceil(NR);
    }
    starts.push(total);
    let ptrs: Vec<OutPtr> = outs.iter_mut().map(|o| o.ptr()).collect();
    run_panels(total, rows, mr(isa), |gp, r0, rt| {
        let i = starts.partition_point(|&s| s <= gp) - 1;
        let (m, p) = (mats[i], gp - starts[i]);
        let n = m.n();
        let col0 = p * NR;
        // SAFETY: row r0, column col0 is inside output i (rows x n).
        let out = unsafe { ptrs[i].get().add(r0 * n + col0) };
        match m {
            QMat::Q4(m) => m.tile(isa, p, r0, rt, &a, out, n, (n - col0).min(NR)),
            QMat::Q8(m) => m.tile(isa, p, r0, rt, &a, out, n, (n - col0).min(NR)),
        }
    });
    Some(outs.into_iter().map(Uninit::finish).collect())
}

/// A raw output pointer handed to the tasks; each writes only its own panels' columns.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: tasks write disjoint column ranges of the buffer, which outlives them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the field).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An output buffer the kernels overwrite completely (every panel's tiles store all their
/// rows and valid columns, and the panels cover all columns), so it is not zeroed first.
struct Uninit(Vec<std::mem::MaybeUninit<f32>>);

impl Uninit {
    fn new(len: usize) -> Self {
        let mut v = Vec::with_capacity(len);
        v.resize_with(len, std::mem::MaybeUninit::uninit);
        Self(v)
    }
    fn ptr(&mut self) -> OutPtr {
        OutPtr(self.0.as_mut_ptr() as *mut f32)
    }
    /// The buffer as f32, once every element has been written.
    fn finish(self) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(self.0);
        let (p, len, cap) = (v.as_mut_ptr(), v.len(), v.capacity());
        // SAFETY: MaybeUninit<f32> and f32 have the same layout; the callers wrote every
        // element (or len is 0).
        unsafe { Vec::from_raw_parts(p as *mut f32, len, cap) }
    }
}

/// One matrix's product through the shared driver.
fn matmul_one(m: QMat, x: &[f32], rows: usize, isa: Isa) -> Vec<f32> {
    matmul_many_isa(x, rows, &[m], isa).and_then(|mut v| v.pop()).unwrap_or_default()
}

/// Runs `f(panel, r0, rt)` for every panel and row tile: panels split across the pool in
/// contiguous ranges, each task taking its panels over all rows in tiles of `mr`. Once a
/// panel holds at least one full register tile of rows (a decode step of `mr` sequences,
/// a prompt chunk), the ranges are four times finer than [`super::on_pool`]'s: a panel
/// is then at least `mr·16·k` multiply-adds, far above a task's cost, and the thread
/// that finishes first waits on a quarter as much of the other's last range (2-core
/// AMD VM, `hromada bench gemm --rows 512`: 960x576 1.060 -> 1.005 ms, 576x1536 2.813
/// -> 2.699 ms; `perf` of a prompt-only load: the idle worker's share 7.4% -> 4.1%).
/// Below a full tile a panel is too little work to split finer.
fn run_panels(panels: usize, rows: usize, mr: usize, f: impl Fn(usize, usize, usize) + Sync) {
    let per_thread = if rows >= mr { 4 * super::TASKS_PER_THREAD } else { super::TASKS_PER_THREAD };
    super::on_pool_split(panels, per_thread, |p| {
        let mut r0 = 0;
        while r0 < rows {
            let rt = (rows - r0).min(mr);
            f(p, r0, rt);
            r0 += rt;
        }
    });
}

/// The instruction set the kernels use, detected once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    /// AVX-512 F/BW + VNNI (512-bit `vpdpbusd`).
    Vnni,
    /// VNNI, and for tiles of at least [`amx::MIN_ROWS`] rows (Q4_1: in calls of at
    /// least [`amx::MIN_CALL_ROWS`]; Q8: one scale per 32 values) Intel AMX's int8 tile
    /// multiply (`tdpbsud`, 16x16 outputs of a 32-deep block per instruction).
    Amx,
    Avx2,
    Scalar,
}

fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var("HROMADA_KERNEL").as_deref() == Ok("scalar") {
                return Isa::Scalar;
            }
            let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
            let avx512 = std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni");
            let choice = std::env::var("HROMADA_KERNEL");
            if avx2 && avx512 && choice.as_deref() != Ok("avx2") {
                if choice.as_deref() != Ok("vnni") && amx::available() {
                    return Isa::Amx;
                }
                return Isa::Vnni;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    })
}

/// Q4_1 register tile, AVX-512 VNNI: `R` rows x 16 columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_vnni<const R: usize>(wq: &[u8], wd: &[f32], wm: &[f32], aq: &[i8], ad: &[f32], asum: &[f32], kb: usize, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::x86_64::*;
    let k = kb * QK;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let base = wq.as_ptr().add(b * 256);
        for l in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PF_BLOCKS * 256 + l * 64) as *const i8);
        }
        _mm_prefetch::<_MM_HINT_T0>(wd.as_ptr().wrapping_add((b + PF_BLOCKS) * NR) as *const i8);
        _mm_prefetch::<_MM_HINT_T0>(wm.as_ptr().wrapping_add((b + PF_BLOCKS) * NR) as *const i8);
        let mut w = [_mm512_setzero_si512(); 8];
        for j in 0..4 {
            let raw = _mm512_loadu_si512(base.add(j * 64) as *const _);
            w[j] = _mm512_and_si512(raw, low);
            w[j + 4] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
        }
        let d = _mm512_loadu_ps(wd.as_ptr().add(b * NR));
        let m = _mm512_loadu_ps(wm.as_ptr().add(b * NR));
        for (i, acc) in acc.iter_mut().enumerate() {
            let ap = aq.as_ptr().add(i * k + b * QK) as *const i32;
            // Two chains of four (integer sums: the split changes nothing).
            let mut s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(ap.read_unaligned()));
            let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(ap.add(1).read_unaligned()));
            for g in (2..8).step_by(2) {
                s0 = _mm512_dpbusd_epi32(s0, w[g], _mm512_set1_epi32(ap.add(g).read_unaligned()));
                s1 = _mm512_dpbusd_epi32(s1, w[g + 1], _mm512_set1_epi32(ap.add(g + 1).read_unaligned()));
            }
            let s = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            *acc = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(*ad.get_unchecked(i * kb + b))), *acc);
            *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*asum.get_unchecked(i * kb + b)), *acc);
        }
    }
    let mask: __mmask16 = if cols >= NR { 0xFFFF } else { (1u16 << cols) - 1 };
    for (i, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(i * ldo), mask, *acc);
    }
}

/// Q8 register tile, AVX-512 VNNI. `HALVES`: a scale per 16 values (else per 32).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_vnni<const HALVES: bool, const R: usize>(wq: &[u8], wd: &[f32], sums: &[i32], aq: &[i8], ad: &[f32], kb: usize, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::x86_64::*;
    let k = kb * QK;
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..kb {
        let base = wq.as_ptr().add(b * 512);
        // Weights stream from memory once per panel: ask for PF_BLOCKS blocks ahead (past
        // the panel's end this reads the next panel, which the same task takes next).
        for l in 0..8 {
            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(PF_BLOCKS * 512 + l * 64) as *const i8);
        }
        _mm_prefetch::<_MM_HINT_T0>(wd.as_ptr().wrapping_add((b + PF_BLOCKS) * NR * if HALVES { 2 } else { 1 }) as *const i8);
        let mut w = [_mm512_setzero_si512(); 8];
        for (g, w) in w.iter_mut().enumerate() {
            *w = _mm512_loadu_si512(base.add(g * 64) as *const _);
        }
        let (d0, d1) = if HALVES {
            (_mm512_loadu_ps(wd.as_ptr().add(b * 2 * NR)), _mm512_loadu_ps(wd.as_ptr().add((b * 2 + 1) * NR)))
        } else {
            let d = _mm512_loadu_ps(wd.as_ptr().add(b * NR));
            (d, d)
        };
        for (i, acc) in acc.iter_mut().enumerate() {
            let ap = aq.as_ptr().add(i * k + b * QK) as *const i32;
            let a = |g: usize| _mm512_set1_epi32(ap.add(g).read_unaligned());
            // Σ(w+128)·a − 128·Σa, exactly: the integer sums start at the correction.
            let c = sums.as_ptr().add((i * kb + b) * 3);
            let da = _mm512_set1_ps(*ad.get_unchecked(i * kb + b));
            if HALVES {
                let mut h = [_mm512_setzero_si512(); 2];
                for (hh, h) in h.iter_mut().enumerate() {
                    let mut s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(*c.add(hh)), w[4 * hh], a(4 * hh));
                    let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[4 * hh + 1], a(4 * hh + 1));
                    s0 = _mm512_dpbusd_epi32(s0, w[4 * hh + 2], a(4 * hh + 2));
                    s1 = _mm512_dpbusd_epi32(s1, w[4 * hh + 3], a(4 * hh + 3));
                    *h = _mm512_add_epi32(s0, s1);
                }
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h[0]), _mm512_mul_ps(d0, da), *acc);
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h[1]), _mm512_mul_ps(d1, da), *acc);
            } else {
                let mut s0 = _mm512_dpbusd_epi32(_mm512_set1_epi32(*c.add(2)), w[0], a(0));
                let mut s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], a(1));
                for g in (2..8).step_by(2) {
                    s0 = _mm512_dpbusd_epi32(s0, w[g], a(g));
                    s1 = _mm512_dpbusd_epi32(s1, w[g + 1], a(g + 1));
                }
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(d0, da), *acc);
            }
        }
    }
    let mask: __mmask16 = if cols >= NR { 0xFFFF } else { (1u16 << cols) - 1 };
    for (i, acc) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(i * ldo), mask, *acc);
    }
}

/// Stores 16 lanes held as two 8-lane halves into the first `cols` columns.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn store16_avx2(out: *mut f32, lo: std::arch::x86_64::__m256, hi: std::arch::x86_64::__m256, cols: usize) {
    use std::arch::x86_64::*;
    if cols >= NR {
        _mm256_storeu_ps(out, lo);
        _mm256_storeu_ps(out.add(8), hi);
    } else {
        let mut tmp = [0f32; NR];
        _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
        _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
        std::ptr::copy_nonoverlapping(tmp.as_ptr(), out, cols);
    }
}

/// Q4_1 tile with AVX2. AVX2 has 16 vector registers, so the tile's rows run in groups
/// of [`AVX2_GROUP`] over the whole panel (its weights stay in L1 between groups) instead
/// of one pass that keeps 16 rows' sums in spilled registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_avx2<const R: usize>(wq: &[u8], wd: &[f32], wm: &[f32], aq: &[i8], ad: &[f32], asum: &[f32], kb: usize, out: *mut f32, ldo: usize, cols: usize) {
    let k = kb * QK;
    let mut r = 0;
    while r < R {
        let g = (R - r).min(AVX2_GROUP);
        let (aq, ad, asum, out) = (&aq[r * k..], &ad[r * kb..], &asum[r * kb..], out.add(r * ldo));
        match g {
            1 => q4_avx2_rows::<1>(wq, wd, wm, aq, ad, asum, kb, out, ldo, cols),
            2 => q4_avx2_rows::<2>(wq, wd, wm, aq, ad, asum, kb, out, ldo, cols),
            3 => q4_avx2_rows::<3>(wq, wd, wm, aq, ad, asum, kb, out, ldo, cols),
            _ => q4_avx2_rows::<AVX2_GROUP>(wq, wd, wm, aq, ad, asum, kb, out, ldo, cols),
        }
        r += g;
    }
}

/// Rows the Q4_1 AVX2 kernel carries at once (see [`q4_avx2`]).
const AVX2_GROUP: usize = 4;

/// `G` rows of a Q4_1 tile with AVX2 (`maddubs`: 4-bit weights times i8). A product pair
/// is at most 2·15·128 = 3840 in magnitude, so a block's eight pairs per lane sum in i16
/// without saturating (30720 < 32768) and widen to i32 once per block: one `madd` where a
/// widening per pair took eight. The sums are the same integers as before, so the result
/// is bit for bit the same.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q4_avx2_rows<const G: usize>(wq: &[u8], wd: &[f32], wm: &[f32], aq: &[i8], ad: &[f32], asum: &[f32], kb: usize, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::x86_64::*;
    let k = kb * QK;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; G];
    for b in 0..kb {
        let base = wq.as_ptr().add(b * 256);
        let mut s = [[_mm256_setzero_si256(); 2]; G];
        for j in 0..4 {
            let r0 = _mm256_loadu_si256(base.add(j * 64) as *const __m256i);
            let r1 = _mm256_loadu_si256(base.add(j * 64 + 32) as *const __m256i);
            let (wl0, wh0) = (_mm256_and_si256(r0, low), _mm256_and_si256(_mm256_srli_epi16(r0, 4), low));
            let (wl1, wh1) = (_mm256_and_si256(r1, low), _mm256_and_si256(_mm256_srli_epi16(r1, 4), low));
            for (i, s) in s.iter_mut().enumerate() {
                let ap = aq.as_ptr().add(i * k + b * QK) as *const i32;
                let al = _mm256_set1_epi32(ap.add(j).read_unaligned());
                let ah = _mm256_set1_epi32(ap.add(4 + j).read_unaligned());
                s[0] = _mm256_add_epi16(s[0], _mm256_add_epi16(_mm256_maddubs_epi16(wl0, al), _mm256_maddubs_epi16(wh0, ah)));
                s[1] = _mm256_add_epi16(s[1], _mm256_add_epi16(_mm256_maddubs_epi16(wl1, al), _mm256_maddubs_epi16(wh1, ah)));
            }
        }
        for hh in 0..2 {
            let d = _mm256_loadu_ps(wd.as_ptr().add(b * NR + hh * 8));
            let m = _mm256_loadu_ps(wm.as_ptr().add(b * NR + hh * 8));
            for i in 0..G {
                let sf = _mm256_cvtepi32_ps(_mm256_madd_epi16(s[i][hh], ones));
                acc[i][hh] = _mm256_fmadd_ps(sf, _mm256_mul_ps(d, _mm256_set1_ps(*ad.get_unchecked(i * kb + b))), acc[i][hh]);
                acc[i][hh] = _mm256_fmadd_ps(m, _mm256_set1_ps(*asum.get_unchecked(i * kb + b)), acc[i][hh]);
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        store16_avx2(out.add(i * ldo), a[0], a[1], cols);
    }
}

/// Q8 tile with AVX2: the offset weights back to signed (`xor 0x80`), then `maddubs` on
/// |w| and sign(w)·a (no i16 saturation: 2·128·127 < 2^15).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn q8_avx2<const HALVES: bool, const R: usize>(wq: &[u8], wd: &[f32], sums: &[i32], aq: &[i8], ad: &[f32], kb: usize, out: *mut f32, ldo: usize, cols: usize) {
    use std::arch::x86_64::*;
    let _ = sums;
    let k = kb * QK;
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for b in 0..kb {
        let base = wq.as_ptr().add(b * 512);
        let mut s = [[[_mm256_setzero_si256(); 2]; 2]; R];
        for g in 0..8 {
            for hh in 0..2 {
                let w = _mm256_xor_si256(_mm256_loadu_si256(base.add(g * 64 + hh * 32) as *const __m256i), flip);
                let aw = _mm256_sign_epi8(w, w);
                for (i, s) in s.iter_mut().enumerate() {
                    let ap = aq.as_ptr().add(i * k + b * QK) as *const i32;
                    let a = _mm256_set1_epi32(ap.add(g).read_unaligned());
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(a, w)), ones);
                    s[g / 4][hh] = _mm256_add_epi32(s[g / 4][hh], p);
                }
            }
        }
        for hh in 0..2 {
            let (d0, d1) = if HALVES {
                (_mm256_loadu_ps(wd.as_ptr().add(b * 2 * NR + hh * 8)), _mm256_loadu_ps(wd.as_ptr().add((b * 2 + 1) * NR + hh * 8)))
            } else {
                let d = _mm256_loadu_ps(wd.as_ptr().add(b * NR + hh * 8));
                (d, d)
            };
            for i in 0..R {
                let da = _mm256_set1_ps(*ad.get_unchecked(i * kb + b));
                if HALVES {
                    acc[i][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i][0][hh]), _mm256_mul_ps(d0, da), acc[i][hh]);
                    acc[i][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[i][1][hh]), _mm256_mul_ps(d1, da), acc[i][hh]);
                } else {
                    let t = _mm256_add_epi32(s[i][0][hh], s[i][1][hh]);
                    acc[i][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(d0, da), acc[i][hh]);
                }
            }
        }
    }
    for (i, a) in acc.iter().enumerate() {
        store16_avx2(out.add(i * ldo), a[0], a[1], cols);
    }
}

/// Activations to Q8 blocks (one f32 scale per 32 values, round to nearest even), with
/// the scaled block sums (Q4_1's minimum term) and the integer half-block sums (the Q8
/// offset correction). Blocks are quantized in parallel chunks, eight floats per
/// instruction where AVX2 is there.
fn quantize_rows(x: &[f32], rows: usize, k: usize) -> Q8Rows {
    let nb = rows * (k / QK);
    let mut d = vec![0f32; nb];
    let mut s = vec![0f32; nb];
    let mut corr = vec![0i32; nb * 3];
    let mut q = vec![0i8; rows * k];
    const CH: usize = 64;
    let simd = isa() != Isa::Scalar;
    let chunk = |c: usize, qc: &mut [i8], dc: &mut [f32], sc: &mut [f32], hc: &mut [i32]| {
        for (i, ((db, sb), hb)) in dc.iter_mut().zip(sc.iter_mut()).zip(hc.chunks_exact_mut(3)).enumerate() {
            let b = c * CH + i;
            let xs = &x[b * QK..(b + 1) * QK];
            let qs = &mut qc[i * QK..(i + 1) * QK];
            #[cfg(target_arch = "x86_64")]
            let (scale, lo, hi) = if simd {
                // SAFETY: isa() checked AVX2 and FMA; xs and qs hold QK values.
                unsafe { quantize_block_avx2(xs, qs) }
            } else {
                quantize_block(xs, qs)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (scale, lo, hi) = {
                let _ = simd;
                quantize_block(xs, qs)
            };
            *db = scale;
            *sb = scale * (lo + hi) as f32;
            hb[0] = -128 * lo;
            hb[1] = -128 * hi;
            hb[2] = -128 * (lo + hi);
        }
    };
    if nb <= CH {
        // One chunk (decode: a row or two): no task to hand to the pool.
        chunk(0, &mut q, &mut d, &mut s, &mut corr);
    } else {
        q.par_chunks_mut(QK * CH)
            .zip(d.par_chunks_mut(CH))
            .zip(s.par_chunks_mut(CH))
            .zip(corr.par_chunks_mut(3 * CH))
            .enumerate()
            .for_each(|(c, (((qc, dc), sc), hc))| chunk(c, qc, dc, sc, hc));
    }
    Q8Rows { d, s, corr, q, tiled: Aligned::default() }
}

/// One block: `(scale, Σq of values 0..16, Σq of values 16..32)`.
fn quantize_block(xs: &[f32], q: &mut [i8]) -> (f32, i32, i32) {
    let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    let mut sums = [0i32; 2];
    for (i, (o, &v)) in q.iter_mut().zip(xs).enumerate() {
        let qi = (v * inv).round_ties_even() as i32;
        *o = qi as i8;
        sums[i / 16] += qi;
    }
    (scale, sums[0], sums[1])
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_block_avx2(xs: &[f32], q: &mut [i8]) -> (f32, i32, i32) {
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
    let hsum = |s: __m256i| {
        let s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
        let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
        _mm_cvtsi128_si32(s1)
    };
    let lo = hsum(_mm256_add_epi32(iv[0], iv[1]));
    let hi = hsum(_mm256_add_epi32(iv[2], iv[3]));
    // i32 -> i16 -> i8 packs work per 128-bit lane; one permute restores the order.
    let p16a = _mm256_packs_epi32(iv[0], iv[1]);
    let p16b = _mm256_packs_epi32(iv[2], iv[3]);
    let p8 = _mm256_packs_epi16(p16a, p16b);
    let out = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, out);
    (scale, lo, hi)
}

/// The SIMD kernels this CPU runs (AVX2, VNNI, AMX), up to the one `HROMADA_KERNEL` allows.
fn simd_kernels() -> Vec<Isa> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            v.push(Isa::Avx2);
        }
        if matches!(isa(), Isa::Vnni | Isa::Amx) {
            v.push(Isa::Vnni);
        }
        if isa() == Isa::Amx {
            v.push(Isa::Amx);
        }
    }
    v
}

/// One row of `hromada bench gemm`.
#[derive(Debug, Clone)]
pub struct GemmStat {
    pub kernel: String,
    pub format: &'static str,
    pub rows: usize,
    pub best_ms: f64,
    pub median_ms: f64,
    /// Multiply-adds per second at the best time, in G.
    pub gmacs: f64,
}

/// Times `x · Wᵀ` for a random `[n, k]` matrix (Q4_1 and Q8_0) at each row count, on every
/// kernel this CPU runs (the scalar one excluded), on the compute pool. The weights are
/// random bytes of the real format; only speed is measured.
pub fn bench(n: usize, k: usize, rows: &[usize], reps: usize) -> Vec<GemmStat> {
    let k = k.div_ceil(QK) * QK;
    let mut rng = crate::sampling::Rng::new(1);
    let blocks = n * k / QK;
    let mut q4 = vec![0u8; blocks * BLOCK_BYTES];
    let mut q8 = vec![0u8; blocks * 34];
    for (i, b) in q4.iter_mut().enumerate() {
        *b = if i % BLOCK_BYTES < 4 { [0x00, 0x20][i % 2] } else { rng.next_u64() as u8 };
    }
    for (i, b) in q8.iter_mut().enumerate() {
        *b = if i % 34 < 2 { [0x00, 0x20][i % 2] } else { rng.next_u64() as u8 };
    }
    let (Some(m4), Some(m8)) = (Q4_1Matrix::from_ggml_bytes(&q4, n, k), Q8_0Matrix::from_ggml_bytes(&q8, n, k)) else {
        return vec![];
    };
    let mut kernels = simd_kernels();
    if kernels.is_empty() {
        kernels.push(Isa::Scalar);
    }
    let mut out = Vec::new();
    for &r in rows {
        let x: Vec<f32> = (0..r * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        for (format, mat) in [("q4_1", QMat::Q4(&m4)), ("q8_0", QMat::Q8(&m8))] {
            // Calls too small for AMX take VNNI: an AMX row would time VNNI again.
            #[cfg(target_arch = "x86_64")]
            let no_amx = r < mat.amx_min_rows();
            #[cfg(not(target_arch = "x86_64"))]
            let no_amx = true;
            for &kern in kernels.iter().filter(|&&k| !(k == Isa::Amx && no_amx)) {
                let mut times: Vec<f64> = (0..reps.max(1) + 1)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        let y = crate::kernels::pool().install(|| matmul_one(mat, &x, r, kern));
                        std::hint::black_box(y);
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .skip(1)
                    .collect();
                times.sort_by(f64::total_cmp);
                out.push(GemmStat::new(format!("{kern:?}").to_lowercase(), format, r, n * k, &times));
            }
            // The prompt rows' bf16 tile path (`kernels::bf16`), where the CPU has it.
            if mat.bf16().is_some() {
                let prompt = vec![true; r];
                let mut times: Vec<f64> = (0..reps.max(1) + 1)
                    .map(|_| {
                        let t = std::time::Instant::now();
                        let y = crate::kernels::pool().install(|| matmul_many_rows(&x, r, &[mat], &prompt));
                        std::hint::black_box(y);
                        t.elapsed().as_secs_f64() * 1e3
                    })
                    .skip(1)
                    .collect();
                times.sort_by(f64::total_cmp);
                out.push(GemmStat::new("amx-bf16 (prompt rows)".into(), format, r, n * k, &times));
            }
        }
    }
    out
}

impl GemmStat {
    /// From sorted times (ms) of one `rows x nk` product.
    fn new(kernel: String, format: &'static str, rows: usize, nk: usize, times: &[f64]) -> Self {
        let best = times[0];
        Self { kernel, format, rows, best_ms: best, median_ms: times[times.len() / 2], gmacs: (rows * nk) as f64 / (best * 1e-3) / 1e9 }
    }
}

/// Intel AMX int8 tiles for the Q4_1 and Q8_0 GEMMs (Sapphire Rapids and later). One
/// `tdpbsud` multiplies a tile of up to 16 activation rows (a 32-value block, signed) by a
/// panel block as bytes (8 rows of 64: the same four-interleaved layout as the VNNI
/// operand; Q4_1 blocks are unpacked to it, Q8_0 blocks are stored in it), giving the
/// exact 16x16 integer block sums that the VNNI kernel computes with 128 `vpdpbusd`. The
/// sums go through the same float steps in the same order, so the result equals the VNNI
/// kernel's bit for bit. Linux hands a process the tiles' 8 KB of
/// state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); without it, or on a CPU
/// without AMX, the VNNI kernel runs.
/// Loads a tile configuration (palette bytes from `make`) unless this thread's loaded
/// one has the same `key`. Every AMX kernel goes through here, so one never runs on
/// another's configuration; loading costs more than a small tile's work, so a thread keeps
/// what it has.
#[cfg(target_arch = "x86_64")]
pub(crate) fn tile_config(key: usize, make: impl FnOnce() -> [u8; 64]) {
    #[repr(C, align(64))]
    struct Cfg([u8; 64]);
    thread_local! {
        /// The key of the configuration this thread loaded last (0: none).
        static LOADED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    LOADED.with(|l| {
        if l.get() != key {
            let cfg = Cfg(make());
            // SAFETY: only called by kernels that checked AMX and were granted the tile
            // state; `make` returns a palette-1 layout.
            unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            l.set(key);
        }
    });
}

/// Asks the OS for the AMX tile state for this process (Linux; elsewhere false).
pub(crate) fn request_tile_state() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        amx::request_tile_state()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{NR, QK};
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// Fewer rows than this go to the VNNI kernel: a tile's fixed costs (unpacking the
    /// panel to memory, loading tiles, storing the sums) are not repaid (`hromada bench
    /// gemm`: AMX behind at 4 and 8 rows, level at 12, ahead from 16).
    pub const MIN_ROWS: usize = 12;
    /// Q4_1 calls of fewer rows than this take the VNNI kernel: the AMX kernel unpacks
    /// each panel to bytes in memory once per call and its tiles reuse them, which pays
    /// when at least two tiles do. With one tile (a decode step of up to 16 sequences,
    /// whose weights stream from DRAM) VNNI, which unpacks in registers, was faster in
    /// the server (TPOT 21.2-21.7 ms against 22.3-23.2 at 16 concurrent). Q8_0 blocks
    /// need no unpacking and take AMX from [`MIN_ROWS`].
    pub const MIN_CALL_ROWS: usize = 2 * 16;

    /// Whether the CPU has AMX-TILE and AMX-INT8 and the OS granted this process the
    /// tile state (detected once).
    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            // CPUID leaf 7: EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
            #[allow(unused_unsafe)]
            let c = unsafe { __cpuid_count(7, 0) };
            if (c.edx >> 24) & 1 == 0 || (c.edx >> 25) & 1 == 0 {
                return false;
            }
            request_tile_state()
        })
    }

    #[cfg(target_os = "linux")]
    pub fn request_tile_state() -> bool {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; it changes only this process's
        // permitted XSAVE features.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    }

    #[cfg(not(target_os = "linux"))]
    pub fn request_tile_state() -> bool {
        false
    }

    #[repr(C, align(64))]
    struct TileCfg([u8; 64]);

    /// Palette 1; tmm0/tmm1: sums (`rows` x 16 i32); tmm2/tmm3: activations (`rows` x 32
    /// i8); tmm4/tmm5: weights (8 x 64 u8). Two of each, so one block's multiply runs
    /// while the previous block's sums are scaled.
    fn config(rows: usize) -> TileCfg {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut set = |t: usize, rows: usize, colsb: u16| {
            c[16 + 2 * t..18 + 2 * t].copy_from_slice(&colsb.to_le_bytes());
            c[48 + t] = rows as u8;
        };
        for t in 0..2 {
            set(t, rows, 64);
            set(2 + t, rows, QK as u16);
            set(4 + t, 8, 64);
        }
        TileCfg(c)
    }

    thread_local! {
        /// The panel this thread unpacked last (its packed bytes' address) and its bytes.
        static UNPACKED: std::cell::RefCell<(usize, super::Aligned<u8>)> = std::cell::RefCell::new((0, super::Aligned::default()));
    }

    /// Loads the tile configuration for `rows` unless this thread already has it.
    fn ensure_config(rows: usize) {
        super::tile_config(rows, || config(rows).0);
    }

    /// The activation rows regrouped into per-tile blocks (the `Q8Rows::tiled` layout),
    /// so that a tile load reads 512 contiguous bytes instead of 16 rows `k` apart.
    pub fn tile_rows(q: &[i8], rows: usize, k: usize, tile: usize) -> super::Aligned<i8> {
        let mut t = super::Aligned::filled(rows * k, 0i8);
        let mut r0 = 0;
        while r0 < rows {
            let rt = (rows - r0).min(tile);
            for b in 0..k / QK {
                for i in 0..rt {
                    let src = (r0 + i) * k + b * QK;
                    let dst = r0 * k + (b * rt + i) * QK;
                    t[dst..dst + QK].copy_from_slice(&q[src..src + QK]);
                }
            }
            r0 += rt;
        }
        t
    }

    /// A Q4_1 panel (`kb` blocks of 256 packed bytes) as `kb` blocks of 8 x 64 bytes.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn unpack(wq: &[u8], kb: usize, dst: &mut super::Aligned<u8>) {
        if dst.len() != kb * 512 {
            *dst = super::Aligned::filled(kb * 512, 0);
        }
        let low = _mm512_set1_epi8(0x0F);
        let d = dst.as_mut_ptr();
        for b in 0..kb {
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(wq.as_ptr().wrapping_add((b + super::PF_BLOCKS) * 256 + l * 64) as *const i8);
            }
            for j in 0..4 {
                let raw = _mm512_loadu_si512(wq.as_ptr().add(b * 256 + j * 64) as *const _);
                _mm512_storeu_si512(d.add(b * 512 + j * 64) as *mut _, _mm512_and_si512(raw, low));
                _mm512_storeu_si512(d.add(b * 512 + (j + 4) * 64) as *mut _, _mm512_and_si512(_mm512_srli_epi16(raw, 4), low));
            }
        }
    }

    /// Q4_1 tile of `rt` rows (MIN_ROWS..=16) x one panel: as `q4_vnni`, bit for bit.
    /// `first`: the panel's first row tile. The driver takes a panel's row tiles one
    /// after another on one thread, so the later tiles reuse the bytes unpacked for the
    /// first (a prefill's 512 rows unpack each panel once, not 32 times).
    ///
    /// SAFETY: AMX and AVX-512 VNNI are available and granted; `aq` is the tile's rows in
    /// the tiled layout (`rt x 32` per block), the other slices hold `rt` rows and `kb`
    /// blocks; `out` has `rt` rows of stride `ldo` with `cols` writable columns.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn q4(wq: &[u8], first: bool, wd: &[f32], wm: &[f32], aq: &[i8], ad: &[f32], asum: &[f32], kb: usize, rt: usize, out: *mut f32, ldo: usize, cols: usize) {
        ensure_config(rt);
        UNPACKED.with(|u| {
            let mut u = u.borrow_mut();
            let key = wq.as_ptr() as usize;
            if first || u.0 != key || u.1.len() != kb * 512 {
                unpack(wq, kb, &mut u.1);
                u.0 = key;
            }
            dispatch_rows!(rt, int8_tile::<false>, &u.1, wd, wm, &[], aq, ad, asum, kb, out, ldo, cols)
        })
    }

    /// Q8_0 tile (one scale per 32 values) of `rt` rows (MIN_ROWS..=16) x one panel: as
    /// `q8_vnni`, bit for bit. The packed panel block (eight groups of 64 bytes, values
    /// plus 128 as u8) is already the weight tile's layout, so nothing is unpacked and a
    /// single tile (a decode step's LM head) pays too.
    ///
    /// SAFETY: as [`q4`]; `corr` holds the rows' offset corrections (3 per block).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn q8(wq: &[u8], wd: &[f32], corr: &[i32], aq: &[i8], ad: &[f32], kb: usize, rt: usize, out: *mut f32, ldo: usize, cols: usize) {
        ensure_config(rt);
        dispatch_rows!(rt, int8_tile::<true>, wq, wd, &[], corr, aq, ad, &[], kb, out, ldo, cols)
    }

    #[repr(C, align(64))]
    struct Sums([[i32; NR]; 16]);

    /// Starts block `b`'s integer sums in tile `$c` from activations in `$a`, weights in `$w`.
    macro_rules! issue {
        ($c:literal, $a:literal, $w:literal, $aq:expr, $k:expr, $bw:expr) => {
            asm!(
                concat!("tilezero tmm", $c),
                concat!("tileloadd tmm", $a, ", [{a} + {sa}*1]"),
                concat!("tileloadd tmm", $w, ", [{w} + {sw}*1]"),
                concat!("tdpbsud tmm", $c, ", tmm", $a, ", tmm", $w),
                a = in(reg) $aq, sa = in(reg) $k, w = in(reg) $bw, sw = in(reg) 64usize,
                options(nostack, readonly)
            )
        };
    }

    /// Writes tile `$c`'s sums to `$dst` (16 rows of 64 bytes).
    macro_rules! store {
        ($c:literal, $dst:expr) => {
            asm!(concat!("tilestored [{d} + {s}*1], tmm", $c), d = in(reg) $dst, s = in(reg) 64usize, options(nostack))
        };
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn int8_tile<const Q8: bool, const R: usize>(bw: &[u8], wd: &[f32], wm: &[f32], corr: &[i32], aq: &[i8], ad: &[f32], asum: &[f32], kb: usize, out: *mut f32, ldo: usize, cols: usize) {
        let mut s0 = Sums([[0; NR]; 16]);
        let mut s1 = Sums([[0; NR]; 16]);
        let mut acc = [_mm512_setzero_ps(); R];
        let a = aq.as_ptr();
        let w = bw.as_ptr();
        // The float steps of q4_vnni (or, `Q8`, q8_vnni's uniform case) for block $b, from
        // its stored sums (a macro: a closure would not inherit this function's target
        // features).
        macro_rules! scale {
            ($b:expr, $sums:expr) => {{
                let b = $b;
                let d = _mm512_loadu_ps(wd.as_ptr().add(b * NR));
                if Q8 {
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // Σ(w+128)·a, then the exact offset correction −128·Σa.
                        let raw = _mm512_load_si512($sums.0[i].as_ptr() as *const _);
                        let s = _mm512_cvtepi32_ps(_mm512_add_epi32(raw, _mm512_set1_epi32(*corr.get_unchecked((i * kb + b) * 3 + 2))));
                        *acc = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(*ad.get_unchecked(i * kb + b))), *acc);
                    }
                } else {
                    let m = _mm512_loadu_ps(wm.as_ptr().add(b * NR));
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let s = _mm512_cvtepi32_ps(_mm512_load_si512($sums.0[i].as_ptr() as *const _));
                        *acc = _mm512_fmadd_ps(s, _mm512_mul_ps(d, _mm512_set1_ps(*ad.get_unchecked(i * kb + b))), *acc);
                        *acc = _mm512_fmadd_ps(m, _mm512_set1_ps(*asum.get_unchecked(i * kb + b)), *acc);
                    }
                }
            }};
        }
        // Packed Q8 panels stream from memory once per call (a decode step's LM head:
        // 28 MB), so they are asked for PF_BLOCKS blocks ahead, as the VNNI kernels do
        // (`hromada bench gemm --n 196608 --k 576 --rows 16`, 113 MB from memory: 8.65
        // -> 7.06 ms). Q4_1's unpacked panel is already in cache.
        macro_rules! prefetch {
            ($b:expr) => {
                if Q8 {
                    let next = w.wrapping_add(($b + super::PF_BLOCKS) * 512) as *const i8;
                    for l in 0..8 {
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(l * 64));
                    }
                    _mm_prefetch::<_MM_HINT_T0>(wd.as_ptr().wrapping_add(($b + super::PF_BLOCKS) * NR) as *const i8);
                }
            };
        }
        // A two-deep pipeline: while block b multiplies in one tile, block b - 1's sums
        // (stored an iteration ago, so the loads do not wait on the tile store) are
        // scaled. Even blocks use tiles 0/2/4 and buffer s0, odd ones 1/3/5 and s1.
        prefetch!(0);
        issue!("0", "2", "4", a, QK, w);
        if kb > 1 {
            issue!("1", "3", "5", a.add(R * QK), QK, w.add(512));
        }
        store!("0", s0.0.as_mut_ptr());
        let mut b = 1;
        while b < kb {
            prefetch!(b);
            if b + 1 < kb {
                issue!("0", "2", "4", a.add((b + 1) * R * QK), QK, w.add((b + 1) * 512));
            }
            store!("1", s1.0.as_mut_ptr());
            scale!(b - 1, s0);
            b += 1;
            if b == kb {
                break;
            }
            prefetch!(b);
            if b + 1 < kb {
                issue!("1", "3", "5", a.add((b + 1) * R * QK), QK, w.add((b + 1) * 512));
            }
            store!("0", s0.0.as_mut_ptr());
            scale!(b - 1, s1);
            b += 1;
        }
        if (kb - 1).is_multiple_of(2) {
            scale!(kb - 1, s0);
        } else {
            scale!(kb - 1, s1);
        }
        let mask: __mmask16 = if cols >= NR { 0xFFFF } else { (1u16 << cols) - 1 };
        for (i, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(i * ldo), mask, *acc);
        }
    }
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

    fn ggml_q8_0(w: &[f32], n: usize, k: usize) -> Vec<u8> {
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
        bytes
    }

    /// Every kernel this CPU can run, the scalar one included.
    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        v.extend(simd_kernels());
        v
    }

    #[test]
    fn largest_q4_1_block_sums_agree_on_every_kernel() {
        // Every weight nibble 15 (but each block's first, its minimum) against activations
        // at the 8-bit extreme: the AVX2 kernel's i16 block sums reach 8 · 2 · 15 · 127 =
        // 30480 in a lane, just under i16's limit, and must still match the other kernels.
        let (n, k, rows) = (16, 3 * QK, 6);
        let w: Vec<f32> = (0..n * k).map(|i| if i % QK == 0 { 0.0 } else { 1.0 }).collect();
        let x: Vec<f32> = (0..rows * k).map(|i| match i / k { 0 | 3 => -1.0, 1 => 1.0, _ => if i % 2 == 0 { 1.0 } else { -1.0 } }).collect();
        let q4 = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&w, n, k), n, k).unwrap();
        let wd = q4.dequantize();
        let y = q4.matmul_isa(&x, rows, Isa::Scalar);
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
                assert!((y[r * n + j] - exact).abs() < 0.05, "{r},{j}: {} vs {exact}", y[r * n + j]);
            }
        }
        assert!((y[0] + (k - k / QK) as f32).abs() < 0.5, "row 0 sums the ones: {}", y[0]);
        for isa in isas() {
            assert_eq!(q4.matmul_isa(&x, rows, isa), y, "{isa:?} differs");
        }
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
        assert!(!m.uniform);
        assert_eq!(m.dequantize(), want);
        let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let y = m.matmul(&x, rows);
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * want[j * k + i]).sum();
                assert!((y[r * n + j] - exact).abs() < 0.05, "{r},{j}: {} vs {exact}", y[r * n + j]);
            }
        }
        for isa in isas() {
            assert_eq!(m.matmul_isa(&x, rows, isa), y, "{isa:?} differs");
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
            let (d, lo, hi) = quantize_block(&x[b * QK..(b + 1) * QK], &mut q);
            assert_eq!(&a.q[b * QK..(b + 1) * QK], &q[..], "block {b}");
            assert_eq!(a.d[b], d);
            assert_eq!(a.s[b], d * (lo + hi) as f32);
            let (slo, shi) = (q[..16].iter().map(|&v| v as i32).sum::<i32>(), q[16..].iter().map(|&v| v as i32).sum::<i32>());
            assert_eq!(&a.corr[3 * b..3 * b + 3], &[-128 * slo, -128 * shi, -128 * (slo + shi)]);
        }
    }

    #[test]
    fn matmul_matches_dequantized_reference_on_every_kernel() {
        // n = 37: two full panels and a partial one; k = 320: ten blocks (an even count:
        // the AMX pipeline's two halves); 45 rows: five full register tiles of 8 and a
        // partial one, or two of 16 and a partial one of 13 (all AMX tiles, where the CPU
        // has AMX).
        let (n, k, rows) = (37, 320, 45);
        let mut rng = crate::sampling::Rng::new(3);
        let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32 * 3.0).collect();
        assert!(Q4_1Matrix::from_ggml_bytes(&[0u8; 7], 1, 32).is_none());
        let q4 = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&w, n, k), n, k).unwrap();
        let q8 = Q8_0Matrix::from_ggml_bytes(&ggml_q8_0(&w, n, k), n, k).unwrap();
        assert!(q8.uniform);
        type Mm<'a> = Box<dyn Fn(&[f32], usize, Isa) -> Vec<f32> + 'a>;
        let cases: [(&str, Vec<f32>, Mm); 2] = [
            ("q4_1", q4.dequantize(), Box::new(|x: &[f32], r: usize, i: Isa| q4.matmul_isa(x, r, i))),
            ("q8_0", q8.dequantize(), Box::new(|x: &[f32], r: usize, i: Isa| q8.matmul_isa(x, r, i))),
        ];
        for (name, wd, mm) in &cases {
            let y = mm(&x, rows, isa());
            let mut worst = 0f32;
            for r in 0..rows {
                for j in 0..n {
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
                    worst = worst.max((y[r * n + j] - exact).abs());
                }
            }
            // Only the 8-bit activation rounding separates the two.
            assert!(worst < 0.1, "{name}: max error {worst}");
            // Every kernel computes the same integer sums and the same fused float
            // steps, so they agree bit for bit.
            for isa in isas() {
                assert_eq!(&mm(&x, rows, isa), &y, "{name}: {isa:?} differs");
            }
            // Batch invariance: a row's result does not depend on the other rows, bit
            // for bit (seeded sampling in a continuously batched server relies on it).
            for r in 0..rows {
                let alone = mm(&x[r * k..(r + 1) * k], 1, isa());
                assert_eq!(&y[r * n..(r + 1) * n], &alone[..], "{name}: row {r} differs when batched");
            }
        }
    }

    /// Odd and even block counts (the AMX pipeline alternates two tiles), one block, and
    /// row counts around the tile heights and the AMX thresholds: every kernel agrees bit
    /// for bit, for Q4_1 and Q8_0.
    #[test]
    fn kernels_agree_across_block_and_row_counts() {
        let mut rng = crate::sampling::Rng::new(13);
        let n = 40;
        for k in [32, 96, 320] {
            let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
            let q4 = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&w, n, k), n, k).unwrap();
            let q8 = Q8_0Matrix::from_ggml_bytes(&ggml_q8_0(&w, n, k), n, k).unwrap();
            for rows in [1, 11, 12, 16, 17, 31, 32, 45] {
                let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32 * 2.0).collect();
                let (want4, want8) = (q4.matmul_isa(&x, rows, Isa::Scalar), q8.matmul_isa(&x, rows, Isa::Scalar));
                for isa in isas() {
                    assert_eq!(q4.matmul_isa(&x, rows, isa), want4, "q4_1, k {k}, rows {rows}: {isa:?} differs");
                    assert_eq!(q8.matmul_isa(&x, rows, isa), want8, "q8_0, k {k}, rows {rows}: {isa:?} differs");
                }
            }
        }
    }

    #[test]
    fn matmul_many_equals_separate_matmuls() {
        let (k, rows) = (96, 11);
        let mut rng = crate::sampling::Rng::new(8);
        let mut mk = |n: usize| -> Vec<f32> { (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect() };
        let (wa, wb, wc, wo) = (mk(48), mk(16), mk(21), mk(16));
        let a = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&wa, 48, k), 48, k).unwrap();
        let b = Q8_0Matrix::from_ggml_bytes(&ggml_q8_0(&wb, 16, k), 16, k).unwrap();
        let c = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&wc, 21, k), 21, k).unwrap();
        let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let outs = matmul_many(&x, rows, &[QMat::Q4(&a), QMat::Q8(&b), QMat::Q4(&c)]).unwrap();
        assert_eq!(outs[0], a.matmul(&x, rows));
        assert_eq!(outs[1], b.matmul(&x, rows));
        assert_eq!(outs[2], c.matmul(&x, rows));
        let other = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&wo[..16 * 64], 16, 64), 16, 64).unwrap();
        assert!(matmul_many(&x, rows, &[QMat::Q4(&a), QMat::Q4(&other)]).is_none(), "different widths");
    }

    /// Rows of two kinds in one call: each prompt row equals that row through the bf16
    /// path alone (where the CPU has it; else the integer kernels), each generated row
    /// equals it through the integer kernels alone, bit for bit, and a matrix whose
    /// shape the tiles cannot take (21 columns) keeps the integer kernels for every row.
    #[test]
    fn rows_take_their_kinds_arithmetic_whatever_the_batch() {
        let (k, rows) = (96, 23);
        let mut rng = crate::sampling::Rng::new(9);
        let mut mk = |n: usize| -> Vec<f32> { (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect() };
        let (wa, wb, wc) = (mk(48), mk(32), mk(21));
        let a = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&wa, 48, k), 48, k).unwrap();
        let b = Q8_0Matrix::from_ggml_bytes(&ggml_q8_0(&wb, 32, k), 32, k).unwrap();
        let c = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&wc, 21, k), 21, k).unwrap();
        let mats = [QMat::Q4(&a), QMat::Q8(&b), QMat::Q4(&c)];
        let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        // Generated rows first, then two prompt chunks around a recomputed generated run.
        let kinds: Vec<bool> = (0..rows).map(|r| (4..12).contains(&r) || r >= 15).collect();
        let mixed = matmul_many_rows(&x, rows, &mats, &kinds).unwrap();
        let bf16 = super::super::bf16::enabled();
        for (i, m) in mats.iter().enumerate() {
            let n = m.n();
            let tiles = bf16 && n % 16 == 0;
            for r in 0..rows {
                let xr = &x[r * k..(r + 1) * k];
                let alone = if kinds[r] { matmul_many_rows(xr, 1, &[*m], &[true]).unwrap().remove(0) } else { matmul_many(xr, 1, &[*m]).unwrap().remove(0) };
                assert_eq!(&mixed[i][r * n..(r + 1) * n], &alone[..], "matrix {i} row {r} (prompt: {})", kinds[r]);
                let int = matmul_many(xr, 1, &[*m]).unwrap().remove(0);
                if kinds[r] && tiles {
                    // The bf16 result is another rounding of the same product.
                    let close = alone.iter().zip(&int).all(|(p, q)| (p - q).abs() <= 0.05 * (1.0 + q.abs()));
                    assert!(close, "matrix {i} row {r}: bf16 and integer results far apart");
                } else {
                    assert_eq!(alone, int, "matrix {i} row {r}: the integer kernels");
                }
            }
        }
        if !bf16 {
            eprintln!("no AMX-BF16 here: every row took the integer kernels");
        }
    }

    /// The gated activation in one pass equals the two products followed by the
    /// elementwise pass, bit for bit, for rows of both kinds in one call (the prompt rows
    /// through the tile kernel's epilogue where the CPU has AMX-BF16), both activations,
    /// an odd panel count, and a shape the tiles cannot take.
    #[test]
    fn fused_gated_activation_equals_products_then_activation() {
        use crate::kernels::ops::{glu_slices, Glu};
        let mut rng = crate::sampling::Rng::new(17);
        for (n, k, rows) in [(48usize, 96usize, 23usize), (64, 64, 40), (21, 64, 5)] {
            let mut mk = || -> Vec<f32> { (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect() };
            let (wg, wu) = (mk(), mk());
            let g = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&wg, n, k), n, k).unwrap();
            let u = Q8_0Matrix::from_ggml_bytes(&ggml_q8_0(&wu, n, k), n, k).unwrap();
            let x: Vec<f32> = (0..rows * k).map(|_| (rng.next_f64() - 0.5) as f32 * 4.0).collect();
            let kinds: Vec<bool> = (0..rows).map(|r| r % 7 != 3).collect();
            for act in [Glu::Silu, Glu::Gelu] {
                for prompt in [&kinds[..], &[]] {
                    let [pg, pu]: [Vec<f32>; 2] = matmul_many_rows(&x, rows, &[QMat::Q4(&g), QMat::Q8(&u)], prompt).unwrap().try_into().unwrap();
                    let want = glu_slices(&pg, &pu, act);
                    let got = crate::kernels::pool().install(|| matmul_glu_rows(&x, rows, QMat::Q4(&g), QMat::Q8(&u), prompt, act)).unwrap();
                    assert_eq!(got.len(), rows * n);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got), bits(&want), "n {n} k {k} {act:?} prompt rows: {}", prompt.len());
                    assert!(got.iter().all(|v| v.is_finite()));
                }
            }
        }
        let other = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&[0.0; 32 * 64], 32, 64), 32, 64).unwrap();
        let narrow = Q4_1Matrix::from_ggml_bytes(&ggml_q4_1(&[0.0; 16 * 64], 16, 64), 16, 64).unwrap();
        assert!(matmul_glu_rows(&[0.0; 64], 1, QMat::Q4(&other), QMat::Q4(&narrow), &[true], Glu::Silu).is_none(), "widths differ");
    }

    #[test]
    fn q4_1_repack_keeps_ggml_values() {
        let (n, k) = (18, 64);
        let mut rng = crate::sampling::Rng::new(21);
        let w: Vec<f32> = (0..n * k).map(|_| (rng.next_f64() - 0.5) as f32).collect();
        let bytes = ggml_q4_1(&w, n, k);
        let m = Q4_1Matrix::from_ggml_bytes(&bytes, n, k).unwrap();
        let deq = m.dequantize();
        for (bi, b) in bytes.chunks_exact(BLOCK_BYTES).enumerate() {
            let (d, mn) = (f16::from_le_bytes([b[0], b[1]]).to_f32(), f16::from_le_bytes([b[2], b[3]]).to_f32());
            for j in 0..16 {
                assert_eq!(deq[bi * QK + j], d * (b[4 + j] & 0x0F) as f32 + mn);
                assert_eq!(deq[bi * QK + j + 16], d * (b[4 + j] >> 4) as f32 + mn);
            }
        }
    }
}



