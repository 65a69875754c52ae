//! The CUDA path against the CPU path: the same tiny models and initial latents, CPU f32 vs
//! CUDA f16 (generation with every scheduler, the CLIP-guidance gradient through every
//! guidance decoder, CLIP probe embeddings), within f16 tolerance. Needs a build with
//! `--features cuda` and a GPU; without the feature the tests are listed as ignored (a visible
//! skip), and with the feature but no GPU they fail saying so.
//!
//! The GPU machine has no Rust toolchain, so `bench/build_cuda.sh` also builds this test's
//! executable for carrying there; it finds the fixtures under `tests/fixtures` of the
//! directory it runs in when the source tree it was built from is absent.

use std::path::{Path, PathBuf};

use artguide::generate::{generate, GenerateOptions};
use artguide::guidance::{DecoderKind, GuidanceConfig, Guide, TextTarget};
use artguide::models::hub::HubOptions;
use artguide::models::stable_diffusion::{LoadOptions, SdModel};
use artguide::noise::{NoiseGen, Stream};
use artguide::probe::embed::ClipEncoder;
use artguide::progress::{Progress, ProgressMode};
use artguide::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};

fn fixture(rel: &str) -> String {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let root = if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    };
    root.join(rel).to_str().unwrap().to_string()
}

fn gpu() -> Device {
    Device::new_cuda(0).expect("built with --features cuda but no CUDA device 0")
}

fn model(device: Device, dtype: DType) -> SdModel {
    SdModel::load(
        &fixture("tiny-sd-a"),
        &LoadOptions {
            device,
            dtype,
            hub: HubOptions::from_env(),
        },
    )
    .unwrap()
}

fn options(scheduler: SchedulerKind, latents: &Tensor) -> GenerateOptions {
    GenerateOptions {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: String::new(),
        steps: 4,
        guidance_scale: 5.0,
        scheduler,
        eta: 0.0,
        seed: 0,
        width: 32,
        height: 32,
        num_images: 1,
        init_image: None,
        strength: 1.0,
        latents: Some(latents.clone()),
        guide: None,
    }
}

fn image(model: &SdModel, opts: &GenerateOptions) -> Tensor {
    let mut out = None;
    generate(
        model,
        opts,
        &Progress::new(ProgressMode::Quiet, 0, ""),
        |g| {
            out = Some(g.image);
            Ok(())
        },
    )
    .unwrap();
    out.unwrap()
}

/// The largest |value| of `t`, as f32.
fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
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

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap())
}

