//! Heuristic quality filters: our own Rust port of the semantics of datatrove's
//! `GopherRepetitionFilter`, `FineWebQualityFilter` and `GopherQualityFilter`, with the
//! FineWeb-2 thresholds for Ukrainian (`configs/ukr_Cyrl.yml`) as defaults.
//!
//! The three groups run in FineWeb-2's order (repetition, FineWeb, Gopher quality), and
//! inside a group the rules run in datatrove's order; the first rule that fails names the
//! drop reason, with datatrove's reason tags (`dup_line_frac`, `top_2_gram`,
//! `duplicated_5_n_grams`, `line_punct_ratio`, `gopher_short_doc`, ...).
//!
//! Where datatrove treats a threshold as "off" when it is falsy (`None` or `0`), so do we:
//! `null` or `0` in the config disables that rule.
//!
//! Line and whitespace handling follow Python exactly: `str.splitlines()` for the Gopher
//! quality rules, `re.split("\n+")` for duplicate lines, `re.split("\n{2,}")` on the
//! stripped text for paragraphs, `str.split("\n")` without blank lines for FineWeb, and
//! lengths in code points.
//!
//! Words. datatrove splits words with spaCy's blank `uk` tokenizer, which also returns
//! punctuation marks as tokens; the FineWeb-2 thresholds were tuned on those counts, so
//! [`split_words`] keeps punctuation tokens too. It is a linear-time re-implementation of
//! the main spaCy rules (split on whitespace; peel spaCy's prefix and suffix characters;
//! split spaCy's infixes; units after a number; the `uk` and base exceptions such as
//! "вул.", "м.", "8)"). It differs from spaCy on purpose in one way: a hyphen between
//! letters stays inside the word ("будь-який", "ІТ-технологій", "рок-н-рол" are one word;
//! spaCy makes three tokens of each, so such texts have fewer tokens here and a slightly
//! higher share of alphabetic words; `split_hyphenated_words: true` restores spaCy's
//! split). Like spaCy, apostrophes (', ’, ʼ) inside a word stay, "2016-й" is one token
//! and "27-28" three. Smaller known differences: spaCy's URL matcher (we keep only
//! `scheme://...` and `www....` whole), emoticons merged across more than two tokens,
//! and the exact set of symbols counted as icons.
//!
//! Repeated n-grams are compared by the sequence of word ids (datatrove joins the words
//! without a separator for `duplicated_*_n_grams`, so "ab c" and "a bc" would match there
//! and not here) through a 64-bit hash; a collision has a chance of about 2^-64 per pair.

use crate::stats::StepStats;
use crate::steps::{Step, Verdict};
use crate::Document;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::OnceLock;

/// Thresholds of the three groups. Field names are datatrove's parameter names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QualityConfig {
    /// Run the `GopherRepetitionFilter` rules.
    pub gopher_repetition: bool,
    /// Run the `FineWebQualityFilter` rules.
    pub fineweb: bool,
    /// Run the `GopherQualityFilter` rules.
    pub gopher_quality: bool,

    // --- GopherRepetitionFilter ---
    /// Max share of lines (split on runs of `\n`) that repeat an earlier line.
    pub dup_line_frac: Option<f64>,
    /// Max share of paragraphs (split on `\n\n+`) that repeat an earlier one.
    pub dup_para_frac: Option<f64>,
    /// Max share of characters in repeated lines.
    pub dup_line_char_frac: Option<f64>,
    /// Max share of characters in repeated paragraphs.
    pub dup_para_char_frac: Option<f64>,
    /// `[n, max]`: the most frequent n-gram, count times its length (words joined by a
    /// space), over the text length must stay at or below `max`.
    pub top_n_grams: Vec<(usize, f64)>,
    /// `[n, max]`: characters of the words covered by repeated n-grams (non-overlapping,
    /// as datatrove counts them) over the text length must stay at or below `max`.
    pub dup_n_grams: Vec<(usize, f64)>,

    // --- FineWebQualityFilter ---
    /// Min share of non-blank lines that end with a stop character.
    pub line_punct_thr: f64,
    /// Do not drop a document where no line ends with a stop character.
    pub line_punct_exclude_zero: bool,
    /// Line endings that count as punctuation; `None`: datatrove's `TERMINAL_PUNCTUATION`.
    pub stop_chars: Option<Vec<String>>,
    /// Max share of non-blank lines of at most `short_line_length` characters.
    pub short_line_thr: f64,
    pub short_line_length: usize,
    /// Max share of characters (newlines not counted) in repeated non-blank lines.
    pub char_duplicates_ratio: f64,
    /// Max newlines per word.
    pub new_line_ratio: f64,

    // --- GopherQualityFilter ---
    /// Bounds on the number of words that are not only punctuation.
    pub min_doc_words: Option<usize>,
    pub max_doc_words: Option<usize>,
    /// Bounds on the mean length of those words.
    pub min_avg_word_length: Option<f64>,
    pub max_avg_word_length: Option<f64>,
    /// Max `#` per word, and max ellipses (`...`, `…`) per word.
    pub max_symbol_word_ratio: Option<f64>,
    /// Max share of lines starting with `•` or `-`.
    pub max_bullet_lines_ratio: Option<f64>,
    /// Max share of lines ending with `...` or `…`.
    pub max_ellipsis_lines_ratio: Option<f64>,
    /// Despite the name (datatrove's), the MIN share of words with an alphabetic character.
    pub max_non_alpha_words_ratio: Option<f64>,
    /// Min number of distinct stop words present (case-sensitive, as datatrove).
    pub min_stop_words: Option<usize>,
    pub stop_words: Vec<String>,

    // --- words (not a datatrove parameter) ---
    /// Split "будь-який" into "будь", "-", "який" as spaCy (and so datatrove) does. Off by
    /// default: a hyphenated Ukrainian word is one word. On, the decisions match
    /// datatrove's exactly on our parity set.
    pub split_hyphenated_words: bool,
}

/// FineWeb-2's stop words for ukr_Cyrl.
pub const UKRAINIAN_STOP_WORDS: [&str; 10] = ["у", "в", "на", "і", "з", "та", "до", "року", "за", "що"];

impl Default for QualityConfig {
    /// FineWeb-2 ukr_Cyrl thresholds where FineWeb-2 tuned them, datatrove's defaults for
    /// the rest (FineWeb-2 itself also switched some of those off, see
    /// [`QualityConfig::fineweb2_pipeline`]).
    fn default() -> Self {
        Self {
            gopher_repetition: true,
            fineweb: true,
            gopher_quality: true,
            dup_line_frac: Some(0.333),
            dup_para_frac: Some(0.3),
            dup_line_char_frac: Some(0.2),
            dup_para_char_frac: Some(0.2),
            top_n_grams: vec![(2, 0.086), (3, 0.108), (4, 0.129)],
            dup_n_grams: vec![(5, 0.176), (6, 0.157), (7, 0.139), (8, 0.125), (9, 0.113), (10, 0.102)],
            line_punct_thr: 0.308,
            line_punct_exclude_zero: false,
            stop_chars: None,
            short_line_thr: 0.67,
            short_line_length: 30,
            char_duplicates_ratio: 0.01,
            new_line_ratio: 0.211,
            min_doc_words: Some(50),
            max_doc_words: Some(100_000),
            min_avg_word_length: Some(3.0),
            max_avg_word_length: Some(11.0),
            max_symbol_word_ratio: Some(0.1),
            max_bullet_lines_ratio: Some(0.9),
            max_ellipsis_lines_ratio: Some(0.3),
            max_non_alpha_words_ratio: Some(0.694),
            min_stop_words: Some(2),
            stop_words: UKRAINIAN_STOP_WORDS.iter().map(|s| s.to_string()).collect(),
            split_hyphenated_words: false,
        }
    }
}

impl QualityConfig {
    /// Exactly what FineWeb-2's `fineweb-2-pipeline.py` ran for ukr_Cyrl: the defaults,
    /// but with the paragraph and line-character repetition rules off
    /// (`dup_para_frac=0, dup_line_char_frac=0, dup_para_char_frac=0`), the short-line
    /// rule off (`short_line_thr=999`) and `char_duplicates_ratio=0.1`.
    pub fn fineweb2_pipeline() -> Self {
        Self {
            dup_para_frac: None,
            dup_line_char_frac: None,
            dup_para_char_frac: None,
            short_line_thr: 999.0,
            char_duplicates_ratio: 0.1,
            ..Self::default()
        }
    }
}

/// Document features measured on every document (also the dropped ones).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct QualityFeatures {
    /// Tokens of the word splitter, punctuation included (datatrove's `n_words`).
    pub tokens: usize,
    /// Tokens that are not only punctuation (what `min_doc_words` counts).
    pub words: usize,
    /// Mean length in characters of those words (0 when there are none).
    pub mean_word_length: f64,
    /// Share of tokens with an alphabetic character.
    pub alpha_words_ratio: f64,
    /// Share of lines that repeat an earlier line.
    pub dup_line_frac: f64,
    /// Share of non-blank lines ending with a stop character.
    pub line_punct_ratio: f64,
}

