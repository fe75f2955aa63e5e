//! Where scores come from: the model in process (batched), or any OpenAI-compatible
//! endpoint (completions with `echo` and `logprobs` for log-likelihoods, as
//! lm-evaluation-harness's local-completions does; chat or plain completions for
//! generation).
//!
//! Conventions (lm-eval's): context and continuation are tokenized separately and
//! concatenated; the task's `target_delimiter` (a leading space by default) belongs to
//! the continuation. An empty context is replaced by the BOS (else EOS) token. Rolling
//! log-likelihoods score every token of a document, the first given BOS/EOS, in windows
//! of `max_length` tokens whose later ones carry `max_length - stride` tokens of context.
use candle_core::{DType, Tensor, D};
use hromada_models::cache::Segments;
use hromada_models::chat::Message;
use hromada_models::sampling::SamplingParams;
use hromada_models::tokenizer::Tokenizer;
use hromada_models::LoadedModel;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// log P(continuation | context), and whether greedy decoding would produce it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ll {
    pub logprob: f64,
    pub greedy: bool,
}

/// A request in tokens.
#[derive(Debug, Clone)]
pub struct TokRequest {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
}

pub trait Backend {
    fn describe(&self) -> Value;
    fn tokenizer(&self) -> Option<&Tokenizer>;
    /// Context length in tokens.
    fn max_length(&self) -> usize;
    /// For each request, the log-likelihood of each continuation after the context.
    fn loglikelihood(&mut self, reqs: &[TokRequest]) -> Result<Vec<Vec<Ll>>>;
    /// Per-token log-probs of `tokens[score_from..]` given all earlier tokens of `tokens`.
    fn score_window(&mut self, windows: &[(Vec<u32>, usize)]) -> Result<Vec<Vec<f64>>>;
    fn generate(&mut self, prompt: &str, chat: bool, until: &[String], max_tokens: usize) -> Result<String>;
}

/// Tokens of `context` (with the model's BOS when its tokenizer adds one; BOS or EOS
/// alone when empty) and of the continuation (no special tokens).
pub fn tokenize_request(tok: &Tokenizer, context: &str, continuations: &[String]) -> Result<TokRequest> {
    let mut ctx = tok.encode(context, true)?;
    if ctx.is_empty() {
        let pre = tok.special.bos.as_ref().map(|b| b.0).or_else(|| tok.special.eos_ids().first().copied()).ok_or_else(|| Error::Other("empty context and no BOS/EOS token".into()))?;
        ctx.push(pre);
    }
    let conts = continuations.iter().map(|c| tok.encode(c, false)).collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(TokRequest { context: ctx, continuations: conts })
}

/// Rolling windows over `tokens` (prefix token first): `(window, score_from)`.
pub fn rolling_windows(prefix: u32, tokens: &[u32], max_length: usize, stride: usize) -> Vec<(Vec<u32>, usize)> {
    let mut all = Vec::with_capacity(tokens.len() + 1);
    all.push(prefix);
    all.extend_from_slice(tokens);
    let max_length = max_length.max(2);
    let stride = stride.clamp(1, max_length - 1);
    let mut out = Vec::new();
    // First window: predict all[1..end] from the start.
    let first_end = all.len().min(max_length);
    out.push((all[..first_end].to_vec(), 1));
    let mut scored_to = first_end; // all[..scored_to] predicted
    while scored_to < all.len() {
        let end = (scored_to + stride).min(all.len());
        let start = end.saturating_sub(max_length);
        out.push((all[start..end].to_vec(), scored_to - start));
        scored_to = end;
    }
    out
}

/// All continuations have the same length and differ only in their last token.
fn last_token_differs(r: &TokRequest) -> bool {
    let first = &r.continuations[0];
    r.continuations.iter().all(|c| c.len() == first.len() && c[..c.len() - 1] == first[..first.len() - 1])
}

pub struct InProcess {
    pub model: LoadedModel,
    /// Tokens per packed forward pass.
    pub batch_tokens: usize,
}

impl InProcess {
    /// Log-probs (f64) and argmax at `positions` (each predicting `targets`) of one
    /// packed forward over `segments`.
    fn packed_logprobs(&self, segments: &[Vec<u32>], positions: &[usize], targets: &[u32]) -> Result<Vec<Ll>> {
        let m = &self.model.model;
        let dev = m.device().clone();
        let ids: Vec<u32> = segments.iter().flatten().copied().collect();
        let n = ids.len();
        let hidden = m.forward(&Tensor::from_vec(ids, n, &dev)?, &mut Segments::new(segments.iter().map(|s| s.len()).collect(), false))?;
        let pos: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let h = hidden.index_select(&Tensor::from_vec(pos, positions.len(), &dev)?, 0)?;
        let lsm = candle_nn::ops::log_softmax(&m.logits(&h)?.to_dtype(DType::F32)?, D::Minus1)?;
        let argmax = lsm.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let picked = lsm.gather(&Tensor::from_vec(targets.to_vec(), (targets.len(), 1), &dev)?, 1)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(picked.iter().zip(argmax.iter().zip(targets)).map(|(&lp, (&a, &t))| Ll { logprob: lp as f64, greedy: a == t }).collect())
    }
}

