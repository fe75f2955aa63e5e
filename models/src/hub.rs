//! Hugging Face Hub access (`hromada pull`): the Hub, or an internal mirror through
//! `HF_ENDPOINT`, into the standard hub cache (`HF_HOME`), usable offline
//! (`HF_HUB_OFFLINE=1`) once downloaded.
use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::error::{Error, Result};

/// Files of a model repository that hromada needs.
pub fn wanted(file: &str, include_gguf: bool) -> bool {
    let name = file.rsplit('/').next().unwrap_or(file);
    matches!(
        name,
        "config.json"
            | "generation_config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "special_tokens_map.json"
            | "chat_template.jinja"
            | "chat_template.json"
            | "model.safetensors.index.json"
            | "adapter_config.json"
    ) || name.ends_with(".safetensors")
        || (include_gguf && name.ends_with(".gguf"))
}

pub fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes") | Ok("ON") | Ok("on")
    )
}

fn repo(repo_id: &str, revision: Option<&str>) -> Repo {
    match revision {
        Some(r) => Repo::with_revision(repo_id.to_string(), RepoType::Model, r.to_string()),
        None => Repo::model(repo_id.to_string()),
    }
}

/// The cached snapshot directory of `repo_id`, if one was downloaded.
pub fn cached_snapshot(repo_id: &str, revision: Option<&str>) -> Option<PathBuf> {
    let cache = Cache::from_env();
    let r = cache.repo(repo(repo_id, revision));
    for probe in ["config.json", "adapter_config.json", "tokenizer.json"] {
        if let Some(p) = r.get(probe) {
            return p.parent().map(|d| d.to_path_buf());
        }
    }
    None
}

/// Download the model files of `repo_id` (or find them in the cache when offline) and
/// return the snapshot directory.
pub fn pull(repo_id: &str, revision: Option<&str>, include_gguf: bool, progress: bool) -> Result<PathBuf> {
    if repo_id.split('/').count() != 2 || repo_id.split('/').any(|p| p.is_empty()) {
        return Err(Error::Hub(format!("`{repo_id}` is not a repository id of the form OWNER/NAME")));
    }
    if offline() {
        return cached_snapshot(repo_id, revision).ok_or_else(|| {
            Error::Hub(format!(
                "HF_HUB_OFFLINE is set and `{repo_id}` is not in the cache at {}",
                Cache::from_env().path().display()
            ))
        });
    }
    let api = ApiBuilder::from_env()
        .with_progress(progress)
        .build()
        .map_err(|e| Error::Hub(e.to_string()))?;
    let r = api.repo(repo(repo_id, revision));
    let endpoint = std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
    let info = r
        .info()
        .map_err(|e| Error::Hub(format!("cannot list `{repo_id}` at {endpoint}: {e}")))?;
    let files: Vec<String> = info
        .siblings
        .iter()
        .map(|s| s.rfilename.clone())
        .filter(|f| wanted(f, include_gguf))
        .collect();
    if files.is_empty() {
        return Err(Error::Hub(format!("`{repo_id}` has no model files hromada can load")));
    }
    let mut dir = None;
    for f in &files {
        let p = r
            .get(f)
            .map_err(|e| Error::Hub(format!("downloading `{f}` of `{repo_id}`: {e}")))?;
        tracing::info!(file = %f, "downloaded");
        if dir.is_none() {
            // The snapshot dir is the path minus the file's own relative path.
            let depth = f.split('/').count();
            let mut d = p.clone();
            for _ in 0..depth {
                d.pop();
            }
            dir = Some(d);
        }
    }
    dir.ok_or_else(|| Error::Hub("nothing downloaded".into()))
}
