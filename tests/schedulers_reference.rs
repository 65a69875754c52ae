//! Checks the schedulers against reference values produced by diffusers 0.42.1
//! (tests/fixtures/reference/schedulers.json): timesteps, sigmas, init_noise_sigma, train
//! alphas_cumprod, every step's scaled model input and output, and img2img truncation.

use std::path::{Path, PathBuf};

use artguide::schedulers::config::{parse_nonfinite, quote_nonfinite_json};
use artguide::schedulers::schedule::alphas_cumprod;
use artguide::schedulers::{
    build, img2img_start_index, SchedulerConfig, SchedulerKind, SchedulerOptions,
};
use candle_core::{Device, Tensor};
use serde_json::Value;

/// The reference file; `ARTGUIDE_SCHEDULER_REFERENCE` may point at another file of the same
/// format (e.g. extra cases generated with diffusers while developing).
fn fixture_path() -> PathBuf {
    match std::env::var_os("ARTGUIDE_SCHEDULER_REFERENCE") {
        Some(p) => PathBuf::from(p),
        None => {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference/schedulers.json")
        }
    }
}

fn f64s(v: &Value) -> Option<Vec<f64>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_f64().or_else(|| x.as_str().and_then(parse_nonfinite)))
        .collect()
}

fn f32s(v: &Value) -> Option<Vec<f32>> {
    Some(f64s(v)?.into_iter().map(|x| x as f32).collect())
}

/// Compares lists with a relative tolerance `tol` (and a 1e-7 absolute floor for zeros).
fn compare_list(failures: &mut Vec<String>, what: &str, got: &[f64], want: &[f64], tol: f64) {
    if got.len() != want.len() {
        failures.push(format!(
            "{what}: length {} vs diffusers {}\n  ours:     {got:?}\n  diffusers: {want:?}",
            got.len(),
            want.len()
        ));
        return;
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let ok = (g - w).abs() <= tol * w.abs() + 1e-7 || (g.is_infinite() && g == w);
        if !ok {
            failures.push(format!(
                "{what}[{i}]: {g} vs diffusers {w}\n  ours:     {got:?}\n  diffusers: {want:?}"
            ));
            return;
        }
    }
}

/// Max-abs comparison relative to the magnitude of the expected values.
fn compare_tensor(failures: &mut Vec<String>, what: &str, got: &Tensor, want: &[f32], tol: f64) {
    compare_tensor_scaled(failures, what, got, want, tol, 1.0)
}

/// As `compare_tensor`, with the allowed error scaled by at least `inputs_mag`: a step whose
/// inputs are ~2e4 (sigma of the cosine schedule's first trailing step) loses a few float32
/// ulps of that size to cancellation, in diffusers as in any float32 implementation.
fn compare_tensor_scaled(
    failures: &mut Vec<String>,
    what: &str,
    got: &Tensor,
    want: &[f32],
    tol: f64,
    inputs_mag: f64,
) {
    let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    if got.len() != want.len() {
        failures.push(format!(
            "{what}: {} values vs diffusers {}",
            got.len(),
            want.len()
        ));
        return;
    }
    let mag = want
        .iter()
        .fold(inputs_mag.max(1.0), |m, v| m.max(v.abs() as f64));
    let (mut worst, mut at) = (0f64, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (*g as f64 - *w as f64).abs();
        if d > worst || d.is_nan() {
            worst = d;
            at = i;
        }
    }
    if worst.is_nan() || worst > tol * mag {
        failures.push(format!(
            "{what}: max abs diff {worst:e} at {at} ({} vs diffusers {}), allowed {:e}",
            got[at],
            want[at],
            tol * mag
        ));
    }
}

