//! Model loading: configs read from model folders, and the networks built from them.

pub mod clip;
pub mod tokenizer;
