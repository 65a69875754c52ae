//! CLIP zero-shot classification: a classifier made of prompt-ensembled text embeddings
//! (one unit row per label), label probabilities for image embeddings, and their entropy.
//!
//! Per label, each template's text embedding is L2-normalised, the normalised embeddings are
//! averaged over the templates and the mean is normalised again (Radford et al. 2021's prompt
//! ensembling). `logits = exp(logit_scale) * norm(image) . classifier^T`, and the
//! probabilities are their softmax over labels, all in f32.

use candle_core::{DType, Device, Tensor, D};

use crate::models::clip::{normalize, ClipModel};
use crate::models::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// `template` with every `{}` replaced by `label` (Python's `template.format(label)` for the
/// usual one-placeholder templates).
fn fill(template: &str, label: &str) -> String {
    template.replace("{}", label)
}

/// The prompts for one label: each template with `{}` replaced by the label. A template
/// without a `{}` placeholder is refused (it would give the same prompt for every label).
pub fn build_prompts<S: AsRef<str>>(templates: &[S], label: &str) -> Result<Vec<String>> {
    if templates.is_empty() {
        return Err(Error::value("templates", "no templates given"));
    }
    templates
        .iter()
        .map(|t| {
            let t = t.as_ref();
            if t.contains("{}") {
                Ok(fill(t, label))
            } else {
                Err(Error::value(
                    "template",
                    format!("{t:?} has no `{{}}` placeholder for the label"),
                ))
            }
        })
        .collect()
}

/// A zero-shot classifier: one unit-norm text embedding per label.
#[derive(Debug, Clone)]
pub struct Classifier {
    labels: Vec<String>,
    /// (labels, projection_dim), f32, unit rows.
    weights: Tensor,
}

impl Classifier {
    /// From text embeddings shaped (labels, templates, dim) or (labels, dim) (one template):
    /// per label, normalise each template's embedding, average, renormalise.
    pub fn from_embeddings(labels: Vec<String>, text_embeds: &Tensor) -> Result<Self> {
        let e = text_embeds.to_dtype(DType::F32)?;
        let e = match e.rank() {
            2 => e.unsqueeze(1)?,
            3 => e,
            r => {
                return Err(Error::value(
                    "text embeddings",
                    format!("rank {r}: expected (labels, templates, dim) or (labels, dim)"),
                ))
            }
        };
        let (l, t, p) = e.dims3()?;
        if l != labels.len() || l == 0 || t == 0 || p == 0 {
            return Err(Error::value(
                "text embeddings",
                format!("shape ({l}, {t}, {p}) does not fit {} labels", labels.len()),
            ));
        }
        let weights = normalize(&normalize(&e)?.mean(1)?)?;
        Ok(Classifier { labels, weights })
    }

    /// From text embeddings of `templates x labels` prompts in template-major order (row
    /// `t * labels + l` is template `t` filled with label `l`), shaped (templates*labels, dim).
    pub fn from_template_major(labels: Vec<String>, text_embeds: &Tensor) -> Result<Self> {
        let (rows, p) = text_embeds.dims2()?;
        let l = labels.len();
        if l == 0 || rows % l != 0 {
            return Err(Error::value(
                "text embeddings",
                format!("{rows} rows are not a whole number of templates for {l} labels"),
            ));
        }
        let e = text_embeds
            .reshape((rows / l, l, p))?
            .transpose(0, 1)?
            .contiguous()?;
        Self::from_embeddings(labels, &e)
    }

    /// Tokenises every template filled with every label and embeds the prompts with `model`.
    pub fn build<S: AsRef<str>, L: AsRef<str>>(
        model: &ClipModel,
        tokenizer: &ClipTokenizer,
        templates: &[S],
        labels: &[L],
        device: &Device,
    ) -> Result<Self> {
        if labels.is_empty() {
            return Err(Error::value("labels", "no labels given"));
        }
        let mut prompts = Vec::with_capacity(templates.len() * labels.len());
        for label in labels {
            prompts.extend(build_prompts(templates, label.as_ref())?);
        }
        let ids = tokenizer.encode_tensor(&prompts, device)?;
        let embeds = model.embed_text(&ids)?;
        let p = embeds.dim(1)?;
        let e = embeds.reshape((labels.len(), templates.len(), p))?;
        let labels = labels.iter().map(|s| s.as_ref().to_string()).collect();
        Self::from_embeddings(labels, &e)
    }

