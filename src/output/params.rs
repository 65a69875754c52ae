//! Generation parameters and the AUTOMATIC1111-style `parameters` text ("infotext").
//!
//! The text has this shape (the web UIs write it into a PNG text chunk named `parameters`):
//!
//! ```text
//! a prompt, which may span
//! several lines
//! Negative prompt: blurry, lowres
//! Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: abcd1234ef, Model: sd15, Version: artguide 0.1.0
//! ```
//!
//! The `Negative prompt:` line is left out when the negative prompt is empty. On the last line,
//! a value that contains `,`, `:`, `"`, a newline or another control character, that starts or
//! ends with whitespace, or that is empty is written as a JSON string (`"a, b"`), as the web UI
//! does; [`parse_webui_parameters`] reverses that.
//!
//! Round trip: for prompts in which no line starts with `Negative prompt:` (the format cannot
//! express that), parsing the text written by [`webui_parameters`] or
//! [`format_webui_parameters`] gives back exactly the prompt, the negative prompt and the
//! settings that went in. The JSON sidecar keeps the exact values in every case.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The tool name written into outputs.
pub const TOOL_NAME: &str = "artguide";
/// The crate version written into outputs.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

const NEGATIVE_PREFIX: &str = "Negative prompt:";

/// Everything needed to describe (and repeat) one generated image.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct GenerationParams {
    /// The prompt, possibly several lines.
    pub prompt: String,
    /// The negative prompt; empty when none.
    #[serde(default)]
    pub negative_prompt: String,
    /// The seed of this image.
    pub seed: u64,
    /// Number of denoising steps.
    pub steps: u32,
    /// Classifier-free guidance scale.
    pub guidance_scale: f64,
    /// The scheduler as named on artguide's command line (`ddim`, `euler-a`, ...).
    pub scheduler: String,
    /// The web UI's name for that sampler (`DDIM`, `Euler`, `Euler a`, `DPM++ 2M`); see
    /// [`webui_sampler_name`]. When empty, the text uses `webui_sampler_name(&scheduler)`.
    pub sampler: String,
    /// Image width in pixels.
    pub width: u32,
    /// Image height in pixels.
    pub height: u32,
    /// Model id (Hugging Face repository) or local path.
    pub model: String,
    /// Short hex hash of the model (web UI "Model hash": the first 10 hex digits of the
    /// checkpoint's sha256); empty when unknown.
    #[serde(default)]
    pub model_hash: String,
    /// Data type used for inference (`f16`, `bf16`, `f32`).
    #[serde(default)]
    pub dtype: String,
    /// Device used for inference (`cpu`, `cuda:0`, ...).
    #[serde(default)]
    pub device: String,
    /// img2img denoising strength; `None` for text-to-image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// img2img source image (path as given); `None` for text-to-image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image: Option<String>,
    /// Index of this image within its batch (0-based).
    #[serde(default)]
    pub batch_index: u32,
    /// Further settings added by later features (CLIP guidance, ...). Entries whose key is a
    /// valid web UI key (see [`is_valid_webui_key`]) and whose value is a string, number or
    /// boolean also go into the web UI text, before `Version`; every entry goes into the JSON
    /// sidecar.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl GenerationParams {
    /// The web UI settings (last line of the `parameters` text) as ordered, unquoted pairs:
    /// `Steps`, `Sampler`, `CFG scale`, `Seed`, `Size`, `Model hash` (if known), `Model`
    /// (if known), `Denoising strength` (img2img only), the scalar `extra` entries, `Version`.
    pub fn webui_settings(&self) -> Vec<(String, String)> {
        let mut s: Vec<(String, String)> = Vec::new();
        let mut push = |k: &str, v: String| s.push((k.to_string(), v));
        push("Steps", self.steps.to_string());
        let sampler = if self.sampler.is_empty() {
            webui_sampler_name(&self.scheduler)
        } else {
            self.sampler.clone()
        };
        push("Sampler", sampler);
        push("CFG scale", py_float(self.guidance_scale));
        push("Seed", self.seed.to_string());
        push("Size", format!("{}x{}", self.width, self.height));
        if !self.model_hash.is_empty() {
            push("Model hash", self.model_hash.clone());
        }
        if !self.model.is_empty() {
            push("Model", self.model.clone());
        }
        if let Some(strength) = self.strength {
            push("Denoising strength", py_float(strength));
        }
        for (k, v) in &self.extra {
            if !is_valid_webui_key(k) {
                continue;
            }
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => match n.as_f64() {
                    Some(f) if n.is_f64() => py_float(f),
                    _ => n.to_string(),
                },
                serde_json::Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
                _ => continue,
            };
            push(k, text);
        }
        push("Version", format!("{TOOL_NAME} {TOOL_VERSION}"));
        s
    }
}

