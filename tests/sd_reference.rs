//! The generation engine against diffusers: tiny random-weight pipelines in the diffusers
//! layout and the outputs diffusers produced for them (tests/reference/make_sd_fixtures.py).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use artguide::generate::{generate, GenerateOptions, Generated};
use artguide::models::hub::HubOptions;
use artguide::models::stable_diffusion::{LoadOptions, SdModel};
use artguide::models::vae::Mode;
use artguide::progress::{Progress, ProgressMode};
use artguide::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(name: &str) -> (SdModel, HashMap<String, Tensor>, serde_json::Value) {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        hub: HubOptions::from_env(),
    };
    let model = SdModel::load(fixtures().join(name).to_str().unwrap(), &opts).unwrap();
    let refs = candle_core::safetensors::load(
        fixtures().join(format!("reference/{name}.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("reference/{name}.json"))).unwrap(),
    )
    .unwrap();
    (model, refs, meta)
}

fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
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

fn options(meta: &serde_json::Value, scheduler: SchedulerKind, gs: f64) -> GenerateOptions {
    GenerateOptions {
        prompt: meta["prompt"].as_str().unwrap().into(),
        negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
        steps: 4,
        guidance_scale: gs,
        scheduler,
        eta: 0.0,
        seed: 0,
        width: meta["width"].as_u64().unwrap() as usize,
        height: meta["height"].as_u64().unwrap() as usize,
        num_images: 1,
        init_image: None,
        strength: 1.0,
        latents: None,
        guide: None,
    }
}

fn run(model: &SdModel, opts: &GenerateOptions) -> Generated {
    let progress = Progress::new(ProgressMode::Quiet, 0, "");
    let mut out = None;
    generate(model, opts, &progress, |g| {
        out = Some(g);
        Ok(())
    })
    .unwrap();
    out.unwrap()
}

/// Our image is 3 x H x W; diffusers' numpy output is H x W x 3.
fn hwc(image: &Tensor) -> Tensor {
    image.permute((1, 2, 0)).unwrap()
}

fn check_components(name: &str) {
    let (model, r, meta) = load(name);
    let prompt = meta["prompt"].as_str().unwrap();
    let emb = model.encode_prompt(prompt).unwrap();
    assert!(max_abs(&emb, &r["cond_emb"]) < 1e-5, "{name}: text encoder");

    let t = r["unet_t"]
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()[0];
    let out = model
        .unet
        .forward(&r["unet_in"], t, &r["unet_ctx"])
        .unwrap();
    let d = max_abs(&out, &r["unet_out"]);
    eprintln!("{name}: unet max abs diff {d:.2e}");
    assert!(d < 2e-5, "{name}: unet max abs diff {d}");

    // Both decoder paths: the CPU kernels and the differentiable ops guidance uses.
    for mode in [Mode::Inference, Mode::Differentiable] {
        let dec = model.vae.decode(&r["vae_dec_in"], mode).unwrap();
        let d = max_abs(&dec, &r["vae_dec_out"]);
        eprintln!("{name}: vae decoder ({mode:?}) max abs diff {d:.2e}");
        assert!(d < 1e-4, "{name}: vae decoder ({mode:?}) max abs diff {d}");
    }
}

fn check_run(name: &str, key: &str, scheduler: SchedulerKind, gs: f64) {
    let (model, r, meta) = load(name);
    let mut opts = options(&meta, scheduler, gs);
    opts.latents = Some(r["latents_init"].clone());
    let g = run(&model, &opts);
    let dl = max_abs(&g.latents, &r[&format!("{key}_latents")]);
    let di = max_abs(
        &hwc(&g.image),
        &r[&format!("{key}_image")].squeeze(0).unwrap(),
    );
    eprintln!("{name} {key}: image max abs diff {di:.2e}, latents {dl:.2e}");
    assert!(
        di < 1e-4,
        "{name} {key}: image max abs diff {di} (latents {dl})"
    );
    assert!(dl < 5e-4, "{name} {key}: latents max abs diff {dl}");
}

#[test]
fn tiny_a_components_match_diffusers() {
    check_components("tiny-sd-a");
}

#[test]
fn tiny_b_components_match_diffusers() {
    check_components("tiny-sd-b");
}

#[test]
fn ddim_cfg_matches_diffusers() {
    check_run("tiny-sd-a", "ddim_cfg", SchedulerKind::Ddim, 7.5);
    check_run("tiny-sd-b", "ddim_cfg", SchedulerKind::Ddim, 7.5);
}

#[test]
fn ddim_without_cfg_matches_diffusers() {
    check_run("tiny-sd-a", "ddim_nocfg", SchedulerKind::Ddim, 1.0);
    check_run("tiny-sd-b", "ddim_nocfg", SchedulerKind::Ddim, 1.0);
}

#[test]
fn euler_and_dpmpp_match_diffusers() {
    for name in ["tiny-sd-a", "tiny-sd-b"] {
        check_run(name, "euler_cfg", SchedulerKind::Euler, 7.5);
        check_run(name, "dpmpp2m_cfg", SchedulerKind::DpmPlusPlus2M, 7.5);
    }
}

#[test]
fn img2img_matches_diffusers() {
    for name in ["tiny-sd-a", "tiny-sd-b"] {
        let (model, r, meta) = load(name);
        let mut opts = options(&meta, SchedulerKind::Ddim, 7.5);
        opts.init_image = Some(r["img2img_init"].clone());
        opts.strength = meta["img2img_strength"].as_f64().unwrap_or(0.5);
        opts.latents = Some(r["img2img_noise"].clone());
        let g = run(&model, &opts);
        let di = max_abs(&hwc(&g.image), &r["img2img_image"].squeeze(0).unwrap());
        eprintln!("{name} img2img: image max abs diff {di:.2e}");
        assert!(di < 1e-4, "{name} img2img: image max abs diff {di}");
    }
}
