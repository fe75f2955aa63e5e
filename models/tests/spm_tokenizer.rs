//! The SentencePiece (`llama` GGUF tokenizer model) path, on the real Gemma 3 GGUF:
//! ids identical to the reference (transformers, and Google's tokenizer.json).
mod common;

#[test]
fn gemma3_gguf_tokenizer_matches_reference() {
    let g = common::golden("gemma-3-270m-reference.json");
    let f = hromada_models::gguf::GgufFile::open(common::model_path("gemma3-270m")).unwrap();
    let tok = hromada_models::tokenizer::Tokenizer::from_gguf(&f).unwrap();
    assert_eq!(tok.special.bos.as_ref().map(|b| b.0), Some(2));
    for t in g["tokenization"].as_array().unwrap() {
        let id = t["id"].as_str().unwrap();
        let text = t["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), common::ids(&t["ids"]), "{id}: ids");
        let ns = common::ids(&t["ids_no_special"]);
        assert_eq!(tok.encode(text, false).unwrap(), ns, "{id}: ids_no_special");
        assert_eq!(tok.decode(&ns, false).unwrap(), t["decoded"].as_str().unwrap(), "{id}: decoded");
    }
    for p in g["prompts"].as_array().unwrap() {
        let got = tok.encode(p["text"].as_str().unwrap(), p["add_special_tokens"].as_bool().unwrap()).unwrap();
        assert_eq!(got, common::ids(&p["input_ids"]), "{}", p["id"]);
    }
}
