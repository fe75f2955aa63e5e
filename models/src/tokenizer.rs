//! Tokenizers: `tokenizer.json` from a model directory, or one rebuilt from GGUF metadata.
//!
//! The GGUF path writes the same `tokenizer.json` document that Hugging Face would, then
//! loads it with the `tokenizers` crate; `hromada convert` writes that document to disk.
//! Two GGUF tokenizer models are supported:
//! - `gpt2`: byte-level BPE with `tokenizer.ggml.merges`; the pre-tokenizer follows
//!   `tokenizer.ggml.pre` (`smollm` splits every digit first, `llama-bpe` and `qwen2`
//!   use their own split regexes, everything else GPT-2's);
//! - `llama`: SentencePiece BPE with `tokenizer.ggml.scores`, byte fallback, and merges
//!   derived from the scores in the same order as transformers' converter.
use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_UNKNOWN: i32 = 2;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's pre-tokenization regex.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3's (`llama-bpe`).
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special-token facts the rest of the stack needs, in one place.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SpecialTokens {
    pub bos: Option<(u32, String)>,
    pub eos: Option<(u32, String)>,
    pub pad: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
    /// Extra ids that end generation (e.g. `<|im_end|>`, `<end_of_turn>`).
    pub extra_eos_ids: Vec<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
}

impl SpecialTokens {
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.eos.iter().map(|(id, _)| *id).collect();
        for id in &self.extra_eos_ids {
            if !v.contains(id) {
                v.push(*id);
            }
        }
        v
    }
}

/// A tokenizer plus its special tokens.
#[derive(Clone)]
pub struct Tokenizer {
    pub inner: tokenizers::Tokenizer,
    pub special: SpecialTokens,
    /// The tokenizer.json document (for `convert`) and tokenizer_config.json extras.
    pub json: Value,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("special", &self.special)
            .finish()
    }
}

