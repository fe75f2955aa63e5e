//! Language ID on real data: lingua's own Ukrainian and Russian test sentences, the
//! RusLit Russian texts, and every brown-uk document through normalise + langid.
mod common;
use hromada_data::steps::langid::{LangId, LangidConfig};
use hromada_data::steps::normalise::{Normalise, NormaliseConfig};
use hromada_data::steps::{Step, Verdict};
use hromada_data::{Document, StepStats};

fn sentences(dir: &include_dir::Dir) -> Vec<String> {
    let f = dir.get_file("sentences.txt").expect("sentences.txt in lingua testdata");
    f.contents_utf8().unwrap().lines().filter(|l| !l.trim().is_empty()).map(String::from).collect()
}

fn kept(step: &LangId, texts: &[String]) -> (usize, Vec<String>) {
    let mut n = 0;
    let mut dropped = Vec::new();
    for t in texts {
        let mut d = Document::new("x", t.clone());
        let mut st = StepStats::new("langid");
        match step.apply(&mut d, &mut st) {
            Verdict::Drop(r) => dropped.push(format!("{r}: {t}")),
            _ => n += 1,
        }
    }
    (n, dropped)
}

#[test]
fn lingua_ukrainian_sentences_kept() {
    let step = LangId::new(&LangidConfig::default()).unwrap();
    let uk = sentences(&lingua_ukrainian_language_model::UKRAINIAN_TESTDATA_DIRECTORY);
    assert!(uk.len() >= 900, "{}", uk.len());
    let (n, dropped) = kept(&step, &uk);
    let share = n as f64 / uk.len() as f64;
    eprintln!("Ukrainian sentences kept: {n}/{} = {share:.4}; dropped: {dropped:#?}", uk.len());
    assert!(share >= 0.99, "kept {share}");
}

#[test]
fn russian_rejected() {
    let step = LangId::new(&LangidConfig::default()).unwrap();
    let ru = sentences(&lingua_russian_language_model::RUSSIAN_TESTDATA_DIRECTORY);
    let (n, kept_list) = {
        let (n, _) = kept(&step, &ru);
        (n, ())
    };
    let _ = kept_list;
    let rejected = 1.0 - n as f64 / ru.len() as f64;
    eprintln!("Russian sentences rejected: {}/{} = {rejected:.4}", ru.len() - n, ru.len());
    assert!(rejected >= 0.99, "rejected {rejected}");

    let texts: Vec<String> = common::ruslit().into_iter().map(|(_, t)| t).collect();
    assert!(texts.len() >= 60);
    let (n, _) = kept(&step, &texts);
    let rejected = 1.0 - n as f64 / texts.len() as f64;
    assert!(rejected >= 0.99, "RusLit rejected {rejected}");
    // Every RusLit text is identified as Russian, not merely below threshold.
    let mut d = Document::new("x", texts[0].clone());
    step.apply(&mut d, &mut StepStats::new("langid"));
    assert_eq!(d.metadata["language"], "ru");
}

#[test]
fn every_brown_uk_document_survives_normalise_and_langid() {
    let norm = Normalise::new(&NormaliseConfig::default());
    let step = LangId::new(&LangidConfig::default()).unwrap();
    let docs = common::brown_uk();
    assert!(docs.len() >= 800, "{}", docs.len());
    let mut nst = StepStats::new("normalise");
    let mut lst = StepStats::new("langid");
    for (name, text) in &docs {
        let mut d = Document::new(name.clone(), text.clone());
        assert!(!matches!(norm.apply(&mut d, &mut nst), Verdict::Drop(_)), "{name} dropped by normalise");
        // Normalisation keeps the words: only spacing, apostrophes and invisible
        // characters may change.
        let words = |t: &str| t.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).count();
        assert_eq!(words(text), words(&d.text), "{name}: normalise changed the words");
        let v = step.apply(&mut d, &mut lst);
        assert!(!matches!(v, Verdict::Drop(_)), "{name} dropped by langid: {v:?} {:?}", d.metadata);
        assert_eq!(d.metadata["language"], "uk");
    }
    assert!(nst.counters.keys().all(|k| !k.starts_with("mojibake")), "mojibake repairs on clean text: {:?}", nst.counters);
    // The mixed-language share of proofread Ukrainian is low.
    let h = &lst.histograms["other_language_share"];
    assert!(h.sum / (h.count as f64) < 0.05, "mean other-language share {}", h.sum / h.count as f64);
}

