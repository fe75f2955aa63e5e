//! Parity with Hugging Face transformers on SmolLM2-135M-Instruct (../shared/golden).
mod common;

use candle_core::{Tensor, D};
use hromada_models::chat::Message;
use hromada_models::generate::{all_logits, greedy_ids};
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};

const FILE: &str = "smollm2-135m-instruct-reference.json";

fn load(dtype: DTypeChoice) -> LoadedModel {
    let p = common::model_path("smollm2-135m");
    LoadedModel::load(p.to_str().unwrap(), &LoadOptions { dtype, ..Default::default() }).expect("load")
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).expect("messages")
}

/// Prompt ids as the reference built them, checking our template and tokenizer on the way.
fn prompt_ids(m: &LoadedModel, p: &serde_json::Value) -> Vec<u32> {
    let want = common::ids(&p["input_ids"]);
    let id = p["id"].as_str().unwrap();
    let text = p["text"].as_str().unwrap();
    if p["kind"] == "chat" {
        let rendered = m.render_chat(&messages(&p["messages"]), true).expect("template");
        assert_eq!(rendered, text, "{id}: chat template output");
    }
    let got = m.tokenizer.encode(text, p["add_special_tokens"].as_bool().unwrap()).expect("encode");
    assert_eq!(got, want, "{id}: input ids");
    got
}

#[test]
fn tokenizer_matches_reference() {
    let g = common::golden(FILE);
    let m = load(DTypeChoice::Quantized);
    for t in g["tokenization"].as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        let text = t["text"].as_str().unwrap();
        assert_eq!(m.tokenizer.encode(text, true).unwrap(), common::ids(&t["ids"]), "{id}: ids");
        let ns = common::ids(&t["ids_no_special"]);
        assert_eq!(m.tokenizer.encode(text, false).unwrap(), ns, "{id}: ids_no_special");
        assert_eq!(m.tokenizer.decode(&ns, false).unwrap(), t["decoded"].as_str().unwrap(), "{id}: decoded");
        assert_eq!(
            m.tokenizer.decode(&common::ids(&t["ids"]), true).unwrap(),
            t["decoded_skip_special"].as_str().unwrap(),
            "{id}: decoded_skip_special"
        );
    }
    for p in g["prompts"].as_array().unwrap() {
        prompt_ids(&m, p);
    }
    for p in g["perplexity"].as_array().unwrap() {
        let got = m.tokenizer.encode(p["text"].as_str().unwrap(), true).unwrap();
        assert_eq!(got, common::ids(&p["input_ids"]), "perplexity text ids");
    }
}

fn log_softmax(logits: &Tensor) -> Tensor {
    let l = logits.to_dtype(candle_core::DType::F64).unwrap();
    let lse = l.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
    // Numerically fine for logits of this range in f64.
    l.broadcast_sub(&lse).unwrap()
}

