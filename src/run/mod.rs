//! Executing a recipe: the plan's items generated, probed and recorded, resumable and
//! shardable.

pub mod results;
