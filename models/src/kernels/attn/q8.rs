//! Attention over an 8-bit paged store with integer dot products: AVX-512 VNNI's
//! `vpdpbusd` (sixty-four u8·i8 products, summed in fours into sixteen i32 lanes) for
//! both the scores and the weighted sum of values, as llama.cpp's CPU path multiplies
//! its `q8_0` cache with an 8-bit query instead of widening every key to f32.
//!
//! Layout: the regions of the f32/f16 stores (per K/V head, per block, `head_dim ·
//! block_size` keys and as many values; module `attn`), arranged inside a block as the
//! instruction takes its operands, four bytes per 32-bit lane:
//! - keys `[head_dim/4][block_size][4]`, each stored plus 128 (the unsigned operand):
//!   dims `4r..4r+4` of 16 consecutive slots are one 64-byte vector;
//! - values `[block_size/4][head_dim][4]`: slots `4u..4u+4` of 16 consecutive dims are
//!   one vector.
//!
//! Each (slot, K/V head) row of keys and of values has its own f32 scale ([`Scales`]).
//! The arithmetic of one (token, query head), in every kernel here (AVX-512 and scalar)
//! and whatever else a call computes, so a token's result never depends on the batch:
//! 1. the query is rounded to i8 with one scale, `sq = max|q|/127` (as a key row is);
//! 2. `score_j = f32(Σ_i (k_ji + 128)·q_i − 128·Σ_i q_i) · (sq·scale) · sk_j`, the
//!    integer sum exact; then the soft cap, and `p_j = exp(score_j − max)` in f32;
//! 3. the weights `w_j = p_j·sv_j` of each 16-slot group of a block (its visible slots;
//!    a group with none, or all zero, is skipped) are rounded to u8 against the group's
//!    largest, `m`: `wq_j = trunc(w_j·(255/m) + 0.5)`, a step of `sw = m/255`;
//! 4. `acc_c = fma(sw, f32(Σ_j wq_j·v_jc), acc_c)` group by group (the integer sum
//!    exact), and `out_c = acc_c · (1/Σ_j p_j)`.
//!
//! The weights are rounded relative to each group's largest, so a group of small weights
//! (keys far from the query) keeps its precision: the error is at most half a step per
//! weight, a step being 1/255 of the group's largest.
use super::{quantize_q8, slot_of, softmax_scalar, PagedLayout, RowSpec, Scales};

/// Whether the vector kernels run here (AVX-512 F/BW and VNNI, detected once).
pub fn vectorized() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::super::has_avx512_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the vector kernels take this shape (else the scalar one runs).
fn vector_shape(layout: &PagedLayout) -> bool {
    vectorized() && layout.block_size.is_multiple_of(16) && layout.head_dim.is_multiple_of(32)
}

/// One token's attention for the query heads `qs` (`G · head_dim`, sharing K/V head `g`)
/// over positions `first..=last`. The caller has checked that the table's blocks and the
/// scales lie inside the stores and that the layout fits ([`PagedLayout::q8_fits`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn attend(qs: &[f32], keys: &[i8], values: &[i8], s: Scales, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) {
    let d = layout.head_dim;
    #[cfg(target_arch = "x86_64")]
    if vector_shape(layout) {
        let heads = qs.len() / d;
        for h0 in (0..heads).step_by(4) {
            let h1 = (h0 + 4).min(heads);
            let (q, o) = (&qs[h0 * d..h1 * d], &mut out[h0 * d..h1 * d]);
            // SAFETY: AVX-512 F/BW/VNNI were detected; the caller checked the blocks.
            unsafe {
                match h1 - h0 {
                    1 => tokens_vnni::<1, 1>(q, d, keys, values, s, layout, g, table, first, last, spec, scratch, o),
                    2 => tokens_vnni::<2, 1>(q, 2 * d, keys, values, s, layout, g, table, first, last, spec, scratch, o),
                    3 => tokens_vnni::<3, 1>(q, 3 * d, keys, values, s, layout, g, table, first, last, spec, scratch, o),
                    _ => tokens_vnni::<4, 1>(q, 4 * d, keys, values, s, layout, g, table, first, last, spec, scratch, o),
                }
            }
        }
        return;
    }
    for (q, o) in qs.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        attend_scalar(q, keys, values, s, layout, g, table, first, last, spec, scratch, o);
    }
}

