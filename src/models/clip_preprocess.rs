//! CLIP image preprocessing, bit-compatible with transformers 5.x `CLIPImageProcessor`
//! (torchvision backend) for 8-bit images:
//!
//! 1. RGB conversion: alpha composited onto opaque white (`(c*a + 255*(255-a) + 127) / 255`),
//!    grayscale replicated; no EXIF rotation (as for a PIL image handed to the processor).
//! 2. Shortest edge resized to `shortest_edge`, the long edge to `floor(S * long / short)`.
//! 3. torch's uint8 antialiased bicubic resize (int16 weights, width pass first).
//! 4. Center crop (`top = floor((h - crop_h) / 2)`, `left = floor((w - crop_w) / 2)`).
//! 5. `(u8 - f32(mean) * 255) / (f32(std) * 255)` in f32.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde_json::Value;

use crate::{Error, Result};

/// The settings of a `preprocessor_config.json` that the CLIP image preprocessing uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipPreprocessor {
    /// Target length of the shorter image side after the resize (`size.shortest_edge`).
    pub shortest_edge: usize,
    /// Height of the center crop (`crop_size.height`).
    pub crop_h: usize,
    /// Width of the center crop (`crop_size.width`).
    pub crop_w: usize,
    /// Per-channel mean (`image_mean`, R, G, B), in [0, 1] units.
    pub mean: [f32; 3],
    /// Per-channel standard deviation (`image_std`, R, G, B), in [0, 1] units.
    pub std: [f32; 3],
}

/// The mean and std of OpenAI CLIP (`OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// See [`OPENAI_CLIP_MEAN`].
pub const OPENAI_CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

fn positive_size(v: &Value, path: &Path, field: &str) -> Result<usize> {
    match v.as_u64() {
        Some(n) if n > 0 && n <= 1 << 20 => Ok(n as usize),
        _ => Err(Error::field(
            path,
            field,
            format!("expected a positive integer, found {v}"),
        )),
    }
}

fn triple(v: Option<&Value>, path: &Path, field: &str, default: [f32; 3]) -> Result<[f32; 3]> {
    let Some(v) = v else { return Ok(default) };
    let bad = || {
        Error::field(
            path,
            field,
            format!("expected 3 numbers (R, G, B), found {v}"),
        )
    };
    let arr = v.as_array().ok_or_else(bad)?;
    if arr.len() != 3 {
        return Err(bad());
    }
    let mut out = [0f32; 3];
    for (o, x) in out.iter_mut().zip(arr) {
        let f = x.as_f64().ok_or_else(bad)?;
        if !f.is_finite() {
            return Err(bad());
        }
        *o = f as f32;
    }
    Ok(out)
}

