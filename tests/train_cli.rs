//! `hromada train` as a real process: kill -9 at a random step and `--resume` reproduce
//! the uninterrupted run bit for bit, SIGTERM checkpoints and stops, config errors are
//! clear, and LoRA SFT of the real SmolLM2-135M on Ukrainian chat data lowers the
//! validation loss, with exports that load (adapter and merged model give the same logits).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hromada_models::cache::Segments;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hromada"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[path = "support/tmpdir.rs"]
mod tmpdir;

fn tmpdir(name: &str) -> tmpdir::TmpDir {
    tmpdir::tmpdir(&format!("train-cli-{name}"))
}

/// The Ukrainian chat SFT set built from the legal acts (scripts/make_sft_uk.py).
fn chat_set(dir: &Path, n: usize) -> PathBuf {
    let out = dir.join("laws.jsonl");
    let st = Command::new("python3")
        .arg(root().join("scripts/make_sft_uk.py"))
        .args(["--out", out.to_str().unwrap(), "--max", &n.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "make_sft_uk.py failed");
    out
}

/// A tiny random Llama with SmolLM2's real tokenizer (fast enough to train in a test).
fn tiny_model(dir: &Path) -> PathBuf {
    let tok = hromada_models::model::load_tokenizer("smollm2-135m").expect("run scripts/setup.sh first");
    let m = dir.join("tiny");
    hromada_models::testing::write_tiny(&m, &tok.json, tok.vocab_size(), 32, 2, "llama", serde_json::json!({})).unwrap();
    m
}

fn write_config(dir: &Path, model: &Path, data: &Path, out: &str, extra: &str) -> PathBuf {
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"[model]
path = "{}"
[data]
train = "{}"
seq_len = 128
val_fraction = 0.1
[lora]
rank = 4
alpha = 8
dropout = 0.1
target_modules = ["all-linear"]
[optim]
lr = 3e-3
warmup_steps = 3
[run]
output = "{}"
max_steps = 40
micro_batch_size = 2
grad_accum = 2
save_every = 2
eval_every = 10
seed = 7
{extra}
"#,
            model.display(),
            data.display(),
            dir.join(out).display()
        ),
    )
    .unwrap();
    p
}

/// metrics.jsonl without the wall-clock fields.
fn curve(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["tokens_per_s", "elapsed_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v.to_string()
        })
        .collect()
}

fn last_step(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("step").and_then(|s| s.as_u64()))
        .max()
        .unwrap_or(0) as usize
}

