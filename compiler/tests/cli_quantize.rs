//! `cargo xtask quantize` as a user runs it on the default model, with one `--quant` and
//! `--override` written both ways: the `.kiln` artifact holds the formats asked for and the
//! `kiln` binary answers with it; the `.onnx` holds `MatMulNBits` nodes and, in onnxruntime,
//! gives the artifact's logits (kiln with float activations, as `MatMulNBits` computes). Bad
//! arguments are clear errors that leave nothing behind.

mod common;
mod onnx_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_compiler::onnx::proto;
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::quant::Format;
use onnx_common::{kiln_logits, max_abs_diff, ort_logits, temp_dir, Steps};
use prost::Message;
use serde_json::Value;

/// As in `onnx_matmulnbits.rs`: the same blocks on both sides, float activations.
const TOLERANCE: f32 = 1e-3;
const QUANT: [&str; 4] = ["--quant", "q4_0", "--override", "blk.*.ffn_down=q8_0"];

fn xtask() -> Command {
    Command::new(common::binary("xtask", "cargo build --release -p xtask"))
}

fn kiln() -> Command {
    Command::new(common::kiln_binary())
}

/// `cargo xtask quantize --model <default model> ARGS -o OUT`.
fn quantize(args: &[&str], out: &Path) -> Output {
    xtask()
        .arg("quantize")
        .arg("--model")
        .arg(common::smollm2_gguf())
        .args(args)
        .arg("-o")
        .arg(out)
        .output()
        .expect("running xtask")
}

