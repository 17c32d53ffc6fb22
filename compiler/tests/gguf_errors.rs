//! Bad GGUF input: every failure is an error naming the file and the problem, never a panic or a
//! huge allocation, and the source file is left byte for byte as it was.
//!
//! Tiny files are crafted by a test-only GGUF v3 writer; truncations cut the real default model.

mod common;

use std::path::{Path, PathBuf};

use kiln_compiler::import::import;

/// ggml tensor types used here.
const GGML_F32: u32 = 0;
const GGML_Q4_K: u32 = 12;
const GGML_IQ4_XS: u32 = 23;

/// GGUF metadata value type ids.
const GGUF_U32: u32 = 4;
const GGUF_F32: u32 = 6;
const GGUF_STRING: u32 = 8;
const GGUF_ARRAY: u32 = 9;
const GGUF_U64: u32 = 10;

// The tiny Llama: 16 tokens, 8 wide, 2 heads of 4 sharing 1 KV head, FFN 16, one layer.
const VOCAB: usize = 16;
const HIDDEN: usize = 8;
const HEADS: usize = 2;
const KV_HEADS: usize = 1;
const HEAD_DIM: usize = 4;
const FFN: usize = 16;

/// One metadata value.
#[derive(Clone)]
enum Val {
    U32(u32),
    U64(u64),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    /// A type id followed by raw bytes, for values no honest writer would produce.
    Raw(u32, Vec<u8>),
}

#[derive(Clone)]
struct TensorSpec {
    name: String,
    /// ggml order: the row length first.
    dims: Vec<u64>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// A GGUF file to be written by [`Gguf::to_bytes`].
#[derive(Clone)]
struct Gguf {
    magic: [u8; 4],
    version: u32,
    kvs: Vec<(String, Val)>,
    tensors: Vec<TensorSpec>,
}

const ALIGNMENT: usize = 32;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
}

/// An f32 tensor of row-major `shape` with small deterministic values.
fn f32_tensor(name: &str, shape: &[usize]) -> TensorSpec {
    let n: usize = shape.iter().product();
    let data = (0..n)
        .flat_map(|i| (((i * 7919) % 97) as f32 / 97.0 - 0.5).to_le_bytes())
        .collect();
    TensorSpec {
        name: name.to_owned(),
        dims: shape.iter().rev().map(|&d| d as u64).collect(),
        ggml_type: GGML_F32,
        data,
    }
}

