//! kiln's K-quant mixtures against llama.cpp's `llama-quantize`: the default model in f16 (its
//! GGUF's blocks dequantized and rounded to f16, the file a user would hand llama-quantize),
//! quantized by kiln to `q4_k_m`, `q5_k_m` and `q6_k`, gives every matrix the type and the
//! bytes llama-quantize's `Q4_K_M`, `Q5_K_M` and `Q6_K` give it.
//!
//! With `KILN_TEST_LLAMA_QUANTIZE` naming a `llama-quantize` binary the test runs it on the same
//! f16 file and compares live; `KILN_TEST_RECORD=1` then rewrites the recorded types and sha256s
//! in `testdata/quant/llama_quantize_smollm2.json`, which the test compares against otherwise
//! (CI has no llama.cpp build). Recorded with llama.cpp 0c1e570's native (`-march=native`,
//! Zen 5) build; its AVX2-only build writes the same bytes (ggml's reference quantizers live in
//! ggml-base, which is built without `-march`).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_compiler::gguf_write::{self, GgufTensor};
use kiln_compiler::import::gguf::{GgufFile, Value};
use kiln_compiler::quant::{quantize_tensor, Mixture, QuantPlan};
use kiln_engine::generate::Model;
use kiln_engine::perplexity::{perplexity, Windows};
use kiln_runtime::kernels::Level;
use kiln_runtime::quant::Format;
use sha2::{Digest, Sha256};

/// kiln's mixture and llama-quantize's name for the same file type.
const MIXTURES: [(Mixture, &str); 3] = [
    (Mixture::Q4KM, "Q4_K_M"),
    (Mixture::Q5KM, "Q5_K_M"),
    (Mixture::Q6K, "Q6_K"),
];

/// Each matrix's storage: its format's name and the sha256 of its bytes, by GGUF tensor name.
type Stored = BTreeMap<String, (String, String)>;

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn recorded_path() -> PathBuf {
    common::testdata().join("quant/llama_quantize_smollm2.json")
}

/// Writes the default model with every matrix in f16 (vectors as stored) to `path`.
fn write_f16_model(path: &Path) {
    let source = GgufFile::open(&common::smollm2_gguf()).expect("open the default model");
    let mut names: Vec<&String> = source.tensors.keys().collect();
    names.sort();
    let mut tensors = Vec::new();
    for name in names {
        let info = &source.tensors[name];
        // GGUF lists dimensions innermost first.
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let stored = kiln_compiler::graph::Tensor {
            name: name.clone(),
            shape: shape.clone(),
            format: info.format,
            data: source.tensor_bytes(info).to_vec(),
        };
        let t = if shape.len() == 2 {
            quantize_tensor(&stored.dequantized(), Format::F16).expect("to f16")
        } else {
            stored
        };
        tensors.push(GgufTensor {
            name: name.clone(),
            shape,
            format: t.format,
            bytes: Box::new(move |out| out.write_all(&t.data)),
        });
    }
    const FILE_TYPE: &str = "general.file_type";
    let metadata: Vec<(&str, Value)> = source
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != FILE_TYPE)
        .map(|(k, v)| (k.as_str(), v.clone()))
        // llama.cpp's LLAMA_FTYPE_MOSTLY_F16.
        .chain([(FILE_TYPE, Value::U32(1))])
        .collect();
    gguf_write::write(path, &metadata, &tensors, |_| {}).expect("write the f16 GGUF");
}

/// The matrices of the GGUF file at `path`.
fn stored_in(path: &Path) -> Stored {
    let gguf = GgufFile::open(path).expect("open llama-quantize's output");
    gguf.tensors
        .iter()
        .filter(|(_, info)| info.dims.len() == 2)
        .map(|(name, info)| {
            let bytes = gguf.tensor_bytes(info);
            (name.clone(), (info.format.name().to_owned(), sha256(bytes)))
        })
        .collect()
}

/// What kiln stores for `mixture`, rows of q and k back in the GGUF's (RoPE-interleaved) order.
fn kiln_stored(f16_model: &Path, mixture: Mixture) -> Stored {
    let checkpoint = kiln_compiler::import::import(f16_model).expect("import the f16 model");
    let quantized = QuantPlan::mixture(mixture)
        .apply(&checkpoint)
        .expect("quantize");
    let head_dim = quantized.facts.head_dim;
    let half = head_dim / 2;
    quantized
        .weights
        .tensors()
        .into_iter()
        .filter(|t| t.shape.len() == 2)
        .map(|t| {
            let t = if t.name.contains(".attn_q.") || t.name.contains(".attn_k.") {
                // The inverse of import's un-permutation: GGUF row 2i + j of a head holds
                // Hugging Face row j·half + i.
                t.with_rows_from(|g| {
                    let (head, within) = (g / head_dim, g % head_dim);
                    head * head_dim + (within % 2) * half + within / 2
                })
            } else {
                t.clone()
            };
            (
                t.name.clone(),
                (t.format.name().to_owned(), sha256(&t.data)),
            )
        })
        .collect()
}

