//! Attention of one token's query heads over its sequence's keys and values in a paged
//! store: the inner loop of the server's CPU attention.
//!
//! Layout (per layer): each K/V head has its own region, and in it a sequence's blocks
//! (consecutive when the block manager could keep them together) follow each other, so
//! one (token, K/V head) reads two sequential streams. Keys are stored *transposed
//! within a block*, `[kv_head][block][head_dim][block_size]`, so the keys of 16
//! consecutive slots for one dimension are contiguous; values are stored row-wise,
//! `[kv_head][block][slot][head_dim]`. Scores then
//! need no horizontal sums: for 16 keys at once, `s += q[i] · K[i][0..16]` over the head
//! dimension (one FMA per dimension per 16 keys, the query value broadcast), and each of
//! the group's query heads (the heads sharing a K/V head) reuses the loaded keys. The
//! weighted sum of values reads each value row once for all the group's heads, with the
//! output held in registers. Stores hold f32, f16 or i8 ([`KvElem`]); f16 is widened
//! with F16C as it is read, halving the memory a decode step streams. An 8-bit store (as
//! llama.cpp's `q8_0` cache type) halves it again: each (slot, K/V head) row of keys or
//! values is quantized with one f32 scale (`max|x| / 127`, [`Scales`]), and its blocks
//! are arranged for integer dot products with an 8-bit query instead (module [`q8`]).
//!
//! The arithmetic of a token depends only on its own query and keys, never on the rest
//! of the batch, so batched and one-at-a-time decoding give the same bits.
use half::f16;

pub mod q8;

#[cfg(target_arch = "x86_64")]
use super::simd::{exp256, hsum256};

/// Attention parameters of one row.
#[derive(Debug, Clone, Copy)]
pub struct RowSpec {
    pub head_dim: usize,
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// The shape of a paged K/V store (see the module docs for the layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedLayout {
    pub block_size: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    /// Blocks in the store (per layer).
    pub num_blocks: usize,
}

impl PagedLayout {
    /// Index of the first key of block `b`, K/V head `g` (`head_dim · block_size` keys,
    /// dimension-major).
    pub fn key_block(&self, b: usize, g: usize) -> usize {
        (g * self.num_blocks + b) * self.head_dim * self.block_size
    }
    /// Index of key `(slot, kv head, dim)`.
    pub fn key_index(&self, slot: usize, g: usize, i: usize) -> usize {
        let (b, t) = (slot / self.block_size, slot % self.block_size);
        self.key_block(b, g) + i * self.block_size + t
    }
    /// Index of the first value of `(slot, kv head)`; a head's rows follow each other.
    pub fn value_index(&self, slot: usize, g: usize) -> usize {
        (g * self.num_blocks * self.block_size + slot) * self.head_dim
    }
    /// Index of the scale of the key row, and of the value row, of `(slot, kv head)` in
    /// an 8-bit store (each head's slots in order, so a block's 16 are contiguous).
    pub fn scale_index(&self, slot: usize, g: usize) -> usize {
        g * self.num_blocks * self.block_size + slot
    }
    /// Index of key `(slot, kv head, dim)` in an 8-bit store: inside a block, dims in
    /// fours, `[head_dim/4][block_size][4]` (module [`q8`]; stored plus 128).
    pub fn q8_key_index(&self, slot: usize, g: usize, i: usize) -> usize {
        let (b, t) = (slot / self.block_size, slot % self.block_size);
        self.key_block(b, g) + (i / 4) * self.block_size * 4 + t * 4 + i % 4
    }
    /// Index of value `(slot, kv head, dim)` in an 8-bit store: inside a block, slots in
    /// fours, `[block_size/4][head_dim][4]` (module [`q8`]).
    pub fn q8_value_index(&self, slot: usize, g: usize, c: usize) -> usize {
        let (b, t) = (slot / self.block_size, slot % self.block_size);
        self.value_index(b * self.block_size, g) + (t / 4) * self.head_dim * 4 + c * 4 + t % 4
    }
    /// Whether an 8-bit store can take this shape: block size and head dim multiples of 4.
    pub fn q8_fits(&self) -> bool {
        self.block_size.is_multiple_of(4) && self.head_dim.is_multiple_of(4)
    }
    /// Scales per layer (keys or values) of an 8-bit store.
    pub fn scales_len(&self) -> usize {
        self.num_blocks * self.block_size * self.n_kv
    }
    /// Values per layer (the same for keys and values).
    pub fn len(&self) -> usize {
        self.num_blocks * self.block_size * self.n_kv * self.head_dim
    }
    /// Whether the store holds no block.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The element type of a K/V store.
pub trait KvElem: Copy + Send + Sync + Default + 'static {
    const IS_F16: bool;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `dst[i] = from_f32(src[i])`, vectorised where the type allows.
    fn convert_slice(src: &[f32], dst: &mut [Self]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = Self::from_f32(s);
        }
    }
}

impl KvElem for f32 {
    const IS_F16: bool = false;
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl KvElem for f16 {
    const IS_F16: bool = true;
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn convert_slice(src: &[f32], dst: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        dst.convert_from_f32_slice(src);
    }
}

impl KvElem for i8 {
    const IS_F16: bool = false;
    fn to_f32(self) -> f32 {
        self as f32
    }
    /// Rounded half away from zero and saturated; the store's writer ([`write_kv_q8`])
    /// scales first. (`f32::round` is a libm call on baseline x86-64, and a prefill
    /// writes millions of these.)
    fn from_f32(v: f32) -> Self {
        (v + 0.5f32.copysign(v)).clamp(-127.0, 127.0) as i8
    }
}

/// The scales of an 8-bit store, one per (slot, K/V head), keys and values each at
/// [`PagedLayout::scale_index`].
#[derive(Debug, Clone, Copy)]
pub struct Scales<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
}

/// `(scale, 1/scale)` for one row quantized to -127..=127 (zero rows: `(0, 0)`).
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let m = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    if m > 0.0 && m.is_finite() {
        (m / 127.0, 127.0 / m)
    } else {
        (0.0, 0.0)
    }
}

/// Writes one token's new keys and values (`[n_kv · head_dim]` each) into `slot` of an
/// 8-bit store: each K/V head's row rounded to i8 with its own scale, in the layout of
/// module [`q8`] (keys plus 128, four dims of a slot together; values four slots of a
/// dim together). The layout must fit ([`PagedLayout::q8_fits`]; nothing is written
/// otherwise).
#[allow(clippy::too_many_arguments)]
pub fn write_kv_q8(keys: &mut [i8], key_scales: &mut [f32], values: &mut [i8], value_scales: &mut [f32], layout: &PagedLayout, slot: usize, k: &[f32], v: &[f32]) {
    if !layout.q8_fits() {
        return;
    }
    let (d, bs) = (layout.head_dim, layout.block_size);
    // A row's bytes on the stack for the usual head dims (this runs per token and layer).
    let (mut stack, mut heap) = ([0i8; 256], Vec::new());
    let row: &mut [i8] = if d <= stack.len() {
        &mut stack[..d]
    } else {
        heap.resize(d, 0);
        &mut heap
    };
    for g in 0..layout.n_kv {
        key_scales[layout.scale_index(slot, g)] = quantize_q8(&k[g * d..(g + 1) * d], row);
        let k0 = layout.q8_key_index(slot, g, 0);
        for (r, quad) in row.chunks_exact(4).enumerate() {
            for (o, &x) in keys[k0 + r * bs * 4..k0 + r * bs * 4 + 4].iter_mut().zip(quad) {
                *o = (x as u8 ^ 0x80) as i8;
            }
        }
        value_scales[layout.scale_index(slot, g)] = quantize_q8(&v[g * d..(g + 1) * d], row);
        let v0 = layout.q8_value_index(slot, g, 0);
        for (c, &x) in row.iter().enumerate() {
            values[v0 + 4 * c] = x;
        }
    }
}

