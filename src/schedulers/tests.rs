//! Unit tests of the schedulers: config parsing, names, schedules and single steps.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::schedule::{alphas_cumprod, betas};
use super::*;

/// SD 1.5's scheduler/scheduler_config.json (a PNDMScheduler config).
const SD15: &str = r#"{
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.6.0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": false,
  "skip_prk_steps": true,
  "steps_offset": 1,
  "trained_betas": null,
  "clip_sample": false
}"#;

fn sd15() -> SchedulerConfig {
    SchedulerConfig::from_json_str(SD15, Path::new("sd15/scheduler_config.json")).unwrap()
}

fn err_text(r: Result<impl std::fmt::Debug>) -> String {
    r.expect_err("expected an error").to_string()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

fn vec_of(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn config_parses_sd15_with_defaults() {
    let c = sd15();
    assert_eq!(c.num_train_timesteps, 1000);
    assert_eq!(c.beta_start, 0.00085);
    assert_eq!(c.beta_end, 0.012);
    assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
    assert_eq!(c.trained_betas, None);
    assert_eq!(c.steps_offset, 1);
    assert!(!c.set_alpha_to_one);
    assert!(!c.clip_sample);
    // defaults for keys the file lacks
    assert_eq!(c.prediction_type, PredictionType::Epsilon);
    assert_eq!(c.timestep_spacing, None);
    assert_eq!(c.clip_sample_range, 1.0);
    assert!(!c.rescale_betas_zero_snr);
    assert!(!c.use_karras_sigmas);
    assert_eq!(c.solver_order, 2);
    assert!(c.lower_order_final);
    assert_eq!(c.final_sigmas_type, FinalSigmasType::Zero);
    assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
    assert_eq!(
        c.timestep_spacing_or(SchedulerKind::Ddim.default_timestep_spacing()),
        TimestepSpacing::Leading
    );
    assert_eq!(
        c.timestep_spacing_or(SchedulerKind::Euler.default_timestep_spacing()),
        TimestepSpacing::Linspace
    );

    let empty = SchedulerConfig::from_json_str("{}", Path::new("x.json")).unwrap();
    assert_eq!(empty.beta_schedule, BetaSchedule::Linear);
    assert_eq!(empty.beta_start, 0.0001);
    assert_eq!(empty.beta_end, 0.02);
    assert!(empty.set_alpha_to_one && empty.clip_sample);
    // Another class's config without the key never clamps: DDIM read from it does not either.
    let pndm = r#"{"_class_name": "PNDMScheduler"}"#;
    let pndm = SchedulerConfig::from_json_str(pndm, Path::new("x.json")).unwrap();
    assert!(!pndm.clip_sample);
    let ddim = r#"{"_class_name": "DDIMScheduler"}"#;
    assert!(
        SchedulerConfig::from_json_str(ddim, Path::new("x.json"))
            .unwrap()
            .clip_sample
    );
    let kept = r#"{"_class_name": "PNDMScheduler", "clip_sample": true}"#;
    assert!(
        SchedulerConfig::from_json_str(kept, Path::new("x.json"))
            .unwrap()
            .clip_sample
    );
}

#[test]
fn config_reads_python_nonfinite_and_nulls() {
    let text = r#"{"lambda_min_clipped": -Infinity, "use_karras_sigmas": null,
        "variance_type": null, "timestep_spacing": "trailing", "note": "NaN and -Infinity in a string",
        "prediction_type": "v_prediction", "final_sigmas_type": "sigma_min"}"#;
    let c = SchedulerConfig::from_json_str(text, Path::new("c.json")).unwrap();
    assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
    assert!(!c.use_karras_sigmas);
    assert_eq!(c.timestep_spacing, Some(TimestepSpacing::Trailing));
    assert_eq!(c.prediction_type, PredictionType::VPrediction);
    assert_eq!(c.final_sigmas_type, FinalSigmasType::SigmaMin);
    let c = SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -5.1}"#, Path::new("c.json"))
        .unwrap();
    assert_eq!(c.lambda_min_clipped, -5.1);
    let c =
        SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": "-inf"}"#, Path::new("c.json"))
            .unwrap();
    assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
}

