//! Prometheus text-format metrics, named after vLLM's (`hromada:` prefix).
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

const BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0];

#[derive(Debug, Default)]
pub struct Histogram {
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn observe(&self, v: f64) {
        if let Ok(mut g) = self.inner.lock() {
            if g.0.is_empty() {
                g.0 = vec![0; BUCKETS.len()];
            }
            for (i, b) in BUCKETS.iter().enumerate() {
                if v <= *b {
                    g.0[i] += 1;
                }
            }
            g.1 += v;
            g.2 += 1;
        }
    }
    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        if let Ok(g) = self.inner.lock() {
            for (i, b) in BUCKETS.iter().enumerate() {
                out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {}\n", g.0.get(i).copied().unwrap_or(0)));
            }
            out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}\n", g.2, g.1, g.2));
        }
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// KV-cache usage in millionths.
    pub kv_usage_ppm: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub preemptions: AtomicU64,
    pub requests_ok: AtomicU64,
    pub requests_err: AtomicU64,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub e2e: Histogram,
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut o = String::new();
        let g = |o: &mut String, name: &str, kind: &str, help: &str, v: String| {
            o.push_str(&format!("# HELP hromada:{name} {help}\n# TYPE hromada:{name} {kind}\nhromada:{name} {v}\n"));
        };
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        g(&mut o, "num_requests_running", "gauge", "Sequences in the running batch.", l(&self.running).to_string());
        g(&mut o, "num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", l(&self.waiting).to_string());
        g(&mut o, "kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", format!("{}", l(&self.kv_usage_ppm) as f64 / 1e6));
        g(&mut o, "kv_cache_blocks_used", "gauge", "KV-cache blocks referenced by sequences.", l(&self.kv_blocks_used).to_string());
        g(&mut o, "prompt_tokens_total", "counter", "Prompt tokens processed.", l(&self.prompt_tokens).to_string());
        g(&mut o, "generation_tokens_total", "counter", "Tokens generated.", l(&self.generation_tokens).to_string());
        g(&mut o, "prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.", l(&self.prefix_hits).to_string());
        g(&mut o, "prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", l(&self.prefix_queries).to_string());
        g(&mut o, "num_preemptions_total", "counter", "Sequences preempted (recomputed later).", l(&self.preemptions).to_string());
        o.push_str("# HELP hromada:request_success_total Finished requests.\n# TYPE hromada:request_success_total counter\n");
        o.push_str(&format!("hromada:request_success_total {}\n", l(&self.requests_ok)));
        self.ttft.render("hromada:time_to_first_token_seconds", "Time to first token.", &mut o);
        self.itl.render("hromada:inter_token_latency_seconds", "Time between tokens of a request.", &mut o);
        self.e2e.render("hromada:e2e_request_latency_seconds", "End-to-end request latency.", &mut o);
        o
    }
}
