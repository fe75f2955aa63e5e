//! A self-contained HTML report of a run: counts per step and reason, extra counters
//! (PII by type, tokens, mojibake repairs), histograms drawn as inline SVG, and the first
//! problems met with their file and line. No scripts, no external resources.

use crate::config::PipelineConfig;
use crate::stats::{Histogram, RunStats};

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn svg_hist(h: &Histogram) -> String {
    let (w, hgt) = (480.0, 140.0);
    let max = h.bins.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bw = w / h.bins.len() as f64;
    let mut s = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{}" role="img">"#, hgt + 20.0);
    for (i, &c) in h.bins.iter().enumerate() {
        let bh = c as f64 / max * hgt;
        let (a, b) = h.bin_range(i);
        s.push_str(&format!(
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="#3b6ea5"><title>[{}, {}): {}</title></rect>"##,
            i as f64 * bw + 0.5,
            hgt - bh,
            (bw - 1.0).max(0.5),
            bh,
            fmt_num(a),
            fmt_num(b),
            c
        ));
    }
    s.push_str(&format!(
        r##"<text x="0" y="{}" font-size="11">{}</text><text x="{w}" y="{}" font-size="11" text-anchor="end">{}{}</text></svg>"##,
        hgt + 14.0,
        fmt_num(h.lo),
        hgt + 14.0,
        fmt_num(h.hi),
        if h.log { " (log scale)" } else { "" }
    ));
    s
}

pub fn html(stats: &RunStats, cfg: &PipelineConfig) -> String {
    let mut o = String::new();
    o.push_str("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>hromada data report</title><style>body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f0f0f0}td.l,th.l{text-align:left}h2{margin-top:2em}.hist{display:inline-block;margin:0 2em 1em 0;vertical-align:top}</style></head><body>");
    o.push_str(&format!(
        "<h1>hromada data report</h1><p>input <code>{}</code> &rarr; output <code>{}</code>; {} files, {} tasks, {:.1} MB read, {:.1} s.</p>",
        esc(&cfg.input.path.to_string_lossy()),
        esc(&cfg.output.path.to_string_lossy()),
        stats.files,
        stats.tasks,
        stats.bytes_read as f64 / 1e6,
        stats.elapsed_s
    ));
    o.push_str(&format!(
        "<p><b>{}</b> documents in, <b>{}</b> out, {} dropped; every document accounted for: <b>{}</b>.</p>",
        stats.docs_in,
        stats.docs_out,
        stats.dropped_total(),
        if stats.balanced() { "yes" } else { "NO" }
    ));
    o.push_str("<h2>Steps</h2><table><tr><th class=l>step</th><th>in</th><th>kept</th><th>modified</th><th>dropped</th><th class=l>dropped by reason</th></tr>");
    for s in &stats.steps {
        let reasons: Vec<String> = s.dropped.iter().map(|(k, v)| format!("{} {}", esc(k), v)).collect();
        o.push_str(&format!(
            "<tr><td class=l>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=l>{}</td></tr>",
            esc(&s.name),
            s.docs_in,
            s.kept,
            s.modified,
            s.dropped_total(),
            reasons.join("<br>")
        ));
    }
    o.push_str("</table>");
    let counters: Vec<(String, String, u64)> = stats
        .steps
        .iter()
        .flat_map(|s| s.counters.iter().map(move |(k, v)| (s.name.clone(), k.clone(), *v)))
        .collect();
    if !counters.is_empty() {
        o.push_str("<h2>Counters</h2><p>PII replacements by type, language counts, mojibake repairs, tokens.</p><table><tr><th class=l>step</th><th class=l>counter</th><th>value</th></tr>");
        for (s, k, v) in counters {
            o.push_str(&format!("<tr><td class=l>{}</td><td class=l>{}</td><td>{}</td></tr>", esc(&s), esc(&k), v));
        }
        o.push_str("</table>");
    }
    o.push_str("<h2>Histograms</h2>");
    for s in &stats.steps {
        for (k, h) in &s.histograms {
            let mean = if h.count > 0 { h.sum / h.count as f64 } else { 0.0 };
            o.push_str(&format!(
                "<div class=hist><h3>{} / {}</h3><p>n={} mean={} min={} max={}</p>{}</div>",
                esc(&s.name),
                esc(k),
                h.count,
                fmt_num(mean),
                fmt_num(if h.count > 0 { h.min } else { 0.0 }),
                fmt_num(if h.count > 0 { h.max } else { 0.0 }),
                svg_hist(h)
            ));
        }
    }
    o.push_str(&format!("<h2>Problems</h2><p>{} in all; the first ones:</p><table><tr><th class=l>file</th><th>line</th><th class=l>kind</th><th class=l>message</th></tr>", stats.problems_total));
    for p in &stats.problems {
        o.push_str(&format!(
            "<tr><td class=l>{}</td><td>{}</td><td class=l>{}</td><td class=l>{}</td></tr>",
            esc(&p.file),
            p.line,
            esc(&p.kind),
            esc(&p.message)
        ));
    }
    o.push_str("</table><h2>Pipeline</h2><pre>");
    o.push_str(&esc(&cfg.to_yaml()));
    o.push_str("</pre></body></html>\n");
    o
}