#[test]
fn config_errors_name_file_field_and_choices() {
    let p = Path::new("models/x/scheduler_config.json");
    let e = err_text(SchedulerConfig::from_json_str(
        r#"{"beta_schedule": "cosine"}"#,
        p,
    ));
    assert!(e.contains("models/x/scheduler_config.json"), "{e}");
    assert!(e.contains("beta_schedule"), "{e}");
    assert!(e.contains("cosine"), "{e}");
    for accepted in ["linear", "scaled_linear", "squaredcos_cap_v2"] {
        assert!(e.contains(accepted), "{e}");
    }
    let e = err_text(SchedulerConfig::from_json_str(
        r#"{"prediction_type": "eps"}"#,
        p,
    ));
    assert!(e.contains("prediction_type") && e.contains("`eps`"), "{e}");
    for accepted in ["epsilon", "v_prediction", "sample"] {
        assert!(e.contains(accepted), "{e}");
    }
    let e = err_text(SchedulerConfig::from_json_str(
        r#"{"timestep_spacing": "even"}"#,
        p,
    ));
    assert!(
        e.contains("timestep_spacing") && e.contains("trailing"),
        "{e}"
    );
    let e = err_text(SchedulerConfig::from_json_str(
        r#"{"num_train_timesteps": "many"}"#,
        p,
    ));
    assert!(
        e.contains("num_train_timesteps") && e.contains("integer"),
        "{e}"
    );
    let e = err_text(SchedulerConfig::from_json_str(r#"{"beta_start": true}"#, p));
    assert!(e.contains("beta_start"), "{e}");
    let e = err_text(SchedulerConfig::from_json_str(
        r#"{"trained_betas": [0.1, 0.2]}"#,
        p,
    ));
    assert!(e.contains("trained_betas") && e.contains("1000"), "{e}");
    let e = err_text(SchedulerConfig::from_json_str("[1, 2]", p));
    assert!(e.contains("JSON object"), "{e}");
    let e = err_text(SchedulerConfig::from_json_str("{", p));
    assert!(e.contains("not valid JSON"), "{e}");
}

#[test]
fn config_from_file_reports_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    let e = err_text(SchedulerConfig::from_file(&path));
    assert!(e.contains("scheduler_config.json"), "{e}");
    std::fs::write(&path, SD15).unwrap();
    assert_eq!(SchedulerConfig::from_file(&path).unwrap().steps_offset, 1);
}

#[test]
fn kind_names_parse_and_display() {
    for (name, kind, webui) in [
        ("ddim", SchedulerKind::Ddim, "DDIM"),
        ("euler", SchedulerKind::Euler, "Euler"),
        ("euler-a", SchedulerKind::EulerAncestral, "Euler a"),
        ("dpmpp-2m", SchedulerKind::DpmPlusPlus2M, "DPM++ 2M"),
    ] {
        assert_eq!(name.parse::<SchedulerKind>().unwrap(), kind);
        assert_eq!(kind.to_string(), name);
        assert_eq!(kind.webui_name(), webui);
        assert_eq!(webui.parse::<SchedulerKind>().unwrap(), kind);
    }
    let e = "lms".parse::<SchedulerKind>().unwrap_err();
    assert!(matches!(e, Error::Value { .. }));
    assert_eq!(
        e.to_string(),
        "invalid scheduler: unknown scheduler `lms`: expected one of ddim, euler, euler-a, dpmpp-2m"
    );
}

#[test]
fn linear_and_scaled_linear_betas() {
    let c = SchedulerConfig::default();
    let b = betas(&c).unwrap();
    assert_eq!(b.len(), 1000);
    assert_eq!(b[0], 0.0001f32);
    assert_eq!(b[999], 0.02f32);
    assert!(close(b[1] as f64, 0.0001 + (0.02 - 0.0001) / 999.0, 1e-6));

    let c = sd15();
    let b = betas(&c).unwrap();
    assert!(close(b[0] as f64, 0.00085, 1e-6));
    assert!(close(b[999] as f64, 0.012, 1e-6));
    let mid = (0.00085f64.sqrt() + 500.0 * (0.012f64.sqrt() - 0.00085f64.sqrt()) / 999.0).powi(2);
    assert!(close(b[500] as f64, mid, 1e-6), "{} vs {mid}", b[500]);
    // SD 1.5's well-known alphas_cumprod endpoints
    let ac = alphas_cumprod(&c, false).unwrap();
    assert!(close(ac[0] as f64, 0.99915, 1e-6));
    assert!(
        (ac[999] as f64 - 1.0 / (1.0 + 14.614642f64.powi(2))).abs() < 1e-7,
        "{}",
        ac[999]
    );
}

#[test]
fn squaredcos_cap_v2_betas_are_finite_and_correct() {
    let c = SchedulerConfig {
        beta_schedule: BetaSchedule::SquaredcosCapV2,
        ..Default::default()
    };
    let b = betas(&c).unwrap();
    assert_eq!(b.len(), 1000);
    assert!(b.iter().all(|x| x.is_finite() && *x > 0.0 && *x <= 0.999));
    // by hand: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2, beta_i = 1 - ab((i+1)/T) / ab(i/T)
    let ab = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    for i in [0usize, 1, 500, 998] {
        let want = 1.0 - ab((i + 1) as f64 / 1000.0) / ab(i as f64 / 1000.0);
        assert!(
            close(b[i] as f64, want, 1e-6),
            "beta[{i}] {} vs {want}",
            b[i]
        );
    }
    // the same values written out (computed with Python's math module)
    assert!(close(b[0] as f64, 4.128422482196914e-05, 1e-6));
    assert!(close(b[1] as f64, 4.614175273665033e-05, 1e-6));
    assert!(close(b[500] as f64, 0.003155691441585007, 1e-6));
    assert!(close(b[998] as f64, 0.7499993929011166, 1e-6));
    assert_eq!(b[999], 0.999f32); // capped
    let ac = alphas_cumprod(&c, false).unwrap();
    assert!(ac.iter().all(|x| x.is_finite()));
}

#[test]
fn zero_snr_rescaling_ends_at_zero() {
    let c = SchedulerConfig {
        rescale_betas_zero_snr: true,
        ..sd15()
    };
    let ac = alphas_cumprod(&c, false).unwrap();
    assert_eq!(ac[999], 0.0);
    let plain = alphas_cumprod(&sd15(), false).unwrap();
    assert!(close(ac[0] as f64, plain[0] as f64, 1e-6));
    let floored = alphas_cumprod(&c, true).unwrap();
    assert_eq!(floored[999], 2f32.powi(-24));
}

#[test]
fn ddim_sd15_50_steps_timesteps() {
    let s = build(
        SchedulerKind::Ddim,
        &sd15(),
        50,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let want: Vec<f64> = (0..50).rev().map(|i| (i * 20 + 1) as f64).collect();
    assert_eq!(s.timesteps(), &want[..]);
    assert_eq!(s.timesteps()[0], 981.0);
    assert_eq!(s.timesteps()[1], 961.0);
    assert_eq!(*s.timesteps().last().unwrap(), 1.0);
    assert!(s.sigmas().is_none());
    assert_eq!(s.init_noise_sigma(), 1.0);
    assert!(!s.needs_noise());
    let ac = alphas_cumprod(&sd15(), false).unwrap();
    assert_eq!(s.alpha_bar(0), ac[981] as f64);
}

#[test]
fn missing_timestep_spacing_takes_each_class_default() {
    // X.from_config(PNDMScheduler(sd15).config) in diffusers 0.42.1, 10 steps
    let ts = |kind| {
        build(kind, &sd15(), 10, &SchedulerOptions::default())
            .unwrap()
            .timesteps()[..4]
            .to_vec()
    };
    assert_eq!(ts(SchedulerKind::Ddim), [901.0, 801.0, 701.0, 601.0]);
    assert_eq!(ts(SchedulerKind::Euler), [999.0, 888.0, 777.0, 666.0]);
    assert_eq!(
        ts(SchedulerKind::EulerAncestral),
        [999.0, 888.0, 777.0, 666.0]
    );
    assert_eq!(
        ts(SchedulerKind::DpmPlusPlus2M),
        [999.0, 899.0, 799.0, 699.0]
    );
}

#[test]
fn alpha_bar_past_the_end() {
    let o = SchedulerOptions::default();
    let s = build(SchedulerKind::Ddim, &sd15(), 10, &o).unwrap();
    let ac = alphas_cumprod(&sd15(), false).unwrap();
    assert_eq!(s.alpha_bar(10), ac[0] as f64); // set_alpha_to_one false
    for kind in [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPlusPlus2M,
    ] {
        let s = build(kind, &sd15(), 10, &o).unwrap();
        assert_eq!(s.alpha_bar(10), 1.0);
        assert_eq!(s.alpha_bar(99), 1.0);
    }
}

#[test]
fn spacings_follow_diffusers() {
    let trailing = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Trailing),
        ..sd15()
    };
    let s = build(
        SchedulerKind::Ddim,
        &trailing,
        10,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(
        s.timesteps(),
        &[999.0, 899.0, 799.0, 699.0, 599.0, 499.0, 399.0, 299.0, 199.0, 99.0]
    );
    let s = build(
        SchedulerKind::Ddim,
        &trailing,
        3,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(s.timesteps(), &[999.0, 666.0, 332.0]);
    let linspace = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Linspace),
        ..sd15()
    };
    let s = build(
        SchedulerKind::Ddim,
        &linspace,
        4,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(s.timesteps(), &[999.0, 666.0, 333.0, 0.0]);

    // Euler defaults to linspace: fractional timesteps
    let s = build(
        SchedulerKind::Euler,
        &sd15(),
        50,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let ts = s.timesteps();
    assert_eq!(ts.len(), 50);
    assert_eq!(ts[0], 999.0);
    assert_eq!(ts[1], (48.0 * (999.0f64 / 49.0)) as f32 as f64);
    assert_eq!(ts[49], 0.0);
    let sig = s.sigmas().unwrap();
    assert_eq!(sig.len(), 51);
    assert!((sig[0] - 14.614642).abs() < 1e-4, "{}", sig[0]);
    assert!((sig[49] - 0.029167).abs() < 1e-5, "{}", sig[49]);
    assert_eq!(sig[50], 0.0);
    assert_eq!(s.init_noise_sigma(), sig[0]);

    // leading Euler: init sigma is sqrt(max^2 + 1)
    let leading = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Leading),
        ..sd15()
    };
    let s = build(
        SchedulerKind::EulerAncestral,
        &leading,
        50,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(s.timesteps()[0], 981.0);
    let max = s.sigmas().unwrap()[0];
    assert!(close(s.init_noise_sigma(), (max * max + 1.0).sqrt(), 1e-6));

    // DPM linspace: rounded, half to even (499.5 -> 500)
    let s = build(
        SchedulerKind::DpmPlusPlus2M,
        &sd15(),
        20,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(
        s.timesteps(),
        &[
            999.0, 949.0, 899.0, 849.0, 799.0, 749.0, 699.0, 649.0, 599.0, 549.0, 500.0, 450.0,
            400.0, 350.0, 300.0, 250.0, 200.0, 150.0, 100.0, 50.0
        ]
    );
    assert_eq!(s.sigmas().unwrap().len(), 21);
    assert_eq!(s.init_noise_sigma(), 1.0);
    // DPM leading: step ratio over n + 1
    let s = build(
        SchedulerKind::DpmPlusPlus2M,
        &leading,
        50,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert_eq!(s.timesteps()[0], 951.0);
    assert_eq!(s.timesteps()[49], 20.0);
}

#[test]
fn step_count_errors() {
    for kind in SchedulerKind::ALL {
        let e = err_text(build(kind, &sd15(), 0, &SchedulerOptions::default()).map(|_| ()));
        assert!(e.contains("steps"), "{e}");
        let e = err_text(build(kind, &sd15(), 1001, &SchedulerOptions::default()).map(|_| ()));
        assert!(e.contains("1001") && e.contains("1000"), "{e}");
        let no_offset = SchedulerConfig {
            steps_offset: 0,
            ..sd15()
        };
        assert!(build(kind, &no_offset, 1000, &SchedulerOptions::default()).is_ok());
        assert!(build(kind, &sd15(), 1, &SchedulerOptions::default()).is_ok());
    }
}

#[test]
fn out_of_range_timesteps_error() {
    // leading spacing with steps_offset 1 and 1000 steps would ask for alphas_cumprod[1000]
    let e = err_text(
        build(
            SchedulerKind::Ddim,
            &sd15(),
            1000,
            &SchedulerOptions::default(),
        )
        .map(|_| ()),
    );
    assert!(e.contains("1000") && e.contains("steps_offset"), "{e}");
}

#[test]
fn unsupported_settings_error_clearly() {
    let e = err_text(
        build(
            SchedulerKind::EulerAncestral,
            &SchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..sd15()
            },
            20,
            &SchedulerOptions::default(),
        )
        .map(|_| ()),
    );
    assert!(
        e.contains("prediction_type") && e.contains("euler-a"),
        "{e}"
    );
    let e = err_text(
        build(
            SchedulerKind::DpmPlusPlus2M,
            &SchedulerConfig {
                algorithm_type: AlgorithmType::SdeDpmSolverPlusPlus,
                ..sd15()
            },
            20,
            &SchedulerOptions::default(),
        )
        .map(|_| ()),
    );
    assert!(e.contains("sde-dpmsolver++"), "{e}");
    let e = err_text(
        build(
            SchedulerKind::Euler,
            &SchedulerConfig {
                use_exponential_sigmas: true,
                ..sd15()
            },
            20,
            &SchedulerOptions::default(),
        )
        .map(|_| ()),
    );
    assert!(e.contains("use_exponential_sigmas"), "{e}");
    let e = err_text(
        build(
            SchedulerKind::Ddim,
            &sd15(),
            20,
            &SchedulerOptions { eta: -1.0 },
        )
        .map(|_| ()),
    );
    assert!(e.contains("eta"), "{e}");
}

#[test]
fn karras_sigmas_span_the_training_range() {
    let c = SchedulerConfig {
        use_karras_sigmas: true,
        ..sd15()
    };
    let s = build(
        SchedulerKind::DpmPlusPlus2M,
        &c,
        20,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let sig = s.sigmas().unwrap();
    assert_eq!(sig.len(), 21);
    assert!((sig[0] - 14.614642).abs() < 1e-4);
    assert!((sig[19] - 0.029167).abs() < 1e-5);
    assert_eq!(s.timesteps()[0], 999.0);
    assert_eq!(s.timesteps()[19], 0.0);
    assert!(s.timesteps().iter().all(|t| t.fract() == 0.0));
    let s = build(SchedulerKind::Euler, &c, 20, &SchedulerOptions::default()).unwrap();
    assert!((s.timesteps()[0] - 999.0).abs() < 1e-3);
    assert!(s.timesteps()[10].fract() != 0.0);
}

#[test]
fn img2img_start_index_matches_get_timesteps() {
    assert_eq!(img2img_start_index(50, 0.75).unwrap(), 13); // int(37.5) = 37
    assert_eq!(img2img_start_index(10, 0.7).unwrap(), 3); // 7.000000000000001 -> 7
    assert_eq!(img2img_start_index(100, 0.29).unwrap(), 72); // 28.999999999999996 -> 28
    assert_eq!(img2img_start_index(20, 1.0).unwrap(), 0);
    for bad in [0.0, -0.5, 1.01, f64::NAN] {
        let e = img2img_start_index(20, bad).unwrap_err();
        assert!(matches!(e, Error::Value { .. }), "{e}");
        assert!(e.to_string().contains("strength"));
    }
    assert!(img2img_start_index(10, 0.05).is_err());
}

fn tensors(vals: &[f32]) -> Tensor {
    Tensor::from_slice(vals, (1, 1, 1, vals.len()), &Device::Cpu).unwrap()
}

#[test]
fn ddim_step_by_hand() {
    let c = sd15();
    let mut s = build(SchedulerKind::Ddim, &c, 50, &SchedulerOptions::default()).unwrap();
    let ac = alphas_cumprod(&c, false).unwrap();
    let (x, eps) = (0.5f64, -0.25f64);
    let out = s
        .step(&tensors(&[eps as f32]), 0, &tensors(&[x as f32]), None)
        .unwrap();
    let (a_t, a_prev) = (ac[981] as f64, ac[961] as f64);
    let x0 = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt();
    let want = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps;
    assert!(close(vec_of(&out)[0] as f64, want, 1e-6));
    // the last step goes to final_alpha_cumprod = alphas_cumprod[0] (set_alpha_to_one false)
    let out = s
        .step(&tensors(&[eps as f32]), 49, &tensors(&[x as f32]), None)
        .unwrap();
    let (a_t, a_prev) = (ac[1] as f64, ac[0] as f64);
    let x0 = (x - (1.0 - a_t).sqrt() * eps) / a_t.sqrt();
    let want = a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * eps;
    assert!(close(vec_of(&out)[0] as f64, want, 1e-6));
    let px0 = s
        .predict_x0(&tensors(&[eps as f32]), 49, &tensors(&[x as f32]))
        .unwrap();
    assert!(close(vec_of(&px0)[0] as f64, x0, 1e-6));

    // eta > 0 needs noise
    let mut s = build(SchedulerKind::Ddim, &c, 50, &SchedulerOptions { eta: 1.0 }).unwrap();
    assert!(s.needs_noise());
    assert!(s.step(&tensors(&[0.1]), 0, &tensors(&[0.2]), None).is_err());
    assert!(s
        .step(
            &tensors(&[0.1]),
            0,
            &tensors(&[0.2]),
            Some(&tensors(&[1.0]))
        )
        .is_ok());
    assert!(s
        .step(
            &tensors(&[0.1]),
            50,
            &tensors(&[0.2]),
            Some(&tensors(&[1.0]))
        )
        .is_err());
}

#[test]
fn euler_steps_by_hand() {
    let c = sd15();
    let mut s = build(SchedulerKind::Euler, &c, 20, &SchedulerOptions::default()).unwrap();
    assert!(s
        .step(
            &tensors(&[0.1]),
            0,
            &tensors(&[0.2]),
            Some(&tensors(&[1.0]))
        )
        .is_err());
    let sig = s.sigmas().unwrap().to_vec();
    let (x, eps) = (3.0f64, 0.7f64);
    let scaled = s.scale_model_input(&tensors(&[x as f32]), 0).unwrap();
    assert!(close(
        vec_of(&scaled)[0] as f64,
        x / (sig[0] * sig[0] + 1.0).sqrt(),
        1e-6
    ));
    let out = s
        .step(&tensors(&[eps as f32]), 0, &tensors(&[x as f32]), None)
        .unwrap();
    assert!(close(
        vec_of(&out)[0] as f64,
        x + eps * (sig[1] - sig[0]),
        1e-6
    ));
    assert!(close(s.alpha_bar(3), 1.0 / (1.0 + sig[3] * sig[3]), 1e-12));

    let mut s = build(
        SchedulerKind::EulerAncestral,
        &c,
        20,
        &SchedulerOptions::default(),
    )
    .unwrap();
    assert!(s.needs_noise());
    assert!(s.step(&tensors(&[0.1]), 0, &tensors(&[0.2]), None).is_err());
    let (from, to) = (sig[0], sig[1]);
    let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
    let down = (to * to - up * up).sqrt();
    let z = -1.3f64;
    let out = s
        .step(
            &tensors(&[eps as f32]),
            0,
            &tensors(&[x as f32]),
            Some(&tensors(&[z as f32])),
        )
        .unwrap();
    assert!(close(
        vec_of(&out)[0] as f64,
        x + eps * (down - from) + z * up,
        1e-6
    ));
    // the last step lands on x0 exactly
    let out = s
        .step(
            &tensors(&[eps as f32]),
            19,
            &tensors(&[x as f32]),
            Some(&tensors(&[z as f32])),
        )
        .unwrap();
    assert!(close(vec_of(&out)[0] as f64, x - sig[19] * eps, 1e-6));
}

#[test]
fn dpm_second_order_by_hand() {
    let c = sd15();
    let mut s = build(
        SchedulerKind::DpmPlusPlus2M,
        &c,
        20,
        &SchedulerOptions::default(),
    )
    .unwrap();
    let sig = s.sigmas().unwrap().to_vec();
    let parts = |sg: f64| {
        let a = 1.0 / (sg * sg + 1.0).sqrt();
        (a, sg * a, (a / (sg * a)).ln())
    };
    let x0_of = |x: f64, e: f64, sg: f64| {
        let (a, st, _) = parts(sg);
        (x - st * e) / a
    };
    let (x_a, e_a, x_b, e_b) = (2.0f64, 0.3f64, 1.5f64, -0.2f64);
    // first step: first order
    let out = s
        .step(&tensors(&[e_a as f32]), 0, &tensors(&[x_a as f32]), None)
        .unwrap();
    let (a1, s1, l1) = parts(sig[1]);
    let (_, s0, l0) = parts(sig[0]);
    let m0 = x0_of(x_a, e_a, sig[0]);
    let h = l1 - l0;
    let want = s1 / s0 * x_a - a1 * ((-h).exp() - 1.0) * m0;
    assert!(close(vec_of(&out)[0] as f64, want, 1e-5));
    // second step: second order with the history
    let out = s
        .step(&tensors(&[e_b as f32]), 1, &tensors(&[x_b as f32]), None)
        .unwrap();
    let (a2, s2, l2) = parts(sig[2]);
    let m1 = x0_of(x_b, e_b, sig[1]);
    let (h, h0) = (l2 - l1, l1 - l0);
    let d1 = (m1 - m0) * h / h0;
    let em1 = (-h).exp() - 1.0;
    let want = s2 / s1 * x_b - a2 * em1 * m1 - 0.5 * a2 * em1 * d1;
    assert!(
        close(vec_of(&out)[0] as f64, want, 1e-5),
        "{} vs {want}",
        vec_of(&out)[0]
    );
    // the final step (sigma 0) returns x0
    let out = s
        .step(&tensors(&[e_b as f32]), 19, &tensors(&[x_b as f32]), None)
        .unwrap();
    assert!(close(
        vec_of(&out)[0] as f64,
        x0_of(x_b, e_b, sig[19]),
        1e-5
    ));
    let add = s.add_noise(&tensors(&[1.0]), &tensors(&[2.0]), 0).unwrap();
    let (a, st, _) = parts(sig[0]);
    assert!(close(vec_of(&add)[0] as f64, a + 2.0 * st, 1e-6));
}

#[test]
fn half_precision_inputs_work() {
    let shape = (1, 4, 8, 8);
    let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let e = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    let z = Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    for kind in SchedulerKind::ALL {
        for dtype in [DType::F16, DType::BF16] {
            let mut s = build(kind, &sd15(), 10, &SchedulerOptions::default()).unwrap();
            let mut s32 = build(kind, &sd15(), 10, &SchedulerOptions::default()).unwrap();
            for i in 0..3 {
                let noise = s.needs_noise().then(|| z.to_dtype(dtype).unwrap());
                let xin = x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let ein = e.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
                let zin = noise.as_ref().map(|n| n.to_dtype(DType::F32).unwrap());
                let scaled = s.scale_model_input(&x.to_dtype(dtype).unwrap(), i).unwrap();
                assert_eq!(scaled.dtype(), dtype);
                let out = s
                    .step(
                        &e.to_dtype(dtype).unwrap(),
                        i,
                        &x.to_dtype(dtype).unwrap(),
                        noise.as_ref(),
                    )
                    .unwrap();
                assert_eq!(out.dtype(), dtype);
                let want = s32.step(&ein, i, &xin, zin.as_ref()).unwrap();
                let got = vec_of(&out);
                let want = vec_of(&want);
                let mag = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                let tol = if dtype == DType::F16 { 2e-3 } else { 1e-2 } * mag;
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= tol,
                        "{kind} {dtype:?} step {i}: {g} vs {w}"
                    );
                }
            }
        }
    }
}

#[test]
fn auto_picks_the_model_class_or_falls_back_to_ddim() {
    let with_class = |class: Option<&str>| SchedulerConfig {
        class_name: class.map(String::from),
        ..sd15()
    };
    for kind in SchedulerKind::ALL {
        let r = SchedulerChoice::Auto.resolve(&with_class(Some(kind.diffusers_class())));
        assert_eq!(r.kind, kind);
        let reason = r.reason.unwrap();
        assert!(reason.contains(kind.diffusers_class()), "{reason}");
    }
    // SD 1.5 ships PNDM, which artguide lacks.
    assert_eq!(sd15().class_name.as_deref(), Some("PNDMScheduler"));
    let r = SchedulerChoice::Auto.resolve(&sd15());
    assert_eq!(r.kind, SchedulerKind::Ddim);
    assert!(r
        .reason
        .unwrap()
        .contains("PNDMScheduler is not implemented"));
    let r = SchedulerChoice::Auto.resolve(&with_class(None));
    assert_eq!(r.kind, SchedulerKind::Ddim);
    assert!(r.reason.unwrap().contains("no _class_name"));
    // A kind asked for by name wins over the file's class, and needs no explanation.
    let named = SchedulerChoice::Kind(SchedulerKind::DpmPlusPlus2M)
        .resolve(&with_class(Some("EulerDiscreteScheduler")));
    assert_eq!(named.kind, SchedulerKind::DpmPlusPlus2M);
    assert_eq!(named.reason, None);
}

#[test]
fn scheduler_choice_parses_auto_and_names() {
    assert_eq!(
        "auto".parse::<SchedulerChoice>().unwrap(),
        SchedulerChoice::Auto
    );
    assert_eq!(
        " AUTO ".parse::<SchedulerChoice>().unwrap(),
        SchedulerChoice::Auto
    );
    assert_eq!(
        "Euler a".parse::<SchedulerChoice>().unwrap(),
        SchedulerChoice::Kind(SchedulerKind::EulerAncestral)
    );
    let e = err_text("plms".parse::<SchedulerChoice>());
    assert!(
        e.contains("`plms`") && e.contains("expected auto, ddim"),
        "{e}"
    );
    assert_eq!(SchedulerChoice::Auto.to_string(), "auto");
}