/// The quality step.
pub struct Quality {
    cfg: QualityConfig,
    stop_words: HashSet<String, FxBuild>,
    top_reasons: Vec<String>,
    dup_reasons: Vec<String>,
}

impl Quality {
    pub fn new(cfg: &QualityConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            stop_words: cfg.stop_words.iter().cloned().collect(),
            top_reasons: cfg.top_n_grams.iter().map(|(n, _)| format!("top_{n}_gram")).collect(),
            dup_reasons: cfg
                .dup_n_grams
                .iter()
                .map(|(n, _)| format!("duplicated_{n}_n_grams"))
                .collect(),
        }
    }

    pub fn config(&self) -> &QualityConfig {
        &self.cfg
    }

    /// Measure `text` and run the rules: the features, or the first failing rule's reason
    /// with the features.
    pub fn check(&self, text: &str) -> Result<QualityFeatures, (String, QualityFeatures)> {
        let words = Words::new(text, self.cfg.split_hyphenated_words);
        let rep_lines = newline_runs_split(text);
        let (line_dups, line_dup_chars) = find_duplicates(rep_lines.iter().copied());
        let fw_lines: Vec<&str> = text.split('\n').filter(|l| !py_strip(l).is_empty()).collect();
        let punct_lines = fw_lines.iter().filter(|l| self.ends_with_stop_char(l)).count();

        let feats = QualityFeatures {
            tokens: words.ids.len(),
            words: words.non_symbol,
            mean_word_length: if words.non_symbol > 0 {
                words.non_symbol_chars as f64 / words.non_symbol as f64
            } else {
                0.0
            },
            alpha_words_ratio: ratio(words.alpha, words.ids.len()),
            dup_line_frac: ratio(line_dups, rep_lines.len()),
            line_punct_ratio: ratio(punct_lines, fw_lines.len()),
        };
        let text_chars = nchars(text);
        let ctx = Ctx {
            text,
            text_chars,
            words: &words,
            rep_lines: &rep_lines,
            line_dups,
            line_dup_chars,
            fw_lines: &fw_lines,
            punct_lines,
        };
        let reason = (if self.cfg.gopher_repetition {
            self.repetition(&ctx)
        } else {
            None
        })
        .or_else(|| if self.cfg.fineweb { self.fineweb(&ctx) } else { None })
        .or_else(|| {
            if self.cfg.gopher_quality {
                self.gopher_quality(&ctx)
            } else {
                None
            }
        });
        match reason {
            None => Ok(feats),
            Some(r) => Err((r, feats)),
        }
    }

    fn ends_with_stop_char(&self, line: &str) -> bool {
        match &self.cfg.stop_chars {
            Some(list) => list.iter().any(|s| line.ends_with(s.as_str())),
            None => line.chars().next_back().is_some_and(is_terminal_punct),
        }
    }

    /// GopherRepetitionFilter.
    fn repetition(&self, c: &Ctx) -> Option<String> {
        let cfg = &self.cfg;
        if c.text.is_empty() {
            return Some("empty".into());
        }
        let para_frac = on(cfg.dup_para_frac);
        let para_char_frac = on(cfg.dup_para_char_frac);
        if para_frac.is_some() || para_char_frac.is_some() {
            let paras = paragraphs(py_strip(c.text));
            let (dups, dup_chars) = find_duplicates(paras.iter().copied());
            if para_frac.is_some_and(|f| ratio(dups, paras.len()) > f) {
                return Some("dup_para_frac".into());
            }
            if para_char_frac.is_some_and(|f| ratio(dup_chars, c.text_chars) > f) {
                return Some("dup_para_char_frac".into());
            }
        }
        if on(cfg.dup_line_frac).is_some_and(|f| ratio(c.line_dups, c.rep_lines.len()) > f) {
            return Some("dup_line_frac".into());
        }
        if on(cfg.dup_line_char_frac).is_some_and(|f| ratio(c.line_dup_chars, c.text_chars) > f) {
            return Some("dup_line_char_frac".into());
        }
        // one table each, reused by every n
        let mut counts: HashMap<u64, (u32, u32), IdBuild> = HashMap::default();
        let mut seen: HashSet<u64, IdBuild> = HashSet::default();
        for (i, &(n, frac)) in cfg.top_n_grams.iter().enumerate() {
            if let Some(chars) = top_ngram_chars(c.words, n, &mut counts) {
                if ratio(chars, c.text_chars) > frac {
                    return Some(self.top_reasons[i].clone());
                }
            }
        }
        for (i, &(n, frac)) in cfg.dup_n_grams.iter().enumerate() {
            // Stop counting as soon as the document is over the limit.
            let limit = (frac * c.text_chars as f64).floor();
            let limit = if limit.is_finite() && limit >= 0.0 {
                limit as usize
            } else {
                usize::MAX
            };
            let chars = dup_ngram_chars(c.words, n, limit, &mut seen);
            if ratio(chars, c.text_chars) > frac {
                return Some(self.dup_reasons[i].clone());
            }
        }
        None
    }

    /// FineWebQualityFilter.
    fn fineweb(&self, c: &Ctx) -> Option<String> {
        let cfg = &self.cfg;
        let n = c.fw_lines.len();
        if n == 0 {
            return Some("empty".into());
        }
        let r = ratio(c.punct_lines, n);
        if r < cfg.line_punct_thr && !(r == 0.0 && cfg.line_punct_exclude_zero) {
            return Some("line_punct_ratio".into());
        }
        let short = c.fw_lines.iter().filter(|l| nchars(l) <= cfg.short_line_length).count();
        if ratio(short, n) > cfg.short_line_thr {
            return Some("short_line_ratio".into());
        }
        let (_, dup_chars) = find_duplicates(c.fw_lines.iter().copied());
        let newlines = c.text.bytes().filter(|&b| b == b'\n').count();
        if ratio(dup_chars, c.text_chars - newlines) > cfg.char_duplicates_ratio {
            return Some("char_dup_ratio".into());
        }
        if ratio(newlines, c.words.ids.len()) > cfg.new_line_ratio {
            return Some("list_ratio".into());
        }
        None
    }

    /// GopherQualityFilter.
    fn gopher_quality(&self, c: &Ctx) -> Option<String> {
        let cfg = &self.cfg;
        let w = c.words;
        let n_words = w.ids.len();
        if on_n(cfg.min_doc_words).is_some_and(|m| w.non_symbol < m) {
            return Some("gopher_short_doc".into());
        }
        if on_n(cfg.max_doc_words).is_some_and(|m| w.non_symbol > m) {
            return Some("gopher_long_doc".into());
        }
        // NaN (no words) fails no comparison, as numpy's mean of nothing in datatrove.
        let avg = w.non_symbol_chars as f64 / w.non_symbol as f64;
        if on(cfg.min_avg_word_length).is_some_and(|m| avg < m) {
            return Some("gopher_below_avg_threshold".into());
        }
        if on(cfg.max_avg_word_length).is_some_and(|m| avg > m) {
            return Some("gopher_above_avg_threshold".into());
        }
        if let Some(m) = on(cfg.max_symbol_word_ratio) {
            let hashes = c.text.bytes().filter(|&b| b == b'#').count();
            if ratio_nan(hashes, n_words) > m {
                return Some("gopher_too_many_hashes".into());
            }
            let ellipses = c.text.matches("...").count() + c.text.matches('…').count();
            if ratio_nan(ellipses, n_words) > m {
                return Some("gopher_too_many_ellipsis".into());
            }
        }
        let bullet_max = on(cfg.max_bullet_lines_ratio);
        let ellipsis_max = on(cfg.max_ellipsis_lines_ratio);
        if bullet_max.is_some() || ellipsis_max.is_some() {
            let (mut lines, mut bullets, mut ellipsis_ends) = (0usize, 0usize, 0usize);
            for_each_py_line(c.text, |l| {
                lines += 1;
                let s = py_lstrip(l);
                if s.starts_with('•') || s.starts_with('-') {
                    bullets += 1;
                }
                let e = py_rstrip(l);
                if e.ends_with("...") || e.ends_with('…') {
                    ellipsis_ends += 1;
                }
            });
            if bullet_max.is_some_and(|m| ratio_nan(bullets, lines) > m) {
                return Some("gopher_too_many_bullets".into());
            }
            if ellipsis_max.is_some_and(|m| ratio_nan(ellipsis_ends, lines) > m) {
                return Some("gopher_too_many_end_ellipsis".into());
            }
        }
        if on(cfg.max_non_alpha_words_ratio).is_some_and(|m| ratio_nan(w.alpha, n_words) < m) {
            return Some("gopher_below_alpha_threshold".into());
        }
        if let Some(m) = on_n(cfg.min_stop_words) {
            let mut found = 0usize;
            for u in &w.uniq {
                if self.stop_words.contains(u.text) {
                    found += 1;
                    if found >= m {
                        break;
                    }
                }
            }
            if found < m {
                return Some("gopher_enough_stop_words".into());
            }
        }
        None
    }
}