fn latents() -> Tensor {
    NoiseGen::new(3, Stream::InitialLatents)
        .randn(&[1, 4, 16, 16])
        .unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_f16_matches_cpu_f32_for_the_same_latents() {
    let (cpu, cuda) = (model(Device::Cpu, DType::F32), model(gpu(), DType::F16));
    let latents = latents();
    for kind in SchedulerKind::ALL {
        let a = image(&cpu, &options(kind, &latents));
        let b = image(&cuda, &options(kind, &latents));
        let d = max_abs_diff(&a, &b);
        eprintln!("{kind}: max |cpu f32 - cuda f16| = {d:.2e}");
        // f16 keeps ~3 decimal digits through 4 steps of a tiny UNet and the VAE; images are in
        // [0, 1], so 2e-2 is about 5 of 255 levels.
        assert!(d < 2e-2, "{kind}: {d}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_guidance_gradient_matches_cpu_through_every_decoder() {
    let (cpu, cuda) = (model(Device::Cpu, DType::F32), model(gpu(), DType::F16));
    let x0 = NoiseGen::new(5, Stream::InitialLatents)
        .randn(&[1, 4, 16, 16])
        .unwrap();
    for decoder in [DecoderKind::Vae, DecoderKind::Taesd, DecoderKind::Linear] {
        let grad = |m: &SdModel| {
            let cfg = GuidanceConfig {
                clip: Some(fixture("clip/tiny-clip-a")),
                prompts: vec![TextTarget {
                    text: "an oil painting of a storm at sea".into(),
                    weight: 1.0,
                }],
                cutouts: 2,
                decoder,
                // Another decoder refuses a TAESD source.
                taesd: match decoder {
                    DecoderKind::Taesd => fixture("tiny-taesd"),
                    _ => GuidanceConfig::default().taesd,
                },
                ..Default::default()
            };
            let guide = Guide::load(cfg, m, &HubOptions::from_env(), 1 << 24).unwrap();
            // The cutouts come from the same seeded stream on both devices.
            let mut rng = NoiseGen::new(0, Stream::Guidance);
            let x = x0.to_device(&m.device).unwrap();
            let g = guide.gradient(m, &x, &mut rng, None, 0).unwrap();
            (g.grad.unwrap().to_device(&Device::Cpu).unwrap(), g.total)
        };
        let ((a, la), (b, lb)) = (grad(&cpu), grad(&cuda));
        let norm = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .sqrt()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let rel = norm(&(&a - &b.to_dtype(DType::F32).unwrap()).unwrap()) / norm(&a);
        eprintln!(
            "guidance through {decoder}: loss cpu {la:.6} cuda {lb:.6}, gradient relative L2 error {rel:.2e}"
        );
        assert!(norm(&a) > 0.0, "{decoder}: zero gradient on the CPU");
        assert!(
            (la - lb).abs() < 1e-2 * la.abs().max(1e-3),
            "{decoder}: loss {la} vs {lb}"
        );
        // f16 through the decoder's and CLIP's backward keeps about 2-3 digits.
        assert!(rel < 5e-2, "{decoder}: gradient relative error {rel}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_f16_probe_embeddings_match_cpu_f32() {
    let hub = HubOptions::from_env();
    let spec = fixture("clip/tiny-clip-a");
    let cpu = ClipEncoder::load(&spec, &hub, DType::F32, &Device::Cpu).unwrap();
    let cuda = ClipEncoder::load(&spec, &hub, DType::F16, &gpu()).unwrap();
    let dir = PathBuf::from(fixture("clip/images"));
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    names.sort();
    assert!(names.len() >= 2, "no fixture images in {}", dir.display());
    for p in names {
        let img = image::open(&p).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        let embed = |enc: &ClipEncoder| {
            let pix = enc
                .preprocessor
                .preprocess_rgb(img.as_raw(), w as usize, h as usize)
                .unwrap();
            enc.embed_pixels(&[pix]).unwrap()
        };
        let d = max_abs_diff(&embed(&cpu), &embed(&cuda));
        eprintln!(
            "{}: max |cpu f32 - cuda f16| of the unit embedding = {d:.2e}",
            p.display()
        );
        assert!(d < 1e-2, "{}: {d}", p.display());
    }
}

/// Reproducibility on the GPU: the same seed gives bit-identical images, with scheduler noise
/// (euler-a, DDIM with eta) and with CLIP guidance through the VAE (a backward pass every
/// step). Catches non-deterministic kernels (atomics, algorithm choices that vary by call).
#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_same_seed_gives_the_same_bits() {
    let cuda = model(gpu(), DType::F16);
    let guide = Guide::load(
        GuidanceConfig {
            clip: Some(fixture("clip/tiny-clip-a")),
            prompts: vec![TextTarget {
                text: "an oil painting of a storm at sea".into(),
                weight: 1.0,
            }],
            cutouts: 2,
            decoder: DecoderKind::Vae,
            ..Default::default()
        },
        &cuda,
        &HubOptions::from_env(),
        1 << 24,
    )
    .unwrap();
    let guide = std::sync::Arc::new(guide);
    for (label, kind, eta, guided) in [
        ("euler-a", SchedulerKind::EulerAncestral, 0.0, false),
        ("ddim eta 0.5", SchedulerKind::Ddim, 0.5, false),
        (
            "dpmpp-2m, guided through the VAE",
            SchedulerKind::DpmPlusPlus2M,
            0.0,
            true,
        ),
    ] {
        let opts = GenerateOptions {
            latents: None,
            seed: 11,
            eta,
            guide: guided.then(|| guide.clone()),
            ..options(kind, &latents())
        };
        let (a, b) = (image(&cuda, &opts), image(&cuda, &opts));
        let d = max_abs_diff(&a, &b);
        eprintln!("{label}: max |run 1 - run 2| = {d:e}");
        assert_eq!(d, 0.0, "{label}: two runs with seed 11 differ");
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_kernels_match_candle() {
    #[cfg(feature = "cuda")]
    own_kernels::match_candle(&gpu());
}

/// artguide's own CUDA ops (`kernels::cuda`, used with `ARTGUIDE_CUDA_KERNELS`) against
/// candle's compositions (the convolution, attention and Linear ones on the CPU in f32; for
/// the group-norm backward, candle's autograd) in f32, f16 and bf16, on shapes that cover
/// their edge cases: strides and paddings, 1x1 layers, batches split into groups, offset
/// views, rows of several blocks, groups larger than one statistics chunk, an offset mean,
/// attention batched over heads and over images, cuBLASLt's fallbacks.
#[cfg(feature = "cuda")]
mod own_kernels {
    use artguide::kernels::cuda;
    use candle_core::{DType, Device, Tensor};

    use super::{max_abs, max_abs_diff};

    fn randn(shape: &[usize], seed: u64, dev: &Device, dtype: DType) -> Tensor {
        artguide::noise::NoiseGen::new(seed, artguide::noise::Stream::InitialLatents)
            .randn(shape)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(dev)
            .unwrap()
    }

    /// `t` on the CPU in f32, for the references.
    fn cpu(t: &Tensor) -> Tensor {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    }

    /// Largest difference over the largest |value| of the reference.
    fn rel(got: &Tensor, want: &Tensor) -> f32 {
        max_abs_diff(got, want) / max_abs(want).max(1e-6)
    }

    /// The cases that failed: every kernel is checked before the test fails, so one GPU
    /// run names all the kernel groups to leave out of `ARTGUIDE_CUDA_KERNELS`.
    #[derive(Default)]
    struct Failed(Vec<String>);

    impl Failed {
        fn check(&mut self, ok: bool, what: String) {
            if !ok {
                eprintln!("FAILED: {what}");
                self.0.push(what);
            }
        }
    }

    pub fn match_candle(dev: &Device) {
        let mut failed = Failed::default();
        for (dtype, tol) in [
            (DType::F32, 1e-5f32),
            (DType::F16, 5e-3),
            (DType::BF16, 4e-2),
        ] {
            // (batch, cin, h, w, cout, k, stride, padding, im2col bytes at once): the
            // reference is candle's convolution on the CPU in f32 (a cuDNN build's GPU
            // convolution may use TF32); the input is a narrow of a larger tensor (an offset
            // view), and the last cases split their batch into groups of images.
            for (i, &(n, cin, h, w, cout, k, stride, pad, limit)) in [
                (1, 8, 17, 13, 16, 3, 1, 1, usize::MAX),
                (2, 8, 16, 16, 4, 3, 2, 0, usize::MAX),
                (3, 4, 9, 11, 8, 3, 2, 1, usize::MAX),
                (2, 16, 8, 8, 8, 1, 1, 0, usize::MAX),
                (1, 4, 12, 12, 4, 1, 2, 0, usize::MAX),
                (1, 4, 40, 41, 8, 3, 1, 1, usize::MAX),
                (5, 4, 10, 10, 8, 3, 1, 1, 2 * 36 * 100 * 4),
                (3, 4, 10, 10, 8, 1, 1, 0, 1),
            ]
            .iter()
            .enumerate()
            {
                let whole = randn(&[n + 1, cin, h, w], 10 + i as u64, dev, dtype);
                let x = whole.narrow(0, 1, n).unwrap();
                let wt = (randn(&[cout, cin, k, k], 20 + i as u64, dev, dtype) * 0.2).unwrap();
                let b = randn(&[cout], 30 + i as u64, dev, dtype);
                let want = cpu(&x)
                    .conv2d(&cpu(&wt), pad, stride, 1, 1)
                    .unwrap()
                    .broadcast_add(&cpu(&b).reshape((1, cout, 1, 1)).unwrap())
                    .unwrap();
                let got =
                    cuda::conv2d_unfolding_at_most(&x, &wt, Some(&b), stride, pad, limit).unwrap();
                assert_eq!(got.dims(), want.dims(), "conv case {i}");
                let e = rel(&got.to_device(&Device::Cpu).unwrap(), &want);
                eprintln!("conv {dtype:?} case {i}: rel err {e:.2e}");
                failed.check(e < tol, format!("conv {dtype:?} case {i}: {e}"));
            }
            // (batch, channels, groups, h, w, mean offset): the second group spans three
            // statistics chunks of 16,384 values.
            for (i, &(n, c, g, h, w, offset)) in [
                (2, 8, 4, 9, 7, 0.0),
                (1, 8, 2, 110, 100, 0.0),
                (1, 4, 4, 16, 16, 30.0),
            ]
            .iter()
            .enumerate()
            {
                let x = (randn(&[n, c, h, w], 40 + i as u64, dev, dtype) + offset).unwrap();
                let gamma = randn(&[c], 50 + i as u64, dev, dtype);
                let beta = randn(&[c], 60 + i as u64, dev, dtype);
                let reference =
                    candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, g, 1e-5).unwrap();
                for silu in [false, true] {
                    let mut want = candle_core::Module::forward(&reference, &x).unwrap();
                    if silu {
                        want = candle_nn::ops::silu(&want).unwrap();
                    }
                    let got = cuda::group_norm(&x, &gamma, &beta, g, 1e-5, silu).unwrap();
                    let e = rel(&got, &want);
                    eprintln!("group norm {dtype:?} case {i} silu {silu}: rel err {e:.2e}");
                    failed.check(
                        e < tol.max(2e-5),
                        format!("group norm {dtype:?} case {i}: {e}"),
                    );
                    // The backward against candle's autograd through its composition, in f32
                    // (candle's f16 backward rounds every intermediate).
                    let r = randn(&[n, c, h, w], 80 + i as u64, dev, DType::F32);
                    let x32 =
                        candle_core::Var::from_tensor(&x.to_dtype(DType::F32).unwrap()).unwrap();
                    let reference32 = candle_nn::GroupNorm::new(
                        gamma.to_dtype(DType::F32).unwrap(),
                        beta.to_dtype(DType::F32).unwrap(),
                        c,
                        g,
                        1e-5,
                    )
                    .unwrap();
                    let mut y =
                        candle_core::Module::forward(&reference32, x32.as_tensor()).unwrap();
                    if silu {
                        y = candle_nn::ops::silu(&y).unwrap();
                    }
                    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                    let want = grads.get(x32.as_tensor()).unwrap();
                    let got = cuda::group_norm_backward(
                        &x,
                        &r.to_dtype(dtype).unwrap(),
                        &gamma,
                        &beta,
                        g,
                        1e-5,
                        silu,
                    )
                    .unwrap();
                    let e = rel(&got, want);
                    eprintln!(
                        "group norm backward {dtype:?} case {i} silu {silu}: rel err {e:.2e}"
                    );
                    failed.check(
                        e < tol.max(1e-4) * 2.0,
                        format!("group norm backward {dtype:?} case {i}: {e}"),
                    );
                }
            }
            let y = randn(&[2, 6, 5, 7], 70, dev, dtype);
            let b = randn(&[6], 71, dev, dtype);
            let want = y.broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap()).unwrap();
            let e = max_abs_diff(&cuda::bias_add(&y, &b, true).unwrap(), &want);
            failed.check(e == 0.0, format!("bias add NCHW {dtype:?}: {e}"));
            let rows = randn(&[10, 6], 72, dev, dtype);
            let want = rows.broadcast_add(&b.reshape((1, 6)).unwrap()).unwrap();
            let e = max_abs_diff(&cuda::bias_add(&rows, &b, false).unwrap(), &want);
            failed.check(e == 0.0, format!("bias add rows {dtype:?}: {e}"));
            // Linear layers through cuBLASLt with the bias in the epilogue (f16 and bf16; None
            // in f32, where candle's matmul keeps its precision), against the CPU in f32;
            // an odd width, CLIP's, and the input an offset view (composed: not aligned).
            for (i, &(rows, k, n, offset)) in [
                (7, 33, 65, 0),
                (2 * 257, 1024, 4096, 0),
                (77, 768, 768, 0),
                (5, 64, 32, 3),
            ]
            .iter()
            .enumerate()
            {
                let seed = 120 + 3 * i as u64;
                let x = randn(&[rows * k + offset], seed, dev, dtype)
                    .narrow(0, offset, rows * k)
                    .unwrap()
                    .reshape((rows, k))
                    .unwrap();
                let w = (randn(&[n, k], seed + 1, dev, dtype) * (k as f64).powf(-0.5)).unwrap();
                let b = randn(&[n], seed + 2, dev, dtype);
                let got = cuda::linear(&x, &w, &b).unwrap();
                // cuBLASLt may refuse odd widths (the call then composes): only the others
                // must be fused, and the misaligned view and f32 never are.
                let fused = dtype != DType::F32 && offset == 0;
                let odd = k % 8 != 0 || n % 8 != 0;
                failed.check(
                    got.is_some() == fused || (odd && got.is_none()),
                    format!("linear {dtype:?} case {i}: fused {}", got.is_some()),
                );
                if let Some(got) = got {
                    let want = cpu(&x)
                        .matmul(&cpu(&w).t().unwrap())
                        .unwrap()
                        .broadcast_add(&cpu(&b))
                        .unwrap();
                    let e = rel(&cpu(&got), &want);
                    eprintln!("linear {dtype:?} case {i}: rel err {e:.2e}");
                    failed.check(e < tol, format!("linear {dtype:?} case {i}: {e}"));
                }
            }
            let p = randn(&[2, 7, 2 * 640], 74, dev, dtype);
            let want = artguide::kernels::activation::composed(&p, 640).unwrap();
            let e = rel(&cuda::geglu(&p, 640).unwrap(), &want);
            failed.check(e < tol, format!("geglu {dtype:?}: {e}"));
            let want = p
                .mul(&candle_nn::ops::sigmoid(&(&p * 1.702).unwrap()).unwrap())
                .unwrap();
            let e = rel(&cuda::quick_gelu(&p).unwrap(), &want);
            failed.check(e < tol, format!("quick_gelu {dtype:?}: {e}"));
            let e = rel(&cuda::gelu_erf(&p).unwrap(), &p.gelu_erf().unwrap());
            failed.check(e < tol, format!("gelu_erf {dtype:?}: {e}"));
            // Attention through the head-strided GEMMs against the composition on the CPU in
            // f32: (b, n, m, heads, d) batched over heads (UNet self- and cross-attention),
            // over images (a CLIP batch, and cross-attention), and one wide head (the VAE);
            // q, k and v are offset views.
            for (i, &(b, n, m, heads, d)) in [
                (2, 64, 64, 8, 40),
                (2, 64, 77, 8, 40),
                (6, 50, 50, 4, 64),
                (12, 50, 77, 4, 64),
                (1, 256, 256, 1, 512),
            ]
            .iter()
            .enumerate()
            {
                let seed = 90 + 3 * i as u64;
                let offset_view = |tokens: usize, seed: u64| {
                    randn(&[b + 1, tokens, heads * d], seed, dev, dtype)
                        .narrow(0, 1, b)
                        .unwrap()
                };
                let q = offset_view(n, seed);
                let k = offset_view(m, seed + 1);
                let v = offset_view(m, seed + 2);
                let scale = (d as f64).powf(-0.5);
                let want = artguide::kernels::attention::composed(
                    &cpu(&q),
                    &cpu(&k),
                    &cpu(&v),
                    heads,
                    scale,
                )
                .unwrap();
                let got = cuda::attention(&q, &k, &v, heads, scale).unwrap();
                assert_eq!(got.dims(), want.dims(), "attention case {i}");
                let e = rel(&cpu(&got), &want);
                eprintln!("attention {dtype:?} case {i}: rel err {e:.2e}");
                failed.check(
                    e < tol.max(1e-4),
                    format!("attention {dtype:?} case {i}: {e}"),
                );
            }
            let x = randn(&[2, 3, 5, 4], 73, dev, dtype);
            for s in [2, 3] {
                let want = x
                    .reshape((2, 3, 5, 1, 4, 1))
                    .unwrap()
                    .broadcast_as((2, 3, 5, s, 4, s))
                    .unwrap()
                    .reshape((2, 3, 5 * s, 4 * s))
                    .unwrap();
                let got = cuda::upsample_nearest(&x, s).unwrap();
                assert_eq!(got.dims(), want.dims());
                failed.check(
                    max_abs_diff(&got, &want) == 0.0,
                    format!("upsample {dtype:?} x{s}"),
                );
                // Its backward: each value the sum of its s x s patch of the gradient.
                let g = randn(&[2, 3, 5 * s, 4 * s], 75, dev, dtype);
                let want = cpu(&g)
                    .reshape((2, 3, 5, s, 4, s))
                    .unwrap()
                    .sum(5)
                    .unwrap()
                    .sum(3)
                    .unwrap();
                let e = rel(&cpu(&cuda::patch_sum(&g, s).unwrap()), &want);
                failed.check(e < tol, format!("patch sum {dtype:?} x{s}: {e}"));
            }
        }
        assert!(failed.0.is_empty(), "failed: {:#?}", failed.0);
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_device_tuning_takes_effect() {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let device = gpu();
        artguide::memory::tune_cuda_device(&device).unwrap();
        let Device::Cuda(dev) = &device else {
            unreachable!()
        };
        assert!(!dev.is_event_tracking());
        let stream = dev.cuda_stream();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold = 0u64;
        // SAFETY: driver queries on the device just opened.
        unsafe {
            assert_eq!(
                sys::cuDeviceGetDefaultMemPool(&mut pool, stream.context().cu_device()),
                sys::CUresult::CUDA_SUCCESS
            );
            assert_eq!(
                sys::cuMemPoolGetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold as *mut u64).cast(),
                ),
                sys::CUresult::CUDA_SUCCESS
            );
        }
        assert_eq!(threshold, u64::MAX);
        // The device still computes after the change.
        let x = Tensor::arange(0f32, 6., &device).unwrap();
        assert_eq!(
            (&x + &x)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            30.0
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_graph_unet_matches_eager() {
    #[cfg(feature = "cuda")]
    {
        let m = model(gpu(), DType::F16);
        let graphs = artguide::models::unet_graph::UnetGraphs::new();
        let one = m.encode_prompt("a lighthouse at dusk").unwrap().context;
        // Captures at the first call of each shape (batch 2, then 1, then 2 again) and
        // replays at the others, each with its own latents, timestep and context. A replay
        // runs the same kernels on the same values as the eager call: the same bits.
        for (i, (batch, t)) in [
            (2, 999.0),
            (2, 500.0),
            (2, 20.0),
            (1, 300.0),
            (1, 299.0),
            (2, 10.0),
            (2, 1.0),
        ]
        .into_iter()
        .enumerate()
        {
            let x = NoiseGen::new(40 + i as u64, Stream::InitialLatents)
                .randn(&[batch, 4, 16, 16])
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap()
                .to_device(&m.device)
                .unwrap();
            let context =
                (Tensor::cat(&vec![&one; batch], 0).unwrap() * (1.0 + 0.1 * i as f64)).unwrap();
            let want = m.unet.forward(&x, t, &context).unwrap();
            let got = graphs.forward(&m.unet, &x, t, &context).unwrap();
            let d = max_abs_diff(&got, &want);
            eprintln!("call {i} (batch {batch}, t {t}): max |graph - eager| = {d:.2e}");
            assert_eq!(d, 0.0, "call {i}");
        }
    }
}
