//! Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, reference
//! counts, and prefix caching. A full block is identified by the hash of its tokens
//! chained with its predecessor's hash, so two prompts sharing a prefix (a system prompt)
//! share its blocks; freed blocks keep their content and hash until they are reused
//! (least recently freed last), so a later request can still hit them.
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};

pub type BlockId = u32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("out of KV blocks: need {need}, {free} free")]
    OutOfBlocks { need: usize, free: usize },
}

/// Hash of a full block's tokens chained with the previous block's hash.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    num_blocks: usize,
    ref_count: Vec<u32>,
    /// Blocks with no reference, oldest-freed first (reused in that order).
    free: VecDeque<BlockId>,
    /// Content hash of a full, committed block.
    hash_of: Vec<Option<u64>>,
    cached: HashMap<u64, BlockId>,
    pub prefix_hits_tokens: u64,
    pub prefix_queries_tokens: u64,
}

/// The blocks of one sequence and how many of its prompt tokens were found cached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allocation {
    pub table: Vec<BlockId>,
    pub cached_tokens: usize,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            num_blocks,
            ref_count: vec![0; num_blocks],
            free: (0..num_blocks as BlockId).collect(),
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            prefix_hits_tokens: 0,
            prefix_queries_tokens: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// Blocks referenced by some sequence.
    pub fn num_used(&self) -> usize {
        self.num_blocks - self.free.len()
    }
    pub fn usage(&self) -> f64 {
        self.num_used() as f64 / self.num_blocks.max(1) as f64
    }

    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    fn take_free(&mut self) -> Option<BlockId> {
        let b = self.free.pop_front()?;
        if let Some(h) = self.hash_of[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        self.ref_count[b as usize] = 1;
        Some(b)
    }

    /// Whether `tokens` more token slots could be allocated now (ignoring cache hits).
    pub fn can_allocate(&self, table_len: usize, total_tokens: usize) -> bool {
        self.blocks_for(total_tokens).saturating_sub(table_len) <= self.free.len()
    }

    /// Start a sequence: reuse cached full blocks of its prompt (never the block holding
    /// the last prompt token, which must be computed to produce logits).
    pub fn allocate_prompt(&mut self, prompt: &[u32]) -> Allocation {
        let bs = self.block_size;
        let mut alloc = Allocation::default();
        let reusable = prompt.len().saturating_sub(1) / bs;
        let mut parent = None;
        self.prefix_queries_tokens += (reusable * bs) as u64;
        for i in 0..reusable {
            let h = block_hash(parent, &prompt[i * bs..(i + 1) * bs]);
            match self.cached.get(&h).copied() {
                Some(b) => {
                    if self.ref_count[b as usize] == 0 {
                        self.free.retain(|&x| x != b);
                    }
                    self.ref_count[b as usize] += 1;
                    alloc.table.push(b);
                    parent = Some(h);
                }
                None => break,
            }
        }
        alloc.cached_tokens = alloc.table.len() * bs;
        self.prefix_hits_tokens += alloc.cached_tokens as u64;
        alloc
    }

    /// Grow `table` to hold `total_tokens` slots.
    pub fn grow(&mut self, table: &mut Vec<BlockId>, total_tokens: usize) -> Result<(), BlockError> {
        let need = self.blocks_for(total_tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks { need, free: self.free.len() });
        }
        for _ in 0..need {
            if let Some(b) = self.take_free() {
                table.push(b);
            }
        }
        Ok(())
    }

    /// Record the hashes of the full blocks among the first `computed` tokens, so later
    /// prompts can share them.
    pub fn commit(&mut self, table: &[BlockId], tokens: &[u32], computed: usize) {
        let bs = self.block_size;
        let mut parent = None;
        for (i, &b) in table.iter().enumerate().take(computed / bs) {
            let h = block_hash(parent, &tokens[i * bs..(i + 1) * bs]);
            parent = Some(h);
            if self.hash_of[b as usize].is_none() {
                self.hash_of[b as usize] = Some(h);
                self.cached.entry(h).or_insert(b);
            }
        }
    }

    /// Release a sequence's blocks.
    pub fn free(&mut self, table: &[BlockId]) {
        // Free the tail first, so the shared prefix blocks stay cached longest.
        for &b in table.iter().rev() {
            let rc = &mut self.ref_count[b as usize];
            if *rc > 0 {
                *rc -= 1;
                if *rc == 0 {
                    self.free.push_back(b);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_grow_free_round_trip() {
        let mut m = BlockManager::new(8, 4);
        let prompt: Vec<u32> = (0..10).collect();
        let mut a = m.allocate_prompt(&prompt);
        assert_eq!(a.cached_tokens, 0);
        m.grow(&mut a.table, 10).unwrap();
        assert_eq!(a.table.len(), 3);
        assert_eq!(m.num_used(), 3);
        m.grow(&mut a.table, 12).unwrap();
        assert_eq!(a.table.len(), 3, "12 tokens still fit 3 blocks");
        m.grow(&mut a.table, 13).unwrap();
        assert_eq!(a.table.len(), 4);
        assert_eq!(m.grow(&mut a.table, 40), Err(BlockError::OutOfBlocks { need: 6, free: 4 }));
        m.free(&a.table);
        assert_eq!(m.num_used(), 0);
    }

    #[test]
    fn shared_prefix_is_reused_and_survives_free() {
        let mut m = BlockManager::new(16, 4);
        let system: Vec<u32> = (100..112).collect(); // 3 full blocks
        let p1: Vec<u32> = system.iter().copied().chain([1, 2, 3]).collect();
        let p2: Vec<u32> = system.iter().copied().chain([7, 8]).collect();
        let mut a1 = m.allocate_prompt(&p1);
        m.grow(&mut a1.table, p1.len()).unwrap();
        m.commit(&a1.table, &p1, p1.len());
        let mut a2 = m.allocate_prompt(&p2);
        assert_eq!(a2.cached_tokens, 12);
        assert_eq!(&a2.table[..3], &a1.table[..3]);
        m.grow(&mut a2.table, p2.len()).unwrap();
        assert_eq!(m.num_used(), 4 + 1, "3 shared + 1 + 1 own blocks");
        m.free(&a1.table);
        m.free(&a2.table);
        assert_eq!(m.num_used(), 0);
        // Freed blocks keep their content: a third request still hits.
        let a3 = m.allocate_prompt(&p1);
        assert_eq!(a3.cached_tokens, 12);
        // A different first block breaks the chain: no hit on later blocks.
        let mut other = p1.clone();
        other[0] = 999;
        assert_eq!(m.allocate_prompt(&other).cached_tokens, 0);
    }

    #[test]
    fn last_prompt_block_is_never_reused() {
        let mut m = BlockManager::new(8, 4);
        let p: Vec<u32> = (0..8).collect();
        let mut a = m.allocate_prompt(&p);
        m.grow(&mut a.table, 8).unwrap();
        m.commit(&a.table, &p, 8);
        let b = m.allocate_prompt(&p);
        assert_eq!(b.cached_tokens, 4, "the block with the last token is recomputed");
    }

    #[test]
    fn reused_free_block_loses_its_hash() {
        let mut m = BlockManager::new(2, 2);
        let p: Vec<u32> = vec![1, 2, 3];
        let mut a = m.allocate_prompt(&p);
        m.grow(&mut a.table, 3).unwrap();
        m.commit(&a.table, &p, 3);
        m.free(&a.table);
        let mut b = m.allocate_prompt(&[9, 9, 9, 9]);
        m.grow(&mut b.table, 4).unwrap(); // takes both blocks, evicting the cached one
        m.free(&b.table);
        assert_eq!(m.allocate_prompt(&p).cached_tokens, 0);
    }
}
