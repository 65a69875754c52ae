//! Weight loading behind candle's `VarBuilder`: safetensors (or PyTorch pickles) with errors
//! that name the file and tensor, or seeded random weights for measuring real-size speed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::SeedableRng;
use rand_distr::Distribution;

use crate::{Error, Result};

enum Store {
    Safetensors(MmapedSafetensors),
    Pickle(candle_core::pickle::PthTensors),
}

/// Tensors from one or more weight files, with per-name overrides.
pub struct FileWeights {
    files: Vec<(PathBuf, Store)>,
    index: HashMap<String, usize>,
    overrides: HashMap<String, Tensor>,
    /// Names read so far, shared with the [`Usage`] handles.
    read: Arc<Mutex<HashSet<String>>>,
}

/// Which tensors of some weight files a model read while it was built, to find those a
/// config that disagrees with the weights left unread.
#[derive(Clone)]
pub struct Usage {
    files: Vec<(PathBuf, BTreeSet<String>)>,
    read: Arc<Mutex<HashSet<String>>>,
}

impl Usage {
    /// Refuses weights the model left unread, outside the `unused_parts` it never uses (a
    /// VAE's `encoder` when only its decoder is built): the model `config` describes has fewer
    /// layers or blocks than the weights, or lacks a part they have (a VAE config with
    /// `use_post_quant_conv: false`), so it would run silently without them. transformers' `position_ids`
    /// buffers are not weights.
    pub fn check_all_read(&self, config: &Path, unused_parts: &[&str]) -> Result<()> {
        let read = self.read.lock().unwrap_or_else(|e| e.into_inner());
        let root = |n: &str| n.split('.').next().unwrap_or("").to_string();
        for (path, names) in &self.files {
            let unread: Vec<&String> = names
                .iter()
                .filter(|n| {
                    !read.contains(*n)
                        && !n.ends_with("position_ids")
                        && !unused_parts.contains(&root(n).as_str())
                })
                .collect();
            if let Some(first) = unread.first() {
                return Err(Error::file(
                    path,
                    format!(
                        "{} of its {} tensors are not used by the model {} describes (first: \
                         `{first}`): the config disagrees with the weights (a layer or block count?)",
                        unread.len(),
                        names.len(),
                        config.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl FileWeights {
    /// Opens weight files, validating their headers up front so a truncated or malformed
    /// file is reported by name before any model is built.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            let is_pickle = matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("bin" | "pt" | "pth" | "ckpt")
            );
            let (store, names) = if is_pickle {
                let t = candle_core::pickle::PthTensors::new(path, None).map_err(|e| {
                    Error::file(
                        path,
                        format!("not a readable PyTorch checkpoint: {}", without_path(e)),
                    )
                })?;
                let names: Vec<String> = t.tensor_infos().keys().cloned().collect();
                (Store::Pickle(t), names)
            } else {
                check_safetensors_header(path)?;
                // SAFETY: the file is mapped read-only; artguide never writes weight files
                // while they are mapped.
                let t = unsafe { MmapedSafetensors::new(path) }
                    .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
                let names: Vec<String> = t.tensors().into_iter().map(|(n, _)| n).collect();
                (Store::Safetensors(t), names)
            };
            for n in names {
                index.insert(n, files.len());
            }
            files.push((path.clone(), store));
        }
        Ok(FileWeights {
            files,
            index,
            overrides: HashMap::new(),
            read: Arc::default(),
        })
    }

    /// A handle that sees which tensors are read from here on (also through the VarBuilder
    /// these weights become).
    pub fn usage(&self) -> Usage {
        let mut files: Vec<(PathBuf, BTreeSet<String>)> = self
            .files
            .iter()
            .map(|(p, _)| (p.clone(), BTreeSet::new()))
            .collect();
        for (name, &i) in &self.index {
            files[i].1.insert(name.clone());
        }
        Usage {
            files,
            read: self.read.clone(),
        }
    }

    /// Replaces the tensor `name` with `value` whatever the files hold.
    pub fn with_override(mut self, name: &str, value: Tensor) -> Self {
        self.overrides.insert(name.to_string(), value);
        self
    }

    /// Names of all tensors in the files.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    /// The files these weights come from.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(p, _)| p.clone()).collect()
    }

    fn load(&self, name: &str, dev: &Device) -> candle_core::Result<Tensor> {
        self.read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        if let Some(t) = self.overrides.get(name) {
            return t.to_device(dev);
        }
        let Some(&i) = self.index.get(name) else {
            let files: Vec<String> = self
                .files
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect();
            // Most often a config that describes more layers or blocks than the weights hold
            // (the names of the layers after it shift): named when it sits beside the weights,
            // as in the diffusers and transformers layouts.
            let config = self
                .files
                .first()
                .and_then(|(p, _)| p.parent())
                .map(|d| d.join("config.json"))
                .filter(|c| c.is_file())
                .map_or("the model's config.json".to_string(), |c| {
                    c.display().to_string()
                });
            return Err(candle_core::Error::Msg(format!(
                "{}: missing tensor `{name}` (does {config} describe these weights? \
                 a layer or block count that differs shifts the names)",
                files.join(", ")
            )));
        };
        let (path, store) = &self.files[i];
        let t = match store {
            Store::Safetensors(s) => s.load(name, dev),
            Store::Pickle(p) => p
                .get(name)
                .and_then(|t| t.ok_or_else(|| candle_core::Error::Msg("not found".into())))
                .and_then(|t| t.to_device(dev)),
        };
        t.map_err(|e| {
            let e = crate::error::strip_backtrace(e);
            candle_core::Error::Msg(format!("{}: tensor `{name}`: {e}", path.display()))
        })
    }

    fn file_of(&self, name: &str) -> String {
        match self.index.get(name) {
            Some(&i) => self.files[i].0.display().to_string(),
            None => "override".into(),
        }
    }

    /// A `VarBuilder` over these weights, converting to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }
}

/// The message of a candle error without its backtrace or the path we already print.
fn without_path(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithPath { inner, .. } => without_path(*inner),
        candle_core::Error::WithBacktrace { inner, .. } => without_path(*inner),
        other => other,
    }
}

/// Refuses headers whose declared length cannot fit in the file before the file is mapped.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head).map_err(|_| {
        Error::file(
            path,
            format!("not a valid safetensors file: {len} bytes, too short for a header"),
        )
    })?;
    let n = u64::from_le_bytes(head);
    if n > len.saturating_sub(8) {
        return Err(Error::file(
            path,
            format!("not a valid safetensors file: header claims {n} bytes but the file has {len} (truncated?)"),
        ));
    }
    Ok(())
}