/// The web UI's sampler name for an artguide / diffusers scheduler name; names it does not
/// know come back unchanged. Case, `-`, `_` and spaces are ignored and `+` reads as `p`, so
/// `euler-a`, `euler_ancestral`, `EulerAncestralDiscrete` all give `Euler a`.
pub fn webui_sampler_name(scheduler: &str) -> String {
    let key: String = scheduler
        .chars()
        .filter(|c| !matches!(c, '-' | '_' | ' '))
        .map(|c| {
            if c == '+' {
                'p'
            } else {
                c.to_ascii_lowercase()
            }
        })
        .collect();
    let key = key.strip_suffix("scheduler").unwrap_or(&key);
    let name = match key {
        "ddim" => "DDIM",
        "ddpm" => "DDPM",
        "euler" | "eulerdiscrete" => "Euler",
        "eulera" | "eulerancestral" | "eulerancestraldiscrete" => "Euler a",
        "dpmpp2m" | "dpmsolvermultistep" | "dpmsolver" => "DPM++ 2M",
        "dpmpp2msde" => "DPM++ 2M SDE",
        "dpmppsde" => "DPM++ SDE",
        "dpmpp2sa" | "dpmpp2sancestral" => "DPM++ 2S a",
        "dpm2" | "kdpm2" | "kdpm2discrete" => "DPM2",
        "dpm2a" | "kdpm2ancestral" | "kdpm2ancestraldiscrete" => "DPM2 a",
        "unipc" | "unipcmultistep" => "UniPC",
        "pndm" | "plms" => "PLMS",
        "lms" | "lmsdiscrete" => "LMS",
        "heun" | "heundiscrete" => "Heun",
        "lcm" => "LCM",
        _ => return scheduler.to_string(),
    };
    name.to_string()
}

/// Formats a float the way Python's `repr` does for ordinary values (`7.0`, `7.5`, `0.75`).
fn py_float(x: f64) -> String {
    if x.is_nan() {
        "nan".to_string()
    } else if x.is_infinite() {
        if x > 0.0 { "inf" } else { "-inf" }.to_string()
    } else if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// Whitespace as Python's `\s` sees it in a `str` pattern.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `\w` for `str` patterns (approximately: Unicode letters, digits and `_`).
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_key_char(c: char) -> bool {
    is_word(c) || matches!(c, ' ' | '-' | '/')
}

/// Whether `key` can be a key on the settings line and be read back as itself: the web UI's
/// pattern `\w[\w \-/]+` (a word character, then at least one word character, space, `-` or
/// `/`).
pub fn is_valid_webui_key(key: &str) -> bool {
    let mut chars = key.chars();
    match chars.next() {
        Some(c) if is_word(c) => {}
        _ => return false,
    }
    let rest: Vec<char> = chars.collect();
    !rest.is_empty() && rest.iter().all(|&c| is_key_char(c))
}

/// Quotes a settings value when the web UI format needs it (JSON string syntax).
fn quote_value(v: &str) -> String {
    let needs = v.is_empty()
        || v.contains([',', ':', '"', '\n'])
        || v.chars().any(char::is_control)
        || v.starts_with(is_py_space)
        || v.ends_with(is_py_space);
    if needs {
        // serde_json writes strings like Python's json.dumps(ensure_ascii=False).
        serde_json::to_string(v).unwrap_or_else(|_| format!("{v:?}"))
    } else {
        v.to_string()
    }
}

fn format_unchecked(prompt: &str, negative_prompt: &str, settings: &[(String, String)]) -> String {
    let mut out = String::with_capacity(prompt.len() + negative_prompt.len() + 200);
    out.push_str(prompt);
    if !negative_prompt.is_empty() {
        out.push('\n');
        out.push_str(NEGATIVE_PREFIX);
        out.push(' ');
        out.push_str(negative_prompt);
    }
    out.push('\n');
    for (i, (k, v)) in settings.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(k);
        out.push_str(": ");
        out.push_str(&quote_value(v));
    }
    out
}