#[test]
fn surzhyk_share_is_measured() {
    let step = LangId::new(&LangidConfig { max_other_language_share: Some(0.3), ..Default::default() }).unwrap();
    let uk = common::brown_uk();
    let ru = common::ruslit();
    let pick = |docs: &[(String, String)], n: usize| -> Vec<String> {
        docs.iter().flat_map(|d| d.1.lines()).map(str::trim).filter(|l| (80..200).contains(&l.chars().count())).take(n).map(String::from).collect()
    };
    let (uk_lines, ru_lines) = (pick(&uk, 5), pick(&ru, 5));
    assert!(uk_lines.len() == 5 && ru_lines.len() == 5);
    // Surzhyk-like: Ukrainian and Russian lines alternate.
    let mixed: Vec<String> = uk_lines.iter().zip(&ru_lines).flat_map(|(a, b)| [a.clone(), b.clone()]).collect();
    let mixed = mixed.join("\n");
    let mut d = Document::new("mixed", mixed);
    let v = step.apply(&mut d, &mut StepStats::new("langid"));
    let share = d.metadata.get("other_language_share").and_then(|v| v.as_f64());
    eprintln!("{v:?} {:?}", d.metadata);
    // Either the document score already rejects it, or the line share flags it.
    assert!(matches!(v, Verdict::Drop(_)), "mixed document kept: {:?}", d.metadata);
    if let Some(s) = share {
        assert!(s > 0.3 && s < 0.7, "share {s}");
        assert_eq!(v, Verdict::Drop("mixed_language".into()));
    }
    // Pure Ukrainian lines have a low share.
    let mut d = Document::new("pure", uk_lines.join("\n"));
    let v = step.apply(&mut d, &mut StepStats::new("langid"));
    assert_eq!(v, Verdict::Modified, "{:?}", d.metadata);
    assert!(d.metadata["other_language_share"].as_f64().unwrap() < 0.2);
}


/// The cached evaluator (`lingua_fast`) gives lingua's answers: the same top language and
/// confidence values within float rounding for document prefixes, the same decision for
/// lines, on every text of the corpora here; and it answers for nearly all of them
/// (the rest go to lingua).
#[test]
fn fast_evaluator_gives_linguas_answers() {
    use hromada_data::steps::lingua_fast::FastLingua;
    use lingua::{Language, LanguageDetectorBuilder};
    let langs = [Language::Ukrainian, Language::Russian, Language::Belarusian, Language::English, Language::Polish, Language::Bulgarian];
    let fast = FastLingua::new(&langs).expect("models for the default languages");
    let lingua = LanguageDetectorBuilder::from_languages(&langs).with_preloaded_language_models().build();
    let prefix = |t: &str, n: usize| -> String { t.chars().take(n).collect() };
    let mut texts: Vec<String> = Vec::new();
    texts.extend(common::brown_uk().into_iter().map(|(_, t)| prefix(&t, 10_000)));
    texts.extend(common::ruslit().into_iter().map(|(_, t)| prefix(&t, 10_000)));
    texts.extend(common::laws().into_iter().flat_map(|(_, _, t)| t.lines().map(String::from).collect::<Vec<_>>()).filter(|l| !l.trim().is_empty()));
    for dir in [&lingua_ukrainian_language_model::UKRAINIAN_TESTDATA_DIRECTORY, &lingua_russian_language_model::RUSSIAN_TESTDATA_DIRECTORY] {
        for f in ["sentences.txt", "single-words.txt", "word-pairs.txt"] {
            texts.extend(dir.get_file(f).unwrap().contents_utf8().unwrap().lines().map(String::from));
        }
    }
    // Mixed scripts, empty and letterless texts, an English and a Polish sentence.
    texts.extend(["", "   ", "12345 - 678", "Закон України про UNESCO та NATO", "The quick brown fox jumps over the lazy dog", "Zażółć gęślą jaźń, ale wszystko w porządku"].map(String::from));
    let (mut answered, mut worst) = (0usize, 0f64);
    for t in &texts {
        let want = lingua.compute_language_confidence_values(t.as_str());
        if let Some(got) = fast.confidence_values(t) {
            answered += 1;
            assert_eq!(got.len(), want.len(), "{t}");
            // (With no letters lingua returns every language at 0.0, unsorted.)
            if want.iter().any(|w| w.1 > 0.0) {
                assert_eq!(got[0].0, want[0].0, "top language of {t:?}: {got:?} vs {want:?}");
            }
            for (g, w) in got.iter().zip(&want) {
                let wv = want.iter().find(|x| x.0 == g.0).map(|x| x.1).unwrap();
                worst = worst.max((g.1 - wv).abs());
                let _ = w;
            }
        }
    }
    let share = answered as f64 / texts.len() as f64;
    eprintln!("documents: {answered}/{} answered by the fast evaluator ({share:.4}), max |confidence difference| {worst:e}", texts.len());
    assert!(worst < 1e-9, "confidence values differ by {worst}");
    assert!(share > 0.9, "only {share} answered");
    // Lines, as the surzhyk pass sees them.
    let (mut lines, mut line_answered) = (0usize, 0usize);
    for t in texts.iter().take(1200) {
        for l in t.lines().map(str::trim).filter(|l| l.chars().count() >= 40) {
            let l: String = l.chars().take(1000).collect();
            lines += 1;
            if let Some(got) = fast.detect_language_of(&l) {
                line_answered += 1;
                assert_eq!(got, lingua.detect_language_of(l.as_str()), "line {l:?}");
            }
        }
    }
    eprintln!("lines: {line_answered}/{lines} answered by the fast evaluator");
    assert!(lines > 5000 && line_answered as f64 > 0.9 * lines as f64);
}
