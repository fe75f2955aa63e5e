//! lingua's language model, evaluated faster: the same rules and the same n-gram
//! log-probabilities (lingua's own model files), with the n-gram lookups cached.
//!
//! lingua spends most of a call looking n-grams up in its finite-state-transducer
//! models, once per distinct n-gram per candidate language per text; a corpus repeats
//! the same few tens of thousands of Cyrillic trigrams over and over. This evaluator
//! follows lingua 1.8's `compute_language_confidence_values` step by step (word
//! splitting, the unique-character rule, the alphabet and character filters, trigrams
//! for texts of 120+ letters and 1- to 5-grams with lower-order fallback below that, the
//! unigram normalisation, the exponentiated sums and their ratio) and keeps each
//! resolved n-gram log-probability in a per-thread cache.
//!
//! It answers only when it is sure to give lingua's answer: every letter must be a
//! basic Latin (a-z) or a Cyrillic (U+0400-U+04FF) letter after lowercasing, the
//! detector must be in lingua's default mode, and the top two candidates must not be
//! within float rounding of each other (lingua sums in hash-set order, so its own result
//! is unstable there). Otherwise it returns `None` and the caller asks lingua. The
//! languages chosen are lingua's; confidence values agree to float rounding (tested
//! against lingua on the corpora in `tests/langid.rs`).
use std::cell::RefCell;
use std::collections::HashMap;

use lingua::Language;
use rustc_hash::{FxHashMap, FxHashSet};

/// The languages hromada builds lingua with, in one fixed order (cache slots).
const BUILT: [Language; 12] = [
    Language::Belarusian,
    Language::Bulgarian,
    Language::English,
    Language::French,
    Language::German,
    Language::Kazakh,
    Language::Macedonian,
    Language::Mongolian,
    Language::Polish,
    Language::Russian,
    Language::Serbian,
    Language::Ukrainian,
];

