//! kiln's `q4_k`, `q5_k`, `q6_k`, `q5_0` and `q5_1` quantizers against ggml's own
//! (`quantize_row_*_ref`, llama.cpp 0c1e570's ggml-base) on edge-case rows: all zeros,
//! constants, one sign, a lone spike, a range up to f16's limit, values below ggml's
//! all-zero threshold, f32 subnormals, silent sub-blocks, exact rounding ties and weight-like
//! noise. The bytes were recorded by `testdata/quant/ggml_blocks.c`, which says how to rerun it.

mod common;

use kiln_compiler::graph::Tensor;
use kiln_compiler::quant::quantize_tensor;
use kiln_runtime::quant::Format;

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn edge_rows_quantize_to_ggmls_bytes() {
    let path = common::testdata().join("quant/ggml_blocks.json");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("ggml_blocks.json"))
            .expect("json");
    let cases = json["cases"].as_array().expect("cases");
    assert!(cases.len() >= 18, "{} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().expect("name");
        let x = case["x"].as_str().expect("x");
        let values: Vec<f32> = (0..x.len())
            .step_by(8)
            .map(|i| f32::from_bits(u32::from_str_radix(&x[i..i + 8], 16).expect("bits")))
            .collect();
        let row = Tensor::from_f32(name, vec![1, values.len()], &values);
        for format in [
            Format::Q4K,
            Format::Q5K,
            Format::Q6K,
            Format::Q5_0,
            Format::Q5_1,
        ] {
            let theirs = hex(case[format.name()].as_str().expect("bytes"));
            let ours = quantize_tensor(&row, format).expect("quantize");
            if ours.data != theirs {
                let at = ours.data.iter().zip(&theirs).position(|(a, b)| a != b);
                failures.push(format!(
                    "{name} as {}: first differing byte {at:?}",
                    format.name()
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
