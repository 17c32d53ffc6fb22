//! The tokenizer embedded in SmolLM2-135M-Instruct's GGUF, checked against llama.cpp's ids
//! (`testdata/golden/smollm2-135m-instruct.json`) and against Hugging Face `tokenizers`.
//!
//! The model file comes from `$KILN_TEST_GGUF`, else
//! `$KILN_HOME/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf`.

mod tokenizer_common;

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;
use std::sync::OnceLock;

use kiln_engine::tokenizer::{StreamDecoder, Tokenizer, TokenizerData};
use serde_json::Value;
use tokenizer_common::{assert_same_ids, id_lists, locate, reference_ids, strings};

/// The metadata values a tokenizer needs; other GGUF value types are skipped.
#[derive(Default)]
struct Metadata {
    strings: HashMap<String, String>,
    string_arrays: HashMap<String, Vec<String>>,
    i32_arrays: HashMap<String, Vec<i32>>,
    u32s: HashMap<String, u32>,
}

enum GgufValue {
    U32(u32),
    Str(String),
    Strings(Vec<String>),
    I32s(Vec<i32>),
    Skipped,
}

struct GgufReader<R: Read>(R);

impl<R: Read> GgufReader<R> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut buf = [0; N];
        self.0.read_exact(&mut buf).expect("GGUF truncated");
        buf
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }

    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }

    fn string(&mut self) -> String {
        let len = self.u64() as usize;
        let mut buf = vec![0; len];
        self.0.read_exact(&mut buf).expect("GGUF truncated");
        String::from_utf8(buf).expect("GGUF string is not UTF-8")
    }

    /// GGUF value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string,
    /// 9 array, 10 u64, 11 i64, 12 f64.
    fn value(&mut self, ty: u32) -> GgufValue {
        match ty {
            0 | 1 | 7 => drop(self.bytes::<1>()),
            2 | 3 => drop(self.bytes::<2>()),
            4 => return GgufValue::U32(self.u32()),
            5 | 6 => drop(self.bytes::<4>()),
            8 => return GgufValue::Str(self.string()),
            10..=12 => drop(self.bytes::<8>()),
            9 => {
                let elem = self.u32();
                let n = self.u64() as usize;
                match elem {
                    8 => return GgufValue::Strings((0..n).map(|_| self.string()).collect()),
                    5 => {
                        let ints = (0..n).map(|_| i32::from_le_bytes(self.bytes())).collect();
                        return GgufValue::I32s(ints);
                    }
                    _ => (0..n).for_each(|_| drop(self.value(elem))),
                }
            }
            other => panic!("unknown GGUF value type {other}"),
        }
        GgufValue::Skipped
    }
}

fn read_metadata(path: &Path) -> Metadata {
    let file = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut r = GgufReader(BufReader::new(file));
    assert_eq!(
        &r.bytes::<4>(),
        b"GGUF",
        "{} is not a GGUF file",
        path.display()
    );
    let version = r.u32();
    assert!(version >= 2, "GGUF version {version}");
    let _tensors = r.u64();
    let kv_count = r.u64();
    let mut meta = Metadata::default();
    for _ in 0..kv_count {
        let key = r.string();
        let ty = r.u32();
        match r.value(ty) {
            GgufValue::U32(v) => drop(meta.u32s.insert(key, v)),
            GgufValue::Str(v) => drop(meta.strings.insert(key, v)),
            GgufValue::Strings(v) => drop(meta.string_arrays.insert(key, v)),
            GgufValue::I32s(v) => drop(meta.i32_arrays.insert(key, v)),
            GgufValue::Skipped => {}
        }
    }
    meta
}

fn data() -> &'static TokenizerData {
    static DATA: OnceLock<TokenizerData> = OnceLock::new();
    DATA.get_or_init(|| {
        let path = locate(
            "KILN_TEST_GGUF",
            "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
        );
        let meta = read_metadata(&path);
        let s = |k: &str| {
            meta.strings
                .get(k)
                .unwrap_or_else(|| panic!("no {k}"))
                .as_str()
        };
        let list = |k: &str| {
            meta.string_arrays
                .get(k)
                .unwrap_or_else(|| panic!("no {k}"))
        };
        TokenizerData::from_gguf(
            s("tokenizer.ggml.model"),
            s("tokenizer.ggml.pre"),
            list("tokenizer.ggml.tokens"),
            meta.i32_arrays
                .get("tokenizer.ggml.token_type")
                .map_or(&[], Vec::as_slice),
            list("tokenizer.ggml.merges"),
            meta.u32s.get("tokenizer.ggml.bos_token_id").copied(),
            meta.u32s.get("tokenizer.ggml.eos_token_id").copied(),
        )
        .expect("reading the GGUF tokenizer")
    })
}

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::new(data()).expect("building the tokenizer"))
}

fn golden() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/golden/smollm2-135m-instruct.json");
    serde_json::from_slice(&std::fs::read(path).expect("reading the golden file")).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    serde_json::from_value(v.clone()).expect("an id list")
}

