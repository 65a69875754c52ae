use super::*;
use candle_core::Device;

#[test]
fn text_targets_parse_with_optional_weight() {
    let t: TextTarget = "a cubist painting".parse().unwrap();
    assert_eq!((t.text.as_str(), t.weight), ("a cubist painting", 1.0));
    let t: TextTarget = "blurry, low quality:-0.5".parse().unwrap();
    assert_eq!((t.text.as_str(), t.weight), ("blurry, low quality", -0.5));
    // A colon followed by text is part of the prompt.
    let t: TextTarget = "style: baroque".parse().unwrap();
    assert_eq!((t.text.as_str(), t.weight), ("style: baroque", 1.0));
    let e = "x:inf".parse::<TextTarget>().unwrap_err().to_string();
    assert!(e.contains("clip-prompt") && e.contains("finite"), "{e}");
    // Anything after the last colon that is not a number stays text (`commands` says how
    // each prompt with a colon was read).
    let t: TextTarget = "smiley face :-)".parse().unwrap();
    assert_eq!((t.text.as_str(), t.weight), ("smiley face :-)", 1.0));
    // Readings that may not be what was meant are described; the plain forms are not.
    for plain in ["blurry:-0.5", "style: baroque", "smiley face :-)", "a cat"] {
        assert_eq!(TextTarget::ambiguity(plain), None, "{plain}");
    }
    let a = TextTarget::ambiguity("ratio 16:9").unwrap();
    assert!(a.contains("text `ratio 16` with weight 9"), "{a}");
    let a = TextTarget::ambiguity("blurry:-0.5x").unwrap();
    assert!(a.contains("`-0.5x` is not a number"), "{a}");
}

#[test]
fn guided_steps_follow_range_and_stride() {
    let mut c = GuidanceConfig::default();
    assert!(c.guided_steps(4).iter().all(|&g| g));
    c.start = 0.25;
    c.end = 0.9;
    c.every = 2;
    // Steps 0..10: range [2.5, 9) -> first 3, then 5, 7.
    let got: Vec<usize> = c
        .guided_steps(10)
        .iter()
        .enumerate()
        .filter(|(_, &g)| g)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(got, vec![3, 5, 7]);
}

#[test]
fn validation_names_the_option() {
    let cases: Vec<(GuidanceConfig, &str)> = vec![
        (
            GuidanceConfig {
                every: 0,
                ..Default::default()
            },
            "guide-every",
        ),
        (
            GuidanceConfig {
                start: 0.8,
                end: 0.5,
                ..Default::default()
            },
            "guide-start",
        ),
        (
            GuidanceConfig {
                cutouts: 1000,
                ..Default::default()
            },
            "cutouts",
        ),
        (
            GuidanceConfig {
                scale: f64::NAN,
                ..Default::default()
            },
            "clip-guidance-scale",
        ),
        (
            GuidanceConfig {
                prompts: vec!["x".parse().unwrap()],
                ..Default::default()
            },
            "--clip",
        ),
        (
            GuidanceConfig {
                clamp: Some(-1.0),
                ..Default::default()
            },
            "guide-clamp",
        ),
    ];
    for (cfg, needle) in cases {
        let e = cfg.validate().unwrap_err().to_string();
        assert!(e.contains(needle), "expected `{needle}` in: {e}");
    }
}

#[test]
fn scale_zero_is_inactive() {
    let mut c = GuidanceConfig {
        clip: Some("clip".into()),
        prompts: vec!["x".parse().unwrap()],
        ..Default::default()
    };
    assert!(c.is_active());
    c.scale = 0.0;
    assert!(!c.is_active());
    c.tv_weight = 1.0;
    assert!(c.is_active());
}

#[test]
fn shift_moves_x0_by_minus_sigma_squared_g_for_every_prediction_type() {
    // x_t = sqrt(ab) x0 + sqrt(1 - ab) eps (DDIM space); check the x0 implied by the shifted
    // prediction for each parameterisation.
    let ab: f64 = 0.3;
    let (sa, sb) = (ab.sqrt(), (1.0 - ab).sqrt());
    let sigma2 = (1.0 - ab) / ab;
    let dev = Device::Cpu;
    let x0 = Tensor::new(&[0.5f64, -1.0, 2.0], &dev).unwrap();
    let eps = Tensor::new(&[0.1f64, 0.7, -0.4], &dev).unwrap();
    let g = Tensor::new(&[1.0f64, -2.0, 0.5], &dev).unwrap();
    let xt = ((&x0 * sa).unwrap() + (&eps * sb).unwrap()).unwrap();
    let want = (&x0 - (&g * sigma2).unwrap()).unwrap();
    let v = ((&eps * sa).unwrap() - (&x0 * sb).unwrap()).unwrap();
    let x0_from = |p: PredictionType, out: &Tensor| -> Tensor {
        match p {
            PredictionType::Epsilon => ((&xt - (out * sb).unwrap()).unwrap() / sa).unwrap(),
            PredictionType::VPrediction => ((&xt * sa).unwrap() - (out * sb).unwrap()).unwrap(),
            PredictionType::Sample => out.clone(),
        }
    };
    for (p, pred) in [
        (PredictionType::Epsilon, eps.clone()),
        (PredictionType::VPrediction, v.clone()),
        (PredictionType::Sample, x0.clone()),
    ] {
        let shifted = shift_prediction(&pred, &g, p, ab).unwrap();
        let got = x0_from(p, &shifted);
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-12, "{p:?}: {d}");
    }
}

#[test]
fn default_style_layers_spread_over_depth() {
    assert_eq!(default_style_layers(12), vec![2, 5, 8]);
    assert_eq!(default_style_layers(2), vec![0]);
}

#[test]
fn gram_loss_is_a_mean_over_views() {
    let dev = Device::Cpu;
    let f = Tensor::new(&[[[1f64, 2.0], [3.0, 5.0], [0.5, -1.0]]], &dev).unwrap();
    let g = Tensor::new(&[[[1f64, 0.5], [0.5, 2.0]]], &dev).unwrap();
    let one = relative_error(&losses::gram(&f).unwrap(), &g).unwrap();
    let eight = Tensor::cat(&[&f; 8], 0).unwrap();
    let many = relative_error(&losses::gram(&eight).unwrap(), &g).unwrap();
    let (one, many) = (
        one.to_scalar::<f64>().unwrap(),
        many.to_scalar::<f64>().unwrap(),
    );
    assert!(one > 0.1 && (one - many).abs() < 1e-12, "{one} vs {many}");
    // Same shapes (the content term): the plain ratio.
    let b = (&f * 2.0).unwrap();
    let r = relative_error(&f, &b).unwrap().to_scalar::<f64>().unwrap();
    assert!((r - 0.25).abs() < 1e-12, "{r}");
}