impl Step for Quality {
    fn name(&self) -> &str {
        "quality"
    }

    fn apply(&self, doc: &mut Document, stats: &mut StepStats) -> Verdict {
        let (feats, verdict) = match self.check(&doc.text) {
            Ok(f) => (f, Verdict::Keep),
            Err((reason, f)) => (f, Verdict::Drop(reason)),
        };
        stats.observe("words", feats.words as f64, (1.0, 1e6, 40, true));
        stats.observe("mean_word_length", feats.mean_word_length, (0.0, 20.0, 40, false));
        stats.observe("dup_line_frac", feats.dup_line_frac, (0.0, 1.0, 20, false));
        stats.observe("line_punct_ratio", feats.line_punct_ratio, (0.0, 1.0, 20, false));
        stats.observe("alpha_words_ratio", feats.alpha_words_ratio, (0.0, 1.0, 20, false));
        verdict
    }
}

/// What the rules need, measured once.
struct Ctx<'a, 'w> {
    text: &'a str,
    text_chars: usize,
    words: &'w Words<'a>,
    rep_lines: &'w [&'a str],
    line_dups: usize,
    line_dup_chars: usize,
    fw_lines: &'w [&'a str],
    punct_lines: usize,
}

/// A threshold that datatrove would treat as set (`if self.x and ...`).
fn on(x: Option<f64>) -> Option<f64> {
    x.filter(|v| *v != 0.0)
}

fn on_n(x: Option<usize>) -> Option<usize> {
    x.filter(|v| *v != 0)
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// `a / b` with float semantics: NaN (fails every comparison) or inf when `b` is 0.
/// Python raises there; such a document cannot reach these rules with the defaults.
fn ratio_nan(a: usize, b: usize) -> f64 {
    a as f64 / b as f64
}

// ---------------------------------------------------------------------------------------
// Words

/// The document's tokens as ids into its distinct tokens.
struct Words<'a> {
    ids: Vec<u32>,
    uniq: Vec<Uniq<'a>>,
    /// Tokens with a character outside datatrove's `PUNCTUATION_SET`.
    non_symbol: usize,
    non_symbol_chars: usize,
    /// Tokens with an alphabetic character.
    alpha: usize,
}

struct Uniq<'a> {
    text: &'a str,
    chars: u32,
    non_symbol: bool,
    alpha: bool,
}

impl<'a> Words<'a> {
    fn new(text: &'a str, split_hyphens: bool) -> Self {
        let mut index: HashMap<&'a str, u32, FxBuild> =
            HashMap::with_capacity_and_hasher(text.len() / 64, Default::default());
        let mut uniq: Vec<Uniq<'a>> = Vec::new();
        let mut ids = Vec::with_capacity(text.len() / 6);
        for_each_token(text, split_hyphens, |t| {
            let id = *index.entry(t).or_insert_with(|| {
                uniq.push(Uniq {
                    text: t,
                    chars: nchars(t).min(u32::MAX as usize) as u32,
                    non_symbol: t.chars().any(|c| !is_punctuation(c)),
                    alpha: t.chars().any(char::is_alphabetic),
                });
                (uniq.len() - 1) as u32
            });
            ids.push(id);
        });
        let (mut non_symbol, mut non_symbol_chars, mut alpha) = (0, 0, 0);
        for &id in &ids {
            let u = &uniq[id as usize];
            if u.non_symbol {
                non_symbol += 1;
                non_symbol_chars += u.chars as usize;
            }
            alpha += u.alpha as usize;
        }
        Self {
            ids,
            uniq,
            non_symbol,
            non_symbol_chars,
            alpha,
        }
    }

    fn chars(&self, window: &[u32]) -> usize {
        window.iter().map(|&id| self.uniq[id as usize].chars as usize).sum()
    }
}

/// Split text into words and punctuation tokens as the quality rules count them (see the
/// module comment for how this differs from datatrove's spaCy tokenizer).
pub fn split_words(text: &str) -> Vec<&str> {
    split_words_with(text, false)
}

/// [`split_words`], optionally splitting hyphenated words as spaCy does.
pub fn split_words_with(text: &str, split_hyphens: bool) -> Vec<&str> {
    let mut out = Vec::new();
    for_each_token(text, split_hyphens, |t| out.push(t));
    out
}

/// Whole tokens that are never split: the keys of spaCy's `uk` tokenizer exceptions
/// (abbreviations, single letters with a period, emoticons), generated from spaCy 3.8;
/// "°C." and the like are handled in `split_chunk`.
#[rustfmt::skip]
const SPECIALS: &[&str] = &[
    "'", "''", "(*_*)", "(-8", "(-:", "(-;", "(-_-)", "(._.)", "(:", "(;", "(=", "(>_<)", "(^_^)", "(o:",
    "(¬_¬)", "(ಠ_ಠ)", "(╯°□°）╯︵┻━┻", ")-:", "):", "-_-", "-__-", "._.", "0.0", "0.o", "0_0", "0_o", "8)",
    "8-)", "8-D", "8D", ":'(", ":')", ":'-(", ":'-)", ":(", ":((", ":(((", ":()", ":)", ":))", ":)))", ":*",
    ":-(", ":-((", ":-(((", ":-)", ":-))", ":-)))", ":-*", ":-/", ":-0", ":-3", ":->", ":-D", ":-O", ":-P",
    ":-X", ":-]", ":-o", ":-p", ":-x", ":-|", ":-}", ":/", ":0", ":1", ":3", ":>", ":D", ":O", ":P", ":X",
    ":]", ":o", ":o)", ":p", ":x", ":|", ":}", ":’(", ":’)", ":’-(", ":’-)", ";)", ";-)", ";-D", ";D", ";_;",
    "<.<", "</3", "<3", "<33", "<333", "<space>", "=(", "=)", "=/", "=3", "=D", "=[", "=]", "=|", ">.<",
    ">.>", ">:(", ">:o", "><(((*>", "@_@", "C++", "O.O", "O.o", "O_O", "O_o", "V.V", "V_V", "XD", "XDD",
    "[-:", "[:", "[=", "\\\")", "\\n", "\\t", "]=", "^_^", "^__^", "^___^", "a.", "b.", "c.", "d.", "e.",
    "f.", "g.", "h.", "i.", "j.", "k.", "l.", "m.", "n.", "o.", "o.0", "o.O", "o.o", "o_0", "o_O", "o_o",
    "p.", "q.", "r.", "s.", "t.", "u.", "v.", "v.v", "v_v", "w.", "x.", "xD", "xDD", "y.", "z.", "¯\\(ツ)/¯",
    "ä.", "ö.", "ü.", "акад.", "бул.", "в/м", "в/ч", "вул.", "г.", "доц.", "ж/м", "м.", "майд.", "мкр.",
    "наб.", "обл.", "оз.", "п.", "пл.", "пр-кт", "пров.", "просп.", "проф.", "р-н", "р-н.", "ст.", "ім.",
    "ಠ_ಠ", "ಠ︵ಠ", "—", "’", "’’",
];

fn is_special(s: &str) -> bool {
    static SET: OnceLock<HashSet<&'static str, FxBuild>> = OnceLock::new();
    // every special has ASCII punctuation or starts with one of these (a fast pre-check)
    s.len() <= 32
        && (s.bytes().any(|b| b.is_ascii_punctuation()) || s.starts_with(['—', '’', 'ಠ']))
        && SET.get_or_init(|| SPECIALS.iter().copied().collect()).contains(s)
}

/// spaCy's units, split off a number they follow ("5км" -> "5", "км").
#[rustfmt::skip]
const UNITS: &[&str] = &[
    "km", "km²", "km³", "m", "m²", "m³", "dm", "dm²", "dm³", "cm", "cm²", "cm³", "mm", "mm²", "mm³", "ha",
    "µm", "nm", "yd", "in", "ft", "kg", "g", "mg", "µg", "t", "lb", "oz", "m/s", "km/h", "kmh", "mph", "hPa",
    "Pa", "mbar", "mb", "MB", "kb", "KB", "gb", "GB", "tb", "TB", "T", "G", "M", "K", "км", "км²", "км³", "м",
    "м²", "м³", "дм", "дм²", "дм³", "см", "см²", "см³", "мм", "мм²", "мм³", "нм", "кг", "г", "мг", "м/с",
    "км/ч", "кПа", "Па", "мбар", "Кб", "КБ", "кб", "Мб", "МБ", "мб", "Гб", "ГБ", "гб", "Тб", "ТБ", "тб",
];

/// The length of the longest unit that ends `core` right after a digit.
fn unit_suffix_len(core: &str) -> usize {
    // a unit is at most 8 bytes long ("мбар") and follows a digit
    let tail = &core.as_bytes()[core.len().saturating_sub(9)..];
    if !tail.iter().any(u8::is_ascii_digit) {
        return 0;
    }
    let mut best = 0;
    for u in UNITS {
        if u.len() > best
            && core.len() > u.len()
            && core.ends_with(u)
            && core[..core.len() - u.len()].ends_with(|c: char| c.is_ascii_digit())
        {
            best = u.len();
        }
    }
    best
}

