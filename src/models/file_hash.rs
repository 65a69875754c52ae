//! SHA-256s of model files, remembered between runs by path, size and change times, so a
//! model of several GB is read in full once rather than at every load (hashing SDXL's 7 GB
//! takes longer than generating an image with it on a GPU).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::Result;

/// Where artguide keeps its caches: `$XDG_CACHE_HOME/artguide`, else `~/.cache/artguide`.
pub fn cache_home() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("artguide")
}

/// File SHA-256s by canonical path. An entry is used only while the file's size,
/// modification and status-change times, device and inode are those it was hashed with: any
/// write, copy over or rename onto the path changes the status-change time, which no tool
/// can set back (on unix; elsewhere size and modification time decide, and network file
/// systems may not keep a real status-change time). A cache that cannot be read or written
/// is skipped (the hash is computed).
#[derive(Debug, Clone)]
pub struct HashCache {
    root: PathBuf,
    /// How long a file must have been left alone before its hash is remembered: file times
    /// tick with a coarse clock, so a write in the same tick as the hashing leaves them as
    /// they were (git's "racily clean" entries).
    settle: std::time::Duration,
}

/// What a cached hash was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Entry {
    path: PathBuf,
    stamp: Stamp,
    sha256: String,
}

/// The file's identity and change times as `stat` reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Stamp {
    len: u64,
    modified_ns: u64,
    changed_ns: i64,
    dev: u64,
    ino: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let m = std::fs::metadata(path).ok()?;
        let modified_ns = m
            .modified()
            .ok()?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos() as u64;
        #[cfg(unix)]
        let (changed_ns, dev, ino) = {
            use std::os::unix::fs::MetadataExt;
            (m.ctime() * 1_000_000_000 + m.ctime_nsec(), m.dev(), m.ino())
        };
        // Without status-change times and inodes, size and modification time decide.
        #[cfg(not(unix))]
        let (changed_ns, dev, ino) = (0, 0, 0);
        Some(Stamp {
            len: m.len(),
            modified_ns,
            changed_ns,
            dev,
            ino,
        })
    }
}

impl Default for HashCache {
    fn default() -> Self {
        HashCache::new(cache_home().join("sha256"))
    }
}

impl HashCache {
    /// A cache kept in `root` (one small JSON file per hashed file).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        HashCache {
            root: root.into(),
            settle: std::time::Duration::from_secs(2),
        }
    }

    /// The SHA-256 (lowercase hex) of the file at `path`, from the cache when the file is
    /// unchanged since it was hashed, else computed (and remembered).
    pub fn sha256(&self, path: &Path) -> Result<String> {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let before = Stamp::of(&canonical);
        let slot = self.slot(&canonical);
        if let Some(stamp) = &before {
            let cached = std::fs::read(&slot)
                .ok()
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok())
                .filter(|e| e.path == canonical && e.stamp == *stamp && e.sha256.len() == 64);
            if let Some(e) = cached {
                return Ok(e.sha256);
            }
        }
        // The canonical path, which the stamp is of: a symbolic link re-pointed meanwhile
        // must not lend its new target's hash to the old one.
        let sha256 = crate::output::sha256_file(&canonical)?;
        // Remembered only when the file did not change while it was read, and had settled.
        let settled = |s: &Stamp| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as i128);
            let last = (s.modified_ns as i128).max(s.changed_ns as i128);
            now - last >= self.settle.as_nanos() as i128
        };
        let unchanged = |s: &Stamp| Stamp::of(&canonical).as_ref() == Some(s);
        if let Some(stamp) = before.filter(|s| settled(s) && unchanged(s)) {
            let entry = Entry {
                path: canonical,
                stamp,
                sha256: sha256.clone(),
            };
            if let Ok(bytes) = serde_json::to_vec(&entry) {
                if std::fs::create_dir_all(&self.root).is_ok() {
                    let _ = crate::output::write_atomic(&slot, &bytes, true);
                }
            }
        }
        Ok(sha256)
    }

    /// [`HashCache::sha256`] of each file (relative name -> path), by the same names.
    pub fn sha256_files(
        &self,
        files: &BTreeMap<String, PathBuf>,
    ) -> Result<BTreeMap<String, String>> {
        files
            .iter()
            .map(|(rel, p)| Ok((rel.clone(), self.sha256(p)?)))
            .collect()
    }

    fn slot(&self, canonical: &Path) -> PathBuf {
        use sha2::{Digest, Sha256};
        let key = Sha256::digest(canonical.as_os_str().as_encoded_bytes());
        self.root
            .join(format!("{}.json", &format!("{key:x}")[..32]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_remembered_until_the_file_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cache = HashCache::new(tmp.path().join("cache"));
        cache.settle = std::time::Duration::from_millis(100);
        let file = tmp.path().join("w.safetensors");
        std::fs::write(&file, b"weights one").unwrap();
        let real = crate::output::sha256_file(&file).unwrap();
        // Just written: hashed, not remembered yet.
        assert_eq!(cache.sha256(&file).unwrap(), real);
        let slot = cache.slot(&std::fs::canonicalize(&file).unwrap());
        assert!(!slot.exists(), "a file that had not settled was remembered");
        std::thread::sleep(std::time::Duration::from_millis(150));
        assert_eq!(cache.sha256(&file).unwrap(), real);
        // The next call reads the entry: a planted hash comes back while the file is
        // unchanged, which shows the file was not read again.
        let mut entry: Entry = serde_json::from_slice(&std::fs::read(&slot).unwrap()).unwrap();
        let planted = "ab".repeat(32);
        entry.sha256.clone_from(&planted);
        std::fs::write(&slot, serde_json::to_vec(&entry).unwrap()).unwrap();
        assert_eq!(cache.sha256(&file).unwrap(), planted);
        // Through a symbolic link: the same entry.
        #[cfg(unix)]
        {
            let link = tmp.path().join("link");
            std::os::unix::fs::symlink(&file, &link).unwrap();
            assert_eq!(cache.sha256(&link).unwrap(), planted);
        }
        // Rewritten with other bytes of the same length, then its modification time set back:
        // the status-change time still differs, so the hash is computed again.
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::fs::write(&file, b"weights two").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let second = crate::output::sha256_file(&file).unwrap();
        assert_ne!(second, real);
        assert_eq!(cache.sha256(&file).unwrap(), second);
        // A cache folder that cannot be written is no error.
        let blocked = HashCache::new(file.join("not-a-dir"));
        assert_eq!(blocked.sha256(&file).unwrap(), second);
        // A missing file is an error naming it.
        let err = cache.sha256(&tmp.path().join("gone")).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
