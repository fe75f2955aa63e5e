//! CPU kernels that candle lacks or runs slowly.
pub mod attn;
pub mod bf16;
pub mod ops;
pub mod q4_1;
pub mod simd;

/// Whether this CPU has AVX-512F besides AVX2, FMA and F16C (detected once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512() -> bool {
    static AVX512: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX512.get_or_init(|| has_avx2() && std::is_x86_feature_detected!("avx512f") && std::env::var("HROMADA_KERNEL").as_deref() != Ok("avx2"))
}

/// Whether this CPU has AVX-512 F/BW and VNNI besides [`has_avx512`]'s (detected once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx512_vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| has_avx512() && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni"))
}

/// Whether this CPU has AVX2, FMA and F16C (every AVX2 CPU has the other two; detected
/// once).
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c"))
}

/// `f(i)` for every `i < units`, the units split into contiguous ranges across the
/// compute pool: about four per thread, enough to balance the threads and few enough
/// that a decode step's small matmuls are not drowned in task overhead (on the calling
/// thread when that is one range).
pub(crate) fn on_pool(units: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let per_task = units.div_ceil(threads * 4).max(1);
    let tasks = units.div_ceil(per_task);
    let run = |t: usize| (t * per_task..((t + 1) * per_task).min(units)).for_each(&f);
    use rayon::prelude::*;
    if tasks <= 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// The compute pool. A forward pass runs inside it (`install`), so the calling thread is
/// one of its workers and no extra thread competes for the cores while idle workers spin
/// between kernels (with 2 cores that competition cost a third of decode time).
pub fn pool() -> &'static rayon::ThreadPool {
    static POOL: std::sync::OnceLock<rayon::ThreadPool> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let n = std::env::var("HROMADA_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("hromada-compute-{i}"))
            .build()
            .or_else(|_| rayon::ThreadPoolBuilder::new().build())
            .unwrap_or_else(|_| unreachable_pool())
    })
}

fn unreachable_pool() -> rayon::ThreadPool {
    // Building a pool only fails when threads cannot be spawned at all; a one-thread
    // pool is the last resort and it too needs a thread. There is no way to continue.
    panic!("cannot spawn compute threads")
}
