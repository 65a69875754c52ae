//! Where model files come from: a local folder, or a Hugging Face repo in the standard cache.
//!
//! hf-hub 0.4 ignores HF_HUB_OFFLINE and only half-honours HF_HOME, so the cache lookup is
//! done here (the same layout huggingface_hub writes) and hf-hub is used only to download.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// How to reach the Hugging Face hub: cache location and whether the network may be used.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// The `hub` cache folder (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
    pub cache_dir: PathBuf,
    /// True when HF_HUB_OFFLINE is set to a truthy value: never touch the network.
    pub offline: bool,
    /// Revision (branch, tag or commit) to use for hub repos.
    pub revision: String,
}

impl HubOptions {
    /// Reads HF_HUB_CACHE, HF_HOME and HF_HUB_OFFLINE the way huggingface_hub does.
    pub fn from_env() -> Self {
        let cache_dir = if let Some(dir) = non_empty_env("HF_HUB_CACHE") {
            PathBuf::from(dir)
        } else if let Some(home) = non_empty_env("HF_HOME") {
            PathBuf::from(home).join("hub")
        } else {
            let home = non_empty_env("HOME").unwrap_or_else(|| ".".into());
            PathBuf::from(home).join(".cache/huggingface/hub")
        };
        let offline = non_empty_env("HF_HUB_OFFLINE")
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);
        HubOptions {
            cache_dir,
            offline,
            revision: "main".into(),
        }
    }
}

fn non_empty_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.is_empty())
}

/// A model location: a local folder or a hub repo id.
#[derive(Debug, Clone)]
pub enum ModelRepo {
    /// A folder on disk.
    Local(PathBuf),
    /// A Hugging Face model repo, resolved through the cache (and the network unless offline).
    Hub {
        repo_id: String,
        options: HubOptions,
    },
}

impl ModelRepo {
    /// Interprets `spec` as an existing local folder, else as a hub id `owner/name`.
    pub fn open(spec: &str, options: &HubOptions) -> Result<Self> {
        let path = Path::new(spec);
        if path.exists() {
            if !path.is_dir() {
                return Err(Error::file(path, "is a file; expected a model folder"));
            }
            return Ok(ModelRepo::Local(path.to_path_buf()));
        }
        if looks_like_repo_id(spec) {
            return Ok(ModelRepo::Hub {
                repo_id: spec.to_string(),
                options: options.clone(),
            });
        }
        Err(Error::file(
            path,
            "no such model folder (and not a Hugging Face repo id of the form owner/name)",
        ))
    }

    /// A short name for messages and metadata: the folder path or the repo id.
    pub fn id(&self) -> String {
        match self {
            ModelRepo::Local(p) => p.display().to_string(),
            ModelRepo::Hub { repo_id, .. } => repo_id.clone(),
        }
    }

    /// Path of a required file, downloading it if needed and allowed.
    pub fn get(&self, rel: &str) -> Result<PathBuf> {
        match self.find(rel)? {
            Some(p) => Ok(p),
            None => Err(self.missing(rel)),
        }
    }

    /// The error for a missing file, naming the folder or repo and the file.
    pub fn missing(&self, rel: &str) -> Error {
        match self {
            ModelRepo::Local(root) => {
                let p = root.join(rel);
                // Something is there, but not a file to read (a folder, /dev/null linked in).
                match std::fs::metadata(&p) {
                    Ok(m) if m.is_dir() => Error::file(p, "is a folder; expected a file"),
                    Ok(_) => Error::file(p, "is not a regular file"),
                    Err(_) => Error::file(p, "missing file"),
                }
            }
            ModelRepo::Hub { repo_id, options } if options.offline => Error::Msg(format!(
                "{repo_id}: `{rel}` is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set",
                options.cache_dir.display()
            )),
            ModelRepo::Hub { repo_id, .. } => {
                Error::Msg(format!("{repo_id}: `{rel}` does not exist in the repo"))
            }
        }
    }

    /// The model's files already on disk (a folder's files, or a hub repo's cached snapshot
    /// of the revision), which no output may overwrite. Nothing is downloaded.
    pub fn files_on_disk(&self) -> Vec<PathBuf> {
        let root = match self {
            ModelRepo::Local(root) => Some(root.clone()),
            ModelRepo::Hub { repo_id, options } => cached_file(
                &options.cache_dir,
                repo_id,
                &options.revision,
                "config.json",
            )
            .or_else(|| {
                cached_file(
                    &options.cache_dir,
                    repo_id,
                    &options.revision,
                    "model_index.json",
                )
            })
            .and_then(|p| p.parent().map(Path::to_path_buf)),
        };
        let mut files = Vec::new();
        // A model folder nests one level (diffusers' unet/, vae/, ...); two is ample.
        let mut stack: Vec<(PathBuf, usize)> = root.into_iter().map(|r| (r, 0)).collect();
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
                if p.is_file() {
                    files.push(p);
                } else if p.is_dir() && depth < 2 {
                    stack.push((p, depth + 1));
                }
            }
        }
        files
    }

    /// Path of an optional file: Ok(None) when the folder or repo does not have it.
    pub fn find(&self, rel: &str) -> Result<Option<PathBuf>> {
        match self {
            ModelRepo::Local(root) => {
                let p = root.join(rel);
                Ok(p.is_file().then_some(p))
            }
            ModelRepo::Hub { repo_id, options } => {
                if let Some(p) = cached_file(&options.cache_dir, repo_id, &options.revision, rel) {
                    return Ok(Some(p));
                }
                if options.offline {
                    return Ok(None);
                }
                download(repo_id, options, rel)
            }
        }
    }
}

