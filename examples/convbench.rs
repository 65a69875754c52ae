//! Per-layer timing of the CPU convolution paths at Stable Diffusion's shapes:
//! `cargo run --release --example convbench`.
use artguide::kernels::conv::{composed, conv2d, Conv2d};
use candle_core::{Device, Module, Tensor};
use std::time::Instant;

fn time(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let s = Instant::now();
    for _ in 0..reps {
        f();
    }
    s.elapsed().as_secs_f64() / reps as f64
}

fn main() {
    let dev = Device::Cpu;
    for (b, c, hw) in [
        (2usize, 320usize, 64usize),
        (2, 640, 32),
        (2, 1280, 16),
        (1, 512, 64),
        (1, 512, 128),
        (1, 256, 256),
        (1, 128, 512),
    ] {
        let x = Tensor::randn(0f32, 1.0, (b, c, hw, hw), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (c, c, 3, 3), &dev).unwrap();
        let layer = Conv2d::from_parts(w.clone(), None, 1, 1);
        let reps = if hw >= 128 { 1 } else { 3 };
        let flop = 2.0 * (b * c * c * 9 * hw * hw) as f64 / 1e9;
        let t_layer = time(reps, || drop(layer.forward(&x).unwrap()));
        let t_strips = time(reps, || drop(conv2d(&x, &w, None, 1, 1).unwrap()));
        let t_candle = time(reps, || drop(composed(&x, &w, None, 1, 1).unwrap()));
        println!(
            "b={b} c={c} {hw}x{hw}: layer {t_layer:.3} s ({:.0} direct-equivalent GFLOP/s), strips {t_strips:.3} s, candle {t_candle:.3} s",
            flop / t_layer
        );
    }
}
