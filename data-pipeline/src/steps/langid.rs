//! Language identification with lingua, restricted to a configurable set of languages.
//!
//! The document score is lingua's confidence for its top language over the first
//! `max_chars` characters; a document is kept when that language is in `keep` and the
//! score reaches `threshold` (FineWeb-2's Ukrainian threshold, 0.9, by default; texts
//! under `short_text_chars` need `short_threshold`). Every
//! line of at least `line_min_chars` characters is also identified on its own; the character share of such lines in another language than the document's
//! is the mixed-language (surzhyk) signal (lines whose letters settle it skip lingua), written to `metadata.other_language_share`
//! and, with `max_other_language_share`, a drop reason.

use crate::error::{Error, Result};
use crate::stats::StepStats;
use crate::steps::lingua_fast::FastLingua;
use crate::steps::{Step, Verdict};
use crate::Document;
use lingua::{Language, LanguageDetector, LanguageDetectorBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LangidConfig {
    /// ISO 639-1 codes the detector chooses among.
    pub languages: Vec<String>,
    /// Languages to keep.
    pub keep: Vec<String>,
    pub threshold: f64,
    /// Texts shorter than this many characters (a sentence, a title) are held to
    /// `short_threshold` instead: FineWeb-2's 0.9 is calibrated on web documents, and on
    /// a single sentence lingua spreads its confidence over the close East Slavic
    /// languages even when Ukrainian is clearly on top.
    pub short_text_chars: usize,
    pub short_threshold: f64,
    /// Characters of the document the document score looks at (a prefix; 0 = all).
    pub max_chars: usize,
    /// Identify lines of at least this many characters for the mixed-language share
    /// (0 turns the line check off).
    pub line_min_chars: usize,
    /// At most this many lines are identified per document (evenly spread).
    pub max_lines: usize,
    /// Drop documents whose other-language line share exceeds this.
    pub max_other_language_share: Option<f64>,
    /// lingua's low-accuracy mode (trigrams only) for the document score: faster, less
    /// accurate on short texts.
    pub low_accuracy: bool,
    /// Evaluate lingua's model with hromada's cached evaluator (`lingua_fast`: lingua's
    /// answers, about ten times faster; texts it cannot vouch for still go to lingua).
    /// false: lingua for every text.
    pub fast: bool,
}

impl Default for LangidConfig {
    fn default() -> Self {
        Self {
            languages: ["uk", "ru", "be", "en", "pl", "bg"].map(String::from).to_vec(),
            keep: vec!["uk".into()],
            threshold: 0.9,
            short_text_chars: 250,
            short_threshold: 0.5,
            max_chars: 10_000,
            line_min_chars: 40,
            max_lines: 16,
            max_other_language_share: None,
            low_accuracy: false,
            fast: true,
        }
    }
}

pub struct LangId {
    cfg: LangidConfig,
    detector: LanguageDetector,
    lines: LanguageDetector,
    /// The cached evaluator of the same model (None: lingua for everything).
    fast: Option<FastLingua>,
    keep: Vec<Language>,
}

fn language(code: &str) -> Result<Language> {
    let code = code.trim().to_lowercase();
    let mut all: Vec<Language> = Language::all().into_iter().collect();
    all.sort();
    all.iter()
        .copied()
        .find(|l| l.iso_code_639_1().to_string() == code)
        .ok_or_else(|| {
            let known: Vec<String> = all.iter().map(|l| l.iso_code_639_1().to_string()).collect();
            Error::Other(format!(
                "langid: unknown or not built-in language `{code}` (built in: {})",
                known.join(", ")
            ))
        })
}

impl LangId {
    pub fn new(cfg: &LangidConfig) -> Result<Self> {
        let mut langs = cfg.languages.iter().map(|c| language(c)).collect::<Result<Vec<_>>>()?;
        let keep = cfg.keep.iter().map(|c| language(c)).collect::<Result<Vec<_>>>()?;
        for k in &keep {
            if !langs.contains(k) {
                langs.push(*k);
            }
        }
        if langs.len() < 2 {
            return Err(Error::Other("langid: `languages` needs at least two languages".into()));
        }
        let mut b = LanguageDetectorBuilder::from_languages(&langs);
        b.with_preloaded_language_models();
        if cfg.low_accuracy {
            b.with_low_accuracy_mode();
        }
        let detector = b.build();
        let lines = LanguageDetectorBuilder::from_languages(&langs).with_preloaded_language_models().build();
        let fast = if cfg.fast && !cfg.low_accuracy { FastLingua::new(&langs) } else { None };
        Ok(Self {
            cfg: cfg.clone(),
            detector,
            lines,
            fast,
            keep,
        })
    }

    /// The top language and its confidence.
    pub fn score(&self, text: &str) -> Option<(Language, f64)> {
        let sample = prefix_chars(text, self.cfg.max_chars);
        let values = match self.fast.as_ref().and_then(|f| f.confidence_values(sample)) {
            Some(v) => v,
            None => self.detector.compute_language_confidence_values(sample),
        };
        values.into_iter().next().filter(|(_, c)| *c > 0.0)
    }

    /// lingua's `detect_language_of` for a line (through the cached evaluator when it
    /// can vouch for the answer).
    fn detect_line(&self, line: &str) -> Option<Language> {
        match self.fast.as_ref().and_then(|f| f.detect_language_of(line)) {
            Some(found) => found,
            None => self.lines.detect_language_of(line),
        }
    }

    /// Character share of identified lines in a language other than `lang`.
    pub fn other_language_share(&self, text: &str, lang: Language) -> Option<f64> {
        if self.cfg.line_min_chars == 0 {
            return None;
        }
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= self.cfg.line_min_chars && l.chars().count() >= self.cfg.line_min_chars)
            .collect();
        if lines.is_empty() {
            return None;
        }
        let step = lines.len().div_ceil(self.cfg.max_lines.max(1));
        let (mut total, mut other) = (0usize, 0usize);
        for l in lines.iter().step_by(step.max(1)) {
            let l = prefix_chars(l, 1000);
            let n = l.chars().count();
            total += n;
            if letters_decide(l, lang) {
                continue;
            }
            if let Some(found) = self.detect_line(l) {
                if found != lang {
                    other += n;
                }
            }
        }
        (total > 0).then(|| other as f64 / total as f64)
    }
}

