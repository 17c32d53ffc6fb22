//! The tiny Llama 3.2-shaped checkpoint of `cargo xtask gen-tiny` (llama3 RoPE scaling, Meta's
//! 128256-token vocabulary, Hugging Face layout) through both backends: kiln's native runtime
//! must give onnxruntime's logits for our ONNX export of it, after a prefill long enough for the
//! llama3-scaled low frequencies to matter, and through cached decode steps.

mod hf_support;
mod onnx_common;

use kiln_compiler::onnx::{export, ExportOptions};
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::quant::Format;
use onnx_common::{kiln_logits, max_abs_diff, ort_logits, Steps};

const TOLERANCE: f32 = 1e-4;

#[test]
fn tiny_llama3_checkpoint_kiln_matches_onnxruntime() {
    let checkpoint_dir = hf_support::tiny_checkpoint(11);
    let checkpoint =
        kiln_compiler::import::import(checkpoint_dir.path()).expect("import tiny checkpoint");
    assert!(
        checkpoint.facts.rope_scaling.is_some(),
        "gen-tiny writes llama3 rope scaling"
    );
    let vocab = checkpoint.facts.vocab_size;
    let work = tempfile::tempdir().expect("temp dir");

    let onnx = work.path().join("tiny.onnx");
    export(&checkpoint, &onnx, &ExportOptions::default()).expect("export");
    // 300 prompt tokens: at these positions llama3's divided low frequencies turn by a
    // quarter radian more than unscaled ones would, far beyond the tolerance.
    let steps = Steps {
        prompt_ids: (0..300u32)
            .map(|i| (i * 7919 + 13) % vocab as u32)
            .collect(),
        next_ids: vec![128_000, 9906, 11, 42, 100_000, 5],
        position_offset: 0,
    };
    let steps_path = work.path().join("steps.json");
    steps.write(&steps_path);
    let ort = ort_logits(&onnx, &steps_path, vocab);

    let artifact_path = work.path().join("tiny.kiln");
    let converted = kiln_compiler::emit::convert(&checkpoint, Format::F32).expect("convert");
    kiln_compiler::emit::write_artifact(&converted, &artifact_path).expect("write artifact");
    let artifact = Artifact::open(&artifact_path).expect("open artifact");
    let mut session = artifact
        .session(SessionOptions {
            context: 512,
            // onnxruntime's cache is f32.
            kv_type: KvType::F32,
            ..SessionOptions::default()
        })
        .expect("session");
    let kiln = kiln_logits(&mut session, &steps);
    let diff = max_abs_diff(&ort, &kiln);
    let spread = ort.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    println!("tiny llama3: max |logit| {spread:.3}, kiln vs onnxruntime max abs diff {diff:e}");
    assert!(spread > 1e-2, "logits too small to compare: {spread}");
    assert!(diff <= TOLERANCE, "kiln vs onnxruntime: {diff}");
}
