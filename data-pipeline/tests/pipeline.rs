//! The executor end to end on real data: dedup of planted near-duplicates among the legal
//! acts, broken input accounted for with file and line, readers and writers round trip,
//! token shards.
mod common;
use hromada_data::exec::{run, RunOptions};
use hromada_data::shards::TokenShard;
use hromada_data::PipelineConfig;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;

fn config(dir: &Path, yaml: &str) -> PipelineConfig {
    let p = dir.join("pipeline.yaml");
    std::fs::write(&p, yaml).unwrap();
    PipelineConfig::load(&p, &[]).unwrap_or_else(|e| panic!("{e}"))
}

fn read_jsonl_zst(path: &Path) -> Vec<Value> {
    let mut s = String::new();
    zstd::stream::read::Decoder::new(std::fs::File::open(path).unwrap()).unwrap().read_to_string(&mut s).unwrap();
    s.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn all_docs(dir: &Path) -> Vec<Value> {
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.to_string_lossy().ends_with(".jsonl.zst")).collect();
    files.sort();
    files.iter().flat_map(|f| read_jsonl_zst(f)).collect()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }
}

/// Change `share` of the words of `text`: at random positions, or in one contiguous run.
fn perturb(text: &str, share: f64, scattered: bool, rng: &mut Rng, vocab: &[&str]) -> String {
    let mut words: Vec<String> = text.split(' ').map(String::from).collect();
    let n = ((words.len() as f64) * share).round() as usize;
    let start = (rng.next() as usize) % (words.len() - n);
    for k in 0..n {
        let i = if scattered { (rng.next() as usize) % words.len() } else { start + k };
        words[i] = vocab[(rng.next() as usize) % vocab.len()].to_string();
    }
    words.join(" ")
}

fn plant_corpus(dir: &Path, scattered: bool) -> (usize, Vec<String>) {
    let laws = common::laws();
    let vocab_src: String = common::brown_uk()[0].1.clone();
    let vocab: Vec<&str> = vocab_src.split_whitespace().filter(|w| w.chars().count() > 3).collect();
    let mut rng = Rng(7);
    let mut f = std::fs::File::create(dir.join("acts.jsonl")).unwrap();
    let mut planted = Vec::new();
    for (name, title, text) in &laws {
        writeln!(f, "{}", json!({"id": name, "text": text, "title": title})).unwrap();
    }
    // Near-duplicates of 6 sizeable acts, 5% of their words changed, and one exact copy.
    let big: Vec<&(String, String, String)> = laws.iter().filter(|l| l.2.split(' ').count() > 2000).take(6).collect();
    assert_eq!(big.len(), 6);
    for (name, _, text) in &big {
        let id = format!("{name}-near");
        writeln!(f, "{}", json!({"id": id, "text": perturb(text, 0.05, scattered, &mut rng, &vocab)})).unwrap();
        planted.push(id);
    }
    let id = format!("{}-exact", big[0].0);
    writeln!(f, "{}", json!({"id": id, "text": big[0].2})).unwrap();
    planted.push(id);
    (laws.len(), planted)
}

/// Exact Jaccard similarity of word 5-gram sets (what MinHash estimates).
fn jaccard5(a: &str, b: &str) -> f64 {
    let sh = |t: &str| -> std::collections::HashSet<Vec<String>> {
        let w: Vec<String> = hromada_data::steps::words(t).map(|x| x.to_lowercase()).collect();
        w.windows(5).map(|x| x.to_vec()).collect()
    };
    let (x, y) = (sh(a), sh(b));
    x.intersection(&y).count() as f64 / x.union(&y).count().max(1) as f64
}

