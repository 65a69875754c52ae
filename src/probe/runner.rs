//! Zero-shot probing of image files with a suite: embeddings (cached by file content), one
//! classifier per probe, and the answers as JSON and CSV.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use super::embed::{first_non_finite_row, ClipEncoder, OnError};
use super::suite::Suite;
use super::zeroshot::{entropy, Classifier};
use crate::models::clip::normalize;
use crate::progress::Progress;
use crate::{Error, Result};

/// Image embeddings stored by image content hash, per model fingerprint and precision.
pub struct EmbeddingCache {
    root: PathBuf,
    /// The first 16 hex digits of the model fingerprint.
    model: String,
    /// What the embeddings were computed in: the dtype, plus the device kind below f32.
    precision: String,
}

impl EmbeddingCache {
    /// The cache for one model under `root` (e.g. ~/.cache/artguide/clip-embeddings), for f32
    /// embeddings until [`EmbeddingCache::for_precision`] says otherwise.
    pub fn new(root: &Path, fingerprint: &str) -> Self {
        EmbeddingCache {
            root: root.to_path_buf(),
            model: fingerprint[..16.min(fingerprint.len())].to_string(),
            precision: DType::F32.as_str().to_string(),
        }
    }

    /// The same cache for embeddings computed in `dtype` on `device`. f16 embeddings differ
    /// from f32 ones by ~1e-3, and half precision rounds differently on the CPU and on a GPU,
    /// so each gets its own folder; f32 is shared across devices (they differ by rounding only).
    /// Folders are `<fingerprint>-<precision>`: the bare-fingerprint folders of older versions
    /// are never read, since they may hold f16 embeddings under an f32 run's key.
    pub fn for_precision(&self, dtype: DType, device: &Device) -> Self {
        let mut precision = dtype.as_str().to_string();
        if matches!(dtype, DType::F16 | DType::BF16) {
            precision += "-";
            precision += crate::models::device_kind(device);
        }
        EmbeddingCache {
            root: self.root.clone(),
            model: self.model.clone(),
            precision,
        }
    }

    /// The folder holding this model's embeddings at this precision.
    fn dir(&self) -> PathBuf {
        self.root.join(format!("{}-{}", self.model, self.precision))
    }

    /// The default root: $XDG_CACHE_HOME/artguide/clip-embeddings or ~/.cache/....
    pub fn default_root() -> PathBuf {
        crate::models::file_hash::cache_home().join("clip-embeddings")
    }

    fn path(&self, sha: &str) -> PathBuf {
        self.dir().join(format!("{sha}.f32"))
    }

    /// A cached embedding, if present and of the expected width.
    pub fn get(&self, sha: &str, dims: usize) -> Option<Vec<f32>> {
        let bytes = std::fs::read(self.path(sha)).ok()?;
        (bytes.len() == dims * 4).then(|| {
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        })
    }

    /// Stores an embedding (atomically; a failure to cache is not an error for the caller).
    pub fn put(&self, sha: &str, v: &[f32]) -> Result<()> {
        let dir = self.dir();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        crate::output::write_atomic(&self.path(sha), &bytes, true)
    }
}

/// One probe's answer for one image.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ProbeAnswer {
    pub probe: String,
    /// Labels in suite order, with their probabilities.
    pub labels: Vec<String>,
    pub probs: Vec<f32>,
    pub top: String,
    /// Entropy of the label distribution, in nats.
    pub entropy: f32,
}

/// All answers for one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageAnswers {
    pub path: PathBuf,
    pub sha256: String,
    pub probes: Vec<ProbeAnswer>,
}

/// The result of probing a set of images.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResults {
    pub tool: String,
    pub version: String,
    pub clip: String,
    pub suite: PathBuf,
    pub images: Vec<ImageAnswers>,
    /// How many embeddings came from the cache.
    pub cached: usize,
    /// Scores against true labels (`probe --labels`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<super::evaluate::Evaluation>,
    /// The same images probed by a held-out CLIP (`--probe-clip`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held_out: Option<Box<ProbeResults>>,
    /// Per probe, how the held-out CLIP's answers agree with this CLIP's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<Vec<ProbeAgreement>>,
}