/// One row rounded to i8 with its scale (`q8_scale`, `i8::from_f32` of `x · 127/max`)
/// into `out`; returns the scale. Sixteen lanes at a time where AVX-512 runs, with the
/// same bits.
fn quantize_q8(x: &[f32], out: &mut [i8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if x.len().is_multiple_of(16) && out.len() >= x.len() && super::has_avx512() {
        // SAFETY: AVX-512F was detected; `out` holds x.len() values.
        return unsafe { quantize_q8_avx512(x, out) };
    }
    let (sc, inv) = q8_scale(x);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = i8::from_f32(v * inv);
    }
    sc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quantize_q8_avx512(x: &[f32], out: &mut [i8]) -> f32 {
    use std::arch::x86_64::*;
    let sign = _mm512_set1_epi32(i32::MIN);
    let abs = |v: __m512| _mm512_castsi512_ps(_mm512_andnot_si512(sign, _mm512_castps_si512(v)));
    // max |x|, NaNs skipped as `f32::max` skips them (vmaxps gives its second operand
    // when the first is NaN).
    let mut m = _mm512_setzero_ps();
    for c in x.chunks_exact(16) {
        m = _mm512_max_ps(abs(_mm512_loadu_ps(c.as_ptr())), m);
    }
    let m = _mm512_reduce_max_ps(m);
    let (sc, inv) = if m > 0.0 && m.is_finite() { (m / 127.0, 127.0 / m) } else { (0.0, 0.0) };
    let (inv, half) = (_mm512_set1_ps(inv), _mm512_castps_si512(_mm512_set1_ps(0.5)));
    let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
    for (i, c) in x.chunks_exact(16).enumerate() {
        let v = _mm512_mul_ps(_mm512_loadu_ps(c.as_ptr()), inv);
        // v + copysign(0.5, v), clamped (a NaN stays NaN: vminps/vmaxps give their second
        // operand), truncated toward zero (NaN gives 0x80000000, whose low byte is 0, as
        // `NaN as i8` is 0).
        let r = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(v), sign), half)));
        let r = _mm512_max_ps(lo, _mm512_min_ps(hi, r));
        _mm_storeu_si128(out.as_mut_ptr().add(i * 16) as *mut __m128i, _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(r)));
    }
    sc
}

/// Writes one token's new keys and values (`[n_kv · head_dim]` each) into `slot`.
pub fn write_kv<E: KvElem>(keys: &mut [E], values: &mut [E], layout: &PagedLayout, slot: usize, k: &[f32], v: &[f32]) {
    let d = layout.head_dim;
    let bs = layout.block_size;
    let row = layout.n_kv * d;
    // Values: one contiguous row per (slot, K/V head).
    for (g, vg) in v[..row].chunks(d).enumerate() {
        let v0 = layout.value_index(slot, g);
        E::convert_slice(vg, &mut values[v0..v0 + d]);
    }
    // Keys: converted once, then scattered into the transposed block layout.
    let mut kc = [E::default(); 1024];
    for (g, kg) in k[..row].chunks(d).enumerate() {
        let k0 = layout.key_index(slot, g, 0);
        for (c, chunk) in kg.chunks(kc.len()).enumerate() {
            let buf = &mut kc[..chunk.len()];
            E::convert_slice(chunk, buf);
            for (i, &x) in buf.iter().enumerate() {
                keys[k0 + (c * 1024 + i) * bs] = x;
            }
        }
    }
}

/// Asks the blocks that positions `first..=last` of K/V head `g` visit (keys, values and
/// an 8-bit store's scales) into L2. A paged sequence's blocks lie anywhere in the store,
/// so the hardware prefetcher cannot follow them and every block's first lines wait on
/// DRAM: on a 2-core AMD EPYC VM the 8-bit decode attention over scattered blocks took
/// twice as long as over contiguous ones. The kernels call it for their own blocks, and
/// a caller that knows what it attends next can call it earlier (a hint: it reads and
/// changes nothing, and stops at the first block outside the stores). Returns how many
/// blocks it asked for (0 where no prefetch instruction exists).
#[allow(clippy::too_many_arguments)]
pub fn prefetch_paged<E: KvElem>(keys: &[E], values: &[E], scales: Option<Scales>, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize) -> usize {
    #[allow(unused_mut)]
    let mut asked = 0;
    #[cfg(target_arch = "x86_64")]
    {
        let bs = layout.block_size;
        let n = layout.head_dim * bs;
        if bs == 0 || first > last || g >= layout.n_kv {
            return 0;
        }
        let Some(blocks) = table.get(first / bs..=last / bs) else { return 0 };
        // Every 64-byte line of `bytes` bytes from `p`.
        let fetch = |p: *const i8, bytes: usize| {
            for off in (0..bytes).step_by(64) {
                // SAFETY: a prefetch is a hint that never faults; the lines lie inside
                // the stores (checked below).
                #[allow(unused_unsafe)]
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(p.wrapping_add(off))
                };
            }
        };
        for &b in blocks {
            let b = b as usize;
            let (k0, v0) = (layout.key_block(b, g), layout.value_index(b * bs, g));
            if b >= layout.num_blocks || k0 + n > keys.len() || v0 + n > values.len() {
                break;
            }
            let size = std::mem::size_of::<E>();
            fetch(keys.as_ptr().wrapping_add(k0) as *const i8, n * size);
            fetch(values.as_ptr().wrapping_add(v0) as *const i8, n * size);
            if let Some(s) = scales {
                let i = layout.scale_index(b * bs, g);
                if i + bs <= s.k.len() && i + bs <= s.v.len() {
                    fetch(s.k.as_ptr().wrapping_add(i) as *const i8, bs * std::mem::size_of::<f32>());
                    fetch(s.v.as_ptr().wrapping_add(i) as *const i8, bs * std::mem::size_of::<f32>());
                }
            }
            asked += 1;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (keys, values, scales, layout, g, table, first, last);
    asked
}

/// One token's attention for the query heads `qs` (`G · head_dim`, consecutive heads
/// sharing K/V head `g`) over positions `first..=last` of the sequence whose blocks are
/// `table`: `out_h = softmax(scale · q_h·k_j) · v_j`. `scratch` is reused across calls;
/// `out` (`G · head_dim`) is overwritten. `scales`: those of an 8-bit store (required
/// for `E = i8`, ignored otherwise).
#[allow(clippy::too_many_arguments)]
pub fn attend_paged<E: KvElem>(qs: &[f32], keys: &[E], values: &[E], scales: Option<Scales>, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let scales = if is_i8::<E>() { scales } else { None };
    if is_i8::<E>() && scales.is_none() {
        out.fill(f32::NAN);
        return;
    }
    let d = layout.head_dim;
    debug_assert!(spec.head_dim == d && qs.len() % d == 0 && out.len() == qs.len());
    if first > last || last / layout.block_size >= table.len() {
        out.fill(0.0);
        return;
    }
    // The kernels read through raw pointers: every block they visit must lie inside the
    // stores (a table from elsewhere than the block manager gets NaN, never a wild read).
    let inside = keys.len() >= layout.len()
        && values.len() >= layout.len()
        && scales.is_none_or(|s| s.k.len() >= layout.scales_len() && s.v.len() >= layout.scales_len())
        && table[first / layout.block_size..=last / layout.block_size].iter().all(|&b| (b as usize) < layout.num_blocks);
    if !inside {
        out.fill(f32::NAN);
        return;
    }
    if let (Some((k8, v8)), Some(s)) = (as_i8(keys, values), scales) {
        if layout.q8_fits() {
            q8::attend(qs, k8, v8, s, layout, g, table, first, last, spec, scratch, out);
        } else {
            out.fill(f32::NAN);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let heads = qs.len() / d;
        if layout.block_size % 16 == 0 && d % 16 == 0 && super::has_avx512() {
            for h0 in (0..heads).step_by(4) {
                let h1 = (h0 + 4).min(heads);
                let (q, o) = (&qs[h0 * d..h1 * d], &mut out[h0 * d..h1 * d]);
                // SAFETY: AVX-512F and F16C were detected; the table's blocks lie inside
                // the stores (the block manager hands out ids below num_blocks).
                unsafe {
                    match h1 - h0 {
                        1 => paged_avx512::<E, 1>(q, keys, values, layout, g, table, first, last, spec, scratch, o),
                        2 => paged_avx512::<E, 2>(q, keys, values, layout, g, table, first, last, spec, scratch, o),
                        3 => paged_avx512::<E, 3>(q, keys, values, layout, g, table, first, last, spec, scratch, o),
                        _ => paged_avx512::<E, 4>(q, keys, values, layout, g, table, first, last, spec, scratch, o),
                    }
                }
            }
            return;
        }
        if layout.block_size % 8 == 0 && d % 8 == 0 && super::has_avx2() {
            for (q, o) in qs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
                // SAFETY: AVX2, FMA and F16C were detected; as above for the blocks.
                unsafe { paged_avx2(q, keys, values, layout, g, table, first, last, spec, scratch, o) };
            }
            return;
        }
    }
    for (q, o) in qs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        paged_scalar(q, keys, values, layout, g, table, first, last, spec, scratch, o);
    }
}