impl InProcess {
    /// Requests whose continuations share all but their last token (` А`, ` Б`... are
    /// the same space byte and a different letter): one segment per request (context +
    /// the shared tokens), the shared tokens' log-probs and every choice's last token
    /// read off one packed forward pass over many requests.
    fn single_token_batch(&self, reqs: &[TokRequest], batch: &[usize], out: &mut [Vec<Ll>]) -> Result<()> {
        let (mut segments, mut positions, mut targets) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for &ri in batch {
            let r = &reqs[ri];
            let common = &r.continuations[0][..r.continuations[0].len() - 1];
            let seg: Vec<u32> = r.context.iter().chain(common).copied().collect();
            for (j, &t) in common.iter().enumerate() {
                positions.push(offset + r.context.len() - 1 + j);
                targets.push(t);
            }
            for c in &r.continuations {
                positions.push(offset + seg.len() - 1);
                targets.push(c[c.len() - 1]);
            }
            offset += seg.len();
            segments.push(seg);
        }
        let lls = self.packed_logprobs(&segments, &positions, &targets)?;
        let mut k = 0;
        for &ri in batch {
            let r = &reqs[ri];
            let nc = r.continuations[0].len() - 1;
            let shared = &lls[k..k + nc];
            k += nc;
            let (lp0, g0) = (shared.iter().map(|l| l.logprob).sum::<f64>(), shared.iter().all(|l| l.greedy));
            out[ri] = lls[k..k + r.continuations.len()].iter().map(|l| Ll { logprob: lp0 + l.logprob, greedy: g0 && l.greedy }).collect();
            k += r.continuations.len();
        }
        Ok(())
    }

    fn with_shared_prefix(&self, r: &TokRequest) -> Result<Vec<Ll>> {
        let m = &self.model.model;
        let dev = m.device().clone();
        let longest = r.continuations.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut cache = hromada_models::cache::SeqKvCache::new(m.num_layers(), r.context.len() + longest);
        // Scoring: every row is a prompt row, as in `Segments` and a server's echo.
        cache.set_prompt_len(r.context.len() + longest);
        let n = r.context.len();
        let h = m.forward(&Tensor::from_vec(r.context.clone(), n, &dev)?, &mut cache)?;
        let last = h.narrow(0, n - 1, 1)?;
        let mut res = Vec::with_capacity(r.continuations.len());
        for c in &r.continuations {
            cache.truncate(n);
            let hs = if c.len() > 1 {
                let hc = m.forward(&Tensor::from_vec(c[..c.len() - 1].to_vec(), c.len() - 1, &dev)?, &mut cache)?;
                Tensor::cat(&[&last, &hc], 0)?
            } else {
                last.clone()
            };
            let lsm = candle_nn::ops::log_softmax(&m.logits(&hs)?.to_dtype(DType::F32)?, D::Minus1)?;
            let argmax = lsm.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let picked = lsm.gather(&Tensor::from_vec(c.clone(), (c.len(), 1), &dev)?, 1)?.flatten_all()?.to_vec1::<f32>()?;
            res.push(Ll { logprob: picked.iter().map(|&x| x as f64).sum(), greedy: argmax.iter().zip(c).all(|(a, t)| a == t) });
        }
        Ok(res)
    }
}

impl Backend for InProcess {
    fn describe(&self) -> Value {
        json!({"backend": "in-process", "model": self.model.path.display().to_string(), "id": self.model.id, "dtype": format!("{:?}", self.model.model.dtype())})
    }
    fn tokenizer(&self) -> Option<&Tokenizer> {
        Some(&self.model.tokenizer)
    }
    fn max_length(&self) -> usize {
        self.model.context_length.min(2048)
    }

