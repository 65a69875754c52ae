use super::*;
use candle_core::Var;
use candle_nn::VarMap;
use std::io::Write;

/// Deterministic pseudo-random numbers in [-1, 1) (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn tensor(&mut self, shape: &[usize], scale: f64, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

fn tiny_config(act: ClipActivation) -> ClipConfig {
    ClipConfig {
        text: ClipTextConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            max_position_embeddings: 10,
            vocab_size: 50,
            hidden_act: act,
            layer_norm_eps: 1e-5,
            projection_dim: 6,
            eos_token_id: 49,
            bos_token_id: 48,
            pad_token_id: 49,
        },
        vision: ClipVisionConfig {
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 8,
            patch_size: 4,
            num_channels: 3,
            hidden_act: act,
            layer_norm_eps: 1e-5,
            projection_dim: 6,
        },
        projection_dim: 6,
        logit_scale_init_value: 2.6592,
    }
}

/// Creates every parameter through a VarMap, then overwrites them with deterministic
/// values (layer-norm weights near 1, everything else small).
fn random_varmap(cfg: &ClipConfig, dtype: DType, seed: u64) -> VarMap {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, dtype, &Device::Cpu);
    ClipModel::new(vb, cfg, NormMode::Differentiable).unwrap();
    let mut rng = Rng(seed);
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var: &Var = &data[name];
        let shape = var.dims().to_vec();
        let is_norm_weight = name.ends_with(".weight")
            && (name.contains("layer_norm")
                || name.contains("layrnorm")
                || name.contains("layernorm"));
        let value = if is_norm_weight {
            (rng.tensor(&shape, 0.2, dtype) + 1.0).unwrap()
        } else if name.contains("embedding") {
            rng.tensor(&shape, 1.0, dtype)
        } else {
            rng.tensor(&shape, 0.4, dtype)
        };
        var.set(&value).unwrap();
    }
    drop(data);
    varmap
}

fn model(varmap: &VarMap, cfg: &ClipConfig, dtype: DType, mode: NormMode) -> ClipModel {
    ClipModel::new(
        VarBuilder::from_varmap(varmap, dtype, &Device::Cpu),
        cfg,
        mode,
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let s = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), s), &Device::Cpu).unwrap()
}

fn write_json(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("config.json");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    path
}

#[test]
fn fused_and_differentiable_agree() {
    for act in [ClipActivation::QuickGelu, ClipActivation::Gelu] {
        let cfg = tiny_config(act);
        let varmap = random_varmap(&cfg, DType::F32, 7);
        let fused = model(&varmap, &cfg, DType::F32, NormMode::Fused);
        let diff = model(&varmap, &cfg, DType::F32, NormMode::Differentiable);

        let text = ids(&[
            &[48, 5, 17, 3, 49, 49, 49, 49],
            &[48, 30, 49, 49, 49, 49, 49, 49],
        ]);
        let a = fused.text.forward(&text).unwrap();
        let b = diff.text.forward(&text).unwrap();
        assert_eq!(a.dims(), &[2, 8, 16]);
        assert!(
            max_abs_diff(&a, &b) < 1e-5,
            "text: {}",
            max_abs_diff(&a, &b)
        );
        let ea = fused.embed_text(&text).unwrap();
        let eb = diff.embed_text(&text).unwrap();
        assert_eq!(ea.dims(), &[2, 6]);
        assert!(max_abs_diff(&ea, &eb) < 1e-5);

        let pixels = Rng(3).tensor(&[2, 3, 8, 8], 1.5, DType::F32);
        let (pa, ha) = fused.vision.forward_with_hidden(&pixels, &[1, 0]).unwrap();
        let (pb, hb) = diff.vision.forward_with_hidden(&pixels, &[1, 0]).unwrap();
        assert_eq!(pa.dims(), &[2, 8]);
        assert!(
            max_abs_diff(&pa, &pb) < 1e-5,
            "vision: {}",
            max_abs_diff(&pa, &pb)
        );
        for (x, y) in ha.iter().zip(&hb) {
            assert_eq!(x.dims(), &[2, 5, 8]);
            assert!(max_abs_diff(x, y) < 1e-5);
        }
        let ia = fused.embed_image(&pixels).unwrap();
        let ib = diff.embed_image(&pixels).unwrap();
        assert!(max_abs_diff(&ia, &ib) < 1e-5);
    }
}

