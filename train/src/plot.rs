//! The loss-curve PNG at the end of a run (plotters). Text needs a TrueType font: the
//! first DejaVu/Liberation Sans found on the system is used; without one the curves are
//! drawn without labels.
use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> bool {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *DONE.get_or_init(|| {
        for f in FONTS {
            if let Ok(bytes) = std::fs::read(f) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Plot training loss (per step) and validation loss (per evaluation) against the step.
pub fn loss_curve(path: &Path, train: &[(usize, f64)], val: &[(usize, f64)]) -> Result<()> {
    let err = |e: String| Error::Other(format!("{}: plotting the loss curve: {e}", path.display()));
    let has_text = register_font();
    let all = train.iter().chain(val.iter());
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for &(_, l) in all.clone() {
        if l.is_finite() {
            lo = lo.min(l);
            hi = hi.max(l);
        }
    }
    if !lo.is_finite() {
        return Err(err("no finite loss values".into()));
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let last = all.map(|&(s, _)| s).max().unwrap_or(1).max(1);
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20).x_label_area_size(40).y_label_area_size(60);
    if has_text {
        b.caption("hromada train: loss", ("sans-serif", 22));
    }
    let mut chart = b.build_cartesian_2d(0usize..last, (lo - pad)..(hi + pad)).map_err(|e| err(e.to_string()))?;
    if has_text {
        chart.configure_mesh().x_desc("step").y_desc("loss (nats/token)").draw().map_err(|e| err(e.to_string()))?;
    } else {
        chart.configure_mesh().disable_x_mesh().disable_y_mesh().x_labels(0).y_labels(0).draw().map_err(|e| err(e.to_string()))?;
    }
    let s = chart.draw_series(LineSeries::new(train.iter().copied(), &BLUE)).map_err(|e| err(e.to_string()))?;
    if has_text {
        s.label("train").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !val.is_empty() {
        let s = chart
            .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)).point_size(3))
            .map_err(|e| err(e.to_string()))?;
        if has_text {
            s.label("validation").legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
    }
    if has_text {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw().map_err(|e| err(e.to_string()))?;
    }
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}