/// Whether `E` is i8: an 8-bit store (module [`q8`]), with its [`Scales`].
fn is_i8<E: KvElem>() -> bool {
    std::any::TypeId::of::<E>() == std::any::TypeId::of::<i8>()
}

/// The stores as bytes when `E` is i8.
fn as_i8<'a, E: KvElem>(keys: &'a [E], values: &'a [E]) -> Option<(&'a [i8], &'a [i8])> {
    if !is_i8::<E>() {
        return None;
    }
    // SAFETY: E is i8, so the slices are i8 slices of the same length.
    Some(unsafe { (std::slice::from_raw_parts(keys.as_ptr() as *const i8, keys.len()), std::slice::from_raw_parts(values.as_ptr() as *const i8, values.len())) })
}

/// How many consecutive tokens of one sequence [`attend_paged_tokens`] takes at once for
/// `heads` query heads per K/V head (1: it does not apply).
pub fn token_group(heads: usize) -> usize {
    match heads {
        1 => 8,
        2 => 6,
        3 => 4,
        4 => 3,
        _ => 1,
    }
}

/// The attention of `t` consecutive tokens of one sequence, at positions `last0 ..
/// last0 + t` (a prompt chunk), each over positions `first..=` its own, for the query
/// `heads` query heads sharing K/V head `g`: token i's `heads · head_dim` query values at
/// `qs[i · stride..]`,
/// its output at `out[i · stride..]`. Each loaded key and value row feeds every token's
/// heads, and each (token, head) takes exactly the steps of [`attend_paged`] alone, so
/// the bits are the same. False (nothing written) where it does not apply (no AVX-512,
/// a shape it does not take, `t` above [`token_group`]): then attend token by token.
#[allow(clippy::too_many_arguments)]
pub fn attend_paged_tokens<E: KvElem>(qs: &[f32], stride: usize, t: usize, heads: usize, keys: &[E], values: &[E], scales: Option<Scales>, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last0: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) -> bool {
    let scales = if is_i8::<E>() { scales } else { None };
    let d = layout.head_dim;
    if t < 2 || d == 0 {
        return false;
    }
    let last = last0 + t - 1;
    let fits = heads >= 1
        && t <= token_group(heads)
        && heads * d <= stride
        && qs.len() >= (t - 1) * stride + heads * d
        && out.len() >= (t - 1) * stride + heads * d
        && layout.block_size.is_multiple_of(16)
        && d.is_multiple_of(32)
        && spec.head_dim == d
        && first <= last0
        && last / layout.block_size < table.len()
        && keys.len() >= layout.len()
        && values.len() >= layout.len()
        && (!is_i8::<E>() || scales.is_some_and(|s| s.k.len() >= layout.scales_len() && s.v.len() >= layout.scales_len()))
        && table[first / layout.block_size..=last / layout.block_size].iter().all(|&b| (b as usize) < layout.num_blocks);
    if let Some((k8, v8)) = as_i8(keys, values) {
        return match scales {
            Some(s) if fits && layout.q8_fits() => q8::attend_tokens(qs, stride, t, heads, k8, v8, s, layout, g, table, first, last0, spec, scratch, out),
            _ => false,
        };
    }
    #[cfg(target_arch = "x86_64")]
    if fits && super::has_avx512() {
        macro_rules! go {
            ($($g:literal, $t:literal);*) => {
                match (heads, t) {
                    // SAFETY: AVX-512F and F16C were detected; the blocks lie inside the
                    // stores, and qs/out hold t rows of `heads · d` at `stride` (checked).
                    $(($g, $t) => unsafe { tokens_avx512::<E, $g, $t>(qs, stride, keys, values, layout, g, table, first, last0, spec, scratch, out) },)*
                    _ => return false,
                }
            };
        }
        go!(1, 2; 1, 3; 1, 4; 1, 5; 1, 6; 1, 7; 1, 8; 2, 2; 2, 3; 2, 4; 2, 5; 2, 6; 3, 2; 3, 3; 3, 4; 4, 2; 4, 3);
        return true;
    }
    let _ = (fits, keys, values, g, scratch);
    false
}

