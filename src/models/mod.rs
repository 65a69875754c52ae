//! Model loading: where files come from, weights, and the Stable Diffusion components.

pub mod hub;
pub mod sd;
pub mod weights;
