//! Atomic, non-clobbering file writes, numbered output names and file hashing.
//!
//! Every file is first written to a hidden, uniquely named temporary file in the target's
//! directory, flushed to disk (`fsync`), and then moved into place. Without `overwrite` the
//! move is a hard link, which fails if the target exists, so an existing file is never
//! replaced even when two processes race (on file systems without hard links it falls back to
//! a check followed by a rename). Temporary files are removed on every failure path.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn exists_error(path: &Path) -> Error {
    Error::file(path, "already exists; refusing to overwrite")
}

/// Whether something (a file, directory or even a dangling link) is at `path`.
fn is_taken(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// A temporary file next to its target; removed on drop unless it was moved into place.
#[derive(Debug)]
struct TempFile {
    path: PathBuf,
    armed: bool,
}

impl TempFile {
    /// Writes `bytes` to a new hidden temporary file beside `target` and syncs it to disk.
    /// Errors name `target`.
    fn write_beside(target: &Path, bytes: &[u8]) -> Result<TempFile> {
        let name = target
            .file_name()
            .ok_or_else(|| Error::file(target, "not a file path"))?
            .to_string_lossy();
        // Keep the temporary name well under the usual 255-byte limit.
        let mut short: String = String::new();
        for c in name.chars() {
            if short.len() + c.len_utf8() > 100 {
                break;
            }
            short.push(c);
        }
        let dir = parent_dir(target);
        let pid = std::process::id();
        for _ in 0..1000 {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let path = dir.join(format!(".{short}.{pid}-{n}-{nanos:09}.tmp"));
            let file = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(target, e)),
            };
            let tmp = TempFile { path, armed: true };
            write_and_sync(file, bytes).map_err(|e| Error::io(target, e))?;
            return Ok(tmp);
        }
        Err(Error::file(
            target,
            "could not create a temporary file beside it",
        ))
    }

    /// Moves the file to `target`; see [`place`]. On failure the temporary file is removed
    /// when `self` drops.
    fn place(mut self, target: &Path, overwrite: bool) -> Result<()> {
        place(&self.path, target, overwrite)?;
        self.armed = false;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

fn write_and_sync(mut file: File, bytes: &[u8]) -> std::io::Result<()> {
    file.write_all(bytes)?;
    file.flush()?;
    file.sync_all()
}

/// Moves `tmp` to `target` in the same directory. With `overwrite` this is a rename (which
/// replaces atomically); without, a hard link that fails when `target` exists, then the
/// removal of `tmp`.
fn place(tmp: &Path, target: &Path, overwrite: bool) -> Result<()> {
    if overwrite {
        return fs::rename(tmp, target).map_err(|e| Error::io(target, e));
    }
    match fs::hard_link(tmp, target) {
        Ok(()) => {
            let _ = fs::remove_file(tmp);
            Ok(())
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(exists_error(target)),
        Err(_) => {
            // No hard links here (FAT, some network file systems): check, then rename.
            if is_taken(target) {
                return Err(exists_error(target));
            }
            fs::rename(tmp, target).map_err(|e| Error::io(target, e))
        }
    }
}

/// Flushes a directory's entries to disk (best effort; Unix only).
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// Writes `bytes` to `path` atomically: a hidden temporary file in the same directory is
/// written, synced and renamed over `path`. With `overwrite == false` an existing `path` is
/// an [`Error::File`] ("already exists; refusing to overwrite") and nothing is written. The
/// temporary file never outlives the call. The directory must exist.
pub fn write_atomic(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    if !overwrite && is_taken(path) {
        return Err(exists_error(path));
    }
    let tmp = TempFile::write_beside(path, bytes)?;
    tmp.place(path, overwrite)?;
    sync_dir(parent_dir(path));
    Ok(())
}

/// The number a directory entry name starts with: ASCII digits (after one optional leading
/// `.`, so that reservations and temporary files count) followed by `-`, `.` or the end.
fn leading_counter(name: &str) -> Option<u64> {
    let name = name.strip_prefix('.').unwrap_or(name);
    let digits = name.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return None;
    }
    match name.as_bytes().get(digits) {
        None | Some(b'-') | Some(b'.') => name[..digits].parse().ok(),
        Some(_) => None,
    }
}

/// 1 + the highest counter among the names in `dir` (0 for an empty or missing directory).
fn next_counter(dir: &Path) -> Result<u64> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut next = 0u64;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(n) = entry.file_name().to_str().and_then(leading_counter) {
            next = next.max(n.saturating_add(1));
        }
    }
    Ok(next)
}

