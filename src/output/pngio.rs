//! PNG files with a `parameters` text chunk, as the web UIs write them.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::files::write_atomic;
use crate::{Error, Result};

/// The PNG text keyword holding the generation parameters.
pub const PARAMETERS_KEY: &str = "parameters";

fn is_latin1(s: &str) -> bool {
    s.chars().all(|c| (c as u32) < 256)
}

/// Encodes 8-bit RGB pixels (`width * height * 3` bytes, row-major) as a PNG with the
/// `parameters` text: a `tEXt` chunk when the text is Latin-1, otherwise an uncompressed `iTXt`
/// chunk with the same keyword (as the web UIs, through PIL, do). An empty text writes no
/// chunk. The chunk goes before the image data.
pub fn encode_png(rgb: &[u8], width: u32, height: u32, parameters: &str) -> Result<Vec<u8>> {
    if width == 0 || height == 0 {
        return Err(Error::value(
            "image size",
            format!("{width}x{height}: both sides must be at least 1"),
        ));
    }
    let expected = (width as u64) * (height as u64) * 3;
    if rgb.len() as u64 != expected {
        return Err(Error::value(
            "image data",
            format!(
                "{} bytes for a {width}x{height} RGB image, expected {expected}",
                rgb.len()
            ),
        ));
    }
    let encode_err =
        |e: png::EncodingError| Error::value("image", format!("PNG encoding failed: {e}"));
    let mut out = Vec::with_capacity(rgb.len() / 2 + parameters.len() + 1024);
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if !parameters.is_empty() {
            if is_latin1(parameters) {
                encoder.add_text_chunk(PARAMETERS_KEY.to_string(), parameters.to_string())
            } else {
                encoder.add_itxt_chunk(PARAMETERS_KEY.to_string(), parameters.to_string())
            }
            .map_err(encode_err)?;
        }
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer.write_image_data(rgb).map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
    }
    Ok(out)
}

/// Saves an 8-bit RGB PNG with the `parameters` text (see [`encode_png`]), atomically and
/// without overwriting: an existing `path` is an error and is left as it was. To replace a
/// file, write [`encode_png`]'s bytes with [`write_atomic`]`(path, &bytes, true)`.
pub fn save_png(path: &Path, rgb: &[u8], width: u32, height: u32, parameters: &str) -> Result<()> {
    let bytes = encode_png(rgb, width, height, parameters).map_err(|e| match e {
        Error::Value { message, .. } => Error::file(path, message),
        other => other,
    })?;
    write_atomic(path, &bytes, false)
}

/// A decoded PNG: 8-bit RGB pixels and the `parameters` text, if any.
#[derive(Debug, Clone, PartialEq)]
pub struct PngImage {
    /// `width * height * 3` bytes, row-major.
    pub rgb: Vec<u8>,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The `parameters` text chunk (tEXt, zTXt or iTXt).
    pub parameters: Option<String>,
}

fn not_png(path: &Path, e: png::DecodingError) -> Error {
    match e {
        png::DecodingError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            Error::file(path, "truncated PNG file (it ends early)")
        }
        png::DecodingError::IoError(io) => Error::io(path, io),
        png::DecodingError::Format(f) => Error::file(path, format!("not a valid PNG file: {f}")),
        other => Error::file(path, format!("cannot read PNG: {other}")),
    }
}

fn open_png(path: &Path) -> Result<png::Reader<BufReader<File>>> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    decoder.read_info().map_err(|e| not_png(path, e))
}

fn find_parameters(path: &Path, info: &png::Info<'_>) -> Result<Option<String>> {
    let bad_text = |e: png::DecodingError| {
        Error::file(
            path,
            format!("unreadable `{PARAMETERS_KEY}` text chunk: {e}"),
        )
    };
    if let Some(c) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return Ok(Some(c.text.clone()));
    }
    if let Some(c) = info.utf8_text.iter().find(|c| c.keyword == PARAMETERS_KEY) {
        return c.get_text().map(Some).map_err(bad_text);
    }
    if let Some(c) = info
        .compressed_latin1_text
        .iter()
        .find(|c| c.keyword == PARAMETERS_KEY)
    {
        return c.get_text().map(Some).map_err(bad_text);
    }
    Ok(None)
}

/// Reads the `parameters` text (tEXt, zTXt or iTXt) of a PNG; `None` when it has none. The
/// whole file is checked, so a truncated or corrupt file, or one that is not a PNG, is an
/// [`Error::File`] naming `path`.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let mut reader = open_png(path)?;
    // Reads (and checks) the rest of the file, text chunks after the image data included.
    reader.finish().map_err(|e| not_png(path, e))?;
    find_parameters(path, reader.info())
}

