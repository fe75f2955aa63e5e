//! Deduplication: exact (a 128-bit hash of the text as it reaches the step, i.e. after
//! normalisation) and near-duplicate MinHash with LSH over word n-grams, in the stages
//! datatrove uses so that it works across slices run on different machines:
//!
//! 1. `signatures` (per task): every document's exact hash, its `bands` band hashes and
//!    its full MinHash signature go to `dedup/sigs/NNNNN.bin` (fixed-size records).
//! 2. `buckets` (per band, parallel): documents sharing a band hash (or the exact hash,
//!    an extra "band") are candidate pairs, written to `dedup/buckets/BBB.bin`. With
//!    `min_similarity`, a pair is kept only when the share of equal MinHash values (the
//!    Jaccard estimate) reaches it, which removes LSH false positives.
//! 3. `clusters`: union-find over all pairs; the first document of a cluster (in input
//!    order) is kept, the others are dropped as `exact_duplicate` or `near_duplicate`;
//!    `dedup/clusters/NNNNN.bin` lists, per task, the documents in clusters.
//! 4. `filter` (per task, in `exec`): drops the duplicates and writes the cluster size to
//!    `metadata.dedup_cluster_size` of every kept document (1 for a unique one).

use crate::error::{Error, Result};
use crate::write::write_atomic;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DedupConfig {
    /// Drop documents whose text is identical to an earlier one.
    pub exact: bool,
    /// MinHash near-duplicate detection.
    pub near: bool,
    /// Words per shingle.
    pub ngram: usize,
    pub bands: usize,
    pub rows: usize,
    pub seed: u64,
    /// Keep a candidate pair only if the MinHash Jaccard estimate (the share of equal
    /// hash values over all `bands * rows`) reaches this. The default, 0.7, is about
    /// where 14x8 bands are designed to switch ((1/14)^(1/8) = 0.72): candidates far
    /// below it are LSH false positives (datatrove keeps them; `null` does the same).
    pub min_similarity: Option<f64>,
}

impl Default for DedupConfig {
    fn default() -> Self {
        Self { exact: true, near: true, ngram: 5, bands: 14, rows: 8, seed: 1, min_similarity: Some(0.7) }
    }
}

const P61: u64 = (1 << 61) - 1;

/// Computes signatures with `bands * rows` hash functions `(a*x + b) mod (2^61 - 1)`.
pub struct MinHasher {
    cfg: DedupConfig,
    coef: Vec<(u64, u64)>,
}

/// One document's dedup record.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub exact: u128,
    /// False for a document without words (never a near duplicate).
    pub has_shingles: bool,
    pub bands: Vec<u64>,
    pub minhash: Vec<u32>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mulmod61(a: u64, x: u64, b: u64) -> u64 {
    let v = (a as u128) * (x as u128) + b as u128;
    let lo = (v as u64) & P61;
    let hi = (v >> 61) as u64;
    let mut r = lo + (hi & P61) + (hi >> 61);
    while r >= P61 {
        r -= P61;
    }
    r
}

impl MinHasher {
    pub fn new(cfg: &DedupConfig) -> Result<Self> {
        if cfg.ngram == 0 || cfg.bands == 0 || cfg.rows == 0 {
            return Err(Error::Other("dedup: ngram, bands and rows must be at least 1".into()));
        }
        if cfg.bands * cfg.rows > 1024 {
            return Err(Error::Other("dedup: bands * rows must be at most 1024".into()));
        }
        let mut s = cfg.seed;
        let coef = (0..cfg.bands * cfg.rows)
            .map(|_| ((splitmix(&mut s) % (P61 - 1)) + 1, splitmix(&mut s) % P61))
            .collect();
        Ok(Self { cfg: cfg.clone(), coef })
    }

    pub fn config(&self) -> &DedupConfig {
        &self.cfg
    }

    pub fn num_hashes(&self) -> usize {
        self.coef.len()
    }

