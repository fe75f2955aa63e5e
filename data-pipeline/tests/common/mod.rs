#![allow(dead_code)]
use std::path::PathBuf;

/// ../shared/data from the workspace root.
pub fn shared_data() -> PathBuf {
    std::env::var("HROMADA_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"))
        .join("data")
}

pub fn brown_uk() -> Vec<(String, String)> {
    let dir = shared_data().join("uk/brown-uk/data/good");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read_to_string(&p).unwrap()))
        .collect();
    v.sort();
    v
}

pub fn ruslit() -> Vec<(String, String)> {
    let dir = shared_data().join("ru/ruslit");
    let mut v: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into_owned()))
        .collect();
    v.sort();
    v
}

/// Every legal act as (file name, title, text of its provisions joined).
pub fn laws() -> Vec<(String, String, String)> {
    let dir = shared_data().join("uk/laws/seed");
    let mut v = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    for p in paths {
        let j: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let text: Vec<String> = j["provisions"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["content"].as_str().map(String::from)).collect())
            .unwrap_or_default();
        v.push((p.file_name().unwrap().to_string_lossy().to_string(), j["title"].as_str().unwrap_or("").to_string(), text.join("\n")));
    }
    v
}

#[path = "../../../tests/support/tmpdir.rs"]
pub mod tmpdir_guard;

pub fn tmpdir(name: &str) -> tmpdir_guard::TmpDir {
    tmpdir_guard::tmpdir(&format!("data-test-{name}"))
}
