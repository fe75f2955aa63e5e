//! Counters for a run: per step documents in, kept, modified and dropped by reason, extra
//! counters (PII by type, tokens), and fixed-bin histograms of document features. Task
//! stats are merged into one `stats.json`; merging is associative, so the totals do not
//! depend on how the run was sliced.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A fixed-bin histogram; values outside [lo, hi) land in the edge bins.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Histogram {
    pub lo: f64,
    pub hi: f64,
    /// Bins are log10-spaced when true (lengths), linear otherwise (scores).
    pub log: bool,
    pub bins: Vec<u64>,
    pub count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Histogram {
    pub fn new(lo: f64, hi: f64, n: usize, log: bool) -> Self {
        Self {
            lo,
            hi,
            log,
            bins: vec![0; n.max(1)],
            count: 0,
            sum: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
        }
    }

    pub fn observe(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        let (lo, hi, x) = if self.log {
            (self.lo.max(1e-12).log10(), self.hi.log10(), v.max(1e-12).log10())
        } else {
            (self.lo, self.hi, v)
        };
        let n = self.bins.len();
        let pos = ((x - lo) / (hi - lo) * n as f64).floor();
        let idx = if pos.is_nan() || pos < 0.0 {
            0
        } else {
            (pos as usize).min(n - 1)
        };
        self.bins[idx] += 1;
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    /// The [start, end) value range of bin `i`.
    pub fn bin_range(&self, i: usize) -> (f64, f64) {
        let n = self.bins.len() as f64;
        let t0 = i as f64 / n;
        let t1 = (i + 1) as f64 / n;
        if self.log {
            let (a, b) = (self.lo.max(1e-12).log10(), self.hi.log10());
            (10f64.powf(a + (b - a) * t0), 10f64.powf(a + (b - a) * t1))
        } else {
            (self.lo + (self.hi - self.lo) * t0, self.lo + (self.hi - self.lo) * t1)
        }
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.bins.len() != other.bins.len() || self.lo != other.lo || self.hi != other.hi {
            return;
        }
        for (a, b) in self.bins.iter_mut().zip(&other.bins) {
            *a += b;
        }
        self.count += other.count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// What one step did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StepStats {
    pub name: String,
    pub docs_in: u64,
    pub kept: u64,
    pub modified: u64,
    pub dropped: BTreeMap<String, u64>,
    /// Extra counts (e.g. `pii.phone`, `tokens`, `chars_removed`).
    pub counters: BTreeMap<String, u64>,
    pub histograms: BTreeMap<String, Histogram>,
}

impl StepStats {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            ..Default::default()
        }
    }

    pub fn count(&mut self, key: &str, n: u64) {
        if n > 0 {
            *self.counters.entry(key.to_string()).or_default() += n;
        }
    }

    pub fn drop_reason(&mut self, reason: &str) {
        *self.dropped.entry(reason.to_string()).or_default() += 1;
    }

    /// Record `v` in histogram `key`, created with (lo, hi, bins, log) on first use.
    pub fn observe(&mut self, key: &str, v: f64, spec: (f64, f64, usize, bool)) {
        self.histograms
            .entry(key.to_string())
            .or_insert_with(|| Histogram::new(spec.0, spec.1, spec.2, spec.3))
            .observe(v);
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().sum()
    }

    pub fn merge(&mut self, o: &StepStats) {
        self.docs_in += o.docs_in;
        self.kept += o.kept;
        self.modified += o.modified;
        for (k, v) in &o.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &o.counters {
            *self.counters.entry(k.clone()).or_default() += v;
        }
        for (k, h) in &o.histograms {
            match self.histograms.get_mut(k) {
                Some(mine) => mine.merge(h),
                None => {
                    self.histograms.insert(k.clone(), h.clone());
                }
            }
        }
    }
}

/// A problem met while reading, with where it happened.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Problem {
    pub file: String,
    /// 1-based line (JSONL, text per line) or record index (Parquet, JSON).
    pub line: u64,
    pub kind: String,
    pub message: String,
}

/// Everything a run (or one task of it) counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunStats {
    pub files: u64,
    pub bytes_read: u64,
    /// Documents read (every record, broken or not).
    pub docs_in: u64,
    pub docs_out: u64,
    /// The reader is the first "step": broken records are dropped there with a reason.
    pub steps: Vec<StepStats>,
    /// The first problems met (file, line, kind), capped per task.
    pub problems: Vec<Problem>,
    pub problems_total: u64,
    pub tasks: u64,
    pub elapsed_s: f64,
}

pub const MAX_PROBLEMS_PER_TASK: usize = 200;

impl RunStats {
    pub fn step_mut(&mut self, name: &str) -> &mut StepStats {
        if let Some(i) = self.steps.iter().position(|s| s.name == name) {
            return &mut self.steps[i];
        }
        self.steps.push(StepStats::new(name));
        let last = self.steps.len() - 1;
        &mut self.steps[last]
    }

    pub fn problem(&mut self, p: Problem) {
        self.problems_total += 1;
        if self.problems.len() < MAX_PROBLEMS_PER_TASK {
            self.problems.push(p);
        }
    }

    /// Total dropped over all steps.
    pub fn dropped_total(&self) -> u64 {
        self.steps.iter().map(|s| s.dropped_total()).sum()
    }

    pub fn merge(&mut self, o: &RunStats) {
        self.files += o.files;
        self.bytes_read += o.bytes_read;
        self.docs_in += o.docs_in;
        self.docs_out += o.docs_out;
        for s in &o.steps {
            self.step_mut(&s.name).merge(s);
        }
        self.problems_total += o.problems_total;
        for p in &o.problems {
            if self.problems.len() < MAX_PROBLEMS_PER_TASK * 4 {
                self.problems.push(p.clone());
            }
        }
        self.tasks += o.tasks;
        self.elapsed_s = self.elapsed_s.max(o.elapsed_s);
    }

    /// Every document is accounted for: read = written + dropped at some step.
    pub fn balanced(&self) -> bool {
        self.docs_in == self.docs_out + self.dropped_total()
    }
}