/// [`paged_avx512`] for `T` consecutive tokens of one sequence (`attend_paged_tokens`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tokens_avx512<E: KvElem, const G: usize, const T: usize>(qs: &[f32], stride: usize, keys: &[E], values: &[E], layout: &PagedLayout, g: usize, table: &[u32], first: usize, last0: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (bs, d) = (layout.block_size, layout.head_dim);
    let last = last0 + T - 1;
    let (b0, b1) = (first / bs, last / bs);
    let base = b0 * bs;
    let len = (b1 - b0 + 1) * bs;
    if scratch.len() < G * T * len {
        scratch.resize(G * T * len, 0.0);
    }
    scores512::<E, G, T>(qs.as_ptr(), stride, keys, layout, g, table, (b0, b1), spec, scratch.as_mut_ptr(), len);
    let mut inv = [[0f32; G]; T];
    for (t, it) in inv.iter_mut().enumerate() {
        for (h, v) in it.iter_mut().enumerate() {
            let r = (t * G + h) * len;
            *v = exp_normaliser512(&mut scratch[r..r + len], first - base, last0 + t - base, spec.softcap);
        }
    }
    // Σ_j p_j · v_j, 32 dims per pass: each value row read once for every token's heads;
    // token t stops at its own position.
    let (vp, sp) = (values.as_ptr(), scratch.as_ptr());
    let op = out.as_mut_ptr();
    let vbytes = 32 * std::mem::size_of::<E>();
    for c0 in (0..d).step_by(32) {
        let mut acc = [[[_mm512_setzero_ps(); 2]; G]; T];
        for blk in first / bs..=last / bs {
            let (j0, j1) = ((blk * bs).max(first), (blk * bs + bs - 1).min(last));
            let mut row = vp.add(layout.value_index(table[blk] as usize * bs + j0 % bs, g) + c0);
            if blk < last / bs {
                prefetch_values(vp, layout, table[blk + 1], g, c0, vbytes);
            }
            for j in j0..=j1 {
                let (v0, v1) = (load16(row), load16(row.add(16)));
                for (t, at) in acc.iter_mut().enumerate() {
                    if j <= last0 + t {
                        for (h, a) in at.iter_mut().enumerate() {
                            let p = _mm512_set1_ps(*sp.add((t * G + h) * len + j - base));
                            a[0] = _mm512_fmadd_ps(p, v0, a[0]);
                            a[1] = _mm512_fmadd_ps(p, v1, a[1]);
                        }
                    }
                }
                row = row.add(d);
            }
        }
        for (t, at) in acc.iter().enumerate() {
            for (h, a) in at.iter().enumerate() {
                let s = _mm512_set1_ps(inv[t][h]);
                for (c, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(op.add(t * stride + h * d + c0 + c * 16), _mm512_mul_ps(*v, s));
                }
            }
        }
    }
}

fn slot_of(layout: &PagedLayout, table: &[u32], j: usize) -> usize {
    table[j / layout.block_size] as usize * layout.block_size + j % layout.block_size
}

#[allow(clippy::too_many_arguments)]
fn paged_scalar<E: KvElem>(q: &[f32], keys: &[E], values: &[E], layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, spec: RowSpec, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = layout.head_dim;
    out.fill(0.0);
    let inv = softmax_scalar(first, last, spec.softcap, scores, |j| {
        let slot = slot_of(layout, table, j);
        (0..d).map(|i| q[i] * keys[layout.key_index(slot, g, i)].to_f32()).sum::<f32>() * spec.scale
    });
    for (j, &p) in (first..=last).zip(scores.iter()) {
        let slot = slot_of(layout, table, j);
        let vi = layout.value_index(slot, g);
        for (a, b) in out.iter_mut().zip(&values[vi..vi + d]) {
            *a += p * inv * b.to_f32();
        }
    }
}

/// `exp(s_j - max)` of the soft-capped scores `score(j)`, `j` in `first..=last`, into
/// `scores` (scalar); returns 1 / Σ.
fn softmax_scalar(first: usize, last: usize, cap: Option<f32>, scores: &mut Vec<f32>, score: impl Fn(usize) -> f32) -> f32 {
    scores.clear();
    let mut mx = f32::NEG_INFINITY;
    for j in first..=last {
        let s = softcap(score(j), cap);
        mx = mx.max(s);
        scores.push(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - mx).exp();
        sum += *s;
    }
    1.0 / sum
}

fn softcap(s: f32, cap: Option<f32>) -> f32 {
    match cap {
        Some(c) => (s / c).tanh() * c,
        None => s,
    }
}

/// Sixteen values of a store as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn load16<E: KvElem>(p: *const E) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    if E::IS_F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    } else {
        _mm512_loadu_ps(p as *const f32)
    }
}

/// Eight values of a store as f32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn load8<E: KvElem>(p: *const E) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    if E::IS_F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    } else {
        _mm256_loadu_ps(p as *const f32)
    }
}

/// The scores soft-capped in place (`cap·tanh(s/cap)`, where the model sets a cap), and
/// their maximum, eight lanes at a time (the scalar fold's NaN handling made it a serial
/// chain of several instructions per score, a tenth of a prompt's attention time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn capped_max(row: &mut [f32], cap: Option<f32>) -> f32 {
    if cap.is_some() {
        for v in row.iter_mut() {
            *v = softcap(*v, cap);
        }
    }
    super::simd::max_avx2(row)
}

/// softmax over `s[lo..=hi]` in place (exp(s - max), eight lanes at a time); returns
/// 1 / Σ. Entries outside the range are left as they are.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn exp_normaliser(s: &mut [f32], lo: usize, hi: usize, cap: Option<f32>) -> f32 {
    use std::arch::x86_64::*;
    let row = &mut s[lo..=hi];
    let mx = capped_max(row, cap);
    let n = row.len();
    let p = row.as_mut_ptr();
    let m = _mm256_set1_ps(mx);
    let mut sumv = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
        _mm256_storeu_ps(p.add(i), e);
        sumv = _mm256_add_ps(sumv, e);
        i += 8;
    }
    let mut sum = hsum256(sumv);
    if i < n {
        let mut lane = [f32::NEG_INFINITY; 8];
        lane[..n - i].copy_from_slice(&row[i..]);
        let e = exp256(_mm256_sub_ps(_mm256_loadu_ps(lane.as_ptr()), m));
        _mm256_storeu_ps(lane.as_mut_ptr(), e);
        row[i..].copy_from_slice(&lane[..n - i]);
        sum += lane[..n - i].iter().sum::<f32>();
    }
    1.0 / sum
}

/// [`exp_normaliser`] sixteen lanes at a time (the same exponential bits per score).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn exp_normaliser512(s: &mut [f32], lo: usize, hi: usize, cap: Option<f32>) -> f32 {
    use super::simd::exp512;
    use std::arch::x86_64::*;
    let row = &mut s[lo..=hi];
    let mx = capped_max(row, cap);
    let (n, p) = (row.len(), row.as_mut_ptr());
    let m = _mm512_set1_ps(mx);
    let mut sumv = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        // The last block masked: its missing lanes are neither read, written nor summed.
        let k: __mmask16 = if n - i >= 16 { 0xFFFF } else { (1u16 << (n - i)) - 1 };
        let e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p.add(i)), m));
        _mm512_mask_storeu_ps(p.add(i), k, e);
        sumv = _mm512_mask_add_ps(sumv, k, sumv, e);
        i += 16;
    }
    1.0 / _mm512_reduce_add_ps(sumv)
}

