//! Sampling: greedy, temperature, top-k, top-p, min-p, repetition / frequency / presence
//! penalties, seeded and reproducible (same seed, same output), stop conditions.
//!
//! Order of operations (as vLLM): penalties on the raw logits, then temperature, then the
//! top-k, top-p and min-p filters, then a draw. Temperature 0 is greedy.
use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: f64,
    pub min_p: f64,
    /// HF/CTRL-style: logits of tokens seen (prompt and output) divided by it if positive,
    /// multiplied if negative. 1.0 disables.
    pub repetition_penalty: f64,
    /// OpenAI-style: subtract `frequency_penalty * count` of each output token.
    pub frequency_penalty: f64,
    /// OpenAI-style: subtract `presence_penalty` from every output token seen.
    pub presence_penalty: f64,
    pub seed: Option<u64>,
    pub max_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub stop: Vec<String>,
    /// Do not stop at the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// OpenAI's `logit_bias`: added to these tokens' logits (after the penalties) before
    /// the choice; log-probs stay those of the model.
    #[serde(default)]
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            max_tokens: 256,
            stop_token_ids: vec![],
            stop: vec![],
            ignore_eos: false,
            logit_bias: vec![],
        }
    }
}

impl SamplingParams {
    pub fn greedy(max_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Default::default()
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature < 1e-5 || self.top_k == Some(1)
    }

    /// Check ranges; the message names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(format!("temperature must be >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be >= 1 (or absent)".into());
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return bad(format!("frequency_penalty must be in [-2, 2], got {}", self.frequency_penalty));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return bad(format!("presence_penalty must be in [-2, 2], got {}", self.presence_penalty));
        }
        if self.stop.iter().any(|s| s.is_empty()) {
            return bad("stop strings must not be empty".into());
        }
        if let Some((id, b)) = self.logit_bias.iter().find(|(_, b)| !(-100.0..=100.0).contains(b)) {
            return bad(format!("logit_bias values must be in [-100, 100], got {b} for token {id}"));
        }
        Ok(())
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same stream on every
/// platform and crate version, so a seed always reproduces the same text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Self {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn from_entropy() -> Self {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self::new(t ^ (std::process::id() as u64).rotate_left(32))
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Per-sequence sampler state: params, RNG and token counts for the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// Tokens seen in the prompt (repetition penalty).
    prompt_tokens: Vec<u32>,
    /// Counts of generated tokens (frequency/presence penalties, repetition penalty).
    output_counts: HashMap<u32, u32>,
}

/// One sampled token with its log-probability under the processed distribution's
/// source logits (raw log-softmax, as OpenAI's `logprobs` report).
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    pub logprob: f32,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = match params.seed {
            Some(s) => Rng::new(s),
            None => Rng::from_entropy(),
        };
        let mut prompt_tokens = prompt.to_vec();
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        Self {
            params,
            rng,
            prompt_tokens,
            output_counts: HashMap::new(),
        }
    }

    /// Record a generated token (called by `sample`; also used when replaying output).
    pub fn observe(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
    }

    /// Apply the penalties to `logits` in place.
    pub fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty as f32;
            let mut apply = |t: u32| {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            };
            for &t in &self.prompt_tokens {
                apply(t);
            }
            for &t in self.output_counts.keys() {
                if self.prompt_tokens.binary_search(&t).is_err() {
                    apply(t);
                }
            }
        }
        if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= (p.frequency_penalty * c as f64 + p.presence_penalty) as f32;
                }
            }
        }
    }

    /// Pick the next token from raw logits (f32, vocabulary-sized).
    pub fn sample(&mut self, raw: &[f32]) -> Sampled {
        let p = &self.params;
        let penalised;
        let logits = if p.repetition_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 || !p.logit_bias.is_empty() {
            let mut l = raw.to_vec();
            self.apply_penalties(&mut l);
            for &(id, b) in &p.logit_bias {
                if let Some(x) = l.get_mut(id as usize) {
                    *x += b;
                }
            }
            penalised = l;
            &penalised[..]
        } else {
            raw
        };
        let token = if self.params.is_greedy() {
            argmax(logits)
        } else {
            self.draw(logits)
        };
        self.observe(token);
        Sampled {
            token,
            logprob: log_softmax_at(raw, token as usize),
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let (ids, w) = support(&self.params, logits);
        if ids.is_empty() {
            return argmax(logits);
        }
        let total: f64 = w.iter().map(|&x| x as f64).sum();
        let mut r = self.rng.next_f64() * total;
        for (&id, &x) in ids.iter().zip(&w) {
            if r < x as f64 {
                return id;
            }
            r -= x as f64;
        }
        ids[ids.len() - 1]
    }

    pub fn rng_state(&self) -> &Rng {
        &self.rng
    }
}

