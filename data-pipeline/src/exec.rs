//! The local executor. Input files are split round robin into `tasks` slices; each task
//! streams its files through the steps in batches (documents of a batch are processed in
//! parallel with rayon, then written in input order), so memory stays bounded and the
//! output does not depend on the number of threads. Every task writes its outputs to
//! temporary names, renames them, and writes its stats file last: that file is the
//! task's completion marker, and a re-run skips tasks that have it. `--shard i/N` runs
//! the tasks `t` with `t % N == i` (one Slurm array element).

use crate::config::{InputConfig, InputFormat, OutputFormat, PipelineConfig, StepConfig};
use crate::dedup::{self, Action, DedupConfig, DedupDirs, MinHasher, Signature};
use crate::error::{Error, Result};
use crate::read::{self, Record};
use crate::shards::{ShardTokenizer, ShardWriter, TokenizeConfig};
use crate::stats::{Problem, RunStats, StepStats};
use crate::steps::{langid::LangId, normalise::Normalise, pii::Pii, quality::Quality, Step, Verdict};
use crate::write::{write_atomic, DocWriter};
use crate::Document;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Every stage this invocation can run (all of them without `--shard`).
    All,
    Signatures,
    Buckets,
    Clusters,
    Filter,
    Report,
}

impl std::str::FromStr for Stage {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "all" => Stage::All,
            "signatures" => Stage::Signatures,
            "buckets" => Stage::Buckets,
            "clusters" => Stage::Clusters,
            "filter" => Stage::Filter,
            "report" => Stage::Report,
            _ => return Err(format!("unknown stage `{s}` (all, signatures, buckets, clusters, filter, report)")),
        })
    }
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    /// (i, N): run only slice i of N.
    pub shard: Option<(usize, usize)>,
    pub stage: Stage,
    pub progress: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { shard: None, stage: Stage::All, progress: false }
    }
}

/// Batches: at most this many documents or bytes of text are in flight per task.
const BATCH_DOCS: usize = 512;
const BATCH_BYTES: usize = 32 << 20;

/// The pipeline, split around `dedup`.
struct Built {
    pre: Vec<(String, Box<dyn Step>)>,
    dedup: Option<DedupConfig>,
    post: Vec<(String, Box<dyn Step>)>,
    tokenize: Option<TokenizeConfig>,
}

fn build_step(sc: &StepConfig) -> Result<Box<dyn Step>> {
    Ok(match sc {
        StepConfig::Normalise(c) => Box::new(Normalise::new(c)),
        StepConfig::Langid(c) => Box::new(LangId::new(c)?),
        StepConfig::Quality(c) => Box::new(Quality::new(c)),
        StepConfig::Pii(c) => Box::new(Pii::new(c)?),
        StepConfig::Dedup(_) | StepConfig::Tokenize(_) => {
            return Err(Error::Other(format!("{} is not a per-document step", sc.name())))
        }
    })
}

fn build(cfg: &PipelineConfig) -> Result<Built> {
    let mut b = Built { pre: Vec::new(), dedup: None, post: Vec::new(), tokenize: None };
    let mut seen: std::collections::HashMap<&str, usize> = Default::default();
    for sc in &cfg.steps {
        let n = seen.entry(sc.name()).or_default();
        *n += 1;
        let name = if *n == 1 { sc.name().to_string() } else { format!("{}#{}", sc.name(), n) };
        match sc {
            StepConfig::Dedup(d) => {
                MinHasher::new(d)?;
                b.dedup = Some(d.clone());
            }
            StepConfig::Tokenize(t) => b.tokenize = Some(t.clone()),
            other => {
                let s = build_step(other)?;
                if b.dedup.is_some() {
                    b.post.push((name, s));
                } else {
                    b.pre.push((name, s));
                }
            }
        }
    }
    Ok(b)
}

/// The input files of every task, in a fixed order.
pub struct Plan {
    pub files: Vec<PathBuf>,
    pub tasks: Vec<Vec<PathBuf>>,
    pub out: PathBuf,
}

pub fn plan(cfg: &PipelineConfig) -> Result<Plan> {
    let files = read::list_files(&cfg.input)?;
    let n = cfg.tasks.unwrap_or(files.len().min(64)).clamp(1, files.len().max(1));
    let mut tasks = vec![Vec::new(); n];
    for (i, f) in files.iter().enumerate() {
        tasks[i % n].push(f.clone());
    }
    Ok(Plan { files, tasks, out: cfg.output.path.clone() })
}

