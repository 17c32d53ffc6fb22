//! Meta's Llama 3 tokenizer (tiktoken `tokenizer.model`) against Python `tiktoken` built as
//! `llama_models/llama3/tokenizer.py` builds it, and its tokenizer.json conversion against
//! Hugging Face `tokenizers`.
//!
//! The model file comes from `$KILN_TEST_LLAMA3_TOKENIZER`, else
//! `$KILN_HOME/models/llama3-tokenizer/tokenizer.model`.

mod tokenizer_common;

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use kiln_engine::tokenizer::{StreamDecoder, Tokenizer, TokenizerData};
use serde_json::Value;
use tokenizer_common::{assert_same_ids, id_lists, locate, reference_ids, strings};

struct Fixture {
    data: TokenizerData,
    tok: Tokenizer,
    json: String,
    strings: Vec<String>,
    /// Output of `tiktoken_ids.py` for tiktoken and for `json` loaded by `tokenizers`.
    reference: Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let model: PathBuf = locate(
            "KILN_TEST_LLAMA3_TOKENIZER",
            "models/llama3-tokenizer/tokenizer.model",
        );
        let bytes = std::fs::read(&model).unwrap();
        let data = TokenizerData::from_tiktoken(&bytes).expect("reading tokenizer.model");
        let tok = Tokenizer::new(&data).expect("building the tokenizer");
        let json = data.to_tokenizer_json().expect("writing tokenizer.json");
        let dir = tempfile::tempdir().unwrap();
        let json_path = dir.path().join("tokenizer.json");
        std::fs::write(&json_path, &json).unwrap();
        let reference = reference_ids(Some(&model), Some(&json_path));
        Fixture {
            data,
            tok,
            json,
            strings: strings(),
            reference,
        }
    })
}

fn encode_all(tok: &Tokenizer, strings: &[String], parse_special: bool) -> Vec<Vec<u32>> {
    strings
        .iter()
        .map(|s| tok.encode(s, parse_special))
        .collect()
}

#[test]
fn meta_special_tokens() {
    let f = fixture();
    let tok = &f.tok;
    assert_eq!(tok.vocab_size(), 128_256);
    assert_eq!(f.data.bos_id(), Some(128_000));
    assert_eq!(f.data.eos_id(), Some(128_001));
    let expected = [
        ("<|begin_of_text|>", 128_000),
        ("<|end_of_text|>", 128_001),
        ("<|finetune_right_pad_id|>", 128_004),
        ("<|start_header_id|>", 128_006),
        ("<|end_header_id|>", 128_007),
        ("<|eom_id|>", 128_008),
        ("<|eot_id|>", 128_009),
        ("<|python_tag|>", 128_010),
        ("<|reserved_special_token_245|>", 128_255),
    ];
    for (text, id) in expected {
        assert_eq!(tok.token_id(text), Some(id), "{text}");
        assert!(tok.is_special(id));
    }
    assert!(!tok.is_special(127_999));
}

#[test]
fn matches_tiktoken() {
    let f = fixture();
    assert!(f.strings.len() >= 300, "{} strings", f.strings.len());
    for (mode, parse_special) in [("plain", false), ("special", true)] {
        let theirs = id_lists(&f.reference, &format!("/tiktoken/{mode}"));
        let ours = encode_all(&f.tok, &f.strings, parse_special);
        assert_same_ids(
            &format!("kiln vs tiktoken ({mode})"),
            &f.strings,
            &ours,
            &theirs,
        );
    }
}

#[test]
fn decode_and_stream_invert_encode() {
    let f = fixture();
    for s in &f.strings {
        for parse_special in [false, true] {
            let ids = f.tok.encode(s, parse_special);
            assert_eq!(f.tok.decode(&ids), *s);
            let mut stream = StreamDecoder::new();
            let streamed: String = ids.iter().map(|&id| stream.push(&f.tok, id)).collect();
            assert_eq!(streamed + &stream.finish(), *s);
        }
    }
}

/// The converted tokenizer.json, loaded by Hugging Face `tokenizers`, gives tiktoken's ids,
/// and so does kiln reading it back.
#[test]
fn tokenizer_json_matches_tiktoken() {
    let f = fixture();
    let from_json =
        TokenizerData::from_tokenizer_json(f.json.as_bytes()).expect("reading tokenizer.json");
    let from_json = Tokenizer::new(&from_json).unwrap();
    for (mode, parse_special) in [("plain", false), ("special", true)] {
        let tiktoken = id_lists(&f.reference, &format!("/tiktoken/{mode}"));
        let hf = id_lists(&f.reference, &format!("/hf/{mode}"));
        assert_same_ids(
            &format!("tokenizers vs tiktoken ({mode})"),
            &f.strings,
            &hf,
            &tiktoken,
        );
        let ours = encode_all(&from_json, &f.strings, parse_special);
        assert_same_ids(
            &format!("kiln tokenizer.json vs tiktoken ({mode})"),
            &f.strings,
            &ours,
            &tiktoken,
        );
    }
    let default = id_lists(&f.reference, "/hf/default");
    let tiktoken = id_lists(&f.reference, "/tiktoken/special");
    assert_same_ids(
        "tokenizers with add_special_tokens (no BOS added)",
        &f.strings,
        &default,
        &tiktoken,
    );
    let decoded: Vec<String> =
        serde_json::from_value(f.reference["hf"]["decoded"].clone()).unwrap();
    assert_eq!(decoded, f.strings);
}

#[test]
fn binary_round_trip() {
    let f = fixture();
    let bytes = f.data.to_bytes();
    assert_eq!(TokenizerData::from_bytes(&bytes).unwrap(), f.data);
    for cut in [0, 10, 20, bytes.len() / 2, bytes.len() - 1] {
        assert!(
            TokenizerData::from_bytes(&bytes[..cut]).is_err(),
            "cut at {cut}"
        );
    }
}

/// 20 KB of mixed text encodes well under 100 ms (release build).
#[test]
fn encodes_20kb_quickly() {
    let f = fixture();
    let mut text = String::new();
    for s in f.strings.iter().cycle() {
        if text.len() >= 20_000 {
            break;
        }
        text.push_str(s);
        text.push(' ');
    }
    let long_runs = format!(
        "{}{}{}",
        " ".repeat(5000),
        "a".repeat(5000),
        "9".repeat(5000)
    );
    for input in [&text, &long_runs] {
        let start = Instant::now();
        let ids = f.tok.encode(input, true);
        let elapsed = start.elapsed();
        assert_eq!(f.tok.decode(&ids), *input);
        if !cfg!(debug_assertions) {
            assert!(
                elapsed.as_millis() < 100,
                "{} bytes took {elapsed:?}",
                input.len()
            );
        }
    }
}