fn run_case(case: &Value, path: &Path, failures: &mut Vec<String>) {
    let name = case["name"].as_str().unwrap_or("?").to_string();
    let kind: SchedulerKind = case["scheduler"]
        .as_str()
        .expect("case.scheduler")
        .parse()
        .unwrap();
    let config =
        SchedulerConfig::from_json_map(case["config"].as_object().expect("case.config"), path)
            .unwrap_or_else(|e| panic!("{name}: config: {e}"));
    let n = case["num_inference_steps"]
        .as_u64()
        .expect("num_inference_steps") as usize;
    let eta = case["eta"].as_f64().unwrap_or(0.0);
    let mut sched = build(kind, &config, n, &SchedulerOptions { eta })
        .unwrap_or_else(|e| panic!("{name}: build: {e}"));
    let tag = |what: &str| format!("{name} ({kind}, {n} steps): {what}");

    compare_list(
        failures,
        &tag("timesteps"),
        sched.timesteps(),
        &f64s(&case["timesteps"]).expect("timesteps"),
        1e-4,
    );
    match (sched.sigmas(), f64s(&case["sigmas"])) {
        (Some(got), Some(want)) => compare_list(failures, &tag("sigmas"), got, &want, 1e-4),
        (None, None) => {}
        (got, want) => failures.push(format!(
            "{}: ours {:?}, diffusers {:?}",
            tag("sigmas"),
            got.map(|s| s.len()),
            want.map(|s| s.len())
        )),
    }
    if let Some(want) = case["init_noise_sigma"].as_f64() {
        compare_list(
            failures,
            &tag("init_noise_sigma"),
            &[sched.init_noise_sigma()],
            &[want],
            1e-5,
        );
    }
    let ac = alphas_cumprod(&config, kind != SchedulerKind::Ddim).unwrap();
    for (key, got) in [
        ("alphas_cumprod_first", ac[0]),
        ("alphas_cumprod_last", ac[ac.len() - 1]),
    ] {
        if let Some(want) = case[key].as_f64() {
            compare_list(failures, &tag(key), &[got as f64], &[want], 1e-5);
        }
    }

    let shape: Vec<usize> = case["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let tensor = |v: &Value| -> Option<Tensor> {
        let data = f32s(v)?;
        Some(Tensor::from_vec(data, shape.as_slice(), &Device::Cpu).unwrap())
    };
    // img2img cases run from t_start (diffusers' set_begin_index)
    let first = case["img2img"]["t_start"].as_u64().unwrap_or(0) as usize;
    if let Some(img) = case["img2img"].as_object() {
        let clean = tensor(&img["clean_sample"]).expect("img2img.clean_sample");
        let noise = tensor(&img["noise"]).expect("img2img.noise");
        match sched.add_noise(&clean, &noise, first) {
            Ok(noised) => compare_tensor(
                failures,
                &tag("img2img add_noise"),
                &noised,
                &f32s(&img["noised_sample"]).expect("img2img.noised_sample"),
                1e-5,
            ),
            Err(e) => failures.push(format!("{}: {e}", tag("img2img add_noise"))),
        }
    }
    for (pos, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
        let i = first + pos;
        if let Some(t) = step["t"].as_f64() {
            let ours = sched.timesteps().get(i).copied().unwrap_or(f64::NAN);
            let diff = (ours - t).abs();
            if diff.is_nan() || diff > 1e-4 * t.abs().max(1.0) {
                failures.push(format!(
                    "{}: timestep {ours} vs diffusers {t}",
                    tag(&format!("step {i}"))
                ));
            }
        }
        let sample = tensor(&step["sample_in"]).expect("sample_in");
        let model_output = tensor(&step["model_output"]).expect("model_output");
        let noise = tensor(&step["noise"]);
        if let Some(want) = f32s(&step["scaled_model_input"]) {
            match sched.scale_model_input(&sample, i) {
                Ok(scaled) => compare_tensor(
                    failures,
                    &tag(&format!("step {i} scaled_model_input")),
                    &scaled,
                    &want,
                    1e-5,
                ),
                Err(e) => failures.push(format!("{}: {e}", tag("scale_model_input"))),
            }
        }
        let noise = if sched.needs_noise() { noise } else { None };
        let inputs_mag = [&step["sample_in"], &step["model_output"]]
            .iter()
            .filter_map(|v| f32s(v))
            .flatten()
            .fold(0f64, |m, v| m.max(v.abs() as f64));
        match sched.step(&model_output, i, &sample, noise.as_ref()) {
            Ok(out) => compare_tensor_scaled(
                failures,
                &tag(&format!("step {i} sample_out")),
                &out,
                &f32s(&step["sample_out"]).expect("sample_out"),
                1e-5,
                inputs_mag,
            ),
            Err(e) => failures.push(format!("{}: step {i}: {e}", tag(""))),
        }
    }

    if let Some(img) = case["img2img"].as_object() {
        let strength = img["strength"].as_f64().expect("img2img.strength");
        let want_start = img["t_start"].as_u64().expect("img2img.t_start") as usize;
        match img2img_start_index(n, strength) {
            Ok(start) => {
                if start != want_start {
                    failures.push(format!(
                        "{}: start {start} vs diffusers {want_start}",
                        tag(&format!("img2img strength {strength}"))
                    ));
                } else {
                    compare_list(
                        failures,
                        &tag(&format!("img2img strength {strength} timesteps")),
                        &sched.timesteps()[start..],
                        &f64s(&img["timesteps"]).expect("img2img.timesteps"),
                        1e-4,
                    );
                }
            }
            Err(e) => failures.push(format!("{}: {e}", tag("img2img"))),
        }
    }
}

#[test]
fn schedulers_match_diffusers_reference() {
    let path = fixture_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (generate it with the diffusers reference script)",
            path.display()
        )
    });
    let root: Value = serde_json::from_str(&quote_nonfinite_json(&text))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases = match &root {
        Value::Array(cases) => cases.clone(),
        Value::Object(obj) => obj
            .get("cases")
            .and_then(|c| c.as_array())
            .cloned()
            .expect("top-level `cases` list"),
        _ => panic!("{}: expected a list of cases", path.display()),
    };
    assert!(!cases.is_empty(), "no cases in {}", path.display());
    let mut failures = Vec::new();
    for case in &cases {
        run_case(case, &path, &mut failures);
    }
    let kinds: std::collections::BTreeSet<&str> = cases
        .iter()
        .filter_map(|c| c["scheduler"].as_str())
        .collect();
    eprintln!("{} reference cases checked ({kinds:?})", cases.len());
    assert!(
        failures.is_empty(),
        "{} mismatches against diffusers:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
