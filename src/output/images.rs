//! Conversions between image tensors, 8-bit pixels, image files and the tensors file.

use std::io::Cursor;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits};

use super::params::{TOOL_NAME, TOOL_VERSION};
use crate::{Error, Result};

/// A decoded image tensor (`3 x H x W` or `1 x 3 x H x W`, any float dtype, any device) as a
/// `3 x H x W` f32 tensor on the CPU.
fn image_chw_cpu(image: &Tensor) -> Result<Tensor> {
    let t = match image.dims() {
        [3, _, _] => image.clone(),
        [1, 3, _, _] => image.squeeze(0)?,
        dims => {
            return Err(Error::value(
                "image tensor",
                format!("shape {dims:?}: expected 3 x H x W or 1 x 3 x H x W"),
            ))
        }
    };
    let (_, h, w) = t.dims3()?;
    if h == 0 || w == 0 || u32::try_from(h).is_err() || u32::try_from(w).is_err() {
        return Err(Error::value(
            "image tensor",
            format!("size {w}x{h} is not a usable image size"),
        ));
    }
    Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?)
}

/// One channel value in [0, 1] to a byte as diffusers' `numpy_to_pil` does it:
/// `(x * 255).round()` in f32 with NumPy's rounding (halves to even), after clamping to
/// [0, 1]. NaN gives 0.
fn unit_to_u8(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    (x.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// Turns a decoded image tensor (`3 x H x W` or `1 x 3 x H x W`, values in [0, 1], any float
/// dtype and device) into interleaved 8-bit RGB (`H * W * 3` bytes) plus `(width, height)`.
/// Values are clamped to [0, 1], multiplied by 255 and rounded (halves to even, like NumPy's
/// `round` in diffusers' `numpy_to_pil`).
pub fn tensor_to_rgb8(image: &Tensor) -> Result<(Vec<u8>, u32, u32)> {
    let chw = image_chw_cpu(image)?;
    let (_, h, w) = chw.dims3()?;
    let hwc = chw
        .permute((1, 2, 0))?
        .contiguous()?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let rgb = hwc.into_iter().map(unit_to_u8).collect();
    // The sizes were checked to fit in u32 above.
    Ok((rgb, w as u32, h as u32))
}

/// The bytes of a safetensors file holding `image` (f32, `H x W x 3`, clamped to [0, 1]; the
/// input is a decoded image tensor `3 x H x W` or `1 x 3 x H x W` in [0, 1]) and `latents`
/// (f32, the shape given: `N x C x h x w` or `C x h x w`). Both are copied to the CPU as f32.
/// The metadata records the tool, its version and the image layout.
pub fn tensors_safetensors(image: &Tensor, latents: &Tensor) -> Result<Vec<u8>> {
    let img = image_chw_cpu(image)?
        .clamp(0f32, 1f32)?
        .permute((1, 2, 0))?
        .contiguous()?;
    let rank = latents.rank();
    if rank != 3 && rank != 4 {
        return Err(Error::value(
            "latents tensor",
            format!(
                "shape {:?}: expected N x C x h x w or C x h x w",
                latents.dims()
            ),
        ));
    }
    let lat = latents
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?;
    let meta = [
        ("image", "H x W x 3, RGB, f32 in [0, 1]"),
        ("tool", TOOL_NAME),
        ("version", TOOL_VERSION),
    ];
    f32_safetensors(&[("image", &img), ("latents", &lat)], &meta)
}

/// The safetensors bytes of contiguous f32 CPU tensors (in the order given, which must be
/// name order, as the format's writers use) and string metadata (in the order given). Written
/// here rather than by the safetensors crate, which writes metadata from a `HashMap` in a
/// random order, so the same tensors would not give the same bytes.
fn f32_safetensors(tensors: &[(&str, &Tensor)], meta: &[(&str, &str)]) -> Result<Vec<u8>> {
    let json = |s: &str| serde_json::Value::from(s).to_string();
    let entries: Vec<String> = meta
        .iter()
        .map(|(k, v)| format!("{}:{}", json(k), json(v)))
        .collect();
    let mut header = format!("{{\"__metadata__\":{{{}}}", entries.join(","));
    let mut data = Vec::new();
    for (name, t) in tensors {
        let start = data.len();
        for x in t.flatten_all()?.to_vec1::<f32>()? {
            data.extend_from_slice(&x.to_le_bytes());
        }
        let shape = serde_json::Value::from(t.dims().to_vec()).to_string();
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"F32\",\"shape\":{shape},\"data_offsets\":[{start},{}]}}",
            json(name),
            data.len()
        ));
    }
    header.push('}');
    // Readers expect the data to start 8-byte aligned; the format pads with spaces.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    Ok(out)
}

