//! The JSON sidecar (`NAME.json`) and writing one generated image's files together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::files::OutputSet;
use super::params::{webui_parameters, GenerationParams, TOOL_NAME, TOOL_VERSION};
use crate::{Error, Result};

/// The contents of `NAME.json`, written beside `NAME.png`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    /// Always `artguide`.
    pub tool: String,
    /// artguide's version.
    pub version: String,
    /// The generation parameters, exact.
    pub params: GenerationParams,
    /// sha256 (lowercase hex) of the model files used, keyed by their path relative to the
    /// model directory (`unet/diffusion_pytorch_model.safetensors`, ...).
    #[serde(default)]
    pub model_files_sha256: BTreeMap<String, String>,
    /// Timings in seconds per stage (`text_encoder`, `denoise`, `vae_decode`; `vae_encode`
    /// for img2img, `guidance` when guided).
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
    /// The web UI `parameters` text, as stored in the PNG.
    pub parameters: String,
}

impl Sidecar {
    /// A sidecar for `params`; the `parameters` text is derived from them.
    pub fn new(
        params: GenerationParams,
        model_files_sha256: BTreeMap<String, String>,
        timings: BTreeMap<String, f64>,
    ) -> Sidecar {
        let parameters = webui_parameters(&params);
        Sidecar {
            tool: TOOL_NAME.to_string(),
            version: TOOL_VERSION.to_string(),
            params,
            model_files_sha256,
            timings,
            parameters,
        }
    }

    /// Pretty-printed JSON with a final newline.
    pub fn to_json(&self) -> Result<String> {
        let mut s = serde_json::to_string_pretty(self)
            .map_err(|e| Error::value("sidecar", format!("cannot serialize: {e}")))?;
        s.push('\n');
        Ok(s)
    }

    /// Reads a sidecar file; errors name `path`.
    pub fn read(path: &Path) -> Result<Sidecar> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("not an artguide sidecar: {e}")))
    }
}

/// The files written for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedImage {
    /// `NAME.png`.
    pub png: PathBuf,
    /// `NAME.json`.
    pub json: PathBuf,
    /// `NAME.safetensors`, when tensors were saved.
    pub tensors: Option<PathBuf>,
}

impl OutputSet {
    /// Writes one generated image's files and commits them together: `NAME.safetensors`
    /// (when `tensors` = `Some((decoded image, final latents))`, see
    /// [`super::tensors_safetensors`]), `NAME.json` (the sidecar) and, last, `NAME.png` with
    /// the sidecar's `parameters` text. On any error nothing is left behind.
    pub fn save_generation(
        mut self,
        sidecar: &Sidecar,
        rgb: &[u8],
        width: u32,
        height: u32,
        tensors: Option<(&Tensor, &Tensor)>,
    ) -> Result<SavedImage> {
        let tensors_path = match tensors {
            Some((image, latents)) => Some(self.add_tensors(image, latents)?),
            None => None,
        };
        let json = self.add_bytes("json", sidecar.to_json()?.as_bytes())?;
        let png = self.add_png(rgb, width, height, &sidecar.parameters)?;
        self.commit()?;
        Ok(SavedImage {
            png,
            json,
            tensors: tensors_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testutil::names;
    use crate::output::{read_png, tensor_to_rgb8};
    use candle_core::{DType, Device};

    fn params() -> GenerationParams {
        GenerationParams {
            prompt: "a lighthouse, dusk\n\"soft\" light, 灯台".into(),
            negative_prompt: "text".into(),
            seed: 42,
            steps: 30,
            guidance_scale: 7.5,
            scheduler: "ddim".into(),
            sampler: "DDIM".into(),
            width: 4,
            height: 2,
            model: "stabilityai/stable-diffusion-2-1-base".into(),
            model_hash: "0123456789".into(),
            dtype: "f16".into(),
            device: "cuda:0".into(),
            ..Default::default()
        }
    }

    #[test]
    fn save_generation_writes_all_files() {
        let dir = tempfile::tempdir().unwrap();
        let image = Tensor::rand(0f32, 1f32, (1, 3, 2, 4), &Device::Cpu).unwrap();
        let latents = Tensor::randn(0f32, 1f32, (1, 4, 1, 1), &Device::Cpu).unwrap();
        let (rgb, w, h) = tensor_to_rgb8(&image).unwrap();
        let mut files = BTreeMap::new();
        files.insert(
            "unet/diffusion_pytorch_model.safetensors".to_string(),
            "ab".repeat(32),
        );
        let mut timings = BTreeMap::new();
        timings.insert("denoise".to_string(), 1.25);
        let sidecar = Sidecar::new(params(), files, timings);

        let set = OutputSet::reserve(dir.path(), "42").unwrap();
        let saved = set
            .save_generation(&sidecar, &rgb, w, h, Some((&image, &latents)))
            .unwrap();
        assert_eq!(saved.png, dir.path().join("00000-42.png"));
        assert_eq!(
            names(dir.path()),
            ["00000-42.json", "00000-42.png", "00000-42.safetensors"]
        );
        let img = read_png(&saved.png).unwrap();
        assert_eq!(img.rgb, rgb);
        assert_eq!(img.parameters.as_deref(), Some(sidecar.parameters.as_str()));
        let back = Sidecar::read(&saved.json).unwrap();
        assert_eq!(back, sidecar);
        let json = std::fs::read_to_string(&saved.json).unwrap();
        assert!(json.contains("\n  \"tool\": \"artguide\",\n"), "{json}");
        let t =
            candle_core::safetensors::load(saved.tensors.as_ref().unwrap(), &Device::Cpu).unwrap();
        assert_eq!(t["image"].dims(), [2, 4, 3]);
        assert_eq!(t["latents"].dims(), [1, 4, 1, 1]);
        assert_eq!(t["latents"].dtype(), DType::F32);

        // The next one gets the next number; a failure (bad pixel buffer) leaves nothing.
        let set = OutputSet::reserve(dir.path(), "43").unwrap();
        assert_eq!(set.stem(), "00001-43");
        assert!(set
            .save_generation(&sidecar, &rgb[1..], w, h, None)
            .is_err());
        assert_eq!(names(dir.path()).len(), 3);
        let set = OutputSet::reserve(dir.path(), "43").unwrap();
        let saved = set.save_generation(&sidecar, &rgb, w, h, None).unwrap();
        assert_eq!(saved.tensors, None);
        assert_eq!(saved.json, dir.path().join("00001-43.json"));
        assert_eq!(names(dir.path()).len(), 5);
        let out = crate::output::inspect(&saved.png).unwrap();
        assert!(out.starts_with(&sidecar.parameters));
        assert!(out.contains("Sidecar: "));
        assert!(!out.contains("Tensors: "));
    }
}
