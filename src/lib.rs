//! artguide: Stable Diffusion generation, CLIP guidance and CLIP perceptual probes for
//! studying and making AI art.

pub mod error;
pub mod models;
pub mod noise;
pub mod probe;
pub mod progress;

pub use error::{Error, Result};
