//! Single-sequence generation (`hromada generate`), incremental detokenization and
//! whole-sequence scoring.
use std::time::Instant;

use candle_core::Tensor;

use crate::cache::{KvCache, Segments, SeqKvCache};
use crate::error::{Error, Result};
use crate::model::LoadedModel;
use crate::sampling::{Sampler, SamplingParams, StopStrings};
use crate::tokenizer::Tokenizer;

/// Turns a growing list of ids into text pieces, never splitting a UTF-8 character that
/// spans several byte-level tokens (the prefix/read offset method TGI uses).
#[derive(Debug, Clone, Default)]
pub struct DecodeStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl DecodeStream {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Default::default()
        }
    }

    pub fn step(&mut self, tok: &Tokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], self.skip_special)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') {
            let piece = full.get(prefix.len()..).map(String::from).unwrap_or_default();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone)]
pub struct GenerationOutput {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prompt_secs: f64,
    pub decode_secs: f64,
}

impl GenerationOutput {
    pub fn prompt_tok_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_secs.max(1e-9)
    }
    pub fn decode_tok_per_s(&self) -> f64 {
        // The first token comes from the prompt pass; the rest from decode steps.
        (self.ids.len().saturating_sub(1)) as f64 / self.decode_secs.max(1e-9)
    }
}

fn last_row_logits(m: &LoadedModel, hidden: &Tensor) -> Result<Vec<f32>> {
    let n = hidden.dim(0)?;
    let last = hidden.narrow(0, n - 1, 1)?;
    Ok(m.model.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?)
}

/// Generate from `prompt` ids; `on_text` receives each new piece of text as it is ready.
pub fn generate(
    m: &LoadedModel,
    prompt: &[u32],
    params: &SamplingParams,
    mut on_text: impl FnMut(&str),
) -> Result<GenerationOutput> {
    params.validate()?;
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("the prompt is empty".into()));
    }
    if prompt.len() >= m.context_length {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} tokens; the context length is {}",
            prompt.len(),
            m.context_length
        )));
    }
    let device = m.model.device().clone();
    let mut cache = SeqKvCache::new(m.model.num_layers(), m.context_length);
    cache.set_prompt_len(prompt.len());
    let mut sampler = Sampler::new(params.clone(), prompt);
    let mut stops = StopStrings::new(params.stop.clone());
    let mut detok = DecodeStream::new(true);
    let eos = if params.ignore_eos { vec![] } else { m.eos_ids() };
    let max_new = params.max_tokens.min(m.context_length - prompt.len());

    let t0 = Instant::now();
    let ids = Tensor::new(prompt, &device)?;
    let hidden = m.model.forward(&ids, &mut cache)?;
    let mut logits = last_row_logits(m, &hidden)?;
    let prompt_secs = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut out = Vec::new();
    let mut text = String::new();
    let mut finish = FinishReason::Length;
    while out.len() < max_new {
        let s = sampler.sample(&logits);
        let tok = s.token;
        if eos.contains(&tok) || params.stop_token_ids.contains(&tok) {
            finish = FinishReason::Stop;
            break;
        }
        out.push(tok);
        if let Some(piece) = detok.step(&m.tokenizer, tok)? {
            let (emit, hit) = stops.push(&piece);
            if !emit.is_empty() {
                on_text(&emit);
                text.push_str(&emit);
            }
            if hit {
                finish = FinishReason::Stop;
                break;
            }
        }
        if out.len() >= max_new {
            break;
        }
        let ids = Tensor::new(&[tok], &device)?;
        let hidden = m.model.forward(&ids, &mut cache)?;
        logits = last_row_logits(m, &hidden)?;
    }
    if finish == FinishReason::Length {
        let rest = stops.flush();
        if !rest.is_empty() {
            on_text(&rest);
            text.push_str(&rest);
        }
    }
    Ok(GenerationOutput {
        ids: out,
        text,
        finish_reason: finish,
        prompt_tokens: prompt.len(),
        prompt_secs,
        decode_secs: t1.elapsed().as_secs_f64(),
    })
}

/// Logits `[n, vocab]` (f32) at every position of `ids`, one full forward pass without a
/// cache (teacher forcing), as the reference computes them.
pub fn all_logits(m: &LoadedModel, ids: &[u32]) -> Result<Tensor> {
    let t = Tensor::new(ids, m.model.device())?;
    let mut seg = Segments::single(ids.len(), false);
    let hidden = m.model.forward(&t, &mut seg)?;
    Ok(m.model.logits(&hidden)?)
}

/// Greedy continuation with a KV cache, not stopping at EOS (the reference's loop).
pub fn greedy_ids(m: &LoadedModel, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
    let device = m.model.device().clone();
    let mut cache = SeqKvCache::new(m.model.num_layers(), m.context_length);
    cache.set_prompt_len(prompt.len());
    let mut ids = Tensor::new(prompt, &device)?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let hidden = m.model.forward(&ids, &mut cache as &mut dyn KvCache)?;
        let logits = last_row_logits(m, &hidden)?;
        let tok = crate::sampling::argmax(&logits);
        out.push(tok);
        ids = Tensor::new(&[tok], &device)?;
    }
    Ok(out)
}
