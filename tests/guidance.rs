//! CLIP and style guidance on the committed tiny models: gradients against finite
//! differences through every decoder and loss term, the effect of guidance measured
//! afterwards by the probe code, and NaN handling.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use artguide::generate::{generate, GenerateOptions, Generated};
use artguide::guidance::{
    DecoderKind, GuidanceConfig, GuidanceDecoder, Guide, OnNonFinite, StyleConfig, TextTarget,
};
use artguide::models::clip::normalize;
use artguide::models::hub::HubOptions;
use artguide::models::stable_diffusion::{LoadOptions, SdModel};
use artguide::noise::{NoiseGen, Stream};
use artguide::probe::embed::ClipEncoder;
use artguide::progress::{Progress, ProgressMode};
use artguide::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};

const MAX_PIXELS: u64 = 1 << 24;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(rel: &str) -> String {
    fixtures().join(rel).to_str().unwrap().to_string()
}

fn model(dtype: DType) -> SdModel {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype,
        hub: HubOptions::from_env(),
    };
    SdModel::load(&fixture("tiny-sd-a"), &opts).unwrap()
}

fn target(text: &str, weight: f64) -> TextTarget {
    TextTarget {
        text: text.into(),
        weight,
    }
}

/// A config with every term switched on.
/// The TAESD source for `decoder`: the fixture for TAESD, the default otherwise (another
/// decoder refuses a TAESD source).
fn taesd_for(decoder: DecoderKind) -> String {
    match decoder {
        DecoderKind::Taesd => fixture("tiny-taesd"),
        _ => GuidanceConfig::default().taesd,
    }
}

fn all_terms(decoder: DecoderKind) -> GuidanceConfig {
    GuidanceConfig {
        clip: Some(fixture("clip/tiny-clip-a")),
        prompts: vec![
            target("a red apple on a table", 1.0),
            target("blurry", -0.5),
        ],
        image: Some(fixtures().join("clip/images/img4_71x52_rgb.png")),
        image_weight: 0.7,
        scale: 1.0,
        cutouts: 3,
        tv_weight: 0.3,
        range_weight: 2.0,
        style: Some(StyleConfig {
            image: fixtures().join("clip/images/img0_37x23_rgb.png"),
            weight: 0.5,
            embed_weight: 0.4,
            layers: Some(vec![0, 1]),
            content_weight: 0.8,
            content_layers: Some(vec![1]),
        }),
        decoder,
        taesd: taesd_for(decoder),
        ..Default::default()
    }
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Finite-difference step and tolerance per decoder. candle's VAE attention block casts to f32
/// even in an f64 model, so FD through the VAE carries f32 rounding noise (error ~1/h for
/// small h; measured: 1.5e-2 at h = 1e-5, 2.8e-4 at 1e-3, 9e-4 at 1e-2, the U-shape of a
/// right gradient under noise); TAESD and the linear decoder are f64 throughout (~1e-9).
fn fd_step_and_tolerance(decoder: DecoderKind) -> (f64, f64) {
    match decoder {
        DecoderKind::Vae => (1e-3, 2e-3),
        _ => (1e-5, 1e-6),
    }
}

/// Compares the gradient of the guide's loss at random x0 with central finite differences
/// along random directions; returns the largest relative error.
fn fd_check(model: &SdModel, guide: &Guide, content: Option<&Tensor>) -> f64 {
    let (step, _) = fd_step_and_tolerance(guide.config.decoder);
    let (c, h, w) = model.latent_shape(32, 32).unwrap();
    let x0 = NoiseGen::new(5, Stream::InitialLatents)
        .randn(&[1, c, h, w])
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let rng = || NoiseGen::new(9, Stream::Guidance);
    let sg = guide.gradient(model, &x0, &mut rng(), content, 0).unwrap();
    let g = sg.grad.expect("finite gradient");
    let nonzero = g
        .ne(0f64)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .mean_all()
        .unwrap();
    assert!(
        scalar(&nonzero) > 0.5,
        "gradient mostly zero: {}",
        scalar(&nonzero)
    );
    let loss_at = |x: &Tensor| scalar(&guide.loss(model, x, &mut rng(), content).unwrap().0);
    let mut worst = 0f64;
    for k in 0..3 {
        let v = NoiseGen::new(100 + k, Stream::InitialLatents)
            .randn(&[1, c, h, w])
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let lp = loss_at(&(&x0 + (&v * step).unwrap()).unwrap());
        let lm = loss_at(&(&x0 - (&v * step).unwrap()).unwrap());
        let fd = (lp - lm) / (2.0 * step);
        let an = scalar(&(&g * &v).unwrap().sum_all().unwrap());
        let rel = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-12);
        assert!(an.abs() > 1e-9, "directional derivative vanishes: {an}");
        worst = worst.max(rel);
    }
    worst
}