/// The scaled scores `q·k` of `T` tokens' `G` query heads (token t's at `qs + t·stride`)
/// for every slot of blocks `b0..=b1` of the table, into rows of `len` at `sp` (row
/// `t·G + h`): 16 slots per FMA, each loaded key feeding every query row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn scores512<E: KvElem, const G: usize, const T: usize>(qp: *const f32, stride: usize, keys: &[E], layout: &PagedLayout, g: usize, table: &[u32], (b0, b1): (usize, usize), spec: RowSpec, sp: *mut f32, len: usize) {
    use std::arch::x86_64::*;
    let (bs, d) = (layout.block_size, layout.head_dim);
    let kp = keys.as_ptr();
    let scale = _mm512_set1_ps(spec.scale);
    let kbytes = d * bs * std::mem::size_of::<E>();
    for blk in b0..=b1 {
        let kb = kp.add(layout.key_block(table[blk] as usize, g));
        // The next block's keys are elsewhere in memory: start fetching them now.
        if blk < b1 {
            let next = kp.add(layout.key_block(table[blk + 1] as usize, g)) as *const i8;
            for off in (0..kbytes).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.add(off));
            }
        }
        for c in (0..bs).step_by(16) {
            let mut acc = [[[_mm512_setzero_ps(); 2]; G]; T];
            let mut i = 0;
            while i + 2 <= d {
                let k0 = load16(kb.add(i * bs + c));
                let k1 = load16(kb.add((i + 1) * bs + c));
                for (t, at) in acc.iter_mut().enumerate() {
                    for (h, a) in at.iter_mut().enumerate() {
                        let q = qp.add(t * stride + h * d + i);
                        a[0] = _mm512_fmadd_ps(_mm512_set1_ps(*q), k0, a[0]);
                        a[1] = _mm512_fmadd_ps(_mm512_set1_ps(*q.add(1)), k1, a[1]);
                    }
                }
                i += 2;
            }
            for (t, at) in acc.iter().enumerate() {
                for (h, a) in at.iter().enumerate() {
                    _mm512_storeu_ps(sp.add((t * G + h) * len + (blk - b0) * bs + c), _mm512_mul_ps(_mm512_add_ps(a[0], a[1]), scale));
                }
            }
        }
    }
}

/// Starts fetching `vbytes` from dim `c0` of each value row of block `blk`, K/V head `g`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[inline]
unsafe fn prefetch_values<E: KvElem>(vp: *const E, layout: &PagedLayout, blk: u32, g: usize, c0: usize, vbytes: usize) {
    use std::arch::x86_64::*;
    let mut next = vp.add(layout.value_index(blk as usize * layout.block_size, g) + c0) as *const i8;
    for _ in 0..layout.block_size {
        for off in (0..vbytes).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(next.add(off));
        }
        next = next.add(layout.head_dim * std::mem::size_of::<E>());
    }
}

/// `G` query heads, AVX-512: scores 16 keys per FMA, values in register tiles of
/// `G x 4` vectors (64 dims per pass).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn paged_avx512<E: KvElem, const G: usize>(qs: &[f32], keys: &[E], values: &[E], layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let (bs, d) = (layout.block_size, layout.head_dim);
    let (b0, b1) = (first / bs, last / bs);
    let base = b0 * bs;
    let len = (b1 - b0 + 1) * bs;
    if scratch.len() < G * len {
        scratch.resize(G * len, 0.0);
    }
    // Scores for every slot of the visible blocks (slots outside first..=last are
    // computed and ignored).
    scores512::<E, G, 1>(qs.as_ptr(), 0, keys, layout, g, table, (b0, b1), spec, scratch.as_mut_ptr(), len);
    let (lo, hi) = (first - base, last - base);
    let mut inv = [0f32; G];
    for (h, v) in inv.iter_mut().enumerate() {
        *v = exp_normaliser512(&mut scratch[h * len..(h + 1) * len], lo, hi, spec.softcap);
    }
    // Σ_j p_hj · v_j, 64 dims per pass, each value row read once for the G heads.
    let mut c0 = 0;
    while c0 < d {
        let cn = ((d - c0) / 16).min(4);
        match cn {
            4 => vpass512::<E, G, 4>(values, layout, g, table, first, last, scratch, base, len, &inv, c0, out),
            3 => vpass512::<E, G, 3>(values, layout, g, table, first, last, scratch, base, len, &inv, c0, out),
            2 => vpass512::<E, G, 2>(values, layout, g, table, first, last, scratch, base, len, &inv, c0, out),
            _ => vpass512::<E, G, 1>(values, layout, g, table, first, last, scratch, base, len, &inv, c0, out),
        }
        c0 += cn * 16;
    }
}

/// One pass of the value sum over dims `c0..c0 + 16·CN` for `G` heads, in `G x CN`
/// register accumulators.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn vpass512<E: KvElem, const G: usize, const CN: usize>(values: &[E], layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, scores: &[f32], base: usize, len: usize, inv: &[f32; G], c0: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let d = layout.head_dim;
    let vp = values.as_ptr();
    let sp = scores.as_ptr();
    let mut acc = [[_mm512_setzero_ps(); CN]; G];
    let bs = layout.block_size;
    let step = d;
    let vbytes = CN * 16 * std::mem::size_of::<E>();
    for blk in first / bs..=last / bs {
        let (j0, j1) = ((blk * bs).max(first), (blk * bs + bs - 1).min(last));
        let mut row = vp.add(layout.value_index(table[blk] as usize * bs + j0 % bs, g) + c0);
        if blk < last / bs {
            prefetch_values(vp, layout, table[blk + 1], g, c0, vbytes);
        }
        for j in j0..=j1 {
            let mut vr = [_mm512_setzero_ps(); CN];
            for (c, v) in vr.iter_mut().enumerate() {
                *v = load16(row.add(c * 16));
            }
            for (h, a) in acc.iter_mut().enumerate() {
                let p = _mm512_set1_ps(*sp.add(h * len + j - base));
                for c in 0..CN {
                    a[c] = _mm512_fmadd_ps(p, vr[c], a[c]);
                }
            }
            row = row.add(step);
        }
    }
    let op = out.as_mut_ptr();
    for (h, a) in acc.iter().enumerate() {
        let s = _mm512_set1_ps(inv[h]);
        for (c, v) in a.iter().enumerate() {
            _mm512_storeu_ps(op.add(h * d + c0 + c * 16), _mm512_mul_ps(*v, s));
        }
    }
}