#[test]
fn hidden_states_are_consistent() {
    let cfg = tiny_config(ClipActivation::QuickGelu);
    let varmap = random_varmap(&cfg, DType::F32, 11);
    let m = model(&varmap, &cfg, DType::F32, NormMode::Fused);
    let pixels = Rng(5).tensor(&[1, 3, 8, 8], 1.0, DType::F32);

    // post_layernorm of the last layer's class token is the pooled output.
    let (pooled, hidden) = m.vision.forward_with_hidden(&pixels, &[1]).unwrap();
    let cls = hidden[0].narrow(1, 0, 1).unwrap().squeeze(1).unwrap();
    let again = m.vision.post_layernorm.forward(&cls).unwrap();
    assert!(max_abs_diff(&pooled, &again) < 1e-6);

    // Stopping early gives the same layer outputs, in the order asked.
    let early = m.vision.hidden_states(&pixels, &[0]).unwrap();
    let (_, both) = m.vision.forward_with_hidden(&pixels, &[1, 0]).unwrap();
    assert!(max_abs_diff(&early[0], &both[1]) < 1e-7);
    assert!(max_abs_diff(&hidden[0], &both[0]) < 1e-7);

    // Out-of-range layers are a value error.
    let err = m.vision.hidden_states(&pixels, &[2]).unwrap_err();
    assert!(matches!(err, Error::Value { .. }), "{err}");
    // Wrong image size too.
    let small = Rng(5).tensor(&[1, 3, 4, 4], 1.0, DType::F32);
    assert!(matches!(m.vision.forward(&small), Err(Error::Value { .. })));

    // Text: the last layer's output under final_layer_norm is last_hidden_state.
    let text = ids(&[&[48, 5, 6, 49]]);
    let (last, h) = m.text.forward_with_hidden(&text, &[1]).unwrap();
    let again = m.text.final_layer_norm.forward(&h[0]).unwrap();
    assert!(max_abs_diff(&last, &again) < 1e-6);
}

#[test]
fn text_attention_is_causal() {
    let cfg = tiny_config(ClipActivation::QuickGelu);
    let varmap = random_varmap(&cfg, DType::F32, 13);
    let m = model(&varmap, &cfg, DType::F32, NormMode::Fused);
    let a = m.text.forward(&ids(&[&[48, 5, 6, 7, 49, 49]])).unwrap();
    let b = m.text.forward(&ids(&[&[48, 5, 6, 9, 2, 3]])).unwrap();
    let prefix = |t: &Tensor| t.narrow(1, 0, 3).unwrap();
    assert!(max_abs_diff(&prefix(&a), &prefix(&b)) < 1e-6);
    let later = |t: &Tensor| t.narrow(1, 3, 1).unwrap();
    assert!(max_abs_diff(&later(&a), &later(&b)) > 1e-3);
    // Too long for the position table.
    let long = Tensor::zeros((1, 11), DType::U32, &Device::Cpu).unwrap();
    assert!(matches!(m.text.forward(&long), Err(Error::Value { .. })));
}