fn check_name_part(what: &str, s: &str) -> Result<()> {
    if s.contains(['/', '\\', '\0']) || s == "." || s == ".." {
        return Err(Error::value(
            what,
            format!("{s:?} must not contain a path separator"),
        ));
    }
    Ok(())
}

fn stem_for(counter: u64, label: &str) -> String {
    if label.is_empty() {
        format!("{counter:05}")
    } else {
        format!("{counter:05}-{label}")
    }
}

/// The next free numbered stem in `dir`, web-UI style: `COUNTER-LABEL` (`00000-42` for label
/// `42`, usually the seed), or just `COUNTER` for an empty label. The counter is five digits
/// (more once past 99999) and is 1 + the highest number any entry of `dir` starts with
/// (followed by `-`, `.` or nothing), 0 when there is none or `dir` does not exist.
/// This only looks; [`OutputSet::reserve`] also claims the number against other writers.
pub fn next_free_stem(dir: &Path, label: &str) -> Result<String> {
    check_name_part("output name label", label)?;
    Ok(stem_for(next_counter(dir)?, label))
}

/// Checks, without creating anything, that `dir` is or can become a folder: it and its
/// nearest existing ancestor must be folders. Run before long work, so a bad output path
/// fails at once instead of after the images are made.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    let mut p = dir;
    loop {
        match fs::metadata(p) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(_) if p == dir => {
                return Err(Error::file(
                    dir,
                    "exists and is not a folder; expected a folder for the output files",
                ))
            }
            Ok(_) => {
                return Err(Error::file(
                    dir,
                    format!("cannot be created: {} is not a folder", p.display()),
                ))
            }
            // A link to nothing: create_dir_all would fail on it after the work is done.
            Err(e)
                if e.kind() == ErrorKind::NotFound
                    && fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()) =>
            {
                return Err(Error::file(
                    dir,
                    format!(
                        "cannot be created: {} is a symbolic link to a missing path",
                        p.display()
                    ),
                ))
            }
            // A file among the ancestors reads as "not a directory": keep walking up to it.
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NotADirectory) => {
                match p.parent() {
                    Some(parent) if !parent.as_os_str().is_empty() => p = parent,
                    _ => return Ok(()),
                }
            }
            Err(e) => return Err(Error::io(p, e)),
        }
    }
}

