//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` builds it.
//!
//! A tokenizer folder holds `tokenizer.json`, or `vocab.json` + `merges.txt` (Stable Diffusion
//! 2.x ships only the latter), plus optionally `tokenizer_config.json` and
//! `special_tokens_map.json` naming the special tokens and `model_max_length`.
//!
//! Like transformers, the named special tokens (bos, eos, unk, pad) are registered as added
//! tokens: they are matched in the raw text before normalisation and map straight to their
//! ids. This matters for SD 2.x, whose pad token is `!` (id 0): transformers then encodes every
//! `!` in a prompt as id 0, not as the BPE word `!</w>` (id 256) that open_clip produces.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{unicode::NFC, utils::Lowercase, Replace, Sequence as NormSeq};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer,
};

use crate::{Error, Result};

/// CLIP's pre-tokenisation pattern (transformers' `CLIPTokenizer`, after the special-token
/// alternatives that it puts first).
pub const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Sequence length when the folder does not say (CLIP's context length).
pub const DEFAULT_MAX_LENGTH: usize = 77;

const DEFAULT_BOS: &str = "<|startoftext|>";
const DEFAULT_EOS: &str = "<|endoftext|>";

/// A CLIP tokenizer with the padding and truncation transformers applies for Stable Diffusion
/// (`padding="max_length"`, `truncation=True`, `max_length=model_max_length`).
#[derive(Clone, Debug)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    dir: PathBuf,
}

/// A special token as a config file gives it: a string, or an `AddedToken` object.
fn added_token(value: &Value, path: &Path, field: &str) -> Result<AddedToken> {
    match value {
        Value::String(s) => Ok(AddedToken::from(s.clone(), true)),
        Value::Object(m) => {
            let content = m.get("content").and_then(Value::as_str).ok_or_else(|| {
                Error::field(path, format!("{field}.content"), "missing or not a string")
            })?;
            let flag = |name: &str, default: bool| -> bool {
                m.get(name).and_then(Value::as_bool).unwrap_or(default)
            };
            Ok(AddedToken::from(content.to_string(), true)
                .lstrip(flag("lstrip", false))
                .rstrip(flag("rstrip", false))
                .single_word(flag("single_word", false))
                .normalized(flag("normalized", false))
                .special(flag("special", true)))
        }
        other => Err(Error::field(
            path,
            field,
            format!("expected a string or a token object, found {other}"),
        )),
    }
}

fn read_json_object(path: &Path) -> Result<Option<serde_json::Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        Ok(_) => Err(Error::file(path, "expected a JSON object")),
        Err(e) => Err(Error::file(path, format!("not valid JSON: {e}"))),
    }
}

/// The special tokens and length settings of a tokenizer folder.
struct Settings {
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
    /// `added_tokens_decoder` of tokenizer_config.json, sorted by id.
    added: Vec<AddedToken>,
    max_length: usize,
}

impl Settings {
    fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let map_path = dir.join("special_tokens_map.json");
        let config = read_json_object(&config_path)?.unwrap_or_default();
        let map = read_json_object(&map_path)?.unwrap_or_default();

        // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        let token = |name: &str, default: &str| -> Result<AddedToken> {
            if let Some(v) = map.get(name).filter(|v| !v.is_null()) {
                return added_token(v, &map_path, name);
            }
            if let Some(v) = config.get(name).filter(|v| !v.is_null()) {
                return added_token(v, &config_path, name);
            }
            Ok(AddedToken::from(default.to_string(), true))
        };

        let mut added = Vec::new();
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let entries = decoder.as_object().ok_or_else(|| {
                Error::field(&config_path, "added_tokens_decoder", "expected an object")
            })?;
            let mut sorted = Vec::new();
            for (id, value) in entries {
                let field = format!("added_tokens_decoder.{id}");
                let id: u64 = id
                    .parse()
                    .map_err(|_| Error::field(&config_path, &field, "key is not a token id"))?;
                sorted.push((id, added_token(value, &config_path, &field)?));
            }
            sorted.sort_by_key(|(id, _)| *id);
            added = sorted.into_iter().map(|(_, t)| t).collect();
        }

        let max_length = match config.get("model_max_length") {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            // transformers writes a huge number (1e30) for "no limit": use CLIP's context.
            Some(v) => match v.as_u64() {
                Some(n) if (3..=1 << 20).contains(&n) => n as usize,
                Some(n) if n > 1 << 20 => DEFAULT_MAX_LENGTH,
                _ if v.as_f64().is_some_and(|f| f > (1u64 << 20) as f64) => DEFAULT_MAX_LENGTH,
                _ => {
                    return Err(Error::field(
                        &config_path,
                        "model_max_length",
                        format!("expected an integer of at least 3, found {v}"),
                    ))
                }
            },
        };

        Ok(Self {
            bos: token("bos_token", DEFAULT_BOS)?,
            eos: token("eos_token", DEFAULT_EOS)?,
            unk: token("unk_token", DEFAULT_EOS)?,
            pad: token("pad_token", DEFAULT_EOS)?,
            added,
            max_length,
        })
    }
}