struct Layout<'a> {
    out: &'a Path,
    format: OutputFormat,
}

impl Layout<'_> {
    fn docs(&self, t: usize) -> PathBuf {
        self.out.join("docs").join(format!("{t:05}"))
    }
    fn rejected(&self, t: usize, stage: &str) -> PathBuf {
        self.out.join("rejected").join(format!("{stage}{t:05}"))
    }
    fn tokens(&self, t: usize) -> PathBuf {
        self.out.join("tokens").join(format!("{t:05}.bin"))
    }
    fn stats(&self, t: usize) -> PathBuf {
        self.out.join("stats").join(format!("{t:05}.json"))
    }
    fn sig_stats(&self, t: usize) -> PathBuf {
        self.out.join("dedup").join("stats").join(format!("{t:05}.json"))
    }
    fn intermediate(&self, t: usize) -> PathBuf {
        self.out.join("dedup").join("docs").join(format!("{t:05}"))
    }
}

/// Check (or write) `manifest.json`: a resumed run must be the same pipeline over the
/// same files, or its finished tasks would not match.
fn check_manifest(cfg: &PipelineConfig, plan: &Plan) -> Result<()> {
    let mut c = serde_json::to_value(cfg).map_err(|e| Error::Other(e.to_string()))?;
    if let Some(o) = c.get_mut("output").and_then(|o| o.as_object_mut()) {
        o.remove("report");
    }
    let manifest = json!({
        "config": c,
        "files": plan.files.iter().map(|f| f.to_string_lossy()).collect::<Vec<_>>(),
        "tasks": plan.tasks.len(),
    });
    let path = plan.out.join("manifest.json");
    if path.exists() {
        let old: Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        if old != manifest {
            return Err(Error::Other(format!(
                "{} was written by a different pipeline or input file list; resume needs the same ones (use a new output.path or delete the directory)",
                path.display()
            )));
        }
        return Ok(());
    }
    write_atomic(&path, serde_json::to_string_pretty(&manifest).unwrap_or_default().as_bytes())
}

fn in_shard(t: usize, shard: Option<(usize, usize)>) -> bool {
    shard.is_none_or(|(i, n)| t % n == i)
}