/// An image file read whole into memory (so both reads below see the same bytes), its format
/// recognised, a JPEG checked for completeness and the size from its header checked against
/// `max_pixels`: a reader ready to decode it, held to that size. Every error names `path`.
pub fn open_image_checked(path: &Path, max_pixels: u64) -> Result<ImageReader<Cursor<Vec<u8>>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    check_image_bytes(path, bytes, max_pixels)
}

/// [`open_image_checked`] of an image file's bytes already read (errors name `path`).
pub fn check_image_bytes(
    path: &Path,
    bytes: Vec<u8>,
    max_pixels: u64,
) -> Result<ImageReader<Cursor<Vec<u8>>>> {
    let format = ImageReader::new(Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?
        .format();
    let Some(format) = format else {
        return Err(Error::file(
            path,
            "unrecognised image format (expected PNG, JPEG or WebP)",
        ));
    };
    if format == ImageFormat::Jpeg {
        // The decoder fills a truncated JPEG's missing blocks in silently; PIL (and so
        // transformers) refuses such a file, and so does this.
        jpeg_complete(&bytes).map_err(|why| Error::file(path, why))?;
    }
    let mut header = ImageReader::new(Cursor::new(&bytes));
    header.set_format(format);
    let (w, h) = header
        .into_dimensions()
        .map_err(|e| Error::file(path, format!("cannot read image header: {}", one_line(&e))))?;
    if w == 0 || h == 0 {
        return Err(Error::file(path, format!("image is empty ({w}x{h})")));
    }
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels {
        return Err(Error::file(
            path,
            format!("image is {w}x{h} = {pixels} pixels, more than the limit of {max_pixels}"),
        ));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes));
    reader.set_format(format);
    let mut limits = Limits::default();
    limits.max_image_width = Some(w);
    limits.max_image_height = Some(h);
    reader.limits(limits);
    Ok(reader)
}

/// A decoder's error as one line (some end theirs with a newline).
pub(crate) fn one_line(e: &dyn std::fmt::Display) -> String {
    e.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks that JPEG data runs from its start-of-image marker through its segments and
/// entropy-coded scans to an end-of-image marker; bytes after that are allowed, as PIL does.
fn jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    const TRUNCATED: &str = "JPEG data ends before its end-of-image marker (the file is truncated)";
    if !b.starts_with(&[0xFF, 0xD8]) {
        return Err("not JPEG data: no start-of-image marker".into());
    }
    let mut i = 2;
    loop {
        // A marker: 0xFF, any fill bytes 0xFF, then the code. Stray bytes before it are
        // skipped, as libjpeg does (with a warning), so PIL's files all pass.
        while b.get(i).is_some_and(|&x| x != 0xFF) {
            i += 1;
        }
        if i >= b.len() {
            return Err(TRUNCATED.into());
        }
        while b.get(i) == Some(&0xFF) {
            i += 1;
        }
        let Some(&code) = b.get(i) else {
            return Err(TRUNCATED.into());
        };
        i += 1;
        match code {
            0xD9 => return Ok(()),
            // Standalone markers: no length.
            0x01 | 0xD0..=0xD7 => continue,
            _ => {}
        }
        let (Some(&hi), Some(&lo)) = (b.get(i), b.get(i + 1)) else {
            return Err(TRUNCATED.into());
        };
        let len = u16::from_be_bytes([hi, lo]) as usize;
        if len < 2 {
            return Err(format!(
                "corrupt JPEG data: segment length {len} at byte {i}"
            ));
        }
        i += len;
        if i > b.len() {
            return Err(TRUNCATED.into());
        }
        if code == 0xDA {
            // Entropy-coded data up to the next marker: 0xFF is followed by 0x00 (a stuffed
            // byte), a restart marker or more fill 0xFF inside it.
            loop {
                match (b.get(i), b.get(i + 1)) {
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => i += 2,
                    (Some(0xFF), Some(0xFF)) => i += 1,
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => i += 1,
                    (None, _) => return Err(TRUNCATED.into()),
                }
            }
        }
    }
}