    pub fn signature(&self, text: &str) -> Signature {
        let exact = xxhash_rust::xxh3::xxh3_128(text.as_bytes());
        let k = self.coef.len();
        let mut mins = vec![u64::MAX; k];
        let words: Vec<String> = crate::steps::words(text).map(|w| w.to_lowercase()).collect();
        let n = self.cfg.ngram;
        let mut shingles = 0usize;
        let mut add = |ws: &[String]| {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for w in ws {
                h.update(w.as_bytes());
                h.update(b" ");
            }
            let x = h.digest() & P61;
            for (m, &(a, b)) in mins.iter_mut().zip(&self.coef) {
                let v = mulmod61(a, x, b);
                if v < *m {
                    *m = v;
                }
            }
        };
        if !words.is_empty() && words.len() < n {
            add(&words);
            shingles = 1;
        } else {
            for w in words.windows(n) {
                add(w);
                shingles += 1;
            }
        }
        let has = shingles > 0;
        let r = self.cfg.rows;
        let bands = (0..self.cfg.bands)
            .map(|b| {
                let mut bytes = Vec::with_capacity(r * 8);
                for v in &mins[b * r..(b + 1) * r] {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
                xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, b as u64)
            })
            .collect();
        Signature { exact, has_shingles: has, bands, minhash: mins.iter().map(|&v| v as u32).collect() }
    }
}

/// The Jaccard estimate of two signatures: the share of equal MinHash values.
pub fn similarity(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return 0.0;
    }
    a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
}

const SIG_MAGIC: &[u8; 8] = b"HRMDSIG1";
const SIG_HEADER: usize = 32;

/// Fixed-size signature records of one task.
pub struct SigFile {
    map: memmap2::Mmap,
    pub docs: usize,
    pub bands: usize,
    pub hashes: usize,
    rec: usize,
}

fn record_size(bands: usize, hashes: usize) -> usize {
    4 + 16 + 8 * bands + 4 * hashes
}

pub fn write_sigs(path: &Path, bands: usize, hashes: usize, sigs: &[Signature]) -> Result<()> {
    let mut out = Vec::with_capacity(SIG_HEADER + sigs.len() * record_size(bands, hashes));
    out.extend_from_slice(SIG_MAGIC);
    out.extend_from_slice(&(sigs.len() as u64).to_le_bytes());
    out.extend_from_slice(&(bands as u32).to_le_bytes());
    out.extend_from_slice(&(hashes as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 8]);
    for s in sigs {
        out.extend_from_slice(&(s.has_shingles as u32).to_le_bytes());
        out.extend_from_slice(&s.exact.to_le_bytes());
        for b in &s.bands {
            out.extend_from_slice(&b.to_le_bytes());
        }
        for m in &s.minhash {
            out.extend_from_slice(&m.to_le_bytes());
        }
    }
    write_atomic(path, &out)
}

impl SigFile {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only map of a file written once by `write_sigs` (atomic rename).
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        if map.len() < SIG_HEADER || &map[..8] != SIG_MAGIC {
            return Err(Error::format(path, "not a signature file"));
        }
        let docs = u64::from_le_bytes(map[8..16].try_into().unwrap_or([0; 8])) as usize;
        let bands = u32::from_le_bytes(map[16..20].try_into().unwrap_or([0; 4])) as usize;
        let hashes = u32::from_le_bytes(map[20..24].try_into().unwrap_or([0; 4])) as usize;
        let rec = record_size(bands, hashes);
        if map.len() != SIG_HEADER + docs * rec {
            return Err(Error::format(path, "signature file is truncated"));
        }
        Ok(Self { map, docs, bands, hashes, rec })
    }

    fn at(&self, i: usize) -> &[u8] {
        &self.map[SIG_HEADER + i * self.rec..SIG_HEADER + (i + 1) * self.rec]
    }
    pub fn has_shingles(&self, i: usize) -> bool {
        self.at(i)[0] != 0
    }
    pub fn exact(&self, i: usize) -> u128 {
        u128::from_le_bytes(self.at(i)[4..20].try_into().unwrap_or([0; 16]))
    }
    pub fn band(&self, i: usize, b: usize) -> u64 {
        let o = 20 + 8 * b;
        u64::from_le_bytes(self.at(i)[o..o + 8].try_into().unwrap_or([0; 8]))
    }
    pub fn minhash(&self, i: usize) -> Vec<u32> {
        let r = self.at(i);
        let o = 20 + 8 * self.bands;
        (0..self.hashes).map(|k| u32::from_le_bytes(r[o + 4 * k..o + 4 * k + 4].try_into().unwrap_or([0; 4]))).collect()
    }
}