fn models_dir(l: Language) -> Option<&'static include_dir::Dir<'static>> {
    Some(match l {
        Language::Belarusian => &lingua_belarusian_language_model::BELARUSIAN_MODELS_DIRECTORY,
        Language::Bulgarian => &lingua_bulgarian_language_model::BULGARIAN_MODELS_DIRECTORY,
        Language::English => &lingua_english_language_model::ENGLISH_MODELS_DIRECTORY,
        Language::French => &lingua_french_language_model::FRENCH_MODELS_DIRECTORY,
        Language::German => &lingua_german_language_model::GERMAN_MODELS_DIRECTORY,
        Language::Kazakh => &lingua_kazakh_language_model::KAZAKH_MODELS_DIRECTORY,
        Language::Macedonian => &lingua_macedonian_language_model::MACEDONIAN_MODELS_DIRECTORY,
        Language::Mongolian => &lingua_mongolian_language_model::MONGOLIAN_MODELS_DIRECTORY,
        Language::Polish => &lingua_polish_language_model::POLISH_MODELS_DIRECTORY,
        Language::Russian => &lingua_russian_language_model::RUSSIAN_MODELS_DIRECTORY,
        Language::Serbian => &lingua_serbian_language_model::SERBIAN_MODELS_DIRECTORY,
        Language::Ukrainian => &lingua_ukrainian_language_model::UKRAINIAN_MODELS_DIRECTORY,
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

/// lingua's `Language::unique_characters` for the built languages.
fn unique_characters(l: Language) -> Option<&'static str> {
    match l {
        Language::German => Some("ß"),
        Language::Kazakh => Some("ӘәҒғҚқҢңҰұ"),
        Language::Macedonian => Some("ЃѓЅѕЌќЏџ"),
        Language::Polish => Some("ŁłŃńŚśŹź"),
        Language::Serbian => Some("ЂђЋћ"),
        Language::Ukrainian => Some("ҐґЄєЇї"),
        _ => None,
    }
}

fn is_cyrillic_language(l: Language) -> bool {
    matches!(
        l,
        Language::Belarusian | Language::Bulgarian | Language::Kazakh | Language::Macedonian | Language::Mongolian | Language::Russian | Language::Serbian | Language::Ukrainian
    )
}

/// lingua's `CHARS_TO_LANGUAGES_MAPPING` as it is built with hromada's features. In
/// lingua 1.8 every entry after "Õõ" sits inside that entry's `if` (Estonian, Hungarian,
/// Portuguese, Vietnamese), none of which is built here, so "Ôô", "ЁёЫыЭэ", "ЩщЪъ" and the
/// rest are never in lingua's map; this list reproduces the map lingua really uses
/// (checked against lingua's answers in `tests/langid.rs`).
const CHAR_GROUPS: [(&str, &[Language]); 11] = [
    ("ĄąĘę", &[Language::Polish]),
    ("Żż", &[Language::Polish]),
    ("Îî", &[Language::French]),
    ("ЈјЉљЊњ", &[Language::Macedonian, Language::Serbian]),
    ("Ûû", &[Language::French]),
    ("ӨөҮү", &[Language::Kazakh, Language::Mongolian]),
    ("Ćć", &[Language::Polish]),
    ("Іі", &[Language::Belarusian, Language::Kazakh, Language::Ukrainian]),
    ("Ëë", &[Language::French]),
    ("ÈèÙù", &[Language::French]),
    ("Êê", &[Language::French]),
];

/// A character this evaluator understands: a-z or a Cyrillic letter of U+0400-U+04FF.
fn safe_letter(c: char) -> bool {
    c.is_ascii_lowercase() || ('\u{400}'..='\u{481}').contains(&c) || ('\u{48A}'..='\u{4FF}').contains(&c)
}

/// An n-gram of up to five characters packed into one integer (length in the top bits).
fn pack(chars: &[char]) -> u128 {
    let mut k = chars.len() as u128;
    for &c in chars {
        k = (k << 21) | c as u128;
    }
    k
}

/// Per-thread cache: packed n-gram -> resolved log-probability per built language
/// (`NOT_LOOKED_UP` until asked; NaN when neither the n-gram nor any prefix is in the model).
type Cache = FxHashMap<u128, [f64; 12]>;
const NOT_LOOKED_UP: f64 = f64::INFINITY;

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(FxHashMap::default());
}

/// Bound on cached n-grams per thread (about 30 MB); the cache restarts beyond it.
const CACHE_LIMIT: usize = 1 << 18;

pub struct FastLingua {
    /// The detector's languages, sorted (lingua's order for ties).
    langs: Vec<Language>,
    /// Slot of each of `langs` in `BUILT`.
    slots: Vec<usize>,
    models: Vec<fst::Map<&'static [u8]>>,
    /// (language index, its unique characters).
    unique: Vec<(usize, &'static str)>,
    /// Character groups restricted to the detector's languages: (bits of the group's
    /// characters in `group_chars`, bit mask over `langs`).
    groups: Vec<(u64, u32)>,
    /// Every group character with its bit.
    group_chars: FxHashMap<char, u64>,
    cyrillic_mask: u32,
    latin_mask: u32,
}

/// What a text evaluates to.
#[derive(Debug, Clone, PartialEq)]
pub struct Confidences {
    /// Every detector language with its confidence, lingua's order (descending, ties by
    /// language).
    pub values: Vec<(Language, f64)>,
    /// Whether the top two are too close for a stable answer (lingua itself is unstable).
    fragile: bool,
}

impl FastLingua {
    /// None when a language has no model here (then the caller uses lingua alone).
    pub fn new(languages: &[Language]) -> Option<Self> {
        let mut langs = languages.to_vec();
        langs.sort();
        langs.dedup();
        if langs.len() > 32 {
            return None;
        }
        let mut slots = Vec::new();
        let mut models = Vec::new();
        for &l in &langs {
            slots.push(BUILT.iter().position(|&b| b == l)?);
            let file = models_dir(l)?.get_file("ngrams.fst")?;
            models.push(fst::Map::new(file.contents()).ok()?);
        }
        let bit = |l: Language| langs.iter().position(|&x| x == l).map_or(0, |i| 1u32 << i);
        let unique = langs.iter().enumerate().filter_map(|(i, &l)| unique_characters(l).map(|u| (i, u))).collect();
        let mut group_chars: FxHashMap<char, u64> = FxHashMap::default();
        let mut groups = Vec::new();
        for (chars, ls) in CHAR_GROUPS {
            let mut cbits = 0u64;
            for c in chars.chars() {
                let next = 1u64 << group_chars.len().min(63);
                let b = *group_chars.entry(c).or_insert(next);
                cbits |= b;
            }
            let mask = ls.iter().fold(0u32, |m, &l| m | bit(l));
            if mask != 0 {
                groups.push((cbits, mask));
            }
        }
        let cyrillic_mask = langs.iter().filter(|l| is_cyrillic_language(**l)).fold(0, |m, &l| m | bit(l));
        let latin_mask = langs.iter().filter(|l| !is_cyrillic_language(**l)).fold(0, |m, &l| m | bit(l));
        Some(Self { langs, slots, models, unique, groups, group_chars, cyrillic_mask, latin_mask })
    }

    /// lingua's `compute_language_confidence_values(text)`, or None when this evaluator
    /// cannot vouch for the answer (the caller then asks lingua).
    pub fn confidence_values(&self, text: &str) -> Option<Vec<(Language, f64)>> {
        let c = self.evaluate(text)?;
        (!c.fragile).then_some(c.values)
    }

    /// lingua's `detect_language_of(text)` (minimum relative distance 0), or None when the
    /// caller must ask lingua.
    pub fn detect_language_of(&self, text: &str) -> Option<Option<Language>> {
        let c = self.evaluate(text)?;
        let v = &c.values;
        let (top, p1) = *v.first()?;
        let p2 = v.get(1).map_or(0.0, |x| x.1);
        if c.fragile || ((p1 - p2).abs() - f64::EPSILON).abs() < 1e-12 {
            return None;
        }
        if v.len() == 1 {
            return Some((p1 != 0.0).then_some(top));
        }
        Some(((p1 - p2).abs() >= f64::EPSILON).then_some(top))
    }

    fn evaluate(&self, text: &str) -> Option<Confidences> {
        let words = split_words(text)?;
        let n = self.langs.len();
        let mut values: Vec<(Language, f64)> = self.langs.iter().map(|&l| (l, 0.0)).collect();
        let done = |mut values: Vec<(Language, f64)>, fragile: bool| {
            values.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            Some(Confidences { values, fragile })
        };
        if words.is_empty() {
            return done(values, false);
        }
        // 1. The unique-character rule.
        if let Some(i) = self.rule_language(&words) {
            values[i].1 = 1.0;
            return done(values, false);
        }
        // 2. The alphabet and character-group filter.
        let filtered = self.filter(&words);
        if filtered.count_ones() == 1 {
            values[filtered.trailing_zeros() as usize].1 = 1.0;
            return done(values, false);
        }
        // 3. n-gram log-probabilities.
        let character_count: usize = words.iter().map(|w| w.len()).sum();
        let orders: std::ops::Range<usize> = if character_count >= 120 { 3..4 } else { 1..6 };
        let mut sums: Vec<[Option<f64>; 32]> = Vec::new();
        let mut unigram_counts = [0usize; 32];
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.len() > CACHE_LIMIT {
                cache.clear();
            }
            let active: Vec<usize> = (0..n).filter(|&i| filtered & (1 << i) != 0).collect();
            for order in orders {
                if character_count < order {
                    continue;
                }
                // Distinct n-grams of this order, in order of first appearance.
                let mut seen: FxHashSet<u128> = FxHashSet::default();
                let mut per_lang = [None; 32];
                let mut acc = [0f64; 32];
                let mut found = [0usize; 32];
                for w in &words {
                    if w.len() < order {
                        continue;
                    }
                    for g in w.windows(order) {
                        let key = pack(g);
                        if !seen.insert(key) {
                            continue;
                        }
                        let e = cache.entry(key).or_insert([NOT_LOOKED_UP; 12]);
                        for &i in &active {
                            let slot = self.slots[i];
                            if e[slot] == NOT_LOOKED_UP {
                                e[slot] = self.look_up(i, g);
                            }
                            let p = e[slot];
                            if !p.is_nan() {
                                acc[i] += p;
                                found[i] += 1;
                            }
                        }
                    }
                }
                for &i in &active {
                    if order == 1 {
                        unigram_counts[i] = found[i];
                    }
                    if acc[i] < 0.0 {
                        per_lang[i] = Some(acc[i]);
                    }
                }
                sums.push(per_lang);
            }
        });
        // 4. lingua's `sum_up_probabilities` and `compute_confidence_values`.
        let mut probs: Vec<(usize, f64, f64)> = Vec::new(); // (lang, log sum, exp)
        for i in 0..n {
            if filtered & (1 << i) == 0 {
                continue;
            }
            let mut s: f64 = sums.iter().map(|m| m[i].unwrap_or(0.0)).sum();
            if unigram_counts[i] > 0 {
                s /= unigram_counts[i] as f64;
            }
            if s != 0.0 {
                probs.push((i, s, s.exp()));
            }
        }
        if probs.is_empty() {
            return done(values, false);
        }
        let denominator: f64 = probs.iter().map(|p| p.2).sum();
        if denominator == 0.0 {
            // Every exponential underflowed: lingua gives 1.0 to the best first-order sum.
            let first = sums.first()?;
            let mut ranked: Vec<(usize, f64)> = (0..n).filter_map(|i| first[i].map(|s| (i, s))).collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
            let (best, s1) = *ranked.first()?;
            let fragile = ranked.get(1).is_some_and(|&(_, s2)| (s1 - s2).abs() <= 1e-9 * s1.abs().max(1.0));
            values[best].1 = 1.0;
            return done(values, fragile);
        }
        for &(i, _, p) in &probs {
            values[i].1 = p / denominator;
        }
        // Near-equal top values: lingua's summation order decides, so ask lingua.
        let mut ranked: Vec<f64> = probs.iter().map(|p| p.2 / denominator).collect();
        ranked.sort_by(|a, b| b.total_cmp(a));
        let fragile = ranked.len() > 1 && (ranked[0] - ranked[1]).abs() <= 1e-9;
        done(values, fragile)
    }

    /// The log-probability lingua adds for n-gram `g` in language `i`: the first of `g` and
    /// its prefixes found in the model (NaN if none).
    fn look_up(&self, i: usize, g: &[char]) -> f64 {
        let mut buf = String::with_capacity(g.len() * 2);
        for len in (1..=g.len()).rev() {
            buf.clear();
            buf.extend(&g[..len]);
            if let Some(bits) = self.models[i].get(buf.as_bytes()) {
                return f64::from_bits(bits);
            }
        }
        f64::NAN
    }

    /// `detect_language_with_rules`: Some(language index) when the unique letters decide.
    fn rule_language(&self, words: &[Vec<char>]) -> Option<usize> {
        let mut unknown = 0usize;
        let mut counts: HashMap<usize, usize> = HashMap::new();
        for w in words {
            let mut per = [0usize; 32];
            let mut any = false;
            for &c in w {
                for &(i, u) in &self.unique {
                    if u.contains(c) {
                        per[i] += 1;
                        any = true;
                    }
                }
            }
            if !any {
                unknown += 1;
                continue;
            }
            let mut ranked: Vec<(usize, usize)> = per.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| (i, c)).collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1));
            if ranked.len() == 1 || ranked[0].1 > ranked[1].1 {
                *counts.entry(ranked[0].0).or_default() += 1;
            } else {
                unknown += 1;
            }
        }
        let half = words.len() as f64 * 0.5;
        // `None` is a key like the languages unless fewer than half the words are unknown.
        let mut total: Vec<(Option<usize>, usize)> = counts.into_iter().map(|(i, c)| (Some(i), c)).collect();
        if unknown > 0 && (unknown as f64) >= half {
            total.push((None, unknown));
        }
        match total.len() {
            0 => None,
            1 => total[0].0,
            _ => {
                total.sort_by(|a, b| b.1.cmp(&a.1));
                if total[0].1 == total[1].1 {
                    None
                } else {
                    total[0].0
                }
            }
        }
    }

    /// `filter_languages_by_rules` as a bit mask over `langs`.
    fn filter(&self, words: &[Vec<char>]) -> u32 {
        let all = (1u32 << self.langs.len()) - 1;
        let (mut cyr, mut lat) = (0usize, 0usize);
        for w in words {
            if w.iter().all(|c| c.is_ascii_lowercase()) {
                lat += w.len();
            } else if w.iter().all(|c| !c.is_ascii_lowercase()) {
                cyr += w.len();
            }
        }
        let alphabet_mask = match (cyr > 0, lat > 0) {
            (false, false) => return all,
            (true, true) if cyr == lat => return all,
            (true, true) if lat > cyr => self.latin_mask,
            (true, _) => self.cyrillic_mask,
            (false, true) => self.latin_mask,
        };
        let half = words.len() as f64 * 0.5;
        let mut counts = [0usize; 32];
        for w in words {
            // Which group characters the word contains (each counts once per word).
            let present = w.iter().fold(0u64, |m, c| m | self.group_chars.get(c).copied().unwrap_or(0));
            if present == 0 {
                continue;
            }
            for &(cbits, mask) in &self.groups {
                let relevant = mask & alphabet_mask;
                let hits = (present & cbits).count_ones() as usize;
                if relevant == 0 || hits == 0 {
                    continue;
                }
                for (i, c) in counts.iter_mut().enumerate() {
                    if relevant & (1 << i) != 0 {
                        *c += hits;
                    }
                }
            }
        }
        let subset = (0..self.langs.len()).filter(|&i| counts[i] > 0 && counts[i] as f64 >= half).fold(0u32, |m, i| m | (1 << i));
        if subset != 0 {
            subset
        } else {
            alphabet_mask
        }
    }
}

/// lingua's words: maximal runs of letters of the lowercased text. None when a letter is
/// outside what this evaluator understands.
fn split_words(text: &str) -> Option<Vec<Vec<char>>> {
    let mut words = Vec::new();
    let mut cur: Vec<char> = Vec::new();
    for c in text.chars() {
        if !c.is_alphabetic() {
            if !cur.is_empty() {
                words.push(std::mem::take(&mut cur));
            }
            continue;
        }
        let mut lower = c.to_lowercase();
        let (Some(l), None) = (lower.next(), lower.next()) else { return None };
        if !safe_letter(l) {
            return None;
        }
        cur.push(l);
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    Some(words)
}