    /// Items whose continuations are all one token (lettered choices): many items per
    /// packed forward pass, each item's context once, every choice read off its last
    /// position. Longer continuations: the context once into a KV cache, then each
    /// continuation on top of it (the shared prefix is never recomputed).
    fn loglikelihood(&mut self, reqs: &[TokRequest]) -> Result<Vec<Vec<Ll>>> {
        let mut out: Vec<Vec<Ll>> = vec![Vec::new(); reqs.len()];
        let mut batch: Vec<usize> = Vec::new();
        let mut batch_len = 0;
        for (ri, r) in reqs.iter().enumerate() {
            if r.context.is_empty() {
                return Err(Error::Other(format!("request {ri}: the context has no tokens")));
            }
            if r.continuations.is_empty() {
                continue;
            }
            if r.continuations.iter().any(|c| c.is_empty()) {
                return Err(Error::Other(format!("request {ri}: a continuation has no tokens")));
            }
            let longest = r.continuations.iter().map(|c| c.len()).max().unwrap_or(0);
            if r.context.len() + longest > self.model.context_length {
                return Err(Error::Other(format!("request {ri}: {} tokens exceed the context length {}", r.context.len() + longest, self.model.context_length)));
            }
            if longest > 1 && !last_token_differs(r) {
                out[ri] = self.with_shared_prefix(r)?;
                continue;
            }
            if batch_len + r.context.len() + longest > self.batch_tokens && !batch.is_empty() {
                self.single_token_batch(reqs, &batch, &mut out)?;
                batch.clear();
                batch_len = 0;
            }
            batch.push(ri);
            batch_len += r.context.len() + longest;
        }
        if !batch.is_empty() {
            self.single_token_batch(reqs, &batch, &mut out)?;
        }
        Ok(out)
    }

    fn score_window(&mut self, windows: &[(Vec<u32>, usize)]) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::with_capacity(windows.len());
        for (w, from) in windows {
            if *from == 0 || *from > w.len() {
                return Err(Error::Other(format!("window of {} tokens scored from {from}", w.len())));
            }
            let positions: Vec<usize> = (*from - 1..w.len() - 1).collect();
            let targets: Vec<u32> = w[*from..].to_vec();
            let lls = self.packed_logprobs(std::slice::from_ref(w), &positions, &targets)?;
            out.push(lls.iter().map(|l| l.logprob).collect());
        }
        Ok(out)
    }

    fn generate(&mut self, prompt: &str, chat: bool, until: &[String], max_tokens: usize) -> Result<String> {
        let ids = if chat { self.model.encode_chat(&[Message::new("user", prompt)], true)? } else { self.model.tokenizer.encode(prompt, true)? };
        let params = SamplingParams { temperature: 0.0, max_tokens, stop: until.to_vec(), stop_token_ids: self.model.eos_ids(), ..Default::default() };
        let r = hromada_models::generate::generate(&self.model, &ids, &params, |_| {})?;
        Ok(r.text)
    }
}

/// An OpenAI-compatible server. Log-likelihoods need token ids, so a tokenizer (the
/// served model's) must be given; requests then send `prompt` as token ids.
pub struct Http {
    pub base: String,
    pub model: String,
    pub api_key: Option<String>,
    pub tokenizer: Option<Tokenizer>,
    pub max_length: usize,
    pub batch: usize,
    agent: ureq::Agent,
}

impl Http {
    pub fn new(base: &str, model: Option<String>, api_key: Option<String>, tokenizer: Option<Tokenizer>, max_length: usize) -> Result<Self> {
        let base = base.trim_end_matches('/').trim_end_matches("/v1").to_string();
        let agent = ureq::AgentBuilder::new().timeout(std::time::Duration::from_secs(600)).build();
        let mut h = Self { base, model: String::new(), api_key, tokenizer, max_length, batch: 16, agent };
        h.model = match model {
            Some(m) => m,
            None => {
                let v = h.get("/v1/models")?;
                v["data"][0]["id"].as_str().map(String::from).ok_or_else(|| Error::Http { url: h.base.clone(), msg: "GET /v1/models lists no model".into() })?
            }
        };
        Ok(h)
    }

    fn get(&self, path: &str) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut r = self.agent.get(&url);
        if let Some(k) = &self.api_key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = r.call().map_err(|e| Error::Http { url: url.clone(), msg: e.to_string() })?;
        resp.into_json().map_err(|e| Error::Http { url, msg: e.to_string() })
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let mut r = self.agent.post(&url);
        if let Some(k) = &self.api_key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.send_json(body.clone()) {
            Ok(resp) => resp.into_json().map_err(|e| Error::Http { url, msg: e.to_string() }),
            Err(ureq::Error::Status(code, resp)) => Err(Error::Http { url, msg: format!("HTTP {code}: {}", resp.into_string().unwrap_or_default()) }),
            Err(e) => Err(Error::Http { url, msg: e.to_string() }),
        }
    }

    /// Echoed per-token log-probs (and top-1 tokens) of each id list.
    fn echo_logprobs(&self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<(Option<f64>, Option<String>, String)>>> {
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.batch.max(1)) {
            let body = json!({"model": self.model, "prompt": chunk, "max_tokens": 1, "temperature": 0.0, "echo": true, "logprobs": 1});
            let v = self.post("/v1/completions", &body)?;
            let choices = v["choices"].as_array().ok_or_else(|| Error::Http { url: self.base.clone(), msg: "no choices".into() })?;
            let mut got: Vec<(usize, Vec<(Option<f64>, Option<String>, String)>)> = Vec::new();
            for c in choices {
                let idx = c["index"].as_u64().unwrap_or(0) as usize;
                let lp = &c["logprobs"];
                let toks = lp["tokens"].as_array().cloned().unwrap_or_default();
                let lps = lp["token_logprobs"].as_array().cloned().unwrap_or_default();
                let tops = lp["top_logprobs"].as_array().cloned().unwrap_or_default();
                let row = toks
                    .iter()
                    .enumerate()
                    .map(|(i, t)| {
                        let top = tops.get(i).and_then(|m| m.as_object()).and_then(|m| m.iter().max_by(|a, b| a.1.as_f64().unwrap_or(f64::NEG_INFINITY).total_cmp(&b.1.as_f64().unwrap_or(f64::NEG_INFINITY))).map(|(k, _)| k.clone()));
                        (lps.get(i).and_then(|x| x.as_f64()), top, t.as_str().unwrap_or_default().to_string())
                    })
                    .collect();
                got.push((idx, row));
            }
            got.sort_by_key(|g| g.0);
            if got.len() != chunk.len() {
                return Err(Error::Http { url: self.base.clone(), msg: format!("{} choices for {} prompts", got.len(), chunk.len()) });
            }
            out.extend(got.into_iter().map(|g| g.1));
        }
        Ok(out)
    }
}