impl ClipPreprocessor {
    /// Reads a Hugging Face `preprocessor_config.json`. `size` may be `{"shortest_edge": n}`
    /// or a bare integer; `crop_size` `{"height": h, "width": w}` or an integer (default: the
    /// shortest edge). `image_mean` / `image_std` default to OpenAI CLIP's. Settings this
    /// preprocessing does not implement (`do_resize`, `do_center_crop`, `do_rescale`,
    /// `do_normalize` false, a resample other than bicubic, a rescale factor other than
    /// 1/255) are refused, naming the field.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))?;
        Self::from_json(&v, path)
    }

    /// Reads `dir/preprocessor_config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("preprocessor_config.json"))
    }

    /// Parses the JSON of a `preprocessor_config.json`; `path` is used in errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::file(path, "expected a JSON object"));
        }
        for flag in ["do_resize", "do_center_crop", "do_rescale", "do_normalize"] {
            match v.get(flag) {
                None | Some(Value::Null) | Some(Value::Bool(true)) => {}
                Some(other) => {
                    return Err(Error::field(
                        path,
                        flag,
                        format!("only `true` is supported, found {other}"),
                    ))
                }
            }
        }
        if let Some(r) = v.get("resample") {
            if r.as_u64() != Some(3) {
                return Err(Error::field(
                    path,
                    "resample",
                    format!("only 3 (bicubic) is supported, found {r}"),
                ));
            }
        }
        if let Some(r) = v.get("rescale_factor") {
            match r.as_f64() {
                Some(f) if (f * 255.0 - 1.0).abs() < 1e-9 => {}
                _ => {
                    return Err(Error::field(
                        path,
                        "rescale_factor",
                        format!("only 1/255 is supported, found {r}"),
                    ))
                }
            }
        }
        let shortest_edge = match v.get("size") {
            Some(Value::Object(m)) => match m.get("shortest_edge") {
                Some(n) => positive_size(n, path, "size.shortest_edge")?,
                None => {
                    return Err(Error::field(
                        path,
                        "size",
                        "expected `shortest_edge` (other resize modes are not supported)",
                    ))
                }
            },
            Some(n @ Value::Number(_)) => positive_size(n, path, "size")?,
            Some(other) => {
                return Err(Error::field(
                    path,
                    "size",
                    format!("expected {{\"shortest_edge\": n}}, found {other}"),
                ))
            }
            None => return Err(Error::field(path, "size", "missing")),
        };
        let (crop_h, crop_w) = match v.get("crop_size") {
            None | Some(Value::Null) => (shortest_edge, shortest_edge),
            Some(Value::Object(m)) => {
                let get = |k: &str| -> Result<usize> {
                    let field = format!("crop_size.{k}");
                    let n = m
                        .get(k)
                        .ok_or_else(|| Error::field(path, field.as_str(), "missing"))?;
                    positive_size(n, path, &field)
                };
                (get("height")?, get("width")?)
            }
            Some(n @ Value::Number(_)) => {
                let s = positive_size(n, path, "crop_size")?;
                (s, s)
            }
            Some(other) => {
                return Err(Error::field(
                    path,
                    "crop_size",
                    format!("expected {{\"height\": h, \"width\": w}}, found {other}"),
                ))
            }
        };
        if crop_h > shortest_edge || crop_w > shortest_edge {
            return Err(Error::field(
                path,
                "crop_size",
                format!(
                    "{crop_h}x{crop_w} is larger than size.shortest_edge {shortest_edge} \
                     (padding is not supported)"
                ),
            ));
        }
        let mean = triple(v.get("image_mean"), path, "image_mean", OPENAI_CLIP_MEAN)?;
        let std = triple(v.get("image_std"), path, "image_std", OPENAI_CLIP_STD)?;
        if let Some(i) = std.iter().position(|s| *s <= 0.0) {
            return Err(Error::field(
                path,
                "image_std",
                format!("value {i} is {}, expected > 0", std[i]),
            ));
        }
        Ok(ClipPreprocessor {
            shortest_edge,
            crop_h,
            crop_w,
            mean,
            std,
        })
    }

    /// An image as 8-bit RGB (`H * W * 3` bytes, row-major) plus `(width, height)`, as
    /// transformers' `convert_to_rgb`: an image with alpha is composited onto opaque white,
    /// grayscale is replicated to R = G = B, 16-bit samples are reduced to 8 bits.
    pub fn rgb_from_image(img: &DynamicImage) -> (Vec<u8>, u32, u32) {
        let (w, h) = (img.width(), img.height());
        if img.color().has_alpha() {
            let rgba = img.to_rgba8();
            let mut out = Vec::with_capacity(w as usize * h as usize * 3);
            for px in rgba.as_raw().chunks_exact(4) {
                let a = px[3] as u32;
                for &c in &px[..3] {
                    out.push(((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8);
                }
            }
            (out, w, h)
        } else {
            (img.to_rgb8().into_raw(), w, h)
        }
    }

    /// The `(height, width)` after the shortest-edge resize of a `width x height` image:
    /// the short side (the width when they are equal) becomes `shortest_edge`, the long side
    /// `floor(shortest_edge * long / short)`.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let s = self.shortest_edge;
        if width <= height {
            (height * s / width, s)
        } else {
            (s, width * s / height)
        }
    }

    /// The shortest-edge resize of an RGB image (`H * W * 3` bytes): the resized image as
    /// `3 x h x w` bytes (channel-major, as torch's CHW tensor) plus `(h, w)`.
    pub fn resize_u8(
        &self,
        rgb: &[u8],
        width: usize,
        height: usize,
    ) -> Result<(Vec<u8>, usize, usize)> {
        check_rgb(rgb, width, height)?;
        let chw = hwc_to_chw(rgb, width, height);
        let (oh, ow) = self.resized_size(width, height);
        Ok((resize_u8_chw(&chw, 3, height, width, oh, ow), oh, ow))
    }

    /// The full preprocessing of an RGB image (`H * W * 3` bytes, `width x height`):
    /// a `3 x crop_h x crop_w` f32 tensor on the CPU (add a batch dimension for the model).
    pub fn preprocess_rgb(&self, rgb: &[u8], width: usize, height: usize) -> Result<Tensor> {
        let (resized, h, w) = self.resize_u8(rgb, width, height)?;
        let (ch, cw) = (self.crop_h, self.crop_w);
        // resized_size guarantees h, w >= shortest_edge >= crop (checked in from_json), but a
        // hand-built preprocessor may not.
        if h < ch || w < cw {
            return Err(Error::value(
                "crop size",
                format!("{ch}x{cw} is larger than the resized image {h}x{w}"),
            ));
        }
        let top = (h - ch) / 2;
        let left = (w - cw) / 2;
        let mut data = Vec::with_capacity(3 * ch * cw);
        for c in 0..3 {
            let m = self.mean[c] * 255.0;
            let s = self.std[c] * 255.0;
            let plane = &resized[c * h * w..(c + 1) * h * w];
            for y in top..top + ch {
                for &v in &plane[y * w + left..y * w + left + cw] {
                    data.push((v as f32 - m) / s);
                }
            }
        }
        Ok(Tensor::from_vec(data, (3, ch, cw), &Device::Cpu)?)
    }

    /// Decodes an image file (PNG, JPEG, WebP) and preprocesses it: `3 x crop_h x crop_w` f32
    /// on the CPU. The header is read first and an image of more than `max_pixels` pixels is
    /// refused before decoding. Every error names `path`.
    pub fn load(&self, path: impl AsRef<Path>, max_pixels: u64) -> Result<Tensor> {
        let path = path.as_ref();
        let (rgb, w, h) = decode_rgb(path, max_pixels)?;
        self.preprocess_rgb(&rgb, w as usize, h as usize)
            .map_err(|e| Error::file(path, e.to_string()))
    }
}

