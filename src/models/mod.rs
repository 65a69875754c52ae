//! Model loading: where files come from, weights, configs read from model folders, and the
//! networks built from them.

pub mod clip;
pub mod clip_preprocess;
pub mod file_hash;
pub mod hub;
pub mod sd;
pub mod stable_diffusion;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod unet_graph;
pub mod vae;
pub mod weights;

/// The kind of a device as runs record it: `cpu`, `cuda` or `metal` (the ordinal is left
/// out: it does not change results).
pub fn device_kind(device: &candle_core::Device) -> &'static str {
    match device {
        candle_core::Device::Cpu => "cpu",
        candle_core::Device::Cuda(_) => "cuda",
        candle_core::Device::Metal(_) => "metal",
    }
}
