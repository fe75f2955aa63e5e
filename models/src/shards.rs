//! Token shards: the one file format of hromada's own, written by the data pipeline's `tokenize`
//! step and read by `train` (the reader lives here, in the crate both stand on).
//!
//! A shard `tokens/NNNNN.bin` is little-endian throughout:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `HRMDTOK1` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | header size in bytes (96) |
//! | 16 | 32 | sha256 of the tokenizer's `tokenizer.json` (compact JSON) |
//! | 48 | 4 | EOS id written after every document |
//! | 52 | 4 | vocabulary size (every token id is below it) |
//! | 56 | 8 | number of documents `D` |
//! | 64 | 8 | number of tokens `T` |
//! | 72 | 24 | reserved, zero |
//! | 96 | 4·T | tokens, `u32` each: every document's tokens followed by EOS |
//! | 96+4·T | 8·(D+1) | document index: `u64` start offsets (in tokens) of each document, then `T` |
//!
//! Document `i` is `tokens[index[i]..index[i+1]]` and ends with the EOS id. The writer
//! writes `NNNNN.bin.tmp` and renames it when the header is final, so a shard with its
//! final name is complete; the reader checks the magic, the sizes and the index.

use crate::error::{Error, Result};
use std::fs::File;
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"HRMDTOK1";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 96;

/// A token shard opened for reading (memory-mapped).
pub struct TokenShard {
    pub path: PathBuf,
    map: memmap2::Mmap,
    pub tokenizer_sha256: [u8; 32],
    pub eos: u32,
    pub vocab_size: u32,
    pub num_docs: u64,
    pub num_tokens: u64,
}

impl TokenShard {
    pub fn open(path: &Path) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and shards are never modified in place
        // (writers rename a finished temporary file over the name).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let bad = |m: String| Error::config(path, format!("not a valid token shard: {m}"));
        if map.len() < HEADER_SIZE || &map[0..8] != MAGIC {
            return Err(bad("bad magic (expected HRMDTOK1)".into()));
        }
        let u32at = |o: usize| u32::from_le_bytes([map[o], map[o + 1], map[o + 2], map[o + 3]]);
        let u64at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&map[o..o + 8]);
            u64::from_le_bytes(b)
        };
        let version = u32at(8);
        if version != VERSION {
            return Err(bad(format!("format version {version}, this build reads {VERSION}")));
        }
        let hsize = u32at(12) as usize;
        if hsize != HEADER_SIZE {
            return Err(bad(format!("header size {hsize}")));
        }
        let mut sha = [0u8; 32];
        sha.copy_from_slice(&map[16..48]);
        let (eos, vocab, docs, tokens) = (u32at(48), u32at(52), u64at(56), u64at(64));
        let want = (HEADER_SIZE as u64)
            .checked_add(tokens.checked_mul(4).ok_or_else(|| bad("token count overflows".into()))?)
            .and_then(|x| x.checked_add(docs.checked_add(1)?.checked_mul(8)?))
            .ok_or_else(|| bad("sizes overflow".into()))?;
        if want != map.len() as u64 {
            return Err(bad(format!("{} bytes, header says {want} ({docs} documents, {tokens} tokens): truncated or corrupt", map.len())));
        }
        let s = Self { path: path.to_path_buf(), map, tokenizer_sha256: sha, eos, vocab_size: vocab, num_docs: docs, num_tokens: tokens };
        let mut prev = 0;
        for i in 0..=docs as usize {
            let o = s.offset(i);
            if o < prev || o > tokens || (i == 0 && o != 0) || (i == docs as usize && o != tokens) {
                return Err(bad(format!("document index entry {i} = {o} is out of order")));
            }
            prev = o;
        }
        Ok(s)
    }

    fn offset(&self, i: usize) -> u64 {
        let o = HEADER_SIZE + self.num_tokens as usize * 4 + i * 8;
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.map[o..o + 8]);
        u64::from_le_bytes(b)
    }

    /// Token `i` (panics never: out of range gives None).
    pub fn token(&self, i: u64) -> Option<u32> {
        if i >= self.num_tokens {
            return None;
        }
        let o = HEADER_SIZE + i as usize * 4;
        Some(u32::from_le_bytes([self.map[o], self.map[o + 1], self.map[o + 2], self.map[o + 3]]))
    }

    /// Tokens `[start, end)` copied out.
    pub fn tokens(&self, start: u64, end: u64) -> Vec<u32> {
        let end = end.min(self.num_tokens);
        (start.min(end)..end).filter_map(|i| self.token(i)).collect()
    }

    /// Document `i`'s tokens (ending with EOS).
    pub fn doc(&self, i: u64) -> Option<Vec<u32>> {
        if i >= self.num_docs {
            return None;
        }
        Some(self.tokens(self.offset(i as usize), self.offset(i as usize + 1)))
    }

    pub fn tokenizer_sha256_hex(&self) -> String {
        hex::encode(self.tokenizer_sha256)
    }
}

/// All `*.bin` shards under a directory (or the one file), sorted.
pub fn list_shards(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut v = Vec::new();
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let p = e.map_err(|e| Error::io(path, e))?.path();
        if p.extension().is_some_and(|x| x == "bin") {
            v.push(p);
        }
    }
    v.sort();
    Ok(v)
}
