//! The scheduler: which sequences run in the next step, and how many tokens each
//! computes. It never touches tensors. Policy (vLLM's, simplified):
//! 1. every running sequence in decode gets one token; if no KV block is free, the most
//!    recently admitted running sequence is preempted (its blocks freed; it is recomputed
//!    from its tokens later) until the older ones fit;
//! 2. running sequences still in prefill continue, a chunk at a time, within the step's
//!    token budget (chunked prefill);
//! 3. waiting sequences are admitted in arrival order while `max_num_seqs`, the token
//!    budget and the free blocks allow.
use std::collections::{HashMap, VecDeque};

use crate::block_manager::{BlockId, BlockManager};

pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self { max_num_seqs: 64, max_num_batched_tokens: 512 }
    }
}

/// A sequence as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Sequence {
    pub id: SeqId,
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub computed: usize,
    pub table: Vec<BlockId>,
    /// Prompt tokens served from the prefix cache at admission.
    pub cached_tokens: usize,
    pub preemptions: u32,
    /// Compute every prompt position (no prefix-cache reuse): prompt log-probs need them.
    pub no_prefix_cache: bool,
    /// Tokens the sequence may reach (prompt plus its token limit): the block manager
    /// keeps room for them next to its blocks.
    pub expected_len: usize,
}

impl Sequence {
    pub fn new(id: SeqId, prompt: Vec<u32>) -> Self {
        let prompt_len = prompt.len();
        Self { id, tokens: prompt, prompt_len, computed: 0, table: vec![], cached_tokens: 0, preemptions: 0, no_prefix_cache: false, expected_len: prompt_len }
    }
    pub fn in_prefill(&self) -> bool {
        self.computed + 1 < self.tokens.len()
    }
}

/// One step's work: for each sequence, compute tokens `start..start + len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    pub start: usize,
    pub len: usize,
    /// Whether this chunk reaches the end of the known tokens (so a token is sampled).
    pub samples: bool,
}

