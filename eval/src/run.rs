//! Running tasks against a backend, writing lm-eval-style results, and comparing runs.
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::backend::{rolling_windows, tokenize_request, Backend};
use crate::error::{Error, Result};
use crate::metrics;
use crate::task::{Doc, OutputType, Task};
use hromada_models::sampling::Rng;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub limit: Option<usize>,
    pub num_fewshot: usize,
    pub apply_chat_template: bool,
    /// Items per backend call.
    pub batch_items: usize,
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { limit: None, num_fewshot: 0, apply_chat_template: false, batch_items: 32, progress: false }
    }
}

/// One task's outcome: metric -> (value, stderr), per group too, and the per-item samples.
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub task: String,
    pub version: String,
    pub n: usize,
    pub metrics: BTreeMap<String, (f64, Option<f64>)>,
    pub groups: BTreeMap<String, BTreeMap<String, (f64, Option<f64>)>>,
    pub samples: Vec<Value>,
}

fn fewshot_ids(task: &Task, doc_index: usize, k: usize) -> Vec<usize> {
    let seed = task.spec.fewshot.as_ref().map(|f| f.seed).unwrap_or(1234);
    let mut rng = Rng::new(seed ^ (doc_index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let n = task.docs.len();
    let mut picked = Vec::new();
    let mut guard = 0;
    while picked.len() < k.min(n.saturating_sub(1)) && guard < 100 * (k + 1) {
        let j = (rng.next_u64() % n as u64) as usize;
        if j != doc_index && !picked.contains(&j) {
            picked.push(j);
        }
        guard += 1;
    }
    picked
}

/// The prompt of document `i`: description, few-shot examples (each its prompt, the
/// target delimiter and its gold answer), then the document's own prompt.
fn context(task: &Task, i: usize, k: usize) -> Result<String> {
    let d = &task.docs[i];
    let delim = task.spec.fewshot.as_ref().map(|f| f.delimiter.clone()).unwrap_or_else(|| "\n\n".into());
    let mut s = String::new();
    if !task.spec.description.is_empty() {
        s.push_str(&task.spec.description);
    }
    for j in fewshot_ids(task, i, k) {
        let fd = &task.docs[j];
        let answer = match task.spec.output_type {
            OutputType::MultipleChoice => {
                let c = task.choices(fd)?;
                c[task.target(fd, &c)?].clone()
            }
            _ => task.target_text(fd)?,
        };
        s.push_str(&task.text(fd)?);
        s.push_str(&task.spec.target_delimiter);
        s.push_str(&answer);
        s.push_str(&delim);
    }
    s.push_str(&task.text(d)?);
    Ok(s)
}

fn summarize(rows: &[(Option<String>, BTreeMap<String, f64>)]) -> (BTreeMap<String, (f64, Option<f64>)>, BTreeMap<String, BTreeMap<String, (f64, Option<f64>)>>) {
    let agg = |sel: &[&BTreeMap<String, f64>]| -> BTreeMap<String, (f64, Option<f64>)> {
        let mut keys: Vec<&String> = sel.iter().flat_map(|m| m.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .map(|k| {
                let v: Vec<f64> = sel.iter().filter_map(|m| m.get(k)).copied().collect();
                (k.clone(), (metrics::mean(&v), Some(metrics::stderr(&v)).filter(|s| s.is_finite())))
            })
            .collect()
    };
    let all: Vec<&BTreeMap<String, f64>> = rows.iter().map(|r| &r.1).collect();
    let mut groups = BTreeMap::new();
    let mut names: Vec<&String> = rows.iter().filter_map(|r| r.0.as_ref()).collect();
    names.sort();
    names.dedup();
    for g in names {
        let sel: Vec<&BTreeMap<String, f64>> = rows.iter().filter(|r| r.0.as_ref() == Some(g)).map(|r| &r.1).collect();
        groups.insert(g.clone(), agg(&sel));
    }
    (agg(&all), groups)
}

fn bar(opts: &RunOptions, n: usize, name: &str) -> indicatif::ProgressBar {
    let b = if opts.progress { indicatif::ProgressBar::new(n as u64) } else { indicatif::ProgressBar::hidden() };
    b.set_message(name.to_string());
    b
}

/// One per-item sample line: where the document came from, `extra` fields, the metrics.
fn sample(d: &Doc, i: usize, extra: Value, metrics: &BTreeMap<String, f64>) -> Value {
    let mut o = serde_json::Map::new();
    o.insert("doc_id".into(), json!(i));
    o.insert("source".into(), json!(d.source.display().to_string()));
    o.insert("line".into(), json!(d.line));
    if let Value::Object(e) = extra {
        o.extend(e);
    }
    for (k, v) in metrics {
        o.insert(k.clone(), json!(v));
    }
    Value::Object(o)
}

pub fn run_task(task: &Task, backend: &mut dyn Backend, opts: &RunOptions) -> Result<TaskResult> {
    let n = opts.limit.map(|l| l.min(task.docs.len())).unwrap_or(task.docs.len());
    let mut rows: Vec<(Option<String>, BTreeMap<String, f64>)> = Vec::with_capacity(n);
    let mut samples = Vec::with_capacity(n);
    let pb = bar(opts, n, &task.spec.task);
    match task.spec.output_type {
        OutputType::MultipleChoice => {
            let tok = backend.tokenizer().cloned().ok_or_else(|| Error::Other(format!("task {}: log-likelihood scoring needs the model's tokenizer (pass --tokenizer)", task.spec.task)))?;
            for start in (0..n).step_by(opts.batch_items.max(1)) {
                let end = (start + opts.batch_items.max(1)).min(n);
                let mut reqs = Vec::new();
                let mut info = Vec::new();
                for i in start..end {
                    let d = &task.docs[i];
                    let choices = task.choices(d)?;
                    let gold = task.target(d, &choices)?;
                    let ctx = context(task, i, opts.num_fewshot)?;
                    let conts: Vec<String> = choices.iter().map(|c| format!("{}{c}", task.spec.target_delimiter)).collect();
                    reqs.push(tokenize_request(&tok, &ctx, &conts)?);
                    info.push((i, choices, gold, conts, task.group(d)?));
                }
                let lls = backend.loglikelihood(&reqs)?;
                for ((i, choices, gold, conts, group), ll) in info.into_iter().zip(lls) {
                    let lp: Vec<f64> = ll.iter().map(|l| l.logprob).collect();
                    let by_chars: Vec<f64> = lp.iter().zip(&conts).map(|(l, c)| l / c.chars().count().max(1) as f64).collect();
                    let by_bytes: Vec<f64> = lp.iter().zip(&conts).map(|(l, c)| l / c.len().max(1) as f64).collect();
                    let pred = metrics::argmax(&lp);
                    let m: BTreeMap<String, f64> = [
                        ("acc".to_string(), (pred == gold) as u8 as f64),
                        ("acc_norm".to_string(), (metrics::argmax(&by_chars) == gold) as u8 as f64),
                        ("acc_bytes".to_string(), (metrics::argmax(&by_bytes) == gold) as u8 as f64),
                    ]
                    .into_iter()
                    .collect();
                    let greedy: Vec<bool> = ll.iter().map(|l| l.greedy).collect();
                    let extra = json!({"choices": choices, "loglikelihoods": lp, "is_greedy": greedy, "pred": pred, "gold": gold, "group": group});
                    samples.push(sample(&task.docs[i], i, extra, &m));
                    rows.push((group, m));
                }
                pb.set_position(end as u64);
            }
        }
        OutputType::LoglikelihoodRolling => {
            let tok = backend.tokenizer().cloned().ok_or_else(|| Error::Other(format!("task {}: perplexity needs the model's tokenizer (pass --tokenizer)", task.spec.task)))?;
            let prefix = tok.special.bos.as_ref().map(|b| b.0).or_else(|| tok.special.eos_ids().first().copied()).ok_or_else(|| Error::Other("the tokenizer has neither BOS nor EOS".into()))?;
            let r = task.spec.rolling.clone();
            let max_len = r.as_ref().map(|r| r.max_length).filter(|&m| m > 0).unwrap_or(backend.max_length()).min(backend.max_length());
            let stride = r.as_ref().map(|r| r.stride).filter(|&s| s > 0).unwrap_or(max_len / 2);
            // Corpus metrics are ratios of sums: keep the per-document sums.
            let (mut tot_nll, mut tot_words, mut tot_bytes, mut tot_tokens) = (0f64, 0usize, 0usize, 0usize);
            for i in 0..n {
                let d = &task.docs[i];
                let text = task.text(d)?;
                let ids = tok.encode(&text, false)?;
                if ids.is_empty() {
                    continue;
                }
                let windows = rolling_windows(prefix, &ids, max_len, stride);
                let scored = backend.score_window(&windows)?;
                let nll: f64 = -scored.iter().flatten().sum::<f64>();
                let words = text.split_whitespace().count();
                let bytes = text.len();
                tot_nll += nll;
                tot_words += words;
                tot_bytes += bytes;
                tot_tokens += ids.len();
                let group = task.group(d)?;
                let extra = json!({"nll": nll, "tokens": ids.len(), "words": words, "bytes": bytes, "windows": windows.len(), "group": group});
                samples.push(sample(d, i, extra, &BTreeMap::new()));
                rows.push((group, BTreeMap::new()));
                pb.set_position(i as u64 + 1);
            }
            let corpus = |nll: f64, words: usize, bytes: usize, tokens: usize| -> BTreeMap<String, (f64, Option<f64>)> {
                [
                    ("word_perplexity".to_string(), ((nll / words.max(1) as f64).exp(), None)),
                    ("byte_perplexity".to_string(), ((nll / bytes.max(1) as f64).exp(), None)),
                    ("bits_per_byte".to_string(), (nll / bytes.max(1) as f64 / std::f64::consts::LN_2, None)),
                    ("token_perplexity".to_string(), ((nll / tokens.max(1) as f64).exp(), None)),
                ]
                .into_iter()
                .collect()
            };
            let mut groups = BTreeMap::new();
            let mut by_group: BTreeMap<String, (f64, usize, usize, usize)> = BTreeMap::new();
            for s in &samples {
                if let Some(g) = s["group"].as_str() {
                    let e = by_group.entry(g.to_string()).or_default();
                    e.0 += s["nll"].as_f64().unwrap_or(0.0);
                    e.1 += s["words"].as_u64().unwrap_or(0) as usize;
                    e.2 += s["bytes"].as_u64().unwrap_or(0) as usize;
                    e.3 += s["tokens"].as_u64().unwrap_or(0) as usize;
                }
            }
            for (g, (a, b, c, t)) in by_group {
                groups.insert(g, corpus(a, b, c, t));
            }
            pb.finish_and_clear();
            return Ok(TaskResult { task: task.spec.task.clone(), version: task.spec.version.clone(), n: samples.len(), metrics: corpus(tot_nll, tot_words, tot_bytes, tot_tokens), groups, samples });
        }
        OutputType::GenerateUntil => {
            for i in 0..n {
                let d = &task.docs[i];
                let prompt = context(task, i, opts.num_fewshot)?;
                let out = backend.generate(&prompt, opts.apply_chat_template, &task.spec.until, task.spec.max_gen_toks)?;
                let gold = task.target_text(d)?;
                let pred = out.trim();
                let m: BTreeMap<String, f64> = [
                    ("exact_match".to_string(), (pred == gold.trim()) as u8 as f64),
                    ("f1".to_string(), metrics::f1(pred, &gold)),
                    ("chrf".to_string(), metrics::chrf(pred, &gold)),
                ]
                .into_iter()
                .collect();
                let group = task.group(d)?;
                samples.push(sample(d, i, json!({"output": out, "gold": gold, "group": group}), &m));
                rows.push((group, m));
                pb.set_position(i as u64 + 1);
            }
        }
    }
    pb.finish_and_clear();
    let (metrics, groups) = summarize(&rows);
    Ok(TaskResult { task: task.spec.task.clone(), version: task.spec.version.clone(), n: rows.len(), metrics, groups, samples })
}

/// sha256 of a model file, or of a directory's weight files in name order.
pub fn model_sha256(path: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path).ok()?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "safetensors")).collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    for f in files {
        let mut fh = std::fs::File::open(f).ok()?;
        std::io::copy(&mut fh, &mut h).ok()?;
    }
    Some(hex::encode(h.finalize()))
}