fn stdout_json(what: &str, out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: not JSON ({e}): {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// The storage format of every weight matrix whose name contains `role`.
fn formats_of(artifact: &Artifact, role: &str) -> Vec<Format> {
    let formats: Vec<Format> = artifact
        .meta()
        .tensors
        .iter()
        .filter(|t| t.name.contains(role) && t.shape.len() == 2)
        .map(|t| t.format)
        .collect();
    assert!(!formats.is_empty(), "no tensor named like {role}");
    formats
}

#[test]
fn the_kiln_and_onnx_outputs_hold_the_same_quantization_and_agree() {
    let dir = temp_dir();
    let kiln_path = dir.path().join("smollm2-q4_0.kiln");
    let onnx_path = dir.path().join("smollm2-q4_0.onnx");

    let report = stdout_json(
        "quantize -o .kiln",
        &quantize(&[&QUANT[..], &["--json"]].concat(), &kiln_path),
    );
    println!("kiln: {}", report["memory"]);
    let artifact = Artifact::open(&kiln_path).expect("open the artifact");
    assert_eq!(report["artifact"]["bytes"], artifact.len() as u64);
    // The override, the default, and the 4-bit rule that keeps the embedding at q8_0.
    for (role, format) in [
        ("ffn_down", Format::Q8_0),
        ("attn_q", Format::Q4_0),
        ("ffn_gate", Format::Q4_0),
        ("token_embd", Format::Q8_0),
    ] {
        let formats = formats_of(&artifact, role);
        assert!(formats.iter().all(|&f| f == format), "{role}: {formats:?}");
    }
    let memory = &report["memory"];
    let bytes = |key: &str| {
        memory[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {memory}"))
    };
    assert!(bytes("buffers") < bytes("buffers_sum"), "{memory}");
    assert!(bytes("overhead") > 0, "{memory}");
    assert_eq!(
        report["peak_bytes"].as_u64(),
        Some(
            bytes("weights")
                + bytes("kv_cache")
                + bytes("buffers")
                + bytes("scratch")
                + bytes("logits")
                + bytes("overhead")
        )
    );

    let answer = stdout_json(
        "kiln run",
        &kiln()
            .arg("run")
            .arg(&kiln_path)
            .args([
                "-p",
                "The capital of France is",
                "-n",
                "4",
                "--temp",
                "0",
                "--json",
            ])
            .output()
            .expect("running kiln"),
    );
    let text = answer["text"].as_str().expect("text");
    assert!(text.starts_with(" Paris"), "{answer}");

    let report = stdout_json(
        "quantize -o .onnx",
        &quantize(&[&QUANT[..], &["--json"]].concat(), &onnx_path),
    );
    println!("onnx: {report}");
    let onnx = &report["onnx"];
    assert_eq!(
        onnx["bytes"].as_u64(),
        Some(std::fs::metadata(&onnx_path).expect("the .onnx").len())
    );
    assert_eq!(onnx["external_data"], false);
    let model = proto::ModelProto::decode(std::fs::read(&onnx_path).expect("read").as_slice())
        .expect("a ModelProto");
    let graph = model.graph.expect("a graph");
    let nbits = graph
        .node
        .iter()
        .filter(|n| n.op_type.as_deref() == Some("MatMulNBits"))
        .count();
    // Seven projections a layer, and the output head (tied to the q8_0 embedding).
    let layers = artifact.meta().facts.layers;
    assert_eq!(nbits, 7 * layers + 1, "MatMulNBits nodes");

    let case = common::golden_case("p1");
    let steps = Steps {
        prompt_ids: common::ids(&case["prompt_ids"]),
        next_ids: common::ids(&case["Q4_1"]["generated_ids"])[..4].to_vec(),
        position_offset: 0,
    };
    let steps_path = dir.path().join("steps.json");
    steps.write(&steps_path);
    let vocab = artifact.meta().facts.vocab_size;
    let ort = ort_logits(&onnx_path, &steps_path, vocab);
    let mut session = artifact
        .session(SessionOptions {
            // onnxruntime's cache is f32 and its MatMulNBits keeps activations in float.
            kv_type: KvType::F32,
            ..SessionOptions::default()
        })
        .expect("session");
    session.set_float_activations(true);
    let diff = max_abs_diff(&ort, &kiln_logits(&mut session, &steps));
    println!("max abs logit diff onnxruntime (.onnx) vs kiln (.kiln): {diff:e}");
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn bad_arguments_are_clear_errors_that_write_nothing() {
    let dir = temp_dir();
    let at = |name: &str| -> PathBuf { dir.path().join(name) };
    let cases: [(Vec<&str>, PathBuf, &[&str]); 5] = [
        (
            vec!["--quant", "q4_0"],
            at("m.gguf"),
            &["m.gguf", ".kiln", ".onnx"],
        ),
        (
            vec!["--quant", "q3_k"],
            at("m.kiln"),
            &["unknown --quant \"q3_k\"", "q4_1"],
        ),
        (
            vec!["--quant", "q3_k"],
            at("m.onnx"),
            &["unknown --quant \"q3_k\"", "q4_1"],
        ),
        (
            vec!["--quant", "q4_0", "--override", "blk.*.ffn_dwn=q8_0"],
            at("m.onnx"),
            &["blk.*.ffn_dwn", "no weight matrix matches"],
        ),
        (
            vec!["--quant", "q4_0", "--override", "ffn_down"],
            at("m.kiln"),
            &["PATTERN=FORMAT"],
        ),
    ];
    for (args, out, phrases) in cases {
        let result = quantize(&args, &out);
        let err = String::from_utf8_lossy(&result.stderr);
        println!("{args:?} -o {}: {err}", out.display());
        assert!(!result.status.success(), "{args:?} succeeded");
        assert!(!err.contains("panicked"), "{err}");
        for phrase in phrases {
            assert!(err.contains(phrase), "{args:?}: lacks {phrase:?}: {err}");
        }
        assert!(!out.exists(), "{} was written", out.display());
    }

    let onnx_in = at("model.onnx");
    std::fs::write(&onnx_in, b"not read").expect("write");
    let result = xtask()
        .args(["quantize", "--model"])
        .arg(&onnx_in)
        .args(["--quant", "q4_0", "-o"])
        .arg(at("m.kiln"))
        .output()
        .expect("running xtask");
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success());
    // The xtask binary beside the tests is whichever build ran last: with `onnx-input` it
    // reads the file and says why it cannot (the reader's own errors: lower_onnx.rs), without
    // it it says how to get a build that reads ONNX. Either names the file.
    let why = if err.contains("leaves out to build faster") {
        "--features onnx-input"
    } else {
        "not a readable ONNX model"
    };
    assert!(err.contains("model.onnx") && err.contains(why), "{err}");
    assert!(!at("m.kiln").exists());
}