/// Decodes an image file to 8-bit RGB as [`ClipPreprocessor::rgb_from_image`] (alpha
/// composited onto white, no EXIF rotation), refusing more than `max_pixels` pixels before
/// decoding. Returns `(H * W * 3 bytes, width, height)`; every error names `path`.
pub fn decode_rgb(path: &Path, max_pixels: u64) -> Result<(Vec<u8>, u32, u32)> {
    let img = crate::output::open_image_checked(path, max_pixels)?
        .decode()
        .map_err(|e| {
            Error::file(
                path,
                format!("cannot decode image: {}", crate::output::one_line(&e)),
            )
        })?;
    Ok(ClipPreprocessor::rgb_from_image(&img))
}

fn check_rgb(rgb: &[u8], width: usize, height: usize) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::value(
            "image",
            format!("size {width}x{height} is empty"),
        ));
    }
    match width.checked_mul(height).and_then(|n| n.checked_mul(3)) {
        Some(n) if n == rgb.len() => Ok(()),
        _ => Err(Error::value(
            "image",
            format!(
                "{} bytes do not hold a {width}x{height} RGB image",
                rgb.len()
            ),
        )),
    }
}

fn hwc_to_chw(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let n = width * height;
    let mut out = vec![0u8; 3 * n];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        out[i] = px[0];
        out[n + i] = px[1];
        out[2 * n + i] = px[2];
    }
    out
}

/// The int16 taps of torch's antialiased bicubic for one axis.
struct AxisTaps {
    /// First input index of each output.
    xmin: Vec<usize>,
    /// Number of taps of each output.
    xsize: Vec<usize>,
    /// `kmax` weights per output (the first `xsize` used).
    weights: Vec<i32>,
    kmax: usize,
    precision: u32,
}

/// Keys cubic with a = -0.5 (torch's `aa_filter` for bicubic).
fn cubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    } else {
        0.0
    }
}