fn metric_json(m: &BTreeMap<String, (f64, Option<f64>)>) -> Value {
    let mut o = serde_json::Map::new();
    for (k, (v, se)) in m {
        o.insert(k.clone(), json!(v));
        o.insert(format!("{k}_stderr"), se.map(|s| json!(s)).unwrap_or(Value::Null));
    }
    Value::Object(o)
}

/// Write `results.json` and `samples_TASK.jsonl` into `out`; return the results JSON.
pub fn write_results(out: &Path, results: &[TaskResult], config: Value) -> Result<Value> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut res = serde_json::Map::new();
    let mut groups = serde_json::Map::new();
    let mut versions = serde_json::Map::new();
    let mut samples = serde_json::Map::new();
    for r in results {
        let mut m = metric_json(&r.metrics);
        if let Some(o) = m.as_object_mut() {
            o.insert("n".into(), json!(r.n));
        }
        res.insert(r.task.clone(), m);
        for (g, gm) in &r.groups {
            groups.insert(format!("{}:{g}", r.task), metric_json(gm));
        }
        versions.insert(r.task.clone(), json!(r.version));
        let name = format!("samples_{}.jsonl", r.task);
        let p = out.join(&name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?);
        for s in &r.samples {
            writeln!(f, "{s}").map_err(|e| Error::io(&p, e))?;
        }
        f.flush().map_err(|e| Error::io(&p, e))?;
        samples.insert(r.task.clone(), json!(name));
    }
    let v = json!({"results": res, "groups": groups, "versions": versions, "samples": samples, "config": config,
        "hromada_version": env!("CARGO_PKG_VERSION")});
    let p = out.join("results.json");
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap_or_default()).map_err(|e| Error::io(&p, e))?;
    Ok(v)
}

