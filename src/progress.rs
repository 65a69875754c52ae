//! Progress reporting for long work: an indicatif bar, nothing (`--quiet`), or JSON lines
//! on stdout (`--json`) for scripts.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// `n` and the noun, plural unless `n` is 1 (`count(1, "image")` is "1 image"; nouns
/// taking "-es" are not used).
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A bar on stderr with steps, images and ETA.
    Bar,
    /// Nothing.
    Quiet,
    /// One JSON object per line on stdout.
    Json,
}

/// Reports progress over a known number of units (e.g. denoising steps of all images).
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    start: Instant,
    total: u64,
    done: AtomicU64,
    /// What the current unit belongs to (a run's item id), put before each tick's label.
    context: std::sync::Mutex<String>,
}

impl Progress {
    /// Starts reporting `total` units of work described by `what`.
    pub fn new(mode: ProgressMode, total: u64, what: &str) -> Self {
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix} {msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta_precise}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(what.to_string());
            bar
        });
        Progress {
            mode,
            bar,
            start: Instant::now(),
            total,
            done: AtomicU64::new(0),
            context: std::sync::Mutex::new(String::new()),
        }
    }

    /// Names what the following ticks belong to (a recipe run's item); empty for nothing.
    pub fn set_context(&self, context: &str) {
        if let Ok(mut c) = self.context.lock() {
            *c = context.to_string();
        }
    }

    /// Marks one unit done; `label` says where (e.g. "image 2/4 step 7/30").
    pub fn tick(&self, label: &str) {
        let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
        let context = self.context.lock().map(|c| c.clone()).unwrap_or_default();
        let owned;
        let label = if context.is_empty() {
            label
        } else {
            owned = format!("{context}: {label}");
            owned.as_str()
        };
        match self.mode {
            ProgressMode::Bar => {
                if let Some(b) = &self.bar {
                    b.set_message(label.to_string());
                    b.inc(1);
                }
            }
            ProgressMode::Quiet => {}
            ProgressMode::Json => {
                self.json(&serde_json::json!({
                    "event": "progress",
                    "label": label,
                    "done": done,
                    "total": self.total,
                    "elapsed_s": self.start.elapsed().as_secs_f64(),
                }));
            }
        }
    }

    /// Prints an event: a line above the bar, a JSON object, or nothing when quiet.
    pub fn event(&self, text: &str, json: serde_json::Value) {
        match self.mode {
            // indicatif drops println on a hidden bar (stderr not a terminal): print directly.
            ProgressMode::Bar => match self.bar.as_ref().filter(|b| !b.is_hidden()) {
                Some(b) => b.println(text),
                // Progress is not the result: a closed stderr (`2>&1 | head`) must not
                // stop the work, so write errors are ignored.
                None => {
                    let _ = writeln!(std::io::stderr(), "{text}");
                }
            },
            ProgressMode::Quiet => {}
            ProgressMode::Json => self.json(&json),
        }
    }

    /// A warning: shown even with `--quiet` (on stderr), as a JSON object with `--json`.
    pub fn warn(&self, text: &str, json: serde_json::Value) {
        match (self.mode, &self.bar) {
            (ProgressMode::Json, _) => self.json(&json),
            (ProgressMode::Bar, Some(b)) if !b.is_hidden() => b.println(format!("warning: {text}")),
            _ => {
                let _ = writeln!(std::io::stderr(), "warning: {text}");
            }
        }
    }

    fn json(&self, v: &serde_json::Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn counts_are_singular_only_for_one() {
        assert_eq!(super::count(1, "image"), "1 image");
        assert_eq!(super::count(0, "image"), "0 images");
        assert_eq!(super::count(3, "shard"), "3 shards");
    }
}
