//! Hostile inputs on stable Rust, bounded so CI runs them: seeded mutations of real recipes,
//! suites, safetensors files and images, YAML alias bombs and deep nesting, huge inputs. Every
//! case must end in `Ok` or a clear `Err`: never a panic, never a hang, never an allocation
//! the size of a lying header. (Long cargo-fuzz runs of the same parsers: see fuzz/README.md.)

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

/// Random byte-level damage: flips, deletions, insertions of YAML-significant characters,
/// duplicated spans.
fn mutate(rng: &mut ChaCha8Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..rng.random_range(1..8) {
        if v.is_empty() {
            v.push(b'{');
        }
        let i = rng.random_range(0..v.len());
        match rng.random_range(0..5) {
            0 => v[i] ^= 1 << rng.random_range(0..8),
            1 => {
                v.remove(i);
            }
            2 => {
                const SPECIAL: &[u8] = b"{}[]:-&*!|>'\"#%@`,?\n\t 0\\";
                v.insert(i, SPECIAL[rng.random_range(0..SPECIAL.len())]);
            }
            3 => {
                let end = (i + rng.random_range(1..64)).min(v.len());
                let span = v[i..end].to_vec();
                v.splice(i..i, span);
            }
            _ => v.truncate(i),
        }
    }
    v
}

/// Runs `f` on every input, failing on a panic (with the input saved for replay) or on a case
/// slower than `limit`.
fn survive(
    name: &str,
    inputs: Vec<Vec<u8>>,
    limit: Duration,
    f: impl Fn(&[u8]) + std::panic::RefUnwindSafe,
) {
    for (k, input) in inputs.iter().enumerate() {
        let t = Instant::now();
        let r = std::panic::catch_unwind(|| f(input));
        if r.is_err() {
            let keep = std::env::temp_dir().join(format!("artguide-hostile-{name}-{k}.bin"));
            let _ = std::fs::write(&keep, input);
            panic!("{name} case {k} panicked; input kept at {}", keep.display());
        }
        assert!(
            t.elapsed() < limit,
            "{name} case {k} took {:?}",
            t.elapsed()
        );
    }
}

fn mutations(seed: u64, base: &[u8], n: usize) -> Vec<Vec<u8>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| mutate(&mut rng, base)).collect()
}

const ALIAS_BOMB: &str = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\na1: &a1 [*a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0, *a0]\na2: &a2 [*a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1, *a1]\na3: &a3 [*a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2, *a2]\na4: &a4 [*a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3, *a3]\na5: &a5 [*a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4, *a4]\na6: &a6 [*a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5, *a5]\na7: &a7 [*a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6, *a6]\na8: &a8 [*a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7, *a7]\nprobes: *a8\n";

