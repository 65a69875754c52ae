//! artguide: Stable Diffusion generation, CLIP guidance and CLIP perceptual probes for
//! studying and making AI art.

pub mod error;
pub mod models;

pub use error::{Error, Result};