/// Run the pipeline (or the stage and slice `opts` ask for). Returns the merged stats
/// when the report stage ran, else the stats of what this call did.
pub fn run(cfg: &PipelineConfig, opts: &RunOptions) -> Result<RunStats> {
    if let Some((i, n)) = opts.shard {
        if n == 0 || i >= n {
            return Err(Error::Other(format!("--shard {i}/{n}: need 0 <= i < N")));
        }
    }
    let started = Instant::now();
    let built = build(cfg)?;
    let plan = plan(cfg)?;
    std::fs::create_dir_all(&plan.out).map_err(|e| Error::io(&plan.out, e))?;
    check_manifest(cfg, &plan)?;
    let tok = match &built.tokenize {
        Some(t) => Some(ShardTokenizer::load(t)?),
        None => None,
    };
    let layout = Layout { out: &plan.out, format: cfg.output.format };
    let ntasks = plan.tasks.len();
    let stage = opts.stage;
    let all = stage == Stage::All;
    if opts.shard.is_some() && all && built.dedup.is_some() {
        return Err(Error::Other(
            "a pipeline with dedup needs --stage with --shard (signatures, buckets, clusters, filter, report): dedup joins all slices".into(),
        ));
    }
    let mut done = RunStats::default();
    let runner = TaskRunner { cfg, built: &built, layout: &layout, tok: tok.as_ref(), progress: opts.progress };
    match &built.dedup {
        None => {
            if all || stage == Stage::Filter {
                done = runner.run_tasks(&plan, opts.shard, Mode::Single)?;
            }
        }
        Some(d) => {
            let dirs = DedupDirs::new(&plan.out);
            if all || stage == Stage::Signatures {
                done = runner.run_tasks(&plan, opts.shard, Mode::Signatures)?;
            }
            if all || stage == Stage::Buckets {
                let bands: Vec<usize> = (0..=d.bands).filter(|b| in_shard(*b, opts.shard)).collect();
                for t in 0..ntasks {
                    if !layout.sig_stats(t).exists() {
                        return Err(Error::Other(format!("buckets: the signatures of task {t} are missing (run --stage signatures for every slice first)")));
                    }
                }
                bands.par_iter().map(|&b| dedup::bucket_band(&dirs, ntasks, b, d).map(|_| ())).collect::<Result<Vec<()>>>()?;
            }
            if all || stage == Stage::Clusters {
                if !dirs.clusters_done().exists() {
                    for b in 0..=d.bands {
                        if !dirs.bucket(b).exists() {
                            return Err(Error::Other(format!("clusters: bucket {b} is missing (run --stage buckets first)")));
                        }
                    }
                    dedup::build_clusters(&dirs, ntasks, d.bands)?;
                }
            }
            if all || stage == Stage::Filter {
                if !dirs.clusters_done().exists() {
                    return Err(Error::Other("filter: the dedup clusters are missing (run --stage clusters first)".into()));
                }
                done = runner.run_tasks(&plan, opts.shard, Mode::Filter(&dirs))?;
            }
        }
    }
    let finished = (0..ntasks).all(|t| layout.stats(t).exists());
    if stage == Stage::Report || (finished && (opts.shard.is_none() || stage != Stage::Signatures)) {
        if !finished {
            return Err(Error::Other("report: not every task has finished".into()));
        }
        let mut merged = merge_stats(&layout, ntasks, built.dedup.is_some())?;
        merged.elapsed_s = started.elapsed().as_secs_f64();
        let mut v = serde_json::to_value(&merged).map_err(|e| Error::Other(e.to_string()))?;
        if let Value::Object(m) = &mut v {
            m.insert("balanced".into(), Value::Bool(merged.balanced()));
            m.insert("config".into(), serde_json::to_value(cfg).unwrap_or(Value::Null));
        }
        write_atomic(&plan.out.join("stats.json"), serde_json::to_string_pretty(&v).unwrap_or_default().as_bytes())?;
        if cfg.output.report {
            write_atomic(&plan.out.join("report.html"), crate::report::html(&merged, cfg).as_bytes())?;
        }
        return Ok(merged);
    }
    done.elapsed_s = started.elapsed().as_secs_f64();
    Ok(done)
}

fn read_stats(path: &Path) -> Result<RunStats> {
    let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&b).map_err(|e| Error::format(path, e.to_string()))
}

fn merge_stats(layout: &Layout, ntasks: usize, dedup: bool) -> Result<RunStats> {
    let mut total = RunStats::default();
    for t in 0..ntasks {
        let mut s = read_stats(&layout.stats(t))?;
        if dedup {
            let mut first = read_stats(&layout.sig_stats(t))?;
            first.docs_out = s.docs_out;
            first.steps.append(&mut s.steps);
            first.problems.append(&mut s.problems);
            first.problems_total += s.problems_total;
            s = first;
        }
        total.merge(&s);
    }
    Ok(total)
}

#[derive(Clone, Copy)]
enum Mode<'a> {
    /// No dedup: read input, all steps, write output.
    Single,
    /// Read input, steps before dedup, write intermediate docs and signatures.
    Signatures,
    /// Read intermediate docs, drop duplicates, steps after dedup, write output.
    Filter(&'a DedupDirs),
}

struct TaskRunner<'a> {
    cfg: &'a PipelineConfig,
    built: &'a Built,
    layout: &'a Layout<'a>,
    tok: Option<&'a ShardTokenizer>,
    progress: bool,
}

/// One document (or broken record) in flight.
struct Item {
    doc: Document,
    file: Arc<str>,
    line: u64,
    /// Set when dropped: (step, reason).
    dropped: Option<(String, String)>,
    sig: Option<Signature>,
    tokens: Option<Vec<u32>>,
}

