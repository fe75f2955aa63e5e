//! Bad input gets an error naming the file and the problem, never a panic.
mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use hromada_models::{LoadOptions, LoadedModel};

fn load_err(p: &Path) -> String {
    match LoadedModel::load(p.to_str().unwrap(), &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded, but it is broken", p.display()),
        Err(e) => e.to_string(),
    }
}

/// A tiny Llama HF directory with random weights and the real SmolLM2 tokenizer.
fn tiny_dir(name: &str) -> common::tmpdir_guard::TmpDir {
    let dir = common::tmpdir(name);
    let g = hromada_models::gguf::GgufFile::open(common::model_path("smollm2-135m")).unwrap();
    let tok = hromada_models::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    hromada_models::testing::write_tiny_llama(&dir, &tok.json, tok.vocab_size(), 16, 1).unwrap();
    dir
}

#[test]
fn tiny_directory_is_valid_to_begin_with() {
    let dir = tiny_dir("tiny-ok");
    let m = LoadedModel::load(dir.to_str().unwrap(), &LoadOptions::default()).unwrap();
    let ids = m.tokenizer.encode("Привіт", false).unwrap();
    let l = hromada_models::generate::all_logits(&m, &ids).unwrap();
    assert_eq!(l.dims(), &[ids.len(), m.model.vocab_size()]);
}

#[test]
fn truncated_gguf_names_file_and_tensor() {
    let src = common::model_path("smollm2-135m");
    let bytes = std::fs::read(&src).unwrap();
    let dir = common::tmpdir("trunc-gguf");
    // Cut inside the tensor data: the header parses, a tensor does not fit.
    let p = dir.join("half.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("half.gguf") && e.contains("truncated") && e.contains("tensor"), "{e}");
    // Cut inside the header.
    let p = dir.join("header.gguf");
    std::fs::write(&p, &bytes[..4096]).unwrap();
    let e = load_err(&p);
    assert!(e.contains("header.gguf") && e.contains("truncated or corrupt"), "{e}");
    // Not a GGUF at all.
    let p = dir.join("text.gguf");
    std::fs::write(&p, b"this is not a model").unwrap();
    let e = load_err(&p);
    assert!(e.contains("text.gguf") && e.contains("not a valid GGUF"), "{e}");
}

#[test]
fn gguf_with_unknown_architecture_is_named() {
    let dir = common::tmpdir("arch-gguf");
    let p = dir.join("mamba.gguf");
    let q = QTensor::quantize(&Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap();
    let arch = Value::String("mamba".into());
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &q)]).unwrap();
    drop(f);
    let e = load_err(&p);
    // No tokenizer in this file: the loader says so first, naming the file.
    assert!(e.contains("mamba.gguf"), "{e}");
    let toks = Value::Array(vec![Value::String("a".into())]);
    let model = Value::String("gpt2".into());
    let merges = Value::Array(vec![]);
    let mut f = std::fs::File::create(&p).unwrap();
    gguf_file::write(
        &mut f,
        &[("general.architecture", &arch), ("tokenizer.ggml.model", &model), ("tokenizer.ggml.tokens", &toks), ("tokenizer.ggml.merges", &merges)],
        &[("token_embd.weight", &q)],
    )
    .unwrap();
    drop(f);
    let e = load_err(&p);
    assert!(e.contains("mamba.gguf") && e.contains("unknown model architecture `mamba`"), "{e}");
}

#[test]
fn truncated_safetensors_names_file() {
    let dir = tiny_dir("trunc-st");
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("model.safetensors") && e.contains("not a valid safetensors"), "{e}");
}

#[test]
fn unknown_model_type_names_config() {
    let dir = tiny_dir("unknown-arch");
    let cfg = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["model_type"] = "falcon_mamba".into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("falcon_mamba") && e.contains("supported"), "{e}");
    std::fs::write(&cfg, "{ not json").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("config.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn missing_tokenizer_names_file() {
    let dir = tiny_dir("no-tokenizer");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("tokenizer.json") && e.contains("no tokenizer.json"), "{e}");
    // A broken one is named too.
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = load_err(&dir);
    assert!(e.contains("tokenizer.json"), "{e}");
}

#[test]
fn missing_weights_and_unknown_names() {
    let dir = tiny_dir("no-weights");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = load_err(&dir);
    assert!(e.contains("safetensors"), "{e}");
    let e = load_err(Path::new("no-such-model-anywhere"));
    assert!(e.contains("no-such-model-anywhere") && e.contains("not found"), "{e}");
}
