//! `hromada bench serve`: a load generator for any OpenAI-compatible server, with vLLM's
//! metric definitions: TTFT (request sent to first token), TPOT ((E2EL - TTFT) / (output
//! tokens - 1)), ITL (time between streamed chunks), E2EL; request and token throughput;
//! goodput against TTFT/TPOT SLOs. Requests go to the streaming `/v1/completions`
//! endpoint with `ignore_eos`, so every request produces exactly `output_len` tokens.
use std::io::{BufRead, BufReader};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub endpoint: String,
    pub model: Option<String>,
    pub api_key: Option<String>,
    pub num_prompts: usize,
    pub max_concurrency: usize,
    /// Requests per second (Poisson); `None`: all at once.
    pub request_rate: Option<f64>,
    pub input_len: usize,
    pub output_len: usize,
    /// JSONL with `{"prompt": ...}` per line instead of random token prompts.
    pub dataset_path: Option<std::path::PathBuf>,
    pub seed: u64,
    pub goodput_ttft_ms: Option<f64>,
    pub goodput_tpot_ms: Option<f64>,
    /// Sampling temperature of every request (0: greedy, as vLLM's benchmark).
    pub temperature: f64,
    /// top_p of every request (`None`: not sent).
    pub top_p: Option<f64>,
}

#[derive(Debug, Clone, Default)]
struct One {
    ok: bool,
    error: String,
    ttft: f64,
    e2el: f64,
    itl: Vec<f64>,
    output_tokens: usize,
    prompt_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Dist {
    pub mean_ms: f64,
    pub median_ms: f64,
    pub p99_ms: f64,
}

fn dist(mut v: Vec<f64>) -> Dist {
    if v.is_empty() {
        return Dist { mean_ms: 0.0, median_ms: 0.0, p99_ms: 0.0 };
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let q = |p: f64| {
        let x = p * (v.len() - 1) as f64;
        let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
        (v[lo] + (v[hi] - v[lo]) * (x - lo as f64)) * 1000.0
    };
    Dist { mean_ms: v.iter().sum::<f64>() / v.len() as f64 * 1000.0, median_ms: q(0.5), p99_ms: q(0.99) }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub endpoint: String,
    pub model: String,
    pub num_prompts: usize,
    pub max_concurrency: usize,
    pub request_rate: Option<f64>,
    pub input_len: usize,
    pub output_len: usize,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub completed: usize,
    pub failed: usize,
    pub errors: Vec<String>,
    pub duration_s: f64,
    pub total_input_tokens: usize,
    pub total_output_tokens: usize,
    pub request_throughput: f64,
    pub output_throughput: f64,
    pub total_token_throughput: f64,
    pub goodput: Option<f64>,
    pub ttft: Dist,
    pub tpot: Dist,
    pub itl: Dist,
    pub e2el: Dist,
}

fn prompts(cfg: &BenchConfig) -> Result<Vec<Value>, String> {
    if let Some(p) = &cfg.dataset_path {
        let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line).map_err(|e| format!("{}:{}: {e}", p.display(), i + 1))?;
            let prompt = v.get("prompt").cloned().ok_or_else(|| format!("{}:{}: no `prompt` field", p.display(), i + 1))?;
            out.push(prompt);
        }
        if out.is_empty() {
            return Err(format!("{}: no prompts", p.display()));
        }
        return Ok((0..cfg.num_prompts).map(|i| out[i % out.len()].clone()).collect());
    }
    // Random token ids (every server here takes token-id prompts), away from special ids.
    let mut rng = hromada_models::sampling::Rng::new(cfg.seed);
    Ok((0..cfg.num_prompts)
        .map(|_| json!((0..cfg.input_len).map(|_| 1000 + (rng.next_u64() % 20000) as u32).collect::<Vec<_>>()))
        .collect())
}

fn one_request(cfg: &BenchConfig, model: &str, prompt: &Value) -> One {
    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": cfg.output_len, "temperature": cfg.temperature,
        "stream": true, "stream_options": {"include_usage": true}, "ignore_eos": true});
    if let Some(p) = cfg.top_p {
        body["top_p"] = json!(p);
    }
    let mut req = ureq::post(&format!("{}/v1/completions", cfg.endpoint.trim_end_matches('/')))
        .set("Content-Type", "application/json")
        .timeout(Duration::from_secs(3600));
    if let Some(k) = &cfg.api_key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let start = Instant::now();
    let mut r = One::default();
    let resp = match req.send_string(&body.to_string()) {
        Ok(x) => x,
        Err(e) => {
            r.error = e.to_string();
            return r;
        }
    };
    let mut last = start;
    let mut chunks = 0usize;
    let mut first_choice = None;
    for line in BufReader::new(resp.into_reader()).lines() {
        let Ok(line) = line else { break };
        let Some(data) = line.strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            break;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            r.output_tokens = u["completion_tokens"].as_u64().unwrap_or(0) as usize;
            r.prompt_tokens = u["prompt_tokens"].as_u64().unwrap_or(0) as usize;
        }
        let choices = v["choices"].as_array().filter(|c| !c.is_empty());
        if choices.is_some() && first_choice.is_none() {
            first_choice = Some(Instant::now());
        }
        let has_text = choices.is_some_and(|c| c.iter().any(|c| c["text"].as_str().is_some_and(|t| !t.is_empty())));
        if has_text {
            let now = Instant::now();
            if chunks == 0 {
                r.ttft = now.duration_since(start).as_secs_f64();
            } else {
                r.itl.push(now.duration_since(last).as_secs_f64());
            }
            last = now;
            chunks += 1;
        }
    }
    r.e2el = start.elapsed().as_secs_f64();
    // A response whose tokens all decode to no text (one byte of a multi-byte character,
    // a special token) still arrived: as vLLM's benchmark, its first choice chunk is the
    // first token.
    if let (0, Some(t)) = (chunks, first_choice) {
        r.ttft = t.duration_since(start).as_secs_f64();
        chunks = 1;
    }
    if r.output_tokens == 0 {
        r.output_tokens = chunks;
    }
    r.ok = chunks > 0;
    if !r.ok {
        r.error = "no tokens streamed".into();
    }
    r
}

