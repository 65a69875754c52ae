//! The `artguide` binary end to end on the committed tiny model: reproducibility, outputs,
//! and one clear error per kind of bad input with nothing written.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_artguide"));
    c.env("HF_HUB_OFFLINE", "1");
    // Caches (model hashes, embeddings) under target/, not the user's home.
    c.env(
        "XDG_CACHE_HOME",
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"),
    );
    c
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd-a")
}

fn generate(model: &Path, out: &Path, extra: &[&str]) -> Output {
    bin()
        .args(["--quiet", "generate", "--model"])
        .arg(model)
        .args([
            "--prompt",
            "a lighthouse at dusk",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--seed",
            "5",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Copies the tiny model so a test can damage its copy.
fn copy_model(dst: &Path) {
    fn copy(src: &Path, dst: &Path) {
        std::fs::create_dir_all(dst).unwrap();
        for e in std::fs::read_dir(src).unwrap() {
            let e = e.unwrap();
            let to = dst.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy(&e.path(), &to);
            } else {
                std::fs::copy(e.path(), to).unwrap();
            }
        }
    }
    copy(&tiny(), dst);
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    v.sort();
    v
}

#[test]
fn same_seed_same_bytes_and_no_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = generate(&tiny(), &a, &["--save-tensors"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = generate(&tiny(), &b, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pa = std::fs::read(a.join("00000-5.png")).unwrap();
    let pb = std::fs::read(b.join("00000-5.png")).unwrap();
    assert_eq!(pa, pb, "same seed must give the same PNG bytes");
    assert_eq!(
        files_in(&a),
        ["00000-5.json", "00000-5.png", "00000-5.safetensors"]
    );

    // A second run into the same folder never clobbers the first.
    let o = generate(&tiny(), &b, &["--seed", "6"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(b.join("00000-5.png")).unwrap(), pb);
    assert!(b.join("00001-6.png").exists());
    assert_ne!(std::fs::read(b.join("00001-6.png")).unwrap(), pb);

    // The saved tensors hold the image that the PNG shows.
    let t =
        candle_core::safetensors::load(a.join("00000-5.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(t["image"].dims(), &[32, 32, 3]);
    assert_eq!(t["latents"].dims(), &[1, 4, 16, 16]);
    let img = image::open(a.join("00000-5.png")).unwrap().to_rgb8();
    let px = img.get_pixel(3, 7);
    let v: Vec<f32> = t["image"]
        .get(7)
        .unwrap()
        .get(3)
        .unwrap()
        .to_vec1()
        .unwrap();
    for c in 0..3 {
        assert_eq!(px[c], (v[c] * 255.0).round() as u8);
    }
}

#[test]
fn inspect_prints_the_parameters_back() {
    let tmp = tempfile::tempdir().unwrap();
    let o = generate(
        &tiny(),
        tmp.path(),
        &["--negative-prompt", "blurry, dark", "--scheduler", "euler"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = bin()
        .arg("inspect")
        .arg(tmp.path().join("00000-5.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.starts_with("a lighthouse at dusk\nNegative prompt: blurry, dark\n"),
        "{text}"
    );
    assert!(text.contains("Steps: 2, Sampler: Euler"), "{text}");
    assert!(text.contains("Seed: 5"), "{text}");
    assert!(text.contains("Size: 32x32"), "{text}");
    // --json: one JSON line with the settings taken apart.
    let o = bin()
        .args(["--json", "inspect"])
        .arg(tmp.path().join("00000-5.png"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.trim().lines().count(), 1, "{out}");
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["prompt"], "a lighthouse at dusk");
    assert_eq!(j["negative_prompt"], "blurry, dark");
    assert_eq!(j["settings"]["Seed"], "5");
    assert_eq!(j["settings"]["Sampler"], "Euler");
    assert!(j["sidecar"].as_str().unwrap().ends_with("00000-5.json"));
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("00000-5.json")).unwrap())
            .unwrap();
    assert_eq!(side["params"]["seed"], 5);
    assert!(side
        .to_string()
        .contains("unet/diffusion_pytorch_model.safetensors"));
}

/// Checks how a command ended and that stderr says each of `needles`.
fn assert_says(o: &Output, success: bool, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.success(), success, "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
}

/// Runs a failing command and checks the one-line error and that nothing was written.
fn assert_user_error(o: Output, out: &Path, needles: &[&str]) {
    let err = stderr(&o);
    assert!(!o.status.success(), "expected failure, got success");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing from: {err}");
    }
    assert!(
        files_in(out).is_empty(),
        "something was written: {:?}",
        files_in(out)
    );
}

#[test]
fn bad_input_is_one_clear_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");

    assert_user_error(
        generate(&tmp.path().join("nope"), &out, &[]),
        &out,
        &["nope", "no such model folder"],
    );
    assert_user_error(
        generate(&tiny(), &out, &["--scheduler", "plms"]),
        &out,
        &["plms", "expected auto, ddim, euler, euler-a or dpmpp-2m"],
    );
    assert_user_error(
        generate(&tiny(), &out, &["--width", "33"]),
        &out,
        &["width", "33", "scale factor 2"],
    );

    let m = tmp.path().join("model");
    copy_model(&m);
    std::fs::remove_file(m.join("unet/config.json")).unwrap();
    assert_user_error(
        generate(&m, &out, &[]),
        &out,
        &["unet/config.json", "missing"],
    );

    copy_model(&m);
    let w = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    assert_user_error(
        generate(&m, &out, &[]),
        &out,
        &["diffusion_pytorch_model.safetensors"],
    );

    std::fs::write(&w, b"this is not a safetensors file at all").unwrap();
    assert_user_error(
        generate(&m, &out, &[]),
        &out,
        &[
            "diffusion_pytorch_model.safetensors",
            "not a valid safetensors",
        ],
    );

    // A config that disagrees with the weights: the error names the file and the tensor.
    copy_model(&m);
    let cfg = m.join("unet/config.json");
    let text = std::fs::read_to_string(&cfg).unwrap();
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["cross_attention_dim"] = 64.into();
    std::fs::write(&cfg, j.to_string()).unwrap();
    let o = generate(&m, &out, &[]);
    assert_user_error(o, &out, &["config.json"]);

    copy_model(&m);
    let cfg = m.join("unet/config.json");
    let mut j: serde_json::Value = serde_json::from_str(&text).unwrap();
    j["block_out_channels"] = serde_json::json!([64, 64]);
    std::fs::write(&cfg, j.to_string()).unwrap();
    assert_user_error(
        generate(&m, &out, &[]),
        &out,
        &["unet/diffusion_pytorch_model.safetensors", "shape"],
    );
    // Fewer layers in the config than in the weights, or a part fewer: the model would run
    // without some of them. The error names the weights, the config and a tensor left unused.
    let fewer: [(&str, &str, serde_json::Value, &str, &str); 4] = [
        (
            "unet",
            "transformer_layers_per_block",
            0.into(),
            "diffusion_pytorch_model",
            "transformer_blocks.0.",
        ),
        (
            "vae",
            "layers_per_block",
            0.into(),
            "diffusion_pytorch_model",
            "decoder.up_blocks.0.resnets.1.",
        ),
        (
            "text_encoder",
            "num_hidden_layers",
            1.into(),
            "model",
            "text_model.encoder.layers.1.",
        ),
        // A whole part the weights have and the config leaves out.
        (
            "vae",
            "use_post_quant_conv",
            false.into(),
            "diffusion_pytorch_model",
            "`post_quant_conv.",
        ),
    ];
    for (part, field, value, stem, unused) in fewer {
        copy_model(&m);
        let cfg = m.join(format!("{part}/config.json"));
        let mut j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        j[field] = value;
        std::fs::write(&cfg, j.to_string()).unwrap();
        let weights = format!("{part}/{stem}.safetensors");
        let config = format!("{part}/config.json");
        assert_user_error(
            generate(&m, &out, &[]),
            &out,
            &[&weights, "not used by the model", &config, unused],
        );
    }

    let lat = tmp.path().join("lat.safetensors");
    std::fs::write(&lat, b"garbage").unwrap();
    assert_user_error(
        generate(&tiny(), &out, &["--latents", lat.to_str().unwrap()]),
        &out,
        &["lat.safetensors"],
    );
    // A folder given as the latents file is said to be one.
    assert_user_error(
        generate(&tiny(), &out, &["--latents", tmp.path().to_str().unwrap()]),
        &out,
        &["is a folder; expected a safetensors file"],
    );
    // An empty latents file is named, not reported as a --num-images 0 nobody gave.
    let empty = candle_core::Tensor::zeros(
        (0, 4, 16, 16),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", empty)]), &lat)
        .unwrap();
    let o = generate(&tiny(), &out, &["--latents", lat.to_str().unwrap()]);
    assert!(!stderr(&o).contains("num-images"), "{}", stderr(&o));
    assert_user_error(o, &out, &["lat.safetensors", "latents", "N >= 1"]);
    // A folder where a model file should be is said to be one, not a missing file.
    copy_model(&m);
    let w = m.join("vae/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&w).unwrap();
    std::fs::create_dir(&w).unwrap();
    assert_user_error(
        generate(&m, &out, &[]),
        &out,
        &[
            "vae/diffusion_pytorch_model.safetensors",
            "is a folder; expected a file",
        ],
    );
    std::fs::remove_dir(&w).unwrap();

    // Values that panicked, or ran every step into NaN (or a black image) with no hint of
    // the cause: each is named in its file before any work.
    let broken: [(&str, &str, serde_json::Value); 8] = [
        ("unet/config.json", "norm_num_groups", 0.into()),
        // null is diffusers' UNet without a mid block, which artguide's always has.
        (
            "unet/config.json",
            "mid_block_type",
            serde_json::Value::Null,
        ),
        ("unet/config.json", "sample_size", 0.into()),
        ("vae/config.json", "norm_num_groups", 0.into()),
        ("vae/config.json", "scaling_factor", 0.into()),
        ("scheduler/scheduler_config.json", "beta_end", 2.0.into()),
        ("scheduler/scheduler_config.json", "beta_start", (-1).into()),
        (
            "scheduler/scheduler_config.json",
            "sigma_min",
            (-1.0).into(),
        ),
    ];
    for (file, field, value) in broken {
        copy_model(&m);
        let cfg = m.join(file);
        let mut j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        j[field] = value;
        std::fs::write(&cfg, j.to_string()).unwrap();
        assert_user_error(generate(&m, &out, &[]), &out, &[file, field]);
    }
    let nan = tmp.path().join("nan.safetensors");
    let mut v = vec![0f32; 4 * 16 * 16];
    v[7] = f32::NAN;
    let t = candle_core::Tensor::from_vec(v, (1, 4, 16, 16), &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("latents", t)]), &nan)
        .unwrap();
    assert_user_error(
        generate(&tiny(), &out, &["--latents", nan.to_str().unwrap()]),
        &out,
        &["nan.safetensors", "latents", "NaN"],
    );
}

/// Mistakes that would otherwise surface only after minutes of work (or as an internal
/// message) are one line naming the flag, before any model runs.
#[test]
fn cheap_mistakes_are_named_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    // --out is a file: named as such, and the file is untouched.
    let afile = tmp.path().join("afile");
    std::fs::write(&afile, b"keep me").unwrap();
    let o = generate(&tiny(), &afile, &[]);
    assert_says(&o, false, &["--out", "afile: exists and is not a folder"]);
    assert_eq!(std::fs::read(&afile).unwrap(), b"keep me");

    let out = tmp.path().join("out");
    assert_user_error(
        generate(&tiny(), &out, &["--dtype", "bf16"]),
        &out,
        &["--dtype bf16", "not supported on the CPU"],
    );
    assert_user_error(
        generate(
            &tiny(),
            &out,
            &["--seed", "18446744073709551615", "--num-images", "2"],
        ),
        &out,
        &["--seed 18446744073709551615", "seed + num-images - 1"],
    );
    // With --json, the failure is also the last JSON line on stdout.
    let o = bin()
        .args(["--json", "generate", "--prompt", "x", "--model"])
        .arg(tmp.path().join("nope"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let last: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["interrupted"], false);
    assert!(last["message"].as_str().unwrap().contains("nope"), "{last}");
    // So is a bad argument, which clap refuses before any command runs.
    let o = bin()
        .args([
            "--json", "generate", "--model", "m", "--prompt", "x", "--steps", "-1",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let event: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(event["event"], "error");
    assert!(
        event["message"].as_str().unwrap().contains("--steps"),
        "{event}"
    );
    // An I/O cause is said once, not repeated by the error chain.
    let o = generate(&tiny(), &out, &["--init-image", "nope.png"]);
    let err = stderr(&o);
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert_user_error(o, &out, &["nope.png"]);

    assert_user_error(
        generate(&tiny(), &out, &["--clip", "some/clip"]),
        &out,
        &["--clip: nothing to guide toward"],
    );

    // An option the chosen scheduler ignores is said, not silently dropped.
    let o = generate(&tiny(), &out, &["--scheduler", "euler", "--eta", "0.5"]);
    assert_says(&o, true, &["--eta 0.5 is ignored: it applies to DDIM only"]);
    // A batch of 0 is refused, not read as 1.
    let o = bin()
        .args([
            "embed", "--clip", "c", "--out", "e.npy", "--batch", "0", "i.png",
        ])
        .output()
        .unwrap();
    assert_says(&o, false, &["--batch 0: expected at least 1"]);
    // Guidance whose every weight is 0 is an ablation, said so rather than silently unguided.
    let o = bin()
        .args(["--quiet", "generate", "--model"])
        .arg(tiny())
        .args([
            "--prompt", "x", "--steps", "1", "--width", "32", "--height", "32",
        ])
        .arg("--clip")
        .arg(clip_fixture("tiny-clip-a"))
        .args(["--clip-prompt", "a harbour:0", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert_says(&o, true, &["guidance is off"]);
    let o = generate(&tiny(), &out, &["--tv-weight", "0", "--cutouts", "4"]);
    assert_says(&o, true, &["guidance is off"]);
    // So is a guided range that falls between the steps run (2 steps sit at 0 and 0.5).
    let o = generate(&tiny(), &out, &["--tv-weight", "1", "--guide-start", "0.6"]);
    assert_says(
        &o,
        true,
        &["guidance is off: the guided range [0.6, 1) holds none of the 2 denoising steps"],
    );
    let o = generate(&tiny(), &out, &["--tv-weight", "1", "--guide-start", "0.5"]);
    assert_says(&o, true, &[]);
    assert!(!stderr(&o).contains("guidance is off"), "{}", stderr(&o));
    // A negative prompt without classifier-free guidance has nothing to act through.
    let o = generate(
        &tiny(),
        &out,
        &["--negative-prompt", "blurry", "--guidance-scale", "1"],
    );
    assert_says(
        &o,
        true,
        &["--negative-prompt is ignored", "--guidance-scale 1 (<= 1)"],
    );
    // A TAESD source for another decoder would be silently unused: refused.
    let unwritten = tmp.path().join("unwritten");
    assert_user_error(
        generate(
            &tiny(),
            &unwritten,
            &["--tv-weight", "1", "--taesd", "my/taesd"],
        ),
        &unwritten,
        &["taesd", "`my/taesd`", "the guidance decoder is vae"],
    );
    // A prompt longer than the text encoder reads is said to be cut.
    let long = "a lighthouse at dusk, ".repeat(40);
    let o = generate(&tiny(), &out, &["--prompt", &long]);
    assert_says(&o, true, &["--prompt is ", "the rest is ignored"]);
    // An error found after the model loads leaves no output folder behind.
    let fresh = tmp.path().join("fresh");
    let o = generate(&tiny(), &fresh, &["--width", "33"]);
    assert!(!o.status.success());
    assert!(
        !fresh.exists(),
        "the output folder was made for a failed request"
    );
    // An init image whose own size does not fit is named, with that size.
    let odd = tmp.path().join("odd.png");
    image::RgbImage::new(40, 33).save(&odd).unwrap();
    let o = bin()
        .args(["--quiet", "generate", "--model"])
        .arg(tiny())
        .args(["--prompt", "x", "--steps", "2", "--init-image"])
        .arg(&odd)
        .arg("--out")
        .arg(&fresh)
        .output()
        .unwrap();
    assert_says(
        &o,
        false,
        &["odd.png: 40x33 does not fit the model (height"],
    );
    // The bad side is named by where it came from: here --width, not the (good) init image.
    let o = generate(
        &tiny(),
        &out,
        &[
            "--init-image",
            out.join("00000-5.png").to_str().unwrap(),
            "--width",
            "33",
        ],
    );
    assert_says(&o, false, &["invalid width: 33"]);
    assert!(!stderr(&o).contains("--init-image"), "{}", stderr(&o));
    // A fitting init image of another size than --width x --height is named, with both sizes.
    let o = generate(
        &tiny(),
        &fresh,
        &[
            "--init-image",
            out.join("00000-5.png").to_str().unwrap(),
            "--width",
            "64",
        ],
    );
    assert_says(
        &o,
        false,
        &["--init-image", "00000-5.png: is 32x32", "64x32"],
    );
    assert!(!fresh.exists());
    // One that fits makes an img2img image whose record names the init image by content.
    let init = out.join("00000-5.png");
    let o = generate(&tiny(), &fresh, &["--init-image", init.to_str().unwrap()]);
    assert_says(&o, true, &[]);
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fresh.join("00000-5.json")).unwrap()).unwrap();
    assert_eq!(
        side["params"]["extra"]["init_image_sha256"],
        artguide::output::sha256_file(&init).unwrap(),
        "{side}"
    );
    #[cfg(target_os = "linux")]
    {
        // An output folder that cannot be made fails before the model runs.
        let o = generate(&tiny(), Path::new("/proc/artguide-test-out"), &[]);
        assert_says(&o, false, &["--out: /proc/artguide-test-out"]);
    }
    // A --clip-prompt with a colon of its own is said how it was read.
    let o = generate(
        &tiny(),
        &out,
        &["--clip-prompt", "ratio 16:9", "--clip-guidance-scale", "0"],
    );
    assert!(
        stderr(&o).contains("`ratio 16:9`: read as text `ratio 16` with weight 9"),
        "{}",
        stderr(&o)
    );
    // compare on a run that has not finished says how to finish it.
    let unfinished = tmp.path().join("unfinished");
    std::fs::create_dir_all(&unfinished).unwrap();
    std::fs::write(unfinished.join("recipe.yaml"), "name: x\n").unwrap();
    let o = bin().arg("compare").arg(&unfinished).output().unwrap();
    assert_says(&o, false, &["has not finished"]);

    let bench = |extra: &[&str]| {
        bin()
            .args(["--quiet", "bench", "--parts", "unet"])
            .args(extra)
            .output()
            .unwrap()
    };
    for (args, needle) in [
        (
            &["--sizes", "65"][..],
            "--sizes 65: expected a positive multiple of 8",
        ),
        (&["--sizes", "0"][..], "--sizes 0"),
        (&["--reps", "0"][..], "--reps 0"),
        (&["--arch", "sd16"][..], "--arch `sd16`"),
    ] {
        let o = bench(args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(o.stdout.is_empty(), "{args:?}: a table was started");
    }
}

/// A reader that goes away (`artguide ... | head`) ends a result printout quietly, and a
/// closed stderr never stops the work: progress is not the result.
#[test]
fn a_closed_pipe_is_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    let o = bin()
        .args(["generate", "--model"])
        .arg(tiny())
        .args([
            "--prompt", "x", "--steps", "2", "--width", "32", "--height", "32",
        ])
        .arg("--out")
        .arg(&out)
        .stdout(closed())
        .stderr(closed())
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", o.status);
    assert_eq!(files_in(&out), ["00000-0.json", "00000-0.png"]);
    let o = bin()
        .args(["--json", "inspect"])
        .arg(out.join("00000-0.png"))
        .stdout(closed())
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}: {}", o.status, stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
}

/// An output path that is an input or another output is refused before any work, and the
/// file stays as it was; an output's missing folder is made.
#[test]
fn outputs_never_replace_inputs_or_each_other() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("in.png");
    std::fs::copy(clip_fixture("images/img0_37x23_rgb.png"), &img).unwrap();
    let class_a = tmp.path().join("a.npy");
    std::fs::copy(emb("a.npy"), &class_a).unwrap();
    let before = (
        std::fs::read(&img).unwrap(),
        std::fs::read(&class_a).unwrap(),
    );
    let embed = |out: &Path, list: Option<&Path>| {
        let mut c = bin();
        c.args(["--quiet", "embed", "--clip"])
            .arg(clip_fixture("tiny-clip-a"))
            .arg("--out")
            .arg(out);
        if let Some(l) = list {
            c.arg("--list").arg(l);
        }
        c.arg(&img).output().unwrap()
    };
    let npy = tmp.path().join("e.npy");
    let o = embed(&npy, Some(&img));
    assert_says(&o, false, &["--list", "in.png is one of the inputs"]);
    let o = embed(&npy, Some(&npy));
    assert_says(&o, false, &["--list", "e.npy is also the --out output"]);
    // The default row list is the --out path with .csv: a .csv --out would be both.
    let o = embed(&tmp.path().join("e.csv"), None);
    assert_says(&o, false, &["--out", "e.csv", "give --out a .npy name"]);
    let o = bin()
        .args(["--quiet", "separate", "--class-a"])
        .arg(&class_a)
        .arg("--class-b")
        .arg(emb("b.npy"))
        .arg("--scores")
        .arg(tmp.path().join(".").join("a.npy"))
        .output()
        .unwrap();
    assert_says(&o, false, &["--scores", "a.npy is one of the inputs"]);
    let probe = |out: &Path, csv: &Path| {
        bin()
            .args(["--quiet", "probe", "--clip"])
            .arg(clip_fixture("tiny-clip-a"))
            .arg("--suite")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/art.yaml"))
            .arg("--out")
            .arg(out)
            .arg("--csv")
            .arg(csv)
            .arg("--no-cache")
            .arg(&img)
            .output()
            .unwrap()
    };
    let same = tmp.path().join("r.json");
    let o = probe(&same, &same);
    assert_says(&o, false, &["--csv", "r.json is also the --out output"]);
    assert!(!same.exists());
    assert_eq!(
        (
            std::fs::read(&img).unwrap(),
            std::fs::read(&class_a).unwrap()
        ),
        before
    );
    // The CLIP model's own files are inputs too (a copy: were the check wrong, the run
    // would overwrite them).
    let model = copy_clip("tiny-clip-a", &tmp.path().join("clip"));
    let config = std::fs::read(model.join("config.json")).unwrap();
    let o = bin()
        .args(["--quiet", "probe", "--clip"])
        .arg(clip_fixture("tiny-clip-b"))
        .arg("--probe-clip")
        .arg(&model)
        .arg("--suite")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/art.yaml"))
        .arg("--out")
        .arg(model.join("config.json"))
        .args(["--no-cache"])
        .arg(&img)
        .output()
        .unwrap();
    assert_says(&o, false, &["--out", "config.json is one of the inputs"]);
    assert_eq!(std::fs::read(model.join("config.json")).unwrap(), config);
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let o = bin()
        .args(["--quiet", "embed", "--clip"])
        .arg(&model)
        .arg("--out")
        .arg(model.join("model.safetensors"))
        .arg("--list")
        .arg(tmp.path().join("rows.csv"))
        .arg(&img)
        .output()
        .unwrap();
    assert_says(
        &o,
        false,
        &["--out", "model.safetensors is one of the inputs"],
    );
    assert_eq!(
        std::fs::read(model.join("model.safetensors")).unwrap(),
        weights
    );
    // Folders that do not exist yet are made before the work.
    let (out, csv) = (tmp.path().join("new/r.json"), tmp.path().join("new2/r.csv"));
    let o = probe(&out, &csv);
    assert_says(&o, true, &[]);
    assert!(out.is_file() && csv.is_file());
}

fn emb(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/embeddings")
        .join(name)
}

#[test]
fn separate_then_agree_pipeline() {
    let tmp = tempfile::tempdir().unwrap();
    let scores = tmp.path().join("scores.csv");
    let o = bin()
        .args(["--json", "separate", "--class-a"])
        .arg(emb("a.npy"))
        .arg("--class-b")
        .arg(emb("b.npy"))
        .args(["--label-a", "ai", "--label-b", "human", "--scores"])
        .arg(&scores)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(acc > 0.5 && acc <= 1.0, "{acc}");
    assert_eq!(v["n_a"], 60);
    let text = std::fs::read_to_string(&scores).unwrap();
    assert!(text.starts_with("class,row,fold,p_a\n"), "{text}");
    assert_eq!(text.lines().count(), 121);
    // A bad setting is the option's error, not the first fold's.
    let o = bin()
        .args(["separate", "--class-a"])
        .arg(emb("a.npy"))
        .arg("--class-b")
        .arg(emb("b.npy"))
        .args(["--c", "-1"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("invalid --c: -1: expected a positive number")
            && !stderr(&o).contains("fold"),
        "{}",
        stderr(&o)
    );
    // One file for both classes, or one name for both, is a mistake said as such.
    let separate = |b: &Path, labels: [&str; 2]| {
        bin()
            .args(["separate", "--class-a"])
            .arg(emb("a.npy"))
            .arg("--class-b")
            .arg(b)
            .args(["--label-a", labels[0], "--label-b", labels[1]])
            .output()
            .unwrap()
    };
    let twice = emb("../embeddings/a.npy");
    assert_says(
        &separate(&twice, ["a", "b"]),
        false,
        &["--class-b", "same embeddings as --class-a"],
    );
    let copy = tmp.path().join("a-copy.npy");
    std::fs::copy(emb("a.npy"), &copy).unwrap();
    assert_says(
        &separate(&copy, ["a", "b"]),
        false,
        &["a-copy.npy", "same embeddings as --class-a"],
    );
    assert_says(
        &separate(&emb("b.npy"), ["x", "x"]),
        false,
        &["--label-b `x`"],
    );

    let o = bin()
        .args(["--json", "agree", "--scores"])
        .arg(&scores)
        .arg("--ratings")
        .arg(emb("ratings.csv"))
        .args([
            "--where",
            "class=ai",
            "--score-column",
            "p_a",
            "--rating-column",
            "authenticity",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let s = v["correlations"]["spearman"]["estimate"].as_f64().unwrap();
    assert!((-1.0..=1.0).contains(&s));
    assert_eq!(v["key"], "row");

    let o = bin()
        .args(["agree", "--scores"])
        .arg(&scores)
        .arg("--ratings")
        .arg(emb("ratings.csv"))
        .args([
            "--where",
            "class=ai",
            "--score-column",
            "p_a",
            "--rating-column",
            "beauty",
        ])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("beauty") && err.contains("ratings.csv") && err.contains("authenticity"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // A filter that matches nothing says so, with the values that are there.
    let o = bin()
        .args(["agree", "--scores"])
        .arg(&scores)
        .arg("--ratings")
        .arg(emb("ratings.csv"))
        .args([
            "--where",
            "class=robot",
            "--score-column",
            "p_a",
            "--rating-column",
            "authenticity",
        ])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("`class=robot` matches no row") && err.contains("values there: "),
        "{err}"
    );
}

/// A hub repo id resolves from the standard cache layout with HF_HUB_OFFLINE=1, and
/// `--latents` reproduces diffusers' run from the same initial noise.
#[test]
fn hub_cache_and_latents_reproduce_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let commit = "4f1c2b7e9a0d3c5b6a7e8f90123456789abcdef0";
    let repo = tmp.path().join("hub/models--tiny--sd-a");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_model(&repo.join("snapshots").join(commit));

    // The reference latents, in the file format `--latents` takes.
    let refs = candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/reference/tiny-sd-a.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let lat = tmp.path().join("noise.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents".to_string(), refs["latents_init"].clone())]),
        &lat,
    )
    .unwrap();

    let out = tmp.path().join("out");
    let o = bin()
        .env("HF_HUB_CACHE", tmp.path().join("hub"))
        .args([
            "--quiet",
            "generate",
            "--model",
            "tiny/sd-a",
            "--prompt",
            "a painting of a lighthouse at dusk",
        ])
        .args([
            "--negative-prompt",
            "blurry, low quality",
            "--steps",
            "4",
            "--guidance-scale",
            "7.5",
        ])
        .args([
            "--width",
            "48",
            "--height",
            "32",
            "--save-tensors",
            "--latents",
        ])
        .arg(&lat)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let t =
        candle_core::safetensors::load(out.join("00000-0.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let d = (&t["image"] - &refs["ddim_cfg_image"])
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-3, "image differs from diffusers by {d}");
    let side = std::fs::read_to_string(out.join("00000-0.json")).unwrap();
    assert!(side.contains("\"model\": \"tiny/sd-a\""), "{side}");
    // The noise came from the file, which the record names (with its hash and row), and
    // DDIM's eta is recorded: both change the image, so both are needed to remake it.
    let side: serde_json::Value = serde_json::from_str(&side).unwrap();
    let extra = &side["params"]["extra"];
    assert_eq!(extra["eta"], 0.0, "{extra}");
    assert_eq!(extra["latents"]["row"], 0, "{extra}");
    assert_eq!(
        extra["latents"]["sha256"],
        artguide::output::sha256_file(&lat).unwrap(),
        "{extra}"
    );

    // Not cached and offline: the error names the repo and the file.
    let o = bin()
        .env("HF_HUB_CACHE", tmp.path().join("hub"))
        .args(["generate", "--model", "tiny/not-cached", "--prompt", "x"])
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("tiny/not-cached")
            && err.contains("model_index.json")
            && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

/// A copy of a fixture CLIP folder at `dst`, for tests that alter or guard its files.
fn copy_clip(fixture: &str, dst: &Path) -> PathBuf {
    std::fs::create_dir(dst).unwrap();
    for f in std::fs::read_dir(clip_fixture(fixture)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dst.join(f.file_name().unwrap())).unwrap();
    }
    dst.to_path_buf()
}

fn clip_fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip")
        .join(rel)
}

/// `embed` gives transformers' CLIP image features (L2-normalised), one row per image in
/// folder order, and handles an unreadable image as the user chose.
#[test]
fn embed_matches_transformers_and_handles_bad_images() {
    let tmp = tempfile::tempdir().unwrap();
    let npy = tmp.path().join("e.npy");
    let o = bin()
        .args(["--quiet", "embed", "--clip"])
        .arg(clip_fixture("tiny-clip-a"))
        .arg("--out")
        .arg(&npy)
        .arg(clip_fixture("images"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let m = artguide::probe::npy::read_npy(&npy).unwrap();
    assert_eq!((m.rows, m.cols), (5, 24));
    let refs = candle_core::safetensors::load(
        clip_fixture("reference-tiny-clip-a.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for i in [0usize, 1, 2, 4] {
        // PNGs decode identically; the JPEG (row 3) may differ by a unit after decoding.
        let want: Vec<f32> = refs[&format!("image_embeds_{i}")]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let norm = want.iter().map(|v| v * v).sum::<f32>().sqrt();
        for (g, w) in m.row(i).iter().zip(&want) {
            assert!((g - w / norm).abs() < 1e-4, "row {i}: {g} vs {}", w / norm);
        }
    }
    let list = std::fs::read_to_string(tmp.path().join("e.csv")).unwrap();
    assert!(
        list.lines()
            .nth(4)
            .unwrap()
            .ends_with("img3_50x29_rgb_q90.jpg"),
        "{list}"
    );

    // A truncated image: named and fatal by default, skipped on request.
    let dir = tmp.path().join("imgs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(clip_fixture("images/img0_37x23_rgb.png"), dir.join("a.png")).unwrap();
    let bytes = std::fs::read(clip_fixture("images/img4_71x52_rgb.png")).unwrap();
    std::fs::write(dir.join("b.png"), &bytes[..bytes.len() / 3]).unwrap();
    let out2 = tmp.path().join("f.npy");
    let run = |extra: &[&str]| {
        bin()
            .args(["--quiet", "embed", "--clip"])
            .arg(clip_fixture("tiny-clip-a"))
            .arg("--out")
            .arg(&out2)
            .args(extra)
            .arg(&dir)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("b.png") && !err.contains("panicked"), "{err}");
    assert!(!out2.exists());
    let o = run(&["--on-error", "skip"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(artguide::probe::npy::read_npy(&out2).unwrap().rows, 1);
}

/// `probe` answers a suite as transformers' CLIP does (single templates and ensembles),
/// and a second run reads every embedding from the cache.
#[test]
fn probe_matches_transformers_zero_shot_and_caches() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tmp.path().join("suite.yaml");
    std::fs::write(
        &suite,
        "probes:\n  - name: single\n    templates: [\"a painting in the style of {}\"]\n    labels: [Impressionism, Cubism, Baroque]\n  - name: ensemble\n    templates: [\"a painting in the style of {}\", \"an artwork of the {} movement\"]\n    labels: [Impressionism, Cubism, Baroque]\n",
    )
    .unwrap();
    let (out, csv, cache) = (
        tmp.path().join("r.json"),
        tmp.path().join("r.csv"),
        tmp.path().join("cache"),
    );
    let run = || {
        bin()
            .args(["--quiet", "probe", "--clip"])
            .arg(clip_fixture("tiny-clip-b"))
            .arg("--suite")
            .arg(&suite)
            .arg("--out")
            .arg(&out)
            .arg("--csv")
            .arg(&csv)
            .arg("--cache")
            .arg(&cache)
            .arg(clip_fixture("images"))
            .output()
            .unwrap()
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["cached"], 0);
    let refs = candle_core::safetensors::load(
        clip_fixture("reference-tiny-clip-b.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    for (probe, key) in [(0usize, "probs_single"), (1, "probs_ensemble")] {
        for i in [0usize, 1, 2, 4] {
            let want: Vec<f32> = refs[key].get(i).unwrap().to_vec1().unwrap();
            let got: Vec<f64> = r["images"][i]["probes"][probe]["probs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - *w as f64).abs() < 1e-5,
                    "{key} image {i}: {got:?} vs {want:?}"
                );
            }
            let h: f64 = -got.iter().map(|p| p * p.ln()).sum::<f64>();
            assert!(
                (r["images"][i]["probes"][probe]["entropy"].as_f64().unwrap() - h).abs() < 1e-5
            );
        }
    }
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(rows.lines().count(), 1 + 5 * 2 * 3, "{rows}");

    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let r2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r2["cached"], 5);
    assert_eq!(r2["images"], r["images"]);
    // A cached image is held to the size limit as an uncached one is (the cache used to
    // skip the check, so a cached run accepted what a fresh one refused).
    let o = bin()
        .args(["--quiet", "probe", "--max-pixels", "100", "--clip"])
        .arg(clip_fixture("tiny-clip-b"))
        .arg("--suite")
        .arg(&suite)
        .arg("--cache")
        .arg(&cache)
        .arg(clip_fixture("images/img0_37x23_rgb.png"))
        .output()
        .unwrap();
    assert_says(
        &o,
        false,
        &["img0_37x23_rgb.png", "more than the limit of 100"],
    );

    // --json without --out: stdout is JSON lines, the last one the results.
    let o = bin()
        .args(["--json", "probe", "--clip"])
        .arg(clip_fixture("tiny-clip-b"))
        .arg("--suite")
        .arg(&suite)
        .arg("--no-cache")
        .arg(clip_fixture("images"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(lines.last().unwrap()["event"], "results");
    assert_eq!(lines.last().unwrap()["results"]["images"], r["images"]);

    // A malformed suite is named with its field, before any model is loaded.
    std::fs::write(
        &suite,
        "probes:\n  - name: s\n    templates: [\"no placeholder\"]\n    labels: [a, b]\n",
    )
    .unwrap();
    let o = run();
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("suite.yaml") && err.contains("templates[0]"),
        "{err}"
    );
}

/// `probe --labels` scores answers: accuracy, top-k and the confusion matrix agree with an
/// independent count over transformers' probabilities; a label the probe lacks is named.
#[test]
fn probe_labels_report_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tmp.path().join("suite.yaml");
    std::fs::write(&suite, "probes:\n  - name: style\n    templates: [\"a painting in the style of {}\"]\n    labels: [Impressionism, Cubism, Baroque]\n").unwrap();
    let labels = ["Impressionism", "Cubism", "Baroque"];
    let files = [
        "img0_37x23_rgb.png",
        "img1_19x41_l.png",
        "img2_33x33_rgba.png",
        "img4_71x52_rgb.png",
    ];
    let truth = [0usize, 1, 2, 0];
    let mut csv = String::from("image,probe,label\n");
    for (f, t) in files.iter().zip(truth) {
        csv.push_str(&format!("{f},style,{}\n", labels[t]));
    }
    let lab = tmp.path().join("labels.csv");
    std::fs::write(&lab, &csv).unwrap();
    let images = tmp.path().join("imgs");
    std::fs::create_dir(&images).unwrap();
    for f in files {
        std::fs::copy(clip_fixture(&format!("images/{f}")), images.join(f)).unwrap();
    }
    let out = tmp.path().join("r.json");
    let run = |labels_file: &Path| {
        bin()
            .args(["--quiet", "probe", "--no-cache", "--top-k", "2", "--clip"])
            .arg(clip_fixture("tiny-clip-a"))
            .arg("--suite")
            .arg(&suite)
            .arg("--labels")
            .arg(labels_file)
            .arg("--out")
            .arg(&out)
            .arg(&images)
            .output()
            .unwrap()
    };
    let o = run(&lab);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let ev = &r["evaluation"]["probes"][0];

    // Independent count from the reference probabilities (image indices 0, 1, 2, 4).
    let refs = candle_core::safetensors::load(
        clip_fixture("reference-tiny-clip-a.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let (mut correct, mut top2) = (0, 0);
    let mut confusion = vec![vec![0u64; 3]; 3];
    for (&i, t) in [0usize, 1, 2, 4].iter().zip(truth) {
        let p: Vec<f32> = refs["probs_single"].get(i).unwrap().to_vec1().unwrap();
        let mut order: Vec<usize> = (0..3).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        confusion[t][order[0]] += 1;
        correct += (order[0] == t) as usize;
        top2 += order[..2].contains(&t) as usize;
    }
    assert_eq!(ev["n"], 4);
    assert!((ev["accuracy"].as_f64().unwrap() - correct as f64 / 4.0).abs() < 1e-12);
    assert!((ev["top_k_accuracy"].as_f64().unwrap() - top2 as f64 / 4.0).abs() < 1e-12);
    assert_eq!(ev["confusion"], serde_json::json!(confusion));

    std::fs::write(
        &lab,
        "image,probe,label\nimg0_37x23_rgb.png,style,Fauvism\n",
    )
    .unwrap();
    let o = run(&lab);
    let err = stderr(&o);
    assert!(
        !o.status.success()
            && err.contains("labels.csv")
            && err.contains("Fauvism")
            && err.contains("line 2"),
        "{err}"
    );
}

/// `generate` with CLIP guidance from the command line: the image differs from the unguided
/// one, the sidecar and PNG parameters record the guidance, scale 0 reproduces the unguided
/// bytes, and bad guidance options are one clear line with nothing written.
#[test]
fn generate_with_clip_guidance() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = clip_fixture("tiny-clip-a");
    let clip = clip.to_str().unwrap();
    let taesd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-taesd");
    let style = clip_fixture("images/img4_71x52_rgb.png");
    let png = |dir: &Path| std::fs::read(dir.join("00000-5.png")).unwrap();
    let pixels = |dir: &Path| {
        image::load_from_memory(&png(dir))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };

    let plain = tmp.path().join("plain");
    let o = generate(&tiny(), &plain, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let guided = tmp.path().join("guided");
    let o = generate(
        &tiny(),
        &guided,
        &[
            "--clip",
            clip,
            "--clip-prompt",
            "a storm at sea",
            "--clip-prompt",
            "blurry:-0.5",
            "--clip-guidance-scale",
            "500",
            "--cutouts",
            "2",
            "--style-image",
            style.to_str().unwrap(),
            "--style-weight",
            "10",
            "--guidance-decoder",
            "taesd",
            "--taesd",
            taesd.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(pixels(&plain), pixels(&guided));
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(guided.join("00000-5.json")).unwrap()).unwrap();
    let g = &side["params"]["extra"]["guidance"];
    assert_eq!(g["decoder"], "taesd", "{side}");
    assert_eq!(g["prompts"][1]["weight"], -0.5, "{side}");
    assert_eq!(g["losses"].as_array().unwrap().len(), 2, "{side}");
    // The record names what the guide read by content, and the layers the style term used
    // (tiny-clip-a has 2 vision layers: the default, 1/4, 1/2 and 3/4 of the depth, is 0).
    let sha = |p: &Path| artguide::output::sha256_file(p).unwrap();
    let hashed = &g["files_sha256"];
    assert_eq!(
        hashed["clip/model.safetensors"],
        sha(&clip_fixture("tiny-clip-a/model.safetensors")),
        "{side}"
    );
    assert_eq!(
        hashed["clip/config.json"],
        sha(&clip_fixture("tiny-clip-a/config.json")),
        "{side}"
    );
    assert_eq!(
        hashed["taesd/diffusion_pytorch_model.safetensors"],
        sha(&taesd.join("diffusion_pytorch_model.safetensors")),
        "{side}"
    );
    assert_eq!(hashed["style.image"], sha(&style), "{side}");
    assert_eq!(
        hashed["clip/tokenizer.json"],
        sha(&clip_fixture("tiny-clip-a/tokenizer.json")),
        "{side}"
    );
    let tokenizer_files = [
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .filter(|f| clip_fixture("tiny-clip-a").join(f).is_file())
    .count();
    assert_eq!(
        hashed.as_object().unwrap().len(),
        6 + tokenizer_files,
        "{side}"
    );
    assert_eq!(g["style"]["layers"], serde_json::json!([0]), "{side}");
    assert!(g["style"]["content_layers"].is_array(), "{side}");
    let inspect = bin()
        .arg("inspect")
        .arg(guided.join("00000-5.png"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&inspect.stdout).contains("Guidance"));

    let zero = tmp.path().join("zero");
    let o = generate(
        &tiny(),
        &zero,
        &[
            "--clip",
            clip,
            "--clip-prompt",
            "a storm at sea",
            "--clip-guidance-scale",
            "0",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(pixels(&plain), pixels(&zero));

    let out = tmp.path().join("bad");
    assert_user_error(
        generate(&tiny(), &out, &["--clip-prompt", "x"]),
        &out,
        &["--clip"],
    );
    assert_user_error(
        generate(
            &tiny(),
            &out,
            &[
                "--clip",
                clip,
                "--clip-prompt",
                "x",
                "--guidance-decoder",
                "jpeg",
            ],
        ),
        &out,
        &["guidance-decoder", "jpeg", "vae, taesd, linear"],
    );
    assert_user_error(
        generate(
            &tiny(),
            &out,
            &["--clip", clip, "--style-image", "missing.png"],
        ),
        &out,
        &["missing.png"],
    );
    assert_user_error(
        generate(
            &tiny(),
            &out,
            &["--clip", clip, "--clip-prompt", "x", "--guide-every", "0"],
        ),
        &out,
        &["guide-every"],
    );
    // A TAESD whose upsampling differs from the model's VAE is refused by name.
    let big = tmp.path().join("taesd8x");
    std::fs::create_dir_all(&big).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(taesd.join("config.json")).unwrap()).unwrap();
    cfg["upsampling_scaling_factor"] = 8.into();
    std::fs::write(big.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        taesd.join("diffusion_pytorch_model.safetensors"),
        big.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_user_error(
        generate(
            &tiny(),
            &out,
            &[
                "--clip",
                clip,
                "--clip-prompt",
                "x",
                "--guidance-decoder",
                "taesd",
                "--taesd",
                big.to_str().unwrap(),
            ],
        ),
        &out,
        &["TAESD", "8x", "2x"],
    );
}

/// `--probe-clip`: `probe` answers with a second, held-out CLIP too, with the per-probe
/// agreement recomputed here from the two sets of answers; `generate` probes its images with
/// the held-out CLIP and with the guide CLIP and keeps both in the sidecar.
#[test]
fn probe_clip_holds_out_a_second_model() {
    let tmp = tempfile::tempdir().unwrap();
    let suite = tmp.path().join("suite.yaml");
    std::fs::write(
        &suite,
        "probes:\n  - name: style\n    templates: [\"a painting in the style of {}\"]\n    labels: [Impressionism, Cubism, Baroque]\n  - name: hands\n    templates: [\"a painting with {}\"]\n    labels: [distorted hands, well-drawn hands]\n",
    )
    .unwrap();
    let (out, csv) = (tmp.path().join("r.json"), tmp.path().join("r.csv"));
    let o = bin()
        .args(["--quiet", "probe", "--no-cache", "--clip"])
        .arg(clip_fixture("tiny-clip-a"))
        .arg("--probe-clip")
        .arg(clip_fixture("tiny-clip-b"))
        .arg("--suite")
        .arg(&suite)
        .arg("--out")
        .arg(&out)
        .arg("--csv")
        .arg(&csv)
        .arg(clip_fixture("images"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // A held-out CLIP that cannot load fails before the first CLIP probes any image (which
    // would have filled the embedding cache).
    let cache = tmp.path().join("cache");
    let o = bin()
        .args(["--quiet", "probe", "--cache"])
        .arg(&cache)
        .arg("--clip")
        .arg(clip_fixture("tiny-clip-a"))
        .args(["--probe-clip", "no/such-clip"])
        .arg("--suite")
        .arg(&suite)
        .arg(clip_fixture("images"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert_says(&o, false, &["no/such-clip"]);
    assert!(files_in(&cache).is_empty(), "{:?}", files_in(&cache));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let h = &r["held_out"];
    assert!(h["clip"].as_str().unwrap().ends_with("tiny-clip-b"), "{h}");
    assert!(r["clip"].as_str().unwrap().ends_with("tiny-clip-a"));
    let agreement = r["agreement"].as_array().unwrap();
    assert_eq!(agreement.len(), 2);
    for (k, a) in agreement.iter().enumerate() {
        let (mut same, mut diff, mut cells) = (0, 0.0, 0);
        for i in 0..5 {
            let pa = &r["images"][i]["probes"][k];
            let pb = &h["images"][i]["probes"][k];
            same += usize::from(pa["top"] == pb["top"]);
            for (x, y) in pa["probs"]
                .as_array()
                .unwrap()
                .iter()
                .zip(pb["probs"].as_array().unwrap())
            {
                diff += (x.as_f64().unwrap() - y.as_f64().unwrap()).abs();
                cells += 1;
            }
        }
        assert_eq!(a["images"], 5);
        assert!(
            (a["top_agreement"].as_f64().unwrap() - same as f64 / 5.0).abs() < 1e-12,
            "{a}"
        );
        assert!(
            (a["mean_abs_prob_diff"].as_f64().unwrap() - diff / cells as f64).abs() < 1e-6,
            "{a}"
        );
    }
    // The two tiny CLIPs are different random models: their probabilities must differ.
    assert!(agreement[0]["mean_abs_prob_diff"].as_f64().unwrap() > 1e-4);
    let rows = std::fs::read_to_string(&csv).unwrap();
    assert!(rows.lines().next().unwrap().ends_with(",clip"), "{rows}");
    assert_eq!(rows.lines().count(), 1 + 2 * 5 * (3 + 2), "{rows}");

    let gen = tmp.path().join("gen");
    let o = generate(
        &tiny(),
        &gen,
        &[
            "--clip",
            clip_fixture("tiny-clip-a").to_str().unwrap(),
            "--clip-prompt",
            "Cubism",
            "--clip-guidance-scale",
            "300",
            "--cutouts",
            "1",
            "--probe-clip",
            clip_fixture("tiny-clip-b").to_str().unwrap(),
            "--probe-suite",
            suite.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let side: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gen.join("00000-5.json")).unwrap()).unwrap();
    let probes = side["params"]["extra"]["probes"].as_object().unwrap();
    assert_eq!(probes.len(), 2, "{side}");
    for (model, answers) in probes {
        assert_eq!(answers.as_array().unwrap().len(), 2, "{model}");
        let p: f64 = answers[0]["probs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .sum();
        assert!((p - 1.0).abs() < 1e-5, "{model}: {p}");
    }
}

/// A request that cannot fit is refused up front with the estimate, not killed by the OS.
#[test]
fn requests_that_cannot_fit_are_refused_with_an_estimate() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    assert_user_error(
        generate(&tiny(), &out, &["--width", "16384", "--height", "16384"]),
        &out,
        &["16384x16384", "GiB", "available", "UNet self-attention"],
    );
    let clip = clip_fixture("tiny-clip-a");
    let taesd = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-taesd");
    let o = bin()
        .env("ARTGUIDE_MEMORY_LIMIT_MB", "1")
        .args(["--quiet", "generate", "--model"])
        .arg(tiny())
        .args([
            "--prompt", "x", "--steps", "2", "--width", "16", "--height", "16", "--clip",
        ])
        .arg(&clip)
        .args([
            "--clip-prompt",
            "y",
            "--guidance-decoder",
            "taesd",
            "--taesd",
        ])
        .arg(&taesd)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_user_error(
        o,
        &out,
        &[
            "needs about",
            "guidance backward through the taesd decoder",
            "--cutouts",
        ],
    );
}

/// An SDXL folder through the CLI: reproducible bytes, the folder's own scheduler (Euler) by
/// default, and both text encoders' weights and configs hashed into the sidecar.
#[test]
fn sdxl_folder_generates_reproducibly_with_all_files_hashed() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sdxl");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = generate(&model, &a, &["--scheduler", "euler"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // No --scheduler: `auto` takes the folder's EulerDiscreteScheduler and says so.
    let o = bin()
        .args(["--json", "generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "a lighthouse at dusk",
            "--steps",
            "2",
            "--width",
            "32",
        ])
        .args(["--height", "32", "--seed", "5", "--out"])
        .arg(&b)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let events = String::from_utf8_lossy(&o.stdout);
    let picked: serde_json::Value = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "scheduler")
        .unwrap_or_else(|| panic!("no scheduler event in {events}"));
    assert_eq!(picked["scheduler"], "euler", "{picked}");
    assert!(picked["reason"]
        .as_str()
        .unwrap()
        .contains("EulerDiscreteScheduler"));
    assert_eq!(
        std::fs::read(a.join("00000-5.png")).unwrap(),
        std::fs::read(b.join("00000-5.png")).unwrap()
    );
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("00000-5.json")).unwrap()).unwrap();
    let files = sidecar["model_files_sha256"].as_object().unwrap();
    for rel in [
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "text_encoder_2/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer_2/merges.txt",
    ] {
        assert!(files.contains_key(rel), "{rel} not hashed: {files:?}");
    }
}

#[test]
fn version_names_the_compiled_gpu_features() {
    let o = bin().arg("--version").output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    let expected = if cfg!(feature = "cudnn") {
        "(features: cuda, cudnn)"
    } else if cfg!(feature = "cuda") {
        "(features: cuda)"
    } else {
        "(CPU only)"
    };
    assert!(
        text.starts_with(&format!("artguide {}", env!("CARGO_PKG_VERSION")))
            && text.contains(expected),
        "{text}"
    );
}

/// Probes the fixture images with `clip` on a three-style suite written in `dir`, with
/// `extra` flags, and returns the results JSON (the run must succeed).
fn probe_styles(dir: &Path, clip: &Path, extra: &[&std::ffi::OsStr]) -> serde_json::Value {
    let suite = dir.join("suite.yaml");
    std::fs::write(
        &suite,
        "probes:\n  - name: style\n    templates: [\"a painting in the style of {}\"]\n    labels: [Impressionism, Cubism, Baroque]\n",
    )
    .unwrap();
    let out = dir.join("r.json");
    let o = bin()
        .args(["--quiet", "probe", "--clip"])
        .arg(clip)
        .arg("--suite")
        .arg(&suite)
        .arg("--out")
        .arg(&out)
        .args(extra)
        .arg(clip_fixture("images"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{extra:?}: {}", stderr(&o));
    serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap()
}

/// The embedding cache is keyed by dtype as well as model: an f16 probe's embeddings are not
/// served to an f32 probe (nor the reverse), and each cached run equals a `--no-cache` run in
/// its own dtype.
#[test]
fn probe_cache_keeps_dtypes_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let run = |extra: &[&str]| -> serde_json::Value {
        let extra: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
        probe_styles(tmp.path(), &clip_fixture("tiny-clip-b"), &extra)
    };
    let cache_arg = cache.to_str().unwrap();
    let f32_fresh = run(&["--no-cache"]);
    let f16_fresh = run(&["--no-cache", "--dtype", "f16"]);
    // The dtypes differ measurably on this model, so reuse across them would show.
    assert_ne!(f32_fresh["images"], f16_fresh["images"]);

    let f16 = run(&["--cache", cache_arg, "--dtype", "f16"]);
    assert_eq!(f16["cached"], 0);
    assert_eq!(f16["images"], f16_fresh["images"]);
    let f32 = run(&["--cache", cache_arg]);
    assert_eq!(f32["cached"], 0, "f32 was served the f16 embeddings");
    assert_eq!(f32["images"], f32_fresh["images"]);

    // Both entries live side by side: each dtype now comes from its own.
    let f16 = run(&["--cache", cache_arg, "--dtype", "f16"]);
    assert_eq!(f16["cached"], 5);
    assert_eq!(f16["images"], f16_fresh["images"]);
    let f32 = run(&["--cache", cache_arg, "--dtype", "f32"]);
    assert_eq!(f32["cached"], 5);
    assert_eq!(f32["images"], f32_fresh["images"]);
}

/// A CLIP fine-tuned in its vision tower only (its file starts with the same header and text
/// embeddings) gets its own cache entries: the cache key covers the whole weight file.
#[test]
fn probe_cache_keeps_fine_tunes_apart() {
    let tmp = tempfile::tempdir().unwrap();
    let tuned = copy_clip("tiny-clip-b", &tmp.path().join("tiny-clip-b-tuned"));
    // Negate `visual_projection.weight` (f16: flip each sign bit), the file's last tensor.
    let weights = tuned.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let t = &header["visual_projection.weight"];
    assert_eq!(t["dtype"], "F16");
    let (a, b) = (
        8 + n + t["data_offsets"][0].as_u64().unwrap() as usize,
        8 + n + t["data_offsets"][1].as_u64().unwrap() as usize,
    );
    assert!(a > 1 << 20, "the tensor must lie past the file's first MiB");
    for i in (a..b).step_by(2) {
        bytes[i + 1] ^= 0x80;
    }
    std::fs::write(&weights, bytes).unwrap();
    let run = |clip: &Path, cache: bool| -> serde_json::Value {
        let dir = tmp.path().join(if cache { "cache" } else { "fresh" });
        probe_styles(tmp.path(), clip, &["--cache".as_ref(), dir.as_os_str()])
    };
    let base = run(&clip_fixture("tiny-clip-b"), true);
    assert_eq!(base["cached"], 0);
    let tuned_fresh = run(&tuned, false);
    assert_ne!(base["images"], tuned_fresh["images"]);
    let tuned_cached = run(&tuned, true);
    assert_eq!(
        tuned_cached["cached"], 0,
        "served the original's embeddings"
    );
    assert_eq!(tuned_cached["images"], tuned_fresh["images"]);
}

/// A model whose embeddings are NaN (here, a corrupt image projection) is an error naming the
/// model and the image, not a confident answer: NaN used to win the top label with entropy 0.
#[test]
fn non_finite_embeddings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_clip("tiny-clip-a", &tmp.path().join("nan-clip"));
    let weights = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    let w = &tensors["visual_projection.weight"];
    let nan = (w.zeros_like().unwrap() * f64::NAN).unwrap();
    tensors.insert("visual_projection.weight".into(), nan);
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    let img = clip_fixture("images/img0_37x23_rgb.png");
    let out = tmp.path().join("out");
    let o = bin()
        .args(["--quiet", "probe", "--no-cache", "--clip"])
        .arg(&model)
        .arg("--suite")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/art.yaml"))
        .arg("--out")
        .arg(out.join("r.json"))
        .arg(&img)
        .output()
        .unwrap();
    assert_user_error(o, &out, &["nan-clip", "img0_37x23_rgb.png", "not finite"]);
    let o = bin()
        .args(["--quiet", "embed", "--clip"])
        .arg(&model)
        .arg("--out")
        .arg(out.join("e.npy"))
        .arg(&img)
        .output()
        .unwrap();
    assert_user_error(o, &out, &["nan-clip", "image embedding", "not finite"]);
}

/// A CLIP config with fewer vision layers than its weights is refused, naming the weights,
/// the config and a layer left unused (the model would embed without it).
#[test]
fn clip_config_with_fewer_layers_than_the_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = copy_clip("tiny-clip-a", &tmp.path().join("short-clip"));
    let cfg = model.join("config.json");
    let mut j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    j["vision_config"]["num_hidden_layers"] = 1.into();
    std::fs::write(&cfg, j.to_string()).unwrap();
    let out = tmp.path().join("out");
    let o = bin()
        .args(["--quiet", "embed", "--clip"])
        .arg(&model)
        .arg("--out")
        .arg(out.join("e.npy"))
        .arg(clip_fixture("images/img0_37x23_rgb.png"))
        .output()
        .unwrap();
    assert_user_error(
        o,
        &out,
        &[
            "short-clip/model.safetensors",
            "short-clip/config.json",
            "`vision_model.encoder.layers.1.",
        ],
    );
}

/// A cache that cannot be written (here a file where the folder would be) is said once, and
/// the probing goes on: it used to warn once per image.
#[test]
fn an_unwritable_cache_is_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::write(&cache, b"not a folder").unwrap();
    let out = tmp.path().join("r.json");
    let o = bin()
        .args(["probe", "--cache"])
        .arg(&cache)
        .arg("--clip")
        .arg(clip_fixture("tiny-clip-a"))
        .arg("--suite")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("probes/art.yaml"))
        .arg("--out")
        .arg(&out)
        .arg(clip_fixture("images"))
        .output()
        .unwrap();
    assert_says(&o, true, &["cannot cache embeddings"]);
    assert_eq!(
        stderr(&o).matches("cannot cache").count(),
        1,
        "{}",
        stderr(&o)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["images"].as_array().unwrap().len(), 5);
}

/// `--device cuda` reads `ARTGUIDE_CUDA_KERNELS`, `_TUNING` and `_GRAPHS` before anything
/// else, so a typo is named instead of silently meaning "off"; in a CPU build, valid values
/// reach the "built without CUDA support" error.
#[test]
fn cuda_switch_typo_is_named_and_cpu_builds_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (var, value) in [
        ("ARTGUIDE_CUDA_KERNELS", "maybe"),
        ("ARTGUIDE_CUDA_TUNING", "2"),
        ("ARTGUIDE_CUDA_GRAPHS", "graphs"),
    ] {
        let o = bin()
            .env(var, value)
            .args([
                "--quiet", "generate", "--device", "cuda", "--prompt", "x", "--model",
            ])
            .arg(tiny())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        let expected = if var == "ARTGUIDE_CUDA_KERNELS" {
            "expected 1/on/true/yes/all, 0/off/false/no/none, or a comma list of conv, norm, \
             bias, linear, activation, attention, upsample"
        } else {
            "expected 1/on/true/yes or 0/off/false/no"
        };
        let want = format!("{var}={value:?}: {expected}");
        assert!(err.contains(&want), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!out.exists());
    }
    if !cfg!(feature = "cuda") {
        let o = generate(&tiny(), &out, &["--device", "cuda"]);
        assert_eq!(o.status.code(), Some(1));
        assert!(
            stderr(&o).contains("built without CUDA support"),
            "{}",
            stderr(&o)
        );
        assert!(!out.exists());
    }
}