/// The tokens a draw may pick and their weights (unnormalised probabilities
/// `e^{(l − max)/T}`): the `top_k` largest logits; of those, the most probable ones whose
/// mass first reaches `top_p` of theirs; of those, the ones at least `min_p` times as
/// probable as the most probable. Ties in logit are broken by the lower id. The order of
/// the tokens depends only on the logits. Empty when no logit is finite, or one is `+inf`
/// (the caller then takes the argmax).
///
/// Linear in the vocabulary on average: one vectorised pass for the weights, a selection
/// for top-k and a selection by mass for top-p; nothing sorts the whole vocabulary.
/// Sorting it for every sampled token cost more than the model's forward pass at batch 1
/// (SmolLM2's 49,152 tokens: ~5 ms against ~4.5 ms).
fn support(p: &SamplingParams, logits: &[f32]) -> (Vec<u32>, Vec<f32>) {
    let max = crate::kernels::simd::max_f32(logits);
    if !max.is_finite() {
        return (vec![], vec![]);
    }
    let weights = crate::kernels::simd::softmax_weights(logits, max, (1.0 / p.temperature) as f32);
    let w = |i: u32| weights[i as usize];
    // The most probable token has weight e^0 = 1, so min-p keeps weights >= min_p.
    // Underflowed weights (0) can never be drawn.
    let min_w = p.min_p as f32;
    let ordered = p.top_p < 1.0 || p.top_k.is_some_and(|k| k < logits.len());
    if !ordered {
        let ids: Vec<u32> = (0..logits.len() as u32).filter(|&i| w(i) > 0.0 && w(i) >= min_w).collect();
        let kept = ids.iter().map(|&i| w(i)).collect();
        return (ids, kept);
    }
    // Selections run on packed keys, larger first: the logit's order-preserving bits,
    // then the inverted id (ties go to the lower id). Comparing plain u64s, not logits
    // looked up through ids, makes them several times faster.
    let key = |i: u32| -> u64 {
        let bits = (logits[i as usize] + 0.0).to_bits(); // -0.0 as 0.0
        let ord = if bits >> 31 == 1 { !bits } else { bits | 1 << 31 };
        (ord as u64) << 32 | (u32::MAX - i) as u64
    };
    let id = |k: &u64| u32::MAX - *k as u32;
    let desc = |a: &u64, b: &u64| b.cmp(a);
    // Top-p alone: the mass per power-of-two band of weight (bands 0..63: [2^-b, 2^(1-b)),
    // the last also everything smaller) says below which weight no token can be in the
    // top-p set, so a peaked distribution leaves a few hundred candidates, not 49,152.
    let (mut floor, mut target) = (0f32, None);
    if p.top_k.is_none() {
        let band = |x: f32| (127 - (x.to_bits() >> 23) as i32).clamp(0, 63) as usize;
        let mut mass = [0f64; 64];
        for &x in weights.iter().filter(|&&x| x > 0.0) {
            mass[band(x)] += x as f64;
        }
        let t = p.top_p * mass.iter().sum::<f64>();
        let mut acc = 0f64;
        if let Some(b) = mass.iter().position(|&m| {
            acc += m;
            acc >= t
        }) {
            floor = if b < 63 { (-(b as f32)).exp2() } else { 0.0 };
        }
        target = Some(t);
    }
    let mut keys: Vec<u64> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite() && w(i) >= floor).map(key).collect();
    if let Some(k) = p.top_k.filter(|&k| k < keys.len()) {
        keys.select_nth_unstable_by(k - 1, desc);
        keys.truncate(k);
    }
    // top-p's target is a share of the top-k set's mass, before min-p narrows it.
    let target = target.unwrap_or_else(|| p.top_p * keys.iter().map(|k| w(id(k)) as f64).sum::<f64>());
    if p.min_p > 0.0 {
        keys.retain(|k| w(id(k)) >= min_w);
    }
    if p.top_p < 1.0 {
        let j = top_mass(&mut keys, desc, |k| w(id(k)) as f64, target);
        keys.truncate(j);
    }
    let ids: Vec<u32> = keys.iter().map(id).filter(|&i| w(i) > 0.0).collect();
    let kept = ids.iter().map(|&i| w(i)).collect();
    (ids, kept)
}

