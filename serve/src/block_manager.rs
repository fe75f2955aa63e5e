//! Paged KV-cache bookkeeping: fixed-size blocks, per-sequence block tables, reference
//! counts, and prefix caching. A full block is identified by the hash of its tokens
//! chained with its predecessor's hash, so two prompts sharing a prefix (a system prompt)
//! share its blocks; freed blocks keep their content and hash until they are reused, so
//! a later request can still hit them.
//!
//! Placement: the CPU attention streams each sequence's blocks from memory, and reads
//! them about twice as fast when they lie side by side (the hardware prefetchers follow
//! a sequential stream; `hromada bench attention` with and without `--contiguous`). So a sequence that
//! starts a run of blocks takes the start of a free run long enough for everything it
//! may grow to (prompt plus `max_tokens`, [`BlockManager::grow_hinted`]) and *reserves*
//! the rest of it; its later blocks are the ones right after its last. Reservations are
//! soft: other sequences avoid them while unreserved free blocks exist, and take them
//! (least recently freed first) when the cache is otherwise full, so they never cost
//! capacity. A GPU cache turns placement off ([`BlockManager::with_contiguous`]) and
//! takes the least recently freed block every time, as vLLM does.
use std::collections::{BTreeSet, HashMap};
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
    /// Blocks with no reference, as (when freed, id): least recently freed first.
    free: BTreeSet<(u64, BlockId)>,
    freed_at: Vec<u64>,
    clock: u64,
    /// Free blocks held back for the sequence whose blocks precede them (soft).
    reserved: Vec<bool>,
    /// Keep a sequence's blocks side by side (the CPU cache); otherwise every new block
    /// is the least recently freed one (vLLM's order, for a GPU cache).
    contiguous: bool,
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
            free: (0..num_blocks as BlockId).map(|b| (0, b)).collect(),
            freed_at: vec![0; num_blocks],
            clock: 0,
            reserved: vec![false; num_blocks],
            contiguous: true,
            hash_of: vec![None; num_blocks],
            cached: HashMap::new(),
            prefix_hits_tokens: 0,
            prefix_queries_tokens: 0,
        }
    }

    /// Side-by-side placement on (the default, for the CPU cache) or off: a GPU's
    /// attention reads a block table as well as a run, and off spares the scan for a
    /// free run (linear in the cache's blocks) whenever a sequence starts one.
    pub fn with_contiguous(mut self, on: bool) -> Self {
        self.contiguous = on;
        self
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

    fn is_free(&self, b: usize) -> bool {
        b < self.num_blocks && self.ref_count[b] == 0
    }

    /// The least recently freed block.
    fn oldest_free(&self) -> Option<BlockId> {
        self.free.first().map(|&(_, b)| b)
    }

    /// Free block `b` leaves the free set (and any reservation).
    fn unfree(&mut self, b: BlockId) {
        let i = b as usize;
        self.free.remove(&(self.freed_at[i], b));
        self.reserved[i] = false;
    }

    /// Take free block `b`: its cached content (if any) is dropped.
    fn take(&mut self, b: BlockId) {
        let i = b as usize;
        self.unfree(b);
        if let Some(h) = self.hash_of[i].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
        }
        self.ref_count[i] = 1;
    }

    /// Where a sequence needing `want` more blocks starts a new run: the shortest run of
    /// unreserved free blocks that holds them all (the lowest such), else the longest
    /// run; with every free block reserved, the least recently freed one.
    fn run_start(&self, want: usize) -> Option<BlockId> {
        let mut fit: Option<(usize, usize)> = None; // (len, start)
        let mut longest: Option<(usize, usize)> = None;
        let mut b = 0;
        while b < self.num_blocks {
            if !self.is_free(b) || self.reserved[b] {
                b += 1;
                continue;
            }
            let start = b;
            while b < self.num_blocks && self.is_free(b) && !self.reserved[b] {
                b += 1;
            }
            let len = b - start;
            if len >= want && fit.is_none_or(|(l, _)| len < l) {
                fit = Some((len, start));
            }
            if longest.is_none_or(|(l, _)| len > l) {
                longest = Some((len, start));
            }
        }
        match fit.or(longest) {
            Some((_, s)) => Some(s as BlockId),
            None => self.oldest_free(),
        }
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
                    let i = b as usize;
                    if self.ref_count[i] == 0 {
                        self.unfree(b);
                    }
                    self.ref_count[i] += 1;
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
        self.grow_hinted(table, total_tokens, total_tokens)
    }

    /// Grow `table` to hold `total_tokens` slots, for a sequence that may reach
    /// `expected_tokens` (a run it starts reserves room for them).
    pub fn grow_hinted(&mut self, table: &mut Vec<BlockId>, total_tokens: usize, expected_tokens: usize) -> Result<(), BlockError> {
        let need = self.blocks_for(total_tokens).saturating_sub(table.len());
        if need > self.free.len() {
            return Err(BlockError::OutOfBlocks { need, free: self.free.len() });
        }
        for _ in 0..need {
            // The block right after the last one (free, and unreserved or this
            // sequence's own reservation), else the start of a new run.
            let next = table.last().map(|&b| b as usize + 1).filter(|&n| self.contiguous && self.is_free(n));
            let b = match next {
                Some(n) => n as BlockId,
                None if !self.contiguous => match self.oldest_free() {
                    Some(b) => b,
                    None => break,
                },
                None => {
                    let want = self.blocks_for(expected_tokens.max(total_tokens)).saturating_sub(table.len()).max(1);
                    let Some(s) = self.run_start(want) else { break };
                    // Hold back the rest of the run for this sequence.
                    let mut r = s as usize + 1;
                    while r < (s as usize + want).min(self.num_blocks) && self.is_free(r) && !self.reserved[r] {
                        self.reserved[r] = true;
                        r += 1;
                    }
                    s
                }
            };
            self.take(b);
            table.push(b);
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

    /// Release a sequence's blocks, and the room reserved after them.
    pub fn free(&mut self, table: &[BlockId]) {
        if let Some(&last) = table.last() {
            let mut r = last as usize + 1;
            while r < self.num_blocks && self.reserved[r] {
                self.reserved[r] = false;
                r += 1;
            }
        }
        // Free the tail first, so the shared prefix blocks stay cached longest.
        for &b in table.iter().rev() {
            let i = b as usize;
            let rc = &mut self.ref_count[i];
            if *rc > 0 {
                *rc -= 1;
                if *rc == 0 {
                    self.clock += 1;
                    self.freed_at[i] = self.clock;
                    self.free.insert((self.clock, b));
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

    fn consecutive(t: &[BlockId]) -> bool {
        t.windows(2).all(|w| w[1] == w[0] + 1)
    }

    #[test]
    fn sequences_growing_in_turn_keep_their_blocks_side_by_side() {
        let mut m = BlockManager::new(64, 4);
        let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
        // Three prompts of 8 tokens that may each reach 40 tokens (10 blocks).
        for t in [&mut a, &mut b, &mut c] {
            m.grow_hinted(t, 8, 40).unwrap();
        }
        // Decode: each takes one token per step, in turn.
        for total in 9..=40 {
            for t in [&mut a, &mut b, &mut c] {
                m.grow_hinted(t, total, 40).unwrap();
            }
        }
        for t in [&a, &b, &c] {
            assert_eq!(t.len(), 10);
            assert!(consecutive(t), "{t:?}");
        }
        assert_eq!((a[0], b[0], c[0]), (0, 10, 20));
        // A finished sequence's blocks and reservation are free for the next one.
        m.free(&b);
        let mut d = vec![];
        m.grow_hinted(&mut d, 4, 40).unwrap();
        m.grow_hinted(&mut d, 40, 40).unwrap();
        assert_eq!(d, (10..20).collect::<Vec<_>>());
    }

    #[test]
    fn reservations_never_cost_capacity() {
        let mut m = BlockManager::new(16, 4);
        let mut a = vec![];
        m.grow_hinted(&mut a, 4, 4 * 12).unwrap(); // holds 12 blocks back
        let mut b = vec![];
        m.grow_hinted(&mut b, 4 * 15, 4 * 15).unwrap(); // the 3 unreserved, then the reserved
        assert_eq!(m.num_free(), 0);
        let mut all: Vec<BlockId> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        assert_eq!(m.grow_hinted(&mut a, 8, 48), Err(BlockError::OutOfBlocks { need: 1, free: 0 }));
    }

    /// Random starts, growth and frees: a block is in at most one table, and the free
    /// count always matches.
    #[test]
    fn random_traffic_keeps_tables_disjoint() {
        let mut m = BlockManager::new(200, 16);
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n) as usize
        };
        let mut live: Vec<(Vec<BlockId>, usize, usize)> = vec![]; // (table, tokens, expected)
        let mut contiguous = 0;
        let mut finished = 0;
        for _ in 0..5000 {
            match rnd(10) {
                0 | 1 if live.len() < 8 => {
                    let tokens = 1 + rnd(300);
                    let expected = tokens + rnd(300);
                    let mut t = vec![];
                    if m.grow_hinted(&mut t, tokens, expected).is_ok() {
                        live.push((t, tokens, expected));
                    }
                }
                2 if !live.is_empty() => {
                    let (t, _, _) = live.swap_remove(rnd(live.len() as u64));
                    contiguous += consecutive(&t) as usize;
                    finished += 1;
                    m.free(&t);
                }
                _ if !live.is_empty() => {
                    let i = rnd(live.len() as u64);
                    let (t, tokens, expected) = &mut live[i];
                    if *tokens < *expected && m.grow_hinted(t, *tokens + 1, *expected).is_ok() {
                        *tokens += 1;
                    }
                }
                _ => {}
            }
            let mut seen = [false; 200];
            for (t, tokens, _) in &live {
                assert_eq!(t.len(), tokens.div_ceil(16));
                for &b in t {
                    assert!(!std::mem::replace(&mut seen[b as usize], true), "block {b} in two tables");
                }
            }
            assert_eq!(m.num_used(), seen.iter().filter(|&&u| u).count());
        }
        // With room for what the live sequences may reach, most of them got one run.
        assert!(finished > 100 && contiguous * 10 >= finished * 9, "{contiguous} of {finished} contiguous");
    }

    /// Without side-by-side placement, blocks are reused least recently freed first.
    #[test]
    fn plain_placement_reuses_the_least_recently_freed_block() {
        let mut m = BlockManager::new(6, 4).with_contiguous(false);
        let (mut a, mut b) = (vec![], vec![]);
        m.grow_hinted(&mut a, 8, 24).unwrap();
        m.grow_hinted(&mut b, 8, 24).unwrap();
        assert_eq!((a.as_slice(), b.as_slice()), (&[0, 1][..], &[2, 3][..]));
        m.free(&b); // 3, then 2
        m.free(&a); // 1, then 0
        let mut c = vec![];
        m.grow_hinted(&mut c, 24, 24).unwrap();
        assert_eq!(c, vec![4, 5, 3, 2, 1, 0]);
    }
}