#[test]
fn pooled_position_follows_transformers() {
    let mut cfg = tiny_config(ClipActivation::QuickGelu);
    let varmap = random_varmap(&cfg, DType::F32, 17);
    // eos_token_id = 49: first position equal to it (not the argmax).
    let m = model(&varmap, &cfg, DType::F32, NormMode::Fused);
    let t = ids(&[
        &[48, 5, 49, 40, 49],
        &[48, 5, 6, 7, 8],
        &[10, 49, 49, 49, 49],
    ]);
    assert_eq!(m.text.eos_positions(&t).unwrap(), vec![2, 0, 1]);
    // Legacy eos_token_id = 2: argmax of the ids, first maximum on ties.
    cfg.text.eos_token_id = 2;
    let legacy = model(&varmap, &cfg, DType::F32, NormMode::Fused);
    let t2 = ids(&[&[48, 5, 2, 30, 2], &[48, 49, 49, 0, 0]]);
    assert_eq!(legacy.text.eos_positions(&t2).unwrap(), vec![0, 1]);
    // i64 ids work too, and pooled picks those rows.
    let t3 = t2.to_dtype(DType::I64).unwrap();
    let hidden = legacy.text.forward(&t3).unwrap();
    let pooled = legacy.text.pooled(&hidden, &t3).unwrap();
    let row1 = hidden.get(1).unwrap().get(1).unwrap();
    assert!(max_abs_diff(&pooled.get(1).unwrap(), &row1) == 0.0);
}

/// d(sum(embedding * r))/d(pixels) through the whole vision tower and projection, plus a
/// Gram-matrix term on an intermediate layer, against central differences in f64.
#[test]
fn vision_gradient_matches_finite_differences() {
    for act in [
        ClipActivation::QuickGelu,
        ClipActivation::Gelu,
        ClipActivation::GeluNew,
    ] {
        let cfg = tiny_config(act);
        let dtype = DType::F64;
        let varmap = random_varmap(&cfg, dtype, 23);
        let m = model(&varmap, &cfg, dtype, NormMode::Differentiable);
        let r = Rng(29).tensor(&[1, 6], 1.0, dtype);
        let pixels0 = Rng(31).tensor(&[1, 3, 8, 8], 1.0, dtype);

        let loss = |px: &Tensor| -> Tensor {
            let (pooled, hidden) = m.vision.forward_with_hidden(px, &[0]).unwrap();
            let emb = m.project_image(&pooled).unwrap();
            let h = hidden[0].get(0).unwrap();
            let gram = h.t().unwrap().matmul(&h).unwrap();
            let a = (emb * &r).unwrap().sum_all().unwrap();
            let b = (gram.sqr().unwrap().sum_all().unwrap() * 1e-3).unwrap();
            (a + b).unwrap()
        };

        let var = Var::from_tensor(&pixels0).unwrap();
        let grads = loss(var.as_tensor()).backward().unwrap();
        let grad = grads
            .get(var.as_tensor())
            .expect("gradient reaches the pixels");
        let grad: Vec<f64> = grad.flatten_all().unwrap().to_vec1().unwrap();

        let base: Vec<f64> = pixels0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-5;
        let mut worst: f64 = 0.0;
        let mut scale: f64 = 0.0;
        for i in 0..base.len() {
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let px = Tensor::from_vec(v, (1, 3, 8, 8), &Device::Cpu).unwrap();
                loss(&px).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            worst = worst.max((numeric - grad[i]).abs());
            scale = scale.max(numeric.abs());
        }
        assert!(
            scale > 1e-3,
            "{act:?}: gradient too small to test ({scale})"
        );
        // candle's gelu backwards use 6-digit constants; quick_gelu's is exact.
        let tol = if act == ClipActivation::QuickGelu {
            1e-8
        } else {
            1e-6
        } * scale.max(1.0);
        assert!(
            worst < tol,
            "{act:?}: max |analytic - numeric| = {worst:e} (scale {scale:e})"
        );
    }
}