/// How many of the largest of `keys` (in `order`) first reach `target` mass, those moved
/// to the front: a quickselect on the mass, linear on average where a sort of a flat
/// distribution's tens of thousands of candidates would not be. All of them when even
/// their total falls short.
fn top_mass<T>(keys: &mut [T], order: impl Fn(&T, &T) -> std::cmp::Ordering + Copy, w: impl Fn(&T) -> f64, target: f64) -> usize {
    let (mut lo, mut hi, mut before) = (0, keys.len(), 0f64);
    while hi - lo > 32 {
        // Split lo..hi at its median; the boundary is in the upper half if that half's
        // mass reaches the target, else in the lower half.
        let mid = lo + (hi - lo) / 2;
        keys[lo..hi].select_nth_unstable_by(mid - lo, order);
        let upper: f64 = keys[lo..=mid].iter().map(&w).sum();
        if before + upper >= target {
            hi = mid + 1;
        } else {
            before += upper;
            lo = mid + 1;
        }
    }
    keys[lo..hi].sort_unstable_by(order);
    let mut acc = before;
    for (j, k) in keys[lo..hi].iter().enumerate() {
        acc += w(k);
        if acc >= target {
            return lo + j + 1;
        }
    }
    hi
}

fn cmp_desc(a: f32, b: f32) -> std::cmp::Ordering {
    b.partial_cmp(&a).unwrap_or(std::cmp::Ordering::Equal)
}

/// Index of the largest value (the first one on ties, as torch.argmax).
pub fn argmax(v: &[f32]) -> u32 {
    // The first index holding the maximum (NaNs skipped; 0 when nothing exceeds -inf): the
    // maximum in SIMD, then its first position.
    let m = crate::kernels::simd::max_f32(v);
    if m == f32::NEG_INFINITY {
        return 0;
    }
    v.iter().position(|&x| x == m).unwrap_or(0) as u32
}

/// `log_softmax(v)[i]` (the normaliser summed in f64; SIMD exponentials).
pub fn log_softmax_at(v: &[f32], i: usize) -> f32 {
    let lse = crate::kernels::simd::log_sum_exp(v);
    (v.get(i).copied().unwrap_or(f32::NEG_INFINITY) as f64 - lse) as f32
}

/// The `n` largest entries as (id, log-prob), descending.
pub fn top_logprobs(v: &[f32], n: usize) -> Vec<(u32, f32)> {
    let lse = crate::kernels::simd::log_sum_exp(v);
    let mut idx: Vec<u32> = (0..v.len() as u32).collect();
    let n = n.min(idx.len());
    if n == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(n - 1, |&a, &b| cmp_desc(v[a as usize], v[b as usize]));
    idx.truncate(n);
    idx.sort_by(|&a, &b| cmp_desc(v[a as usize], v[b as usize]).then(a.cmp(&b)));
    idx.into_iter().map(|i| (i, (v[i as usize] as f64 - lse) as f32)).collect()
}