/// How two CLIP models' answers to one probe agree over the images both could read.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProbeAgreement {
    pub probe: String,
    /// Images answered by both models.
    pub images: usize,
    /// Fraction of images where both give the same top label.
    pub top_agreement: f64,
    /// Mean over images and labels of |p_a - p_b|.
    pub mean_abs_prob_diff: f64,
}

/// Agreement of `b`'s answers with `a`'s, per probe of `a`, over images matched by path.
pub fn agreement(a: &ProbeResults, b: &ProbeResults) -> Vec<ProbeAgreement> {
    let by_path: std::collections::HashMap<&Path, &ImageAnswers> =
        b.images.iter().map(|i| (i.path.as_path(), i)).collect();
    let names: Vec<&str> = a
        .images
        .first()
        .map(|i| i.probes.iter().map(|p| p.probe.as_str()).collect())
        .unwrap_or_default();
    names
        .into_iter()
        .map(|name| {
            let (mut n, mut same, mut diff, mut cells) = (0usize, 0usize, 0f64, 0usize);
            for img in &a.images {
                let Some(other) = by_path.get(img.path.as_path()) else {
                    continue;
                };
                let (Some(pa), Some(pb)) = (
                    img.probes.iter().find(|p| p.probe == name),
                    other.probes.iter().find(|p| p.probe == name),
                ) else {
                    continue;
                };
                n += 1;
                same += usize::from(pa.top == pb.top);
                for (x, y) in pa.probs.iter().zip(&pb.probs) {
                    diff += (x - y).abs() as f64;
                    cells += 1;
                }
            }
            ProbeAgreement {
                probe: name.to_string(),
                images: n,
                top_agreement: if n > 0 { same as f64 / n as f64 } else { 0.0 },
                mean_abs_prob_diff: if cells > 0 { diff / cells as f64 } else { 0.0 },
            }
        })
        .collect()
}

/// A CLIP model with the classifiers of a suite, answering for single images in memory
/// (e.g. images just generated).
pub struct Prober {
    pub encoder: ClipEncoder,
    suite: Suite,
    classifiers: Vec<Classifier>,
    logit_scale: f32,
}

impl Prober {
    /// Builds the suite's classifiers for `encoder`.
    pub fn new(encoder: ClipEncoder, suite: Suite) -> Result<Self> {
        let classifiers = classifiers(&encoder, &suite)?;
        let logit_scale = logit_scale(&encoder)?;
        Ok(Prober {
            encoder,
            suite,
            classifiers,
            logit_scale,
        })
    }

    /// The suite's answers for an 8-bit RGB image, preprocessed as an image file would be.
    pub fn answer_rgb(&self, rgb: &[u8], width: usize, height: usize) -> Result<Vec<ProbeAnswer>> {
        let pix = self
            .encoder
            .preprocessor
            .preprocess_rgb(rgb, width, height)?;
        let e = self.encoder.embed_pixels(&[pix])?;
        answers(&e, &self.suite, &self.classifiers, self.logit_scale)
    }
}

fn logit_scale(enc: &ClipEncoder) -> Result<f32> {
    Ok(enc
        .model
        .logit_scale()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?[0])
}

/// Every probe's answer for one normalised embedding (1, d).
fn answers(
    e: &Tensor,
    suite: &Suite,
    classifiers: &[Classifier],
    logit_scale: f32,
) -> Result<Vec<ProbeAnswer>> {
    let mut probes = Vec::new();
    for (spec, c) in suite.probes.iter().zip(classifiers) {
        let p = c.probs(&e.to_device(c.weights().device())?, logit_scale)?;
        let h = entropy(&p)?[0];
        let probs: Vec<f32> = p.flatten_all()?.to_vec1()?;
        // The first of equal maxima, as the evaluation's ranking (a stable sort) has it.
        let best = (0..probs.len()).fold(0, |b, k| if probs[k] > probs[b] { k } else { b });
        let top = c.labels().get(best).cloned().unwrap_or_default();
        probes.push(ProbeAnswer {
            probe: spec.name.clone(),
            labels: c.labels().to_vec(),
            probs,
            top,
            entropy: h,
        });
    }
    Ok(probes)
}

