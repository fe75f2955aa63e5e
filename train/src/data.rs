//! Training data: chat SFT samples from JSONL, continued-pretraining documents from token
//! shards, both packed into rows of at most `seq_len` tokens.
//!
//! A row holds whole samples one after another; each sample is its own attention
//! segment (positions restart at 0, no token attends across samples), as the model's
//! [`Segments`](hromada_models::cache::Segments) context computes it. Labels are the
//! next token inside the same sample, or [`IGNORE`] where no loss is taken (prompt
//! tokens in SFT, the last token of every sample).
use std::io::BufRead;
use std::path::Path;

use hromada_models::chat::Message;
use hromada_models::sampling::Rng;
use hromada_models::LoadedModel;
use serde_json::Value;

use crate::error::{Error, Result};

pub const IGNORE: u32 = u32::MAX;

/// One sample: its tokens and, per position, the label (next token) or [`IGNORE`].
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub ids: Vec<u32>,
    pub labels: Vec<u32>,
}

impl Sample {
    /// Positions with a loss.
    pub fn n_targets(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }

    /// From ids and a per-token "is trained" mask: token `i+1` is a target of position `i`
    /// when it is trained.
    pub fn from_mask(ids: Vec<u32>, trained: &[bool]) -> Self {
        let n = ids.len();
        let labels = (0..n).map(|i| if i + 1 < n && trained[i + 1] { ids[i + 1] } else { IGNORE }).collect();
        Self { ids, labels }
    }
}

/// A packed row: samples in order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub samples: Vec<Sample>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.samples.iter().map(|s| s.ids.len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
    pub fn n_targets(&self) -> usize {
        self.samples.iter().map(|s| s.n_targets()).sum()
    }
}

/// What building the dataset did, for the log and the run's summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DataStats {
    pub samples: usize,
    pub truncated: usize,
    pub skipped_no_target: usize,
    pub rows: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

/// One SFT record as messages: `{"messages": [...]}` or `{"prompt", "completion"}`
/// (a string each, made a user and an assistant turn; a prompt may also be a message list).
fn record_messages(v: &Value) -> std::result::Result<Vec<Message>, String> {
    if let Some(m) = v.get("messages") {
        let msgs: Vec<Message> = serde_json::from_value(m.clone()).map_err(|e| format!("`messages`: {e}"))?;
        if msgs.is_empty() {
            return Err("`messages` is empty".into());
        }
        return Ok(msgs);
    }
    match (v.get("prompt"), v.get("completion")) {
        (Some(p), Some(Value::String(c))) => {
            let mut msgs = match p {
                Value::String(s) => vec![Message::new("user", s)],
                Value::Array(_) => serde_json::from_value(p.clone()).map_err(|e| format!("`prompt`: {e}"))?,
                _ => return Err("`prompt` must be a string or a message list".into()),
            };
            msgs.push(Message::new("assistant", c));
            Ok(msgs)
        }
        _ => Err("a record needs `messages`, or `prompt` and `completion` (string)".into()),
    }
}

/// Tokenize a conversation with the model's chat template; the trained tokens are those
/// the template renders for assistant turns (their text and end-of-turn marker), found by
/// rendering each prefix of the conversation.
pub fn tokenize_chat(m: &LoadedModel, msgs: &[Message], assistant_only: bool) -> std::result::Result<(Vec<u32>, Vec<bool>), String> {
    let full = m.render_chat(msgs, false).map_err(|e| e.to_string())?;
    let mut spans: Vec<(usize, usize)> = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        if msg.role != "assistant" {
            continue;
        }
        let before = m.render_chat(&msgs[..i], true).map_err(|e| e.to_string())?;
        let upto = m.render_chat(&msgs[..=i], false).map_err(|e| e.to_string())?;
        if !upto.starts_with(&before) || !full.starts_with(&upto) {
            return Err("the chat template does not render conversations prefix by prefix; cannot find assistant tokens (set data.assistant_only_loss = false)".into());
        }
        spans.push((before.len(), upto.len()));
    }
    if assistant_only && spans.is_empty() {
        return Err("no assistant message to train on".into());
    }
    let (ids, offsets) = m.tokenizer.encode_with_offsets(&full).map_err(|e| e.to_string())?;
    let trained = offsets
        .iter()
        .map(|&(s, _)| !assistant_only || spans.iter().any(|&(a, b)| s >= a && s < b))
        .collect();
    Ok((ids, trained))
}

