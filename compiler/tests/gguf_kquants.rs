//! A GGUF file of the formats kiln keeps but does not write (K-quants, 5-bit blocks, bf16):
//! the default model with every matrix re-stored in them. Import keeps each tensor's bytes,
//! `--quant copy` carries them into the artifact unchanged, and with f32 activations the
//! artifact computes exactly what the same weights dequantized to f32 compute (the
//! dequantization itself is checked against llama.cpp's reader in ggml_blocks.rs); with the
//! 8-bit activations llama.cpp multiplies them with, it stays close.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::Rng;
use half::bf16;
use kiln_compiler::gguf_write::{self, GgufTensor};
use kiln_compiler::import::gguf::GgufFile;
use kiln_compiler::quant::QuantPlan;
use kiln_engine::generate::Model;
use kiln_runtime::artifact::Artifact;
use kiln_runtime::quant::Format;

/// The format a matrix is re-stored in: K-quants where rows hold whole super-blocks (the
/// 1536-wide `ffn_down`), 5-bit blocks and bf16 elsewhere (576-wide rows), so every format
/// kiln only keeps is in the file.
fn format_for(name: &str, cols: usize, layer: usize) -> Format {
    if cols.is_multiple_of(256) {
        return [Format::Q4K, Format::Q5K, Format::Q6K][layer % 3];
    }
    match name {
        n if n.contains("attn_q") || n.contains("ffn_gate") => Format::Q5_0,
        n if n.contains("attn_k") || n.contains("ffn_up") => Format::Q5_1,
        _ => Format::Bf16,
    }
}

/// Values of a matrix in `format`: the model's own, rounded, for bf16; random small blocks
/// otherwise (scales that keep each weight under about 0.1, as trained weights are).
fn restored(format: Format, values: &[f32], rng: &mut Rng) -> Vec<u8> {
    if format == Format::Bf16 {
        return values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
    }
    let (halves, scale): (&[usize], f32) = match format {
        Format::Q5_0 => (&[0], 0.006),
        Format::Q5_1 => (&[0, 2], 0.006),
        Format::Q4K | Format::Q5K => (&[0, 2], 1e-4),
        Format::Q6K => (&[208], 1e-4),
        other => panic!("{} is not re-stored here", other.name()),
    };
    let blocks = values.len() / format.block_len();
    let mut out = Vec::with_capacity(blocks * format.block_bytes());
    for _ in 0..blocks {
        let mut block: Vec<u8> = (0..format.block_bytes())
            .map(|_| rng.next() as u8)
            .collect();
        for &at in halves {
            block[at..at + 2].copy_from_slice(&rng.half(scale));
        }
        out.extend(block);
    }
    out
}

/// Writes the default model with its matrices re-stored to `path`; returns each re-stored
/// tensor's bytes by name.
fn write_restored(path: &Path) -> HashMap<String, (Format, Vec<u8>)> {
    let source = GgufFile::open(&common::smollm2_gguf()).expect("open the default model");
    let mut rng = Rng(0x6b71_7561);
    let mut names: Vec<&String> = source.tensors.keys().collect();
    names.sort();
    let mut restored_bytes = HashMap::new();
    let mut tensors = Vec::new();
    for name in names {
        let info = &source.tensors[name];
        let shape: Vec<usize> = info.dims.iter().rev().map(|&d| d as usize).collect();
        let bytes = source.tensor_bytes(info).to_vec();
        let (format, bytes) = if shape.len() == 2 {
            let cols = shape[1];
            let mut values = vec![0f32; shape[0] * cols];
            for (row, out) in bytes
                .chunks_exact(info.format.row_bytes(cols).expect("whole blocks"))
                .zip(values.chunks_exact_mut(cols))
            {
                info.format.dequantize_row(row, out);
            }
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|l| l.parse().ok())
                .unwrap_or(0);
            let format = format_for(name, cols, layer);
            let bytes = restored(format, &values, &mut rng);
            restored_bytes.insert(name.clone(), (format, bytes.clone()));
            (format, bytes)
        } else {
            (info.format, bytes)
        };
        tensors.push(GgufTensor {
            name: name.clone(),
            shape,
            format,
            bytes: Box::new(move |out| out.write_all(&bytes)),
        });
    }
    let metadata: Vec<(&str, _)> = source
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    gguf_write::write(path, &metadata, &tensors, |_| {}).expect("write the GGUF");
    restored_bytes
}