/// Start a run and wait until it has logged `step`; returns the child, still running.
fn start_until(cfg: &Path, out: &Path, step: usize, resume: bool) -> std::process::Child {
    let mut c = bin();
    c.args(["train", "sft", cfg.to_str().unwrap(), "--no-progress"]);
    if resume {
        c.arg("--resume");
    }
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    while last_step(out) < step {
        assert!(child.try_wait().unwrap().is_none(), "the run ended before step {step}");
        assert!(t.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    child
}

fn run_ok(cfg: &Path, resume: bool) {
    let mut c = bin();
    c.args(["train", "sft", cfg.to_str().unwrap(), "--no-progress"]);
    if resume {
        c.arg("--resume");
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn kill_9_and_sigterm_then_resume_reproduce_the_run_bit_for_bit() {
    let dir = tmpdir("resume");
    let data = chat_set(&dir, 80);
    let model = tiny_model(&dir);
    // Uninterrupted reference.
    let cfg_a = write_config(&dir, &model, &data, "a", "");
    run_ok(&cfg_a, false);
    let a = curve(&dir.join("a"));
    assert!(a.len() >= 40, "{} metric rows", a.len());

    // kill -9 at a pseudo-random step, then resume.
    let k = 3 + (std::process::id() as usize % 20);
    let cfg_b = write_config(&dir, &model, &data, "b", "");
    let mut child = start_until(&cfg_b, &dir.join("b"), k, false);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(last_step(&dir.join("b")) < 40, "the run finished before the kill");
    run_ok(&cfg_b, true);
    assert_eq!(curve(&dir.join("b")), a, "resumed run (killed at step {k}) differs from the uninterrupted one");
    let adapter = |d: &str| std::fs::read(dir.join(d).join("adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(adapter("a"), adapter("b"), "final adapters differ");

    // SIGTERM (Slurm preemption): checkpoint at the step boundary, exit 143, resume.
    let cfg_c = write_config(&dir, &model, &data, "c", "");
    let mut child = start_until(&cfg_c, &dir.join("c"), 5, false);
    let st = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(143), "SIGTERM should checkpoint and exit 143");
    let stopped = last_step(&dir.join("c"));
    assert!(dir.join("c/checkpoints").join(format!("step-{stopped:06}/state.json")).exists(), "no checkpoint at step {stopped}");
    run_ok(&cfg_c, true);
    assert_eq!(curve(&dir.join("c")), a, "resumed run after SIGTERM differs");
    // Starting over in a directory with checkpoints needs --resume.
    let o = bin().args(["train", "sft", cfg_a.to_str().unwrap(), "--no-progress"]).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
}

#[test]
fn config_errors_are_clear() {
    let dir = tmpdir("errors");
    let data = chat_set(&dir, 10);
    let model = tiny_model(&dir);
    let cfg = write_config(&dir, &model, &data, "e", "");
    let err = |set: &[&str]| -> String {
        let mut c = bin();
        c.args(["train", "sft", cfg.to_str().unwrap(), "--no-progress"]);
        for s in set {
            c.args(["--set", s]);
        }
        let o = c.output().unwrap();
        assert!(!o.status.success(), "expected a failure for {set:?}");
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let e = err(&["lora.target_modules=[\"qkv_proj\"]"]);
    assert!(e.contains("qkv_proj") && e.contains("q_proj"), "{e}");
    let e = err(&["data.seq_len=100000"]);
    assert!(e.contains("seq_len") && e.contains("context length 256"), "{e}");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = err(&[&format!("data.train={}", empty.display())]);
    assert!(e.contains("no training samples"), "{e}");
    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, "{\"messages\": [{\"role\": \"user\", \"content\": \"Привіт\"}, {\"role\": \"assistant\", \"content\": \"Вітаю\"}]}\n{\"messages\": [\n").unwrap();
    let e = err(&[&format!("data.train={}", broken.display())]);
    assert!(e.contains("broken.jsonl:2") && e.contains("invalid JSON"), "{e}");
    let e = err(&["optim.learning_rate=1"]);
    assert!(e.contains("learning_rate"), "{e}");
    let e = err(&["method.kind=qlora"]);
    assert!(e.contains("method.kind"), "{e}");
    let e = err(&["run.mixed_precision=\"fp8\""]);
    assert!(e.contains("run.mixed_precision") && e.contains("fp8"), "{e}");
    let e = err(&["model.device=\"tpu\""]);
    assert!(e.contains("model.device") && e.contains("tpu"), "{e}");
    // bf16 mixed precision runs end to end (f32 master weights) with finite losses.
    let o = bin()
        .args(["train", "sft", cfg.to_str().unwrap(), "--no-progress", "--set", "run.mixed_precision=\"bf16\"", "--set", "run.max_steps=3"])
        .args(["--set", &format!("run.output=\"{}\"", dir.join("mp").display())])
        .output()
        .unwrap();
    assert!(o.status.success(), "bf16 mixed precision: {}", String::from_utf8_lossy(&o.stderr));
    let m = std::fs::read_to_string(dir.join("mp/metrics.jsonl")).unwrap();
    let losses: Vec<f64> = m.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).filter_map(|v| v["loss"].as_f64()).collect();
    assert!(!losses.is_empty() && losses.iter().all(|l| l.is_finite()), "{m}");
}

fn logits(m: &LoadedModel, ids: &[u32]) -> Vec<f32> {
    let t = candle_core::Tensor::new(ids, m.model.device()).unwrap();
    let h = m.model.forward(&t, &mut Segments::single(ids.len(), false)).unwrap();
    m.model.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn lora_sft_of_smollm2_on_ukrainian_chat_lowers_validation_loss_and_exports_load() {
    let dir = tmpdir("smollm2");
    let data = chat_set(&dir, 400);
    let cfg = dir.join("sft.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[model]
path = "smollm2-135m"
[data]
train = "{}"
seq_len = 160
val_fraction = 0.1
max_samples = 120
[lora]
rank = 8
alpha = 16
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
[optim]
lr = 1e-3
warmup_steps = 2
[run]
output = "{}"
max_steps = 8
micro_batch_size = 1
grad_accum = 2
eval_every = 8
seed = 1
"#,
            data.display(),
            dir.join("out").display()
        ),
    )
    .unwrap();
    run_ok(&cfg, false);
    let out = dir.join("out");
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let first = summary["first_val_loss"].as_f64().unwrap();
    let last = summary["final_val_loss"].as_f64().unwrap();
    assert!(last < first * 0.97, "validation loss {first} -> {last}: did not fall by 3%");
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");

    // The adapter on the base and the merged directory compute the same function.
    let ids = {
        let base = LoadedModel::load("smollm2-135m", &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap();
        base.tokenizer.encode("Що передбачає Стаття 3 Конституції України?", false).unwrap()
    };
    let mut base = LoadedModel::load("smollm2-135m", &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap();
    let plain = logits(&base, &ids);
    let (_, n) = hromada_models::lora::load_peft_adapter(&mut base.model, &out.join("adapter")).unwrap();
    assert_eq!(n, 7 * 30);
    let with_adapter = logits(&base, &ids);
    let merged = LoadedModel::load(out.join("merged").to_str().unwrap(), &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap();
    let merged = logits(&merged, &ids);
    let diff = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(diff(&with_adapter, &plain) > 1e-2, "the adapter changes nothing");
    // f32: W + s·BA rounds once per weight, and 30 layers carry it to the logits, so the
    // tolerance is 1e-5 relative to the largest logit.
    let d = diff(&merged, &with_adapter);
    let scale = with_adapter.iter().fold(0f32, |m, x| m.max(x.abs()));
    assert!(d / scale <= 1e-5, "merged vs base+adapter logits differ by {d} (largest logit {scale})");
    eprintln!("merged vs base+adapter: max |logit diff| {d:e}, relative {:e}", d / scale);

    // Both load in `hromada generate` and agree greedily.
    let gen = |args: &[&str]| -> String {
        let o = bin().args(["generate", "--prompt", "Стаття 3 Конституції України:", "--max-tokens", "8", "--temperature", "0"]).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let a = gen(&["--model", "smollm2-135m", "--dtype", "f32", "--adapter", out.join("adapter").to_str().unwrap()]);
    let b = gen(&["--model", out.join("merged").to_str().unwrap()]);
    assert_eq!(a, b);
    assert!(!a.trim().is_empty());
}

#[test]
fn pretraining_on_the_data_pipelines_token_shards() {
    let dir = tmpdir("pretrain");
    // 30 brown-uk texts -> normalise -> SmolLM2 token shards.
    let shared = std::env::var("HROMADA_SHARED").map(PathBuf::from).unwrap_or_else(|_| root().join("../shared"));
    let src = shared.join("data/uk/brown-uk/data/good");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    std::fs::create_dir_all(dir.join("in")).unwrap();
    for f in files.iter().take(30) {
        std::fs::copy(f, dir.join("in").join(f.file_name().unwrap())).unwrap();
    }
    let pipe = dir.join("p.yaml");
    std::fs::write(&pipe, "input: {path: in, format: text}\noutput: {path: out, format: jsonl}\ntasks: 2\nsteps:\n  - normalise: {}\n  - tokenize: {tokenizer: smollm2-135m}\n").unwrap();
    let o = bin().args(["data", "run", pipe.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shards = dir.join("out/tokens");
    assert!(shards.exists(), "no token shards at {}", shards.display());
    let model = tiny_model(&dir);
    let cfg = dir.join("pt.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"{}\"\n[data]\ntrain = \"{}\"\nseq_len = 128\nval_fraction = 0.05\nmax_samples = 200\n[method]\nkind = \"full\"\n[optim]\nlr = 3e-3\nwarmup_steps = 2\n[run]\noutput = \"{}\"\nmax_steps = 12\nmicro_batch_size = 2\neval_every = 12\nactivation_checkpointing = true\n",
            model.display(),
            shards.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    let o = bin().args(["train", "pretrain", cfg.to_str().unwrap(), "--no-progress"]).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("run/summary.json")).unwrap()).unwrap();
    assert_eq!(s["data"]["samples"].as_u64(), Some(200));
    let (first, last) = (s["first_val_loss"].as_f64().unwrap(), s["final_val_loss"].as_f64().unwrap());
    assert!(last < first, "validation loss {first} -> {last}");
    // Full fine-tuning exports a whole model directory that loads and generates.
    let g = bin().args(["generate", "--model", dir.join("run/model").to_str().unwrap(), "--prompt", "Україна", "--max-tokens", "4", "--temperature", "0"]).output().unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    // A shard for another vocabulary is refused with the file named.
    let o = bin().args(["train", "pretrain", cfg.to_str().unwrap(), "--no-progress", "--set", &format!("data.train={}", model.join("config.json").display())]).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("config.json"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn qlora_sft_of_gemma3_270m_on_its_quantized_gguf() {
    let dir = tmpdir("gemma3");
    let data = chat_set(&dir, 200);
    let cfg = dir.join("g.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\npath = \"gemma3-270m\"\ndtype = \"quantized\"\n[data]\ntrain = \"{}\"\nseq_len = 128\nval_fraction = 0.15\nmax_samples = 40\n[lora]\nrank = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"v_proj\", \"gate_proj\", \"down_proj\"]\n[optim]\nlr = 2e-3\nwarmup_steps = 1\n[run]\noutput = \"{}\"\nmax_steps = 4\nmicro_batch_size = 2\neval_every = 4\nexport_merged = false\n",
            data.display(),
            dir.join("run").display()
        ),
    )
    .unwrap();
    run_ok(&cfg, false);
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("run/summary.json")).unwrap()).unwrap();
    let (first, last) = (s["first_val_loss"].as_f64().unwrap(), s["final_val_loss"].as_f64().unwrap());
    assert!(last < first, "Gemma 3 validation loss {first} -> {last}");
    // The adapter applies in `generate` on the same quantized base.
    let g = bin()
        .args(["generate", "--model", "gemma3-270m", "--adapter", dir.join("run/adapter").to_str().unwrap(), "--chat", "--prompt", "Що передбачає Стаття 3 Конституції України?", "--max-tokens", "6", "--temperature", "0"])
        .output()
        .unwrap();
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    assert!(!String::from_utf8_lossy(&g.stdout).trim().is_empty());
}
