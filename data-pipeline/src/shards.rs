//! Token shards: the writer of the `tokenize` step. The format and its reader are
//! [`hromada_models::shards`] (the reader is shared with `train`).

use crate::error::{Error, Result};
use crate::write::tmp_path;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub use hromada_models::shards::{TokenShard, HEADER_SIZE, MAGIC, VERSION};

/// All `*.bin` shards under a directory (or the one file), sorted.
pub fn list_shards(path: &Path) -> Result<Vec<PathBuf>> {
    hromada_models::shards::list_shards(path).map_err(|e| Error::Other(e.to_string()))
}

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