fn content_image() -> Tensor {
    let t = NoiseGen::new(77, Stream::Steps)
        .randn(&[1, 3, 32, 32])
        .unwrap();
    (t.affine(0.2, 0.5).unwrap().clamp(0f32, 1f32).unwrap())
        .to_dtype(DType::F64)
        .unwrap()
}

#[test]
fn gradients_match_finite_differences_through_every_decoder() {
    let model = model(DType::F64);
    let hub = HubOptions::from_env();
    let content = content_image();
    for decoder in [DecoderKind::Vae, DecoderKind::Taesd, DecoderKind::Linear] {
        let guide = Guide::load(all_terms(decoder), &model, &hub, MAX_PIXELS).unwrap();
        let rel = fd_check(&model, &guide, Some(&content));
        let (_, tol) = fd_step_and_tolerance(decoder);
        eprintln!("{decoder}: worst relative error {rel:.2e}");
        assert!(rel < tol, "{decoder}: relative error {rel}");
    }
}

#[test]
fn every_loss_term_has_a_correct_gradient_on_its_own() {
    let model = model(DType::F64);
    let hub = HubOptions::from_env();
    let content = content_image();
    let base = all_terms(DecoderKind::Vae);
    let style = base.style.clone().unwrap();
    let none = StyleConfig {
        weight: 0.0,
        embed_weight: 0.0,
        content_weight: 0.0,
        ..style.clone()
    };
    let only = |f: &dyn Fn(&mut GuidanceConfig)| {
        let mut c = GuidanceConfig {
            prompts: vec![],
            image: None,
            tv_weight: 0.0,
            range_weight: 0.0,
            style: None,
            ..base.clone()
        };
        f(&mut c);
        c
    };
    let cases: Vec<(&str, GuidanceConfig)> = vec![
        ("text", only(&|c| c.prompts = base.prompts.clone())),
        ("image", only(&|c| c.image = base.image.clone())),
        (
            "style gram",
            only(&|c| {
                c.style = Some(StyleConfig {
                    weight: 1.0,
                    ..none.clone()
                })
            }),
        ),
        (
            "style embed",
            only(&|c| {
                c.style = Some(StyleConfig {
                    embed_weight: 1.0,
                    ..none.clone()
                })
            }),
        ),
        (
            "content",
            only(&|c| {
                c.style = Some(StyleConfig {
                    content_weight: 1.0,
                    ..none.clone()
                })
            }),
        ),
        ("tv", only(&|c| c.tv_weight = 1.0)),
        ("range", only(&|c| c.range_weight = 1.0)),
    ];
    for (name, cfg) in cases {
        for decoder in [DecoderKind::Vae, DecoderKind::Taesd] {
            let cfg = GuidanceConfig {
                decoder,
                taesd: taesd_for(decoder),
                ..cfg.clone()
            };
            let guide = Guide::load(cfg, &model, &hub, MAX_PIXELS).unwrap();
            let rel = fd_check(&model, &guide, Some(&content));
            let (_, tol) = fd_step_and_tolerance(decoder);
            eprintln!("{name} through {decoder}: worst relative error {rel:.2e}");
            assert!(rel < tol, "{name} through {decoder}: relative error {rel}");
        }
    }
}

const PROMPT: &str = "a landscape";

