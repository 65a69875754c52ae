//! CLIP image embeddings of image files, for the embedding-only analyses (`separate`,
//! `agree`) on a user's own images.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::Matrix;
use crate::models::clip::{normalize, ClipModel, NormMode};
use crate::models::clip_preprocess::ClipPreprocessor;
use crate::models::hub::{HubOptions, ModelRepo};
use crate::models::tokenizer::ClipTokenizer;
use crate::progress::Progress;
use crate::{Error, Result};

/// Image file extensions picked up when a folder is given.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// A CLIP model with its preprocessing, from a local folder or a hub id.
pub struct ClipEncoder {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub preprocessor: ClipPreprocessor,
    pub id: String,
    pub device: Device,
    /// config.json, preprocessor_config.json and model.safetensors: what
    /// [`ClipEncoder::fingerprint`] covers.
    files: [PathBuf; 3],
    /// The tokenizer files found beside them (tokenizer.json, or vocab.json + merges.txt, and
    /// the special-token settings).
    tokenizer_files: Vec<PathBuf>,
    fingerprint: std::sync::OnceLock<String>,
}

fn fingerprint(config: &Path, pre: &Path, weights: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in [config, pre] {
        h.update(std::fs::read(p).map_err(|e| Error::io(p, e))?);
    }
    h.update(crate::models::file_hash::HashCache::default().sha256(weights)?);
    Ok(format!("{:x}", h.finalize()))
}

impl ClipEncoder {
    /// Loads a transformers CLIPModel folder (config.json, model.safetensors,
    /// preprocessor_config.json, tokenizer files) or the same files of a hub repo.
    pub fn load(spec: &str, hub: &HubOptions, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_norm(spec, hub, dtype, device, NormMode::Fused)
    }

    /// [`ClipEncoder::load`] with a chosen [`NormMode`]: `Differentiable` for guidance, whose
    /// gradients must flow back to the pixels.
    pub fn load_with_norm(
        spec: &str,
        hub: &HubOptions,
        dtype: DType,
        device: &Device,
        norm: NormMode,
    ) -> Result<Self> {
        let repo = ModelRepo::open(spec, hub)?;
        let config = repo.get("config.json")?;
        repo.get("model.safetensors")?;
        let pre = repo.get("preprocessor_config.json")?;
        let mut tokenizer_files = Vec::new();
        for optional in [
            "tokenizer.json",
            "vocab.json",
            "merges.txt",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ] {
            tokenizer_files.extend(repo.find(optional)?);
        }
        let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(ClipEncoder {
            model: ClipModel::from_dir(&dir, dtype, device, norm)?,
            tokenizer: ClipTokenizer::from_dir(&dir)?,
            files: [config, pre.clone(), dir.join("model.safetensors")],
            tokenizer_files,
            fingerprint: std::sync::OnceLock::new(),
            preprocessor: ClipPreprocessor::from_file(&pre)?,
            id: repo.id(),
            device: device.clone(),
        })
    }

    /// Identifies the weights and preprocessing, so cached embeddings are never reused across
    /// models: sha256 of the configs and of the whole weight file. (A fine-tune that kept the
    /// text embeddings, which come first in the file, differs only further in.) It does not
    /// cover the dtype: the embedding cache adds [`ClipEncoder::dtype`] itself. Computed on
    /// first use, since a guide CLIP never needs it.
    pub fn fingerprint(&self) -> Result<&str> {
        if let Some(f) = self.fingerprint.get() {
            return Ok(f);
        }
        let [config, pre, weights] = &self.files;
        let f = fingerprint(config, pre, weights)?;
        Ok(self.fingerprint.get_or_init(|| f))
    }

    /// config.json, preprocessor_config.json and model.safetensors, as found on disk.
    pub fn files(&self) -> &[PathBuf; 3] {
        &self.files
    }

    /// The tokenizer files it read, as found on disk.
    pub fn tokenizer_files(&self) -> &[PathBuf] {
        &self.tokenizer_files
    }

    /// The dtype the model's weights were loaded in and its forward passes run in.
    pub fn dtype(&self) -> DType {
        self.model.logit_scale().dtype()
    }

    /// L2-normalised image embeddings (N x projection_dim, f32 on the CPU) of preprocessed
    /// pixel tensors (each 3 x S x S). An embedding that is not finite is refused (NaN sorts
    /// anywhere and would read as a confident answer).
    pub fn embed_pixels(&self, pixels: &[Tensor]) -> Result<Tensor> {
        self.embed_named(pixels, &[])
    }

    /// [`ClipEncoder::embed_pixels`] of the images at `names`, which a refusal names.
    pub fn embed_named(&self, pixels: &[Tensor], names: &[&Path]) -> Result<Tensor> {
        let batch = Tensor::stack(pixels, 0)?.to_device(&self.device)?;
        let e = self.model.embed_image(&batch.to_dtype(self.dtype())?)?;
        let e = normalize(&e.to_dtype(DType::F32)?)?.to_device(&Device::Cpu)?;
        if let Some(row) = first_non_finite_row(&e)? {
            let name = names
                .get(row)
                .map_or("an image".into(), |p| p.display().to_string());
            return Err(self.non_finite(&format!("image embedding of {name}")));
        }
        Ok(e)
    }

