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
    on_pool_split(units, TASKS_PER_THREAD, f)
}

/// [`on_pool`]'s ranges per thread.
pub(crate) const TASKS_PER_THREAD: usize = 4;

/// [`on_pool`] with about `per_thread` ranges per thread (at least one unit each).
pub(crate) fn on_pool_split(units: usize, per_thread: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads().max(1);
    let per_task = units.div_ceil(threads * per_thread.max(1)).max(1);
    let tasks = units.div_ceil(per_task);
    let run = |t: usize| (t * per_task..((t + 1) * per_task).min(units)).for_each(&f);
    use rayon::prelude::*;
    if tasks <= 1 {
        run(0);
    } else {
        (0..tasks).into_par_iter().for_each(run);
    }
}

/// Keeps the pool's other workers awake for the life of the value (a quantized forward
/// pass): each runs a job that takes the pool's pending work as it appears
/// (`rayon::yield_now`) instead of parking between kernels, so a kernel's tasks start
/// without waking a thread (on a 2-core VM waking one cost ~13% of a decode step and a
/// quarter of a batch-1 token's time). A helper ends when the pass ends, when it lands on
/// a thread that is itself inside a pass, or after [`KeepWarm::MAX_IDLE`] without work:
/// a helper taken up by a thread waiting inside a task would otherwise hold that task
/// until the pass ends, so it can delay the pass by at most that long, never stop it.
/// `ensure` (once per layer) starts helpers again where they ended. `HROMADA_KEEP_WARM=0`
/// turns it off.
pub struct KeepWarm {
    on: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Helpers running now.
    live: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    enabled: bool,
}

thread_local! {
    /// Whether this thread has a pass (a [`KeepWarm`]) in progress.
    static IN_PASS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl KeepWarm {
    /// How long a helper spins without finding work before it lets its thread park.
    pub const MAX_IDLE: std::time::Duration = std::time::Duration::from_millis(1);

    /// Call on a pool worker (inside `pool().install`); elsewhere it does nothing.
    pub fn start() -> Self {
        use std::sync::atomic::{AtomicBool, AtomicUsize};
        use std::sync::Arc;
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let off = *OFF.get_or_init(|| std::env::var("HROMADA_KEEP_WARM").as_deref() == Ok("0"));
        let enabled = !off && rayon::current_thread_index().is_some() && rayon::current_num_threads() > 1 && !IN_PASS.get();
        let w = Self { on: Arc::new(AtomicBool::new(true)), live: Arc::new(AtomicUsize::new(0)), enabled };
        if enabled {
            IN_PASS.set(true);
            w.ensure();
        }
        w
    }

    /// Starts helpers until one per other worker runs.
    pub fn ensure(&self) {
        use std::sync::atomic::Ordering;
        if !self.enabled {
            return;
        }
        while self.live.load(Ordering::Acquire) < rayon::current_num_threads() - 1 {
            self.live.fetch_add(1, Ordering::AcqRel);
            let (on, live) = (self.on.clone(), self.live.clone());
            rayon::spawn(move || {
                if !IN_PASS.get() {
                    let mut idle: Option<std::time::Instant> = None;
                    while on.load(Ordering::Acquire) {
                        if matches!(rayon::yield_now(), Some(rayon::Yield::Executed)) {
                            idle = None;
                            continue;
                        }
                        let now = std::time::Instant::now();
                        if now.duration_since(*idle.get_or_insert(now)) > Self::MAX_IDLE {
                            break;
                        }
                        std::hint::spin_loop();
                    }
                }
                live.fetch_sub(1, Ordering::AcqRel);
            });
        }
    }
}

impl Drop for KeepWarm {
    fn drop(&mut self) {
        if self.enabled {
            self.on.store(false, std::sync::atomic::Ordering::Release);
            IN_PASS.set(false);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Every unit runs exactly once, whatever the split (more ranges than units, one
    /// range, none), on the pool and outside it.
    #[test]
    fn on_pool_split_runs_every_unit_once() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        for units in [0usize, 1, 2, 7, 36, 61, 192] {
            for per_thread in [0usize, 1, 4, 16, 1000] {
                for inside in [false, true] {
                    let hits: Vec<AtomicUsize> = (0..units).map(|_| AtomicUsize::new(0)).collect();
                    let run = || on_pool_split(units, per_thread, |u| {
                        hits[u].fetch_add(1, Ordering::Relaxed);
                    });
                    if inside {
                        pool().install(run);
                    } else {
                        run();
                    }
                    for (u, h) in hits.iter().enumerate() {
                        assert_eq!(h.load(Ordering::Relaxed), 1, "unit {u} of {units}, {per_thread} per thread, on the pool: {inside}");
                    }
                }
            }
        }
    }

    /// Passes from several threads at once, each keeping the pool warm while its kernels
    /// run nested parallel work (whose joins may take up another pass's helper): every
    /// pass finishes with the right sums, none waits on another, and once they end the
    /// helpers end too.
    #[test]
    fn warm_passes_finish_side_by_side_and_their_helpers_end() {
        let (tx, rx) = std::sync::mpsc::channel();
        let lives: Vec<_> = (0..4u64)
            .map(|t| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let live = pool().install(|| {
                        let w = KeepWarm::start();
                        for layer in 0..40u64 {
                            w.ensure();
                            let sum: u64 = (0..20_000u64).into_par_iter().map(|i| (i * (t + 1) + layer) % 7).sum();
                            let want: u64 = (0..20_000u64).map(|i| (i * (t + 1) + layer) % 7).sum();
                            assert_eq!(sum, want, "pass {t} layer {layer}");
                            // A gap between kernels, as the serial steps of a layer leave.
                            std::thread::sleep(std::time::Duration::from_micros(50));
                        }
                        w.live.clone()
                    });
                    tx.send(()).ok();
                    live
                })
            })
            .collect();
        for _ in 0..4 {
            rx.recv_timeout(std::time::Duration::from_secs(120)).expect("every pass finishes");
        }
        for h in lives {
            let live = h.join().expect("pass thread");
            let t0 = std::time::Instant::now();
            while live.load(std::sync::atomic::Ordering::Acquire) > 0 {
                assert!(t0.elapsed() < std::time::Duration::from_secs(10), "helpers still running after their pass");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
