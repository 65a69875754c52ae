//! artguide: Stable Diffusion generation, CLIP guidance and CLIP perceptual probes for
//! studying and making AI art.

pub mod bench;
pub mod cli;
pub mod commands;
pub mod compare;
pub mod error;
pub mod generate;
pub mod guidance;
pub mod interrupt;
pub mod kernels;
pub mod memory;
pub mod models;
pub mod noise;
pub mod output;
pub mod probe;
pub mod probeset;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod resources;
pub mod run;
pub mod schedulers;

pub use error::{Error, Result};

#[cfg(not(feature = "cuda"))]
macro_rules! build_features {
    () => {
        " (CPU only)"
    };
}
#[cfg(all(feature = "cuda", not(feature = "cudnn")))]
macro_rules! build_features {
    () => {
        " (features: cuda)"
    };
}
#[cfg(feature = "cudnn")]
macro_rules! build_features {
    () => {
        " (features: cuda, cudnn)"
    };
}

/// `--version`'s text: the crate version and the compiled-in GPU features, so a copied binary
/// says what it was built with.
pub const BUILD_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), build_features!());