    /// The label names, in classifier row order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// The classifier matrix (labels, dim), f32, unit rows.
    pub fn weights(&self) -> &Tensor {
        &self.weights
    }

    /// `exp(logit_scale) * norm(image_embeds) . weights^T`: (images, labels). `logit_scale`
    /// is the model's raw parameter (the log of the scale).
    pub fn logits(&self, image_embeds: &Tensor, logit_scale: f32) -> Result<Tensor> {
        let img = image_embeds
            .to_dtype(DType::F32)?
            .to_device(self.weights.device())?;
        let (_, p) = img.dims2().map_err(|_| {
            Error::value(
                "image embeddings",
                format!("shape {:?}: expected (images, dim)", img.dims()),
            )
        })?;
        let (_, wp) = self.weights.dims2()?;
        if p != wp {
            return Err(Error::value(
                "image embeddings",
                format!("dimension {p} differs from the classifier's {wp}"),
            ));
        }
        let scale = logit_scale.exp();
        Ok((normalize(&img)?.matmul(&self.weights.t()?)? * scale as f64)?)
    }

    /// Label probabilities (softmax of [`Classifier::logits`] over labels): (images, labels).
    pub fn probs(&self, image_embeds: &Tensor, logit_scale: f32) -> Result<Tensor> {
        let logits = self.logits(image_embeds, logit_scale)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let num = logits.broadcast_sub(&max)?.exp()?;
        let den = num.sum_keepdim(D::Minus1)?;
        Ok(num.broadcast_div(&den)?)
    }
}

/// The Shannon entropy in nats of each row of a (rows, labels) probability matrix
/// (`0 ln 0` counts as 0).
pub fn entropy(probs: &Tensor) -> Result<Vec<f32>> {
    let rows = probs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .map(|r| {
            -r.iter()
                .filter(|&&p| p > 0.0)
                .map(|&p| p as f64 * (p as f64).ln())
                .sum::<f64>() as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_fill_the_placeholder() {
        let p = build_prompts(&["a painting in the style of {}", "{} art"], "Cubism").unwrap();
        assert_eq!(p, vec!["a painting in the style of Cubism", "Cubism art"]);
        assert!(build_prompts(&["no placeholder"], "x").is_err());
        assert!(build_prompts::<&str>(&[], "x").is_err());
    }

    #[test]
    fn ensemble_normalises_then_averages() {
        let d = Device::Cpu;
        // label 0: templates (3, 0) and (0, 1) -> mean of units (0.5, 0.5) -> (1, 1)/sqrt 2.
        let e = Tensor::new(&[[[3f32, 0.0], [0.0, 1.0]], [[0.0, 2.0], [0.0, 5.0]]], &d).unwrap();
        let c = Classifier::from_embeddings(vec!["a".into(), "b".into()], &e).unwrap();
        let w = c.weights().to_vec2::<f32>().unwrap();
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((w[0][0] - h).abs() < 1e-6 && (w[0][1] - h).abs() < 1e-6);
        assert!((w[1][0]).abs() < 1e-6 && (w[1][1] - 1.0).abs() < 1e-6);
        // Template-major layout gives the same classifier.
        let tm = Tensor::new(&[[3f32, 0.0], [0.0, 2.0], [0.0, 1.0], [0.0, 5.0]], &d).unwrap();
        let c2 = Classifier::from_template_major(vec!["a".into(), "b".into()], &tm).unwrap();
        assert_eq!(c2.weights().to_vec2::<f32>().unwrap(), w);
    }

    #[test]
    fn probs_are_a_scaled_softmax_and_entropy_is_in_nats() {
        let d = Device::Cpu;
        let e = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &d).unwrap();
        let c = Classifier::from_embeddings(vec!["x".into(), "y".into()], &e).unwrap();
        let img = Tensor::new(&[[2f32, 0.0], [1.0, 1.0]], &d).unwrap();
        let p = c.probs(&img, 0.0).unwrap().to_vec2::<f32>().unwrap();
        let e1 = std::f32::consts::E;
        assert!((p[0][0] - e1 / (e1 + 1.0)).abs() < 1e-6);
        assert!((p[1][0] - 0.5).abs() < 1e-6);
        let h = entropy(&Tensor::new(&[[0.5f32, 0.5], [1.0, 0.0]], &d).unwrap()).unwrap();
        assert!((h[0] - std::f32::consts::LN_2).abs() < 1e-6 && h[1] == 0.0);
        assert!(c
            .probs(&Tensor::zeros((1, 3), DType::F32, &d).unwrap(), 0.0)
            .is_err());
    }
}
