//! Our UNet against diffusers 0.42.1's `UNet2DConditionModel` on the tiny random-weight
//! fixtures (tests/reference/make_sd_fixtures.py): `unet_out` is diffusers' output for
//! `unet_in` at timestep `unet_t` with context `unet_ctx`.

use std::path::{Path, PathBuf};

use artguide::models::sd::{build_unet, read_json, UNetJson};
use artguide::models::unet::UNet;
use artguide::models::weights::FileWeights;
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Returns (ours vs diffusers, candle-transformers vs diffusers, output magnitude).
fn compare(name: &str) -> (f32, f32, f32) {
    let dir = fixtures().join(name).join("unet");
    let config = dir.join("config.json");
    let spec = read_json::<UNetJson>(&config)
        .unwrap()
        .to_spec(&config)
        .unwrap();
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    let vb = FileWeights::open(std::slice::from_ref(&weights))
        .unwrap()
        .into_var_builder(DType::F32, &Device::Cpu);
    let refs = candle_core::safetensors::load(
        fixtures().join(format!("reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let x = &refs["unet_in"];
    let ctx = &refs["unet_ctx"];
    let t = refs["unet_t"]
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want = &refs["unet_out"];

    let ours = UNet::new(vb.clone(), &spec).unwrap();
    let got = ours.forward(x, t, ctx).unwrap();
    let candle = build_unet(&spec, vb).unwrap();
    let got_candle = candle.forward(x, t, ctx).unwrap();
    let mag = max_abs(want, &want.zeros_like().unwrap());
    (max_abs(&got, want), max_abs(&got_candle, want), mag)
}

fn check(name: &str) {
    let (ours, candle, mag) = compare(name);
    eprintln!(
        "{name}: max |ours - diffusers| = {ours:.3e}, max |candle - diffusers| = {candle:.3e}, max |diffusers| = {mag:.3}"
    );
    assert!(ours < 2e-5, "{name}: max abs diff {ours} >= 2e-5");
}

#[test]
fn unet_matches_diffusers_tiny_sd_a() {
    check("tiny-sd-a");
}

#[test]
fn unet_matches_diffusers_tiny_sd_b() {
    check("tiny-sd-b");
}
