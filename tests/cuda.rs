//! The CUDA path against the CPU path: the same tiny model and initial latents, CPU f32 vs
//! CUDA f16, images within f16 tolerance. Needs a binary built with `--features cuda` and a
//! GPU; without the feature the test is listed as ignored (a visible skip), and with the
//! feature but no GPU it fails saying so.

use std::path::Path;

use artguide::generate::{generate, GenerateOptions};
use artguide::models::hub::HubOptions;
use artguide::models::stable_diffusion::{LoadOptions, SdModel};
use artguide::noise::{NoiseGen, Stream};
use artguide::progress::{Progress, ProgressMode};
use artguide::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};

fn image(device: Device, dtype: DType, scheduler: SchedulerKind, latents: &Tensor) -> Tensor {
    let model = SdModel::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sd-a")
            .to_str()
            .unwrap(),
        &LoadOptions {
            device,
            dtype,
            hub: HubOptions::from_env(),
        },
    )
    .unwrap();
    let opts = GenerateOptions {
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
    };
    let mut out = None;
    generate(
        &model,
        &opts,
        &Progress::new(ProgressMode::Quiet, 0, ""),
        |g| {
            out = Some(g.image);
            Ok(())
        },
    )
    .unwrap();
    out.unwrap()
}

#[test]
#[cfg_attr(
    not(feature = "cuda"),
    ignore = "needs a build with --features cuda and a GPU (see README, CUDA)"
)]
fn cuda_f16_matches_cpu_f32_for_the_same_latents() {
    let gpu = Device::new_cuda(0).expect("built with --features cuda but no CUDA device 0");
    let latents = NoiseGen::new(3, Stream::InitialLatents)
        .randn(&[1, 4, 16, 16])
        .unwrap();
    for kind in SchedulerKind::ALL {
        let cpu = image(Device::Cpu, DType::F32, kind, &latents);
        let cuda = image(gpu.clone(), DType::F16, kind, &latents);
        let d = (cpu - cuda)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!("{kind}: max |cpu f32 - cuda f16| = {d:.2e}");
        // f16 keeps ~3 decimal digits through 4 steps of a tiny UNet and the VAE; images are in
        // [0, 1], so 2e-2 is about 5 of 255 levels.
        assert!(d < 2e-2, "{kind}: {d}");
    }
}
