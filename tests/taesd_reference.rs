//! The TAESD decoder against diffusers' `AutoencoderTiny`: a tiny random-weight model and the
//! decode and gradient diffusers computed for it (tests/reference/make_taesd_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use artguide::models::hub::HubOptions;
use artguide::models::taesd::TaesdDecoder;
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_distr::Distribution;

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn model_dir() -> PathBuf {
    fixtures().join("tiny-taesd")
}

fn refs() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("reference/tiny-taesd.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Options that can only succeed from `cache_dir`, never the network.
fn offline(cache_dir: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache_dir.to_path_buf(),
        offline: true,
        revision: "main".into(),
    }
}

fn load(spec: &Path, dtype: DType) -> TaesdDecoder {
    TaesdDecoder::load(
        spec.to_str().unwrap(),
        &offline(Path::new("/nonexistent")),
        dtype,
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn decode_matches_diffusers() {
    let r = refs();
    let dec = load(&model_dir(), DType::F32);
    assert_eq!(dec.scale_factor(), 2);
    let img = dec.decode(&r["latents"]).unwrap();
    assert_eq!(img.dtype(), DType::F32);
    let d = max_abs(&img, &r["decoded"]);
    eprintln!("parity max abs diff {d:.2e}");
    // Measured: 1.9e-6, with outputs spanning about [-5.5, 4.2].
    assert!(d < 1e-5, "max abs diff {d}");
}

/// loss = sum(decode(x) * w) and its gradient in f64, against torch's autograd and against
/// central finite differences along seeded random directions.
#[test]
fn gradient_matches_autograd_and_finite_differences() {
    let r = refs();
    let dec = load(&model_dir(), DType::F64);
    let w = r["loss_weights"].to_dtype(DType::F64).unwrap();
    let x0 = r["latents"].to_dtype(DType::F64).unwrap();
    let loss_at =
        |x: &Tensor| -> Tensor { (dec.decode(x).unwrap() * &w).unwrap().sum_all().unwrap() };

    let x = Var::from_tensor(&x0).unwrap();
    let loss = loss_at(x.as_tensor());
    let grads = loss.backward().unwrap();
    let g = grads
        .get(x.as_tensor())
        .expect("no gradient reached the latents");

    let want = &r["latents_grad_f64"];
    let scale = max_abs(want, &want.zeros_like().unwrap());
    let d = max_abs(g, want);
    eprintln!("gradient max abs diff vs torch {d:.2e} (largest entry {scale:.2})");
    // Measured: the loss differs by 5.3e-15, the gradient by 3.1e-15 (largest entry 6.9).
    assert!((scalar(&loss) - scalar(&r["loss_f64"])).abs() < 1e-9);
    assert!(
        d < 1e-10 * scale,
        "gradient differs from torch by {d} (scale {scale})"
    );

    // Every latent reaches some output pixel through a live ReLU path.
    let zeros = g
        .eq(0.0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(scalar(&zeros), 0.0, "latents with zero gradient");

    // Rounding in the loss dominates below h = 1e-5 (relative error 4e-9 at 1e-6, 3e-8 at
    // 1e-7), and at 1e-5 no ReLU input crosses zero between x - hv and x + hv for these
    // seeded directions.
    let h = 1e-5;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let normal = rand_distr::Normal::new(0.0f64, 1.0).unwrap();
    let mut worst = 0f64;
    for _ in 0..4 {
        let v: Vec<f64> = (0..x0.elem_count())
            .map(|_| normal.sample(&mut rng))
            .collect();
        let v = Tensor::from_vec(v, x0.shape(), &Device::Cpu).unwrap();
        let gv = scalar(&(g * &v).unwrap().sum_all().unwrap());
        let plus = scalar(&loss_at(&(&x0 + (&v * h).unwrap()).unwrap()));
        let minus = scalar(&loss_at(&(&x0 - (&v * h).unwrap()).unwrap()));
        let fd = (plus - minus) / (2.0 * h);
        let rel = (fd - gv).abs() / fd.abs().max(gv.abs());
        worst = worst.max(rel);
        assert!(
            rel < 1e-6,
            "<g, v> = {gv}, finite difference {fd}, rel {rel}"
        );
    }
    // Measured: worst relative error 2.1e-10 over the four directions.
    eprintln!("worst finite-difference relative error {worst:.2e}");
}

/// Copies the fixture's files into `dir`, rewriting the config with `edit`.
fn copy_model(dir: &Path, edit: impl Fn(String) -> String, weights_as: Option<&str>) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = std::fs::read_to_string(model_dir().join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), edit(cfg)).unwrap();
    if let Some(name) = weights_as {
        std::fs::copy(model_dir().join(WEIGHTS), dir.join(name)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    TaesdDecoder::load(
        dir.to_str().unwrap(),
        &offline(Path::new("/nonexistent")),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn unsupported_activation_is_refused_naming_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("gelu");
    copy_model(
        &dir,
        |c| {
            let out = c.replace("\"act_fn\": \"relu\"", "\"act_fn\": \"gelu\"");
            assert_ne!(out, c);
            out
        },
        Some(WEIGHTS),
    );
    let err = load_err(&dir);
    assert!(
        err.contains(&dir.join("config.json").display().to_string())
            && err.contains("`act_fn`")
            && err.contains("gelu"),
        "{err}"
    );
}

#[test]
fn missing_weights_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("no-weights");
    copy_model(&dir, |c| c, None);
    let err = load_err(&dir);
    assert!(
        err.contains(&dir.join(WEIGHTS).display().to_string()) && err.contains("missing"),
        "{err}"
    );
}

/// A `.fp16.safetensors` file holding float16 weights loads, and decodes close to the
/// float32 reference (the weights differ by float16 rounding).
#[test]
fn fp16_variant_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fp16");
    copy_model(&dir, |c| c, None);
    let half: HashMap<String, Tensor> =
        candle_core::safetensors::load(model_dir().join(WEIGHTS), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
            .collect();
    candle_core::safetensors::save(&half, dir.join("diffusion_pytorch_model.fp16.safetensors"))
        .unwrap();
    let r = refs();
    let img = load(&dir, DType::F32).decode(&r["latents"]).unwrap();
    let d = max_abs(&img, &r["decoded"]);
    eprintln!("fp16 max abs diff {d:.2e}");
    // Measured: 3.3e-3.
    assert!(d > 0.0 && d < 0.05, "max abs diff {d}");
}

/// `madebyollin/taesd` resolves from a Hugging Face cache with the network off.
#[test]
fn loads_a_hub_id_from_the_cache_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "2d7a4bbd1e1c6a7e0b7a3c2f9e8d5c4b3a291807";
    let repo = tmp.path().join("models--madebyollin--taesd");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_model(&repo.join("snapshots").join(commit), |c| c, Some(WEIGHTS));

    let dec = TaesdDecoder::load(
        "madebyollin/taesd",
        &offline(tmp.path()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let r = refs();
    let d = max_abs(&dec.decode(&r["latents"]).unwrap(), &r["decoded"]);
    assert!(d < 1e-5, "max abs diff {d}");

    // Offline, a repo missing from the cache is named, not fetched.
    let err = TaesdDecoder::load(
        "madebyollin/taesdxl",
        &offline(tmp.path()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("madebyollin/taesdxl") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