fn for_each_token<'a>(text: &'a str, split_hyphens: bool, mut emit: impl FnMut(&'a str)) {
    for chunk in text.split(py_isspace) {
        if !chunk.is_empty() {
            split_chunk(chunk, split_hyphens, &mut emit);
        }
    }
}

/// Length of the punctuation token at the start of `s` (a run of periods is one token).
fn punct_token_len(s: &str) -> usize {
    if s.starts_with("..") {
        s.bytes().take_while(|&b| b == b'.').count()
    } else {
        s.chars().next().map_or(0, char::len_utf8)
    }
}

fn split_chunk<'a>(chunk: &'a str, split_hyphens: bool, emit: &mut impl FnMut(&'a str)) {
    // Prefixes: spaCy's prefix characters in front, one token each ("..." is one).
    let mut s = chunk;
    if is_special(s) {
        emit(s);
        return;
    }
    while let Some(c) = s.chars().next() {
        if let Some(unit) = s.strip_prefix('°').and_then(|r| r.strip_suffix('.')) {
            if matches!(unit, "C" | "F" | "K" | "c" | "f" | "k") {
                // spaCy's exception "°C." -> "°", "C", "."
                emit(&s[..2]);
                emit(&s[2..3]);
                emit(&s[3..]);
                return;
            }
        }
        let prefix = s.starts_with("..")
            || (c == '+' && !s[1..].chars().next().is_some_and(|d| d.is_ascii_digit()))
            || matches!(c, '§' | '%' | '=' | '—' | '–' | '…')
            || is_affix_punct(c)
            || is_currency(c)
            || is_icon(c);
        if !prefix {
            break;
        }
        let n = punct_token_len(s);
        emit(&s[..n]);
        s = &s[n..];
        if is_special(s) {
            emit(s);
            return;
        }
    }
    if s.is_empty() {
        return;
    }
    // Suffixes, peeled from the end as spaCy does (the first character always stays).
    // Multi-character suffix tokens other than "..." (units, 's) are remembered here.
    let mut multi: [(usize, usize); 4] = [(usize::MAX, 0); 4];
    let mut n_multi = 0;
    let first = s.chars().next().map_or(0, char::len_utf8);
    let mut end = s.len();
    while end > first {
        let core = &s[..end];
        if end < s.len() && is_special(core) {
            break;
        }
        let mut back = core.chars().rev();
        let Some(c) = back.next() else { break };
        let p = back.next();
        let pp = back.next();
        let peel = if c == '.' {
            if core.ends_with("..") {
                core.bytes().rev().take_while(|&b| b == b'.').count().min(end - first)
            } else {
                // after a lowercase letter, digit, %, ², -, +, punctuation or a quote,
                // after two capitals ("США."), after °C; not after one capital ("Т.")
                let after = p.is_some_and(|p| {
                    p.is_lowercase()
                        || p.is_ascii_digit()
                        || matches!(p, '%' | '²' | '-' | '+' | '.')
                        || is_affix_punct(p)
                        || (p.is_uppercase() && pp.is_some_and(char::is_uppercase))
                        || (matches!(p, 'C' | 'c' | 'F' | 'f' | 'K' | 'k') && pp == Some('°'))
                });
                if after {
                    1
                } else {
                    0
                }
            }
        } else if matches!(c, '—' | '–' | '…')
            || is_affix_punct(c)
            || is_icon(c)
            || ((matches!(c, '+' | '%') || is_currency(c)) && p.is_some_and(|p| p.is_ascii_digit()))
        {
            c.len_utf8()
        } else {
            let n = if ["'s", "'S", "’s", "’S"].iter().any(|x| core.ends_with(x)) {
                c.len_utf8() + p.map_or(0, char::len_utf8)
            } else {
                unit_suffix_len(core)
            };
            if n > 0 && end - n >= first && n_multi < multi.len() {
                multi[n_multi] = (end - n, end);
                n_multi += 1;
                n
            } else {
                0
            }
        };
        if peel == 0 {
            break;
        }
        end -= peel;
    }
    split_infixes(&s[..end], split_hyphens, emit);
    let mut i = end;
    while i < s.len() {
        let n = match multi[..n_multi].iter().find(|m| m.0 == i) {
            Some(m) => m.1 - m.0,
            // two punctuation tokens that make an emoticon are merged, as spaCy does ("):")
            None if s.len() >= i + 2 && s.is_char_boundary(i + 2) && is_special(&s[i..i + 2]) => 2,
            None => punct_token_len(&s[i..]),
        };
        emit(&s[i..i + n]);
        i += n;
    }
}

/// spaCy's `LIST_PUNCT` and `LIST_QUOTES` (single characters): peeled off both ends.
#[rustfmt::skip]
fn is_affix_punct(c: char) -> bool {
    matches!(
        c,
        ',' | ':' | ';' | '!' | '?' | '¿' | '؟' | '¡' | '(' | ')' | '[' | ']' | '{' | '}' | '<' | '>' | '_' | '#'
            | '*' | '&' | '。' | '？' | '！' | '，' | '、' | '；' | '：' | '～' | '·' | '।' | '،' | '۔' | '؛' | '٪'
            | '\'' | '"' | '”' | '“' | '`' | '‘' | '´' | '’' | '‚' | '„' | '»' | '«' | '「' | '」' | '『'
            | '』' | '（' | '）' | '〔' | '〕' | '【' | '】' | '《' | '》' | '〈' | '〉' | '⟦' | '⟧'
    )
}

fn is_currency(c: char) -> bool {
    matches!(c, '$' | '£' | '€' | '¥' | '฿' | '﷼' | '\u{20a0}'..='\u{20bf}')
}

/// Roughly spaCy's `LIST_ICONS`, the symbols of category So: №, ©, °, arrows, technical
/// symbols, box drawing, shapes, dingbats, emoji (not the math operators ≤ − ∙).
fn is_icon(c: char) -> bool {
    matches!(c,
        '\u{a6}' | '\u{a9}' | '\u{ae}' | '\u{b0}' | '\u{2116}' | '\u{2117}' | '\u{2122}' | '\u{2190}'..='\u{21ff}'
        | '\u{2300}'..='\u{23ff}' | '\u{2500}'..='\u{27bf}' | '\u{2b00}'..='\u{2bff}' | '\u{1f000}'..='\u{1faff}')
}

fn split_infixes<'a>(core: &'a str, split_hyphens: bool, emit: &mut impl FnMut(&'a str)) {
    if core.contains("://") || core.starts_with("www.") || is_special(core) {
        emit(core); // a URL or an exception is one token
        return;
    }
    let (mut i, mut tok) = (0usize, 0usize);
    let mut prev: Option<char> = None;
    while i < core.len() {
        let rest = &core[i..];
        let Some(c) = rest.chars().next() else { break };
        let next = rest[c.len_utf8()..].chars().next();
        let sep = infix_len(prev, c, next, rest, split_hyphens);
        if sep > 0 {
            if tok < i {
                emit(&core[tok..i]);
            }
            emit(&core[i..i + sep]);
            i += sep;
            tok = i;
            prev = core[..i].chars().next_back();
        } else {
            prev = Some(c);
            i += c.len_utf8();
        }
    }
    if tok < core.len() {
        emit(&core[tok..]);
    }
}

/// Length of the infix separator starting at `rest` (0: none), after spaCy's infixes,
/// except that a hyphen between letters is kept inside the word unless `split_hyphens`.
fn infix_len(prev: Option<char>, c: char, next: Option<char>, rest: &str, split_hyphens: bool) -> usize {
    if rest.starts_with("..") {
        return punct_token_len(rest);
    }
    if c == '…' || is_icon(c) {
        return c.len_utf8();
    }
    let (Some(p), Some(n)) = (prev, next) else { return 0 };
    let split = match c {
        '-' if n == '-' && p.is_alphabetic() => {
            // "--" between letters is a dash
            let run = rest.bytes().take_while(|&b| b == b'-').count();
            return if rest[run..].chars().next().is_some_and(char::is_alphabetic) {
                run
            } else {
                0
            };
        }
        '-' if split_hyphens && p.is_alphabetic() && n.is_alphabetic() => true,
        // a range of numbers, "27-28", is three tokens (as spaCy)
        '+' | '*' | '^' | '-' => p.is_ascii_digit() && (n.is_ascii_digit() || n == '-'),
        '.' => p.is_lowercase() && n.is_uppercase(),
        ',' => p.is_alphabetic() && n.is_alphabetic(),
        '–' | '—' | '~' => p.is_alphabetic() && n.is_alphabetic(),
        ':' | '<' | '>' | '=' | '/' => p.is_alphanumeric() && n.is_alphabetic(),
        _ => false,
    };
    if split {
        c.len_utf8()
    } else {
        0
    }
}

// ---------------------------------------------------------------------------------------
// Lines, paragraphs, duplicates, n-grams