/// The dedup working directories of a run.
pub struct DedupDirs {
    pub root: PathBuf,
}

impl DedupDirs {
    pub fn new(out: &Path) -> Self {
        Self { root: out.join("dedup") }
    }
    pub fn sigs(&self, task: usize) -> PathBuf {
        self.root.join("sigs").join(format!("{task:05}.bin"))
    }
    pub fn bucket(&self, band: usize) -> PathBuf {
        self.root.join("buckets").join(format!("{band:03}.bin"))
    }
    pub fn clusters(&self, task: usize) -> PathBuf {
        self.root.join("clusters").join(format!("{task:05}.bin"))
    }
    pub fn clusters_done(&self) -> PathBuf {
        self.root.join("clusters").join("DONE")
    }
}

/// Stage 2: candidate pairs of one band (`band == bands` is the exact-hash band).
/// A pair is (task_a, idx_a, task_b, idx_b), the first being the earlier document.
pub fn bucket_band(dirs: &DedupDirs, tasks: usize, band: usize, cfg: &DedupConfig) -> Result<u64> {
    let out = dirs.bucket(band);
    if out.exists() {
        return Ok(0);
    }
    let files: Vec<SigFile> = (0..tasks).map(|t| SigFile::open(&dirs.sigs(t))).collect::<Result<_>>()?;
    let exact_band = files.first().map(|f| f.bands).unwrap_or(cfg.bands) == band;
    let mut entries: Vec<(u128, u32, u32)> = Vec::new();
    for (t, f) in files.iter().enumerate() {
        for i in 0..f.docs {
            if exact_band {
                entries.push((f.exact(i), t as u32, i as u32));
            } else if f.has_shingles(i) {
                entries.push((f.band(i, band) as u128, t as u32, i as u32));
            }
        }
    }
    entries.sort_unstable();
    let mut pairs = Vec::new();
    let mut i = 0;
    while i < entries.len() {
        let mut j = i + 1;
        while j < entries.len() && entries[j].0 == entries[i].0 {
            j += 1;
        }
        let (_, ta, ia) = entries[i];
        for &(_, tb, ib) in &entries[i + 1..j] {
            if !exact_band {
                if let Some(min) = cfg.min_similarity {
                    let s = similarity(&files[ta as usize].minhash(ia as usize), &files[tb as usize].minhash(ib as usize));
                    if s < min {
                        continue;
                    }
                }
            }
            for v in [ta, ia, tb, ib] {
                pairs.extend_from_slice(&v.to_le_bytes());
            }
        }
        i = j;
    }
    let n = pairs.len() as u64 / 16;
    write_atomic(&out, &pairs)?;
    Ok(n)
}

/// What the filter stage does with a document in a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Keep = 0,
    DropExact = 1,
    DropNear = 2,
}

