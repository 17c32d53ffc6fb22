//! Re-encoding llama.cpp's own blocks: every `Q4_1` matrix and the `Q8_0` token embedding of the
//! default model's GGUF, dequantized and quantized again by kiln, give the GGUF's bytes exactly.

mod common;

use kiln_compiler::graph::Tensor;
use kiln_compiler::import::gguf::GgufFile;
use kiln_compiler::quant::quantize_tensor;
use kiln_runtime::quant::Format;

#[test]
fn requantizing_gguf_blocks_is_bit_exact() {
    let gguf = GgufFile::open(&common::smollm2_gguf()).expect("gguf");
    let mut names: Vec<&String> = gguf.tensors.keys().collect();
    names.sort();
    let (mut q4_1, mut q8_0) = (0, 0);
    for name in names {
        let info = &gguf.tensors[name];
        let wanted = match info.format {
            Format::Q4_1 => &mut q4_1,
            Format::Q8_0 => &mut q8_0,
            _ => continue,
        };
        // GGUF lists dimensions innermost first.
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let theirs = gguf.tensor_bytes(info);
        let stored = Tensor {
            name: name.clone(),
            shape,
            format: info.format,
            data: theirs.to_vec(),
        };
        let ours = quantize_tensor(&stored.dequantized(), info.format).expect("quantize");
        assert_eq!(ours.format, info.format, "{name}");
        assert_eq!(ours.shape, stored.shape, "{name}");
        if ours.data != theirs {
            let first = ours
                .data
                .iter()
                .zip(theirs)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!("{name}: bytes differ first at offset {first}");
        }
        *wanted += 1;
    }
    assert_eq!(q4_1, 30 * 7, "7 Q4_1 matrices per layer");
    assert_eq!(q8_0, 1, "the Q8_0 token embedding");
}
