//! The engine: one loop owns the model. Each `step` asks the scheduler what to run,
//! packs every scheduled sequence's tokens into one forward pass over the paged cache,
//! samples the sequences whose chunk reached their end, and reports the new tokens.
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;
use hromada_models::generate::FinishReason;
use hromada_models::sampling::{Sampler, SamplingParams};
use hromada_models::LoadedModel;

use crate::block_manager::BlockManager;
use crate::paged::{BatchSeq, KvCacheDType, PagedBatch, PagedKv};
use crate::scheduler::{Scheduler, SchedulerConfig, SeqId, Sequence};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub block_size: usize,
    /// Bytes of K/V cache (all layers).
    pub kv_cache_bytes: usize,
    /// The cache's element type (`auto` on the CPU: 8-bit for quantized models, f16 for
    /// half-precision ones, f32 for f32 ones).
    pub kv_cache_dtype: KvCacheDType,
    pub scheduler: SchedulerConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { block_size: 16, kv_cache_bytes: 512 << 20, kv_cache_dtype: KvCacheDType::Auto, scheduler: SchedulerConfig::default() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt has {prompt} tokens; with max_tokens {max_tokens} it exceeds the context length {context}")]
    TooLong { prompt: usize, max_tokens: usize, context: usize },
    #[error("the prompt needs {need} KV blocks but the cache has {have}")]
    TooLargeForCache { need: usize, have: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("duplicate request id {0}")]
    Duplicate(SeqId),
    #[error(transparent)]
    Sampling(#[from] hromada_models::Error),
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
}

/// A generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenOut {
    pub id: SeqId,
    pub token: u32,
    pub logprob: f32,
    /// Raw logits' top entries (id, logprob) when the request asked for them.
    pub top: Vec<(u32, f32)>,
    pub finished: Option<FinishReason>,
    /// With the first generated token of a request that asked for prompt log-probs:
    /// for prompt positions 1.., the prompt token, its log-prob and the top entries.
    pub prompt_logprobs: Option<Vec<PromptLogprob>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

struct SeqState {
    sampler: Sampler,
    generated: usize,
    max_new: usize,
    eos: Vec<u32>,
    top_logprobs: usize,
    /// Some(k): collect prompt log-probs (with the top k) for the first output token.
    prompt_lp: Option<usize>,
    prompt_out: Vec<PromptLogprob>,
}

pub struct Engine {
    pub model: Arc<LoadedModel>,
    pub blocks: BlockManager,
    pub sched: Scheduler,
    kv: PagedKv,
    states: HashMap<SeqId, SeqState>,
}

impl Engine {
    /// The engine with its paged K/V cache on the model's device (host memory on the CPU,
    /// device memory on a GPU).
    pub fn new(model: Arc<LoadedModel>, cfg: EngineConfig) -> candle_core::Result<Self> {
        let layers = model.model.num_layers();
        let (n_kv, d) = model.model.kv_shape();
        let (device, dtype) = (model.model.device().clone(), model.model.dtype());
        if !device.is_cpu() && matches!(cfg.kv_cache_dtype, KvCacheDType::F16 | KvCacheDType::Q8) {
            tracing::warn!("--kv-cache-dtype f16/q8 applies to the CPU cache; the GPU cache keeps the model's precision (bf16 or f32)");
        }
        let (kv, num_blocks) = if device.is_cpu() {
            let kind = PagedKv::cpu_kind(cfg.kv_cache_dtype, dtype, model.model.weights_quantized());
            let kind = PagedKv::fit_kind(kind, cfg.kv_cache_dtype, cfg.block_size, d).map_err(candle_core::Error::Msg)?;
            let row = PagedKv::cpu_row_bytes(kind, d);
            let num_blocks = PagedKv::blocks_for_budget(cfg.kv_cache_bytes, layers, cfg.block_size, n_kv, row).max(1);
            tracing::info!(num_blocks, block_size = cfg.block_size, kv_cache_dtype = ?kind, "paged KV cache");
            (PagedKv::new_cpu(kind, layers, num_blocks, cfg.block_size, n_kv, d), num_blocks)
        } else {
            let elem = PagedKv::elem_bytes(&device, dtype);
            let num_blocks = PagedKv::blocks_for_budget(cfg.kv_cache_bytes, layers, cfg.block_size, n_kv, d * elem).max(1);
            tracing::info!(num_blocks, block_size = cfg.block_size, bytes_per_value = elem, "paged KV cache");
            (PagedKv::new(layers, num_blocks, cfg.block_size, n_kv, d, &device, dtype)?, num_blocks)
        };
        Ok(Self {
            kv,
            blocks: BlockManager::new(num_blocks, cfg.block_size).with_contiguous(device.is_cpu()),
            sched: Scheduler {
                // Quantized weights on an AMX-BF16 CPU: prompt rows take bf16, so blocks
                // of generated tokens are not offered to later prompts.
                cache_generated: !(device.is_cpu() && model.model.weights_quantized() && hromada_models::kernels::bf16::enabled()),
                ..Scheduler::new(cfg.scheduler)
            },
            states: HashMap::new(),
            model,
        })
    }

    /// Queue a request. `top_logprobs`: how many top entries to report per token.
    pub fn add(&mut self, id: SeqId, prompt: Vec<u32>, params: SamplingParams, top_logprobs: usize) -> Result<(), EngineError> {
        self.add_with_prompt_logprobs(id, prompt, params, top_logprobs, None)
    }

    /// As `add`; `prompt_logprobs: Some(k)` also scores every prompt token (the
    /// log-likelihood interface evaluation harnesses use through `echo`).
    pub fn add_with_prompt_logprobs(
        &mut self,
        id: SeqId,
        prompt: Vec<u32>,
        params: SamplingParams,
        top_logprobs: usize,
        prompt_logprobs: Option<usize>,
    ) -> Result<(), EngineError> {
        params.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if self.states.contains_key(&id) {
            return Err(EngineError::Duplicate(id));
        }
        let context = self.model.context_length;
        if prompt.len() >= context {
            return Err(EngineError::TooLong { prompt: prompt.len(), max_tokens: params.max_tokens, context });
        }
        let need = (prompt.len() + 1).div_ceil(self.blocks.block_size());
        if need > self.blocks.num_blocks() {
            return Err(EngineError::TooLargeForCache { need, have: self.blocks.num_blocks() });
        }
        let max_new = params.max_tokens.min(context - prompt.len());
        let mut eos = if params.ignore_eos { vec![] } else { self.model.eos_ids() };
        eos.extend(params.stop_token_ids.iter().copied());
        self.states.insert(
            id,
            SeqState { sampler: Sampler::new(params, &prompt), generated: 0, max_new, eos, top_logprobs, prompt_lp: prompt_logprobs, prompt_out: vec![] },
        );
        let mut seq = Sequence::new(id, prompt);
        seq.no_prefix_cache = prompt_logprobs.is_some();
        seq.expected_len = seq.prompt_len + max_new;
        self.sched.add(seq);
        Ok(())
    }

    /// Drop a request (client gone): its blocks return to the pool at once.
    pub fn cancel(&mut self, id: SeqId) {
        self.sched.remove(id, &mut self.blocks);
        self.states.remove(&id);
    }

    pub fn has_work(&self) -> bool {
        !self.sched.is_idle()
    }

    /// Run one step; returns the tokens produced by it.
    pub fn step(&mut self) -> Result<Vec<TokenOut>, EngineError> {
        let mut plan = self.sched.schedule(&mut self.blocks);
        // The scheduler plans only sequences it holds; keep the plan and the rows aligned.
        plan.retain(|x| self.sched.seqs.contains_key(&x.id));
        if plan.is_empty() {
            return Ok(vec![]);
        }
        let mut ids = Vec::new();
        let mut seqs = Vec::with_capacity(plan.len());
        let mut sample_rows = Vec::new();
        // (seq, prompt position p, row): the row's logits score prompt token p + 1.
        let mut prompt_rows: Vec<(SeqId, usize, u32)> = Vec::new();
        for x in &plan {
            let Some(s) = self.sched.seqs.get(&x.id) else { continue };
            let base = ids.len();
            ids.extend_from_slice(&s.tokens[x.start..x.start + x.len]);
            seqs.push(BatchSeq { start: x.start, len: x.len, table: s.table.clone(), prompt_len: s.prompt_len });
            if let Some(st) = self.states.get(&x.id).filter(|st| st.prompt_lp.is_some() && st.generated == 0) {
                let done = st.prompt_out.len();
                for p in x.start.max(done)..(x.start + x.len).min(s.prompt_len.saturating_sub(1)) {
                    prompt_rows.push((x.id, p, (base + p - x.start) as u32));
                }
            }
            if x.samples {
                sample_rows.push((ids.len() - 1) as u32);
            }
        }
        let device = self.model.model.device().clone();
        let input = Tensor::new(ids.as_slice(), &device)?;
        let mut batch = PagedBatch::new(&mut self.kv, seqs);
        let t0 = std::time::Instant::now();
        let hidden = self.model.model.forward(&input, &mut batch)?;
        let tf = t0.elapsed().as_micros();
        let all_rows: Vec<u32> = sample_rows.iter().copied().chain(prompt_rows.iter().map(|r| r.2)).collect();
        let lt = if all_rows.is_empty() {
            None
        } else {
            let rows = hidden.index_select(&Tensor::new(all_rows.as_slice(), &device)?, 0)?;
            Some(self.model.model.logits(&rows)?)
        };
        // The logits rows read where the LM head wrote them (a CPU f32 tensor); copied out
        // only from another device. (Copying them cost a 16-sequence step ~3 MB of memory
        // traffic on one thread while the pool waited.)
        let (guard, copied);
        let (flat, vocab): (&[f32], usize) = match &lt {
            None => (&[], 0),
            Some(t) => {
                let (n, vocab) = t.dims2()?;
                if n != all_rows.len() {
                    return Err(candle_core::Error::Msg(format!("the LM head gave {n} rows of logits for {} requested", all_rows.len())).into());
                }
                guard = t.storage_and_layout();
                match hromada_models::kernels::ops::cpu_f32(&guard.0, guard.1) {
                    Some(v) => (v, vocab),
                    None => {
                        copied = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        (&copied, vocab)
                    }
                }
            }
        };
        let mut logits: Vec<&[f32]> = if vocab == 0 { vec![] } else { flat.chunks_exact(vocab).collect() };
        let tl = t0.elapsed().as_micros();
        let prompt_logits = logits.split_off(sample_rows.len());
        for ((id, p, _), &row) in prompt_rows.iter().zip(&prompt_logits) {
            let (Some(st), Some(s)) = (self.states.get_mut(id), self.sched.seqs.get(id)) else { continue };
            let k = st.prompt_lp.unwrap_or(0);
            let token = s.tokens[p + 1];
            if st.prompt_out.len() == *p {
                st.prompt_out.push(PromptLogprob {
                    token,
                    logprob: hromada_models::sampling::log_softmax_at(row, token as usize),
                    top: hromada_models::sampling::top_logprobs(row, k),
                });
            }
        }
        // Sampling (penalties, the draw, log-probs over the vocabulary) for every sampled
        // row at once, in parallel on the compute pool; the bookkeeping below is serial.
        let row_of: HashMap<SeqId, usize> = plan.iter().filter(|x| x.samples).map(|x| x.id).zip(0..logits.len()).collect();
        let mut work: Vec<(SeqId, &mut SeqState, &[f32])> =
            self.states.iter_mut().filter_map(|(id, st)| row_of.get(id).and_then(|&r| logits.get(r)).map(|&row| (*id, st, row))).collect();
        let sampled: HashMap<SeqId, (hromada_models::sampling::Sampled, Vec<(u32, f32)>)> = hromada_models::kernels::pool().install(|| {
            use rayon::prelude::*;
            work.par_iter_mut()
                .map(|(id, st, row)| {
                    let s = st.sampler.sample(row);
                    let top = if st.top_logprobs > 0 { hromada_models::sampling::top_logprobs(row, st.top_logprobs) } else { vec![] };
                    (*id, (s, top))
                })
                .collect()
        });
        // Per-step timing for profiling (RUST_LOG=hromada_serve::engine=debug).
        tracing::debug!(tokens = ids.len(), samples = sample_rows.len(), forward_us = tf as u64, logits_us = (tl - tf) as u64, total_us = t0.elapsed().as_micros() as u64, "step");
        let mut out = Vec::new();
        for x in &plan {
            self.sched.computed(x, &mut self.blocks);
            if !x.samples {
                continue;
            }
            let (Some(st), Some((s, top))) = (self.states.get_mut(&x.id), sampled.get(&x.id)) else { continue };
            st.generated += 1;
            let finished = if st.eos.contains(&s.token) {
                Some(FinishReason::Stop)
            } else if st.generated >= st.max_new {
                Some(FinishReason::Length)
            } else {
                None
            };
            let prompt_logprobs = if st.generated == 1 && st.prompt_lp.is_some() { Some(std::mem::take(&mut st.prompt_out)) } else { None };
            out.push(TokenOut { id: x.id, token: s.token, logprob: s.logprob, top: top.clone(), finished, prompt_logprobs });
            if finished.is_some() {
                self.cancel(x.id);
            } else {
                self.sched.append(x.id, s.token);
            }
        }
        Ok(out)
    }

    /// Run until every queued request is finished; tokens per request (tests, offline use).
    pub fn run_to_completion(&mut self) -> Result<HashMap<SeqId, Vec<u32>>, EngineError> {
        let mut res: HashMap<SeqId, Vec<u32>> = HashMap::new();
        while self.has_work() {
            for t in self.step()? {
                res.entry(t.id).or_default().push(t.token);
            }
        }
        Ok(res)
    }
}