/// One classifier per probe of the suite.
pub fn classifiers(enc: &ClipEncoder, suite: &Suite) -> Result<Vec<Classifier>> {
    suite
        .probes
        .iter()
        .map(|p| {
            // Labels may have different numbers of prompts: ensemble each label on its own.
            let mut rows = Vec::new();
            for prompts in p.prompts() {
                let ids = enc.tokenizer.encode_tensor(&prompts, &enc.device)?;
                let e = enc.model.embed_text(&ids)?.to_dtype(DType::F32)?;
                let e = normalize(&normalize(&e)?.mean_keepdim(0)?)?;
                if first_non_finite_row(&e.to_device(&Device::Cpu)?)?.is_some() {
                    return Err(enc.non_finite(&format!(
                        "text embedding of `{}` (probe `{}`)",
                        prompts[0], p.name
                    )));
                }
                rows.push(e);
            }
            let labels = p.labels.iter().map(|l| l.name().to_string()).collect();
            Classifier::from_embeddings(labels, &Tensor::cat(&rows, 0)?)
        })
        .collect()
}

/// Probes `paths` with every probe of `suite`.
#[allow(clippy::too_many_arguments)]
pub fn probe_images(
    enc: &ClipEncoder,
    suite: &Suite,
    paths: &[PathBuf],
    batch: usize,
    max_pixels: u64,
    on_error: OnError,
    cache: Option<&EmbeddingCache>,
    progress: &Progress,
) -> Result<ProbeResults> {
    let classifiers = classifiers(enc, suite)?;
    // Keyed here, from the encoder itself, so no caller can mix precisions in one folder.
    let cache = cache.map(|c| c.for_precision(enc.dtype(), &enc.device));
    let cache = cache.as_ref();
    let dims = enc.model.config().projection_dim;
    let logit_scale = logit_scale(enc)?;
    let mut embeds: Vec<Option<Vec<f32>>> = Vec::with_capacity(paths.len());
    let mut shas = Vec::with_capacity(paths.len());
    let mut cached = 0;
    // Cache lookups first, then embed the misses in batches.
    let mut misses = Vec::new();
    let mut cache_failed = false;
    for (i, p) in paths.iter().enumerate() {
        // Read once: hashed, and for a cache hit also checked.
        let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
        let sha = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&bytes));
        // A cached image is held to the checks of one decoded now (size limit, format,
        // truncation), so the cache never changes what is accepted: one that fails them is
        // a miss, and the decoding below reports it.
        let hit = cache
            .and_then(|c| c.get(&sha, dims))
            .filter(|_| crate::output::check_image_bytes(p, bytes, max_pixels).is_ok());
        if hit.is_some() {
            cached += 1;
            progress.tick(&p.display().to_string());
        } else {
            misses.push(i);
        }
        embeds.push(hit);
        shas.push(sha);
    }
    for chunk in misses.chunks(batch.max(1)) {
        let mut pixels = Vec::new();
        let mut ok = Vec::new();
        for &i in chunk {
            match enc.preprocessor.load(&paths[i], max_pixels) {
                Ok(t) => {
                    pixels.push(t);
                    ok.push(i);
                }
                Err(e) if on_error == OnError::Skip => progress.warn(
                    &format!("skipped {e}"),
                    serde_json::json!({"event": "skipped", "path": paths[i].display().to_string(), "error": e.to_string()}),
                ),
                Err(e) => return Err(e),
            }
            progress.tick(&paths[i].display().to_string());
        }
        if pixels.is_empty() {
            continue;
        }
        let names: Vec<&Path> = ok.iter().map(|&i| paths[i].as_path()).collect();
        let e = enc.embed_named(&pixels, &names)?;
        for (row, &i) in ok.iter().enumerate() {
            let v = e.get(row)?.to_vec1::<f32>()?;
            // After the first failure (a --cache that is a file, a full disk) the rest would
            // fail alike: said once, and the probing goes on uncached.
            if let Some(c) = cache.filter(|_| !cache_failed) {
                if let Err(err) = c.put(&shas[i], &v) {
                    cache_failed = true;
                    progress.warn(
                        &format!(
                            "cannot cache embeddings ({err}); probing goes on without caching"
                        ),
                        serde_json::json!({"event": "cache-error", "error": err.to_string()}),
                    );
                }
            }
            embeds[i] = Some(v);
        }
    }
    let mut images = Vec::new();
    for (i, e) in embeds.into_iter().enumerate() {
        let Some(e) = e else { continue };
        let t = Tensor::from_vec(e, (1, dims), &Device::Cpu)?;
        let probes = answers(&t, suite, &classifiers, logit_scale)?;
        images.push(ImageAnswers {
            path: paths[i].clone(),
            sha256: shas[i].clone(),
            probes,
        });
    }
    if images.is_empty() {
        return Err(Error::value("images", "none of the images could be read"));
    }
    Ok(ProbeResults {
        tool: "artguide".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        clip: enc.id.clone(),
        suite: suite.path.clone(),
        images,
        cached,
        evaluation: None,
        held_out: None,
        agreement: None,
    })
}