/// `t` consecutive tokens of one sequence at once (`attn::attend_paged_tokens`, whose
/// checks the caller made): each key and value vector loaded once for every token's
/// heads. False where the vector kernels do not take the shape.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_tokens(qs: &[f32], stride: usize, t: usize, heads: usize, keys: &[i8], values: &[i8], s: Scales, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last0: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) -> bool {
    if !vector_shape(layout) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! go {
            ($($g:literal, $t:literal);*) => {
                match (heads, t) {
                    // SAFETY: AVX-512 F/BW/VNNI were detected; the caller checked the
                    // blocks, and that qs/out hold t rows of `heads · d` at `stride`.
                    $(($g, $t) => unsafe { tokens_vnni::<$g, $t>(qs, stride, keys, values, s, layout, g, table, first, last0, spec, scratch, out) },)*
                    _ => return false,
                }
            };
        }
        go!(1, 2; 1, 3; 1, 4; 1, 5; 1, 6; 1, 7; 1, 8; 2, 2; 2, 3; 2, 4; 2, 5; 2, 6; 3, 2; 3, 3; 3, 4; 4, 2; 4, 3);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (qs, stride, t, heads, keys, values, s, g, table, first, last0, spec, scratch, out);
        false
    }
}

/// The visible slots `lo..hi` of the 16-slot group holding position `j` (the group ends
/// at the block's end or 16 slots after its start, whichever is first).
pub(super) fn group_end(layout: &PagedLayout, j: usize) -> usize {
    let bs = layout.block_size;
    let block = j - j % bs;
    let start = block + (j % bs) / 16 * 16;
    (start + 16).min(block + bs)
}