/// Run dedup over the acts plus planted copies. `similar_ok`: originals may be merged
/// only with an act whose true Jaccard reaches it (None: never).
fn dedup_run(scattered: bool, dedup_cfg: &str, similar_ok: Option<f64>) {
    let dir = common::tmpdir(&format!("dedup-{scattered}"));
    let (n_acts, planted) = plant_corpus(&dir, scattered);
    let cfg = config(&dir, &format!("input: {{path: acts.jsonl}}\noutput: {{path: out, rejected: true}}\ntasks: 3\nsteps:\n  - dedup: {dedup_cfg}\n"));
    // Three files would be three tasks; one file is one task: split it to test across tasks.
    let stats = run(&cfg, &RunOptions::default()).unwrap();
    assert!(stats.balanced());
    assert_eq!(stats.docs_in as usize, n_acts + planted.len());
    let rejected = all_docs(&dir.join("out/rejected"));
    let dropped: Vec<String> = rejected.iter().map(|d| d["id"].as_str().unwrap().to_string()).collect();
    for p in &planted {
        assert!(dropped.contains(p), "planted duplicate {p} not found; dropped: {dropped:?}");
    }
    let extra: Vec<&Value> = rejected.iter().filter(|d| !planted.contains(&d["id"].as_str().unwrap().to_string())).collect();
    match similar_ok {
        None => assert!(extra.is_empty(), "distinct acts merged: {:?}", extra.iter().map(|d| &d["id"]).collect::<Vec<_>>()),
        Some(min) => {
            // Each merged original has a genuinely similar act among the kept ones.
            let laws = common::laws();
            for d in &extra {
                let t = d["text"].as_str().unwrap();
                let best = laws.iter().filter(|l| l.0 != d["id"].as_str().unwrap()).map(|l| jaccard5(t, &l.2)).fold(0.0, f64::max);
                eprintln!("also merged: {} (best true Jaccard {best:.3})", d["id"]);
                assert!(best >= min, "{} merged at true Jaccard {best}", d["id"]);
            }
        }
    }
    for d in &rejected {
        let reason = d["metadata"]["drop"]["reason"].as_str().unwrap();
        let id = d["id"].as_str().unwrap();
        assert_eq!(reason, if id.ends_with("-exact") { "exact_duplicate" } else { "near_duplicate" }, "{id}");
    }
    let kept = all_docs(&dir.join("out/docs"));
    assert_eq!(kept.len() + rejected.len(), n_acts + planted.len());
    // The act with a near and an exact copy heads a cluster of 3, the others of 2.
    let size = |id: &str| kept.iter().find(|d| d["id"] == id).and_then(|d| d["metadata"]["dedup_cluster_size"].as_u64());
    let heads: Vec<String> = planted.iter().filter(|p| p.ends_with("-near")).map(|p| p.trim_end_matches("-near").to_string()).collect();
    assert_eq!(size(&heads[0]), Some(3));
    for h in &heads[1..] {
        assert_eq!(size(h), Some(2), "{h}");
    }
    assert!(kept.iter().all(|d| d["metadata"]["dedup_cluster_size"].as_u64().is_some()));
    // Titles and other input fields survive in metadata.
    assert!(kept.iter().all(|d| d["metadata"]["title"].is_string()));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dedup_finds_contiguous_edits_with_defaults() {
    dedup_run(false, "{}", None);
}

#[test]
fn dedup_finds_scattered_edits_with_verified_lsh() {
    // 5% of words changed at random positions leaves a 5-gram Jaccard of about 0.63;
    // 14x8 bands find such a pair only ~30% of the time, 28x4 (the same 112 hashes)
    // ~99%. At that similarity two real acts are as close (two ministries' ethics codes
    // share 54-62% of their 5-grams), so merges among originals are allowed only where
    // the true Jaccard says they are that similar.
    dedup_run(true, "{bands: 28, rows: 4, min_similarity: 0.45}", Some(0.45));
}

#[test]
fn broken_input_is_counted_with_file_and_line() {
    let dir = common::tmpdir("broken");
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let good = common::brown_uk()[3].1.clone();
    let mut f = std::fs::File::create(input.join("a.jsonl")).unwrap();
    writeln!(f, "{}", json!({"id": "ok1", "text": good})).unwrap();
    writeln!(f, "{{\"id\": \"broken\", \"text\": \"unterminated").unwrap();
    writeln!(f, "{}", json!({"id": "empty", "text": "   \n "})).unwrap();
    f.write_all(b"{\"id\": \"badutf8\", \"text\": \"\xd0\xbf\xd1\x80\xff\xfe \xd1\x96\"}\n").unwrap();
    writeln!(f, "{}", json!({"id": "notext", "body": "x"})).unwrap();
    writeln!(f, "[1, 2, 3]").unwrap();
    writeln!(f, "{}", json!({"id": "ok2", "text": good, "metadata": {"source": "x"}})).unwrap();
    drop(f);
    // A 50 MB document.
    let mut big = String::with_capacity(50 << 20);
    while big.len() < 50 << 20 {
        big.push_str(&good);
        big.push('\n');
    }
    std::fs::write(input.join("b.jsonl"), format!("{}\n", json!({"id": "huge", "text": big}))).unwrap();
    drop(big);
    // A truncated gzip file: its complete lines are read, the cut is reported.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for i in 0..200 {
        writeln!(gz, "{}", json!({"id": format!("gz{i}"), "text": good})).unwrap();
    }
    let bytes = gz.finish().unwrap();
    std::fs::write(input.join("c.jsonl.gz"), &bytes[..bytes.len() / 2]).unwrap();
    let cfg = config(&dir, "input: {path: in}\noutput: {path: out, rejected: true}\nsteps:\n  - normalise: {}\n  - quality: {}\n  - pii: {}\n");
    let stats = run(&cfg, &RunOptions::default()).unwrap();
    assert!(stats.balanced(), "{stats:?}");
    let read = &stats.steps[0];
    assert_eq!(read.name, "read");
    assert_eq!(read.dropped.get("invalid_json"), Some(&1));
    assert_eq!(read.dropped.get("empty"), Some(&1));
    assert_eq!(read.dropped.get("missing_text"), Some(&1));
    assert_eq!(read.dropped.get("not_an_object"), Some(&1));
    assert_eq!(read.dropped.get("read_error"), Some(&1), "{:?}", read.dropped);
    assert_eq!(read.counters.get("invalid_utf8_replaced"), Some(&1));
    let find = |kind: &str| stats.problems.iter().find(|p| p.kind == kind).unwrap_or_else(|| panic!("no {kind} problem: {:?}", stats.problems));
    let p = find("invalid_json");
    assert_eq!((p.file.as_str(), p.line), ("a.jsonl", 2));
    assert_eq!(find("invalid_utf8").line, 4);
    assert_eq!(find("missing_text").line, 5);
    assert_eq!(find("not_an_object").line, 6);
    assert_eq!(find("read_error").file, "c.jsonl.gz");
    let gz_docs = stats.docs_in - 8;
    assert!(gz_docs > 10 && gz_docs < 200, "{gz_docs} documents read from the truncated gzip");
    // Nothing lost: the rejected sink holds every dropped record with its reason.
    let rejected = all_docs(&dir.join("out/rejected"));
    assert_eq!(rejected.len() as u64, stats.dropped_total());
    let broken = rejected.iter().find(|d| d["metadata"]["drop"]["reason"] == "invalid_json").unwrap();
    assert!(broken["text"].as_str().unwrap().contains("unterminated"), "the raw line is kept");
    assert_eq!(broken["metadata"]["drop"]["line"], 2);
    let kept = all_docs(&dir.join("out/docs"));
    let utf = kept.iter().find(|d| d["id"] == "badutf8");
    if let Some(d) = utf {
        assert!(d["text"].as_str().unwrap().contains('\u{fffd}'));
    }
    assert!(kept.iter().any(|d| d["id"] == "ok2" && d["metadata"]["source"] == "x"));
    // The huge document went through every step (its repeated text fails quality).
    assert!(rejected.iter().any(|d| d["id"] == "huge") || kept.iter().any(|d| d["id"] == "huge"));
    let html = std::fs::read_to_string(dir.join("out/report.html")).unwrap();
    assert!(html.contains("a.jsonl") && html.contains("invalid_json"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn readers_and_writers_round_trip() {
    let dir = common::tmpdir("formats");
    let docs: Vec<(String, String)> = common::brown_uk().into_iter().take(30).collect();
    // Text files, one document per file, into Parquet.
    let tdir = dir.join("txt");
    std::fs::create_dir_all(&tdir).unwrap();
    for (n, t) in &docs {
        std::fs::write(tdir.join(n), t).unwrap();
    }
    let cfg = config(&dir, "input: {path: txt}\noutput: {path: pq, format: parquet}\ntasks: 2\n");
    let s = run(&cfg, &RunOptions::default()).unwrap();
    assert_eq!((s.docs_in, s.docs_out), (30, 30));
    // Parquet back into JSONL.gz: ids and texts survive.
    let cfg = config(&dir, "input: {path: pq/docs}\noutput: {path: gz, format: jsonl.gz}\ntasks: 1\n");
    let s = run(&cfg, &RunOptions::default()).unwrap();
    assert_eq!(s.docs_out, 30);
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(dir.join("gz/docs/00000.jsonl.gz")).unwrap()).read_to_string(&mut text).unwrap();
    let back: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut got: Vec<(String, String)> = back.iter().map(|d| (d["id"].as_str().unwrap().to_string(), d["text"].as_str().unwrap().to_string())).collect();
    got.sort();
    assert_eq!(got, docs);
    // The legal acts through a JSON path: one document per provision, act fields in metadata.
    let cfg = config(&dir, &format!(
        "input: {{path: {}, format: json, json_path: 'provisions[*].content', json_metadata: [title, url]}}\noutput: {{path: laws, format: jsonl}}\ntasks: 2\n",
        common::shared_data().join("uk/laws/seed").display()
    ));
    let s = run(&cfg, &RunOptions::default()).unwrap();
    assert!(s.docs_out > 1000, "{}", s.docs_out);
    let first = std::fs::read_to_string(dir.join("laws/docs/00000.jsonl")).unwrap();
    let d: Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert!(d["id"].as_str().unwrap().contains("#provisions[0].content"), "{}", d["id"]);
    assert!(d["metadata"]["title"].is_string() && d["metadata"]["url"].is_string());
    // Text per line, zstd JSONL input.
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    for (i, (_, t)) in docs.iter().enumerate() {
        writeln!(enc, "{}", json!({"id": i, "text": t})).unwrap();
    }
    std::fs::write(dir.join("in.jsonl.zst"), enc.finish().unwrap()).unwrap();
    let cfg = config(&dir, "input: {path: in.jsonl.zst}\noutput: {path: z}\n");
    assert_eq!(run(&cfg, &RunOptions::default()).unwrap().docs_out, 30);
    let cfg = config(&dir, "input: {path: txt, per_line: true}\noutput: {path: lines}\n");
    let lines: usize = docs.iter().map(|(_, t)| t.lines().filter(|l| !l.trim().is_empty()).count()).sum();
    assert_eq!(run(&cfg, &RunOptions::default()).unwrap().docs_out as usize, lines);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_errors_name_the_problem() {
    let dir = common::tmpdir("cfg");
    let p = dir.join("p.yaml");
    std::fs::write(&p, "input: {path: x}\noutput: {path: o}\nsteps:\n  - langid: {threshhold: 0.5}\n").unwrap();
    let e = PipelineConfig::load(&p, &[]).unwrap_err().to_string();
    assert!(e.contains("p.yaml") && e.contains("threshhold"), "{e}");
    std::fs::write(&p, "input: {path: x}\noutput: {path: o}\nsteps:\n  - tokenize: {tokenizer: t}\n  - pii: {}\n").unwrap();
    assert!(PipelineConfig::load(&p, &[]).unwrap_err().to_string().contains("last step"));
    std::fs::write(&p, "input: {path: x}\noutput: {path: o}\nsteps:\n  - langid: {}\n").unwrap();
    let c = PipelineConfig::load(&p, &["steps.0.langid.threshold=0.7".into(), "tasks=3".into()]).unwrap();
    assert_eq!(c.tasks, Some(3));
    assert!(c.to_yaml().contains("threshold: 0.7"), "{}", c.to_yaml());
    assert!(PipelineConfig::load(&p, &["steps.5.x=1".into()]).is_err());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn token_shards_hold_every_document() {
    let model = hromada_models::model::cache_dir().join("models/smollm2-135m-instruct");
    assert!(model.exists(), "run scripts/setup.sh first ({} is missing)", model.display());
    let dir = common::tmpdir("tokens");
    let tdir = dir.join("txt");
    std::fs::create_dir_all(&tdir).unwrap();
    for (n, t) in common::brown_uk().into_iter().take(12) {
        std::fs::write(tdir.join(n), t).unwrap();
    }
    let cfg = config(&dir, "input: {path: txt}\noutput: {path: out}\ntasks: 2\nsteps:\n  - normalise: {}\n  - tokenize: {tokenizer: smollm2-135m}\n");
    let stats = run(&cfg, &RunOptions::default()).unwrap();
    assert_eq!(stats.docs_out, 12);
    let tok = hromada_models::model::load_tokenizer("smollm2-135m").unwrap();
    let sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(tok.json.to_string().as_bytes()))
    };
    let docs = all_docs(&dir.join("out/docs"));
    let mut n = 0;
    let mut total = 0;
    for t in 0..2 {
        let shard = TokenShard::open(&dir.join(format!("out/tokens/{t:05}.bin"))).unwrap();
        assert_eq!(shard.tokenizer_sha256_hex(), sha);
        assert_eq!(shard.vocab_size as usize, tok.vocab_size());
        total += shard.num_tokens;
        for i in 0..shard.num_docs {
            let ids = shard.doc(i).unwrap();
            assert_eq!(*ids.last().unwrap(), shard.eos, "every document ends with EOS");
            assert!(!ids[..ids.len() - 1].contains(&shard.eos));
            let text = tok.decode(&ids[..ids.len() - 1], false).unwrap();
            assert_eq!(text, docs[n]["text"].as_str().unwrap(), "document {n} decodes to its text");
            n += 1;
        }
        assert!(shard.doc(shard.num_docs).is_none());
    }
    assert_eq!(n, 12);
    assert_eq!(stats.steps.last().unwrap().counters["tokens"], total);
    // A truncated shard is refused with a clear error.
    let p = dir.join("out/tokens/00000.bin");
    let bytes = std::fs::read(&p).unwrap();
    let cut = dir.join("cut.bin");
    std::fs::write(&cut, &bytes[..bytes.len() - 5]).unwrap();
    let e = TokenShard::open(&cut).err().unwrap().to_string();
    assert!(e.contains("cut.bin") && e.contains("truncated"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
