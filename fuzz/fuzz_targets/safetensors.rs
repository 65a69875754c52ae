#![no_main]
use libfuzzer_sys::fuzz_target;

// The whole input is a weights file: header length, JSON header, data.
fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("artguide-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("w.safetensors");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    if let Ok(w) = artguide::models::weights::FileWeights::open(&[path]) {
        let vb = w.into_var_builder(candle_core::DType::F32, &candle_core::Device::Cpu);
        let _ = vb.get_unchecked("w");
    }
});
