//! Every block format kiln reads, dequantized by kiln and by llama.cpp's own Python reader
//! (`gguf` 0.19.0, `testdata/quant/ggml_dequant.py`) from the same random blocks: the values
//! must agree bit for bit, so a GGUF file's K-quant, 5-bit or bf16 tensors mean to kiln what
//! they mean to llama.cpp.

mod common;

use std::process::Command;

use common::Rng;
use kiln_runtime::quant::Format;

/// Rows per format, and values per row (two K-quant super-blocks).
const ROWS: usize = 6;
const COLS: usize = 512;

/// Where a block of `format` keeps its f16 fields (random bytes elsewhere are valid codes,
/// but random bits there could be NaN or infinite scales).
fn half_fields(format: Format) -> &'static [usize] {
    match format {
        Format::Q8_0 | Format::Q4_0 | Format::Q5_0 => &[0],
        Format::Q4_1 | Format::Q5_1 | Format::Q4K | Format::Q5K => &[0, 2],
        Format::Q6K => &[208],
        Format::F32 | Format::F16 | Format::Bf16 => &[],
    }
}

/// `ROWS` rows of random but finite blocks of `format`.
fn random_rows(format: Format, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = format.row_bytes(COLS).expect("whole blocks");
    let mut out = Vec::with_capacity(ROWS * row_bytes);
    match format {
        Format::F32 => (0..ROWS * COLS).for_each(|_| out.extend(rng.uniform().to_le_bytes())),
        Format::F16 => (0..ROWS * COLS).for_each(|_| out.extend(rng.half(4.0))),
        Format::Bf16 => (0..ROWS * COLS).for_each(|_| {
            let bits = (rng.uniform() * 8.0).to_bits();
            out.extend(((bits >> 16) as u16).to_le_bytes());
        }),
        _ => {
            for _ in 0..ROWS * COLS / format.block_len() {
                let mut block: Vec<u8> = (0..format.block_bytes())
                    .map(|_| rng.next() as u8)
                    .collect();
                for &at in half_fields(format) {
                    block[at..at + 2].copy_from_slice(&rng.half(0.05));
                }
                out.extend(block);
            }
        }
    }
    out
}

/// ggml's name of `format` (`GGMLQuantizationType`).
fn ggml_name(format: Format) -> String {
    match format {
        Format::Q4K => "Q4_K".into(),
        Format::Q5K => "Q5_K".into(),
        Format::Q6K => "Q6_K".into(),
        f => f.name().to_uppercase(),
    }
}

#[test]
fn every_block_format_dequantizes_as_llama_cpp_reads_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng(0x6b69_6c6e);
    for format in Format::ALL {
        let bytes = random_rows(format, &mut rng);
        let row_bytes = format.row_bytes(COLS).expect("whole blocks");
        let src = dir.path().join(format!("{}.bin", format.name()));
        let dst = dir.path().join(format!("{}.f32", format.name()));
        std::fs::write(&src, &bytes).expect("write blocks");
        let out = Command::new(common::python())
            .arg(common::testdata().join("quant/ggml_dequant.py"))
            .arg(ggml_name(format))
            .arg(row_bytes.to_string())
            .arg(&src)
            .arg(&dst)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "ggml_dequant.py {}: {}",
            format.name(),
            String::from_utf8_lossy(&out.stderr)
        );
        let reference: Vec<u32> = std::fs::read(&dst)
            .expect("reference values")
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(reference.len(), ROWS * COLS, "{}", format.name());
        let mut values = vec![0f32; COLS];
        for (r, row) in bytes.chunks_exact(row_bytes).enumerate() {
            format.dequantize_row(row, &mut values);
            for (c, v) in values.iter().enumerate() {
                let want = reference[r * COLS + c];
                assert_eq!(
                    v.to_bits(),
                    want,
                    "{} row {r} value {c}: kiln {v}, gguf-py {}",
                    format.name(),
                    f32::from_bits(want)
                );
            }
        }
    }
}