#[test]
fn kept_formats_import_bit_for_bit_and_compute_their_dequantized_values() {
    let dir = tempfile::tempdir().expect("temp dir");
    let gguf = dir.path().join("smollm2-kquants.gguf");
    let written = write_restored(&gguf);
    let formats: std::collections::BTreeSet<&str> =
        written.values().map(|(f, _)| f.name()).collect();
    assert_eq!(
        formats.into_iter().collect::<Vec<_>>(),
        ["bf16", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k"]
    );

    let checkpoint = kiln_compiler::import::import(&gguf).expect("import");
    let kept = kiln_compiler::emit::convert_with(&checkpoint, &QuantPlan::copy()).expect("copy");
    let mut seen = 0;
    for t in kept.weights.tensors() {
        if let Some((format, bytes)) = written.get(&t.name) {
            assert_eq!(t.format, *format, "{}", t.name);
            if t.name.contains("attn_q") || t.name.contains("attn_k") {
                // llama.cpp's files order the rows of q and k for its RoPE; import puts them
                // back in Hugging Face's order, moving whole rows.
                let rows = |b: &[u8]| {
                    let mut r: Vec<Vec<u8>> = b.chunks(t.row_bytes()).map(<[u8]>::to_vec).collect();
                    r.sort();
                    r
                };
                assert!(
                    rows(&t.data) == rows(bytes),
                    "{}: rows changed on import",
                    t.name
                );
            } else {
                assert!(t.data == *bytes, "{}: bytes changed on import", t.name);
            }
            seen += 1;
        }
    }
    assert_eq!(
        seen,
        written.len(),
        "every re-stored tensor is in the checkpoint"
    );

    let kept_path = dir.path().join("kept.kiln");
    kiln_compiler::emit::write_artifact(&kept, &kept_path).expect("write the kept artifact");
    let floats = kiln_compiler::emit::convert(&checkpoint, Format::F32).expect("to f32");
    let float_path = dir.path().join("f32.kiln");
    kiln_compiler::emit::write_artifact(&floats, &float_path).expect("write the f32 artifact");

    let text =
        std::fs::read_to_string(common::testdata().join("golden/apache-2.0.txt")).expect("text");
    let ids = Model::open(&float_path)
        .expect("open")
        .encode_prompt(&text, true);
    let logits = |path: &Path, float_activations: bool| {
        let artifact = Artifact::open(path).expect("open");
        let mut session = artifact.session(common::two_threads()).expect("session");
        session.set_float_activations(float_activations);
        let mut rows = vec![session.forward(&ids[..48]).expect("prefill").to_vec()];
        for &id in &ids[48..52] {
            rows.push(session.forward(&[id]).expect("decode").to_vec());
        }
        rows
    };
    let float = logits(&float_path, true);
    let exact = logits(&kept_path, true);
    assert!(float.iter().flatten().all(|v| v.is_finite()));
    for (step, (a, b)) in exact.iter().zip(&float).enumerate() {
        let same = a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "step {step}: the kept formats must compute exactly their dequantized values"
        );
    }
    // 8-bit activations (q8_0/q8_1 blocks for q5_0/q5_1, q8_K super-blocks for the K-quants)
    // move the logits by rounding only.
    let quantized = logits(&kept_path, false);
    let span = float.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let gap = quantized
        .iter()
        .flatten()
        .zip(float.iter().flatten())
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!("8-bit activations: max logit gap {gap} of max |logit| {span}");
    assert!(gap > 0.0 && gap <= 0.05 * span, "{gap} vs {span}");
}