    /// The error for a non-finite embedding of `what`.
    pub fn non_finite(&self, what: &str) -> Error {
        Error::Msg(format!(
            "CLIP {}: the {what} is not finite (NaN or infinity) in {:?}: the weights may be \
             corrupt{}",
            self.id,
            self.dtype(),
            if self.dtype() == DType::F32 {
                ""
            } else {
                ", or the activations overflowed (try --dtype f32)"
            }
        ))
    }
}

/// The first row of a (rows, dims) f32 matrix holding a NaN or an infinity.
pub fn first_non_finite_row(e: &Tensor) -> Result<Option<usize>> {
    Ok(e.to_vec2::<f32>()?
        .iter()
        .position(|r| r.iter().any(|v| !v.is_finite())))
}

/// Expands files and folders (non-recursive, sorted by name) into image paths.
pub fn collect_images(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in inputs {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)
                .map_err(|e| Error::io(p, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| {
                    f.is_file()
                        && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str())
                        })
                })
                .collect();
            v.sort();
            out.extend(v);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(Error::file(p, "no such image file or folder"));
        }
    }
    // A file given twice (itself and through its folder, or by two spellings) is one image:
    // probing it twice would count its answers twice.
    let mut seen = std::collections::HashSet::new();
    out.retain(|p| seen.insert(crate::output::file_identity(p)));
    if let ([only], true) = (inputs, out.is_empty()) {
        return Err(Error::file(
            only,
            "holds no image files (png, jpg, jpeg, webp; subfolders are not searched)",
        ));
    }
    if out.is_empty() {
        return Err(Error::value(
            "images",
            format!(
                "no image files (png, jpg, jpeg, webp) in {} (subfolders are not searched)",
                inputs
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    Ok(out)
}

/// What to do with an image that cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Stop with the error.
    Fail,
    /// Warn and leave the image out.
    Skip,
}

/// Embeds images in batches. Returns the embeddings of the images that were read and their
/// paths, in input order; unreadable images fail or are skipped with a warning.
pub fn embed_images(
    enc: &ClipEncoder,
    paths: &[PathBuf],
    batch: usize,
    max_pixels: u64,
    on_error: OnError,
    progress: &Progress,
) -> Result<(Matrix, Vec<PathBuf>)> {
    let mut rows: Vec<f32> = Vec::new();
    let mut kept = Vec::new();
    let mut cols = 0;
    for chunk in paths.chunks(batch.max(1)) {
        let mut pixels = Vec::new();
        let mut chunk_kept = Vec::new();
        for p in chunk {
            match enc.preprocessor.load(p, max_pixels) {
                Ok(t) => {
                    pixels.push(t);
                    chunk_kept.push(p.clone());
                }
                Err(e) if on_error == OnError::Skip => {
                    progress.warn(
                        &format!("skipped {e}"),
                        serde_json::json!({"event": "skipped", "path": p.display().to_string(), "error": e.to_string()}),
                    );
                }
                Err(e) => return Err(e),
            }
            progress.tick(&p.display().to_string());
        }
        if pixels.is_empty() {
            continue;
        }
        let names: Vec<&Path> = chunk_kept.iter().map(PathBuf::as_path).collect();
        let e = enc.embed_named(&pixels, &names)?;
        cols = e.dim(1)?;
        rows.extend(e.flatten_all()?.to_vec1::<f32>()?);
        kept.extend(chunk_kept);
    }
    if kept.is_empty() {
        return Err(Error::value("images", "none of the images could be read"));
    }
    Ok((Matrix::new(kept.len(), cols, rows)?, kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder without images is named, not reported as "no images" in general.
    #[test]
    fn an_empty_folder_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        std::fs::write(empty.join("notes.txt"), b"x").unwrap();
        let err = collect_images(std::slice::from_ref(&empty))
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty: holds no image files"), "{err}");
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let err = collect_images(&[empty, other]).unwrap_err().to_string();
        assert!(err.contains("empty, ") && err.contains("other"), "{err}");
    }

    /// An image given through its folder and by name, or by two spellings, is one image.
    #[test]
    fn an_image_given_twice_is_collected_once() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("imgs");
        std::fs::create_dir(&dir).unwrap();
        for n in ["a.png", "b.png"] {
            std::fs::write(dir.join(n), n).unwrap();
        }
        let got = collect_images(&[
            dir.join("b.png"),
            dir.clone(),
            tmp.path().join("imgs/../imgs/a.png"),
        ])
        .unwrap();
        assert_eq!(got, vec![dir.join("b.png"), dir.join("a.png")]);
    }
}