impl ProbeResults {
    /// Attaches a held-out CLIP's results for the same images, with the agreement per probe.
    pub fn with_held_out(mut self, other: ProbeResults) -> Self {
        self.agreement = Some(agreement(&self, &other));
        self.held_out = Some(Box::new(other));
        self
    }

    /// CSV rows; with held-out results, each row also names its CLIP (last column) and the
    /// held-out rows follow.
    pub fn csv_table(&self) -> (Vec<&'static str>, Vec<Vec<String>>) {
        let mut header = vec!["image", "probe", "label", "probability", "top"];
        match &self.held_out {
            None => (header, self.csv_rows()),
            Some(h) => {
                header.push("clip");
                let mut rows = Vec::new();
                for r in [self, h.as_ref()] {
                    for mut row in r.csv_rows() {
                        row.push(r.clip.clone());
                        rows.push(row);
                    }
                }
                (header, rows)
            }
        }
    }

    /// One row per image, probe and label: image,probe,label,probability,top.
    pub fn csv_rows(&self) -> Vec<Vec<String>> {
        let mut rows = Vec::new();
        for img in &self.images {
            for a in &img.probes {
                for (l, p) in a.labels.iter().zip(&a.probs) {
                    rows.push(vec![
                        img.path.display().to_string(),
                        a.probe.clone(),
                        l.clone(),
                        format!("{p}"),
                        (l == &a.top).to_string(),
                    ]);
                }
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tie_answers_the_first_label_as_the_evaluation_ranks_it() {
        let suite = Suite::parse(
            "probes:\n  - name: hands\n    templates: [\"{}\"]\n    labels: [distorted, well-drawn, none]\n",
            Path::new("s.yaml"),
        )
        .unwrap();
        let d = Device::Cpu;
        // The first two labels share an embedding, so their probabilities are equal.
        let text = Tensor::new(&[[1f32, 0.0], [1.0, 0.0], [0.0, 1.0]], &d).unwrap();
        let c = Classifier::from_embeddings(
            vec!["distorted".into(), "well-drawn".into(), "none".into()],
            &text,
        )
        .unwrap();
        let image = Tensor::new(&[[1f32, 0.0]], &d).unwrap();
        let a = &answers(&image, &suite, &[c], 10.0).unwrap()[0];
        assert_eq!(a.probs[0], a.probs[1]);
        assert_eq!(a.top, "distorted");
    }

    #[test]
    fn the_cache_keeps_each_precision_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let base = EmbeddingCache::new(tmp.path(), "0123456789abcdef0123");
        let f32_cpu = base.for_precision(DType::F32, &Device::Cpu);
        let f16_cpu = base.for_precision(DType::F16, &Device::Cpu);
        let bf16_cpu = base.for_precision(DType::BF16, &Device::Cpu);
        assert_eq!(f32_cpu.dir(), tmp.path().join("0123456789abcdef-f32"));
        assert_eq!(f16_cpu.dir(), tmp.path().join("0123456789abcdef-f16-cpu"));
        assert_eq!(base.dir(), f32_cpu.dir());
        assert_ne!(f16_cpu.dir(), bf16_cpu.dir());

        f16_cpu.put("sha", &[0.5, 0.25]).unwrap();
        assert_eq!(f16_cpu.get("sha", 2), Some(vec![0.5, 0.25]));
        assert_eq!(f32_cpu.get("sha", 2), None);
        assert_eq!(bf16_cpu.get("sha", 2), None);
        // Folders of older versions (the bare fingerprint) are not read.
        std::fs::create_dir_all(tmp.path().join("0123456789abcdef")).unwrap();
        std::fs::write(tmp.path().join("0123456789abcdef/old.f32"), [0u8; 8]).unwrap();
        assert_eq!(f32_cpu.get("old", 2), None);
    }
}
