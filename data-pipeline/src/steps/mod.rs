//! Per-document steps. Each step looks at one document, may change its text or metadata,
//! and says whether it stays. The executor counts documents in, kept, modified and
//! dropped per step; a step adds its own counters and histograms to `StepStats`.

pub mod langid;
pub mod lingua_fast;
pub mod normalise;
pub mod pii;
pub mod quality;

use crate::stats::StepStats;
use crate::Document;

/// What a step decided about a document.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Keep,
    /// Kept, with its text or metadata changed.
    Modified,
    /// Dropped, with the reason (a short snake_case tag, counted per reason).
    Drop(String),
}

pub trait Step: Send + Sync {
    fn name(&self) -> &str;
    fn apply(&self, doc: &mut Document, stats: &mut StepStats) -> Verdict;
}

/// Words as the quality and dedup steps see them: maximal runs of letters, digits,
/// apostrophes and hyphens inside a word (so "обов'язок" and "будь-який" are one word).
pub fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !(c.is_alphanumeric() || is_word_joiner(c)))
        .map(|w| w.trim_matches(|c: char| is_word_joiner(c)))
        .filter(|w| !w.is_empty())
}

fn is_word_joiner(c: char) -> bool {
    matches!(c, '\'' | '’' | 'ʼ' | '-')
}