/// torch's `_compute_index_ranges_weights` (antialias) + `_compute_index_ranges_int16_weights`.
fn axis_taps(in_size: usize, out_size: usize) -> AxisTaps {
    let scale = in_size as f64 / out_size as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let kmax = support.ceil() as usize * 2 + 1;
    let invscale = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut xmins = Vec::with_capacity(out_size);
    let mut xsizes = Vec::with_capacity(out_size);
    let mut wf = vec![0f64; out_size * kmax];
    let mut wt_max = 0f64;
    for i in 0..out_size {
        let center = scale * (i as f64 + 0.5);
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let xsize = (xmax - xmin).clamp(0, kmax as i64) as usize;
        let w = &mut wf[i * kmax..i * kmax + xsize];
        let mut total = 0f64;
        for (j, wj) in w.iter_mut().enumerate() {
            *wj = cubic(((j as i64 + xmin) as f64 - center + 0.5) * invscale);
            total += *wj;
        }
        if total != 0.0 {
            for wj in w.iter_mut() {
                *wj /= total;
                wt_max = wt_max.max(*wj);
            }
        }
        xmins.push(xmin as usize);
        xsizes.push(xsize);
    }
    let mut precision = 0u32;
    while precision < 22 && ((0.5 + wt_max * (1u64 << (precision + 1)) as f64) as i64) < (1 << 15) {
        precision += 1;
    }
    let m = (1u64 << precision) as f64;
    let weights = wf
        .iter()
        .map(|&w| {
            let s = w * m;
            (if s < 0.0 {
                (s - 0.5) as i64
            } else {
                (s + 0.5) as i64
            }) as i16 as i32
        })
        .collect();
    AxisTaps {
        xmin: xmins,
        xsize: xsizes,
        weights,
        kmax,
        precision,
    }
}

/// Resamples along the last axis of `rows x in_len` bytes.
fn pass_last(src: &[u8], rows: usize, in_len: usize, out_len: usize) -> Vec<u8> {
    let t = axis_taps(in_len, out_len);
    let bias: i64 = if t.precision > 0 {
        1 << (t.precision - 1)
    } else {
        0
    };
    let mut out = vec![0u8; rows * out_len];
    for r in 0..rows {
        let row = &src[r * in_len..(r + 1) * in_len];
        for i in 0..out_len {
            let w = &t.weights[i * t.kmax..i * t.kmax + t.xsize[i]];
            let x = &row[t.xmin[i]..t.xmin[i] + t.xsize[i]];
            let acc = bias
                + x.iter()
                    .zip(w)
                    .map(|(&v, &wi)| v as i64 * wi as i64)
                    .sum::<i64>();
            out[r * out_len + i] = (acc >> t.precision).clamp(0, 255) as u8;
        }
    }
    out
}