/// Creates the output folder `dir` (and its parents), with the error of
/// [`check_output_dir`] when a file is in the way.
fn create_output_dir(dir: &Path) -> Result<()> {
    check_output_dir(dir)?;
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Creates the output folder `dir` and proves a file can be written there (a hidden file,
/// removed at once), for commands that write into it only after long work.
pub fn prepare_output_dir(dir: &Path) -> Result<()> {
    create_output_dir(dir)?;
    let probe = dir.join(format!(".artguide-write-test-{}.tmp", std::process::id()));
    File::create(&probe).map_err(|e| Error::io(dir, e))?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// What makes two paths one file: its device and inode where there are such (symbolic and
/// hard links alike), else its canonical path; for a file that does not exist yet, its
/// folder's canonical path and its name.
pub fn file_identity(path: &Path) -> (u64, u64, PathBuf) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if let Ok(m) = fs::metadata(path) {
            return (m.dev(), m.ino(), PathBuf::new());
        }
    }
    if let Ok(c) = fs::canonicalize(path) {
        return (0, 0, c);
    }
    match (fs::canonicalize(parent_dir(path)), path.file_name()) {
        (Ok(dir), Some(name)) => (0, 0, dir.join(name)),
        _ => (0, 0, path.to_path_buf()),
    }
}

/// Prepares a command's output files before its work, so a bad path costs nothing: refuses
/// an output path that is a folder, one of the `inputs`, or another output (either would be
/// overwritten and lost), and creates each output's folder, proving it writable. `outputs`
/// are (flag, path), the flag naming the output in errors.
pub fn prepare_output_files(outputs: &[(&str, &Path)], inputs: &[&Path]) -> Result<()> {
    let inputs: Vec<_> = inputs.iter().map(|p| file_identity(p)).collect();
    let mut seen: Vec<(&str, (u64, u64, PathBuf))> = Vec::new();
    // Every clash first, so a refused command leaves no folder behind.
    for &(flag, path) in outputs {
        if path.is_dir() {
            return Err(Error::file(
                path,
                format!("is a folder; {flag} expects a file path"),
            ));
        }
        let id = file_identity(path);
        if let Some((other, _)) = seen.iter().find(|(_, s)| *s == id) {
            return Err(Error::value(
                flag,
                format!(
                    "{} is also the {other} output; give each output its own path",
                    path.display()
                ),
            ));
        }
        if inputs.contains(&id) {
            return Err(Error::value(
                flag,
                format!(
                    "{} is one of the inputs; writing it would destroy that input",
                    path.display()
                ),
            ));
        }
        seen.push((flag, id));
    }
    for &(_, path) in outputs {
        prepare_output_dir(parent_dir(path))?;
    }
    Ok(())
}

/// Computes the sha256 of a file, streaming; lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// Lowercase hex of some bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The web UI's short "Model hash": the first 10 hex digits of a sha256.
pub fn short_hash(sha256_hex: &str) -> String {
    sha256_hex.chars().take(10).collect()
}

#[derive(Debug)]
struct Staged {
    target: PathBuf,
    tmp: TempFile,
}

/// Files that belong together (`NAME.png`, `NAME.json`, `NAME.safetensors`) written as a unit.
///
/// Each `add_*` call writes its content to a hidden temporary file right away; nothing
/// appears under its final name until [`commit`](OutputSet::commit), which moves the files
/// into place in the order they were added (add the image last if something watches the
/// directory for images). If one move fails, the files already moved are removed again and
/// the error is returned. Dropping an uncommitted set removes its temporary files.
///
/// [`reserve`](OutputSet::reserve) picks the next numbered name (see [`next_free_stem`]) and
/// claims the number with a hidden `.NNNNN.reserve` file, held until the set is committed or
/// dropped, so concurrent writers never pick the same number (a reservation left behind by a
/// crash only makes later sets skip that number).
#[derive(Debug)]
pub struct OutputSet {
    dir: PathBuf,
    stem: String,
    overwrite: bool,
    lock: Option<PathBuf>,
    staged: Vec<Staged>,
}

impl OutputSet {
    /// Reserves the next numbered stem `NNNNN-LABEL` in `dir` (created if missing). The files
    /// of the set never overwrite anything.
    pub fn reserve(dir: &Path, label: &str) -> Result<OutputSet> {
        check_name_part("output name label", label)?;
        create_output_dir(dir)?;
        for _ in 0..1000 {
            let counter = next_counter(dir)?;
            let lock = dir.join(format!(".{counter:05}.reserve"));
            match OpenOptions::new().write(true).create_new(true).open(&lock) {
                Ok(_) => {
                    return Ok(OutputSet {
                        dir: dir.to_path_buf(),
                        stem: stem_for(counter, label),
                        overwrite: false,
                        lock: Some(lock),
                        staged: Vec::new(),
                    })
                }
                // Another writer claimed this number; the next scan sees its reservation.
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(dir, e)),
            }
        }
        Err(Error::file(dir, "could not reserve an output name"))
    }

    /// A set with a chosen stem (for `-o out.png`: `at(dir_of_out, "out", overwrite)`).
    /// `dir` is created if missing. Without `overwrite`, adding or committing a file whose
    /// target exists is an error. With `overwrite`, existing files are replaced; if a later
    /// move fails, the files already moved are removed, and the replaced originals are gone.
    pub fn at(dir: &Path, stem: &str, overwrite: bool) -> Result<OutputSet> {
        if stem.is_empty() {
            return Err(Error::value("output name", "empty"));
        }
        check_name_part("output name", stem)?;
        create_output_dir(dir)?;
        Ok(OutputSet {
            dir: dir.to_path_buf(),
            stem: stem.to_string(),
            overwrite,
            lock: None,
            staged: Vec::new(),
        })
    }

    /// The directory the files go to.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The common file name stem (`00012-42`).
    pub fn stem(&self) -> &str {
        &self.stem
    }

    /// The final path of the file with extension `ext` (`png`, `json`, `safetensors`).
    pub fn path(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.stem))
    }

    /// Writes `bytes` to a temporary file destined for `NAME.ext`; returns the final path.
    pub fn add_bytes(&mut self, ext: &str, bytes: &[u8]) -> Result<PathBuf> {
        let target = self.path(ext);
        if ext.is_empty() || ext.contains(['/', '\\', '\0']) {
            return Err(Error::value("output extension", format!("{ext:?}")));
        }
        if self.staged.iter().any(|s| s.target == target) {
            return Err(Error::file(&target, "added twice to the same output set"));
        }
        if !self.overwrite && is_taken(&target) {
            return Err(exists_error(&target));
        }
        let tmp = TempFile::write_beside(&target, bytes)?;
        self.staged.push(Staged {
            target: target.clone(),
            tmp,
        });
        Ok(target)
    }

    /// Adds `NAME.png`: 8-bit RGB with the `parameters` text (see [`super::encode_png`]).
    pub fn add_png(
        &mut self,
        rgb: &[u8],
        width: u32,
        height: u32,
        parameters: &str,
    ) -> Result<PathBuf> {
        let bytes = super::encode_png(rgb, width, height, parameters)?;
        self.add_bytes("png", &bytes)
    }

    /// Adds `NAME.json`: `value` pretty-printed, with a final newline.
    pub fn add_json<T: serde::Serialize>(&mut self, value: &T) -> Result<PathBuf> {
        let mut bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::file(self.path("json"), format!("cannot serialize: {e}")))?;
        bytes.push(b'\n');
        self.add_bytes("json", &bytes)
    }

    /// Adds `NAME.safetensors` with `image` and `latents` (see [`super::tensors_safetensors`]).
    pub fn add_tensors(
        &mut self,
        image: &candle_core::Tensor,
        latents: &candle_core::Tensor,
    ) -> Result<PathBuf> {
        let bytes = super::tensors_safetensors(image, latents)?;
        self.add_bytes("safetensors", &bytes)
    }

    /// Moves every added file into place (in the order added) and returns the final paths.
    /// On failure, files already moved are removed, the remaining temporary files are
    /// removed, and the error is returned.
    pub fn commit(mut self) -> Result<Vec<PathBuf>> {
        let staged = std::mem::take(&mut self.staged);
        if !self.overwrite {
            if let Some(s) = staged.iter().find(|s| is_taken(&s.target)) {
                return Err(exists_error(&s.target));
            }
        }
        let mut placed: Vec<PathBuf> = Vec::with_capacity(staged.len());
        let mut result = Ok(());
        for s in staged {
            if result.is_err() {
                continue; // dropping `s` removes its temporary file
            }
            match s.tmp.place(&s.target, self.overwrite) {
                Ok(()) => placed.push(s.target),
                Err(e) => result = Err(e),
            }
        }
        if let Err(e) = result {
            for p in &placed {
                let _ = fs::remove_file(p);
            }
            return Err(e);
        }
        sync_dir(&self.dir);
        Ok(placed)
        // Dropping `self` releases the reservation.
    }
}