#[test]
fn text_model_config_with_all_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_json(
        dir.path(),
        r#"{"architectures": ["CLIPTextModel"], "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
            "vocab_size": 1000, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
            "projection_dim": 16, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
            "model_type": "clip_text_model"}"#,
    );
    let cfg = ClipTextConfig::load(&path).unwrap();
    assert_eq!(cfg.hidden_size, 32);
    assert_eq!(cfg.intermediate_size, 37);
    assert_eq!(cfg.hidden_act, ClipActivation::Gelu);
    assert_eq!(cfg.layer_norm_eps, 1e-6);
    assert_eq!(cfg.projection_dim, 16);
    assert_eq!(
        (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id),
        (0, 2, 1)
    );
    assert_eq!(cfg.head_dim(), 8);
}

#[test]
fn clip_model_config_takes_sections_and_defaults() {
    let dir = tempfile::tempdir().unwrap();
    // Sub-configs are written as a diff against transformers' defaults.
    let path = write_json(
        dir.path(),
        r#"{"model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.5,
            "text_config": {"hidden_size": 768, "num_attention_heads": 12, "hidden_act": "gelu"},
            "vision_config": {"hidden_size": 1024, "num_attention_heads": 16,
                              "num_hidden_layers": 24, "patch_size": 14, "image_size": 336,
                              "intermediate_size": 4096}}"#,
    );
    let cfg = ClipConfig::load(&path).unwrap();
    assert_eq!(cfg.projection_dim, 768);
    assert_eq!(cfg.logit_scale_init_value, 2.5);
    assert_eq!(cfg.text.hidden_size, 768);
    assert_eq!(cfg.text.intermediate_size, 2048);
    assert_eq!(cfg.text.num_hidden_layers, 12);
    assert_eq!(cfg.text.vocab_size, 49408);
    assert_eq!(cfg.text.max_position_embeddings, 77);
    assert_eq!(cfg.text.eos_token_id, 49407);
    assert_eq!(cfg.text.hidden_act, ClipActivation::Gelu);
    assert_eq!(cfg.text.projection_dim, 768);
    assert_eq!(cfg.vision.hidden_act, ClipActivation::QuickGelu);
    assert_eq!(cfg.vision.num_positions(), 24 * 24 + 1);
    assert_eq!(cfg.vision.projection_dim, 768);
    assert_eq!(cfg.vision.num_channels, 3);
    // The single-tower loaders accept the CLIPModel file too.
    assert_eq!(ClipTextConfig::load(&path).unwrap(), cfg.text);
    assert_eq!(ClipVisionConfig::load(&path).unwrap(), cfg.vision);

    // All defaults: an empty CLIPModel config is ViT-B/32.
    let path = write_json(dir.path(), r#"{"model_type": "clip"}"#);
    let cfg = ClipConfig::load(&path).unwrap();
    assert_eq!(cfg.vision.hidden_size, 768);
    assert_eq!(cfg.vision.patch_size, 32);
    assert_eq!(cfg.text.hidden_size, 512);
    assert_eq!(cfg.projection_dim, 512);
    assert!((cfg.logit_scale_init_value - 2.6592).abs() < 1e-12);
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let field_of = |e: Error| match e {
        Error::Field { path, field, .. } => (path, field),
        other => panic!("expected a field error, got {other:?}"),
    };

    let path = write_json(
        dir.path(),
        r#"{"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "hidden_act": "swish"}"#,
    );
    let err = ClipTextConfig::load(&path).unwrap_err();
    assert!(err.to_string().contains("swish"), "{err}");
    assert_eq!(field_of(err), (path.clone(), "hidden_act".to_string()));

    let path = write_json(
        dir.path(),
        r#"{"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}"#,
    );
    assert_eq!(
        field_of(ClipTextConfig::load(&path).unwrap_err()),
        (path.clone(), "hidden_size".to_string())
    );

    let path = write_json(
        dir.path(),
        r#"{"text_config": {"hidden_act": "relu"}, "vision_config": {}}"#,
    );
    assert_eq!(
        field_of(ClipConfig::load(&path).unwrap_err()).1,
        "text_config.hidden_act"
    );
    let path = write_json(
        dir.path(),
        r#"{"text_config": {}, "vision_config": {"hidden_size": "big"}}"#,
    );
    assert_eq!(
        field_of(ClipVisionConfig::load(&path).unwrap_err()).1,
        "vision_config.hidden_size"
    );
    let path = write_json(
        dir.path(),
        r#"{"text_config": {"hidden_size": 30, "num_attention_heads": 4}}"#,
    );
    assert_eq!(
        field_of(ClipTextConfig::load(&path).unwrap_err()).1,
        "text_config.num_attention_heads"
    );

    // A single-tower config is not a CLIPModel config.
    let path = write_json(
        dir.path(),
        r#"{"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4}"#,
    );
    assert!(matches!(ClipConfig::load(&path), Err(Error::Field { .. })));

    // Missing and malformed files.
    let missing = dir.path().join("nope.json");
    assert!(matches!(
        ClipTextConfig::load(&missing),
        Err(Error::Io { .. })
    ));
    let path = write_json(dir.path(), "{not json");
    assert!(matches!(
        ClipTextConfig::load(&path),
        Err(Error::File { .. })
    ));
}