/// Stop-string matching over streamed text. Text that could still become a stop string
/// is held back, so a streamed response never shows part of a stop string.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    emitted: usize,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops, text: String::new(), emitted: 0 }
    }

    /// Add decoded text; returns (text safe to emit now, whether a stop string was hit).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        let search_from = self.emitted;
        self.text.push_str(piece);
        // Earliest stop string occurrence at or after what is not yet emitted.
        let mut hit: Option<usize> = None;
        for s in &self.stops {
            let from = search_from.saturating_sub(s.len());
            let from = (0..=from).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(0);
            if let Some(pos) = self.text[from..].find(s.as_str()) {
                let at = from + pos;
                hit = Some(hit.map_or(at, |h: usize| h.min(at)));
            }
        }
        if let Some(at) = hit {
            let at = at.max(self.emitted);
            let out = self.text[self.emitted..at].to_string();
            self.emitted = at;
            self.text.truncate(at);
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for (k, _) in s.char_indices().skip(1) {
                if k > hold && self.text.len() >= k && self.text.is_char_boundary(self.text.len() - k) && self.text.ends_with(&s[..k]) {
                    hold = k;
                }
            }
        }
        let safe_end = (self.text.len() - hold).max(self.emitted);
        let out = self.text[self.emitted..safe_end].to_string();
        self.emitted = safe_end;
        (out, false)
    }

    /// Emit what was held back (end of generation without a stop string).
    pub fn flush(&mut self) -> String {
        let out = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        out
    }

    /// All text kept so far (without any stop string).
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> SamplingParams {
        SamplingParams { temperature: 1.0, seed: Some(1), ..Default::default() }
    }

    fn counts(p: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(p, &[]);
        let mut c = vec![0; logits.len()];
        for _ in 0..n {
            // Fresh penalty state each draw: sample without observing.
            let t = s.draw(logits) as usize;
            c[t] += 1;
        }
        c
    }

    #[test]
    fn greedy_picks_argmax_and_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy(4), &[]);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]).token, 1);
    }

    #[test]
    fn logit_bias_moves_the_choice_not_the_logprob() {
        let logits = [1.0f32, 5.0, 2.0, 0.5];
        let greedy = |bias: Vec<(u32, f32)>| Sampler::new(SamplingParams { logit_bias: bias, ..SamplingParams::greedy(4) }, &[]).sample(&logits);
        assert_eq!(greedy(vec![]).token, 1);
        let s = greedy(vec![(3, 100.0)]);
        assert_eq!(s.token, 3);
        assert_eq!(s.logprob, log_softmax_at(&logits, 3), "the log-prob is the model's, unbiased");
        assert_eq!(greedy(vec![(1, -100.0)]).token, 2);
        // A token id past the row is ignored by the sampler (the server refuses it first).
        assert_eq!(greedy(vec![(99, 100.0)]).token, 1);
        // Sampled: a +100 bias takes all the mass.
        let p = SamplingParams { logit_bias: vec![(0, 100.0)], seed: Some(3), ..Default::default() };
        let mut s = Sampler::new(p.clone(), &[]);
        assert!((0..20).all(|_| s.sample(&logits).token == 0));
        assert!(SamplingParams { logit_bias: vec![(0, 101.0)], ..p }.validate().is_err());
    }

    /// The SIMD argmax picks what a first-wins scalar scan picks: ties, NaNs, `-inf`,
    /// lengths around the vector blocks, a vocabulary-sized row.
    #[test]
    fn argmax_matches_a_scalar_scan() {
        let scan = |v: &[f32]| {
            let (mut best, mut bv) = (0usize, f32::NEG_INFINITY);
            for (i, &x) in v.iter().enumerate() {
                if x > bv {
                    (best, bv) = (i, x);
                }
            }
            best as u32
        };
        let mut rng = Rng::new(17);
        for n in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 49_152] {
            let mut v: Vec<f32> = (0..n).map(|_| (rng.next_f64() * 8.0).floor() as f32).collect();
            if n > 3 {
                v[1] = f32::NAN;
                v[n - 1] = f32::NAN;
            }
            assert_eq!(argmax(&v), scan(&v), "n {n}");
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NEG_INFINITY]), 0);
        assert_eq!(argmax(&[-0.0, 0.0]), 0);
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { seed: Some(seed), ..params() }, &[]);
            (0..64).map(|_| s.sample(&logits).token).collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_support() {
        let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
        let c = counts(SamplingParams { top_k: Some(2), ..params() }, &logits, 2000);
        assert!(c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0), "{c:?}");
        // p = softmax: [0.636, 0.234, 0.086, 0.032, 0.012]; top_p 0.8 keeps two.
        let c = counts(SamplingParams { top_p: 0.8, ..params() }, &logits, 2000);
        assert!(c[0] > 0 && c[1] > 0 && c[2..].iter().all(|&x| x == 0), "{c:?}");
        // min_p 0.1: threshold 0.0636 keeps three.
        let c = counts(SamplingParams { min_p: 0.1, ..params() }, &logits, 4000);
        assert!(c[2] > 0 && c[3] == 0 && c[4] == 0, "{c:?}");
        // Frequencies follow the distribution (within a loose band).
        let c = counts(params(), &logits, 20000);
        let f0 = c[0] as f64 / 20000.0;
        assert!((f0 - 0.636).abs() < 0.02, "{f0}");
    }

    /// The support that sorting the whole vocabulary gives (the definition: top-k by
    /// logit, probabilities over those, the top-p prefix, then min-p against the first).
    fn support_by_full_sort(p: &SamplingParams, logits: &[f32]) -> Vec<u32> {
        let t = p.temperature as f32;
        let mut idx: Vec<u32> = (0..logits.len() as u32).filter(|&i| logits[i as usize].is_finite()).collect();
        idx.sort_by(|&a, &b| cmp_desc(logits[a as usize], logits[b as usize]).then(a.cmp(&b)));
        idx.truncate(p.top_k.unwrap_or(idx.len()));
        let max = logits[idx[0] as usize] / t;
        let probs: Vec<f64> = idx.iter().map(|&i| ((logits[i as usize] / t - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        let mut keep = idx.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            keep = probs.iter().position(|&x| {
                acc += x / sum;
                acc >= p.top_p
            }).map_or(keep, |j| j + 1);
        }
        if p.min_p > 0.0 {
            keep = keep.min(probs.iter().take_while(|&&x| x >= p.min_p * probs[0]).count());
        }
        // Tokens whose probability underflows can never be drawn.
        idx.truncate(keep);
        let top = logits[idx[0] as usize];
        idx.retain(|&i| (logits[i as usize] - top) / t >= -87.0);
        idx
    }

    /// On vocabulary-sized rows (peaked and flat, with -inf and NaN entries), every
    /// combination of the filters keeps exactly the tokens a full sort keeps, with
    /// positive weights.
    #[test]
    fn support_equals_the_full_sort() {
        let mut rng = Rng::new(21);
        for spread in [0.5f64, 4.0, 20.0] {
            let mut logits: Vec<f32> = (0..49_152).map(|_| ((rng.next_f64() - 0.5) * spread) as f32).collect();
            logits[7] = f32::NEG_INFINITY;
            logits[9] = f32::NAN;
            logits[11] = logits[12];
            for top_k in [None, Some(1), Some(40), Some(49_151)] {
                for top_p in [1.0, 0.95, 0.5, 1e-6] {
                    for min_p in [0.0, 0.05, 0.5] {
                        for temperature in [0.7, 1.0, 1.5] {
                            let p = SamplingParams { temperature, top_k, top_p, min_p, ..params() };
                            let (ids, w) = support(&p, &logits);
                            let want = support_by_full_sort(&p, &logits);
                            let (mut a, mut b) = (ids.clone(), want.clone());
                            a.sort_unstable();
                            b.sort_unstable();
                            assert_eq!(a, b, "spread {spread} {p:?}");
                            assert!(w.iter().all(|&x| x > 0.0 && x <= 1.0), "{p:?}");
                        }
                    }
                }
            }
        }
        // A +inf logit is certain; no finite logit leaves nothing to draw from.
        let mut s = Sampler::new(params(), &[]);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]).token, 1);
        assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::NAN]).token, 0);
    }

    #[test]
    fn low_temperature_sharpens() {
        let logits = [1.0f32, 0.5, 0.0];
        let hot = counts(SamplingParams { temperature: 2.0, ..params() }, &logits, 5000);
        let cold = counts(SamplingParams { temperature: 0.2, ..params() }, &logits, 5000);
        assert!(cold[0] > hot[0]);
    }

    #[test]
    fn penalties() {
        let p = SamplingParams { repetition_penalty: 2.0, ..params() };
        let s = Sampler::new(p, &[0, 1]);
        let mut l = vec![2.0f32, -2.0, 2.0];
        s.apply_penalties(&mut l);
        assert_eq!(l, vec![1.0, -4.0, 2.0]);
        let p = SamplingParams { frequency_penalty: 0.5, presence_penalty: 0.25, ..params() };
        let mut s = Sampler::new(p, &[2]);
        s.observe(0);
        s.observe(0);
        s.observe(1);
        let mut l = vec![1.0f32, 1.0, 1.0];
        s.apply_penalties(&mut l);
        assert_eq!(l, vec![1.0 - 1.0 - 0.25, 1.0 - 0.5 - 0.25, 1.0]);
    }

    #[test]
    fn validation_names_the_field() {
        for (p, field) in [
            (SamplingParams { temperature: -1.0, ..params() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..params() }, "top_p"),
            (SamplingParams { min_p: 2.0, ..params() }, "min_p"),
            (SamplingParams { top_k: Some(0), ..params() }, "top_k"),
            (SamplingParams { frequency_penalty: 3.0, ..params() }, "frequency_penalty"),
            (SamplingParams { repetition_penalty: 0.0, ..params() }, "repetition_penalty"),
            (SamplingParams { stop: vec![String::new()], ..params() }, "stop"),
        ] {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
        params().validate().unwrap();
    }

    #[test]
    fn stop_strings_hold_back_and_cut() {
        let mut s = StopStrings::new(vec!["</end>".into()]);
        assert_eq!(s.push("Hello </"), ("Hello ".to_string(), false));
        assert_eq!(s.push("en"), (String::new(), false));
        assert_eq!(s.push("d> more"), (String::new(), true));
        assert_eq!(s.text(), "Hello ");
        // A false alarm is released.
        let mut s = StopStrings::new(vec!["STOP".into()]);
        assert_eq!(s.push("ST"), (String::new(), false));
        assert_eq!(s.push("ay"), ("STay".to_string(), false));
        assert_eq!(s.push(" ST"), (" ".to_string(), false));
        assert_eq!(s.flush(), "ST");
        // Multibyte text and the earliest of several stops.
        let mut s = StopStrings::new(vec!["кінець".into(), "\n\n".into()]);
        let (out, hit) = s.push("Привіт\n\nі кінець");
        assert!(hit);
        assert_eq!(out, "Привіт");
    }

    #[test]
    fn top_logprobs_are_sorted_and_normalised() {
        let v = [0.0f32, 2.0, 1.0];
        let t = top_logprobs(&v, 2);
        assert_eq!(t.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2]);
        let total: f64 = v.iter().enumerate().map(|(i, _)| (log_softmax_at(&v, i) as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
