//! The in-process backend's log-likelihoods against the transformers reference
//! (../shared/golden, f32): every prompt's summed next-token log-prob within 1e-3, both
//! scoring paths (shared-prefix KV cache, packed last-token batch) agreeing, and the
//! perplexity paragraph's total NLL through a rolling window.
use std::path::PathBuf;

use hromada_eval::backend::{Backend, InProcess, TokRequest};
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};

fn golden(file: &str) -> serde_json::Value {
    let shared = std::env::var("HROMADA_SHARED").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let p = shared.join("golden").join(file);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn backend(short: &str) -> InProcess {
    let m = LoadedModel::load(short, &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).expect("run scripts/setup.sh first");
    InProcess { model: m, batch_tokens: 4096 }
}

fn check_model(short: &str, file: &str) {
    let g = golden(file);
    let mut b = backend(short);
    let mut reqs = Vec::new();
    let mut want = Vec::new();
    for p in g["prompts"].as_array().unwrap() {
        let t = ids(&p["input_ids"]);
        reqs.push(TokRequest { context: t[..1].to_vec(), continuations: vec![t[1..].to_vec()] });
        want.push(p["sum_next_token_logprob"].as_f64().unwrap());
        // The last token as a "choice" among others: the packed path (all choices differ
        // only in their last token) must give the same log-likelihood as the KV path.
        let n = t.len();
        if n >= 3 {
            let alt = if t[n - 1] == 0 { 1 } else { t[n - 1] - 1 };
            reqs.push(TokRequest { context: t[..1].to_vec(), continuations: vec![t[1..].to_vec(), [&t[1..n - 1], &[alt][..]].concat()] });
            want.push(p["sum_next_token_logprob"].as_f64().unwrap());
        }
    }
    let got = b.loglikelihood(&reqs).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = (g[0].logprob - w).abs();
        assert!(d <= 1e-3, "{short} request {i}: log-likelihood {} vs reference {w} (|diff| {d:e})", g[0].logprob);
    }
    // Perplexity paragraph: one window holding the whole text scores every token after
    // the first exactly as the reference did.
    let p = &g["perplexity"][0];
    let t = ids(&p["input_ids"]);
    let scored = b.score_window(&[(t.clone(), 1)]).unwrap();
    let nll: f64 = -scored[0].iter().sum::<f64>();
    let want = p["total_nll_nats"].as_f64().unwrap();
    assert_eq!(scored[0].len(), p["n_predicted"].as_u64().unwrap() as usize);
    assert!((nll - want).abs() / want <= 1e-5, "{short}: total NLL {nll} vs {want}");
}

#[test]
fn smollm2_loglikelihoods_match_the_reference() {
    check_model("smollm2-135m", "smollm2-135m-instruct-reference.json");
}

#[test]
fn gemma3_loglikelihoods_match_the_reference() {
    check_model("gemma3-270m", "gemma-3-270m-reference.json");
}