/// Stage 3: union-find over every band's pairs; writes per-task cluster files.
/// Returns (clusters with at least two documents, documents to drop).
pub fn build_clusters(dirs: &DedupDirs, tasks: usize, bands: usize) -> Result<(u64, u64)> {
    let files: Vec<SigFile> = (0..tasks).map(|t| SigFile::open(&dirs.sigs(t))).collect::<Result<_>>()?;
    let mut base = Vec::with_capacity(tasks + 1);
    let mut total = 0usize;
    for f in &files {
        base.push(total);
        total += f.docs;
    }
    base.push(total);
    let mut parent: Vec<u32> = (0..total as u32).collect();
    fn find(p: &mut [u32], mut x: u32) -> u32 {
        while p[x as usize] != x {
            let gp = p[p[x as usize] as usize];
            p[x as usize] = gp;
            x = gp;
        }
        x
    }
    for band in 0..=bands {
        let path = dirs.bucket(band);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.len() % 16 != 0 {
            return Err(Error::format(&path, "bucket file is truncated"));
        }
        for rec in bytes.chunks_exact(16) {
            let v = |k: usize| u32::from_le_bytes([rec[k], rec[k + 1], rec[k + 2], rec[k + 3]]) as usize;
            let (ta, ia, tb, ib) = (v(0), v(4), v(8), v(12));
            if ta >= tasks || tb >= tasks || ia >= files[ta].docs || ib >= files[tb].docs {
                return Err(Error::format(&path, "bucket entry out of range"));
            }
            let a = find(&mut parent, (base[ta] + ia) as u32);
            let b = find(&mut parent, (base[tb] + ib) as u32);
            if a != b {
                // The smaller id (earlier document) stays the root.
                let (lo, hi) = if a < b { (a, b) } else { (b, a) };
                parent[hi as usize] = lo;
            }
        }
    }
    let mut size = vec![0u32; total];
    for x in 0..total as u32 {
        let r = find(&mut parent, x);
        size[r as usize] += 1;
    }
    let (mut clusters, mut dropped) = (0u64, 0u64);
    for (t, f) in files.iter().enumerate() {
        let mut out = Vec::new();
        for i in 0..f.docs {
            let g = (base[t] + i) as u32;
            let r = find(&mut parent, g);
            let n = size[r as usize];
            if n < 2 {
                continue;
            }
            let action = if r == g {
                clusters += 1;
                Action::Keep
            } else {
                dropped += 1;
                let rt = base.partition_point(|&b| b <= r as usize) - 1;
                let ri = r as usize - base[rt];
                if files[rt].exact(ri) == f.exact(i) {
                    Action::DropExact
                } else {
                    Action::DropNear
                }
            };
            for v in [i as u32, n, action as u32] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        write_atomic(&dirs.clusters(t), &out)?;
    }
    write_atomic(&dirs.clusters_done(), b"done\n")?;
    Ok((clusters, dropped))
}

/// A task's cluster entries: index -> (cluster size, action).
pub fn read_clusters(dirs: &DedupDirs, task: usize) -> Result<std::collections::HashMap<u32, (u32, Action)>> {
    let path = dirs.clusters(task);
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    if bytes.len() % 12 != 0 {
        return Err(Error::format(&path, "cluster file is truncated"));
    }
    Ok(bytes
        .chunks_exact(12)
        .map(|r| {
            let v = |k: usize| u32::from_le_bytes([r[k], r[k + 1], r[k + 2], r[k + 3]]);
            let a = match v(8) {
                1 => Action::DropExact,
                2 => Action::DropNear,
                _ => Action::Keep,
            };
            (v(0), (v(4), a))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn similar_texts_share_bands() {
        let h = MinHasher::new(&DedupConfig::default()).unwrap();
        let a: String = (0..400).map(|i| format!("слово{} ", i % 97 + i / 3)).collect();
        let sa = h.signature(&a);
        let sb = h.signature(&a.clone());
        assert_eq!(sa, sb);
        let other: String = (0..400).map(|i| format!("інше{} ", i * 7)).collect();
        let so = h.signature(&other);
        assert!(similarity(&sa.minhash, &so.minhash) < 0.1);
        assert!(sa.bands.iter().zip(&so.bands).all(|(x, y)| x != y));
        assert!(!h.signature("").has_shingles);
        assert!(h.signature("два слова").has_shingles);
    }

    #[test]
    fn mulmod_matches_u128() {
        for (a, x, b) in [(P61 - 1, P61 - 1, P61 - 1), (12345, 67890, 5), (1 << 60, 3, 7)] {
            let want = ((a as u128 * x as u128 + b as u128) % P61 as u128) as u64;
            assert_eq!(mulmod61(a, x, b), want);
        }
    }
}