impl Backend for Http {
    fn describe(&self) -> Value {
        json!({"backend": "openai-compatible", "endpoint": self.base, "model": self.model})
    }
    fn tokenizer(&self) -> Option<&Tokenizer> {
        self.tokenizer.as_ref()
    }
    fn max_length(&self) -> usize {
        self.max_length
    }

    fn loglikelihood(&mut self, reqs: &[TokRequest]) -> Result<Vec<Vec<Ll>>> {
        let mut prompts = Vec::new();
        for r in reqs {
            for c in &r.continuations {
                prompts.push(r.context.iter().chain(c).copied().collect::<Vec<u32>>());
            }
        }
        let echoed = self.echo_logprobs(&prompts)?;
        let mut it = echoed.into_iter();
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            let mut row = Vec::new();
            for c in &r.continuations {
                let e = it.next().ok_or_else(|| Error::Http { url: self.base.clone(), msg: "missing choice".into() })?;
                let s = r.context.len();
                if e.len() < s + c.len() {
                    return Err(Error::Http { url: self.base.clone(), msg: format!("echo returned {} prompt tokens, expected {}", e.len(), s + c.len()) });
                }
                let part = &e[s..s + c.len()];
                let logprob = part.iter().map(|p| p.0.unwrap_or(f64::NAN)).sum();
                let greedy = part.iter().all(|(_, top, tok)| top.as_deref() == Some(tok.as_str()));
                row.push(Ll { logprob, greedy });
            }
            out.push(row);
        }
        Ok(out)
    }

    fn score_window(&mut self, windows: &[(Vec<u32>, usize)]) -> Result<Vec<Vec<f64>>> {
        let prompts: Vec<Vec<u32>> = windows.iter().map(|w| w.0.clone()).collect();
        let echoed = self.echo_logprobs(&prompts)?;
        echoed
            .iter()
            .zip(windows)
            .map(|(e, (w, from))| match e.get(*from..w.len()) {
                Some(part) => Ok(part.iter().map(|p| p.0.unwrap_or(f64::NAN)).collect()),
                None => Err(Error::Http { url: self.base.clone(), msg: format!("echo returned {} tokens for a window of {}", e.len(), w.len()) }),
            })
            .collect()
    }

    fn generate(&mut self, prompt: &str, chat: bool, until: &[String], max_tokens: usize) -> Result<String> {
        let stop: Vec<&String> = until.iter().take(4).collect();
        if chat {
            let v = self.post("/v1/chat/completions", &json!({"model": self.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0.0, "stop": stop}))?;
            Ok(v["choices"][0]["message"]["content"].as_str().unwrap_or_default().to_string())
        } else {
            let v = self.post("/v1/completions", &json!({"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stop": stop}))?;
            Ok(v["choices"][0]["text"].as_str().unwrap_or_default().to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_windows_score_every_token_once() {
        let toks: Vec<u32> = (10..30).collect();
        let w = rolling_windows(1, &toks, 8, 4);
        let mut scored = Vec::new();
        for (win, from) in &w {
            assert!(win.len() <= 8);
            scored.extend_from_slice(&win[*from..]);
        }
        assert_eq!(scored, toks);
        // Later windows carry context: 8 - 4 = 4 tokens before the scored ones.
        assert_eq!(w[1].1, 4);
        let short = rolling_windows(1, &toks[..3], 8, 4);
        assert_eq!(short, vec![(vec![1, 10, 11, 12], 1)]);
    }
}