impl SimpleBackend for FileWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: tensor `{name}` has shape {:?}, but the config implies {:?}",
                self.file_of(name),
                t.dims(),
                s.dims()
            )));
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.overrides.contains_key(name) || self.index.contains_key(name)
    }
}

/// Seeded random weights: each tensor's values depend only on the seed and the tensor's name,
/// so a real-size architecture can be timed without downloading its weights.
pub struct RandomWeights {
    seed: u64,
}

impl RandomWeights {
    /// Random weights drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        RandomWeights { seed }
    }

    /// A `VarBuilder` over random weights.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn draw(&self, s: &Shape, name: &str, init: Init) -> candle_core::Result<Tensor> {
        let n = s.elem_count();
        let std = match init {
            Init::Const(c) => return Tensor::full(c as f32, s, &Device::Cpu),
            Init::Randn { stdev, .. } => stdev,
            // Scale by fan-in so activations stay O(1) through deep stacks.
            _ => {
                let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
                1.0 / (fan_in as f64).sqrt()
            }
        };
        // FNV-1a: stable across Rust versions, unlike DefaultHasher.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ h);
        let normal = rand_distr::Normal::new(0.0f32, std as f32)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        Tensor::from_vec(v, s, &Device::Cpu)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // Norm layers ask for Const(1)/Const(0); everything else is a normal draw.
        self.draw(&s, name, init)?.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!(
            "random weights need a shape for `{name}`"
        )))
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// candle's shape errors from our weight backend already name the tensor; add the file.
pub(crate) fn with_file(e: Error, path: &Path) -> Error {
    match e {
        Error::Candle(c) if !c.to_string().contains(&path.display().to_string()) => {
            Error::file(path, c.to_string())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_core::{DType, Device, Tensor};

    use super::FileWeights;

    /// A missing tensor names the config.json beside the weights (the usual cause: a config
    /// describing more layers than the weights hold), or says "the model's" when there is none.
    #[test]
    fn a_missing_tensor_names_the_config_beside_the_weights() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("model.safetensors");
        let t = Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), t)]), &weights).unwrap();
        let missing = || {
            FileWeights::open(std::slice::from_ref(&weights))
                .unwrap()
                .into_var_builder(DType::F32, &Device::Cpu)
                .get_unchecked("b")
                .unwrap_err()
                .to_string()
        };
        let e = missing();
        assert!(
            e.contains("missing tensor `b`") && e.contains("the model's config.json"),
            "{e}"
        );
        let config = dir.path().join("config.json");
        std::fs::write(&config, "{}").unwrap();
        let e = missing();
        assert!(
            e.contains(&format!("does {} describe", config.display())),
            "{e}"
        );
    }
}