#[test]
fn vocabulary_facts() {
    let tok = tokenizer();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(data().bos_id(), Some(1));
    assert_eq!(data().eos_id(), Some(2));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert_eq!(tok.token_id(" Paris"), Some(7042));
    assert!(tok.is_special(0) && tok.is_special(2) && tok.is_special(16));
    assert!(!tok.is_special(17) && !tok.is_special(7042));
}

/// Prompt ids exactly as llama.cpp tokenized them (the chat case parses special tokens).
#[test]
fn golden_prompt_ids_match_llama_cpp() {
    let tok = tokenizer();
    let golden = golden();
    let cases = golden["greedy"]["cases"].as_array().expect("cases");
    let names: Vec<&str> = cases.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, ["p1", "p2", "chat"]);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let expected = ids(&case["prompt_ids"]);
        assert_eq!(tok.encode(prompt, true), expected, "{prompt:?}");
        assert_eq!(tok.decode(&expected), prompt);
    }
    let chat = cases[2]["prompt"].as_str().unwrap();
    let plain = tok.encode(chat, false);
    assert!(!plain.iter().any(|&id| tok.is_special(id)), "{plain:?}");
    assert_eq!(tok.decode(&plain), chat);
}

/// llama.cpp's generated text and top-10 pieces decode identically, streamed or not.
#[test]
fn golden_generations_decode_like_llama_cpp() {
    let tok = tokenizer();
    let golden = golden();
    let mut checked = 0;
    for case in golden["greedy"]["cases"].as_array().unwrap() {
        for variant in ["F32", "Q4_1"] {
            let run = &case[variant];
            let generated: Vec<u32> = ids(&run["generated_ids"])
                .into_iter()
                .filter(|&id| !tok.is_special(id))
                .collect();
            let text = run["generated_text"].as_str().unwrap();
            assert_eq!(tok.decode(&generated), text);
            let mut stream = StreamDecoder::new();
            let streamed: String = generated.iter().map(|&id| stream.push(tok, id)).collect();
            assert_eq!(streamed + &stream.finish(), text);
            for top in run["first_step_top10"].as_array().unwrap() {
                let id = top["id"].as_u64().unwrap() as u32;
                let bytes = tok.token_bytes(id).unwrap();
                if let Ok(piece) = std::str::from_utf8(bytes) {
                    assert_eq!(piece, top["piece"].as_str().unwrap(), "token {id}");
                    checked += 1;
                }
            }
        }
    }
    assert!(checked >= 50, "only {checked} top-10 pieces compared");
}

#[test]
fn decode_inverts_encode() {
    let tok = tokenizer();
    for s in strings() {
        for parse_special in [false, true] {
            assert_eq!(tok.decode(&tok.encode(&s, parse_special)), s, "{s:?}");
        }
    }
}

/// The GGUF vocabulary written as tokenizer.json: Hugging Face `tokenizers` loads it and
/// encodes every test string as kiln does, and kiln reads it back to the same ids.
#[test]
fn tokenizer_json_matches_hugging_face() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("tokenizer.json");
    let json = data().to_tokenizer_json().unwrap();
    std::fs::write(&json_path, &json).unwrap();
    let reference = reference_ids(None, Some(&json_path));
    let strings = strings();
    let from_json =
        Tokenizer::new(&TokenizerData::from_tokenizer_json(json.as_bytes()).unwrap()).unwrap();
    for (mode, parse_special) in [("plain", false), ("special", true)] {
        let ours: Vec<Vec<u32>> = strings
            .iter()
            .map(|s| tok.encode(s, parse_special))
            .collect();
        let hf = id_lists(&reference, &format!("/hf/{mode}"));
        assert_same_ids(
            &format!("GGUF vs tokenizers ({mode})"),
            &strings,
            &ours,
            &hf,
        );
        let back: Vec<Vec<u32>> = strings
            .iter()
            .map(|s| from_json.encode(s, parse_special))
            .collect();
        assert_same_ids(
            &format!("GGUF vs kiln tokenizer.json ({mode})"),
            &strings,
            &ours,
            &back,
        );
    }
    let decoded: Vec<String> = serde_json::from_value(reference["hf"]["decoded"].clone()).unwrap();
    assert_eq!(decoded, strings);
    let ours: Vec<Vec<u32>> = strings.iter().map(|s| tok.encode(s, true)).collect();
    let default = id_lists(&reference, "/hf/default");
    assert_same_ids(
        "tokenizers with add_special_tokens (no BOS added)",
        &strings,
        &ours,
        &default,
    );
}

#[test]
fn binary_round_trip() {
    let bytes = data().to_bytes();
    let back = TokenizerData::from_bytes(&bytes).unwrap();
    assert_eq!(&back, data());
    assert!(TokenizerData::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    let mut corrupt = bytes.clone();
    let middle = corrupt.len() / 2;
    corrupt[middle] ^= 0xff;
    let err = TokenizerData::from_bytes(&corrupt).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}