/// Decodes a PNG to 8-bit RGB (grayscale is expanded, alpha dropped, 16-bit reduced) and
/// reads its `parameters` text. Errors name `path`.
pub fn read_png(path: &Path) -> Result<PngImage> {
    let mut reader = open_png(path)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::file(path, "image too large to decode"))?;
    let mut buf = vec![0u8; size];
    let frame = reader.next_frame(&mut buf).map_err(|e| not_png(path, e))?;
    let (w, h) = (frame.width, frame.height);
    let channels = frame.color_type.samples();
    buf.truncate(frame.buffer_size());
    let rgb: Vec<u8> = match frame.color_type {
        png::ColorType::Rgb => buf,
        png::ColorType::Rgba => buf
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => buf.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => buf
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => {
            return Err(Error::file(
                path,
                format!("unexpected indexed output ({channels} channels)"),
            ))
        }
    };
    reader.finish().map_err(|e| not_png(path, e))?;
    let parameters = find_parameters(path, reader.info())?;
    Ok(PngImage {
        rgb,
        width: w,
        height: h,
        parameters,
    })
}

/// The generation record of a PNG: its `parameters` text and the files beside it.
fn read_record(path: &Path) -> Result<(String, Option<PathBuf>, Option<PathBuf>)> {
    let text = read_png_parameters(path)?.ok_or_else(|| {
        Error::file(
            path,
            "no `parameters` text chunk: not written by artguide or a web UI",
        )
    })?;
    let beside = |ext: &str| Some(path.with_extension(ext)).filter(|p| p.is_file());
    Ok((text, beside("json"), beside("safetensors")))
}

/// What `artguide inspect IMG.png` prints: the `parameters` text, then a note naming the JSON
/// sidecar (`IMG.json`) and the tensors file (`IMG.safetensors`) when they sit beside the
/// image. A PNG without the text is an error.
pub fn inspect(path: &Path) -> Result<String> {
    let (text, sidecar, tensors) = read_record(path)?;
    let mut out = text;
    if !out.ends_with('\n') {
        out.push('\n');
    }
    let mut notes = Vec::new();
    if let Some(s) = sidecar {
        notes.push(format!("Sidecar: {}", s.display()));
    }
    if let Some(t) = tensors {
        notes.push(format!("Tensors: {}", t.display()));
    }
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    Ok(out)
}

