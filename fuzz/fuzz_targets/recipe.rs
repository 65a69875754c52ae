#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/smoke/fuzz.yaml");
    let _ = artguide::recipe::LoadedRecipe::parse(&text, &path);
});