/// `len(s)` in Python: code points.
fn nchars(s: &str) -> usize {
    s.bytes().filter(|&b| (b & 0xC0) != 0x80).count()
}

/// Python's `str.isspace()`.
fn py_isspace(c: char) -> bool {
    c.is_whitespace() || matches!(c, '\u{1c}'..='\u{1f}')
}

fn py_strip(s: &str) -> &str {
    s.trim_matches(py_isspace)
}

fn py_lstrip(s: &str) -> &str {
    s.trim_start_matches(py_isspace)
}

fn py_rstrip(s: &str) -> &str {
    s.trim_end_matches(py_isspace)
}

/// Python's `str.splitlines()` (no keepends).
fn for_each_py_line<'a>(text: &'a str, mut f: impl FnMut(&'a str)) {
    let mut start = 0;
    let mut it = text.char_indices().peekable();
    while let Some((i, c)) = it.next() {
        if matches!(
            c,
            '\n' | '\r' | '\u{b}' | '\u{c}' | '\u{1c}' | '\u{1d}' | '\u{1e}' | '\u{85}' | '\u{2028}' | '\u{2029}'
        ) {
            f(&text[start..i]);
            let mut end = i + c.len_utf8();
            if c == '\r' && it.peek().is_some_and(|&(_, d)| d == '\n') {
                it.next();
                end += 1;
            }
            start = end;
        }
    }
    if start < text.len() {
        f(&text[start..]);
    }
}

/// `re.split("\n+", text)`: empty pieces only at the two ends.
fn newline_runs_split(text: &str) -> Vec<&str> {
    let pieces: Vec<&str> = text.split('\n').collect();
    let last = pieces.len() - 1;
    pieces
        .into_iter()
        .enumerate()
        .filter(|(i, p)| !p.is_empty() || *i == 0 || *i == last)
        .map(|(_, p)| p)
        .collect()
}

/// `re.split("\n{2,}", text)`.
fn paragraphs(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        if b[i] == b'\n' {
            let run = b[i..].iter().take_while(|&&x| x == b'\n').count();
            if run >= 2 {
                out.push(&text[start..i]);
                start = i + run;
            }
            i += run;
        } else {
            i += 1;
        }
    }
    out.push(&text[start..]);
    out
}

/// datatrove's `find_duplicates`: how many elements repeat an earlier one, and their
/// characters.
fn find_duplicates<'a>(items: impl Iterator<Item = &'a str>) -> (usize, usize) {
    let mut seen: HashSet<&str, FxBuild> = HashSet::default();
    let (mut dups, mut chars) = (0, 0);
    for x in items {
        if !seen.insert(x) {
            dups += 1;
            chars += nchars(x);
        }
    }
    (dups, chars)
}

/// datatrove's `find_top_duplicate` over `n`-grams joined by a space: count times length
/// of the most frequent one (ties: the one seen first). `None` when there is no n-gram.
fn top_ngram_chars(w: &Words, n: usize, counts: &mut HashMap<u64, (u32, u32), IdBuild>) -> Option<usize> {
    if n == 0 || w.ids.len() < n {
        return None;
    }
    // hash -> (count, first position)
    counts.clear();
    counts.reserve(w.ids.len() - n + 1);
    for (pos, win) in w.ids.windows(n).enumerate() {
        let e = counts.entry(window_hash(win)).or_insert((0, pos as u32));
        e.0 += 1;
    }
    let &(count, first) = counts.values().max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))?;
    let first = first as usize;
    Some(count as usize * (w.chars(&w.ids[first..first + n]) + n - 1))
}

/// datatrove's `find_all_duplicate`: walk the n-grams; one seen before adds its
/// characters (words joined without a separator) and the walk jumps past it, otherwise
/// it is remembered. Stops early once the count exceeds `limit`.
fn dup_ngram_chars(w: &Words, n: usize, limit: usize, seen: &mut HashSet<u64, IdBuild>) -> usize {
    let ids = &w.ids;
    if n == 0 || ids.len() < n {
        return 0;
    }
    seen.clear();
    seen.reserve(ids.len() - n + 1);
    let (mut repeated, mut i) = (0usize, 0usize);
    while i + n <= ids.len() {
        let win = &ids[i..i + n];
        if seen.insert(window_hash(win)) {
            i += 1;
        } else {
            repeated += w.chars(win);
            if repeated > limit {
                break;
            }
            i += n;
        }
    }
    repeated
}

// ---------------------------------------------------------------------------------------
// Hashing

const FX_K: u64 = 0x517c_c1b7_2722_0a95;

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn window_hash(win: &[u32]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &x in win {
        h = (h.rotate_left(5) ^ x as u64).wrapping_mul(FX_K);
    }
    mix64(h)
}

/// A fast non-cryptographic hasher (Fx with a final mix) for strings.
#[derive(Default, Clone, Copy)]
struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(FX_K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
        let r = chunks.remainder();
        if !r.is_empty() {
            let mut b = [0u8; 8];
            b[..r.len()].copy_from_slice(r);
            self.add(u64::from_le_bytes(b) ^ ((r.len() as u64) << 56));
        }
    }
    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64)
    }
    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64)
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i)
    }
    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64)
    }
    #[inline]
    fn finish(&self) -> u64 {
        mix64(self.0)
    }
}

type FxBuild = BuildHasherDefault<FxHasher>;

/// For keys that are already well-mixed 64-bit hashes.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ b as u64).wrapping_mul(FX_K);
        }
    }
    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

type IdBuild = BuildHasherDefault<IdHasher>;

// ---------------------------------------------------------------------------------------
// datatrove's character sets (generated from datatrove.utils.text, sorted)

/// datatrove's `TERMINAL_PUNCTUATION`: the default `stop_chars`.
fn is_terminal_punct(c: char) -> bool {
    TERMINAL_PUNCTUATION.binary_search(&c).is_ok()
}

/// datatrove's `PUNCTUATION_SET` (ASCII and Unicode punctuation, C0/C1 controls but tab
/// and newline, and the terminal punctuation).
fn is_punctuation(c: char) -> bool {
    PUNCTUATION_SET.binary_search(&c).is_ok()
}

#[rustfmt::skip]
const TERMINAL_PUNCTUATION: &[char] = &[
    '\u{21}', '\u{2e}', '\u{3f}', '\u{589}', '\u{61d}', '\u{61e}', '\u{61f}', '\u{6d4}',
    '\u{700}', '\u{701}', '\u{702}', '\u{7f9}', '\u{837}', '\u{839}', '\u{83d}', '\u{83e}',
    '\u{964}', '\u{965}', '\u{104a}', '\u{104b}', '\u{1362}', '\u{1367}', '\u{1368}',
    '\u{166e}', '\u{1735}', '\u{1736}', '\u{17d4}', '\u{17d5}', '\u{17d6}', '\u{17d9}',
    '\u{17da}', '\u{1803}', '\u{1809}', '\u{1944}', '\u{1945}', '\u{1aa8}', '\u{1aa9}',
    '\u{1aaa}', '\u{1aab}', '\u{1b5a}', '\u{1b5b}', '\u{1b5e}', '\u{1b5f}', '\u{1b7d}',
    '\u{1b7e}', '\u{1c3b}', '\u{1c3c}', '\u{1c7e}', '\u{1c7f}', '\u{203c}', '\u{203d}',
    '\u{2047}', '\u{2048}', '\u{2049}', '\u{2e2e}', '\u{2e3c}', '\u{2e53}', '\u{2e54}',
    '\u{3002}', '\u{a4ff}', '\u{a60e}', '\u{a60f}', '\u{a6f3}', '\u{a6f7}', '\u{a876}',
    '\u{a877}', '\u{a8ce}', '\u{a8cf}', '\u{a92f}', '\u{a9c8}', '\u{a9c9}', '\u{aa5d}',
    '\u{aa5e}', '\u{aa5f}', '\u{aaf0}', '\u{aaf1}', '\u{abeb}', '\u{fe52}', '\u{fe56}',
    '\u{fe57}', '\u{ff01}', '\u{ff0e}', '\u{ff1f}', '\u{ff61}', '\u{10a56}', '\u{10a57}',
    '\u{10f55}', '\u{10f56}', '\u{10f57}', '\u{10f58}', '\u{10f59}', '\u{10f86}', '\u{10f87}',
    '\u{10f88}', '\u{10f89}', '\u{11047}', '\u{11048}', '\u{110be}', '\u{110bf}', '\u{110c0}',
    '\u{110c1}', '\u{11141}', '\u{11142}', '\u{11143}', '\u{111c5}', '\u{111c6}', '\u{111cd}',
    '\u{111de}', '\u{111df}', '\u{11238}', '\u{11239}', '\u{1123b}', '\u{1123c}', '\u{112a9}',
    '\u{1144b}', '\u{1144c}', '\u{115c2}', '\u{115c3}', '\u{115c9}', '\u{115ca}', '\u{115cb}',
    '\u{115cc}', '\u{115cd}', '\u{115ce}', '\u{115cf}', '\u{115d0}', '\u{115d1}', '\u{115d2}',
    '\u{115d3}', '\u{115d4}', '\u{115d5}', '\u{115d6}', '\u{115d7}', '\u{11641}', '\u{11642}',
    '\u{1173c}', '\u{1173d}', '\u{1173e}', '\u{11944}', '\u{11946}', '\u{11a42}', '\u{11a43}',
    '\u{11a9b}', '\u{11a9c}', '\u{11c41}', '\u{11c42}', '\u{11ef7}', '\u{11ef8}', '\u{11f43}',
    '\u{11f44}', '\u{16a6e}', '\u{16a6f}', '\u{16af5}', '\u{16b37}', '\u{16b38}', '\u{16b44}',
    '\u{16e98}', '\u{1bc9f}', '\u{1da88}',
];