#[test]
fn recipe_parser_survives_mutations_bombs_and_huge_files() {
    let path = repo().join("recipes/smoke/compare.yaml");
    let base = std::fs::read(&path).unwrap();
    let mut inputs = mutations(1, &base, 400);
    inputs.push(ALIAS_BOMB.as_bytes().to_vec());
    inputs.push("[".repeat(200_000).into_bytes());
    inputs.push(format!("name: {}\n", "x".repeat(3 << 20)).into_bytes());
    survive("recipe", inputs, Duration::from_secs(5), |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let _ = artguide::recipe::LoadedRecipe::parse(&text, &path);
    });
    // Refused (by the alias expansion limit, or earlier by the strict schema), fast.
    for (text, needles) in [
        (
            ALIAS_BOMB.to_string(),
            ["repetition limit", "unknown field"],
        ),
        ("[".repeat(200_000), ["recursion limit", "invalid type"]),
    ] {
        let t = Instant::now();
        let e = artguide::recipe::LoadedRecipe::parse(&text, &path)
            .unwrap_err()
            .to_string();
        assert!(
            needles.iter().any(|n| e.contains(n)) && !e.contains('\n'),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }
    // The expansion limit itself, on an untyped document.
    let e = serde_yaml::from_str::<serde_yaml::Value>(ALIAS_BOMB)
        .unwrap_err()
        .to_string();
    assert!(e.contains("repetition limit"), "{e}");
    let e = serde_yaml::from_str::<serde_yaml::Value>(&"[".repeat(200_000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("recursion limit"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    let big = tmp.path().join("big.yaml");
    std::fs::write(&big, vec![b'#'; (4 << 20) + 1]).unwrap();
    let e = artguide::recipe::LoadedRecipe::load(&big)
        .unwrap_err()
        .to_string();
    assert!(e.contains("big.yaml") && e.contains("limited"), "{e}");
}

#[test]
fn suite_parser_survives_mutations_and_bombs() {
    let path = repo().join("probes/art.yaml");
    let base = std::fs::read(&path).unwrap();
    let mut inputs = mutations(2, &base, 400);
    inputs.push(ALIAS_BOMB.as_bytes().to_vec());
    survive("suite", inputs, Duration::from_secs(5), |bytes| {
        let _ = artguide::probe::suite::Suite::parse(&String::from_utf8_lossy(bytes), &path);
    });
    let e = artguide::probe::suite::Suite::parse(ALIAS_BOMB, &path)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("repetition limit") || e.contains("unknown field"),
        "{e}"
    );
}

/// A safetensors file: 8-byte little-endian header length, JSON header, data.
fn safetensors(header: &str, data: &[u8], claimed: Option<u64>) -> Vec<u8> {
    let mut v = claimed
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

#[test]
fn safetensors_headers_that_lie_are_refused_without_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let good =
        std::fs::read(repo().join("tests/fixtures/tiny-taesd/diffusion_pytorch_model.safetensors"))
            .unwrap();
    let mut inputs = vec![
        safetensors("{}", &[], Some(u64::MAX)),
        safetensors("{}", &[], Some(u64::MAX / 2)),
        safetensors("{}", &[], Some(1 << 40)),
        safetensors(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            &[0; 8],
            None,
        ),
        safetensors(
            r#"{"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#,
            &[0; 16],
            None,
        ),
        safetensors(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[18446744073709551600,16]}}"#,
            &[0; 16],
            None,
        ),
        safetensors(
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#,
            &[0; 16],
            None,
        ),
        vec![1, 2, 3],
        vec![],
    ];
    // Mutate only the header part of a real file (mutating the data is not a header case).
    let hlen = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for _ in 0..300 {
        let header = mutate(&mut rng, &good[8..8 + hlen]);
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend(&header);
        v.extend(&good[8 + hlen..]);
        inputs.push(v);
    }
    let path = tmp.path().join("w.safetensors");
    survive("safetensors", inputs, Duration::from_secs(5), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        if let Ok(w) = artguide::models::weights::FileWeights::open(std::slice::from_ref(&path)) {
            // Reading every tensor must be refused or succeed, never panic.
            let vb = w.into_var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
            for name in ["w", "decoder.layers.0.weight"] {
                let _ = vb.get_unchecked(name);
            }
        }
    });
    std::fs::write(&path, safetensors("{}", &[], Some(u64::MAX))).unwrap();
    let e = artguide::models::weights::FileWeights::open(std::slice::from_ref(&path))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("w.safetensors") && e.contains("header"), "{e}");
}

#[test]
fn images_are_refused_above_the_pixel_limit_before_decoding_and_garbage_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    // A valid PNG header claiming 100000 x 100000 pixels, with no data behind it.
    let mut png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR".to_vec();
    let ihdr = [
        &100_000u32.to_be_bytes()[..],
        &100_000u32.to_be_bytes()[..],
        &[8, 2, 0, 0, 0],
    ]
    .concat();
    png.extend(&ihdr);
    let mut crc_input = b"IHDR".to_vec();
    crc_input.extend(&ihdr);
    png.extend(crc32(&crc_input).to_be_bytes());
    // An empty IDAT and IEND, so the header reads as a complete (if lying) PNG.
    for chunk in [&b"IDAT"[..], &b"IEND"[..]] {
        png.extend(0u32.to_be_bytes());
        png.extend(chunk);
        png.extend(crc32(chunk).to_be_bytes());
    }
    let p = tmp.path().join("huge.png");
    std::fs::write(&p, &png).unwrap();
    let t = Instant::now();
    let e = artguide::output::load_image_rgb8(&p, 64 << 20)
        .unwrap_err()
        .to_string();
    assert!(e.contains("100000x100000") && e.contains("limit"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1));

    let real = std::fs::read(repo().join("tests/fixtures/clip/images/img4_71x52_rgb.png")).unwrap();
    let jpeg =
        std::fs::read(repo().join("tests/fixtures/clip/images/img3_50x29_rgb_q90.jpg")).unwrap();
    let mut inputs = mutations(4, &real, 150);
    inputs.extend(mutations(5, &jpeg, 150));
    let path = tmp.path().join("x.png");
    survive("image", inputs, Duration::from_secs(5), |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = artguide::output::load_image_rgb8(&path, 1 << 20);
        let _ = artguide::output::read_png_parameters(&path);
    });
}

#[test]
fn parameter_text_parser_survives_mutations() {
    let base = b"a harbour, oil\nNegative prompt: blurry\nSteps: 30, Sampler: DDIM, CFG scale: 7.5, Seed: 5, Size: 512x512, Model: \"a, b\", Version: artguide 0.1.0";
    survive(
        "parameters",
        mutations(6, base, 500),
        Duration::from_secs(1),
        |bytes| {
            let _ = artguide::output::parse_webui_parameters(&String::from_utf8_lossy(bytes));
        },
    );
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