/// Read an SFT JSONL file into samples (truncated to `seq_len`). A line that is not a
/// valid record is an error naming the file and line.
pub fn load_sft(m: &LoadedModel, path: &Path, seq_len: usize, assistant_only: bool, max_samples: usize, stats: &mut DataStats) -> Result<Vec<Sample>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| Error::data(path, i + 1, format!("invalid JSON: {e}")))?;
        let msgs = record_messages(&v).map_err(|e| Error::data(path, i + 1, e))?;
        let (mut ids, mut trained) = tokenize_chat(m, &msgs, assistant_only).map_err(|e| Error::data(path, i + 1, e))?;
        if ids.len() > seq_len {
            ids.truncate(seq_len);
            trained.truncate(seq_len);
            stats.truncated += 1;
        }
        let s = Sample::from_mask(ids, &trained);
        if s.n_targets() == 0 {
            stats.skipped_no_target += 1;
            continue;
        }
        out.push(s);
        if max_samples > 0 && out.len() >= max_samples {
            break;
        }
    }
    stats.samples += out.len();
    Ok(out)
}

/// Documents of token shards as pretraining samples: every token is a target; documents
/// longer than `seq_len` are cut into `seq_len` pieces.
pub fn load_shards(path: &Path, vocab_size: usize, seq_len: usize, max_samples: usize, stats: &mut DataStats) -> Result<Vec<Sample>> {
    let shards = hromada_models::shards::list_shards(path)?;
    if shards.is_empty() {
        return Err(Error::data(path, 0, "no token shards (*.bin) here"));
    }
    let mut out = Vec::new();
    'outer: for p in shards {
        let s = hromada_models::shards::TokenShard::open(&p)?;
        if s.vocab_size as usize > vocab_size {
            return Err(Error::data(&p, 0, format!("shard vocabulary {} is larger than the model's {vocab_size}: tokenized for another model?", s.vocab_size)));
        }
        for d in 0..s.num_docs {
            let Some(doc) = s.doc(d) else { continue };
            if doc.len() > seq_len {
                stats.truncated += 1;
            }
            for chunk in doc.chunks(seq_len) {
                if chunk.len() < 2 {
                    continue;
                }
                out.push(Sample::from_mask(chunk.to_vec(), &vec![true; chunk.len()]));
                if max_samples > 0 && out.len() >= max_samples {
                    break 'outer;
                }
            }
        }
    }
    stats.samples += out.len();
    Ok(out)
}

/// Fisher-Yates with hromada's seeded RNG.
pub fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut rng = Rng::new(seed);
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Greedy packing in order: a sample goes into the current row if it fits, else starts
/// a new row. Without packing every sample is its own row.
pub fn pack(samples: Vec<Sample>, seq_len: usize, packing: bool) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut cur = Row::default();
    for s in samples {
        if !cur.is_empty() && (!packing || cur.len() + s.ids.len() > seq_len) {
            rows.push(std::mem::take(&mut cur));
        }
        cur.samples.push(s);
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    rows
}

/// Split off the validation samples: the last `fraction` of a seeded shuffle (at least
/// one sample when the fraction is positive and there are two or more).
pub fn split(mut samples: Vec<Sample>, fraction: f64, seed: u64) -> (Vec<Sample>, Vec<Sample>) {
    shuffle(&mut samples, seed ^ 0x5EED_0F_5711);
    let n = samples.len();
    let mut k = (n as f64 * fraction).round() as usize;
    if fraction > 0.0 && k == 0 && n >= 2 {
        k = 1;
    }
    let val = samples.split_off(n - k.min(n));
    (samples, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_mask() {
        let s = Sample::from_mask(vec![1, 2, 3, 4], &[false, false, true, true]);
        assert_eq!(s.labels, vec![IGNORE, 3, 4, IGNORE]);
        assert_eq!(s.n_targets(), 2);
    }

    #[test]
    fn packing_never_exceeds_seq_len_and_keeps_order() {
        let mk = |n: usize, t: u32| Sample::from_mask(vec![t; n], &vec![true; n]);
        let rows = pack(vec![mk(3, 1), mk(4, 2), mk(2, 3), mk(6, 4)], 8, true);
        assert_eq!(rows.iter().map(|r| r.len()).collect::<Vec<_>>(), vec![7, 8]);
        assert!(rows.iter().all(|r| r.len() <= 8));
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.samples.iter().map(|s| s.ids[0])).collect();
        assert_eq!(flat, vec![1, 2, 3, 4]);
        assert_eq!(pack(vec![mk(3, 1), mk(4, 2)], 8, false).len(), 2);
    }

    #[test]
    fn split_is_seeded_and_disjoint() {
        let mk = |t: u32| Sample::from_mask(vec![t, t], &[true, true]);
        let all: Vec<Sample> = (0..20).map(mk).collect();
        let (a, b) = split(all.clone(), 0.2, 1);
        let (a2, b2) = split(all, 0.2, 1);
        assert_eq!((a.len(), b.len()), (16, 4));
        assert_eq!((a.clone(), b.clone()), (a2, b2));
        assert!(b.iter().all(|s| !a.contains(s)));
    }
}
