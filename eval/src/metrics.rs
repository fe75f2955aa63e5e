//! Metrics and their uncertainty: means with the standard error of the mean (sample
//! standard deviation / sqrt(n), as lm-eval), corpus perplexities, token F1, chrF, and a
//! paired bootstrap for comparing two runs item by item.
use hromada_models::sampling::Rng;

pub fn mean(x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NAN;
    }
    x.iter().sum::<f64>() / x.len() as f64
}

/// Standard error of the mean (n - 1 in the variance).
pub fn stderr(x: &[f64]) -> f64 {
    let n = x.len();
    if n < 2 {
        return f64::NAN;
    }
    let m = mean(x);
    let var = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (var / n as f64).sqrt()
}

/// Index of the largest value (first on ties).
pub fn argmax(x: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// SQuAD-style token F1 (lower-cased, punctuation stripped, whitespace tokens).
pub fn f1(pred: &str, gold: &str) -> f64 {
    let norm = |s: &str| -> Vec<String> {
        s.to_lowercase().chars().map(|c| if c.is_alphanumeric() || c.is_whitespace() || c == '\'' || c == '’' { c } else { ' ' }).collect::<String>().split_whitespace().map(String::from).collect()
    };
    let (p, g) = (norm(pred), norm(gold));
    if p.is_empty() || g.is_empty() {
        return if p == g { 1.0 } else { 0.0 };
    }
    let mut gc: std::collections::HashMap<&str, i64> = std::collections::HashMap::new();
    for t in &g {
        *gc.entry(t).or_default() += 1;
    }
    let mut same = 0;
    for t in &p {
        if let Some(c) = gc.get_mut(t.as_str()) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let (pr, rc) = (same as f64 / p.len() as f64, same as f64 / g.len() as f64);
    2.0 * pr * rc / (pr + rc)
}

/// chrF (character n-grams 1..=6, beta 2, whitespace removed), on a 0-100 scale, as
/// sacreBLEU's sentence chrF.
pub fn chrf(pred: &str, gold: &str) -> f64 {
    let (p, g): (Vec<char>, Vec<char>) = (pred.chars().filter(|c| !c.is_whitespace()).collect(), gold.chars().filter(|c| !c.is_whitespace()).collect());
    let (mut prec, mut rec, mut n_ok) = (0.0, 0.0, 0);
    for n in 1..=6 {
        let grams = |s: &[char]| -> std::collections::HashMap<Vec<char>, i64> {
            let mut m = std::collections::HashMap::new();
            if s.len() >= n {
                for w in s.windows(n) {
                    *m.entry(w.to_vec()).or_default() += 1;
                }
            }
            m
        };
        let (pg, gg) = (grams(&p), grams(&g));
        let (tp, tg): (i64, i64) = (pg.values().sum(), gg.values().sum());
        if tp == 0 || tg == 0 {
            continue;
        }
        let m: i64 = pg.iter().map(|(k, v)| (*v).min(*gg.get(k).unwrap_or(&0))).sum();
        prec += m as f64 / tp as f64;
        rec += m as f64 / tg as f64;
        n_ok += 1;
    }
    if n_ok == 0 {
        return 0.0;
    }
    let (prec, rec) = (prec / n_ok as f64, rec / n_ok as f64);
    if prec + rec == 0.0 {
        return 0.0;
    }
    let b2 = 4.0;
    100.0 * (1.0 + b2) * prec * rec / (b2 * prec + rec)
}

/// Paired bootstrap of `stat(b) - stat(a)` over matched items: (delta, 2.5%, 97.5%).
/// `stat` maps a resample (item indices) to the metric, so ratio metrics (bits per byte)
/// resample numerator and denominator together.
pub fn paired_bootstrap(n: usize, reps: usize, seed: u64, stat_a: impl Fn(&[usize]) -> f64, stat_b: impl Fn(&[usize]) -> f64) -> (f64, f64, f64) {
    let reps = reps.max(1);
    let all: Vec<usize> = (0..n).collect();
    let delta = stat_b(&all) - stat_a(&all);
    if n == 0 {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let mut rng = Rng::new(seed);
    let mut ds: Vec<f64> = (0..reps)
        .map(|_| {
            let idx: Vec<usize> = (0..n).map(|_| (rng.next_u64() % n as u64) as usize).collect();
            stat_b(&idx) - stat_a(&idx)
        })
        .collect();
    ds.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| ds[((reps as f64 - 1.0) * p).round() as usize];
    (delta, q(0.025), q(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_stderr() {
        let x = [1.0, 0.0, 1.0, 1.0];
        assert_eq!(mean(&x), 0.75);
        assert!((stderr(&x) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn f1_and_chrf() {
        assert_eq!(f1("Київ — столиця", "столиця Київ"), 1.0);
        assert!((f1("the cat sat", "the cat") - 0.8).abs() < 1e-12);
        assert_eq!(chrf("abc", "abc"), 100.0);
        assert_eq!(chrf("xyz", "abc"), 0.0);
        let c = chrf("Київ столиця", "Київ є столицею");
        assert!(c > 30.0 && c < 100.0, "{c}");
    }

    #[test]
    fn bootstrap_interval_covers_the_delta() {
        let a: Vec<f64> = (0..200).map(|i| (i % 2) as f64).collect();
        let b: Vec<f64> = (0..200).map(|i| if i % 4 == 0 { 0.0 } else { 1.0 }).collect();
        let s = |v: &Vec<f64>| { let v = v.clone(); move |idx: &[usize]| idx.iter().map(|&i| v[i]).sum::<f64>() / idx.len() as f64 };
        let (d, lo, hi) = paired_bootstrap(200, 1000, 1, s(&a), s(&b));
        assert!((d - 0.25).abs() < 1e-12 && lo < d && d < hi && lo > 0.1, "{d} [{lo}, {hi}]");
    }
}
