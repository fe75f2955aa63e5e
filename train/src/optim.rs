//! AdamW (PyTorch's `torch.optim.AdamW` update, decoupled weight decay) over named
//! parameters, its state as named tensors for checkpoints, and the learning-rate schedule.
use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use crate::config::OptimSection;
use crate::error::{Error, Result};

/// A trainable parameter: its export name, the variable, and whether weight decay applies.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    pub decay: bool,
}

/// No weight decay on norms and biases (as transformers' Trainer and torchtune do).
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("norm"))
}

pub struct AdamW {
    pub cfg: OptimSection,
    /// Completed updates (PyTorch's `step`, used for bias correction).
    pub t: u64,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
}

impl AdamW {
    pub fn new(cfg: OptimSection, params: &[Param]) -> Result<Self> {
        let mut m = HashMap::new();
        let mut v = HashMap::new();
        for p in params {
            m.insert(p.name.clone(), p.var.as_tensor().zeros_like()?);
            v.insert(p.name.clone(), p.var.as_tensor().zeros_like()?);
        }
        Ok(Self { cfg, t: 0, m, v })
    }

    /// One update with learning rate `lr`; `grads` by parameter name (missing: zero).
    pub fn step(&mut self, params: &[Param], grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        for p in params {
            let Some(g) = grads.get(&p.name) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let (Some(m), Some(v)) = (self.m.get(&p.name), self.v.get(&p.name)) else {
                return Err(Error::Other(format!("optimizer has no state for {}", p.name)));
            };
            let m = ((m * b1)? + (&g * (1.0 - b1))?)?;
            let v = ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mut w = p.var.as_tensor().clone();
            if p.decay && self.cfg.weight_decay > 0.0 {
                w = (w * (1.0 - lr * self.cfg.weight_decay))?;
            }
            let denom = ((v.clone() / bc2)?.sqrt()? + self.cfg.eps)?;
            let update = ((m.clone() / bc1)? / denom)?;
            let w = (w - (update * lr)?)?;
            p.var.set(&w)?;
            self.m.insert(p.name.clone(), m);
            self.v.insert(p.name.clone(), v);
        }
        Ok(())
    }

    /// The state as named tensors (`m.NAME`, `v.NAME`) for a checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out: Vec<(String, Tensor)> = Vec::new();
        for (k, t) in &self.m {
            out.push((format!("m.{k}"), t.clone()));
        }
        for (k, t) in &self.v {
            out.push((format!("v.{k}"), t.clone()));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        // Moments go to the device of the moment they replace (a checkpoint loads on the CPU).
        for (k, slot) in self.m.iter_mut() {
            let t = tensors.get(&format!("m.{k}")).ok_or_else(|| Error::Other(format!("optimizer state lacks m.{k}")))?;
            *slot = t.to_device(slot.device())?;
        }
        for (k, slot) in self.v.iter_mut() {
            let t = tensors.get(&format!("v.{k}")).ok_or_else(|| Error::Other(format!("optimizer state lacks v.{k}")))?;
            *slot = t.to_device(slot.device())?;
        }
        self.t = t;
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up from 0,
/// then cosine or linear decay to `lr * min_lr_ratio` (transformers' schedules), or constant.
pub fn lr_at(cfg: &OptimSection, step: usize, total: usize) -> f64 {
    let w = cfg.warmup_steps;
    if step < w {
        return cfg.lr * (step + 1) as f64 / w as f64;
    }
    let span = total.saturating_sub(w).max(1);
    let progress = ((step - w) as f64 / span as f64).min(1.0);
    let floor = cfg.lr * cfg.min_lr_ratio;
    match cfg.schedule.as_str() {
        "cosine" => floor + (cfg.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        "linear" => floor + (cfg.lr - floor) * (1.0 - progress),
        _ => cfg.lr,
    }
}

/// Global L2 norm of the gradients (f64 accumulation).
pub fn grad_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut names: Vec<&String> = grads.keys().collect();
    names.sort();
    let mut s = 0f64;
    for n in names {
        s += grads[n].to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(s.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn adamw_matches_the_pytorch_update() {
        // One parameter, two steps, values worked out from torch.optim.AdamW's formula.
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &Device::Cpu).unwrap()).unwrap();
        let params = vec![Param { name: "w".into(), var: var.clone(), decay: true }];
        let cfg = OptimSection { lr: 0.1, weight_decay: 0.5, ..OptimSection::default() };
        let mut opt = AdamW::new(cfg.clone(), &params).unwrap();
        let g = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        let grads: HashMap<String, Tensor> = [("w".to_string(), g)].into_iter().collect();
        opt.step(&params, &grads, 0.1).unwrap();
        opt.step(&params, &grads, 0.1).unwrap();
        let mut want = [1.0f64, -2.0];
        let gs = [0.5f64, 0.25];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for t in 1..=2 {
            for i in 0..2 {
                want[i] *= 1.0 - 0.1 * 0.5;
                m[i] = 0.9 * m[i] + 0.1 * gs[i];
                v[i] = 0.999 * v[i] + 0.001 * gs[i] * gs[i];
                let mh = m[i] / (1.0 - 0.9f64.powi(t));
                let vh = v[i] / (1.0 - 0.999f64.powi(t));
                want[i] -= 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..2 {
            assert!((got[i] as f64 - want[i]).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let cfg = OptimSection { lr: 1.0, warmup_steps: 2, ..OptimSection::default() };
        assert_eq!(lr_at(&cfg, 0, 10), 0.5);
        assert_eq!(lr_at(&cfg, 1, 10), 1.0);
        assert!((lr_at(&cfg, 2, 10) - 1.0).abs() < 1e-12);
        assert!(lr_at(&cfg, 6, 10) < 0.6 && lr_at(&cfg, 6, 10) > 0.4);
        assert!(lr_at(&cfg, 10, 10).abs() < 1e-12);
        let lin = OptimSection { schedule: "linear".into(), ..cfg.clone() };
        assert!((lr_at(&lin, 6, 10) - 0.5).abs() < 1e-12);
        assert!(!decays("model.layers.0.input_layernorm.weight") && !decays("x.bias") && decays("model.layers.0.self_attn.q_proj.lora_A"));
    }
}