impl Tokenizer {
    /// Encode text. `add_special_tokens` adds BOS/EOS as the model's post-processor says.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        // Ids only: `encode_fast` skips the offset bookkeeping (same ids, ~30% faster).
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encode text without special tokens, with each token's byte span in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<(usize, usize)>)> {
        let enc = self.inner.encode(text, false).map_err(|e| Error::Tokenize(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenize(e.to_string()))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    fn from_json(json: Value, special: SpecialTokens, origin: &Path) -> Result<Self> {
        let text = json.to_string();
        let inner: tokenizers::Tokenizer =
            text.parse().map_err(|e: tokenizers::Error| Error::Tokenizer {
                path: origin.to_path_buf(),
                msg: e.to_string(),
            })?;
        Ok(Self {
            inner,
            special,
            json,
        })
    }

    /// Load `tokenizer.json` (+ `tokenizer_config.json` for special tokens) from a directory.
    pub fn from_dir(dir: &Path, config_eos: &[u32], config_bos: Option<u32>) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::MissingFile {
                path,
                what: "the model directory has no tokenizer.json".into(),
            });
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: format!("invalid JSON: {e}"),
        })?;
        let inner: tokenizers::Tokenizer =
            text.parse().map_err(|e: tokenizers::Error| Error::Tokenizer {
                path: path.clone(),
                msg: e.to_string(),
            })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let t = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            serde_json::from_str(&t).map_err(|e| Error::Tokenizer {
                path: cfg_path.clone(),
                msg: format!("invalid JSON: {e}"),
            })?
        } else {
            Value::Null
        };
        let tok_str = |key: &str| -> Option<String> {
            match cfg.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                _ => None,
            }
        };
        let with_id = |s: Option<String>| s.and_then(|s| inner.token_to_id(&s).map(|id| (id, s)));
        let by_id = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id).map(|s| (id, s)));
        let bos = with_id(tok_str("bos_token")).or_else(|| by_id(config_bos));
        let eos = with_id(tok_str("eos_token")).or_else(|| by_id(config_eos.first().copied()));
        let pad = with_id(tok_str("pad_token"));
        let unk = with_id(tok_str("unk_token"));
        // Whether the post-processor adds BOS: encode the empty string and look.
        let add_bos = match (&bos, inner.encode("", true)) {
            (Some((id, _)), Ok(enc)) => enc.get_ids().first() == Some(id),
            _ => false,
        };
        let special = SpecialTokens {
            bos,
            eos,
            pad,
            unk,
            extra_eos_ids: config_eos.to_vec(),
            add_bos,
            add_eos: cfg.get("add_eos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        };
        Ok(Self {
            inner,
            special,
            json,
        })
    }

    /// Rebuild the tokenizer from GGUF metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = g.path().to_path_buf();
        let err = |msg: String| Error::Tokenizer {
            path: path.clone(),
            msg,
        };
        let model = g
            .opt_str("tokenizer.ggml.model")
            .ok_or_else(|| err("the GGUF has no `tokenizer.ggml.model`, so it carries no tokenizer".into()))?;
        let tokens = g.str_array("tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types = g.i32_array("tokenizer.ggml.token_type")?.unwrap_or_default();
        let ttype = |i: usize| types.get(i).copied().unwrap_or(TOKEN_TYPE_NORMAL);
        let id_of = |key: &str| -> Result<Option<u32>> {
            Ok(g.opt_u64(key)?.and_then(|v| if (v as usize) < n { Some(v as u32) } else { None }))
        };
        let bos_id = id_of("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_of("tokenizer.ggml.eos_token_id")?;
        let pad_id = id_of("tokenizer.ggml.padding_token_id")?;
        let unk_id = id_of("tokenizer.ggml.unknown_token_id")?;
        let eot_id = id_of("tokenizer.ggml.eot_token_id")?;
        let eom_id = id_of("tokenizer.ggml.eom_token_id")?;

        let mut added = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let ty = ttype(i);
            if ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED || ty == TOKEN_TYPE_UNKNOWN
            {
                let special = ty != TOKEN_TYPE_USER_DEFINED;
                added.push(json!({
                    "id": i, "content": t, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special,
                }));
            }
        }

        let add_bos_default;
        let (model_json, normalizer, pre_tokenizer, decoder) = match model.as_str() {
            "gpt2" => {
                add_bos_default = false;
                let merges = g.str_array("tokenizer.ggml.merges")?;
                let merges: Vec<Value> = merges
                    .iter()
                    .map(|m| match m.split_once(' ') {
                        Some((a, b)) => Ok(json!([a, b])),
                        None => Err(err(format!("malformed merge `{m}`"))),
                    })
                    .collect::<Result<_>>()?;
                let vocab: serde_json::Map<String, Value> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), json!(i)))
                    .collect();
                let pre = g.opt_str("tokenizer.ggml.pre").unwrap_or_else(|| "default".into());
                let byte_level = |use_regex: bool| {
                    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
                };
                let split = |pattern: &str| {
                    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
                };
                let pre_tok = match pre.as_str() {
                    "smollm" => json!({"type": "Sequence", "pretokenizers": [
                        {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
                    "llama-bpe" | "llama3" | "smaug-bpe" => json!({"type": "Sequence", "pretokenizers": [
                        split(LLAMA3_PATTERN), byte_level(false)]}),
                    "qwen2" | "deepseek-r1-qwen" => json!({"type": "Sequence", "pretokenizers": [
                        split(QWEN2_PATTERN), byte_level(false)]}),
                    "gpt2" | "default" | "gpt-2" => byte_level(true),
                    other => {
                        tracing::warn!(pre = other, "unknown GGUF pre-tokenizer; using GPT-2's regex");
                        json!({"type": "Sequence", "pretokenizers": [split(GPT2_PATTERN), byte_level(false)]})
                    }
                };
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": null,
                           "continuing_subword_prefix": null, "end_of_word_suffix": null,
                           "fuse_unk": false, "byte_fallback": false, "ignore_merges": pre.starts_with("llama"),
                           "vocab": vocab, "merges": merges}),
                    Value::Null,
                    pre_tok,
                    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true}),
                )
            }
            "llama" => {
                add_bos_default = true;
                let scores = g
                    .f32_array("tokenizer.ggml.scores")?
                    .ok_or_else(|| err("a `llama` tokenizer needs `tokenizer.ggml.scores`".into()))?;
                if scores.len() != n {
                    return Err(err(format!(
                        "{} scores for {} tokens",
                        scores.len(),
                        n
                    )));
                }
                let merges = match g.str_array("tokenizer.ggml.merges") {
                    Ok(m) => m
                        .iter()
                        .filter_map(|m| m.split_once(' ').map(|(a, b)| json!([a, b])))
                        .collect(),
                    Err(_) => spm_merges(&tokens, &scores),
                };
                let vocab: serde_json::Map<String, Value> = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.clone(), json!(i)))
                    .collect();
                let add_space_prefix = g.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
                let normalizer = if add_space_prefix {
                    json!({"type": "Sequence", "normalizers": [
                        {"type": "Prepend", "prepend": "\u{2581}"},
                        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]})
                } else {
                    json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})
                };
                let mut decoders = vec![
                    json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
                    json!({"type": "ByteFallback"}),
                    json!({"type": "Fuse"}),
                ];
                if add_space_prefix {
                    decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
                }
                let unk = unk_id.map(|i| tokens[i as usize].clone());
                (
                    json!({"type": "BPE", "dropout": null, "unk_token": unk,
                           "continuing_subword_prefix": null, "end_of_word_suffix": null,
                           "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                           "vocab": vocab, "merges": merges}),
                    normalizer,
                    Value::Null,
                    json!({"type": "Sequence", "decoders": decoders}),
                )
            }
            other => {
                return Err(err(format!(
                    "unsupported tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };

        let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(add_bos_default);
        let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);
        let name = |id: Option<u32>| id.map(|i| (i, tokens[i as usize].clone()));
        let bos = name(bos_id);
        let eos = name(eos_id);
        let post = post_processor(add_bos.then(|| bos.clone()).flatten(), add_eos.then(|| eos.clone()).flatten());
        let mut extra = Vec::new();
        for id in [eot_id, eom_id].into_iter().flatten() {
            extra.push(id);
        }
        // Chat models whose turn terminator is not the GGUF eos (ChatML, Gemma) stop on it too.
        for t in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(i) = tokens.iter().position(|x| x == t) {
                extra.push(i as u32);
            }
        }
        let json = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post,
            "decoder": decoder,
            "model": model_json,
        });
        let special = SpecialTokens {
            bos,
            eos,
            pad: name(pad_id),
            unk: name(unk_id),
            extra_eos_ids: extra,
            add_bos,
            add_eos,
        };
        Self::from_json(json, special, &path)
    }

    /// The `tokenizer_config.json` that goes with this tokenizer (for `convert`).
    pub fn tokenizer_config(&self, chat_template: Option<&str>, max_len: usize) -> Value {
        let s = |t: &Option<(u32, String)>| t.as_ref().map(|(_, s)| json!(s)).unwrap_or(Value::Null);
        let mut decoder = serde_json::Map::new();
        if let Some(added) = self.json.get("added_tokens").and_then(|v| v.as_array()) {
            for t in added {
                if let Some(id) = t.get("id") {
                    decoder.insert(id.to_string(), t.clone());
                }
            }
        }
        let mut cfg = json!({
            "add_bos_token": self.special.add_bos,
            "add_eos_token": self.special.add_eos,
            "added_tokens_decoder": decoder,
            "bos_token": s(&self.special.bos),
            "eos_token": s(&self.special.eos),
            "pad_token": s(&self.special.pad),
            "unk_token": s(&self.special.unk),
            "clean_up_tokenization_spaces": false,
            "model_max_length": max_len,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let (Some(t), Some(obj)) = (chat_template, cfg.as_object_mut()) {
            obj.insert("chat_template".into(), json!(t));
        }
        cfg
    }
}

fn post_processor(bos: Option<(u32, String)>, eos: Option<(u32, String)>) -> Value {
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = serde_json::Map::new();
    if let Some((id, s)) = &bos {
        single.push(json!({"SpecialToken": {"id": s, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": s, "type_id": 0}}));
        specials.insert(s.clone(), json!({"id": s, "ids": [id], "tokens": [s]}));
    }
    single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
    if let Some((id, s)) = &eos {
        single.push(json!({"SpecialToken": {"id": s, "type_id": 0}}));
        pair.push(json!({"SpecialToken": {"id": s, "type_id": 0}}));
        specials.insert(s.clone(), json!({"id": s, "ids": [id], "tokens": [s]}));
    }
    if let Some((_, s)) = &bos {
        pair.push(json!({"SpecialToken": {"id": s, "type_id": 1}}));
    }
    pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
    if let Some((_, s)) = &eos {
        pair.push(json!({"SpecialToken": {"id": s, "type_id": 1}}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

/// Merges of a SentencePiece BPE vocabulary, ordered as transformers' converter orders
/// them: every split of every piece into two pieces of the vocabulary, grouped per piece
/// by the ids of the halves, then (stably) by the piece's score, highest first.
fn spm_merges(tokens: &[String], scores: &[f32]) -> Vec<Value> {
    let ids: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let mut merges: Vec<(usize, usize, f32)> = Vec::new();
    for (piece, score) in tokens.iter().zip(scores) {
        let mut local = Vec::new();
        for (idx, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(idx);
            if let (Some(&il), Some(&ir)) = (ids.get(l), ids.get(r)) {
                local.push((il, ir, *score));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        merges.extend(local);
    }
    merges.sort_by(|a, b| b.2.partial_cmp(&a.2).unwrap_or(std::cmp::Ordering::Equal));
    merges
        .into_iter()
        .map(|(l, r, _)| json!([tokens[l], tokens[r]]))
        .collect()
}
