//! CPU kernels that candle lacks or runs slowly.
pub mod q4_1;

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