/// A model id that names an existing local folder as its canonical path; a hub id as is.
pub fn canonical_id(id: &str) -> String {
    std::fs::canonicalize(id)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| id.to_string())
}

/// Whether two model ids name the same model (equal, or the same local folder).
pub fn same_id(a: &str, b: &str) -> bool {
    a == b || (Path::new(a).exists() && canonical_id(a) == canonical_id(b))
}

/// Whether `id` names a hub model this machine has: shaped like `owner/name`, no such folder
/// here, and in the cache (a relative folder of another working folder is not).
pub fn is_cached_repo(id: &str, options: &HubOptions) -> bool {
    looks_like_repo_id(id) && !Path::new(id).exists() && repo_dir(&options.cache_dir, id).is_dir()
}

/// `owner/name` with characters the hub allows.
pub fn looks_like_repo_id(spec: &str) -> bool {
    let mut parts = spec.split('/');
    let (Some(owner), Some(name), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && !s.starts_with('.')
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    ok(owner) && ok(name)
}

/// A hub repo's folder in the huggingface_hub cache: `models--owner--name`.
fn repo_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
}

/// Looks a file up in the huggingface_hub cache layout:
/// `models--owner--name/refs/<rev>` holds a commit, `snapshots/<commit>/<file>` the file.
pub fn cached_file(cache_dir: &Path, repo_id: &str, revision: &str, rel: &str) -> Option<PathBuf> {
    let repo_dir = repo_dir(cache_dir, repo_id);
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let p = repo_dir.join("snapshots").join(commit).join(rel);
    p.is_file().then_some(p)
}

fn download(repo_id: &str, options: &HubOptions, rel: &str) -> Result<Option<PathBuf>> {
    let api =
        hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(options.cache_dir.clone()))
            .with_progress(true)
            .build()
            .map_err(|e| {
                Error::Msg(format!("{repo_id}: cannot reach the Hugging Face hub: {e}"))
            })?;
    let repo = api.repo(hf_hub::Repo::with_revision(
        repo_id.to_string(),
        hf_hub::RepoType::Model,
        options.revision.clone(),
    ));
    match repo.get(rel) {
        Ok(p) => Ok(Some(p)),
        Err(hf_hub::api::sync::ApiError::RequestError(e))
            if matches!(*e, ureq::Error::Status(404, _)) =>
        {
            Ok(None)
        }
        Err(e) => Err(Error::Msg(format!(
            "{repo_id}: cannot download `{rel}`: {e} (set HF_HUB_OFFLINE=1 to use the cache only)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, offline: bool) -> HubOptions {
        HubOptions {
            cache_dir: dir.to_path_buf(),
            offline,
            revision: "main".into(),
        }
    }

    #[test]
    fn resolves_files_from_the_cache_layout() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let repo = tmp.path().join("models--someone--tiny-sd");
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs/main"), format!("{commit}\n")).unwrap();
        let snap = repo.join("snapshots").join(commit).join("unet");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();

        let m = ModelRepo::open("someone/tiny-sd", &options(tmp.path(), true)).unwrap();
        assert_eq!(m.get("unet/config.json").unwrap(), snap.join("config.json"));
        assert!(m.find("vae/config.json").unwrap().is_none());
        let err = m.get("vae/config.json").unwrap_err().to_string();
        assert!(err.contains("someone/tiny-sd"), "{err}");
        assert!(err.contains("vae/config.json"), "{err}");
        assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    }

    #[test]
    fn missing_local_folder_is_named() {
        let err = ModelRepo::open(
            "./no/such/model-folder",
            &options(Path::new("/nonexistent"), true),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("no/such/model-folder"), "{err}");
    }

    #[test]
    fn model_ids_as_folders() {
        assert!(same_id("src", "src/../src") && !same_id("src", "tests"));
        assert!(!same_id("a/b", "a/c") && same_id("a/b", "a/b"));
    }

    #[test]
    fn repo_ids() {
        assert!(looks_like_repo_id("stabilityai/sd-turbo"));
        assert!(looks_like_repo_id("runwayml/stable-diffusion-v1-5"));
        assert!(!looks_like_repo_id("a/b/c"));
        assert!(!looks_like_repo_id("../x"));
        assert!(!looks_like_repo_id("plain"));
    }
}