impl Gguf {
    /// A complete, importable Llama GGUF (f32 weights, byte-level BPE vocabulary).
    fn tiny_llama() -> Gguf {
        let u = |v: usize| Val::U32(v as u32);
        let kvs = vec![
            ("general.architecture", Val::Str("llama".into())),
            ("general.name", Val::Str("kiln-gguf-errors".into())),
            ("llama.context_length", u(64)),
            ("llama.embedding_length", u(HIDDEN)),
            ("llama.feed_forward_length", u(FFN)),
            ("llama.block_count", u(1)),
            ("llama.attention.head_count", u(HEADS)),
            ("llama.attention.head_count_kv", u(KV_HEADS)),
            ("llama.attention.layer_norm_rms_epsilon", Val::F32(1e-5)),
            ("llama.rope.freq_base", Val::F32(10_000.0)),
            ("tokenizer.ggml.model", Val::Str("gpt2".into())),
            ("tokenizer.ggml.pre", Val::Str("gpt-2".into())),
            (
                "tokenizer.ggml.tokens",
                Val::Strs(
                    (b'a'..)
                        .take(VOCAB)
                        .map(|c| (c as char).to_string())
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.eos_token_id", u(1)),
        ];
        let (q, kv) = (HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM);
        let tensors = vec![
            f32_tensor("token_embd.weight", &[VOCAB, HIDDEN]),
            f32_tensor("blk.0.attn_norm.weight", &[HIDDEN]),
            f32_tensor("blk.0.attn_q.weight", &[q, HIDDEN]),
            f32_tensor("blk.0.attn_k.weight", &[kv, HIDDEN]),
            f32_tensor("blk.0.attn_v.weight", &[kv, HIDDEN]),
            f32_tensor("blk.0.attn_output.weight", &[HIDDEN, q]),
            f32_tensor("blk.0.ffn_norm.weight", &[HIDDEN]),
            f32_tensor("blk.0.ffn_gate.weight", &[FFN, HIDDEN]),
            f32_tensor("blk.0.ffn_up.weight", &[FFN, HIDDEN]),
            f32_tensor("blk.0.ffn_down.weight", &[HIDDEN, FFN]),
            f32_tensor("output_norm.weight", &[HIDDEN]),
        ];
        Gguf {
            magic: *b"GGUF",
            version: 3,
            kvs: kvs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            tensors,
        }
    }

    /// Replaces the value of `key`, or appends it.
    fn set(mut self, key: &str, val: Val) -> Gguf {
        match self.kvs.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = val,
            None => self.kvs.push((key.to_owned(), val)),
        }
        self
    }

    fn without_tensor(mut self, name: &str) -> Gguf {
        let before = self.tensors.len();
        self.tensors.retain(|t| t.name != name);
        assert_eq!(self.tensors.len(), before - 1, "no tensor {name}");
        self
    }

    fn replace_tensor(self, t: TensorSpec) -> Gguf {
        let name = t.name.clone();
        let mut g = self.without_tensor(&name);
        g.tensors.push(t);
        g
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kvs.len() as u64).to_le_bytes());
        for (key, val) in &self.kvs {
            put_str(&mut out, key);
            match val {
                Val::U32(v) => {
                    out.extend_from_slice(&GGUF_U32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Val::U64(v) => {
                    out.extend_from_slice(&GGUF_U64.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Val::F32(v) => {
                    out.extend_from_slice(&GGUF_F32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Val::Str(s) => {
                    out.extend_from_slice(&GGUF_STRING.to_le_bytes());
                    put_str(&mut out, s);
                }
                Val::Strs(items) => {
                    out.extend_from_slice(&GGUF_ARRAY.to_le_bytes());
                    out.extend_from_slice(&GGUF_STRING.to_le_bytes());
                    out.extend_from_slice(&(items.len() as u64).to_le_bytes());
                    for s in items {
                        put_str(&mut out, s);
                    }
                }
                Val::Raw(ty, raw) => {
                    out.extend_from_slice(&ty.to_le_bytes());
                    out.extend_from_slice(raw);
                }
            }
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset = (offset + t.data.len() as u64).div_ceil(ALIGNMENT as u64) * ALIGNMENT as u64;
        }
        pad(&mut out);
        for t in &self.tensors {
            out.extend_from_slice(&t.data);
            pad(&mut out);
        }
        out
    }

    /// Writes the file as `name` under `dir`.
    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        write_bytes(dir, name, &self.to_bytes())
    }
}

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write test file");
    path
}

/// Imports `path`, which must fail with a message naming the file and holding every phrase;
/// the file must be unchanged afterwards. Returns the message.
fn expect_import_error(path: &Path, phrases: &[&str]) -> String {
    let before = std::fs::read(path).ok();
    let message = match import(path) {
        Ok(c) => panic!(
            "{}: imported ({} layers) but should have failed",
            path.display(),
            c.facts.layers
        ),
        Err(e) => e.to_string(),
    };
    let message = common::assert_names_file(message, path, phrases);
    let after = std::fs::read(path).ok();
    assert!(before == after, "{} changed during import", path.display());
    message
}

fn temp_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn tiny_gguf_writer_makes_an_importable_file() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama().write(dir.path(), "tiny.gguf");
    let checkpoint = import(&path).expect("the unmodified tiny GGUF imports");
    let f = &checkpoint.facts;
    assert_eq!(
        (f.vocab_size, f.hidden_size, f.heads, f.kv_heads, f.head_dim),
        (VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM)
    );
    assert_eq!(checkpoint.weights.layers.len(), 1);
    assert!(checkpoint.weights.lm_head.is_none());
}

#[test]
fn truncated_real_gguf_is_refused_at_every_cut() {
    let source = common::smollm2_gguf();
    let original = std::fs::read(&source).expect("read the default model");
    let parsed = kiln_compiler::import::gguf::GgufFile::open(&source).expect("parse the model");
    let data_start = parsed
        .tensors
        .values()
        .map(|t| t.start)
        .min()
        .expect("tensors");
    let len = original.len();
    assert!(data_start > 100_000 && data_start < len);
    let dir = temp_dir();
    let cuts = [
        (0, "empty"),
        (2, "inside the magic"),
        (10, "inside the header's tensor count"),
        (20, "inside the header's metadata count"),
        (24 + 1_000, "inside the metadata (counts cannot fit)"),
        (24 + 20_000, "inside the metadata"),
        (data_start / 2, "inside the vocabulary"),
        (data_start - 40, "inside the tensor infos or their padding"),
        (data_start + 100, "inside the tensor data"),
        ((data_start + len) / 2, "inside the tensor data"),
        (len - 1, "one byte short"),
    ];
    for (cut, where_) in cuts {
        let path = write_bytes(dir.path(), &format!("cut-{cut}.gguf"), &original[..cut]);
        let message = expect_import_error(&path, &["truncated"]);
        println!("  (cut at {cut}: {where_})");
        assert!(!message.is_empty());
        std::fs::remove_file(&path).expect("remove cut file");
    }
    assert!(
        std::fs::read(&source).expect("re-read the model") == original,
        "the default model changed"
    );
}

#[test]
fn wrong_magic() {
    let dir = temp_dir();
    let mut g = Gguf::tiny_llama();
    g.magic = *b"GGML";
    let path = g.write(dir.path(), "magic.gguf");
    expect_import_error(&path, &["not a GGUF file", "magic"]);
}

#[test]
fn unsupported_versions() {
    let dir = temp_dir();
    for version in [1, 4, u32::MAX] {
        let mut g = Gguf::tiny_llama();
        g.version = version;
        let path = g.write(dir.path(), &format!("v{version}.gguf"));
        expect_import_error(
            &path,
            &[&format!("GGUF version {version} is not supported")],
        );
    }
}

#[test]
fn unsupported_ggml_type() {
    let dir = temp_dir();
    let mut t = f32_tensor("blk.0.attn_q.weight", &[HEADS * HEAD_DIM, HIDDEN]);
    t.ggml_type = GGML_IQ4_XS;
    let path = Gguf::tiny_llama()
        .replace_tensor(t)
        .write(dir.path(), "iq4_xs.gguf");
    expect_import_error(
        &path,
        &[
            "blk.0.attn_q.weight",
            "ggml type 23 (IQ4_XS) is not supported",
        ],
    );
    // A K-quant needs rows of whole 256-value super-blocks.
    let mut t = f32_tensor("blk.0.attn_q.weight", &[HEADS * HEAD_DIM, HIDDEN]);
    t.ggml_type = GGML_Q4_K;
    let path = Gguf::tiny_llama()
        .replace_tensor(t)
        .write(dir.path(), "q4k.gguf");
    expect_import_error(&path, &["blk.0.attn_q.weight", "does not fit q4_k"]);
}

/// llama.cpp's `general.sampling.*` keys become the model's recommended sampling; a value no
/// sampler takes is an error naming the key's problem.
#[test]
fn sampling_keys_are_the_models_defaults_and_bad_ones_are_refused() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .set("general.sampling.temp", Val::F32(0.6))
        .set("general.sampling.top_p", Val::F32(0.9))
        .set("general.sampling.top_k", Val::U32(20))
        .write(dir.path(), "sampling.gguf");
    let sampling = import(&path).expect("import").facts.sampling;
    assert_eq!(
        (
            sampling.temperature,
            sampling.top_p,
            sampling.top_k,
            sampling.min_p
        ),
        (Some(0.6), Some(0.9), Some(20), None)
    );
    let path = Gguf::tiny_llama()
        .set("general.sampling.temp", Val::F32(f32::NAN))
        .write(dir.path(), "nan-temp.gguf");
    expect_import_error(&path, &["sampling temperature NaN is not 0 or more"]);
    let path = Gguf::tiny_llama()
        .set("general.sampling.top_p", Val::F32(1.5))
        .write(dir.path(), "top-p.gguf");
    expect_import_error(&path, &["sampling top_p 1.5 is not in (0, 1]"]);
}

/// Facts the runtime would refuse are refused at import (the `gguf` fuzz target found a file with
/// no layers that imported, compiled, and wrote an artifact no runtime would load).
#[test]
fn facts_the_runtime_refuses_are_refused_at_import() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .set("llama.block_count", Val::U32(0))
        .write(dir.path(), "no-layers.gguf");
    expect_import_error(&path, &["model facts: layers 0 is outside 1..=1024"]);
}

