//! Linear-layer GEMM throughput at CLIP's and SD's shapes: artguide's `Linear` kernel against
//! candle's `Linear` (the `gemm` crate, then a bias pass), interleaved in one process:
//! `cargo run --release --example gemmbench`.
use artguide::kernels::linear::Linear;
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
    println!("| rows | in | out | candle GFLOP/s | artguide GFLOP/s | speed-up |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (rows, inp, out, what) in [
        (
            16 * 257usize,
            1024usize,
            4096usize,
            "ViT-L/14 fc1, batch 16",
        ),
        (16 * 257, 4096, 1024, "ViT-L/14 fc2"),
        (16 * 257, 1024, 1024, "ViT-L/14 out_proj"),
        (16 * 50, 768, 3072, "ViT-B/32 fc1, batch 16"),
        (2 * 4096, 320, 2560, "SD UNet GEGLU proj, 512"),
        (77, 768, 3072, "CLIP text fc1, one prompt"),
    ] {
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.05, (out, inp), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.05, out, &dev).unwrap();
        let theirs = candle_nn::Linear::new(w.clone(), Some(b.clone()));
        let ours = Linear::new(candle_nn::Linear::new(w, Some(b))).unwrap();
        let reps = 3;
        let (mut tc, mut to) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..2 {
            tc = tc.min(time(reps, || {
                theirs.forward(&x).unwrap();
            }));
            to = to.min(time(reps, || {
                ours.forward(&x).unwrap();
            }));
        }
        let flops = 2.0 * (rows * inp * out) as f64;
        println!(
            "| {rows} | {inp} | {out} | {:.1} | {:.1} | {:.2} ({what}) |",
            flops / tc / 1e9,
            flops / to / 1e9,
            tc / to
        );
    }
}