/// Reads a PNG, JPEG or WebP file as 8-bit RGB (`H * W * 3` bytes) plus `(width, height)`.
/// Grayscale is expanded, alpha is dropped (like PIL's `convert("RGB")`), 16-bit samples are
/// reduced and the EXIF orientation is applied. The file is checked by
/// [`open_image_checked`] first: an image of more than `max_pixels` pixels is refused before
/// it is decoded. Every error names `path`.
pub fn load_image_rgb8(path: &Path, max_pixels: u64) -> Result<(Vec<u8>, u32, u32)> {
    let reader = open_image_checked(path, max_pixels)?;
    let decode_err =
        |e: image::ImageError| Error::file(path, format!("cannot decode image: {}", one_line(&e)));
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    Ok((rgb.into_raw(), w, h))
}

/// Like [`load_image_rgb8`], as a `3 x H x W` f32 tensor on the CPU with values in [0, 1]
/// (byte / 255), plus `(width, height)`. Scale to [-1, 1] for the VAE encoder.
pub fn load_image_rgb(path: &Path, max_pixels: u64) -> Result<(Tensor, u32, u32)> {
    let (rgb, w, h) = load_image_rgb8(path, max_pixels)?;
    let data: Vec<f32> = rgb.iter().map(|&b| b as f32 / 255.0).collect();
    let t = Tensor::from_vec(data, (h as usize, w as usize, 3), &Device::Cpu)
        .and_then(|t| t.permute((2, 0, 1))?.contiguous())
        .map_err(|e| Error::file(path, format!("cannot build image tensor: {e}")))?;
    Ok((t, w, h))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn rgb8_rounding_matches_numpy() {
        // Exact ties in f32 arithmetic round to even, like NumPy (f32::round would go up).
        let mut tie_down = 0;
        for k in 0..255u32 {
            let x = ((k as f64 + 0.5) / 255.0) as f32;
            let p = x * 255.0f32;
            let got = unit_to_u8(x) as u32;
            if p == k as f32 + 0.5 {
                assert_eq!(got, if k % 2 == 0 { k } else { k + 1 }, "k={k}");
                if k % 2 == 0 {
                    tie_down += 1;
                }
            } else if p < k as f32 + 0.5 {
                assert_eq!(got, k, "k={k} p={p}");
            } else {
                assert_eq!(got, k + 1, "k={k} p={p}");
            }
            // Just either side of the boundary.
            let below = ((k as f64 + 0.49) / 255.0) as f32;
            let above = ((k as f64 + 0.51) / 255.0) as f32;
            assert_eq!(unit_to_u8(below) as u32, k);
            assert_eq!(unit_to_u8(above) as u32, k + 1);
        }
        assert!(tie_down > 0, "no exact even ties found; test is vacuous");
        assert_eq!(unit_to_u8(0.5), 128); // 127.5 -> 128 (even)
        assert_eq!(unit_to_u8(0.0), 0);
        assert_eq!(unit_to_u8(1.0), 255);
        assert_eq!(unit_to_u8(-0.3), 0);
        assert_eq!(unit_to_u8(1.7), 255);
        assert_eq!(unit_to_u8(f32::NAN), 0);
        assert_eq!(unit_to_u8(0.4 / 255.0), 0);
        assert_eq!(unit_to_u8(0.6 / 255.0), 1);
    }

    #[test]
    fn tensor_to_rgb8_layout() {
        // 3 x 2 x 2: channel-major in, interleaved out.
        let data: Vec<f32> = vec![
            0.0, 1.0, 0.5, 0.25, // R
            1.0, 0.0, 0.5, 0.75, // G
            0.2, 0.4, 2.0, -1.0, // B
        ];
        let t = Tensor::from_vec(data, (3, 2, 2), &Device::Cpu).unwrap();
        let (rgb, w, h) = tensor_to_rgb8(&t).unwrap();
        assert_eq!((w, h), (2, 2));
        assert_eq!(rgb, [0, 255, 51, 255, 0, 102, 128, 128, 255, 64, 191, 0]);
        let (rgb4, _, _) = tensor_to_rgb8(&t.unsqueeze(0).unwrap()).unwrap();
        assert_eq!(rgb4, rgb);
        let (rgb16, _, _) = tensor_to_rgb8(&t.to_dtype(DType::F16).unwrap()).unwrap();
        assert_eq!(rgb16, rgb);
        // Not an image: 4 channels, or H x W x 3.
        assert!(
            tensor_to_rgb8(&Tensor::zeros((4, 2, 2), DType::F32, &Device::Cpu).unwrap()).is_err()
        );
        assert!(
            tensor_to_rgb8(&Tensor::zeros((2, 2, 3), DType::F32, &Device::Cpu).unwrap()).is_err()
        );
    }

    #[test]
    fn safetensors_names_shapes_dtypes() {
        let img = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .affine(1.0 / 20.0, 0.0)
            .unwrap()
            .reshape((1, 3, 2, 4))
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let lat = Tensor::ones((1, 4, 1, 2), DType::F16, &Device::Cpu).unwrap();
        let bytes = tensors_safetensors(&img, &lat).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.safetensors");
        fs::write(&p, &bytes).unwrap();
        let loaded = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
        let mut keys: Vec<_> = loaded.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["image", "latents"]);
        let li = &loaded["image"];
        assert_eq!(li.dims(), [2, 4, 3]);
        assert_eq!(li.dtype(), DType::F32);
        let ll = &loaded["latents"];
        assert_eq!(ll.dims(), [1, 4, 1, 2]);
        assert_eq!(ll.dtype(), DType::F32);
        // HWC layout, clamped: pixel (0, 1) is (c0[1], c1[1], c2[1]) = (0.05, 0.45, min(0.85,1)).
        let v = li.to_vec3::<f32>().unwrap();
        let src = img
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for y in 0..2 {
            for x in 0..4 {
                for c in 0..3 {
                    assert_eq!(v[y][x][c], src[c][y][x].clamp(0.0, 1.0));
                }
            }
        }
        assert!(v.iter().flatten().flatten().any(|&x| x == 1.0));
        // The same tensors give the same bytes: the metadata is written in a fixed order
        // (the safetensors crate's HashMap order differs from call to call).
        for _ in 0..8 {
            assert_eq!(tensors_safetensors(&img, &lat).unwrap(), bytes);
        }
        let header = String::from_utf8_lossy(&bytes[8..64]).to_string();
        assert!(
            header.starts_with(r#"{"__metadata__":{"image":"H x W x 3"#),
            "{header}"
        );
        // Metadata.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(st.names().len(), 2);
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("tool"))
                .map(String::as_str),
            Some("artguide")
        );
        // 3-D latents are fine, 2-D are not.
        let lat3 = Tensor::zeros((4, 1, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(tensors_safetensors(&img, &lat3).is_ok());
        let lat2 = Tensor::zeros((4, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(tensors_safetensors(&img, &lat2).is_err());
    }

    #[test]
    fn load_images_of_several_kinds() {
        let dir = tempfile::tempdir().unwrap();
        // RGBA PNG: alpha dropped.
        let rgba = image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 0, 40, 50, 60, 255]).unwrap();
        let p = dir.path().join("a.png");
        rgba.save(&p).unwrap();
        let (rgb, w, h) = load_image_rgb8(&p, 100).unwrap();
        assert_eq!((w, h), (2, 1));
        assert_eq!(rgb, [10, 20, 30, 40, 50, 60]);
        // Grayscale JPEG with a misleading extension: expanded to three equal channels.
        let gray = image::GrayImage::from_raw(8, 8, vec![128; 64]).unwrap();
        let j = dir.path().join("gray.webp");
        gray.save_with_format(&j, image::ImageFormat::Jpeg).unwrap();
        let (rgb, w, h) = load_image_rgb8(&j, 64).unwrap();
        assert_eq!((w, h), (8, 8));
        assert!(rgb
            .chunks(3)
            .all(|p| p[0] == p[1] && p[1] == p[2] && p[0].abs_diff(128) <= 2));
        // Tensor form.
        let (t, w, h) = load_image_rgb(&p, 100).unwrap();
        assert_eq!((w, h, t.dims().to_vec()), (2, 1, vec![3, 1, 2]));
        let v = t.to_vec3::<f32>().unwrap();
        assert_eq!(v[0][0][1], 40.0 / 255.0);
        assert_eq!(v[2][0][0], 30.0 / 255.0);
        // Too many pixels: refused, naming the file.
        let err = load_image_rgb8(&j, 63).unwrap_err().to_string();
        assert!(
            err.contains("gray.webp") && err.contains("64 pixels"),
            "{err}"
        );
        // Not an image, truncated image, missing file.
        let bad = dir.path().join("bad.png");
        fs::write(&bad, b"hello").unwrap();
        assert!(load_image_rgb8(&bad, 100)
            .unwrap_err()
            .to_string()
            .contains("bad.png"));
        let bytes = fs::read(&j).unwrap();
        let cut = dir.path().join("cut.jpg");
        fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_image_rgb8(&cut, 100).unwrap_err().to_string();
        assert!(err.contains("cut.jpg"), "{err}");
        let err = load_image_rgb8(&dir.path().join("none.png"), 100).unwrap_err();
        assert!(err.to_string().contains("none.png"));
    }

    #[test]
    fn truncated_jpegs_are_refused_as_pil_does() {
        // The image crate decodes a JPEG cut anywhere after its headers without an error,
        // filling the rest; PIL says "image file is truncated" for each of these cuts.
        let dir = tempfile::tempdir().unwrap();
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/clip/images/img3_50x29_rgb_q90.jpg"
        );
        let whole = fs::read(fixture).unwrap();
        assert_eq!(whole[whole.len() - 2..], [0xFF, 0xD9]);
        let p = dir.path().join("x.jpg");
        for keep in [700, 1000, whole.len() - 2, whole.len() - 1] {
            fs::write(&p, &whole[..keep]).unwrap();
            let err = load_image_rgb8(&p, 1 << 20).unwrap_err().to_string();
            assert!(
                err.contains("x.jpg") && err.contains("truncated"),
                "{keep}: {err}"
            );
            assert!(!err.contains('\n'), "{err}");
            let err = crate::models::clip_preprocess::decode_rgb(&p, 1 << 20).unwrap_err();
            assert!(err.to_string().contains("truncated"), "{err}");
        }
        // Whole, and with bytes after the end marker (PIL ignores them): decoded alike.
        fs::write(&p, &whole).unwrap();
        let reference = load_image_rgb8(&p, 1 << 20).unwrap();
        fs::write(&p, [&whole[..], b"trailing bytes"].concat()).unwrap();
        assert_eq!(load_image_rgb8(&p, 1 << 20).unwrap(), reference);
        // Restart markers and stuffed bytes inside a scan, fill bytes before a marker.
        let mut marked = whole[..whole.len() - 2].to_vec();
        marked.extend_from_slice(&[0xFF, 0x00, 0x12, 0xFF, 0xD3, 0x34, 0xFF, 0xFF, 0xD9]);
        // Stray bytes between segments (libjpeg skips them): after the start marker here.
        let mut stray = whole.clone();
        stray.splice(2..2, [0x00, 0x00, 0x17]);
        assert_eq!(jpeg_complete(&stray), Ok(()));
        assert_eq!(jpeg_complete(&marked), Ok(()));
        marked.truncate(marked.len() - 1);
        assert!(jpeg_complete(&marked).unwrap_err().contains("truncated"));
    }
}
