//! The default model (SmolLM2-135M-Instruct) converted to `q8_0`, `q4_1` and `q4_0`, exported
//! with `com.microsoft::MatMulNBits` over the same blocks, in onnxruntime against kiln's runtime
//! on the same converted weights with float activations (what `MatMulNBits` does at
//! `accuracy_level` 0): a prefill of the golden `p1` prompt, then eight decode steps, must give
//! the same logits; the quantized file must be under a third of the float one.

mod common;
mod onnx_common;

use kiln_compiler::onnx::{export, export_quantized, ExportOptions};
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::quant::Format;
use onnx_common::{kiln_logits, max_abs_diff, ort_logits, temp_dir, Steps};

/// Same weights, f32 activations on both sides: only summation order (and, for `q4_1`, the
/// rounding of `(q + m/d) * d` against `d * q + m`) differs.
const TOLERANCE: f32 = 1e-3;
const DECODE_STEPS: usize = 8;

#[test]
fn smollm2_matmulnbits_logits_match_kiln() {
    let case = common::golden_case("p1");
    let generated = common::ids(&case["F32"]["generated_ids"]);
    let steps = Steps {
        prompt_ids: common::ids(&case["prompt_ids"]),
        next_ids: generated[..DECODE_STEPS].to_vec(),
        position_offset: 0,
    };
    let dir = temp_dir();
    let steps_path = dir.path().join("steps.json");
    steps.write(&steps_path);

    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let vocab = checkpoint.facts.vocab_size;
    let float_model = dir.path().join("float.onnx");
    let float_bytes = export(&checkpoint, &float_model, &ExportOptions::default())
        .expect("float export")
        .bytes;
    std::fs::remove_file(&float_model).expect("remove the float model");

    let mut failures = Vec::new();
    for format in [Format::Q8_0, Format::Q4_1, Format::Q4_0] {
        let name = format.name();
        let converted = kiln_compiler::emit::convert(&checkpoint, format).expect("convert");
        let model = dir.path().join(format!("{name}.onnx"));
        let report =
            export_quantized(&converted, &model, &ExportOptions::default()).expect("export");
        assert!(!report.external);
        let ort = ort_logits(&model, &steps_path, vocab);
        assert_eq!(ort.len(), 1 + DECODE_STEPS);
        std::fs::remove_file(&model).expect("remove the model");

        let artifact_path = dir.path().join(format!("{name}.kiln"));
        kiln_compiler::emit::write_artifact(&converted, &artifact_path).expect("write artifact");
        drop(converted);
        let artifact = Artifact::open(&artifact_path).expect("open artifact");
        let mut session = artifact
            .session(SessionOptions {
                threads: 2,
                // onnxruntime's cache is f32.
                kv_type: KvType::F32,
                ..SessionOptions::default()
            })
            .expect("session");
        session.set_float_activations(true);
        let kiln = kiln_logits(&mut session, &steps);

        let diff = max_abs_diff(&ort, &kiln);
        println!(
            "{name}: MatMulNBits model {} bytes ({:.1}% of the float model's {float_bytes}), \
             {} nodes; max abs logit diff onnxruntime-kiln {diff:e}",
            report.bytes,
            100.0 * report.bytes as f64 / float_bytes as f64,
            report.nodes
        );
        if diff > TOLERANCE {
            failures.push(format!("{name}: onnxruntime vs kiln {diff}"));
        }
        if report.bytes * 3 > float_bytes {
            failures.push(format!(
                "{name}: {} bytes is not under a third of the float model's {float_bytes}",
                report.bytes
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
