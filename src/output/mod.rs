//! Output files: PNG images carrying web-UI-style `parameters` text, JSON sidecars, optional
//! safetensors dumps, atomic non-clobbering writes and numbered output names.
//!
//! A typical save of one generated image:
//!
//! ```no_run
//! # use artguide::output::*;
//! # use std::collections::BTreeMap;
//! # fn demo(image: &candle_core::Tensor, latents: &candle_core::Tensor, params: GenerationParams) -> artguide::Result<()> {
//! let (rgb, w, h) = tensor_to_rgb8(image)?;
//! let sidecar = Sidecar::new(params, BTreeMap::new(), BTreeMap::new());
//! let set = OutputSet::reserve(std::path::Path::new("outputs"), &sidecar.params.seed.to_string())?;
//! let saved = set.save_generation(&sidecar, &rgb, w, h, Some((image, latents)))?;
//! println!("wrote {}", saved.png.display());
//! # Ok(()) }
//! ```

mod files;
mod images;
mod params;
mod pngio;
mod sidecar;

pub use files::{
    check_output_dir, file_identity, next_free_stem, prepare_output_dir, prepare_output_files,
    sha256_file, short_hash, write_atomic, OutputSet,
};
pub(crate) use images::one_line;
pub use images::{
    check_image_bytes, load_image_rgb, load_image_rgb8, open_image_checked, tensor_to_rgb8,
    tensors_safetensors,
};
pub use params::{
    format_webui_parameters, is_valid_webui_key, parse_webui_parameters, webui_parameters,
    webui_sampler_name, GenerationParams, ParsedParameters, TOOL_NAME, TOOL_VERSION,
};
pub use pngio::{
    encode_png, inspect, inspect_json, read_png, read_png_parameters, save_png, PngImage,
    PARAMETERS_KEY,
};
pub use sidecar::{SavedImage, Sidecar};

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    /// Names in `dir`, sorted.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}