/// True when the letters alone settle that a line is in `lang`: for Ukrainian, a letter
/// only Ukrainian has (ї, є, ґ) and none only Russian or Belarusian has (ы, э, ъ, ё, ў);
/// for Russian, the reverse. Lines this decides skip lingua (most lines of Ukrainian
/// text contain ї or є); every other line is identified by lingua.
fn letters_decide(line: &str, lang: Language) -> bool {
    let (mut uk, mut ru, mut be) = (false, false, false);
    for c in line.chars() {
        match c {
            'ї' | 'є' | 'ґ' | 'Ї' | 'Є' | 'Ґ' => uk = true,
            'ы' | 'э' | 'ъ' | 'ё' | 'Ы' | 'Э' | 'Ъ' | 'Ё' => ru = true,
            'ў' | 'Ў' => be = true,
            _ => {}
        }
    }
    match lang.iso_code_639_1().to_string().as_str() {
        "uk" => uk && !ru && !be,
        "ru" => ru && !uk && !be,
        _ => false,
    }
}

fn prefix_chars(s: &str, n: usize) -> &str {
    if n == 0 {
        return s;
    }
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Step for LangId {
    fn name(&self) -> &str {
        "langid"
    }
    fn apply(&self, doc: &mut Document, stats: &mut StepStats) -> Verdict {
        let Some((lang, score)) = self.score(&doc.text) else {
            doc.metadata.insert("language".into(), Value::Null);
            return Verdict::Drop("no_language".into());
        };
        let code = lang.iso_code_639_1().to_string();
        stats.count(&format!("language.{code}"), 1);
        doc.metadata.insert("language".into(), Value::String(code.clone()));
        doc.metadata.insert("language_score".into(), serde_json::json!((score * 1e4).round() / 1e4));
        if self.keep.contains(&lang) {
            stats.observe("language_score", score, (0.0, 1.0, 20, false));
        }
        if !self.keep.contains(&lang) {
            return Verdict::Drop(format!("language_{code}"));
        }
        let short = doc.text.len() < self.cfg.short_text_chars * 2 && doc.text.chars().count() < self.cfg.short_text_chars;
        let threshold = if short { self.cfg.short_threshold } else { self.cfg.threshold };
        if score < threshold {
            return Verdict::Drop("language_score_below_threshold".into());
        }
        if let Some(share) = self.other_language_share(&doc.text, lang) {
            stats.observe("other_language_share", share, (0.0, 1.0, 20, false));
            doc.metadata.insert("other_language_share".into(), serde_json::json!((share * 1e4).round() / 1e4));
            if self.cfg.max_other_language_share.is_some_and(|m| share > m) {
                return Verdict::Drop("mixed_language".into());
            }
        }
        Verdict::Modified
    }
}