fn options(guide: Option<Guide>) -> GenerateOptions {
    GenerateOptions {
        prompt: PROMPT.into(),
        negative_prompt: String::new(),
        steps: 6,
        guidance_scale: 3.0,
        scheduler: SchedulerKind::Ddim,
        eta: 0.0,
        seed: 11,
        width: 32,
        height: 32,
        num_images: 1,
        init_image: None,
        strength: 1.0,
        latents: None,
        guide: guide.map(Arc::new),
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

fn text_guide(model: &SdModel, scale: f64, decoder: DecoderKind) -> Guide {
    let cfg = GuidanceConfig {
        clip: Some(fixture("clip/tiny-clip-a")),
        prompts: vec![target(TARGET, 1.0)],
        scale,
        cutouts: 2,
        decoder,
        taesd: taesd_for(decoder),
        ..Default::default()
    };
    Guide::load(cfg, model, &HubOptions::from_env(), MAX_PIXELS).unwrap()
}

const TARGET: &str = "an oil painting of a storm at sea";

/// The probe's view of an image as it is written out: 8-bit RGB through CLIP's own
/// preprocessing and the fused (inference) tower.
fn probe_embedding(enc: &ClipEncoder, image: &Tensor) -> Tensor {
    let (rgb, w, h) = artguide::output::tensor_to_rgb8(image).unwrap();
    let pix = enc
        .preprocessor
        .preprocess_rgb(&rgb, w as usize, h as usize)
        .unwrap();
    enc.embed_pixels(&[pix]).unwrap()
}

fn text_embedding(enc: &ClipEncoder, text: &str) -> Tensor {
    let ids = enc.tokenizer.encode_tensor(&[text], &Device::Cpu).unwrap();
    normalize(&enc.model.embed_text(&ids).unwrap()).unwrap()
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    scalar(&(a * b).unwrap().sum_all().unwrap())
}

#[test]
fn guidance_moves_the_image_toward_the_text_and_more_with_scale() {
    let model = model(DType::F32);
    let enc = ClipEncoder::load(
        &fixture("clip/tiny-clip-a"),
        &HubOptions::from_env(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let text = text_embedding(&enc, TARGET);
    let unguided = run(&model, &options(None));
    let base = cosine(&probe_embedding(&enc, &unguided.image), &text);

    // Scale 0 is inactive: the same bytes as the unguided run.
    let zero = run(
        &model,
        &options(Some(text_guide(&model, 0.0, DecoderKind::Vae))),
    );
    assert_eq!(
        artguide::output::tensor_to_rgb8(&zero.image).unwrap().0,
        artguide::output::tensor_to_rgb8(&unguided.image).unwrap().0
    );
    assert!(zero.guidance_losses.is_empty());

    let mut sims = vec![base];
    for scale in SCALES {
        let g = run(
            &model,
            &options(Some(text_guide(&model, scale, DecoderKind::Vae))),
        );
        assert_eq!(g.guidance_losses.len(), 6);
        sims.push(cosine(&probe_embedding(&enc, &g.image), &text));
    }
    eprintln!("cosine to target by scale (0, {SCALES:?}): {sims:?}");
    for w in sims.windows(2) {
        assert!(w[1] > w[0], "similarity must grow with the scale: {sims:?}");
    }
    assert!(
        sims[sims.len() - 1] - sims[0] > 0.05,
        "guidance must clearly move the image: {sims:?}"
    );
}

const SCALES: [f64; 3] = [100.0, 300.0, 1000.0];

#[test]
fn cheap_decoders_also_move_the_image() {
    let model = model(DType::F32);
    let enc = ClipEncoder::load(
        &fixture("clip/tiny-clip-a"),
        &HubOptions::from_env(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let text = text_embedding(&enc, TARGET);
    let unguided = run(&model, &options(None));
    let base = cosine(&probe_embedding(&enc, &unguided.image), &text);
    let g = run(
        &model,
        &options(Some(text_guide(&model, 1000.0, DecoderKind::Taesd))),
    );
    let sim = cosine(&probe_embedding(&enc, &g.image), &text);
    eprintln!("taesd: cosine {base:.4} -> {sim:.4}");
    assert!(sim > base + 0.02, "taesd: {base} -> {sim}");

    // The linear map fitted to this random tiny VAE explains little of it, so its effect on
    // the VAE's image is not guaranteed; what it must do is move the image it sees, measured
    // by the probe on the linear decoder's own rendering of the final latents.
    let guide = text_guide(&model, 1000.0, DecoderKind::Linear);
    let GuidanceDecoder::Linear(lin) = &guide.decoder else {
        panic!("linear decoder expected")
    };
    let lin = lin.clone();
    eprintln!("linear fit R^2: {:?}", lin.r_squared);
    let g = run(&model, &options(Some(guide)));
    let view = |l: &Tensor| {
        let img = lin
            .decode(l)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        cosine(&probe_embedding(&enc, &img), &text)
    };
    eprintln!(
        "linear: cosine of the VAE image {base:.4} -> {:.4}",
        cosine(&probe_embedding(&enc, &g.image), &text)
    );
    let (b, s) = (view(&unguided.latents), view(&g.latents));
    eprintln!("linear: cosine of the linear rendering {b:.4} -> {s:.4}");
    assert!(s > b + 0.02, "linear: {b} -> {s}");
}

#[test]
fn style_guidance_moves_the_image_toward_the_style_image() {
    let model = model(DType::F32);
    let enc = ClipEncoder::load(
        &fixture("clip/tiny-clip-a"),
        &HubOptions::from_env(),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let style_path = fixtures().join("clip/images/img4_71x52_rgb.png");
    let style = enc
        .embed_pixels(&[enc.preprocessor.load(&style_path, MAX_PIXELS).unwrap()])
        .unwrap();
    let base = cosine(
        &probe_embedding(&enc, &run(&model, &options(None)).image),
        &style,
    );
    let cfg = GuidanceConfig {
        clip: Some(fixture("clip/tiny-clip-a")),
        cutouts: 2,
        style: Some(StyleConfig {
            image: style_path.clone(),
            weight: 50.0,
            embed_weight: 300.0,
            ..Default::default()
        }),
        ..Default::default()
    };
    let guide = Guide::load(cfg, &model, &HubOptions::from_env(), MAX_PIXELS).unwrap();
    let g = run(&model, &options(Some(guide)));
    let sim = cosine(&probe_embedding(&enc, &g.image), &style);
    eprintln!(
        "style: cosine {base:.4} -> {sim:.4}; losses {:?}",
        g.guidance_losses
    );
    assert!(sim > base + 0.02, "{base} -> {sim}");
    let first = g.guidance_losses.first().unwrap().1;
    let last = g.guidance_losses.last().unwrap().1;
    assert!(
        last < first,
        "style loss must fall during sampling: {first} -> {last}"
    );
}

#[test]
fn nonfinite_gradients_are_refused_or_skipped_never_written() {
    let model = model(DType::F32);
    let mut cfg = GuidanceConfig {
        clip: Some(fixture("clip/tiny-clip-a")),
        prompts: vec![target(TARGET, 1.0)],
        scale: 1e300,
        cutouts: 1,
        ..Default::default()
    };
    let guide = Guide::load(cfg.clone(), &model, &HubOptions::from_env(), MAX_PIXELS).unwrap();
    let progress = Progress::new(ProgressMode::Quiet, 0, "");
    let mut written = 0;
    let err = generate(&model, &options(Some(guide)), &progress, |_| {
        written += 1;
        Ok(())
    })
    .expect_err("an infinite gradient must stop the run")
    .to_string();
    assert_eq!(written, 0);
    assert!(
        err.contains("step 1") && err.contains("NaN or infinite"),
        "{err}"
    );

    cfg.on_nonfinite = OnNonFinite::Skip;
    let guide = Guide::load(cfg, &model, &HubOptions::from_env(), MAX_PIXELS).unwrap();
    let skipped = run(&model, &options(Some(guide)));
    assert_eq!(skipped.guidance_skipped, 6);
    // Every guided step was skipped, so the image is the unguided one.
    let unguided = run(&model, &options(None));
    assert_eq!(
        artguide::output::tensor_to_rgb8(&skipped.image).unwrap().0,
        artguide::output::tensor_to_rgb8(&unguided.image).unwrap().0
    );
}

#[test]
fn guidance_runs_with_every_scheduler() {
    let model = model(DType::F32);
    for kind in SchedulerKind::ALL {
        let mut opts = options(Some(text_guide(&model, 300.0, DecoderKind::Linear)));
        opts.scheduler = kind;
        opts.steps = 3;
        let g = run(&model, &opts);
        assert_eq!(g.guidance_losses.len(), 3, "{kind}");
        let unguided = run(
            &model,
            &GenerateOptions {
                guide: None,
                ..opts.clone()
            },
        );
        let d = scalar(
            &(&g.image - &unguided.image)
                .unwrap()
                .abs()
                .unwrap()
                .max_keepdim(0)
                .unwrap()
                .max_all()
                .unwrap(),
        );
        assert!(d > 1e-4, "{kind}: guidance changed nothing ({d})");
    }
}

/// `--taesd auto` (the default) picks the TAESD trained on the model's latents: SDXL's differ
/// from SD 1/2's though both upsample 8x, so the upscale check alone cannot tell them apart.
#[test]
fn default_taesd_follows_the_model() {
    use artguide::guidance::decoders::taesd_source;
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        hub: HubOptions::from_env(),
    };
    let sdxl = SdModel::load(&fixture("tiny-sdxl"), &opts).unwrap();
    let sd = model(DType::F32);
    assert_eq!(artguide::guidance::DEFAULT_TAESD, "auto");
    assert_eq!(taesd_source("auto", &sdxl), "madebyollin/taesdxl");
    assert_eq!(taesd_source("auto", &sd), "madebyollin/taesd");
    assert_eq!(taesd_source("some/taesd", &sdxl), "some/taesd");
}