#[test]
fn unsupported_architecture() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .set("general.architecture", Val::Str("gpt2".into()))
        .write(dir.path(), "gpt2.gguf");
    expect_import_error(&path, &["architecture \"gpt2\" is not supported"]);
}

#[test]
fn missing_tensor() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .without_tensor("blk.0.attn_q.weight")
        .write(dir.path(), "no-q.gguf");
    expect_import_error(&path, &["tensor blk.0.attn_q.weight is missing"]);
}

#[test]
fn wrong_tensor_shape() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .replace_tensor(f32_tensor("blk.0.attn_q.weight", &[HEAD_DIM, HIDDEN]))
        .write(dir.path(), "short-q.gguf");
    expect_import_error(
        &path,
        &["tensor blk.0.attn_q.weight has shape [4, 8], expected [8, 8]"],
    );
}

#[test]
fn tensor_data_past_the_end() {
    let dir = temp_dir();
    let mut bytes = Gguf::tiny_llama().to_bytes();
    // The last tensor (output_norm) is 32 bytes of f32: drop its last 8.
    bytes.truncate(bytes.len() - 8);
    let path = write_bytes(dir.path(), "short-data.gguf", &bytes);
    expect_import_error(
        &path,
        &["tensor output_norm.weight lies past the end of the file"],
    );
}

