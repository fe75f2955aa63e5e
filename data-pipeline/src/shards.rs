//! Token shards: the one file format of hromada's own, written by the `tokenize` step and
//! read by `train`.
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
use crate::write::tmp_path;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"HRMDTOK1";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: usize = 96;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeConfig {
    /// A model directory, a GGUF file, a short name (smollm2-135m) or a cached Hub repo id.
    pub tokenizer: String,
    /// Prepend the tokenizer's BOS to every document (Llama-style pretraining).
    #[serde(default)]
    pub bos: bool,
    /// Override the EOS id written between documents (default: the tokenizer's EOS).
    #[serde(default)]
    pub eos_id: Option<u32>,
}

/// A tokenizer ready for sharding: the ids it writes and its fingerprint.
pub struct ShardTokenizer {
    pub tokenizer: hromada_models::tokenizer::Tokenizer,
    pub sha256: [u8; 32],
    pub eos: u32,
    pub bos: Option<u32>,
    pub vocab_size: u32,
}

impl ShardTokenizer {
    pub fn load(cfg: &TokenizeConfig) -> Result<Self> {
        let tokenizer = hromada_models::model::load_tokenizer(&cfg.tokenizer)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", cfg.tokenizer)))?;
        let sha256: [u8; 32] = Sha256::digest(tokenizer.json.to_string().as_bytes()).into();
        let eos = match cfg.eos_id.or_else(|| tokenizer.special.eos.as_ref().map(|e| e.0)).or_else(|| tokenizer.special.eos_ids().first().copied()) {
            Some(e) => e,
            None => return Err(Error::Tokenizer(format!("{}: the tokenizer has no EOS token; set tokenize.eos_id", cfg.tokenizer))),
        };
        let bos = if cfg.bos {
            Some(tokenizer.special.bos.as_ref().map(|b| b.0).ok_or_else(|| Error::Tokenizer(format!("{}: bos: true but the tokenizer has no BOS", cfg.tokenizer)))?)
        } else {
            None
        };
        let vocab_size = tokenizer.vocab_size() as u32;
        Ok(Self { tokenizer, sha256, eos, bos, vocab_size })
    }

    /// The document's tokens, with BOS (if configured) and the closing EOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if let Some(b) = self.bos {
            ids.push(b);
        }
        ids.extend(self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(e.to_string()))?);
        ids.push(self.eos);
        Ok(ids)
    }
}

pub struct ShardWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    index: Vec<u64>,
    tokens: u64,
    sha256: [u8; 32],
    eos: u32,
    vocab: u32,
}

fn header(sha: &[u8; 32], eos: u32, vocab: u32, docs: u64, tokens: u64) -> [u8; HEADER_SIZE] {
    let mut h = [0u8; HEADER_SIZE];
    h[0..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    h[16..48].copy_from_slice(sha);
    h[48..52].copy_from_slice(&eos.to_le_bytes());
    h[52..56].copy_from_slice(&vocab.to_le_bytes());
    h[56..64].copy_from_slice(&docs.to_le_bytes());
    h[64..72].copy_from_slice(&tokens.to_le_bytes());
    h
}

impl ShardWriter {
    pub fn create(path: &Path, tok: &ShardTokenizer) -> Result<Self> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let tmp = tmp_path(path);
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = BufWriter::with_capacity(1 << 20, f);
        out.write_all(&header(&tok.sha256, tok.eos, tok.vocab_size, 0, 0)).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self { path: path.to_path_buf(), tmp, out, index: vec![0], tokens: 0, sha256: tok.sha256, eos: tok.eos, vocab: tok.vocab_size })
    }

    pub fn add(&mut self, ids: &[u32]) -> Result<()> {
        let mut buf = Vec::with_capacity(ids.len() * 4);
        for id in ids {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        self.out.write_all(&buf).map_err(|e| Error::io(&self.tmp, e))?;
        self.tokens += ids.len() as u64;
        self.index.push(self.tokens);
        Ok(())
    }

    pub fn finish(mut self) -> Result<(PathBuf, u64, u64)> {
        let e = |err: std::io::Error| Error::io(&self.tmp, err);
        let mut buf = Vec::with_capacity(self.index.len() * 8);
        for o in &self.index {
            buf.extend_from_slice(&o.to_le_bytes());
        }
        self.out.write_all(&buf).map_err(e)?;
        let docs = self.index.len() as u64 - 1;
        let h = header(&self.sha256, self.eos, self.vocab, docs, self.tokens);
        self.out.seek(SeekFrom::Start(0)).map_err(e)?;
        self.out.write_all(&h).map_err(e)?;
        let f = self.out.into_inner().map_err(|err| Error::io(&self.tmp, err.into_error()))?;
        f.sync_all().map_err(|err| Error::io(&self.tmp, err))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|err| Error::io(&self.path, err))?;
        Ok((self.path, docs, self.tokens))
    }
}

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
        let bad = |m: String| Error::format(path, format!("not a valid token shard: {m}"));
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