#[test]
fn from_dir_reports_missing_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_json(
        dir.path(),
        r#"{"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4}"#,
    );
    let err = ClipTextTransformer::from_dir(dir.path(), DType::F32, &Device::Cpu, NormMode::Fused)
        .unwrap_err();
    assert!(matches!(&err, Error::File { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn from_dir_round_trip_through_safetensors() {
    // Save a tiny random CLIPModel and load it back through from_dir.
    let cfg = tiny_config(ClipActivation::QuickGelu);
    let varmap = random_varmap(&cfg, DType::F32, 37);
    let dir = tempfile::tempdir().unwrap();
    varmap.save(dir.path().join("model.safetensors")).unwrap();
    let cfg_json = serde_json::json!({
        "model_type": "clip",
        "projection_dim": 6,
        "text_config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "max_position_embeddings": 10,
                        "vocab_size": 50, "eos_token_id": 49, "bos_token_id": 48,
                        "pad_token_id": 49},
        "vision_config": {"hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
    });
    write_json(dir.path(), &cfg_json.to_string());
    let loaded =
        ClipModel::from_dir(dir.path(), DType::F32, &Device::Cpu, NormMode::Fused).unwrap();
    assert_eq!(loaded.config(), &cfg);
    let reference = model(&varmap, &cfg, DType::F32, NormMode::Fused);
    let pixels = Rng(41).tensor(&[1, 3, 8, 8], 1.0, DType::F32);
    let a = loaded.embed_image(&pixels).unwrap();
    let b = reference.embed_image(&pixels).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let text = ids(&[&[48, 3, 49]]);
    let logits = loaded
        .logits_per_image(&a, &loaded.embed_text(&text).unwrap())
        .unwrap();
    assert_eq!(logits.dims(), &[1, 1]);

    // A text tower reads the same file under text_model.
    let tower = ClipTextTransformer::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("text_model"),
        &cfg.text,
        NormMode::Fused,
    )
    .unwrap();
    assert_eq!(
        max_abs_diff(
            &tower.forward(&text).unwrap(),
            &loaded.text.forward(&text).unwrap()
        ),
        0.0
    );
}

/// Why Differentiable exists: candle 0.11's fused layer norm / softmax have no backward, so
/// no gradient reaches the pixels in Fused mode. If this starts failing, candle has gained
/// those backwards and Fused mode could serve guidance too.
#[test]
fn fused_mode_drops_pixel_gradients() {
    let cfg = tiny_config(ClipActivation::QuickGelu);
    let varmap = random_varmap(&cfg, DType::F32, 23);
    let pixels0 = Rng(31).tensor(&[1, 3, 8, 8], 1.0, DType::F32);
    let grad_norm = |mode| {
        let m = model(&varmap, &cfg, DType::F32, mode);
        let var = Var::from_tensor(&pixels0).unwrap();
        let loss = m.embed_image(var.as_tensor()).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        grads.get(var.as_tensor()).map(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
    };
    assert!(grad_norm(NormMode::Fused).is_none());
    assert!(grad_norm(NormMode::Differentiable).unwrap() > 0.0);
}

/// transformers 4 writes a CLIPTextModel's tensors under `text_model.`, transformers 5 at the
/// root; from_dir reads both.
#[test]
fn text_from_dir_reads_both_checkpoint_layouts() {
    let cfg = tiny_config(ClipActivation::QuickGelu);
    let varmap = random_varmap(&cfg, DType::F32, 43);
    let reference = model(&varmap, &cfg, DType::F32, NormMode::Fused);
    let text = ids(&[&[48, 3, 7, 49, 49]]);
    let expected = reference.text.forward(&text).unwrap();
    let config = serde_json::json!({
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": 10, "vocab_size": 50,
        "eos_token_id": 49, "bos_token_id": 48, "pad_token_id": 49, "projection_dim": 6
    });
    let tensors: std::collections::HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with("text_model."))
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    for strip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        write_json(dir.path(), &config.to_string());
        let stored: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, v)| {
                let k = if strip {
                    k.trim_start_matches("text_model.").to_string()
                } else {
                    k.clone()
                };
                (k, v.to_dtype(DType::F16).unwrap())
            })
            .collect();
        candle_core::safetensors::save(&stored, dir.path().join("model.safetensors")).unwrap();
        let tower =
            ClipTextTransformer::from_dir(dir.path(), DType::F32, &Device::Cpu, NormMode::Fused)
                .unwrap();
        // Stored as f16, so compare loosely; the point is that every tensor was found.
        let err = max_abs_diff(&tower.forward(&text).unwrap(), &expected);
        assert!(err < 1e-2, "strip={strip}: {err}");
    }
}

