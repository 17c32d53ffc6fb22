//! The exported default model (SmolLM2-135M-Instruct, weights dequantized to f32) in
//! onnxruntime, in tract and in kiln's own runtime: a prefill of the golden `p1` prompt, then
//! eight decode steps fed the golden continuation, must give the same logits on all three, and
//! onnxruntime's first pick must be llama.cpp's.

mod common;
mod onnx_common;

use kiln_compiler::onnx::{export, ExportOptions};
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{KvType, SessionOptions};
use kiln_runtime::quant::Format;
use onnx_common::{argmax, kiln_logits, max_abs_diff, ort_logits, temp_dir, tract_logits, Steps};

/// f32 end to end; the three runtimes only differ in summation order.
const TOLERANCE: f32 = 1e-3;
const DECODE_STEPS: usize = 8;

#[test]
fn smollm2_logits_agree_across_onnxruntime_tract_and_kiln() {
    let case = common::golden_case("p1");
    let generated = common::ids(&case["F32"]["generated_ids"]);
    let steps = Steps {
        prompt_ids: common::ids(&case["prompt_ids"]),
        next_ids: generated[..DECODE_STEPS].to_vec(),
        position_offset: 0,
    };

    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let vocab = checkpoint.facts.vocab_size;
    let dir = temp_dir();
    let model = dir.path().join("smollm2.onnx");
    let report = export(&checkpoint, &model, &ExportOptions::default()).expect("export");
    println!(
        "smollm2: {} nodes, {} initializers, {} bytes",
        report.nodes, report.initializers, report.bytes
    );
    assert!(!report.external);

    let steps_path = dir.path().join("steps.json");
    steps.write(&steps_path);
    let ort = ort_logits(&model, &steps_path, vocab);
    assert_eq!(ort.len(), 1 + DECODE_STEPS);
    assert_eq!(
        argmax(&ort[0]) as u32,
        generated[0],
        "onnxruntime's first pick after the prefill"
    );
    let tract = tract_logits(&model, &steps);

    // kiln's native runtime on the same dequantized weights, fed the same ids.
    let converted = kiln_compiler::emit::convert(&checkpoint, Format::F32).expect("convert");
    drop(checkpoint);
    let artifact_path = dir.path().join("smollm2-f32.kiln");
    kiln_compiler::emit::write_artifact(&converted, &artifact_path).expect("write artifact");
    drop(converted);
    let artifact = Artifact::open(&artifact_path).expect("open artifact");
    let mut session = artifact
        .session(SessionOptions {
            threads: 2,
            // onnxruntime's and tract's caches are f32.
            kv_type: KvType::F32,
            ..SessionOptions::default()
        })
        .expect("session");
    let kiln = kiln_logits(&mut session, &steps);

    let ort_tract = max_abs_diff(&ort, &tract);
    let ort_kiln = max_abs_diff(&ort, &kiln);
    let tract_kiln = max_abs_diff(&tract, &kiln);
    let picks: Vec<usize> = ort.iter().map(|r| argmax(r)).collect();
    println!(
        "smollm2: max abs logit diff ort-tract {ort_tract:e}, ort-kiln {ort_kiln:e}, tract-kiln {tract_kiln:e}; \
         onnxruntime picks {picks:?}, llama.cpp {:?}",
        &generated[..=DECODE_STEPS]
    );
    assert!(ort_tract <= TOLERANCE, "onnxruntime vs tract: {ort_tract}");
    assert!(ort_kiln <= TOLERANCE, "onnxruntime vs kiln: {ort_kiln}");
    assert!(tract_kiln <= TOLERANCE, "tract vs kiln: {tract_kiln}");
}