#[derive(Debug, Default)]
pub struct Scheduler {
    pub config: SchedulerConfig,
    pub seqs: HashMap<SeqId, Sequence>,
    pub waiting: VecDeque<SeqId>,
    pub running: Vec<SeqId>,
    pub preemptions: u64,
    /// Whether blocks holding generated tokens go to the prefix cache. Not when prompt
    /// rows take another arithmetic than generated ones (`kernels::bf16`): a later
    /// prompt reusing such a block would get what a generated row computed, not what its
    /// own prompt row computes alone.
    pub cache_generated: bool,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self { config, cache_generated: true, ..Default::default() }
    }

    pub fn add(&mut self, seq: Sequence) {
        self.waiting.push_back(seq.id);
        self.seqs.insert(seq.id, seq);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }
    pub fn num_running(&self) -> usize {
        self.running.len()
    }
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Remove a sequence (finished or cancelled) and free its blocks.
    pub fn remove(&mut self, id: SeqId, blocks: &mut BlockManager) -> Option<Sequence> {
        self.running.retain(|&x| x != id);
        self.waiting.retain(|&x| x != id);
        let s = self.seqs.remove(&id)?;
        blocks.free(&s.table);
        Some(s)
    }

    fn preempt(&mut self, id: SeqId, blocks: &mut BlockManager) {
        self.running.retain(|&x| x != id);
        if let Some(s) = self.seqs.get_mut(&id) {
            blocks.free(&s.table);
            s.table.clear();
            s.computed = 0;
            s.cached_tokens = 0;
            s.preemptions += 1;
        }
        self.preemptions += 1;
        self.waiting.push_front(id);
    }

    /// Plan the next step. Returns an empty list when nothing can run.
    pub fn schedule(&mut self, blocks: &mut BlockManager) -> Vec<Scheduled> {
        let mut budget = self.config.max_num_batched_tokens.max(1);
        let mut out = Vec::new();
        // 1 + 2: running sequences, oldest first.
        let mut i = 0;
        while i < self.running.len() {
            let id = self.running[i];
            let (start, want) = match self.seqs.get(&id) {
                Some(s) => (s.computed, s.tokens.len() - s.computed),
                None => {
                    self.running.remove(i);
                    continue;
                }
            };
            let len = want.min(budget);
            if len == 0 {
                i += 1;
                continue;
            }
            // Make room, preempting the newest other sequences if needed.
            loop {
                let Some(s) = self.seqs.get_mut(&id) else { break };
                if blocks.grow_hinted(&mut s.table, start + len, s.expected_len).is_ok() {
                    budget -= len;
                    out.push(Scheduled { id, start, len, samples: start + len == s.tokens.len() });
                    i += 1;
                    break;
                }
                let victim = *self.running.last().unwrap_or(&id);
                if victim == id {
                    // Not even this one fits alone: put it back to wait.
                    self.preempt(id, blocks);
                    break;
                }
                self.preempt(victim, blocks);
                out.retain(|x| x.id != victim);
            }
        }
        // 3: admit waiting sequences.
        while budget > 0 && self.running.len() < self.config.max_num_seqs {
            let Some(&id) = self.waiting.front() else { break };
            let Some(s) = self.seqs.get_mut(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if s.table.is_empty() {
                let a = if s.no_prefix_cache { Default::default() } else { blocks.allocate_prompt(&s.tokens) };
                s.table = a.table;
                s.cached_tokens = a.cached_tokens;
                s.computed = a.cached_tokens;
            }
            let start = s.computed;
            let len = (s.tokens.len() - start).min(budget);
            if blocks.grow_hinted(&mut s.table, start + len, s.expected_len).is_err() {
                // Not enough blocks now: give back what it took and wait (the engine
                // rejects prompts larger than the whole cache at admission).
                let t = std::mem::take(&mut s.table);
                s.computed = 0;
                s.cached_tokens = 0;
                blocks.free(&t);
                break;
            }
            self.waiting.pop_front();
            self.running.push(id);
            budget -= len;
            out.push(Scheduled { id, start, len, samples: start + len == s.tokens.len() });
        }
        out
    }

    /// After the forward pass: mark the chunk computed and commit full blocks for reuse.
    pub fn computed(&mut self, sch: &Scheduled, blocks: &mut BlockManager) {
        if let Some(s) = self.seqs.get_mut(&sch.id) {
            s.computed = sch.start + sch.len;
            let reusable = if self.cache_generated { s.computed } else { s.computed.min(s.prompt_len) };
            blocks.commit(&s.table, &s.tokens, reusable);
        }
    }

    /// Append a sampled token to a sequence.
    pub fn append(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_to_end(s: &mut Scheduler, b: &mut BlockManager, gen: usize) -> Vec<Vec<Scheduled>> {
        let mut steps = Vec::new();
        let mut produced: HashMap<SeqId, usize> = HashMap::new();
        for _ in 0..1000 {
            if s.is_idle() {
                break;
            }
            let plan = s.schedule(b);
            for x in &plan {
                s.computed(x, b);
                if x.samples {
                    let n = produced.entry(x.id).or_insert(0);
                    *n += 1;
                    if *n >= gen {
                        s.remove(x.id, b);
                    } else {
                        s.append(x.id, 7);
                    }
                }
            }
            steps.push(plan);
        }
        steps
    }

    #[test]
    fn chunked_prefill_respects_the_token_budget() {
        let mut b = BlockManager::new(64, 4);
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 4, max_num_batched_tokens: 8 });
        s.add(Sequence::new(1, (0..20).collect()));
        s.add(Sequence::new(2, (0..3).collect()));
        let steps = run_to_end(&mut s, &mut b, 3);
        assert!(steps.iter().all(|p| p.iter().map(|x| x.len).sum::<usize>() <= 8));
        assert_eq!(steps[0], vec![Scheduled { id: 1, start: 0, len: 8, samples: false }]);
        assert!(s.is_idle());
        assert_eq!(b.num_used(), 0, "all blocks returned");
    }

    #[test]
    fn decode_batches_all_running_sequences() {
        let mut b = BlockManager::new(64, 4);
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 64 });
        for i in 0..5 {
            s.add(Sequence::new(i, vec![1; 3 + i as usize]));
        }
        let first = s.schedule(&mut b);
        assert_eq!(first.len(), 5, "all prefills fit in one step");
        for x in &first {
            s.computed(x, &mut b);
            s.append(x.id, 9);
        }
        let second = s.schedule(&mut b);
        assert_eq!(second.len(), 5);
        assert!(second.iter().all(|x| x.len == 1 && x.samples));
    }

    #[test]
    fn preemption_by_recompute_when_blocks_run_out() {
        let mut b = BlockManager::new(4, 2); // 8 token slots
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 4, max_num_batched_tokens: 64 });
        s.add(Sequence::new(1, vec![1, 2, 3]));
        s.add(Sequence::new(2, vec![4, 5, 6]));
        let steps = run_to_end(&mut s, &mut b, 4);
        assert!(s.preemptions > 0, "the newer sequence was preempted");
        assert!(s.is_idle(), "both finished: {} steps", steps.len());
        assert_eq!(b.num_used(), 0);
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut b = BlockManager::new(64, 4);
        let mut s = Scheduler::new(SchedulerConfig { max_num_seqs: 2, max_num_batched_tokens: 64 });
        for i in 0..4 {
            s.add(Sequence::new(i, vec![1, 2]));
        }
        assert_eq!(s.schedule(&mut b).len(), 2);
        assert_eq!(s.num_waiting(), 2);
    }
}