#[rustfmt::skip]
const PUNCTUATION_SET: &[char] = &[
    '\u{0}', '\u{1}', '\u{2}', '\u{3}', '\u{4}', '\u{5}', '\u{6}', '\u{7}', '\u{8}', '\u{b}',
    '\u{c}', '\u{d}', '\u{e}', '\u{f}', '\u{10}', '\u{11}', '\u{12}', '\u{13}', '\u{14}',
    '\u{15}', '\u{16}', '\u{17}', '\u{18}', '\u{19}', '\u{1a}', '\u{1b}', '\u{1c}', '\u{1d}',
    '\u{1e}', '\u{1f}', '\u{21}', '\u{22}', '\u{23}', '\u{24}', '\u{25}', '\u{26}', '\u{27}',
    '\u{28}', '\u{29}', '\u{2a}', '\u{2b}', '\u{2c}', '\u{2d}', '\u{2e}', '\u{2f}', '\u{3a}',
    '\u{3b}', '\u{3c}', '\u{3d}', '\u{3e}', '\u{3f}', '\u{40}', '\u{5b}', '\u{5c}', '\u{5d}',
    '\u{5e}', '\u{5f}', '\u{60}', '\u{7b}', '\u{7c}', '\u{7d}', '\u{7e}', '\u{7f}', '\u{80}',
    '\u{81}', '\u{82}', '\u{83}', '\u{84}', '\u{85}', '\u{86}', '\u{87}', '\u{88}', '\u{89}',
    '\u{8a}', '\u{8b}', '\u{8c}', '\u{8d}', '\u{8e}', '\u{8f}', '\u{90}', '\u{91}', '\u{92}',
    '\u{93}', '\u{94}', '\u{95}', '\u{96}', '\u{97}', '\u{98}', '\u{99}', '\u{9a}', '\u{9b}',
    '\u{9c}', '\u{9d}', '\u{9e}', '\u{9f}', '\u{ab}', '\u{b4}', '\u{bb}', '\u{589}', '\u{61d}',
    '\u{61e}', '\u{61f}', '\u{6d4}', '\u{700}', '\u{701}', '\u{702}', '\u{7f9}', '\u{837}',
    '\u{839}', '\u{83d}', '\u{83e}', '\u{964}', '\u{965}', '\u{104a}', '\u{104b}', '\u{1362}',
    '\u{1367}', '\u{1368}', '\u{166e}', '\u{1735}', '\u{1736}', '\u{17d4}', '\u{17d5}',
    '\u{17d6}', '\u{17d9}', '\u{17da}', '\u{1803}', '\u{1809}', '\u{1944}', '\u{1945}',
    '\u{1aa8}', '\u{1aa9}', '\u{1aaa}', '\u{1aab}', '\u{1b5a}', '\u{1b5b}', '\u{1b5e}',
    '\u{1b5f}', '\u{1b7d}', '\u{1b7e}', '\u{1c3b}', '\u{1c3c}', '\u{1c7e}', '\u{1c7f}',
    '\u{2013}', '\u{2014}', '\u{2019}', '\u{201c}', '\u{201d}', '\u{201e}', '\u{2026}',
    '\u{203c}', '\u{203d}', '\u{2047}', '\u{2048}', '\u{2049}', '\u{2236}', '\u{2501}',
    '\u{25ba}', '\u{2e2e}', '\u{2e3c}', '\u{2e53}', '\u{2e54}', '\u{3001}', '\u{3002}',
    '\u{3008}', '\u{3009}', '\u{300a}', '\u{300b}', '\u{300c}', '\u{300d}', '\u{3010}',
    '\u{3011}', '\u{a4ff}', '\u{a60e}', '\u{a60f}', '\u{a6f3}', '\u{a6f7}', '\u{a876}',
    '\u{a877}', '\u{a8ce}', '\u{a8cf}', '\u{a92f}', '\u{a9c8}', '\u{a9c9}', '\u{aa5d}',
    '\u{aa5e}', '\u{aa5f}', '\u{aaf0}', '\u{aaf1}', '\u{abeb}', '\u{fe52}', '\u{fe56}',
    '\u{fe57}', '\u{ff01}', '\u{ff05}', '\u{ff08}', '\u{ff09}', '\u{ff0c}', '\u{ff0e}',
    '\u{ff11}', '\u{ff1a}', '\u{ff1b}', '\u{ff1f}', '\u{ff5e}', '\u{ff61}', '\u{10a56}',
    '\u{10a57}', '\u{10f55}', '\u{10f56}', '\u{10f57}', '\u{10f58}', '\u{10f59}', '\u{10f86}',
    '\u{10f87}', '\u{10f88}', '\u{10f89}', '\u{11047}', '\u{11048}', '\u{110be}', '\u{110bf}',
    '\u{110c0}', '\u{110c1}', '\u{11141}', '\u{11142}', '\u{11143}', '\u{111c5}', '\u{111c6}',
    '\u{111cd}', '\u{111de}', '\u{111df}', '\u{11238}', '\u{11239}', '\u{1123b}', '\u{1123c}',
    '\u{112a9}', '\u{1144b}', '\u{1144c}', '\u{115c2}', '\u{115c3}', '\u{115c9}', '\u{115ca}',
    '\u{115cb}', '\u{115cc}', '\u{115cd}', '\u{115ce}', '\u{115cf}', '\u{115d0}', '\u{115d1}',
    '\u{115d2}', '\u{115d3}', '\u{115d4}', '\u{115d5}', '\u{115d6}', '\u{115d7}', '\u{11641}',
    '\u{11642}', '\u{1173c}', '\u{1173d}', '\u{1173e}', '\u{11944}', '\u{11946}', '\u{11a42}',
    '\u{11a43}', '\u{11a9b}', '\u{11a9c}', '\u{11c41}', '\u{11c42}', '\u{11ef7}', '\u{11ef8}',
    '\u{11f43}', '\u{11f44}', '\u{16a6e}', '\u{16a6f}', '\u{16af5}', '\u{16b37}', '\u{16b38}',
    '\u{16b44}', '\u{16e98}', '\u{1bc9f}', '\u{1da88}',
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain, varied Ukrainian text that passes every rule with the defaults.
    const GOOD: &str = "Торік у листопаді президент оголосив наступний рік роком англійської мови в Україні.
Таке рішення глави держави продиктоване нагальною потребою поліпшити рівень володіння мовою.
Саме знання іноземних мов є одним із визначників рівного доступу громадян до кращих можливостей.
Нині щодо більшості вакансій на ринку праці роботодавець шукає обізнаного з мовами працівника.
Тому згадана ініціатива є цілком логічним стартовим елементом осучаснення країни.
Приємно визнавати, що чимало шкіл та бібліотек уже організували безкоштовні мовні табори для дітей.
Улітку в таборах працюють волонтери з різних країн, які допомагають учням долати мовний бар'єр.
За кілька тижнів діти починають вільніше спілкуватися й охочіше читають книжки в оригіналі.";

    fn lines() -> Vec<&'static str> {
        GOOD.lines().collect()
    }

    fn reason_with(cfg: &QualityConfig, text: &str) -> Option<String> {
        Quality::new(cfg).check(text).err().map(|(r, _)| r)
    }

    fn reason(text: &str) -> Option<String> {
        reason_with(&QualityConfig::default(), text)
    }

    #[track_caller]
    fn drops(text: &str, want: &str) {
        assert_eq!(reason(text).as_deref(), Some(want), "text:\n{text}");
    }

    #[test]
    fn good_text_passes() {
        let q = Quality::new(&QualityConfig::default());
        let f = q.check(GOOD).expect("the good text passes");
        assert!(f.words > 90 && f.tokens > f.words, "{f:?}");
        assert!(f.mean_word_length > 5.0 && f.mean_word_length < 9.0, "{f:?}");
        assert_eq!(f.dup_line_frac, 0.0);
        assert_eq!(f.line_punct_ratio, 1.0);
        assert!(f.alpha_words_ratio > 0.8 && f.alpha_words_ratio < 1.0, "{f:?}");
        // and with FineWeb-2's exact pipeline settings
        assert!(Quality::new(&QualityConfig::fineweb2_pipeline()).check(GOOD).is_ok());
    }

    #[test]
    fn words_keep_apostrophes_and_hyphens_and_split_punctuation() {
        assert_eq!(
            split_words("Пам'ять, пам’ять і пʼять: будь-який ІТ-фахівець (2016-й) «тест»... Ну!!"),
            vec![
                "Пам'ять",
                ",",
                "пам’ять",
                "і",
                "пʼять",
                ":",
                "будь-який",
                "ІТ-фахівець",
                "(",
                "2016-й",
                ")",
                "«",
                "тест",
                "»",
                "...",
                "Ну",
                "!",
                "!"
            ]
        );
        assert_eq!(
            split_words("т.д. США. Т. Шевченко, вул. Хрещатик"),
            vec!["т.д", ".", "США", ".", "Т.", "Шевченко", ",", "вул.", "Хрещатик"]
        );
        assert_eq!(
            split_words("кінця.Початок a,b x/y 1,5 10:30 2+2 27-28 1990-х"),
            vec![
                "кінця",
                ".",
                "Початок",
                "a",
                ",",
                "b",
                "x",
                "/",
                "y",
                "1,5",
                "10:30",
                "2",
                "+",
                "2",
                "27",
                "-",
                "28",
                "1990-х"
            ]
        );
        assert_eq!(
            split_words("див. https://site.com/a/b. і слово…далі"),
            vec!["див", ".", "https://site.com/a/b", ".", "і", "слово", "…", "далі"]
        );
        assert_eq!(
            split_words("#тег @user +380 слово—слово соба\u{301}ка"),
            vec!["#", "тег", "@user", "+380", "слово", "—", "слово", "соба\u{301}ка"]
        );
        assert!(split_words(" \n\t ").is_empty());
        assert_eq!(
            split_words_with("будь-який 27-28 2016-й", true),
            vec!["будь", "-", "який", "27", "-", "28", "2016-й"]
        );
        assert_eq!(
            split_words("°C. 5км 8) (ст.",),
            vec!["°", "C", ".", "5", "км", "8)", "(", "ст."]
        );
    }

    /// Tokens are non-empty, in order, free of whitespace, and together they are exactly
    /// the text without its whitespace; random tricky text never panics.
    #[test]
    fn tokens_cover_the_text() {
        let alphabet: Vec<char> = "аб вгґ'’ʼ-–—.…,;:!?()«»\"#@+%°C5км/\n\r\t\u{301}\u{a0}😀№|*_=<>$€ІЇ"
            .chars()
            .collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let q = Quality::new(&QualityConfig::default());
        for round in 0..3000 {
            let len = (rnd() % 40) as usize;
            let text: String = (0..len)
                .map(|_| alphabet[(rnd() % alphabet.len() as u64) as usize])
                .collect();
            for split in [false, true] {
                let toks = split_words_with(&text, split);
                assert!(
                    toks.iter().all(|t| !t.is_empty() && !t.chars().any(py_isspace)),
                    "{text:?} {toks:?}"
                );
                let joined: String = toks.concat();
                let expected: String = text.chars().filter(|c| !py_isspace(*c)).collect();
                assert_eq!(joined, expected, "round {round}: {text:?} -> {toks:?}");
            }
            let _ = q.check(&text);
        }
    }

    #[test]
    fn python_line_semantics() {
        assert_eq!(newline_runs_split("a\n\nb\n"), vec!["a", "b", ""]);
        assert_eq!(newline_runs_split("\n\na"), vec!["", "a"]);
        assert_eq!(newline_runs_split(""), vec![""]);
        assert_eq!(paragraphs("a\n\n\nb\nc\n\nd"), vec!["a", "b\nc", "d"]);
        let mut v = vec![];
        for_each_py_line("a\r\nb\rc\n\nd\n", |l| v.push(l));
        assert_eq!(v, vec!["a", "b", "c", "", "d"]);
        assert_eq!(nchars("п’ять"), 5);
        assert_eq!(find_duplicates(["a", "bb", "a", "bb", "bb"].into_iter()), (3, 5));
    }

    #[test]
    fn ngram_counting_matches_datatrove() {
        // top 2-gram: "a b" 3 times, 3 chars each
        let w = Words::new("a b a b a b c", false);
        assert_eq!(top_ngram_chars(&w, 2, &mut HashMap::default()), Some(9));
        // ties go to the n-gram seen first: "xx y" (4 chars) and "y z" both twice
        let w = Words::new("xx y z xx y z", false);
        assert_eq!(top_ngram_chars(&w, 2, &mut HashMap::default()), Some(8));
        assert_eq!(top_ngram_chars(&w, 7, &mut HashMap::default()), None);
        // find_all_duplicate: "a b" at 2 repeats -> +2 chars, jump to 4: "a b" again -> +2
        let w = Words::new("a b a b a b", false);
        assert_eq!(dup_ngram_chars(&w, 2, usize::MAX, &mut HashSet::default()), 4);
        // overlapping repeats are not counted twice: "a a a a a" with n=2
        let w = Words::new("a a a a a", false);
        assert_eq!(dup_ngram_chars(&w, 2, usize::MAX, &mut HashSet::default()), 4);
        assert_eq!(dup_ngram_chars(&w, 0, usize::MAX, &mut HashSet::default()), 0);
    }

    // --- GopherRepetitionFilter ---

    #[test]
    fn empty() {
        drops("", "empty");
        drops("  \n \t\n", "empty"); // FineWeb: no non-blank line
    }

    #[test]
    fn dup_para_frac() {
        let l = lines();
        let p2 = l[2..5].join("\n");
        drops(
            &format!("{}\n\n{p2}\n\n{p2}\n\n{p2}", l[..2].join("\n")),
            "dup_para_frac",
        );
    }

    #[test]
    fn dup_para_char_frac() {
        let l = lines();
        let a = l[..4].join("\n");
        let text = format!("{a}\n\n{}\n\n{}\n\n{}\n\n{a}", l[4], l[5], l[6]);
        drops(&text, "dup_para_char_frac");
    }

    #[test]
    fn dup_line_frac() {
        let l = lines();
        let text = format!("{}\n{}\n{}\n{}", GOOD, l[0], l[0], l[1]).replace(&l[2..].join("\n"), &l[2..5].join("\n"));
        // 5 distinct + 3 repeats
        assert_eq!(reason(&text).as_deref(), Some("dup_line_frac"), "{text}");
    }

    #[test]
    fn dup_line_char_frac() {
        let l = lines();
        let text = format!("{GOOD}\n{}\n{}\n{}", l[2], l[5], l[6]);
        drops(&text, "dup_line_char_frac");
    }

    #[test]
    fn top_n_grams() {
        let rep = |unit: &str, k: usize| vec![unit; k].join(", ");
        drops(&format!("{GOOD}\nІ ще раз: {}.", rep("дуже добре", 10)), "top_2_gram");
        drops(
            &format!("{GOOD}\nІ ще раз: {}.", rep("і в найрізноманітніших", 6)),
            "top_3_gram",
        );
        drops(
            &format!("{GOOD}\nІ ще раз: {}.", rep("і в у найнеймовірніших обставинах", 6)),
            "top_4_gram",
        );
    }

    #[test]
    fn duplicated_n_grams() {
        let s = "і в неї після довгої зимової перерви знову з'явилося бажання мандрувати світом";
        let text = format!("{}\n{s}; {s}; {s}.", lines()[..3].join("\n"));
        drops(&text, "duplicated_5_n_grams");
        // each n has its own threshold
        let cfg = QualityConfig {
            dup_n_grams: vec![(5, 0.9), (10, 0.01)],
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, &text).as_deref(), Some("duplicated_10_n_grams"));
    }

    // --- FineWebQualityFilter ---

    #[test]
    fn line_punct_ratio() {
        let text: Vec<String> = lines()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i < 6 {
                    l.trim_end_matches('.').to_string()
                } else {
                    l.to_string()
                }
            })
            .collect();
        drops(&text.join("\n"), "line_punct_ratio");
        let cfg = QualityConfig {
            line_punct_exclude_zero: true,
            ..Default::default()
        };
        let none: Vec<&str> = lines().iter().map(|l| l.trim_end_matches('.')).collect();
        assert_ne!(reason_with(&cfg, &none.join("\n")).as_deref(), Some("line_punct_ratio"));
    }

    #[test]
    fn short_line_ratio() {
        let shorts = [
            "Так і є.",
            "Це правда.",
            "Ми знаємо.",
            "Вони теж.",
            "Ось так.",
            "Добре!",
            "Чому ні?",
            "Саме тому.",
            "Отже, вперед.",
            "Не зовсім.",
            "Ще раз.",
            "Слушно.",
            "Авжеж.",
            "Можливо.",
            "Побачимо.",
            "Гаразд.",
            "Звісно.",
            "Чудово.",
        ];
        let mut out = vec![];
        for (i, l) in lines().iter().enumerate() {
            out.push(l.to_string());
            out.push(shorts[2 * i].to_string());
            out.push(shorts[2 * i + 1].to_string());
        }
        out.extend(shorts[16..].iter().map(|s| s.to_string())); // 18 short lines of 26
        drops(&out.join("\n"), "short_line_ratio");
    }

    #[test]
    fn char_dup_ratio() {
        drops(&format!("{GOOD}\n{}", lines()[4]), "char_dup_ratio");
    }

    #[test]
    fn list_ratio() {
        drops(&GOOD.replace('\n', "\n\n\n\n"), "list_ratio");
    }

    // --- GopherQualityFilter ---

    #[test]
    fn gopher_short_and_long_doc() {
        let cfg = QualityConfig {
            gopher_repetition: false,
            ..Default::default()
        };
        assert_eq!(
            reason_with(&cfg, &lines()[..3].join("\n")).as_deref(),
            Some("gopher_short_doc")
        );
        let cfg = QualityConfig {
            max_doc_words: Some(60),
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, GOOD).as_deref(), Some("gopher_long_doc"));
        // punctuation does not count as words
        let cfg = QualityConfig {
            min_doc_words: Some(105),
            ..Default::default()
        };
        let f = Quality::new(&QualityConfig::default()).check(GOOD).unwrap();
        assert!(f.tokens >= 105 && f.words < 105, "{f:?}");
        assert_eq!(reason_with(&cfg, GOOD).as_deref(), Some("gopher_short_doc"));
    }

    #[test]
    fn gopher_avg_word_length() {
        let long: Vec<String> = lines().iter().map(|l| l.replace(' ', "ння ")).collect();
        let cfg = QualityConfig {
            max_avg_word_length: Some(8.0),
            ..Default::default()
        };
        assert_eq!(
            reason_with(&cfg, &long.join("\n")).as_deref(),
            Some("gopher_above_avg_threshold")
        );
        let cfg = QualityConfig {
            min_avg_word_length: Some(7.5),
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, GOOD).as_deref(), Some("gopher_below_avg_threshold"));
        // a text of very short words
        let short = "Ой ти та я, і ми з ним на сі ні, бо є ще він і во но.