/// The same record as [`inspect`] for a script: the raw text, the prompt, negative prompt
/// and settings taken apart (null when the text is not in the web UI format), and the
/// sidecar and tensor paths (null when absent).
pub fn inspect_json(path: &Path) -> Result<serde_json::Value> {
    let (text, sidecar, tensors) = read_record(path)?;
    let parsed = crate::output::params::parse_webui_parameters(&text).ok();
    // A repeated key keeps its first value, as `ParsedParameters::get` reads it.
    let settings = parsed.as_ref().map(|p| {
        let mut m = serde_json::Map::new();
        for (k, v) in &p.settings {
            m.entry(k.clone()).or_insert_with(|| v.clone().into());
        }
        m
    });
    let show = |p: Option<PathBuf>| p.map(|p| p.display().to_string());
    Ok(serde_json::json!({
        "image": path.display().to_string(),
        "parameters": text,
        "prompt": parsed.as_ref().map(|p| p.prompt.clone()),
        "negative_prompt": parsed.as_ref().map(|p| p.negative_prompt.clone()),
        "settings": settings,
        "sidecar": show(sidecar),
        "tensors": show(tensors),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testutil::names;
    use std::fs;

    fn pixels(w: u32, h: u32) -> Vec<u8> {
        (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect()
    }

    #[test]
    fn png_round_trip_latin1_and_unicode() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("latin.png", "a cat, \"quoted\"\nNegative prompt: dog\nSteps: 20, Sampler: DDIM, Seed: 1, caf\u{e9}"),
            ("uni.png", "猫 🦊 prompt\nSteps: 20, Sampler: DDIM, Seed: 1"),
        ] {
            let p = dir.path().join(name);
            let rgb = pixels(5, 3);
            let latin = text.chars().all(|c| (c as u32) < 256);
            save_png(&p, &rgb, 5, 3, text).unwrap();
            assert_eq!(read_png_parameters(&p).unwrap().as_deref(), Some(text));
            let img = read_png(&p).unwrap();
            assert_eq!((img.width, img.height), (5, 3));
            assert_eq!(img.rgb, rgb);
            assert_eq!(img.parameters.as_deref(), Some(text));
            // Check which chunk type carries it.
            let bytes = fs::read(&p).unwrap();
            let has = |t: &[u8]| bytes.windows(4).any(|w| w == t);
            assert_eq!(has(b"tEXt"), latin, "{name}");
            assert_eq!(has(b"iTXt"), !latin, "{name}");
            // The image crate reads it too.
            let decoded = image::open(&p).unwrap().into_rgb8();
            assert_eq!(decoded.into_raw(), rgb);
        }
        let p = dir.path().join("pure.png");
        save_png(&p, &pixels(2, 2), 2, 2, "caf\u{e9}, Steps: 1").unwrap();
        let bytes = fs::read(&p).unwrap();
        assert!(bytes.windows(4).any(|w| w == b"tEXt"));
        assert_eq!(
            read_png_parameters(&p).unwrap().as_deref(),
            Some("caf\u{e9}, Steps: 1")
        );
        assert_eq!(names(dir.path()), ["latin.png", "pure.png", "uni.png"]);
    }

    #[test]
    fn png_without_text_and_bad_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("plain.png");
        save_png(&p, &pixels(4, 4), 4, 4, "").unwrap();
        assert_eq!(read_png_parameters(&p).unwrap(), None);
        let err = inspect(&p).unwrap_err().to_string();
        assert!(
            err.contains("plain.png") && err.contains("no `parameters` text chunk"),
            "{err}"
        );
        // Refuses to overwrite.
        let err = save_png(&p, &pixels(4, 4), 4, 4, "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(read_png_parameters(&p).unwrap(), None);
        // Wrong buffer size.
        let err = save_png(&dir.path().join("bad.png"), &[0; 5], 2, 2, "x").unwrap_err();
        assert!(err.to_string().contains("bad.png"), "{err}");
        assert_eq!(names(dir.path()), ["plain.png"]);
    }

    #[test]
    fn truncated_or_foreign_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("full.png");
        let text = "prompt\nSteps: 20, Sampler: DDIM, Seed: 1";
        save_png(&p, &pixels(16, 16), 16, 16, text).unwrap();
        let bytes = fs::read(&p).unwrap();
        for cut in [4, 20, 60, bytes.len() / 2, bytes.len() - 6] {
            let t = dir.path().join(format!("cut{cut}.png"));
            fs::write(&t, &bytes[..cut]).unwrap();
            let err = read_png_parameters(&t).unwrap_err().to_string();
            assert!(err.contains(&format!("cut{cut}.png")), "{err}");
            assert!(read_png(&t).is_err());
        }
        let j = dir.path().join("photo.jpg");
        fs::write(&j, b"\xff\xd8\xff\xe0 not a png at all").unwrap();
        let err = read_png_parameters(&j).unwrap_err().to_string();
        assert!(
            err.contains("photo.jpg") && err.contains("not a valid PNG"),
            "{err}"
        );
        let err = read_png_parameters(&dir.path().join("missing.png")).unwrap_err();
        assert!(err.to_string().contains("missing.png"));
    }

    #[test]
    fn reads_ztxt_and_text_after_image_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("z.png");
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, 2, 1);
            enc.set_color(png::ColorType::Rgba);
            enc.set_depth(png::BitDepth::Eight);
            let mut w = enc.write_header().unwrap();
            w.write_image_data(&[1, 2, 3, 255, 4, 5, 6, 0]).unwrap();
            let chunk = png::text_metadata::ZTXtChunk::new("parameters", "zipped, text");
            w.write_text_chunk(&chunk).unwrap();
            w.finish().unwrap();
        }
        fs::write(&p, out).unwrap();
        assert_eq!(
            read_png_parameters(&p).unwrap().as_deref(),
            Some("zipped, text")
        );
        let img = read_png(&p).unwrap();
        assert_eq!(img.rgb, [1, 2, 3, 4, 5, 6]);
        assert_eq!(img.parameters.as_deref(), Some("zipped, text"));
    }

    #[test]
    fn inspect_mentions_sidecar() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("00001-42.png");
        save_png(
            &p,
            &pixels(2, 2),
            2,
            2,
            "cat\nSteps: 1, Sampler: DDIM, Seed: 42",
        )
        .unwrap();
        let out = inspect(&p).unwrap();
        assert_eq!(out, "cat\nSteps: 1, Sampler: DDIM, Seed: 42\n");
        fs::write(dir.path().join("00001-42.json"), b"{}").unwrap();
        let out = inspect(&p).unwrap();
        let sidecar = dir.path().join("00001-42.json");
        assert!(
            out.ends_with(&format!("\nSidecar: {}\n", sidecar.display())),
            "{out}"
        );
        let j = inspect_json(&p).unwrap();
        assert_eq!(j["prompt"], "cat");
        assert_eq!(j["negative_prompt"], "");
        assert_eq!(j["settings"]["Sampler"], "DDIM");
        assert_eq!(j["settings"]["Seed"], "42");
        assert_eq!(j["sidecar"], sidecar.display().to_string());
        assert!(j["tensors"].is_null());
        // One line: stdout stays JSON lines.
        assert!(!j.to_string().contains('\n'));
    }
}
