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
    assert!(
        emb.pooled.is_none(),
        "{name}: SD 1.x/2.x have no pooled conditioning"
    );
    assert!(
        max_abs(&emb.context, &r["cond_emb"]) < 1e-5,
        "{name}: text encoder"
    );

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

// --- SDXL (tests/reference/make_sdxl_fixtures.py): two text encoders, text_time UNet.

#[test]
fn sdxl_components_match_diffusers() {
    let (model, r, meta) = load("tiny-sdxl");
    assert!(model.text_encoder_2.is_some() && model.force_zeros_for_empty_prompt);
    let cond = model
        .encode_prompt(meta["prompt"].as_str().unwrap())
        .unwrap();
    let d = max_abs(&cond.context, &r["cond_emb"]);
    let dp = max_abs(cond.pooled.as_ref().unwrap(), &r["cond_pooled"]);
    eprintln!("tiny-sdxl: prompt embeds {d:.2e}, pooled {dp:.2e}");
    assert!(d < 1e-5 && dp < 1e-5, "prompt embeds {d}, pooled {dp}");
    let neg = model
        .encode_negative(meta["negative_prompt"].as_str().unwrap(), &cond)
        .unwrap();
    assert!(max_abs(&neg.context, &r["uncond_emb"]) < 1e-5);
    assert!(max_abs(neg.pooled.as_ref().unwrap(), &r["uncond_pooled"]) < 1e-5);
    // No negative prompt: zeros, as force_zeros_for_empty_prompt asks.
    let zero = model.encode_negative("", &cond).unwrap();
    assert_eq!(
        max_abs(&zero.context, &zero.context.zeros_like().unwrap()),
        0.0
    );

    // The UNet with added conditioning, through the pipeline's own time ids.
    let both = artguide::models::stable_diffusion::Conditioning {
        context: r["unet_ctx"].clone(),
        pooled: Some(r["unet_text_embeds"].clone()),
    };
    let t = meta["unet_timestep"].as_f64().unwrap();
    let out = model.predict(&r["unet_in"], t, &both).unwrap();
    let d = max_abs(&out, &r["unet_out"]);
    eprintln!("tiny-sdxl: unet max abs diff {d:.2e}");
    assert!(d < 2e-5, "tiny-sdxl: unet max abs diff {d}");
    // Without the pooled embedding the SDXL UNet refuses rather than guessing.
    let bare = artguide::models::stable_diffusion::Conditioning {
        context: r["unet_ctx"].clone(),
        pooled: None,
    };
    let err = model
        .predict(&r["unet_in"], t, &bare)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pooled"), "{err}");
}

#[test]
fn sdxl_runs_match_diffusers() {
    let (model, r, meta) = load("tiny-sdxl");
    for (key, scheduler, gs, negative) in [
        ("euler_cfg", SchedulerKind::Euler, 7.5, true),
        ("ddim_cfg_zero_negative", SchedulerKind::Ddim, 7.5, false),
        ("ddim_nocfg", SchedulerKind::Ddim, 1.0, false),
    ] {
        let mut opts = options(&meta, scheduler, gs);
        if !negative {
            opts.negative_prompt.clear();
        }
        opts.latents = Some(r["latents_init"].clone());
        let g = run(&model, &opts);
        let di = max_abs(
            &hwc(&g.image),
            &r[&format!("{key}_image")].squeeze(0).unwrap(),
        );
        eprintln!("tiny-sdxl {key}: image max abs diff {di:.2e}");
        assert!(di < 1e-4, "tiny-sdxl {key}: image max abs diff {di}");
    }
}

/// SDXL img2img: the init image through the VAE encoder (its mean), DDIM from the strength's
/// start step, time ids from the image size, against StableDiffusionXLImg2ImgPipeline.
#[test]
fn sdxl_img2img_matches_diffusers() {
    let (model, r, meta) = load("tiny-sdxl");
    let mut opts = options(&meta, SchedulerKind::Ddim, 7.5);
    opts.init_image = Some(r["img2img_init"].clone());
    opts.strength = meta["img2img_strength"].as_f64().unwrap();
    opts.latents = Some(r["img2img_noise"].clone());
    let g = run(&model, &opts);
    let di = max_abs(&hwc(&g.image), &r["img2img_image"]);
    eprintln!("tiny-sdxl img2img: image max abs diff {di:.2e}");
    assert!(di < 1e-4, "tiny-sdxl img2img: image max abs diff {di}");
}

/// A copy of tiny-sdxl with one file rewritten by `edit`.
fn broken_sdxl(rel: &str, edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sdxl");
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        let to = dir.path().join(entry.file_name());
        if entry.path().is_dir() {
            std::fs::create_dir(&to).unwrap();
            for f in std::fs::read_dir(entry.path()).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    let p = dir.path().join(rel);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    dir
}

#[test]
fn sdxl_inconsistent_folders_are_refused_by_name() {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        hub: HubOptions::from_env(),
    };
    type Case = (
        &'static str,
        fn(&mut serde_json::Value),
        &'static [&'static str],
    );
    let cases: [Case; 4] = [
        (
            "model_index.json",
            |v| v["text_encoder"] = serde_json::json!([null, null]),
            &["model_index.json", "text_encoder", "refiner"],
        ),
        (
            "model_index.json",
            |v| {
                v.as_object_mut().unwrap().remove("text_encoder_2");
            },
            &["unet/config.json", "addition_embed_type", "text_encoder_2"],
        ),
        (
            "text_encoder_2/config.json",
            |v| v["projection_dim"] = serde_json::json!(8),
            &["text_encoder_2/config.json", "projection_dim", "8", "16"],
        ),
        (
            "unet/config.json",
            |v| v["cross_attention_dim"] = serde_json::json!(32),
            &["text_encoder_2/config.json", "hidden_size", "16 + 24", "32"],
        ),
    ];
    for (rel, edit, expect) in cases {
        let dir = broken_sdxl(rel, edit);
        let err = match SdModel::load(dir.path().to_str().unwrap(), &opts) {
            Ok(_) => panic!("{rel}: a broken folder loaded"),
            Err(e) => e.to_string(),
        };
        for word in expect {
            assert!(err.contains(word), "{rel}: `{word}` missing from: {err}");
        }
    }
}