Ну як же ти там, а ми тут у ній як на лаві та й по всьому.
Та й то, що є, то й є, бо ж ми не ті, хто як на те йде.
Чи ж він є чи ні, а ми з вами ще по два на три та й ну.
Як ні, то й ні; як є, то є, бо ж ви ще ті, що на ті йдуть.
А ще ми ж є у двох, і в трьох, і з ним та й по ньому йде.";
        let cfg = QualityConfig {
            gopher_repetition: false,
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, short).as_deref(), Some("gopher_below_avg_threshold"));
    }

    #[test]
    fn gopher_hashes_and_ellipsis() {
        let tags: Vec<String> = (0..16).map(|i| format!("#тег{i}")).collect();
        drops(&format!("{GOOD}\nТеги: {}.", tags.join(" ")), "gopher_too_many_hashes");
        let l = lines();
        let text = format!(
            "{}\n{}\n{}",
            l[0].replace(' ', "... "),
            l[1].replace(' ', "... "),
            l[2..].join("\n")
        );
        drops(&text, "gopher_too_many_ellipsis");
    }

    #[test]
    fn gopher_bullets_and_end_ellipsis() {
        let bullets: Vec<String> = lines().iter().map(|l| format!("- {l}")).collect();
        drops(&bullets.join("\n"), "gopher_too_many_bullets");
        let ends: Vec<String> = lines()
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i < 3 {
                    format!("{}...", l.trim_end_matches('.'))
                } else {
                    l.to_string()
                }
            })
            .collect();
        drops(&ends.join("\n"), "gopher_too_many_end_ellipsis");
    }

    #[test]
    fn gopher_alpha_words() {
        let nums: Vec<String> = (0..70).map(|i| (1000 + i * 37).to_string()).collect();
        let text = format!(
            "{GOOD}\nНомери: {}.\nЩе номери: {}.",
            nums[..35].join(" "),
            nums[35..].join(" ")
        );
        drops(&text, "gopher_below_alpha_threshold");
    }

    #[test]
    fn gopher_stop_words() {
        let cfg = QualityConfig {
            stop_words: vec!["котик".into(), "песик".into()],
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, GOOD).as_deref(), Some("gopher_enough_stop_words"));
        // case-sensitive, as datatrove: only "У" and "В" capitalised -> not found
        let text = GOOD
            .replace(" у ", " ")
            .replace(" в ", " ")
            .replace(" на ", " ")
            .replace(" і ", " ")
            .replace(" з ", " ")
            .replace(" та ", " ")
            .replace(" до ", " ")
            .replace(" за ", " ")
            .replace(" що ", " ")
            .replace(", що", ",")
            .replace("За ", "");
        drops(&text, "gopher_enough_stop_words");
    }

    #[test]
    fn groups_and_thresholds_can_be_switched_off() {
        let text = format!("{GOOD}\n{}", lines()[4]); // char_dup_ratio
        let cfg = QualityConfig {
            fineweb: false,
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, &text), None);
        let cfg = QualityConfig {
            gopher_repetition: false,
            fineweb: false,
            gopher_quality: false,
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, ""), None);
        // 0 disables like None, as in datatrove
        let dup = format!("{GOOD}\n{}\n{}\n{}", lines()[2], lines()[5], lines()[6]);
        assert_eq!(reason(&dup).as_deref(), Some("dup_line_char_frac"));
        let cfg = QualityConfig {
            dup_line_char_frac: Some(0.0),
            dup_n_grams: vec![],
            fineweb: false,
            ..Default::default()
        };
        assert_eq!(reason_with(&cfg, &dup), None);
    }

    #[test]
    fn config_serde() {
        let c: QualityConfig = serde_yaml_ng::from_str("{}").unwrap();
        assert_eq!(c, QualityConfig::default());
        let c: QualityConfig = serde_yaml_ng::from_str(
            "dup_line_frac: 0.333\ntop_n_grams: [[2, 0.086], [3, 0.108]]\nmax_non_alpha_words_ratio: null\nfineweb: false\nstop_words: [у, в]",
        )
        .unwrap();
        assert_eq!(c.top_n_grams, vec![(2, 0.086), (3, 0.108)]);
        assert_eq!(c.max_non_alpha_words_ratio, None);
        assert!(!c.fineweb);
        assert_eq!(c.stop_words, vec!["у", "в"]);
        assert!(serde_yaml_ng::from_str::<QualityConfig>("no_such_threshold: 1").is_err());
    }

    #[test]
    fn step_records_histograms_and_reason() {
        let q = Quality::new(&QualityConfig::default());
        let mut st = StepStats::new("quality");
        let mut d = Document::new("1", GOOD);
        assert_eq!(q.apply(&mut d, &mut st), Verdict::Keep);
        let mut d = Document::new("2", "");
        assert_eq!(q.apply(&mut d, &mut st), Verdict::Drop("empty".into()));
        for h in [
            "words",
            "mean_word_length",
            "dup_line_frac",
            "line_punct_ratio",
            "alpha_words_ratio",
        ] {
            assert_eq!(st.histograms[h].count, 2, "{h}");
        }
        assert_eq!(q.name(), "quality");
    }

    #[test]
    fn never_panics_on_odd_input() {
        let q = Quality::new(&QualityConfig::default());
        let odd = [
            "",
            " ",
            "\n",
            "\r\n\r\n",
            "...",
            "…",
            "#",
            "-",
            "•",
            "\u{301}",
            "а\u{301}",
            "'",
            "’ʼ'",
            "@",
            "+",
            "+1",
            "\u{0}\u{1}\u{7f}",
            "\u{feff}\u{200b}",
            "a\u{2028}b\u{85}c",
            "😀😀😀",
            "..слово..",
            "слово-",
            "-слово",
            "--",
            "а--",
            "a.",
            ".a",
            "Т.",
            "\u{10ffff}",
            "\u{1c}\u{1d}",
            "x\n\n\n\n",
        ];
        for t in odd {
            let _ = q.check(t);
            let _ = split_words(t);
        }
        let cfg = QualityConfig {
            min_doc_words: None,
            max_symbol_word_ratio: Some(0.5),
            top_n_grams: vec![(0, 0.1), (1, 0.5)],
            dup_n_grams: vec![(0, 0.1), (1, 0.5)],
            gopher_repetition: true,
            ..Default::default()
        };
        let q = Quality::new(&cfg);
        for t in odd {
            let _ = q.check(t);
        }
    }

    #[test]
    fn linear_on_a_big_document() {
        // ~4 MB: one huge line plus many lines, many repeats; must finish quickly.
        let mut big = GOOD.repeat(2000);
        big.push_str(&"слово ".repeat(300_000));
        let t = std::time::Instant::now();
        let r = Quality::new(&QualityConfig {
            gopher_repetition: true,
            dup_line_frac: None,
            dup_para_frac: None,
            dup_line_char_frac: None,
            dup_para_char_frac: None,
            ..Default::default()
        })
        .check(&big);
        assert!(r.is_err());
        assert!(t.elapsed().as_secs() < 30, "{:?}", t.elapsed());
    }
}