pub fn run(cfg: &BenchConfig) -> Result<BenchResult, String> {
    let model = match &cfg.model {
        Some(m) => m.clone(),
        None => {
            let mut req = ureq::get(&format!("{}/v1/models", cfg.endpoint.trim_end_matches('/')));
            if let Some(k) = &cfg.api_key {
                req = req.set("Authorization", &format!("Bearer {k}"));
            }
            let v: Value = req.call().map_err(|e| format!("GET /v1/models: {e}"))?.into_json().map_err(|e| e.to_string())?;
            v["data"][0]["id"].as_str().ok_or("the server lists no model")?.to_string()
        }
    };
    let prompts = prompts(cfg)?;
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    let rx = Arc::new(Mutex::new(rx));
    let results = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let workers: Vec<_> = (0..cfg.max_concurrency.max(1))
        .map(|_| {
            let (rx, results, cfg, model) = (rx.clone(), results.clone(), cfg.clone(), model.clone());
            std::thread::spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok(prompt) = job else { return };
                let r = one_request(&cfg, &model, &prompt);
                if let Ok(mut v) = results.lock() {
                    v.push(r);
                }
            })
        })
        .collect();
    let mut rng = hromada_models::sampling::Rng::new(cfg.seed ^ 0x5eed);
    for p in prompts {
        if tx.send(p).is_err() {
            break;
        }
        if let Some(rate) = cfg.request_rate.filter(|r| r.is_finite() && *r > 0.0) {
            let u = rng.next_f64().max(1e-12);
            std::thread::sleep(Duration::from_secs_f64(-u.ln() / rate));
        }
    }
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    let duration = start.elapsed().as_secs_f64();
    let rs = results.lock().map(|v| v.clone()).unwrap_or_default();
    let ok: Vec<&One> = rs.iter().filter(|r| r.ok).collect();
    let out_tokens: usize = ok.iter().map(|r| r.output_tokens).sum();
    let in_tokens: usize = ok.iter().map(|r| if r.prompt_tokens > 0 { r.prompt_tokens } else { cfg.input_len }).sum();
    let tpot: Vec<f64> = ok.iter().filter(|r| r.output_tokens > 1).map(|r| (r.e2el - r.ttft) / (r.output_tokens - 1) as f64).collect();
    let goodput = if cfg.goodput_ttft_ms.is_some() || cfg.goodput_tpot_ms.is_some() {
        let good = ok
            .iter()
            .filter(|r| {
                let t = (r.e2el - r.ttft) / (r.output_tokens.max(2) - 1) as f64;
                cfg.goodput_ttft_ms.is_none_or(|s| r.ttft * 1000.0 <= s) && cfg.goodput_tpot_ms.is_none_or(|s| t * 1000.0 <= s)
            })
            .count();
        Some(good as f64 / duration)
    } else {
        None
    };
    let mut errors: Vec<String> = rs.iter().filter(|r| !r.ok).map(|r| r.error.clone()).collect();
    errors.dedup();
    errors.truncate(5);
    Ok(BenchResult {
        endpoint: cfg.endpoint.clone(),
        model,
        num_prompts: cfg.num_prompts,
        max_concurrency: cfg.max_concurrency,
        request_rate: cfg.request_rate,
        input_len: cfg.input_len,
        output_len: cfg.output_len,
        temperature: cfg.temperature,
        top_p: cfg.top_p,
        completed: ok.len(),
        failed: rs.len() - ok.len(),
        errors,
        duration_s: duration,
        total_input_tokens: in_tokens,
        total_output_tokens: out_tokens,
        request_throughput: ok.len() as f64 / duration,
        output_throughput: out_tokens as f64 / duration,
        total_token_throughput: (in_tokens + out_tokens) as f64 / duration,
        goodput,
        ttft: dist(ok.iter().map(|r| r.ttft).collect()),
        tpot: dist(tpot),
        itl: dist(ok.iter().flat_map(|r| r.itl.iter().copied()).collect()),
        e2el: dist(ok.iter().map(|r| r.e2el).collect()),
    })
}
