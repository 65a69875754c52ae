//! Model loading: where files come from, weights, configs read from model folders, and the
//! networks built from them.

pub mod clip;
pub mod clip_preprocess;
pub mod hub;
pub mod sd;
pub mod stable_diffusion;
pub mod taesd;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
