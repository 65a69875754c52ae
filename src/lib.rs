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
