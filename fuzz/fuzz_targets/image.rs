#![no_main]
use libfuzzer_sys::fuzz_target;

// Image files are decoded from disk with a pixel limit checked on the header first.
fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("artguide-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("x.img");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = artguide::output::load_image_rgb8(&path, 16 << 20);
    let _ = artguide::output::read_png_parameters(&path);
});