impl TaskRunner<'_> {
    fn run_tasks(&self, plan: &Plan, shard: Option<(usize, usize)>, mode: Mode) -> Result<RunStats> {
        let todo: Vec<usize> = (0..plan.tasks.len())
            .filter(|&t| in_shard(t, shard))
            .filter(|&t| {
                let marker = match mode {
                    Mode::Signatures => self.layout.sig_stats(t),
                    _ => self.layout.stats(t),
                };
                !marker.exists()
            })
            .collect();
        let label = match mode {
            Mode::Single => "tasks",
            Mode::Signatures => "signatures",
            Mode::Filter(_) => "filter",
        };
        let bar = if self.progress {
            let b = indicatif::ProgressBar::new(todo.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} tasks, {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_prefix(label);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let docs = AtomicU64::new(0);
        let results: Vec<Result<RunStats>> = todo
            .par_iter()
            .map(|&t| {
                let r = self.run_task(t, &plan.tasks[t], mode, &docs, &bar);
                bar.inc(1);
                r
            })
            .collect();
        bar.finish_and_clear();
        let mut total = RunStats::default();
        for r in results {
            total.merge(&r?);
        }
        Ok(total)
    }

    fn run_task(&self, t: usize, files: &[PathBuf], mode: Mode, docs_seen: &AtomicU64, bar: &indicatif::ProgressBar) -> Result<RunStats> {
        let layout = self.layout;
        let mut stats = RunStats { tasks: 1, ..Default::default() };
        let (steps, stage_tag) = match mode {
            Mode::Single => (&self.built.pre, ""),
            Mode::Signatures => (&self.built.pre, "s1-"),
            Mode::Filter(_) => (&self.built.post, ""),
        };
        let hasher = match (mode, &self.built.dedup) {
            (Mode::Signatures, Some(d)) => Some(MinHasher::new(d)?),
            _ => None,
        };
        let clusters = match mode {
            Mode::Filter(dirs) => Some(dedup::read_clusters(dirs, t)?),
            _ => None,
        };
        let final_stage = !matches!(mode, Mode::Signatures);
        let mut writer = match mode {
            Mode::Signatures => Some(DocWriter::create(&layout.intermediate(t), OutputFormat::JsonlZst)?),
            _ if layout.format != OutputFormat::None => Some(DocWriter::create(&layout.docs(t), layout.format)?),
            _ => None,
        };
        let mut rejected = if self.cfg.output.rejected {
            Some(DocWriter::create(&layout.rejected(t, stage_tag), OutputFormat::JsonlZst)?)
        } else {
            None
        };
        let mut shard = match (final_stage, self.tok) {
            (true, Some(tok)) => Some(ShardWriter::create(&layout.tokens(t), tok)?),
            _ => None,
        };
        let mut sigs: Vec<Signature> = Vec::new();
        // Step stats in pipeline order: the reader ("read", or "dedup" in the filter
        // stage), then the steps, then tokenize.
        let head = if matches!(mode, Mode::Filter(_)) { "dedup" } else { "read" };
        let mut step_stats: Vec<StepStats> = std::iter::once(StepStats::new(head))
            .chain(steps.iter().map(|(n, _)| StepStats::new(n)))
            .collect();
        let mut tok_stats = StepStats::new("tokenize");

        let mut batch: Vec<Item> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut index: u32 = 0;
        let mut flush = |batch: &mut Vec<Item>, step_stats: &mut Vec<StepStats>, tok_stats: &mut StepStats, stats: &mut RunStats| -> Result<()> {
            self.process_batch(batch, steps, hasher.as_ref(), step_stats, tok_stats)?;
            for it in batch.drain(..) {
                match it.dropped {
                    None => {
                        stats.docs_out += 1;
                        if let Some(w) = writer.as_mut() {
                            w.write(&it.doc)?;
                        }
                        if let Some(s) = it.sig {
                            sigs.push(s);
                        }
                        if let (Some(sw), Some(tk)) = (shard.as_mut(), it.tokens.as_ref()) {
                            sw.add(tk)?;
                        }
                    }
                    Some((step, reason)) => {
                        if let Some(w) = rejected.as_mut() {
                            let mut d = it.doc;
                            d.metadata.insert("drop".into(), json!({"step": step, "reason": reason, "file": &*it.file, "line": it.line}));
                            w.write(&d)?;
                        }
                    }
                }
            }
            Ok(())
        };

        let push = |mut item: Item, batch: &mut Vec<Item>, batch_bytes: &mut usize, step_stats: &mut Vec<StepStats>, stats: &mut RunStats| -> bool {
            stats.docs_in += 1;
            let head = &mut step_stats[0];
            head.docs_in += 1;
            if item.dropped.is_none() && item.doc.text.trim().is_empty() {
                item.dropped = Some((head.name.clone(), "empty".into()));
            }
            match &item.dropped {
                Some((_, reason)) => head.drop_reason(reason),
                None => head.kept += 1,
            }
            step_stats[0].observe("chars_in", item.doc.text.chars().count() as f64, (1.0, 1e8, 32, true));
            *batch_bytes += item.doc.text.len();
            batch.push(item);
            batch.len() >= BATCH_DOCS || *batch_bytes >= BATCH_BYTES
        };

        let limit = self.cfg.input.limit.unwrap_or(u64::MAX);
        match mode {
            Mode::Single | Mode::Signatures => {
                for f in files {
                    stats.files += 1;
                    stats.bytes_read += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
                    let fname: Arc<str> = Arc::from(read::rel_name(f, &self.cfg.input.path).as_str());
                    let mut err = None;
                    let mut count = 0u64;
                    read::read_file(f, &self.cfg.input.path, &self.cfg.input, &mut |rec| {
                        if count >= limit {
                            return false;
                        }
                        count += 1;
                        let item = match rec {
                            Record::Doc { doc, line, invalid_utf8 } => {
                                if invalid_utf8 {
                                    step_stats[0].count("invalid_utf8_replaced", 1);
                                    step_stats[0].modified += 1;
                                    stats.problem(Problem { file: fname.to_string(), line, kind: "invalid_utf8".into(), message: "invalid UTF-8 replaced with U+FFFD".into() });
                                }
                                Item { doc, file: fname.clone(), line, dropped: None, sig: None, tokens: None }
                            }
                            Record::Broken { line, kind, message, raw } => {
                                stats.problem(Problem { file: fname.to_string(), line, kind: kind.into(), message: message.clone() });
                                let mut doc = Document::new(format!("{fname}:{line}"), raw);
                                doc.metadata.insert("error".into(), Value::String(message));
                                Item { doc, file: fname.clone(), line, dropped: Some(("read".into(), kind.to_string())), sig: None, tokens: None }
                            }
                        };
                        let full = push(item, &mut batch, &mut batch_bytes, &mut step_stats, &mut stats);
                        if full {
                            docs_seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
                            bar.set_message(format!("{} docs", docs_seen.load(Ordering::Relaxed)));
                            if let Err(e) = flush(&mut batch, &mut step_stats, &mut tok_stats, &mut stats) {
                                err = Some(e);
                                return false;
                            }
                            batch_bytes = 0;
                        }
                        true
                    })?;
                    if let Some(e) = err {
                        return Err(e);
                    }
                }
            }
            Mode::Filter(_) => {
                let clusters = clusters.unwrap_or_default();
                let path = layout.intermediate(t);
                let path = PathBuf::from(format!("{}.jsonl.zst", path.display()));
                let icfg = InputConfig::new(path.clone(), InputFormat::Jsonl);
                let fname: Arc<str> = Arc::from(format!("dedup/docs/{t:05}.jsonl.zst").as_str());
                let mut err = None;
                read::read_file(&path, &path, &icfg, &mut |rec| {
                    let idx = index;
                    index += 1;
                    let mut item = match rec {
                        Record::Doc { doc, line, .. } => Item { doc, file: fname.clone(), line, dropped: None, sig: None, tokens: None },
                        Record::Broken { line, kind, message, raw } => {
                            err = Some(Error::format(&path, format!("line {line}: {kind}: {message} ({} bytes)", raw.len())));
                            return false;
                        }
                    };
                    let (size, action) = clusters.get(&idx).copied().unwrap_or((1, Action::Keep));
                    item.doc.metadata.insert("dedup_cluster_size".into(), Value::from(size));
                    match action {
                        Action::Keep => {}
                        Action::DropExact => item.dropped = Some(("dedup".into(), "exact_duplicate".into())),
                        Action::DropNear => item.dropped = Some(("dedup".into(), "near_duplicate".into())),
                    }
                    if action == Action::Keep && size > 1 {
                        step_stats[0].count("clusters", 1);
                        step_stats[0].observe("cluster_size", size as f64, (1.0, 1e4, 20, true));
                    }
                    let full = push(item, &mut batch, &mut batch_bytes, &mut step_stats, &mut stats);
                    if full {
                        if let Err(e) = flush(&mut batch, &mut step_stats, &mut tok_stats, &mut stats) {
                            err = Some(e);
                            return false;
                        }
                        batch_bytes = 0;
                    }
                    true
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
            }
        }
        flush(&mut batch, &mut step_stats, &mut tok_stats, &mut stats)?;
        drop(flush);
        stats.steps = step_stats;
        if self.tok.is_some() && final_stage {
            stats.steps.push(tok_stats);
        }
        if let Some(w) = writer.take() {
            w.finish()?;
        }
        if let Some(w) = rejected.take() {
            w.finish()?;
        }
        if let Some(s) = shard.take() {
            s.finish()?;
        }
        if let (Mode::Signatures, Some(h)) = (mode, hasher.as_ref()) {
            let dirs = DedupDirs::new(layout.out);
            dedup::write_sigs(&dirs.sigs(t), h.config().bands, h.num_hashes(), &sigs)?;
        }
        let marker = match mode {
            Mode::Signatures => layout.sig_stats(t),
            _ => layout.stats(t),
        };
        write_atomic(&marker, serde_json::to_string(&stats).map_err(|e| Error::Other(e.to_string()))?.as_bytes())?;
        Ok(stats)
    }

    /// Run the steps (and signature/tokenization) over a batch in parallel chunks; the
    /// chunk-local stats are merged in order.
    fn process_batch(
        &self,
        batch: &mut [Item],
        steps: &[(String, Box<dyn Step>)],
        hasher: Option<&MinHasher>,
        step_stats: &mut [StepStats],
        tok_stats: &mut StepStats,
    ) -> Result<()> {
        let tok = self.tok;
        let tokenize_here = tok.is_some() && !matches!(hasher, Some(_));
        let locals: Vec<(Vec<StepStats>, StepStats, u64)> = batch
            .par_chunks_mut(8)
            .map(|chunk| {
                let mut local: Vec<StepStats> = steps.iter().map(|(n, _)| StepStats::new(n)).collect();
                let mut tl = StepStats::new("tokenize");
                let mut sig_us = 0u64;
                for it in chunk.iter_mut() {
                    if it.dropped.is_some() {
                        continue;
                    }
                    for (k, (name, step)) in steps.iter().enumerate() {
                        let st = &mut local[k];
                        st.docs_in += 1;
                        let t0 = Instant::now();
                        let verdict = step.apply(&mut it.doc, st);
                        st.count("time_us", t0.elapsed().as_micros() as u64);
                        match verdict {
                            Verdict::Keep => st.kept += 1,
                            Verdict::Modified => {
                                st.kept += 1;
                                st.modified += 1;
                            }
                            Verdict::Drop(reason) => {
                                st.drop_reason(&reason);
                                it.dropped = Some((name.clone(), reason));
                                break;
                            }
                        }
                    }
                    if it.dropped.is_some() {
                        continue;
                    }
                    if let Some(h) = hasher {
                        let t0 = Instant::now();
                        it.sig = Some(h.signature(&it.doc.text));
                        sig_us += t0.elapsed().as_micros() as u64;
                    }
                    if let (true, Some(tk)) = (tokenize_here, tok) {
                        tl.docs_in += 1;
                        let t0 = Instant::now();
                        let enc = tk.encode(&it.doc.text);
                        tl.count("time_us", t0.elapsed().as_micros() as u64);
                        match enc {
                            Ok(ids) => {
                                tl.kept += 1;
                                tl.count("tokens", ids.len() as u64);
                                tl.count("chars", it.doc.text.chars().count() as u64);
                                tl.count("words", crate::steps::words(&it.doc.text).count() as u64);
                                tl.observe("tokens_per_doc", ids.len() as f64, (1.0, 1e7, 28, true));
                                it.tokens = Some(ids);
                            }
                            Err(e) => {
                                tl.drop_reason("tokenizer_error");
                                it.dropped = Some(("tokenize".into(), format!("tokenizer_error: {e}")));
                            }
                        }
                    }
                }
                (local, tl, sig_us)
            })
            .collect();
        for (local, tl, sig_us) in locals {
            step_stats[0].count("signature_time_us", sig_us);
            for (k, s) in local.iter().enumerate() {
                step_stats[k + 1].merge(s);
            }
            tok_stats.merge(&tl);
        }
        // Length histogram of what reaches the end of this stage.
        for it in batch.iter() {
            if it.dropped.is_none() {
                step_stats[0].observe("chars_out", it.doc.text.chars().count() as f64, (1.0, 1e8, 32, true));
            }
        }
        Ok(())
    }
}
