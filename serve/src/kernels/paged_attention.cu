// hromada serve: paged K/V on the GPU.
//
// hromada_write_kv_*: the new keys/values of a forward pass go to their cache slots
//   (slot = block * block_size + offset, from each sequence's block table; -1 skips).
// hromada_paged_attention_*: every token of a packed batch (prefill chunks and decode
//   tokens of many sequences) attends to the keys of its own sequence, positions
//   max(0, pos + 1 - window) ..= pos, read straight from the blocks. One thread block per
//   (token, head); each of its warps walks every WARPS-th key with an online softmax
//   (running max, running sum, running weighted V), and the warps are merged at the end.
//   Lanes split the head dimension (up to 32 * PER = 256). Grouped-query heads share a
//   K/V head: head / (h / n_kv). Scores optionally soft-capped.
//
// The cache is stored as f32 (`_f32`) or bf16 (`_bf16`, half the memory, rounded to
// nearest even); queries, new K/V and all arithmetic are f32.
// Compiled at run time with NVRTC (no headers), so nothing here needs the CUDA SDK to build.

#define WARPS 4
#define PER 8

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

struct StoreF32 {
    typedef float T;
    static __device__ __forceinline__ float load(const float* p, long long i) { return p[i]; }
    static __device__ __forceinline__ void store(float* p, long long i, float v) { p[i] = v; }
};

struct StoreBF16 {
    typedef unsigned short T;
    static __device__ __forceinline__ float load(const unsigned short* p, long long i) {
        return __uint_as_float(((unsigned int)p[i]) << 16);
    }
    static __device__ __forceinline__ void store(unsigned short* p, long long i, float v) {
        unsigned int u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            p[i] = (unsigned short)((u >> 16) | 0x40u);  // NaN stays NaN
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            p[i] = (unsigned short)(u >> 16);
        }
    }
};

template <class S>
__device__ void write_kv(const float* __restrict__ k_new, const float* __restrict__ v_new,
                         typename S::T* __restrict__ k_cache, typename S::T* __restrict__ v_cache,
                         const int* __restrict__ slots, int n, int row)
{
    int t = blockIdx.x;
    if (t >= n) return;
    long long s = slots[t];
    if (s < 0) return;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        S::store(k_cache, s * row + i, k_new[(long long)t * row + i]);
        S::store(v_cache, s * row + i, v_new[(long long)t * row + i]);
    }
}

template <class S>
__device__ void paged_attention(
    float* __restrict__ out, const float* __restrict__ q,
    const typename S::T* __restrict__ k_cache, const typename S::T* __restrict__ v_cache,
    const int* __restrict__ tok_seq, const int* __restrict__ tok_pos,
    const int* __restrict__ tables,
    int n, int h, int n_kv, int d, int block_size, int max_blocks,
    float scale, float softcap, int window)
{
    __shared__ float s_m[WARPS];
    __shared__ float s_l[WARPS];
    __shared__ float s_acc[WARPS][32 * PER];

    int idx = blockIdx.x;
    int t = idx / h, head = idx % h;
    if (t >= n) return;
    int g = head / (h / n_kv);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    int pos = tok_pos[t];
    const int* table = tables + (long long)tok_seq[t] * max_blocks;
    int first = window > 0 ? max(0, pos + 1 - window) : 0;
    long long row = (long long)n_kv * d;

    float qr[PER], acc[PER];
    const float* qh = q + ((long long)t * h + head) * d;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int c = lane + 32 * i;
        qr[i] = c < d ? qh[c] : 0.f;
        acc[i] = 0.f;
    }
    float m = neg_inf(), l = 0.f;
    for (int j = first + warp; j <= pos; j += WARPS) {
        long long base = ((long long)table[j / block_size] * block_size + j % block_size) * row + (long long)g * d;
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int c = lane + 32 * i;
            if (c < d) dot += qr[i] * S::load(k_cache, base + c);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
        float s = dot * scale;
        if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
        float m2 = fmaxf(m, s);
        float a = expf(m - m2);
        float p = expf(s - m2);
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int c = lane + 32 * i;
            acc[i] = acc[i] * a + (c < d ? p * S::load(v_cache, base + c) : 0.f);
        }
        l = l * a + p;
        m = m2;
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < PER; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float mx = neg_inf();
        for (int w = 0; w < WARPS; w++) mx = fmaxf(mx, s_m[w]);
        float f[WARPS];
        float total = 0.f;
        for (int w = 0; w < WARPS; w++) {
            f[w] = s_l[w] > 0.f ? expf(s_m[w] - mx) : 0.f;
            total += s_l[w] * f[w];
        }
        float inv = 1.f / total;
        float* oh = out + ((long long)t * h + head) * d;
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int c = lane + 32 * i;
            if (c < d) {
                float o = 0.f;
                for (int w = 0; w < WARPS; w++) o += s_acc[w][c] * f[w];
                oh[c] = o * inv;
            }
        }
    }
}

#define INSTANTIATE(SUFFIX, S)                                                                      \
    extern "C" __global__ void hromada_write_kv_##SUFFIX(                                           \
        const float* k_new, const float* v_new, S::T* k_cache, S::T* v_cache,                       \
        const int* slots, int n, int row)                                                           \
    {                                                                                               \
        write_kv<S>(k_new, v_new, k_cache, v_cache, slots, n, row);                                 \
    }                                                                                               \
    extern "C" __global__ void hromada_paged_attention_##SUFFIX(                                    \
        float* out, const float* q, const S::T* k_cache, const S::T* v_cache,                       \
        const int* tok_seq, const int* tok_pos, const int* tables,                                  \
        int n, int h, int n_kv, int d, int block_size, int max_blocks,                              \
        float scale, float softcap, int window)                                                     \
    {                                                                                               \
        paged_attention<S>(out, q, k_cache, v_cache, tok_seq, tok_pos, tables, n, h, n_kv, d,      \
                           block_size, max_blocks, scale, softcap, window);                         \
    }

INSTANTIATE(f32, StoreF32)
INSTANTIATE(bf16, StoreBF16)
