//! Shared test helpers: where the real models and ../shared live.
#![allow(dead_code)]
use std::path::PathBuf;

/// `../shared` next to the repository (override: `HROMADA_SHARED`).
pub fn shared_dir() -> PathBuf {
    if let Ok(d) = std::env::var("HROMADA_SHARED") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join("..").join("shared");
    assert!(
        p.join("golden").exists(),
        "../shared/golden not found next to the repository ({}); set HROMADA_SHARED",
        p.display()
    );
    p
}

pub fn golden(file: &str) -> serde_json::Value {
    let p = shared_dir().join("golden").join(file);
    let t = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The real model file fetched by scripts/setup.sh (the test fails, loudly, without it).
pub fn model_path(short: &str) -> PathBuf {
    hromada_models::model::resolve(short)
        .unwrap_or_else(|e| panic!("{e}: run scripts/setup.sh before the tests"))
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn f64s(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .expect("array of numbers")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

#[path = "../../../tests/support/tmpdir.rs"]
pub mod tmpdir_guard;

pub fn tmpdir(name: &str) -> tmpdir_guard::TmpDir {
    tmpdir_guard::tmpdir(&format!("test-{name}"))
}