/// One query head, AVX2: scores 8 keys per FMA, values 32 dims per pass.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn paged_avx2<E: KvElem>(q: &[f32], keys: &[E], values: &[E], layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (bs, d) = (layout.block_size, layout.head_dim);
    let (b0, b1) = (first / bs, last / bs);
    let base = b0 * bs;
    let len = (b1 - b0 + 1) * bs;
    if scratch.len() < len {
        scratch.resize(len, 0.0);
    }
    let sp = scratch.as_mut_ptr();
    let kp = keys.as_ptr();
    let scale = _mm256_set1_ps(spec.scale);
    for blk in b0..=b1 {
        let kb = kp.add(layout.key_block(table[blk] as usize, g));
        for c in (0..bs).step_by(8) {
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 2 <= d {
                a0 = _mm256_fmadd_ps(_mm256_set1_ps(q[i]), load8(kb.add(i * bs + c)), a0);
                a1 = _mm256_fmadd_ps(_mm256_set1_ps(q[i + 1]), load8(kb.add((i + 1) * bs + c)), a1);
                i += 2;
            }
            _mm256_storeu_ps(sp.add((blk - b0) * bs + c), _mm256_mul_ps(_mm256_add_ps(a0, a1), scale));
        }
    }
    let inv = exp_normaliser(scratch, first - base, last - base, spec.softcap);
    let sp = scratch.as_ptr();
    let vp = values.as_ptr();
    let mut c0 = 0;
    while c0 < d {
        let cn = ((d - c0) / 8).min(4);
        let mut acc = [_mm256_setzero_ps(); 4];
        let step = d;
        for blk in first / bs..=last / bs {
            let (j0, j1) = ((blk * bs).max(first), (blk * bs + bs - 1).min(last));
            let mut row = vp.add(layout.value_index(table[blk] as usize * bs + j0 % bs, g) + c0);
            for j in j0..=j1 {
                let p = _mm256_set1_ps(*sp.add(j - base));
                for (c, a) in acc.iter_mut().enumerate().take(cn) {
                    *a = _mm256_fmadd_ps(p, load8(row.add(c * 8)), *a);
                }
                row = row.add(step);
            }
        }
        for (c, a) in acc.iter().enumerate().take(cn) {
            _mm256_storeu_ps(out.as_mut_ptr().add(c0 + c * 8), _mm256_mul_ps(*a, _mm256_set1_ps(inv)));
        }
        c0 += cn * 8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prefetch hint asks for exactly the blocks a range visits and stops at the first
    /// that lies outside the stores: tables pointing past the store, positions past the
    /// table, an unknown K/V head, an empty range, short stores and a zero block size
    /// return quietly.
    #[test]
    fn prefetching_asks_for_the_visited_blocks_and_stops_outside_the_store() {
        let layout = PagedLayout { block_size: 16, n_kv: 3, head_dim: 64, num_blocks: 4 };
        let keys = vec![0i8; layout.len()];
        let values = vec![0i8; layout.len()];
        let (sk, sv) = (vec![0.5f32; layout.scales_len()], vec![0.25f32; layout.scales_len()]);
        let scales = Some(Scales { k: &sk, v: &sv });
        let table = [3u32, 0, 2, 1];
        let x86 = cfg!(target_arch = "x86_64");
        let want = |n: usize| if x86 { n } else { 0 };
        for g in 0..layout.n_kv {
            assert_eq!(prefetch_paged(&keys, &values, scales, &layout, g, &table, 0, 63), want(4), "head {g}");
        }
        assert_eq!(prefetch_paged(&keys, &values, scales, &layout, 0, &table, 20, 40), want(2), "positions 20..=40: blocks 1 and 2");
        assert_eq!(prefetch_paged(&keys, &values, scales, &layout, 3, &table, 0, 63), 0, "no K/V head 3");
        assert_eq!(prefetch_paged(&keys, &values, scales, &layout, 0, &[2, 1000, u32::MAX], 0, 47), want(1), "stops at block 1000");
        assert_eq!(prefetch_paged(&keys, &values, scales, &layout, 0, &table, 0, 64 * 16), 0, "positions past the table");
        assert_eq!(prefetch_paged(&keys, &values, scales, &layout, 0, &table, 40, 3), 0, "empty range");
        assert_eq!(prefetch_paged(&keys[..100], &values, scales, &layout, 1, &table, 0, 63), 0, "keys shorter than the layout");
        assert_eq!(prefetch_paged(&keys, &values, None, &PagedLayout { block_size: 0, ..layout }, 0, &table, 0, 63), 0, "zero block size");
        // Short scales: the blocks still, their scales not.
        assert_eq!(prefetch_paged(&keys, &values, Some(Scales { k: &sk[..3], v: &sv }), &layout, 2, &table, 0, 63), want(4));
        let f = vec![f16::ONE; layout.len()];
        assert_eq!(prefetch_paged(&f, &f, None, &layout, 1, &table, 5, 60), want(4), "an f16 store");
    }

    /// float64 reference for one head.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], spec: RowSpec) -> Vec<f64> {
        let d = spec.head_dim;
        let sc: Vec<f64> = k
            .iter()
            .map(|kr| {
                let dot: f64 = (0..d).map(|i| q[i] as f64 * kr[i] as f64).sum::<f64>() * spec.scale as f64;
                match spec.softcap {
                    Some(c) => (dot / c as f64).tanh() * c as f64,
                    None => dot,
                }
            })
            .collect();
        let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
        (0..d).map(|i| v.iter().zip(&sc).map(|(vr, s)| (s - mx).exp() / z * vr[i] as f64).sum()).collect()
    }

    /// Writes one token into the stores (keys, values, key scales, value scales).
    type Writer<E> = fn(&mut [E], &mut [E], &mut [f32], &mut [f32], &PagedLayout, usize, &[f32], &[f32]);

    // (head_dim, n_kv, heads per group, block size, first, last, softcap)
    const CASES: [(usize, usize, usize, usize, usize, usize, Option<f32>); 8] = [
        (64, 3, 3, 16, 0, 0, None),
        (64, 3, 3, 16, 0, 36, None),
        (256, 1, 4, 16, 5, 199, None),
        (128, 2, 2, 32, 40, 48, Some(50.0)),
        (64, 1, 6, 16, 0, 20, None),
        (16, 2, 1, 16, 3, 3, None),
        (8, 1, 1, 8, 0, 30, None),
        (24, 1, 2, 4, 2, 9, None),
    ];

    /// Every kernel against a float64 reference computed from what the store holds
    /// (read back and checked against the written values: exactly `round(x)`), for
    /// several shapes.
    fn check<E: KvElem>(round: impl Fn(f32) -> f32) {
        let mut rng = crate::sampling::Rng::new(17);
        for &(d, n_kv, gh, bs, first, last, cap) in &CASES {
            let nblocks = last / bs + 3;
            let layout = PagedLayout { block_size: bs, n_kv, head_dim: d, num_blocks: nblocks };
            // Out-of-order physical blocks, as a block manager hands them out.
            let table: Vec<u32> = (0..=last / bs).map(|b| ((b * 7 + 2) % nblocks) as u32).collect();
            let total = layout.len();
            let mut keys = vec![E::from_f32(9.0); total];
            let mut values = vec![E::from_f32(-9.0); total];
            let mut kref = vec![vec![vec![0f32; d]; last + 1]; n_kv];
            let mut vref = kref.clone();
            for j in 0..=last {
                let k: Vec<f32> = (0..n_kv * d).map(|_| (rng.next_f64() - 0.5) as f32 * 4.0).collect();
                let v: Vec<f32> = (0..n_kv * d).map(|_| (rng.next_f64() - 0.5) as f32).collect();
                let slot = slot_of(&layout, &table, j);
                write_kv(&mut keys, &mut values, &layout, slot, &k, &v);
                for g in 0..n_kv {
                    kref[g][j] = (0..d).map(|i| keys[layout.key_index(slot, g, i)].to_f32()).collect();
                    vref[g][j] = (0..d).map(|i| values[layout.value_index(slot, g) + i].to_f32()).collect();
                    for i in 0..d {
                        assert!(kref[g][j][i] == round(k[g * d + i]) && vref[g][j][i] == round(v[g * d + i]), "stored row {j} head {g} dim {i}");
                    }
                }
            }
            let spec = RowSpec { head_dim: d, scale: 1.0 / (d as f32).sqrt(), softcap: cap };
            for g in 0..n_kv {
                let qs: Vec<f32> = (0..gh * d).map(|_| (rng.next_f64() - 0.5) as f32).collect();
                let mut scratch = Vec::new();
                let mut fast = vec![1f32; gh * d];
                attend_paged(&qs, &keys, &values, None, &layout, g, &table, first, last, spec, &mut scratch, &mut fast);
                for h in 0..gh {
                    let q = &qs[h * d..(h + 1) * d];
                    let mut slow = vec![2f32; d];
                    paged_scalar(q, &keys, &values, &layout, g, &table, first, last, spec, &mut scratch, &mut slow);
                    let want = reference(q, &kref[g][first..=last], &vref[g][first..=last], spec);
                    // The AVX2 kernel too, where this CPU would otherwise take AVX-512.
                    #[cfg(target_arch = "x86_64")]
                    if bs % 8 == 0 && d % 8 == 0 && crate::kernels::has_avx2() {
                        let mut o2 = vec![3f32; d];
                        // SAFETY: AVX2, FMA and F16C detected; the blocks are inside the stores.
                        unsafe { paged_avx2(q, &keys, &values, &layout, g, &table, first, last, spec, &mut scratch, &mut o2) };
                        for i in 0..d {
                            assert!((o2[i] as f64 - want[i]).abs() < 1e-5, "avx2 d={d} {first}..={last} dim {i}");
                        }
                    }
                    for i in 0..d {
                        assert!((fast[h * d + i] as f64 - want[i]).abs() < 1e-5, "d={d} bs={bs} {first}..={last} g={g} head {h} dim {i}: {} vs {}", fast[h * d + i], want[i]);
                        assert!((slow[i] as f64 - want[i]).abs() < 1e-5, "scalar d={d} {first}..={last} dim {i}");
                    }
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write_plain<E: KvElem>(k: &mut [E], v: &mut [E], _: &mut [f32], _: &mut [f32], l: &PagedLayout, slot: usize, kn: &[f32], vn: &[f32]) {
        write_kv(k, v, l, slot, kn, vn);
    }

    #[test]
    fn paged_attention_matches_f64_for_f32_and_f16_stores() {
        check::<f32>(|x| x);
        check::<f16>(|x| f16::from_f32(x).to_f32());
    }

    /// The 8-bit store (module `q8`): what it holds is each written row within half a
    /// quantization step, and the kernels (the vector ones where this CPU runs them, and
    /// the scalar one) agree with a float64 reference computed from what the store holds
    /// and from the query rounded as the kernels round it, within the rounding of the
    /// weights: half a step (1/255 of its 16-slot group's largest weight) per weight.
    #[test]
    fn eight_bit_attention_matches_f64_within_its_weight_rounding() {
        let mut rng = crate::sampling::Rng::new(23);
        let mut widest = 0f64;
        for &(d, n_kv, gh, bs, first, last, cap) in &CASES {
            let nblocks = last / bs + 3;
            let layout = PagedLayout { block_size: bs, n_kv, head_dim: d, num_blocks: nblocks };
            assert!(layout.q8_fits());
            let table: Vec<u32> = (0..=last / bs).map(|b| ((b * 7 + 2) % nblocks) as u32).collect();
            let (mut keys, mut values) = (vec![99i8; layout.len()], vec![-99i8; layout.len()]);
            let (mut ks, mut vs) = (vec![7f32; layout.scales_len()], vec![7f32; layout.scales_len()]);
            // Per K/V head and position: the stored row (dequantized), the value bytes and
            // the value row's scale.
            let mut kref = vec![vec![vec![0f64; d]; last + 1]; n_kv];
            let (mut vref, mut vbytes) = (kref.clone(), kref.clone());
            let mut vscale = vec![vec![0f64; last + 1]; n_kv];
            for j in 0..=last {
                let k: Vec<f32> = (0..n_kv * d).map(|_| (rng.next_f64() - 0.5) as f32 * 4.0).collect();
                let v: Vec<f32> = (0..n_kv * d).map(|_| (rng.next_f64() - 0.5) as f32).collect();
                let slot = slot_of(&layout, &table, j);
                write_kv_q8(&mut keys, &mut ks, &mut values, &mut vs, &layout, slot, &k, &v);
                for g in 0..n_kv {
                    let (kscale, vsc) = (ks[layout.scale_index(slot, g)], vs[layout.scale_index(slot, g)]);
                    for i in 0..d {
                        let kq = (keys[layout.q8_key_index(slot, g, i)] as u8) as i32 - 128;
                        let vq = values[layout.q8_value_index(slot, g, i)] as i32;
                        kref[g][j][i] = kq as f64 * kscale as f64;
                        vbytes[g][j][i] = vq as f64;
                        vref[g][j][i] = vq as f64 * vsc as f64;
                        assert!((kref[g][j][i] - k[g * d + i] as f64).abs() <= kscale as f64 * 0.5001, "key row {j} head {g} dim {i}");
                        assert!((vref[g][j][i] - v[g * d + i] as f64).abs() <= vsc as f64 * 0.5001, "value row {j} head {g} dim {i}");
                    }
                    vscale[g][j] = vsc as f64;
                }
            }
            let s = Scales { k: &ks, v: &vs };
            let spec = RowSpec { head_dim: d, scale: 1.0 / (d as f32).sqrt(), softcap: cap };
            for g in 0..n_kv {
                let qs: Vec<f32> = (0..gh * d).map(|_| (rng.next_f64() - 0.5) as f32).collect();
                let mut scratch = Vec::new();
                let mut fast = vec![1f32; gh * d];
                attend_paged(&qs, &keys, &values, Some(s), &layout, g, &table, first, last, spec, &mut scratch, &mut fast);
                for h in 0..gh {
                    let q = &qs[h * d..(h + 1) * d];
                    let mut slow = vec![2f32; d];
                    q8::attend_scalar(q, &keys, &values, s, &layout, g, &table, first, last, spec, &mut scratch, &mut slow);
                    // The reference: the query as the kernels round it, exact softmax.
                    let mut q8 = vec![0i8; d];
                    let sq = quantize_q8(q, &mut q8) as f64;
                    let sc: Vec<f64> = (first..=last)
                        .map(|j| {
                            let dot = (0..d).map(|i| q8[i] as f64 * sq * kref[g][j][i]).sum::<f64>() * spec.scale as f64;
                            cap.map_or(dot, |c| (dot / c as f64).tanh() * c as f64)
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let p: Vec<f64> = sc.iter().map(|x| (x - mx).exp()).collect();
                    let z: f64 = p.iter().sum();
                    // Half a step per weight, each 16-slot group's step its largest / 255.
                    let mut bound = vec![0f64; d];
                    let mut lo = first;
                    while lo <= last {
                        let hi = q8::group_end(&layout, lo).min(last + 1);
                        let step = (lo..hi).map(|j| p[j - first] * vscale[g][j]).fold(0f64, f64::max) / 255.0;
                        for j in lo..hi {
                            for (c, b) in bound.iter_mut().enumerate() {
                                *b += 0.5 * step * vbytes[g][j][c].abs() / z;
                            }
                        }
                        lo = hi;
                    }
                    for c in 0..d {
                        let want: f64 = (first..=last).map(|j| p[j - first] * vref[g][j][c]).sum::<f64>() / z;
                        let tol = bound[c] * 1.001 + 1e-5;
                        widest = widest.max(bound[c]);
                        assert!((fast[h * d + c] as f64 - want).abs() <= tol, "d={d} bs={bs} {first}..={last} g={g} head {h} dim {c}: {} vs {want} (bound {tol})", fast[h * d + c]);
                        assert!((slow[c] as f64 - want).abs() <= tol, "scalar d={d} bs={bs} {first}..={last} dim {c}: {} vs {want} (bound {tol})", slow[c]);
                    }
                }
            }
        }
        // The bound is a real constraint: the weights' rounding is small against the
        // values (|v| <= 0.5).
        assert!(widest > 0.0 && widest < 2e-3, "widest bound {widest}");
    }

    /// An 8-bit store without its scales is refused (NaN out), never read unscaled.
    /// A prompt chunk's tokens attended together give each token's bits alone, for
    /// every store type, 1 to 4 heads per K/V head, chunks that start and end inside
    /// blocks, a sliding start, and a group one token short.
    fn tokens_match_one_at_a_time<E: KvElem>(write: Writer<E>) {
        let mut rng = crate::sampling::Rng::new(5);
        let (d, n_kv, bs) = (64usize, 2usize, 16usize);
        let total_pos = 90;
        let nblocks = total_pos / bs + 3;
        let layout = PagedLayout { block_size: bs, n_kv, head_dim: d, num_blocks: nblocks };
        let table: Vec<u32> = (0..=total_pos / bs).map(|b| ((b * 5 + 1) % nblocks) as u32).collect();
        let mut keys = vec![E::default(); layout.len()];
        let mut values = vec![E::default(); layout.len()];
        let (mut ks, mut vs) = (vec![0f32; layout.scales_len()], vec![0f32; layout.scales_len()]);
        for j in 0..total_pos {
            let k: Vec<f32> = (0..n_kv * d).map(|_| (rng.next_f64() - 0.5) as f32 * 4.0).collect();
            let v: Vec<f32> = (0..n_kv * d).map(|_| (rng.next_f64() - 0.5) as f32).collect();
            write(&mut keys, &mut values, &mut ks, &mut vs, &layout, slot_of(&layout, &table, j), &k, &v);
        }
        let scales = Some(Scales { k: &ks, v: &vs });
        let spec = RowSpec { head_dim: d, scale: 0.125, softcap: None };
        let mut ran = false;
        for heads in 1..=4usize {
            let stride = heads * d + 32;
            let tg = token_group(heads);
            for (first, last0, t) in [(0usize, 0usize, tg), (0, 13, tg), (0, 30, tg.min(2)), (7, 40, tg - 1), (20, 80, tg)] {
                let qs: Vec<f32> = (0..t * stride).map(|_| (rng.next_f64() - 0.5) as f32).collect();
                let mut scratch = Vec::new();
                let mut got = vec![5f32; t * stride];
                let g = heads % n_kv;
                if !attend_paged_tokens(&qs, stride, t, heads, &keys, &values, scales, &layout, g, &table, first, last0, spec, &mut scratch, &mut got) {
                    continue;
                }
                ran = true;
                for i in 0..t {
                    let mut want = vec![6f32; heads * d];
                    attend_paged(&qs[i * stride..i * stride + heads * d], &keys, &values, scales, &layout, g, &table, first, last0 + i, spec, &mut scratch, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&got[i * stride..i * stride + heads * d]), bits(&want), "heads {heads} first {first} last0 {last0} t {t}: token {i}");
                    assert!(got[i * stride + heads * d..(i + 1) * stride].iter().all(|&v| v == 5.0), "padding untouched");
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(ran, crate::kernels::has_avx512(), "the grouped kernel runs wherever AVX-512 does");
        let _ = ran;
    }

    #[test]
    fn prompt_tokens_together_equal_tokens_alone() {
        tokens_match_one_at_a_time::<f32>(write_plain::<f32>);
        tokens_match_one_at_a_time::<f16>(write_plain::<f16>);
        tokens_match_one_at_a_time::<i8>(|k, v, ks, vs, l, slot, kn, vn| write_kv_q8(k, ks, v, vs, l, slot, kn, vn));
    }

    /// The vector row quantizer gives the scalar one's bits, ties, zeros, infinities and
    /// NaNs included.
    #[test]
    fn vector_quantizer_matches_the_scalar_one() {
        let mut rng = crate::sampling::Rng::new(3);
        let mut rows: Vec<Vec<f32>> = (0..50).map(|_| (0..64).map(|_| (rng.next_f64() - 0.5) as f32 * 8.0).collect()).collect();
        rows.push(vec![0.0; 64]);
        rows.push((0..64).map(|i| if i == 5 { f32::NAN } else { i as f32 - 30.0 }).collect());
        rows.push((0..64).map(|i| if i == 9 { f32::INFINITY } else { 1.0 }).collect());
        rows.push((0..64).map(|i| (i as f32 - 32.0) * 0.5).collect()); // exact halves after scaling
        rows.push((0..64).map(|i| if i == 0 { 127.0 } else { i as f32 - 31.5 }).collect());
        for (r, x) in rows.iter().enumerate() {
            let (sc, inv) = q8_scale(x);
            let want: Vec<i8> = x.iter().map(|&v| i8::from_f32(v * inv)).collect();
            let mut got = vec![1i8; 64];
            assert_eq!(quantize_q8(x, &mut got).to_bits(), sc.to_bits(), "row {r} scale");
            assert_eq!(got, want, "row {r}");
        }
    }

    #[test]
    fn eight_bit_store_needs_its_scales() {
        let layout = PagedLayout { block_size: 16, n_kv: 1, head_dim: 16, num_blocks: 1 };
        let (k, v) = (vec![1i8; layout.len()], vec![1i8; layout.len()]);
        let mut out = vec![0f32; 16];
        let spec = RowSpec { head_dim: 16, scale: 0.25, softcap: None };
        attend_paged(&[0.5f32; 16], &k, &v, None, &layout, 0, &[0], 0, 3, spec, &mut Vec::new(), &mut out);
        assert!(out.iter().all(|x| x.is_nan()));
    }

    /// A block id outside the store, or a store shorter than its layout, gives NaN
    /// instead of a read out of bounds.
    #[test]
    fn blocks_outside_the_store_are_refused() {
        let layout = PagedLayout { block_size: 16, n_kv: 1, head_dim: 16, num_blocks: 2 };
        let (k, v) = (vec![0.5f32; layout.len()], vec![0.5f32; layout.len()]);
        let spec = RowSpec { head_dim: 16, scale: 0.25, softcap: None };
        let mut out = vec![0f32; 16];
        attend_paged(&[0.5f32; 16], &k, &v, None, &layout, 0, &[1, 0], 0, 20, spec, &mut Vec::new(), &mut out);
        assert!(out.iter().all(|x| (x - 0.5).abs() < 1e-6), "{out:?}");
        attend_paged(&[0.5f32; 16], &k, &v, None, &layout, 0, &[1, 2], 0, 20, spec, &mut Vec::new(), &mut out);
        assert!(out.iter().all(|x| x.is_nan()));
        attend_paged(&[0.5f32; 16], &k[..100], &v, None, &layout, 0, &[0], 0, 3, spec, &mut Vec::new(), &mut out);
        assert!(out.iter().all(|x| x.is_nan()));
    }
}