#[test]
fn f32_logits_argmax_greedy_and_perplexity_match_reference() {
    let g = common::golden(FILE);
    let m = load(DTypeChoice::F32);
    let mut worst = 0f64;
    for p in g["prompts"].as_array().unwrap() {
        let id = p["id"].as_str().unwrap();
        let ids = prompt_ids(&m, p);
        let logits = all_logits(&m, &ids).unwrap(); // [n, V]
        let n = ids.len();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        // Last position: top-20 logits and logsumexp.
        let last = &rows[n - 1];
        for t in p["last"]["top20"].as_array().unwrap() {
            let tid = t["id"].as_u64().unwrap() as usize;
            let d = (last[tid] as f64 - t["logit"].as_f64().unwrap()).abs();
            worst = worst.max(d);
            assert!(d <= 2e-3, "{id}: last logit of token {tid} differs by {d}");
        }
        let lse = {
            let mx = last.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            mx + last.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln()
        };
        let d = (lse - p["last"]["logsumexp"].as_f64().unwrap()).abs();
        assert!(d <= 2e-3, "{id}: logsumexp differs by {d}");
        // Argmax at every position (either of the top two at a near tie).
        let want = common::ids(&p["positions"]["argmax"]);
        let ties: Vec<u64> = p["near_tie_positions"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).collect()).unwrap_or_default();
        let lp = log_softmax(&logits).to_vec2::<f64>().unwrap();
        for i in 0..n {
            let got = hromada_models::sampling::argmax(&rows[i]);
            if ties.contains(&(i as u64)) {
                let top2 = hromada_models::sampling::top_logprobs(&rows[i], 2);
                assert!(top2.iter().any(|(t, _)| *t == want[i]), "{id}: near-tie position {i}");
            } else {
                assert_eq!(got, want[i], "{id}: argmax at position {i}");
            }
            let al = p["positions"]["argmax_logit"][i].as_f64().unwrap();
            let d = (rows[i][want[i] as usize] as f64 - al).abs();
            assert!(d <= 2e-3, "{id}: argmax logit at {i} differs by {d}");
        }
        let nlp = common::f64s(&p["positions"]["next_token_logprob"]);
        for i in 0..n - 1 {
            let d = (lp[i][ids[i + 1] as usize] - nlp[i]).abs();
            assert!(d <= 4e-3, "{id}: next-token logprob at {i} differs by {d}");
        }
        // Greedy continuation with the KV cache: 24 identical ids, and the same text.
        let gr = &p["greedy"];
        let want_ids = common::ids(&gr["ids"]);
        let got_ids = greedy_ids(&m, &ids, want_ids.len()).unwrap();
        assert_eq!(got_ids, want_ids, "{id}: greedy continuation");
        assert_eq!(m.tokenizer.decode(&got_ids, false).unwrap(), gr["text"].as_str().unwrap(), "{id}: greedy text");
    }
    eprintln!("max |logit diff| over top-20 of last positions: {worst:.2e}");
    // Perplexity of the Ukrainian paragraph.
    for p in g["perplexity"].as_array().unwrap() {
        let ids = common::ids(&p["input_ids"]);
        assert_eq!(ids.len() as u64, p["token_count"].as_u64().unwrap());
        let logits = all_logits(&m, &ids).unwrap();
        let lp = log_softmax(&logits).to_vec2::<f64>().unwrap();
        let nll: f64 = (0..ids.len() - 1).map(|i| -lp[i][ids[i + 1] as usize]).sum::<f64>() / (ids.len() - 1) as f64;
        let d = (nll - p["mean_nll_nats"].as_f64().unwrap()).abs();
        assert!(d <= 2e-3, "perplexity: mean NLL {nll} differs by {d}");
    }
}

/// Weights kept quantized (Q4_1 matmul): report the distance to the f32 reference and
/// require argmax agreement no worse than llama.cpp's own quantized path (~92%).
#[test]
fn quantized_path_agrees_with_reference_like_llama_cpp() {
    let g = common::golden(FILE);
    let m = load(DTypeChoice::Quantized);
    let (mut agree, mut total, mut worst) = (0usize, 0usize, 0f64);
    for p in g["prompts"].as_array().unwrap() {
        let ids = prompt_ids(&m, p);
        let rows: Vec<Vec<f32>> = all_logits(&m, &ids).unwrap().to_vec2().unwrap();
        let want = common::ids(&p["positions"]["argmax"]);
        for i in 0..ids.len() {
            total += 1;
            if hromada_models::sampling::argmax(&rows[i]) == want[i] {
                agree += 1;
            }
        }
        for t in p["last"]["top20"].as_array().unwrap() {
            let tid = t["id"].as_u64().unwrap() as usize;
            worst = worst.max((rows[ids.len() - 1][tid] as f64 - t["logit"].as_f64().unwrap()).abs());
        }
    }
    let share = agree as f64 / total as f64;
    eprintln!("quantized Q4_1: argmax agrees at {agree}/{total} = {:.1}% of positions; max |top-20 logit diff| {worst:.3}", share * 100.0);
    assert!(share >= 0.92, "argmax agreement {share:.3} is below llama.cpp's ~0.92");
    assert!(worst < 1.0, "quantized logits drift too far: {worst}");
}