/// One query head, scalar: the reference arithmetic (module docs), for any block size
/// and head dim that are multiples of 4.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_scalar(q: &[f32], keys: &[i8], values: &[i8], s: Scales, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last: usize, spec: RowSpec, scores: &mut Vec<f32>, out: &mut [f32]) {
    let d = layout.head_dim;
    let mut q8 = vec![0i8; d];
    let cth = quantize_q8(q, &mut q8) * spec.scale;
    let qsum: i32 = q8.iter().map(|&x| x as i32).sum();
    let inv = softmax_scalar(first, last, spec.softcap, scores, |j| {
        let slot = slot_of(layout, table, j);
        let dot: i32 = (0..d).map(|i| (keys[layout.q8_key_index(slot, g, i)] as u8) as i32 * q8[i] as i32).sum();
        (dot - 128 * qsum) as f32 * cth * s.k[layout.scale_index(slot, g)]
    });
    let mut acc = vec![0f32; d];
    let mut isum = vec![0i32; d];
    let mut lo = first;
    while lo <= last {
        let hi = group_end(layout, lo).min(last + 1);
        let w: Vec<f32> = (lo..hi).map(|j| scores[j - first] * s.v[layout.scale_index(slot_of(layout, table, j), g)]).collect();
        let m = w.iter().fold(0f32, |a, &b| a.max(b));
        if m > 0.0 {
            let winv = 255.0 / m;
            isum.fill(0);
            for (j, &wj) in (lo..hi).zip(&w) {
                let wq = ((wj * winv + 0.5) as i32).min(255);
                let slot = slot_of(layout, table, j);
                for (c, a) in isum.iter_mut().enumerate() {
                    *a += wq * values[layout.q8_value_index(slot, g, c)] as i32;
                }
            }
            let sw = m / 255.0;
            for (a, &i) in acc.iter_mut().zip(&isum) {
                *a = sw.mul_add(i as f32, *a);
            }
        }
        lo = hi;
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

/// `G` query heads of `T` consecutive tokens (token t's heads at `qs + t·stride`, its
/// output at `out + t·stride`, over positions `first..=last0 + t`), AVX-512 VNNI. Blocks
/// of 16·k slots, head dims of 32·k.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
unsafe fn tokens_vnni<const G: usize, const T: usize>(qs: &[f32], stride: usize, keys: &[i8], values: &[i8], s: Scales, layout: &PagedLayout, g: usize, table: &[u32], first: usize, last0: usize, spec: RowSpec, scratch: &mut Vec<f32>, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let (bs, d) = (layout.block_size, layout.head_dim);
    let last = last0 + T - 1;
    let (b0, b1) = (first / bs, last / bs);
    let base = b0 * bs;
    let len = (b1 - b0 + 1) * bs;
    let groups = len / 16;
    let rows = G * T;
    // Scratch: scores (rows · len f32), then the rounded weights (rows · len bytes), their
    // steps (rows · groups f32) and the rounded queries (rows · d bytes).
    let (o_w, o_sw) = (rows * len, rows * len + rows * len / 4);
    let o_q = o_sw + rows * groups;
    if scratch.len() < o_q + rows * d / 4 {
        scratch.resize(o_q + rows * d / 4, 0.0);
    }
    let sp = scratch.as_mut_ptr();
    let (wp, swp, qp) = (sp.add(o_w) as *mut u8, sp.add(o_sw), sp.add(o_q) as *mut i8);
    // Every visible block into L2 now (module `attn`'s `prefetch_paged`); the
    // one-block-ahead fetches below then bring each from L2 to L1.
    super::prefetch_paged(keys, values, Some(s), layout, g, table, first, last);
    // 1. The queries in 8 bits.
    let mut cth = [[0f32; G]; T];
    let mut qoff = [[_mm512_setzero_si512(); G]; T];
    for t in 0..T {
        for h in 0..G {
            let q8 = std::slice::from_raw_parts_mut(qp.add((t * G + h) * d), d);
            cth[t][h] = quantize_q8(&qs[t * stride + h * d..t * stride + (h + 1) * d], q8) * spec.scale;
            qoff[t][h] = _mm512_set1_epi32(128 * q8.iter().map(|&x| x as i32).sum::<i32>());
        }
    }
    // 2. Scores for every slot of the visible blocks, 16 slots per instruction.
    let kp = keys.as_ptr() as *const u8;
    for blk in b0..=b1 {
        let kb = kp.add(layout.key_block(table[blk] as usize, g));
        if blk < b1 {
            let next = kp.add(layout.key_block(table[blk + 1] as usize, g)) as *const i8;
            for off in (0..d * bs).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(next.add(off));
            }
        }
        for c in (0..bs).step_by(16) {
            let mut acc = [[[_mm512_setzero_si512(); 2]; G]; T];
            for r in (0..d / 4).step_by(2) {
                let k0 = _mm512_loadu_si512(kb.add(r * bs * 4 + c * 4) as *const _);
                let k1 = _mm512_loadu_si512(kb.add((r + 1) * bs * 4 + c * 4) as *const _);
                for (t, at) in acc.iter_mut().enumerate() {
                    for (h, a) in at.iter_mut().enumerate() {
                        let q4 = qp.add((t * G + h) * d + 4 * r) as *const i32;
                        a[0] = _mm512_dpbusd_epi32(a[0], k0, _mm512_set1_epi32(q4.read_unaligned()));
                        a[1] = _mm512_dpbusd_epi32(a[1], k1, _mm512_set1_epi32(q4.add(1).read_unaligned()));
                    }
                }
            }
            // The 16 slots' key scales, contiguous in the block.
            let sk = _mm512_loadu_ps(s.k.as_ptr().add(layout.scale_index(table[blk] as usize * bs + c, g)));
            for (t, at) in acc.iter().enumerate() {
                for (h, a) in at.iter().enumerate() {
                    let dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(a[0], a[1]), qoff[t][h]));
                    let sc = _mm512_mul_ps(_mm512_mul_ps(dot, _mm512_set1_ps(cth[t][h])), sk);
                    _mm512_storeu_ps(sp.add((t * G + h) * len + (blk - b0) * bs + c), sc);
                }
            }
        }
    }
    // 3. Softmax, and each 16-slot group's weights rounded to bytes against its largest.
    let mut inv = [[0f32; G]; T];
    for (t, it) in inv.iter_mut().enumerate() {
        let (lo, hi) = (first - base, last0 + t - base);
        for (h, v) in it.iter_mut().enumerate() {
            let r = t * G + h;
            *v = super::exp_normaliser512(std::slice::from_raw_parts_mut(sp.add(r * len), len), lo, hi, spec.softcap);
            for k in 0..groups {
                let step = swp.add(r * groups + k);
                let (a, b) = (16 * k, 16 * k + 15);
                *step = 0.0;
                if a > hi || b < lo {
                    continue;
                }
                let (from, to) = (lo.max(a) - a, hi.min(b) - a);
                let mask = (((1u32 << (to + 1)) - 1) & !((1u32 << from) - 1)) as __mmask16;
                let slot = table[b0 + a / bs] as usize * bs + a % bs;
                let sv = _mm512_loadu_ps(s.v.as_ptr().add(layout.scale_index(slot, g)));
                let w = _mm512_maskz_mul_ps(mask, _mm512_maskz_loadu_ps(mask, sp.add(r * len + a)), sv);
                let m = _mm512_reduce_max_ps(w);
                if m > 0.0 {
                    let scaled = _mm512_add_ps(_mm512_mul_ps(w, _mm512_set1_ps(255.0 / m)), _mm512_set1_ps(0.5));
                    let wq = _mm512_min_epi32(_mm512_cvttps_epi32(scaled), _mm512_set1_epi32(255));
                    _mm_storeu_si128(wp.add(r * len + a) as *mut __m128i, _mm512_cvtepi32_epi8(wq));
                    *step = m / 255.0;
                }
            }
        }
    }
    // 4. Σ_j wq_j · v_j, 32 dims per pass: each group's 16 value rows loaded once for
    // every token's heads, four slots per instruction.
    let vp = values.as_ptr() as *const u8;
    let op = out.as_mut_ptr();
    for c0 in (0..d).step_by(32) {
        let mut acc = [[[_mm512_setzero_ps(); 2]; G]; T];
        for blk in b0..=b1 {
            let vb = vp.add(layout.value_index(table[blk] as usize * bs, g));
            if c0 == 0 && blk < b1 {
                let next = vp.add(layout.value_index(table[blk + 1] as usize * bs, g)) as *const i8;
                for off in (0..d * bs).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(next.add(off));
                }
            }
            for c in (0..bs).step_by(16) {
                let k = ((blk - b0) * bs + c) / 16;
                let gp = vb.add(c * d + c0 * 4);
                let mut v = [[_mm512_setzero_si512(); 2]; 4];
                for (u, vu) in v.iter_mut().enumerate() {
                    vu[0] = _mm512_loadu_si512(gp.add(u * d * 4) as *const _);
                    vu[1] = _mm512_loadu_si512(gp.add(u * d * 4 + 64) as *const _);
                }
                for (t, at) in acc.iter_mut().enumerate() {
                    for (h, a) in at.iter_mut().enumerate() {
                        let r = t * G + h;
                        let step = *swp.add(r * groups + k);
                        if step == 0.0 {
                            continue;
                        }
                        let w4 = wp.add(r * len + 16 * k) as *const i32;
                        let (mut i0, mut i1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
                        for (u, vu) in v.iter().enumerate() {
                            let wb = _mm512_set1_epi32(w4.add(u).read_unaligned());
                            i0 = _mm512_dpbusd_epi32(i0, wb, vu[0]);
                            i1 = _mm512_dpbusd_epi32(i1, wb, vu[1]);
                        }
                        let sw = _mm512_set1_ps(step);
                        a[0] = _mm512_fmadd_ps(sw, _mm512_cvtepi32_ps(i0), a[0]);
                        a[1] = _mm512_fmadd_ps(sw, _mm512_cvtepi32_ps(i1), a[1]);
                    }
                }
            }
        }
        for (t, at) in acc.iter().enumerate() {
            for (h, a) in at.iter().enumerate() {
                let sc = _mm512_set1_ps(inv[t][h]);
                for (c, v) in a.iter().enumerate() {
                    _mm512_storeu_ps(op.add(t * stride + h * d + c0 + c * 16), _mm512_mul_ps(*v, sc));
                }
            }
        }
    }
}