/// `all` as the recorded file's JSON, one matrix a line.
fn recorded_text(all: &BTreeMap<String, Stored>) -> String {
    let quote = |s: &str| serde_json::to_string(s).expect("json string");
    let files: Vec<String> = all
        .iter()
        .map(|(ftype, stored)| {
            let lines: Vec<String> = stored
                .iter()
                .map(|(name, (f, h))| {
                    format!("      {}: [{}, {}]", quote(name), quote(f), quote(h))
                })
                .collect();
            format!("    {}: {{\n{}\n    }}", quote(ftype), lines.join(",\n"))
        })
        .collect();
    format!(
        "{{\n  \"what\": {},\n  \"llama.cpp\": {},\n  \"files\": {{\n{}\n  }}\n}}\n",
        quote("llama-quantize's matrices (format, sha256 of the bytes) for the default model's GGUF dequantized to f16, by file type; rewrite with KILN_TEST_LLAMA_QUANTIZE=<llama-quantize> KILN_TEST_RECORD=1 cargo test --release -p kiln-compiler --test quant_mixtures"),
        quote("0c1e570 (vendored in llama-cpp-python 0.3.36), native build (-march=native, Zen 5)"),
        files.join(",\n")
    )
}

/// llama-quantize's output for every mixture: run live, or as recorded.
fn llama_stored(f16_model: &Path, dir: &Path) -> BTreeMap<String, Stored> {
    let Some(binary) = std::env::var_os("KILN_TEST_LLAMA_QUANTIZE") else {
        let text =
            std::fs::read_to_string(recorded_path()).expect("recorded llama-quantize output");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        return serde_json::from_value(json["files"].clone()).expect("files");
    };
    let mut all = BTreeMap::new();
    for (_, ftype) in MIXTURES {
        let out = dir.join(format!("llama.{ftype}.gguf"));
        let status = Command::new(&binary)
            .arg(f16_model)
            .arg(&out)
            .arg(ftype)
            .output()
            .expect("run llama-quantize");
        assert!(
            status.status.success(),
            "llama-quantize {ftype}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        all.insert(ftype.to_owned(), stored_in(&out));
        std::fs::remove_file(&out).expect("remove");
    }
    if std::env::var_os("KILN_TEST_RECORD").is_some() {
        std::fs::write(recorded_path(), recorded_text(&all)).expect("record");
    }
    all
}

#[test]
fn k_quant_mixtures_write_llama_quantizes_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let f16_model = dir.path().join("smollm2.f16.gguf");
    write_f16_model(&f16_model);
    let theirs = llama_stored(&f16_model, dir.path());
    for (mixture, ftype) in MIXTURES {
        let ours = kiln_stored(&f16_model, mixture);
        let theirs = &theirs[ftype];
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{ftype}: the same matrices"
        );
        let types_differ: Vec<_> = ours
            .iter()
            .filter(|(name, (f, _))| *f != theirs[*name].0)
            .map(|(name, (f, _))| format!("{name}: kiln {f}, llama.cpp {}", theirs[name].0))
            .collect();
        assert!(types_differ.is_empty(), "{ftype}: {types_differ:#?}");
        let bytes_differ: Vec<_> = ours
            .iter()
            .filter(|(name, (_, h))| *h != theirs[*name].1)
            .map(|(name, (f, _))| format!("{name} ({f})"))
            .collect();
        assert!(
            bytes_differ.is_empty(),
            "{ftype}: bytes differ in {bytes_differ:#?}"
        );
        let mut counts = BTreeMap::new();
        for (f, _) in ours.values() {
            *counts.entry(f.as_str()).or_insert(0) += 1;
        }
        println!("{ftype}: {} matrices identical: {counts:?}", ours.len());
    }
}

/// kiln's perplexity of the golden text on its own `q4_k_m` and `q6_k` (the bytes of
/// llama-quantize's files, as above), packed for this CPU's kernels, is within 1 % of
/// `llama-perplexity`'s on llama-quantize's files (recorded in testdata/quant).
#[test]
fn k_quant_perplexity_within_1_percent_of_llama_cpp() {
    let path = common::testdata().join("quant/llama_perplexity_kquants.json");
    let recorded: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json");
    let dir = tempfile::tempdir().expect("temp dir");
    let f16_model = dir.path().join("smollm2.f16.gguf");
    write_f16_model(&f16_model);
    let checkpoint = kiln_compiler::import::import(&f16_model).expect("import the f16 model");
    let text =
        std::fs::read_to_string(common::testdata().join("golden/apache-2.0.txt")).expect("text");
    let ctx = recorded["ctx"].as_u64().expect("ctx") as usize;
    for (mixture, key) in [(Mixture::Q4KM, "Q4_K_M"), (Mixture::Q6K, "Q6_K")] {
        let quantized =
            kiln_compiler::emit::convert_with(&checkpoint, &QuantPlan::mixture(mixture))
                .expect("quantize");
        let out = dir.path().join(format!("{key}.kiln"));
        let packing = kiln_compiler::emit::Packing::new(&[], Level::best().preferred_layout());
        kiln_compiler::emit::write_artifact_for(&quantized, &out, &packing).expect("write");
        let model = Model::open(&out).expect("open");
        let tokens = model.encode_prompt(&text, true);
        let score = perplexity(&model, &tokens, &Windows::of(ctx), &common::two_threads())
            .expect("perplexity");
        let want = recorded["ppl"][key].as_f64().expect("ppl");
        assert_eq!(
            score.chunks as u64,
            recorded["chunks"].as_u64().expect("chunks")
        );
        let rel = (score.ppl - want) / want;
        println!(
            "{key}: kiln perplexity {:.4}, llama.cpp {want} ({:+.2}%)",
            score.ppl,
            rel * 100.0
        );
        assert!(
            rel.abs() <= 0.01,
            "{key}: kiln {:.4} vs llama.cpp {want}",
            score.ppl
        );
    }
}