/// A Markdown table of every task's and group's metrics.
pub fn markdown(results: &[TaskResult]) -> String {
    let mut s = String::from("| task | n | metric | value | stderr |\n| --- | --- | --- | --- | --- |\n");
    let fmt = |v: f64| if v.abs() >= 100.0 { format!("{v:.2}") } else { format!("{v:.4}") };
    for r in results {
        for (k, (v, se)) in &r.metrics {
            s.push_str(&format!("| {} | {} | {k} | {} | {} |\n", r.task, r.n, fmt(*v), se.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())));
        }
        for (g, gm) in &r.groups {
            for (k, (v, se)) in gm {
                s.push_str(&format!("| {}:{g} | | {k} | {} | {} |\n", r.task, fmt(*v), se.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into())));
            }
        }
    }
    s
}

fn read_json(p: &Path) -> Result<Value> {
    let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&t).map_err(|e| Error::task(p, e.line(), format!("invalid JSON: {e}")))
}

fn samples_of(results_path: &Path, v: &Value, task: &str) -> Result<BTreeMap<u64, Value>> {
    let name = v["samples"][task].as_str().ok_or_else(|| Error::task(results_path, 0, format!("no samples file for {task}")))?;
    let p = results_path.parent().unwrap_or(Path::new(".")).join(name);
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    let mut m = BTreeMap::new();
    for (i, l) in text.lines().enumerate() {
        let s: Value = serde_json::from_str(l).map_err(|e| Error::task(&p, i + 1, format!("invalid JSON: {e}")))?;
        m.insert(s["doc_id"].as_u64().unwrap_or(i as u64), s);
    }
    Ok(m)
}