impl Drop for OutputSet {
    fn drop(&mut self) {
        // Staged temporary files remove themselves as they drop.
        self.staged.clear();
        if let Some(lock) = self.lock.take() {
            let _ = fs::remove_file(lock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::output::testutil::names;

    #[test]
    fn write_atomic_writes_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"first", false).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        let err = write_atomic(&p, b"second", false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("a.txt") && msg.contains("refusing to overwrite"),
            "{msg}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(names(dir.path()), ["a.txt"]);
        write_atomic(&p, b"third", true).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"third");
        assert_eq!(names(dir.path()), ["a.txt"]);
    }

    #[test]
    fn write_atomic_failure_leaves_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        // Target is a directory: the rename over it fails after the temp file was written.
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).unwrap();
        fs::write(sub.join("x"), b"x").unwrap();
        assert!(write_atomic(&sub, b"data", true).is_err());
        assert!(write_atomic(&sub, b"data", false).is_err());
        assert_eq!(names(dir.path()), ["sub"]);
        // Missing directory: error names the target.
        let missing = dir.path().join("nope").join("f.txt");
        let err = write_atomic(&missing, b"data", false).unwrap_err();
        assert!(err.to_string().contains("f.txt"), "{err}");
        assert_eq!(names(dir.path()), ["sub"]);
        assert_eq!(parent_dir(Path::new("x.png")), Path::new("."));
    }

    #[test]
    fn counters_and_stems() {
        assert_eq!(leading_counter("00012-42.png"), Some(12));
        assert_eq!(leading_counter(".00013.reserve"), Some(13));
        assert_eq!(leading_counter("7.json"), Some(7));
        assert_eq!(leading_counter("123"), Some(123));
        assert_eq!(leading_counter("12abc.png"), None);
        assert_eq!(leading_counter("grid-0001.png"), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            next_free_stem(&dir.path().join("missing"), "42").unwrap(),
            "00000-42"
        );
        assert_eq!(next_free_stem(dir.path(), "42").unwrap(), "00000-42");
        fs::write(dir.path().join("00000-42.png"), b"").unwrap();
        assert_eq!(next_free_stem(dir.path(), "7").unwrap(), "00001-7");
        fs::write(dir.path().join("00009-1.json"), b"").unwrap();
        fs::write(dir.path().join("notes.txt"), b"").unwrap();
        assert_eq!(next_free_stem(dir.path(), "42").unwrap(), "00010-42");
        assert_eq!(next_free_stem(dir.path(), "").unwrap(), "00010");
        fs::write(dir.path().join("123456-1.png"), b"").unwrap();
        assert_eq!(next_free_stem(dir.path(), "3").unwrap(), "123457-3");
        assert!(next_free_stem(dir.path(), "a/b").is_err());
    }

    #[test]
    fn an_output_path_through_a_file_is_refused_before_anything_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("afile");
        fs::write(&file, b"x").unwrap();
        let err = check_output_dir(&file).unwrap_err().to_string();
        assert!(err.contains("afile: exists and is not a folder"), "{err}");
        let err = check_output_dir(&file.join("sub/deeper"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("afile is not a folder"), "{err}");
        let err = OutputSet::reserve(&file, "1").unwrap_err().to_string();
        assert!(err.contains("is not a folder"), "{err}");
        // Missing folders are fine and are not created by the check.
        check_output_dir(&dir.path().join("new/sub")).unwrap();
        assert!(!dir.path().join("new").exists());
        check_output_dir(Path::new("relative-missing")).unwrap();
        #[cfg(unix)]
        {
            let link = dir.path().join("dangling");
            std::os::unix::fs::symlink(dir.path().join("nowhere/zz"), &link).unwrap();
            let err = check_output_dir(&link).unwrap_err().to_string();
            assert!(err.contains("symbolic link to a missing path"), "{err}");
        }
        prepare_output_dir(&dir.path().join("made/here")).unwrap();
        assert!(dir.path().join("made/here").is_dir());
        assert!(names(&dir.path().join("made/here")).is_empty());
        assert_eq!(fs::read(&file).unwrap(), b"x");
    }

    #[test]
    fn output_set_reserves_and_commits_together() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let mut a = OutputSet::reserve(&out, "42").unwrap();
        let mut b = OutputSet::reserve(&out, "42").unwrap();
        assert_eq!(a.stem(), "00000-42");
        assert_eq!(b.stem(), "00001-42");
        a.add_bytes("json", b"{}").unwrap();
        a.add_bytes("txt", b"t").unwrap();
        assert!(a.add_bytes("json", b"{}").is_err());
        // Nothing visible before commit (only hidden reservations and temp files).
        assert!(names(&out).iter().all(|n| n.starts_with('.')));
        let paths = a.commit().unwrap();
        assert_eq!(paths, [out.join("00000-42.json"), out.join("00000-42.txt")]);
        b.add_bytes("json", b"[]").unwrap();
        drop(b); // abandoned: leaves nothing behind
        assert_eq!(names(&out), ["00000-42.json", "00000-42.txt"]);
        let c = OutputSet::reserve(&out, "5").unwrap();
        assert_eq!(c.stem(), "00001-5");
        assert_eq!(c.commit().unwrap(), Vec::<PathBuf>::new());
        assert_eq!(names(&out), ["00000-42.json", "00000-42.txt"]);
    }

    #[test]
    fn output_set_rolls_back_on_failed_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = OutputSet::at(dir.path(), "img", false).unwrap();
        set.add_bytes("json", b"{}").unwrap();
        set.add_bytes("png", b"png").unwrap();
        // Someone else creates the second target between add and commit.
        fs::write(dir.path().join("img.png"), b"theirs").unwrap();
        let err = set.commit().unwrap_err();
        assert!(err.to_string().contains("img.png"), "{err}");
        assert_eq!(names(dir.path()), ["img.png"]);
        assert_eq!(fs::read(dir.path().join("img.png")).unwrap(), b"theirs");

        // A failure in the middle of the moves: the first file is removed again.
        let mut set = OutputSet::at(dir.path(), "two", true).unwrap();
        set.add_bytes("json", b"{}").unwrap();
        set.add_bytes("png", b"png").unwrap();
        fs::create_dir(dir.path().join("two.png")).unwrap();
        fs::write(dir.path().join("two.png").join("f"), b"").unwrap();
        assert!(set.commit().is_err());
        assert_eq!(names(dir.path()), ["img.png", "two.png"]);

        // Refused early when the target already exists.
        let mut set = OutputSet::at(dir.path(), "img", false).unwrap();
        assert!(set.add_bytes("png", b"x").is_err());
        drop(set);
        assert_eq!(names(dir.path()), ["img.png", "two.png"]);
    }

    #[test]
    fn sha256_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(short_hash(&sha256_file(&p).unwrap()), "ba7816bf8f");
        let err = sha256_file(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"));
    }
}
