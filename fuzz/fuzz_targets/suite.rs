#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = artguide::probe::suite::Suite::parse(&text, std::path::Path::new("fuzz.yaml"));
});