/// The web UI `parameters` text for `p` (see the module documentation for the format).
pub fn webui_parameters(p: &GenerationParams) -> String {
    // webui_settings only yields valid keys, so no check is needed here.
    format_unchecked(&p.prompt, &p.negative_prompt, &p.webui_settings())
}

/// Writes a web UI `parameters` text from its parts. Every key must satisfy
/// [`is_valid_webui_key`]; values are quoted where needed. A text with fewer than three
/// settings is not recognised as having a settings line when read back (the web UI's rule).
pub fn format_webui_parameters(
    prompt: &str,
    negative_prompt: &str,
    settings: &[(String, String)],
) -> Result<String> {
    for (k, _) in settings {
        if !is_valid_webui_key(k) {
            return Err(Error::value(
                "parameters key",
                format!(
                    "{k:?}: a key must be a letter, digit or `_` followed by at least one letter, \
                     digit, `_`, space, `-` or `/`"
                ),
            ));
        }
    }
    Ok(format_unchecked(prompt, negative_prompt, settings))
}

/// A web UI `parameters` text taken apart.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ParsedParameters {
    /// The prompt (all lines before `Negative prompt:`).
    pub prompt: String,
    /// The negative prompt; empty when the text has none.
    pub negative_prompt: String,
    /// The settings of the last line, in order, values unquoted.
    pub settings: Vec<(String, String)>,
}

impl ParsedParameters {
    /// The value of the first setting named `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// One match of the web UI's pattern
/// `\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)` at `start`: key, raw value, end.
fn match_setting(s: &[char], start: usize) -> Option<(String, String, usize)> {
    let n = s.len();
    let mut i = start;
    while i < n && is_py_space(s[i]) {
        i += 1;
    }
    if i >= n || !is_word(s[i]) {
        return None;
    }
    let key_start = i;
    let mut j = i + 1;
    while j < n && is_key_char(s[j]) {
        j += 1;
    }
    if j == i + 1 || j >= n || s[j] != ':' {
        return None;
    }
    let key: String = s[key_start..j].iter().collect();
    let mut i = j + 1;
    while i < n && is_py_space(s[i]) {
        i += 1;
    }
    // First alternative: a double-quoted string with backslash escapes, at least one character
    // inside, followed by `,` or the end of the line.
    if i < n && s[i] == '"' {
        let mut k = i + 1;
        let mut close = None;
        while k < n {
            match s[k] {
                '\\' if k + 1 < n && s[k + 1] != '\n' => k += 2,
                '\\' => break,
                '"' => {
                    close = Some(k);
                    break;
                }
                _ => k += 1,
            }
        }
        if let Some(q) = close {
            if q > i + 1 && (q + 1 == n || s[q + 1] == ',') {
                let raw: String = s[i..=q].iter().collect();
                let end = if q + 1 == n { n } else { q + 2 };
                return Some((key, raw, end));
            }
        }
    }
    // Second alternative: everything up to the next comma.
    let mut k = i;
    while k < n && s[k] != ',' {
        k += 1;
    }
    let raw: String = s[i..k].iter().collect();
    let end = if k < n { k + 1 } else { n };
    Some((key, raw, end))
}

/// All settings on a line, as the web UI's `re_param.findall` finds them, values unquoted.
fn find_settings(line: &str) -> Vec<(String, String)> {
    let s: Vec<char> = line.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < s.len() {
        match match_setting(&s, i) {
            Some((k, raw, end)) => {
                out.push((k, unquote(raw)));
                i = end;
            }
            None => i += 1,
        }
    }
    out
}

fn unquote(raw: String) -> String {
    if raw.starts_with('"') && raw.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(&raw) {
            return s;
        }
    }
    raw
}