/// Builds transformers' `CLIPTokenizer` pipeline around a BPE model: NFC, whitespace
/// collapsed to one space, lowercase; split on [`CLIP_PATTERN`] (keeping the matches), then
/// byte-level mapping without prefix space; BPE with `</w>` ending each word.
fn clip_pipeline(bpe: BPE) -> std::result::Result<Tokenizer, tokenizers::Error> {
    let mut tokenizer = Tokenizer::new(bpe);
    let normalizer = NormSeq::new(vec![
        NormalizerWrapper::NFC(NFC),
        NormalizerWrapper::Replace(Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )?),
        NormalizerWrapper::Lowercase(Lowercase),
    ]);
    let split = Split::new(
        SplitPattern::Regex(CLIP_PATTERN.into()),
        SplitDelimiterBehavior::Removed,
        true,
    )?;
    // transformers uses ByteLevel(add_prefix_space=False) with its default use_regex=True;
    // after CLIP's split, GPT-2's regex cuts no piece further, so either gives the same ids.
    let byte_level = ByteLevel::new(false, true, true);
    let pre = PreSeq::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(byte_level),
    ]);
    tokenizer
        .with_normalizer(Some(normalizer))?
        .with_pre_tokenizer(Some(pre))
        .with_decoder(Some(ByteLevelDecoder::default()));
    Ok(tokenizer)
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt` with CLIP's pipeline built here; special tokens and `model_max_length`
    /// (default 77) from `tokenizer_config.json` / `special_tokens_map.json` when present.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::file(
                dir,
                "not a folder; expected a tokenizer folder with tokenizer.json or vocab.json + merges.txt",
            ));
        }
        let settings = Settings::read(dir)?;
        let json = dir.join("tokenizer.json");
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");

        let mut tokenizer = if json.is_file() {
            let text = std::fs::read_to_string(&json).map_err(|e| Error::io(&json, e))?;
            // tokenizers panics on some JSON syntax errors (its decoder's `expect("Helper")`),
            // so the syntax is checked here first.
            serde_json::from_str::<serde::de::IgnoredAny>(&text)
                .map_err(|e| Error::file(&json, format!("not valid JSON: {e}")))?;
            text.parse::<Tokenizer>()
                .map_err(|e| Error::file(&json, format!("not a readable tokenizer: {e}")))?
        } else if vocab.is_file() && merges.is_file() {
            // Read here so a bad vocab.json is named as such: tokenizers' own errors do not
            // say which of the two files they are about.
            let text = std::fs::read_to_string(&vocab).map_err(|e| Error::io(&vocab, e))?;
            serde_json::from_str::<std::collections::HashMap<String, u32>>(&text).map_err(|e| {
                Error::file(
                    &vocab,
                    format!("not a vocabulary (a JSON object of token -> id): {e}"),
                )
            })?;
            let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
                .end_of_word_suffix("</w>".into())
                .continuing_subword_prefix(String::new())
                .unk_token(settings.unk.content.clone())
                .fuse_unk(false)
                .build()
                .map_err(|e| {
                    Error::file(
                        &merges,
                        format!("could not build BPE from these merges (with vocab.json): {e}"),
                    )
                })?;
            clip_pipeline(bpe)
                .map_err(|e| Error::file(dir, format!("could not build the CLIP pipeline: {e}")))?
        } else {
            return Err(Error::file(
                dir,
                "no tokenizer here: expected tokenizer.json or vocab.json + merges.txt",
            ));
        };

        // We add bos/eos, truncate and pad ourselves.
        tokenizer.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::file(dir, format!("tokenizer: {e}")))?;
        tokenizer.with_padding(None);

        // As transformers: tokens of added_tokens_decoder, then the named special tokens.
        let named = [&settings.bos, &settings.eos, &settings.unk, &settings.pad];
        tokenizer
            .add_special_tokens(settings.added.iter().cloned())
            .and_then(|_| tokenizer.add_special_tokens(named.iter().map(|t| (*t).clone())))
            .map_err(|e| Error::file(dir, format!("could not add special tokens: {e}")))?;

        let id_of = |token: &AddedToken, field: &str| -> Result<u32> {
            tokenizer.token_to_id(&token.content).ok_or_else(|| {
                Error::field(
                    dir.join("tokenizer_config.json"),
                    field,
                    format!("token `{}` is not in the vocabulary", token.content),
                )
            })
        };
        let bos_id = id_of(&settings.bos, "bos_token")?;
        let eos_id = id_of(&settings.eos, "eos_token")?;
        let pad_id = id_of(&settings.pad, "pad_token")?;
        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: settings.max_length,
            dir: dir.to_path_buf(),
        })
    }

    /// Sequence length of [`ClipTokenizer::encode`]'s output (`model_max_length`).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Id of the start token (`<|startoftext|>`).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end token (`<|endoftext|>`).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id of the padding token (`<|endoftext|>` for SD 1.x, `!` = 0 for SD 2.x).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The underlying `tokenizers` pipeline (no post-processor, truncation or padding).
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The ids of `text` alone: no start/end tokens, no truncation, no padding.
    pub fn tokens(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| {
            Error::value(
                "prompt",
                format!("tokenizer from {}: {e}", self.dir.display()),
            )
        })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `bos + tokens + eos`, the tokens truncated so the whole fits `max_length` (eos kept
    /// last), then padded with the pad id to exactly `max_length`.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let tokens = self.tokens(text)?;
        let room = self.max_length - 2;
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend(tokens.iter().take(room));
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// [`ClipTokenizer::encode`] for each text.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }

    /// The encoded texts as a (batch, max_length) u32 tensor, ready for the text tower.
    pub fn encode_tensor<S: AsRef<str>>(&self, texts: &[S], device: &Device) -> Result<Tensor> {
        let rows = self.encode_batch(texts)?;
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        Ok(Tensor::from_vec(
            flat,
            (texts.len(), self.max_length),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A toy CLIP vocabulary: the 256 byte symbols, each also with `</w>`, a few merges,
    /// then the two special tokens last (as in CLIP, where they are 49406 and 49407).
    fn toy_folder(dir: &Path, pad: Option<&str>, with_config: bool) {
        let mut symbols = Vec::new();
        // GPT-2's byte-to-unicode table.
        let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut cs = bs.clone();
        let mut n = 0;
        for b in 0..256u32 {
            if !bs.contains(&b) {
                bs.push(b);
                cs.push(256 + n);
                n += 1;
            }
        }
        for c in &cs {
            symbols.push(char::from_u32(*c).unwrap().to_string());
        }
        let mut vocab: Vec<String> = symbols.clone();
        vocab.extend(symbols.iter().map(|s| format!("{s}</w>")));
        let merges = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>"];
        for m in merges {
            vocab.push(m.replace(' ', ""));
        }
        vocab.push("<|startoftext|>".into());
        vocab.push("<|endoftext|>".into());
        let map: serde_json::Map<String, Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), Value::from(i as u64)))
            .collect();
        std::fs::write(dir.join("vocab.json"), Value::Object(map).to_string()).unwrap();
        let mut f = std::fs::File::create(dir.join("merges.txt")).unwrap();
        writeln!(f, "#version: 0.2").unwrap();
        for m in merges {
            writeln!(f, "{m}").unwrap();
        }
        if with_config {
            let mut config = serde_json::json!({
                "model_max_length": 8,
                "bos_token": {"content": "<|startoftext|>", "lstrip": false,
                              "normalized": true, "rstrip": false, "single_word": false},
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            });
            if let Some(p) = pad {
                config["pad_token"] = Value::from(p);
            }
            std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
        }
    }

    fn id(vocab_dir: &Path, token: &str) -> u32 {
        let text = std::fs::read_to_string(vocab_dir.join("vocab.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        v[token].as_u64().unwrap() as u32
    }

    #[test]
    fn encodes_with_bos_eos_and_padding() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), None, true);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let (bos, eos) = (
            id(dir.path(), "<|startoftext|>"),
            id(dir.path(), "<|endoftext|>"),
        );
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (bos, eos, eos));
        assert_eq!(tok.max_length(), 8);
        let cat = id(dir.path(), "cat</w>");
        let dog = id(dir.path(), "dog</w>");
        let the = id(dir.path(), "the</w>");
        // Lowercased, whitespace collapsed.
        assert_eq!(
            tok.encode("  The CAT\n\tdog ").unwrap(),
            vec![bos, the, cat, dog, eos, eos, eos, eos]
        );
        // Punctuation runs and digits split as CLIP does.
        let bang = id(dir.path(), "!</w>");
        let one = id(dir.path(), "1</w>");
        let two = id(dir.path(), "2</w>");
        assert_eq!(tok.tokens("cat!12").unwrap(), vec![cat, bang, one, two]);
        // Truncation keeps eos last.
        let long = tok.encode("cat cat cat cat cat cat cat cat").unwrap();
        assert_eq!(long, vec![bos, cat, cat, cat, cat, cat, cat, eos]);
        let batch = tok.encode_batch(&["cat", "dog"]).unwrap();
        assert_eq!(batch[1][..3], [bos, dog, eos]);
        let t = tok.encode_tensor(&["cat", "dog"], &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 8]);
        // Special tokens written in the text map to their ids.
        assert_eq!(tok.tokens("cat<|endoftext|>").unwrap(), vec![cat, eos]);
    }

    #[test]
    fn bang_pad_is_an_added_token() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), Some("!"), true);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        let bang = id(dir.path(), "!");
        assert_eq!(tok.pad_id(), bang);
        let cat = id(dir.path(), "cat</w>");
        // As in transformers: `!` is matched as the pad token, not BPE'd to `!</w>`.
        assert_eq!(tok.tokens("cat!").unwrap(), vec![cat, bang]);
        let enc = tok.encode("cat").unwrap();
        assert_eq!(enc[3..], [bang; 5]);
    }

    #[test]
    fn defaults_without_config_files() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), None, false);
        let tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.max_length(), DEFAULT_MAX_LENGTH);
        assert_eq!(tok.encode("dog").unwrap().len(), 77);
        assert_eq!(tok.pad_id(), tok.eos_id());
    }

    #[test]
    fn tokenizer_json_round_trip_matches_vocab_files() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), None, true);
        let from_vocab = ClipTokenizer::from_dir(dir.path()).unwrap();
        let other = tempfile::tempdir().unwrap();
        from_vocab
            .inner()
            .save(other.path().join("tokenizer.json"), false)
            .unwrap();
        std::fs::copy(
            dir.path().join("tokenizer_config.json"),
            other.path().join("tokenizer_config.json"),
        )
        .unwrap();
        let from_json = ClipTokenizer::from_dir(other.path()).unwrap();
        for text in [
            "The cat, the DOG!",
            "a  b\nc 123 <|startoftext|>",
            "naïve café's",
        ] {
            assert_eq!(
                from_vocab.encode(text).unwrap(),
                from_json.encode(text).unwrap()
            );
        }
    }

    #[test]
    fn missing_files_name_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.json"), "{}").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err();
        match &err {
            Error::File { path, message } => {
                assert_eq!(path, dir.path());
                assert!(message.contains("tokenizer.json or vocab.json + merges.txt"));
            }
            other => panic!("unexpected {other:?}"),
        }
        let gone = dir.path().join("absent");
        assert!(matches!(
            ClipTokenizer::from_dir(&gone),
            Err(Error::File { .. })
        ));
    }

    #[test]
    fn unlimited_model_max_length_means_77() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), None, false);
        // What transformers writes when no limit is set (VERY_LARGE_INTEGER).
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 1000000000000000019884624838656}"#,
        )
        .unwrap();
        assert_eq!(
            ClipTokenizer::from_dir(dir.path()).unwrap().max_length(),
            77
        );
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 2}"#,
        )
        .unwrap();
        match ClipTokenizer::from_dir(dir.path()).unwrap_err() {
            Error::Field { field, .. } => assert_eq!(field, "model_max_length"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), None, false);
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"pad_token": "<|nothere|>"}"#,
        )
        .unwrap();
        // An unknown pad token becomes a new added token, as in transformers, so this is fine;
        // a malformed one is not.
        ClipTokenizer::from_dir(dir.path()).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"pad_token": 5}"#,
        )
        .unwrap();
        match ClipTokenizer::from_dir(dir.path()).unwrap_err() {
            Error::Field { field, .. } => assert_eq!(field, "pad_token"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_cut_tokenizer_json_is_an_error_not_a_panic() {
        // Cuts inside the `decoder` object made tokenizers panic (`expect("Helper")`).
        let fixture = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-sd-a/tokenizer"
        );
        let text = std::fs::read_to_string(format!("{fixture}/tokenizer.json")).unwrap();
        let decoder = text.find("\"decoder\"").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        let end = text.trim_end().len();
        for cut in [decoder + 20, decoder + 60, decoder + 80, end / 2, end - 1] {
            std::fs::write(&json, &text[..cut]).unwrap();
            let err = std::panic::catch_unwind(|| ClipTokenizer::from_dir(dir.path()))
                .unwrap_or_else(|_| panic!("panicked on a cut at byte {cut}"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("tokenizer.json") && err.contains("not valid JSON"),
                "{err}"
            );
        }
        std::fs::write(&json, &text).unwrap();
        assert!(ClipTokenizer::from_dir(dir.path()).is_ok());
    }

    /// Each of vocab.json and merges.txt is named when it is the bad one.
    #[test]
    fn a_bad_vocab_or_merges_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        toy_folder(dir.path(), None, true);
        assert!(ClipTokenizer::from_dir(dir.path()).is_ok());
        let merges = std::fs::read_to_string(dir.path().join("merges.txt")).unwrap();
        std::fs::write(dir.path().join("merges.txt"), format!("{merges}lonely\n")).unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("merges.txt: could not build BPE"), "{err}");
        std::fs::write(dir.path().join("merges.txt"), &merges).unwrap();
        std::fs::write(dir.path().join("vocab.json"), "{\"a\": \"one\"}").unwrap();
        let err = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json:") && err.contains("not a vocabulary"),
            "{err}"
        );
    }
}