/// f16 activations beyond f16's sum of squares (RMS 300 over 768 features: 6.9e7 > 65504)
/// still normalise, and their gradient matches f32's, instead of a bias-only output and a
/// zero gradient.
#[test]
fn half_precision_layer_norm_survives_large_activations() {
    let dev = Device::Cpu;
    // Deterministic, irregular values: sin of a stretched ramp.
    let wave = |n: usize, k: f64| {
        (Tensor::arange(0f32, n as f32, &dev).unwrap() * k)
            .unwrap()
            .sin()
            .unwrap()
    };
    let x32 = (wave(2 * 3 * 768, 0.37).reshape((2, 3, 768)).unwrap() * 300.0).unwrap();
    let w32 = (wave(768, 1.3) * 0.1).unwrap().affine(1.0, 1.0).unwrap();
    let b32 = (wave(768, 2.1) * 0.1).unwrap();
    let probe = wave(2 * 3 * 768, 0.61).reshape((2, 3, 768)).unwrap();
    let run = |dtype: DType| {
        let x = Var::from_tensor(&x32.to_dtype(dtype).unwrap()).unwrap();
        let (w, b) = (w32.to_dtype(dtype).unwrap(), b32.to_dtype(dtype).unwrap());
        let y = layer_norm(x.as_tensor(), &w, &b, 1e-5, NormMode::Differentiable).unwrap();
        assert_eq!(y.dtype(), dtype);
        let loss = (y.to_dtype(DType::F32).unwrap() * &probe)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let grad = g.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap();
        (y.to_dtype(DType::F32).unwrap(), grad)
    };
    let (y32, g32) = run(DType::F32);
    let (y16, g16) = run(DType::F16);
    assert!(
        max_abs_diff(&y16, &y32) < 0.02,
        "{}",
        max_abs_diff(&y16, &y32)
    );
    let scale = g32
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    assert!(scale > 1e-4, "{scale}");
    let d = max_abs_diff(&g16, &g32);
    assert!(d < 0.02 * scale, "gradient off by {d} (scale {scale})");
}
