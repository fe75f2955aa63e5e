//! `convert`: GGUF -> HF directory -> hromada gives identical logits to the GGUF
//! dequantized path.
mod common;

use hromada_models::generate::all_logits;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel};

#[test]
fn converted_directory_loads_with_identical_logits() {
    let gguf = common::model_path("smollm2-135m");
    let opts = LoadOptions { dtype: DTypeChoice::F32, ..Default::default() };
    let a = LoadedModel::load(gguf.to_str().unwrap(), &opts).unwrap();
    let dir = common::tmpdir("convert");
    hromada_models::convert::write_hf_dir(&a, &dir, candle_core::DType::F32).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        assert!(dir.join(f).exists(), "{f} missing");
    }
    let b = LoadedModel::load(dir.to_str().unwrap(), &opts).unwrap();
    let text = "Київ — столиця України. The capital of France is";
    let ids_a = a.tokenizer.encode(text, true).unwrap();
    let ids_b = b.tokenizer.encode(text, true).unwrap();
    assert_eq!(ids_a, ids_b, "tokenizer.json round trip");
    let msgs = vec![hromada_models::chat::Message::new("user", "Привіт!")];
    assert_eq!(a.render_chat(&msgs, true).unwrap(), b.render_chat(&msgs, true).unwrap(), "chat template round trip");
    assert_eq!(a.eos_ids(), b.eos_ids());
    let la = all_logits(&a, &ids_a).unwrap();
    let lb = all_logits(&b, &ids_b).unwrap();
    let diff = (la - lb).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "logits differ by {diff}");
    // bf16 export: loads, and stays close.
    let dir16 = common::tmpdir("convert-bf16");
    hromada_models::convert::write_hf_dir(&a, &dir16, candle_core::DType::BF16).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir16.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let c = LoadedModel::load(dir16.to_str().unwrap(), &opts).unwrap();
    let lc = all_logits(&c, &ids_a).unwrap();
    let la = all_logits(&a, &ids_a).unwrap();
    let am_a: Vec<u32> = la.argmax(1).unwrap().to_vec1().unwrap();
    let am_c: Vec<u32> = lc.argmax(1).unwrap().to_vec1().unwrap();
    let agree = am_a.iter().zip(&am_c).filter(|(x, y)| x == y).count();
    assert!(agree * 10 >= am_a.len() * 8, "bf16 export argmax agreement {agree}/{}", am_a.len());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir16);
}