/// Per-task deltas (B - A) with a 95% paired-bootstrap interval over the shared items.
pub fn compare(a_path: &Path, b_path: &Path, reps: usize) -> Result<String> {
    let (a, b) = (read_json(a_path)?, read_json(b_path)?);
    let mut out = String::from("| task | metric | n | A | B | B - A | 95% CI |\n| --- | --- | --- | --- | --- | --- | --- |\n");
    let tasks: Vec<String> = a["results"].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    for t in tasks {
        if b["results"].get(&t).is_none() {
            continue;
        }
        let (sa, sb) = (samples_of(a_path, &a, &t)?, samples_of(b_path, &b, &t)?);
        let ids: Vec<u64> = sa.keys().filter(|k| sb.contains_key(k)).copied().collect();
        let pa: Vec<&Value> = ids.iter().map(|k| &sa[k]).collect();
        let pb: Vec<&Value> = ids.iter().map(|k| &sb[k]).collect();
        let per_item = ["acc", "acc_norm", "exact_match", "f1", "chrf"];
        for metric in per_item {
            if pa.first().is_none_or(|s| s.get(metric).is_none()) {
                continue;
            }
            let col = |v: &[&Value]| -> Vec<f64> { v.iter().map(|s| s[metric].as_f64().unwrap_or(f64::NAN)).collect() };
            let (xa, xb) = (col(&pa), col(&pb));
            let st = |x: Vec<f64>| move |idx: &[usize]| idx.iter().map(|&i| x[i]).sum::<f64>() / idx.len().max(1) as f64;
            let (d, lo, hi) = metrics::paired_bootstrap(ids.len(), reps, 17, st(xa.clone()), st(xb.clone()));
            out.push_str(&format!("| {t} | {metric} | {} | {:.4} | {:.4} | {d:+.4} | [{lo:+.4}, {hi:+.4}] |\n", ids.len(), metrics::mean(&xa), metrics::mean(&xb)));
        }
        if pa.first().is_some_and(|s| s.get("nll").is_some()) {
            let cols = |v: &[&Value]| -> (Vec<f64>, Vec<f64>) { (v.iter().map(|s| s["nll"].as_f64().unwrap_or(0.0)).collect(), v.iter().map(|s| s["bytes"].as_f64().unwrap_or(0.0)).collect()) };
            let (na, ba) = cols(&pa);
            let (nb, bb) = cols(&pb);
            let bpb = |n: Vec<f64>, b: Vec<f64>| move |idx: &[usize]| idx.iter().map(|&i| n[i]).sum::<f64>() / idx.iter().map(|&i| b[i]).sum::<f64>().max(1.0) / std::f64::consts::LN_2;
            let all: Vec<usize> = (0..ids.len()).collect();
            let (va, vb) = (bpb(na.clone(), ba.clone())(&all), bpb(nb.clone(), bb.clone())(&all));
            let (d, lo, hi) = metrics::paired_bootstrap(ids.len(), reps, 17, bpb(na, ba), bpb(nb, bb));
            out.push_str(&format!("| {t} | bits_per_byte | {} | {va:.4} | {vb:.4} | {d:+.4} | [{lo:+.4}, {hi:+.4}] |\n", ids.len()));
        }
    }
    Ok(out)
}