/// Takes a web UI `parameters` text apart: prompt, negative prompt and the settings of the
/// last line. Reads texts written by [`webui_parameters`] exactly (see the module
/// documentation) and those of AUTOMATIC1111 and compatible web UIs. Lines are kept as they
/// are (not trimmed); the first line starting with `Negative prompt:` begins the negative
/// prompt. The last line counts as the settings line when it holds at least three settings,
/// as in the web UI; a text without one is an error.
pub fn parse_webui_parameters(text: &str) -> Result<ParsedParameters> {
    let text = text.trim_end_matches(is_py_space);
    if text.is_empty() {
        return Err(Error::value("parameters", "the text is empty"));
    }
    let (body, last) = match text.rfind('\n') {
        Some(i) => (Some(&text[..i]), &text[i + 1..]),
        None => (None, text),
    };
    let settings = find_settings(last);
    if settings.len() < 3 {
        return Err(Error::value(
            "parameters",
            "no settings line at the end (expected `Steps: ..., Sampler: ..., CFG scale: ...`)",
        ));
    }
    let mut prompt: Vec<&str> = Vec::new();
    let mut negative: Vec<&str> = Vec::new();
    let mut in_negative = false;
    if let Some(body) = body {
        for line in body.split('\n') {
            if in_negative {
                negative.push(line);
            } else if let Some(rest) = line.strip_prefix(NEGATIVE_PREFIX) {
                in_negative = true;
                negative.push(rest.strip_prefix(' ').unwrap_or(rest));
            } else {
                prompt.push(line);
            }
        }
    }
    Ok(ParsedParameters {
        prompt: prompt.join("\n"),
        negative_prompt: negative.join("\n"),
        settings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample() -> GenerationParams {
        GenerationParams {
            prompt: "a painting of a fox, (oil:1.2), \"quoted\"".into(),
            negative_prompt: "blurry, lowres".into(),
            seed: 42,
            steps: 20,
            guidance_scale: 7.5,
            scheduler: "ddim".into(),
            sampler: "DDIM".into(),
            width: 512,
            height: 768,
            model: "runwayml/stable-diffusion-v1-5".into(),
            model_hash: "abcd1234ef".into(),
            dtype: "f16".into(),
            device: "cuda:0".into(),
            ..Default::default()
        }
    }

    fn check_round_trip(prompt: &str, neg: &str, settings: &[(String, String)]) {
        let text = format_webui_parameters(prompt, neg, settings).unwrap();
        let parsed = parse_webui_parameters(&text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert_eq!(parsed.prompt, prompt, "text: {text:?}");
        assert_eq!(parsed.negative_prompt, neg, "text: {text:?}");
        assert_eq!(parsed.settings, settings, "text: {text:?}");
    }

    #[test]
    fn webui_text_layout() {
        let p = sample();
        let text = webui_parameters(&p);
        let version = format!("Version: artguide {TOOL_VERSION}");
        assert_eq!(
            text,
            format!(
                "a painting of a fox, (oil:1.2), \"quoted\"\nNegative prompt: blurry, lowres\n\
                 Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 512x768, \
                 Model hash: abcd1234ef, Model: runwayml/stable-diffusion-v1-5, {version}"
            )
        );
        // img2img adds the denoising strength; an empty negative prompt drops its line.
        let mut q = p.clone();
        q.negative_prompt.clear();
        q.strength = Some(0.75);
        q.guidance_scale = 7.0;
        q.model = "C:\\models\\sd.safetensors".into();
        let text = webui_parameters(&q);
        assert!(text.starts_with("a painting of a fox, (oil:1.2), \"quoted\"\nSteps: 20,"));
        assert!(text.contains(
            "CFG scale: 7.0, Seed: 42, Size: 512x768, Model hash: abcd1234ef, \
             Model: \"C:\\\\models\\\\sd.safetensors\", Denoising strength: 0.75, Version:"
        ));
        let parsed = parse_webui_parameters(&text).unwrap();
        assert_eq!(parsed.get("Model"), Some("C:\\models\\sd.safetensors"));
        assert_eq!(parsed.get("Denoising strength"), Some("0.75"));
        assert_eq!(parsed.negative_prompt, "");
    }

    #[test]
    fn webui_round_trip_of_params() {
        let mut p = sample();
        p.prompt =
            "line one, with: colon\n  indented \"quote\" line\n\nünïcödé 猫 🦊 prompt".into();
        p.negative_prompt = "neg, one\nneg two".into();
        p.extra
            .insert("CLIP guidance scale".into(), serde_json::json!(100.0));
        p.extra
            .insert("clip_model".into(), serde_json::json!("ViT-B/32, laion"));
        p.extra.insert("bad:key".into(), serde_json::json!(1));
        p.extra.insert("cutouts".into(), serde_json::json!(4));
        p.extra.insert("list".into(), serde_json::json!([1, 2]));
        let text = webui_parameters(&p);
        let parsed = parse_webui_parameters(&text).unwrap();
        assert_eq!(parsed.prompt, p.prompt);
        assert_eq!(parsed.negative_prompt, p.negative_prompt);
        assert_eq!(parsed.settings, p.webui_settings());
        assert_eq!(parsed.get("CLIP guidance scale"), Some("100.0"));
        assert_eq!(parsed.get("clip_model"), Some("ViT-B/32, laion"));
        assert_eq!(parsed.get("cutouts"), Some("4"));
        assert_eq!(parsed.get("bad:key"), None);
        assert_eq!(parsed.get("list"), None);
        assert_eq!(parsed.settings.last().unwrap().0, "Version");
    }

    #[test]
    fn webui_round_trip_edge_cases() {
        let s = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let base = s(&[("Steps", "20"), ("Sampler", "Euler a"), ("Seed", "1")]);
        check_round_trip("", "", &base);
        check_round_trip("", "neg", &base);
        check_round_trip("\n\n", "\n", &base);
        check_round_trip(" leading and trailing ", " x ", &base);
        check_round_trip("Steps: 1, Sampler: a, Seed: 2", "", &base);
        check_round_trip(
            "p\nSteps: 1, Sampler: a, Seed: 2",
            "Steps: 1, b: 2, c: 3",
            &base,
        );
        check_round_trip("tab\tand \\ backslash", "\u{7f}\u{2028}", &base);
        let tricky = s(&[
            ("Steps", ""),
            ("Sampler", " "),
            ("A b", "\""),
            ("c-d/e", "\"x\""),
            ("ff", "\\"),
            ("g_", "a\\\"b"),
            ("hh", "x\ny, z: w"),
            ("ii", "trailing "),
            ("jj", "\u{1}\u{1f}ctrl"),
            ("kk", "🦊, 猫"),
            ("Version", "artguide 0.1.0"),
        ]);
        check_round_trip("p", "n", &tricky);
        assert!(format_webui_parameters("p", "", &s(&[("x", "1")])).is_err());
        assert!(format_webui_parameters("p", "", &s(&[("a:b", "1")])).is_err());
    }

    #[test]
    fn webui_round_trip_random() {
        let alphabet: Vec<char> = "ab ,:\"\\\n\t\r'()[]{}-/_=😀é猫\u{0}\u{1f}\u{85}\u{a0}"
            .chars()
            .collect();
        let keys: Vec<char> = "abXY_ -/é9".chars().collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        fn rand_string(rng: &mut rand_chacha::ChaCha8Rng, from: &[char], max: usize) -> String {
            let n = rng.random_range(0..=max);
            (0..n)
                .map(|_| from[rng.random_range(0..from.len())])
                .collect()
        }
        for _ in 0..2000 {
            let prompt = rand_string(&mut rng, &alphabet, 30);
            let neg = rand_string(&mut rng, &alphabet, 20);
            if prompt.split('\n').any(|l| l.starts_with(NEGATIVE_PREFIX)) {
                continue;
            }
            let n = rng.random_range(3..7);
            let mut settings = Vec::new();
            while settings.len() < n {
                let k = format!("K{}x", rand_string(&mut rng, &keys, 6));
                let v = rand_string(&mut rng, &alphabet, 12);
                settings.push((k, v));
            }
            check_round_trip(&prompt, &neg, &settings);
        }
    }

    #[test]
    fn parses_webui_written_text() {
        // As written by AUTOMATIC1111 (quoted values, bare flags, extension keys).
        let text = "masterpiece, best quality\nsecond line\nNegative prompt: bad hands\n\
            Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3,\
             Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
            Lora hashes: \"add_detail: 7c6bad76eb54\", NGMS, Version: v1.9.4\n";
        let p = parse_webui_parameters(text).unwrap();
        assert_eq!(p.prompt, "masterpiece, best quality\nsecond line");
        assert_eq!(p.negative_prompt, "bad hands");
        assert_eq!(p.get("Sampler"), Some("DPM++ 2M"));
        assert_eq!(p.get("Size"), Some("512x768"));
        assert_eq!(p.get("Lora hashes"), Some("add_detail: 7c6bad76eb54"));
        assert_eq!(p.get("Version"), Some("v1.9.4"));
        assert_eq!(p.settings.len(), 10);
        assert!(parse_webui_parameters("just a prompt, no: settings").is_err());
        assert!(parse_webui_parameters(" \n ").is_err());
    }

    #[test]
    fn sampler_names() {
        assert_eq!(webui_sampler_name("ddim"), "DDIM");
        assert_eq!(webui_sampler_name("euler-a"), "Euler a");
        assert_eq!(webui_sampler_name("euler_ancestral"), "Euler a");
        assert_eq!(
            webui_sampler_name("EulerAncestralDiscreteScheduler"),
            "Euler a"
        );
        assert_eq!(webui_sampler_name("euler"), "Euler");
        assert_eq!(webui_sampler_name("dpm++2m"), "DPM++ 2M");
        assert_eq!(webui_sampler_name("dpmpp-2m"), "DPM++ 2M");
        assert_eq!(webui_sampler_name("uni-pc"), "UniPC");
        assert_eq!(webui_sampler_name("my-own"), "my-own");
        let mut p = sample();
        p.sampler.clear();
        p.scheduler = "euler-a".into();
        assert!(webui_parameters(&p).contains("Sampler: Euler a,"));
    }

    #[test]
    fn params_json_round_trip() {
        let mut p = sample();
        p.strength = Some(0.5);
        p.init_image = Some("in.png".into());
        p.extra
            .insert("clip_guidance_scale".into(), serde_json::json!(100));
        let json = serde_json::to_string(&p).unwrap();
        let back: GenerationParams = serde_json::from_str(&json).unwrap();
        assert_eq!(back, p);
        assert_eq!(py_float(7.0), "7.0");
        assert_eq!(py_float(0.1), "0.1");
    }
}