/// Resamples along the second-to-last axis: `planes` planes of `in_len x cols` bytes.
fn pass_rows(src: &[u8], planes: usize, in_len: usize, cols: usize, out_len: usize) -> Vec<u8> {
    let t = axis_taps(in_len, out_len);
    let bias: i64 = if t.precision > 0 {
        1 << (t.precision - 1)
    } else {
        0
    };
    let mut out = vec![0u8; planes * out_len * cols];
    let mut acc = vec![0i64; cols];
    for p in 0..planes {
        let plane = &src[p * in_len * cols..(p + 1) * in_len * cols];
        for i in 0..out_len {
            let w = &t.weights[i * t.kmax..i * t.kmax + t.xsize[i]];
            // Row by row (integer sums: the order does not change the result).
            acc.fill(bias);
            for (j, &wi) in w.iter().enumerate() {
                let row = &plane[(t.xmin[i] + j) * cols..(t.xmin[i] + j + 1) * cols];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += v as i64 * wi as i64;
                }
            }
            let dst = &mut out[(p * out_len + i) * cols..(p * out_len + i + 1) * cols];
            for (o, &a) in dst.iter_mut().zip(&acc) {
                *o = (a >> t.precision).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// torch's native uint8 antialiased bicubic resize (`F.interpolate(mode="bicubic",
/// antialias=True)` on a uint8 tensor, as torchvision uses it): `channels x in_h x in_w` bytes
/// to `channels x out_h x out_w`. The width pass runs first (saturated to u8), then the height
/// pass; an axis whose size does not change is skipped. All sizes must be positive.
pub fn resize_u8_chw(
    src: &[u8],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        channels * in_h * in_w,
        "resize_u8_chw: bad input length"
    );
    assert!(
        in_h > 0 && in_w > 0 && out_h > 0 && out_w > 0,
        "resize_u8_chw: empty size"
    );
    let horizontal = if in_w != out_w {
        pass_last(src, channels * in_h, in_w, out_w)
    } else {
        src.to_vec()
    };
    if in_h != out_h {
        pass_rows(&horizontal, channels, in_h, out_w, out_h)
    } else {
        horizontal
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pre(s: usize) -> ClipPreprocessor {
        ClipPreprocessor {
            shortest_edge: s,
            crop_h: s,
            crop_w: s,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
        }
    }

    #[test]
    fn sizes_follow_shortest_edge() {
        let p = pre(30);
        assert_eq!(p.resized_size(37, 23), (30, 48));
        assert_eq!(p.resized_size(19, 41), (64, 30));
        assert_eq!(p.resized_size(33, 33), (30, 30));
        assert_eq!(p.resized_size(50, 29), (30, 51));
        assert_eq!(p.resized_size(71, 52), (30, 40));
    }

    #[test]
    fn constant_image_stays_constant() {
        for (ih, iw, oh, ow) in [(7, 9, 30, 40), (64, 50, 13, 10), (5, 5, 5, 8)] {
            let src = vec![173u8; 2 * ih * iw];
            let out = resize_u8_chw(&src, 2, ih, iw, oh, ow);
            assert_eq!(out.len(), 2 * oh * ow);
            assert!(out.iter().all(|&v| v == 173), "{ih}x{iw} -> {oh}x{ow}");
        }
    }

    #[test]
    fn same_size_is_identity() {
        let src: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
        assert_eq!(resize_u8_chw(&src, 3, 4, 5, 4, 5), src);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(23, 30), (71, 40), (52, 30), (33, 30), (1000, 224)] {
            let t = axis_taps(i, o);
            for k in 0..o {
                let s: i32 = t.weights[k * t.kmax..k * t.kmax + t.xsize[k]].iter().sum();
                let one = 1i32 << t.precision;
                assert!(
                    (s - one).abs() <= t.xsize[k] as i32,
                    "{i}->{o} output {k}: {s}"
                );
            }
        }
    }

    #[test]
    fn alpha_composites_on_white_and_gray_replicates() {
        let rgba = image::RgbaImage::from_raw(2, 1, vec![200, 0, 255, 0, 10, 20, 30, 255]).unwrap();
        let (rgb, w, h) = ClipPreprocessor::rgb_from_image(&DynamicImage::ImageRgba8(rgba));
        assert_eq!((w, h), (2, 1));
        assert_eq!(rgb, vec![255, 255, 255, 10, 20, 30]);
        let half = image::RgbaImage::from_raw(1, 1, vec![0, 100, 255, 128]).unwrap();
        let (rgb, _, _) = ClipPreprocessor::rgb_from_image(&DynamicImage::ImageRgba8(half));
        // (c*128 + 255*127 + 127) / 255
        assert_eq!(rgb, vec![127, 177, 255]);
        let gray = image::GrayImage::from_raw(1, 1, vec![42]).unwrap();
        let (rgb, _, _) = ClipPreprocessor::rgb_from_image(&DynamicImage::ImageLuma8(gray));
        assert_eq!(rgb, vec![42, 42, 42]);
    }

    #[test]
    fn config_errors_name_the_field() {
        let p = Path::new("pp.json");
        let v: Value = serde_json::json!({"size": {"shortest_edge": 0}});
        let e = ClipPreprocessor::from_json(&v, p).unwrap_err().to_string();
        assert!(
            e.contains("pp.json") && e.contains("size.shortest_edge"),
            "{e}"
        );
        let v: Value = serde_json::json!({"size": {"shortest_edge": 30}, "image_std": [1, 2]});
        let e = ClipPreprocessor::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("image_std"), "{e}");
        let v: Value = serde_json::json!({"size": {"shortest_edge": 30}, "resample": 2});
        let e = ClipPreprocessor::from_json(&v, p).unwrap_err().to_string();
        assert!(e.contains("resample"), "{e}");
        let v: Value = serde_json::json!({"size": 224, "crop_size": 224});
        let c = ClipPreprocessor::from_json(&v, p).unwrap();
        assert_eq!((c.shortest_edge, c.crop_h, c.crop_w), (224, 224, 224));
        assert_eq!(c.mean, OPENAI_CLIP_MEAN);
    }

    #[test]
    fn preprocess_centers_the_crop() {
        // A 4x2 image whose short side is already the target: no resize, crop columns 1..3.
        let p = ClipPreprocessor {
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            ..pre(2)
        };
        let rgb: Vec<u8> = (0..8u8).flat_map(|i| [i, i, i]).collect();
        let t = p.preprocess_rgb(&rgb, 4, 2).unwrap();
        assert_eq!(t.dims(), &[3, 2, 2]);
        let v = t
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in v.iter().zip([1.0f32, 2.0, 5.0, 6.0]) {
            assert!((a - b).abs() < 1e-5, "{v:?}");
        }
    }
}