#[test]
fn huge_array_length_is_not_allocated() {
    let dir = temp_dir();
    for item_type in [GGUF_STRING, GGUF_U32, 0 /* u8 */] {
        let mut raw = item_type.to_le_bytes().to_vec();
        raw.extend_from_slice(&(1u64 << 61).to_le_bytes());
        let path = Gguf::tiny_llama()
            .set("tokenizer.ggml.merges", Val::Raw(GGUF_ARRAY, raw))
            .write(dir.path(), &format!("huge-array-{item_type}.gguf"));
        expect_import_error(&path, &["length 2305843009213693952 runs past the end"]);
    }
}

#[test]
fn huge_string_length_is_not_allocated() {
    let dir = temp_dir();
    let mut bytes = Gguf::tiny_llama().to_bytes();
    // The first key's length, right after the 24-byte header.
    bytes[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
    let path = write_bytes(dir.path(), "huge-key.gguf", &bytes);
    expect_import_error(&path, &["runs past the end"]);
}

#[test]
fn huge_counts_in_the_header() {
    let dir = temp_dir();
    for (at, what) in [(8, "tensor count"), (16, "metadata count")] {
        let mut bytes = Gguf::tiny_llama().to_bytes();
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let path = write_bytes(dir.path(), &format!("huge-{at}.gguf"), &bytes);
        expect_import_error(&path, &["cannot fit in the rest of the file"]);
        println!("  ({what} u64::MAX)");
    }
}

#[test]
fn huge_tensor_dimensions() {
    let dir = temp_dir();
    let mut t = f32_tensor("blk.0.attn_q.weight", &[HEADS * HEAD_DIM, HIDDEN]);
    // 2^62 f32 values per row: 2^64 bytes, which wraps a usize to 0 without checks.
    t.dims = vec![1 << 62, 1];
    let path = Gguf::tiny_llama()
        .replace_tensor(t)
        .write(dir.path(), "huge-dims.gguf");
    expect_import_error(&path, &["blk.0.attn_q.weight", "does not fit"]);
}

#[test]
fn huge_block_count_is_not_allocated() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .set("llama.block_count", Val::U64(1 << 40))
        .write(dir.path(), "huge-blocks.gguf");
    expect_import_error(&path, &["tensor blk.1.attn_q.weight is missing"]);
}

#[test]
fn odd_head_dimension() {
    let dir = temp_dir();
    // One-wide heads: RoPE rotates pairs, so a head dimension of 1 (or any odd one) is corrupt.
    let path = Gguf::tiny_llama()
        .set("llama.rope.dimension_count", Val::U32(1))
        .replace_tensor(f32_tensor("blk.0.attn_q.weight", &[HEADS, HIDDEN]))
        .replace_tensor(f32_tensor("blk.0.attn_k.weight", &[KV_HEADS, HIDDEN]))
        .replace_tensor(f32_tensor("blk.0.attn_v.weight", &[KV_HEADS, HIDDEN]))
        .replace_tensor(f32_tensor("blk.0.attn_output.weight", &[HIDDEN, HEADS]))
        .write(dir.path(), "odd-head.gguf");
    expect_import_error(&path, &["head dimension 1"]);
}

#[test]
fn inconsistent_head_counts() {
    let dir = temp_dir();
    let path = Gguf::tiny_llama()
        .set("llama.attention.head_count", Val::U32(3))
        .write(dir.path(), "three-heads.gguf");
    expect_import_error(&path, &["inconsistent attention shape"]);
}

#[test]
fn missing_metadata_key() {
    let dir = temp_dir();
    let mut g = Gguf::tiny_llama();
    g.kvs.retain(|(k, _)| k != "llama.embedding_length");
    let path = g.write(dir.path(), "no-width.gguf");
    expect_import_error(&path, &["metadata key llama.embedding_length is missing"]);
}

#[test]
fn path_that_does_not_exist() {
    let dir = temp_dir();
    let path = dir.path().join("no-such-model.gguf");
    expect_import_error(&path, &["No such file or directory"]);
    assert!(!path.exists(), "import created {}", path.display());
}

#[test]
fn directory_without_config_json() {
    let dir = temp_dir();
    let model_dir = dir.path().join("model");
    std::fs::create_dir(&model_dir).expect("mkdir");
    write_bytes(&model_dir, "model.safetensors", b"not really");
    expect_import_error(&model_dir, &["config.json"]);
    let names: Vec<_> = std::fs::read_dir(&model_dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(
        names,
        ["model.safetensors"],
        "import wrote into the directory"
    );
}
