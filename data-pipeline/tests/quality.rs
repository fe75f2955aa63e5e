//! The quality step on real Ukrainian text: every document of BRUK's "good" set
//! (shared/data/uk/brown-uk/data/good, edited prose of many genres) goes through
//! `Quality` with the default FineWeb-2 ukr_Cyrl thresholds. Nearly all of it is clean
//! text, so a large majority must be kept; the drop reasons are printed.
//!
//! Measured: 787 of 805 documents kept (97.8%); dropped: 8 gopher_below_alpha_threshold
//! (tables of numbers), 5 line_punct_ratio (poems, lists), 3 gopher_too_many_end_ellipsis,
//! 1 duplicated_5_n_grams, 1 char_dup_ratio. datatrove's own filters (spaCy `uk` words)
//! made the same 805 decisions with the same reasons.

use hromada_data::steps::quality::{Quality, QualityConfig};
use hromada_data::steps::{Step, Verdict};
use hromada_data::{Document, StepStats};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

mod common;

fn brown_uk() -> Vec<(String, String)> {
    let dir = common::shared_data().join("uk/brown-uk/data/good");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), text)
        })
        .collect()
}

/// Run every document through the step; (kept, dropped file -> reason, stats).
fn run(cfg: &QualityConfig, docs: &[(String, String)]) -> (usize, BTreeMap<String, String>, StepStats) {
    let q = Quality::new(cfg);
    let mut stats = StepStats::new(q.name());
    let mut kept = 0;
    let mut dropped = BTreeMap::new();
    for (name, text) in docs {
        let mut doc = Document::new(name.clone(), text.clone());
        match q.apply(&mut doc, &mut stats) {
            Verdict::Keep | Verdict::Modified => kept += 1,
            Verdict::Drop(reason) => {
                stats.drop_reason(&reason);
                dropped.insert(name.clone(), reason);
            }
        }
        assert_eq!(doc.text, *text, "the quality step never changes the text");
    }
    (kept, dropped, stats)
}

#[test]
fn brown_uk_is_mostly_kept() {
    let docs = brown_uk();
    assert!(
        docs.len() > 700,
        "expected the whole BRUK good set, found {} files",
        docs.len()
    );
    let bytes: usize = docs.iter().map(|(_, t)| t.len()).sum();

    let t0 = Instant::now();
    let (kept, dropped, stats) = run(&QualityConfig::default(), &docs);
    let secs = t0.elapsed().as_secs_f64();
    let share = kept as f64 / docs.len() as f64;

    println!(
        "brown-uk: {kept} of {} documents kept ({:.1}%), {:.1} MB in {secs:.2}s",
        docs.len(),
        100.0 * share,
        bytes as f64 / 1e6
    );
    println!("drop reasons:");
    for (reason, n) in &stats.dropped {
        println!("  {n:4}  {reason}");
    }
    for (name, reason) in &dropped {
        println!("  dropped {name}: {reason}");
    }
    for key in [
        "words",
        "mean_word_length",
        "dup_line_frac",
        "line_punct_ratio",
        "alpha_words_ratio",
    ] {
        let h = &stats.histograms[key];
        assert_eq!(h.count as usize, docs.len(), "{key} is observed on every document");
        println!(
            "  {key:18} mean {:9.3}  min {:9.3}  max {:9.3}",
            h.sum / h.count as f64,
            h.min,
            h.max
        );
    }

    // measured 97.8%
    assert!(share >= 0.95, "only {:.1}% of brown-uk kept", 100.0 * share);
    assert_eq!(stats.dropped.values().sum::<u64>() as usize, dropped.len());

    // FineWeb-2's own pipeline settings only relax rules (some are off there): it keeps
    // at least as much.
    let (kept_fw2, _, _) = run(&QualityConfig::fineweb2_pipeline(), &docs);
    println!("with fineweb2_pipeline(): {kept_fw2} kept");
    assert!(kept_fw2 >= kept);

    // Every group on its own keeps at least what all three keep together.
    for (name, cfg) in [
        (
            "gopher_repetition",
            QualityConfig {
                fineweb: false,
                gopher_quality: false,
                ..Default::default()
            },
        ),
        (
            "fineweb",
            QualityConfig {
                gopher_repetition: false,
                gopher_quality: false,
                ..Default::default()
            },
        ),
        (
            "gopher_quality",
            QualityConfig {
                gopher_repetition: false,
                fineweb: false,
                ..Default::default()
            },
        ),
    ] {
        let (k, _, _) = run(&cfg, &docs);
        println!("only {name}: {k} kept");
        assert!(k >= kept);
    }
}
