//! The quantizer on synthetic rows: error bounds per format, all-zero and constant blocks, bad
//! input, and the per-tensor plan's override patterns.

use kiln_compiler::graph::Tensor;
use kiln_compiler::quant::{quantize_tensor, MixShape, QuantError, QuantPlan};
use kiln_runtime::quant::{Format, BLOCK};

/// Deterministic values in `[-scale, scale)` (xorshift), with the occasional outlier.
fn random_row(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let unit = (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if i % 29 == 0 {
                unit * scale * 4.0
            } else {
                unit * scale
            }
        })
        .collect()
}

fn round_trip(values: &[f32], format: Format) -> Vec<f32> {
    let t = Tensor::from_f32("blk.0.ffn_up.weight", vec![1, values.len()], values);
    quantize_tensor(&t, format).expect("quantize").to_f32_vec()
}

/// Each value's error is within what the block's scale allows (plus the f16 rounding of the
/// scale and min), block by block.
#[test]
fn round_trip_errors_stay_within_each_formats_bound() {
    let f16_eps = 2f32.powi(-11);
    for seed in 0..50 {
        let scale = [0.01, 0.05, 1.0, 300.0][seed as usize % 4];
        let row = random_row(seed, 8 * BLOCK, scale);
        for format in Format::QUANTIZABLE {
            let back = round_trip(&row, format);
            for (b, (x, y)) in row.chunks(BLOCK).zip(back.chunks(BLOCK)).enumerate() {
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let (min, max) = x
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                for (&a, &r) in x.iter().zip(y) {
                    let bound = match format {
                        Format::F32 => 0.0,
                        // Plus half of f16's subnormal step, for values under 6.1e-5.
                        Format::F16 => a.abs() * f16_eps + 2f32.powi(-25),
                        Format::Q8_0 => amax / 127.0 * (0.5 + 127.0 * f16_eps) * 1.001,
                        // The top code is clipped from 16 to 15: up to one step off at that end.
                        Format::Q4_0 => amax / 8.0 * (1.0 + 8.0 * f16_eps) * 1.001,
                        Format::Q4_1 => {
                            let d = (max - min) / 15.0;
                            (d * (0.5 + 15.0 * f16_eps) + min.abs() * f16_eps) * 1.001
                        }
                        other => panic!("kiln does not quantize to {}", other.name()),
                    };
                    assert!(
                        (a - r).abs() <= bound,
                        "{} seed {seed} block {b}: {a} came back as {r} (bound {bound})",
                        format.name()
                    );
                }
            }
        }
    }
}

#[test]
fn q4_0_uses_the_signed_extreme_so_it_is_exact() {
    let mut row = random_row(7, BLOCK, 0.5);
    row[5] = -3.0;
    let back = round_trip(&row, Format::Q4_0);
    // d = -3 / -8 = 0.375 is exact in f16, and -3 maps to code 0.
    assert_eq!(back[5], -3.0);
    row[5] = 3.0;
    let back = round_trip(&row, Format::Q4_0);
    assert_eq!(back[5], 3.0);
}

#[test]
fn all_zero_blocks_encode_as_ggml_does() {
    let zeros = vec![0f32; 2 * BLOCK];
    let t = Tensor::from_f32("zeros", vec![2, BLOCK], &zeros);
    // Zero scale, then codes 0 (q8_0, q4_1) or the midpoint 8 (q4_0, nibbles 0x88); q4_0's
    // scale is `0 / -8`, which is -0.0 (f16 bits 0x8000) in ggml too.
    let q8 = quantize_tensor(&t, Format::Q8_0).expect("q8_0");
    assert!(q8.data.iter().all(|&b| b == 0));
    let q40 = quantize_tensor(&t, Format::Q4_0).expect("q4_0");
    for block in q40.data.chunks(18) {
        assert_eq!(block[..2], [0x00, 0x80]);
        assert!(block[2..].iter().all(|&b| b == 0x88));
    }
    let q41 = quantize_tensor(&t, Format::Q4_1).expect("q4_1");
    assert!(q41.data.iter().all(|&b| b == 0));
    for format in Format::QUANTIZABLE {
        assert!(round_trip(&zeros, format).iter().all(|&v| v == 0.0));
    }
}

#[test]
fn constant_blocks_come_back_whole() {
    for c in [0.25f32, -1.5, 1000.0, -0.01] {
        let row = vec![c; BLOCK];
        // q4_1 stores the value as its min with a zero step; q4_0 maps it to code 0 (or 16→15
        // with the sign flipped: d = c / -8 and c * id = -8).
        let f16 = half::f16::from_f32(c).to_f32();
        assert!(round_trip(&row, Format::Q4_1).iter().all(|&v| v == f16));
        for format in [Format::Q8_0, Format::Q4_0, Format::F16] {
            for v in round_trip(&row, format) {
                assert!(
                    (v - c).abs() <= c.abs() * 2f32.powi(-10),
                    "{}: {c} came back as {v}",
                    format.name()
                );
            }
        }
    }
}

#[test]
fn same_format_is_a_bit_exact_copy() {
    let row = random_row(3, 2 * BLOCK, 1.0);
    let t = Tensor::from_f32("t", vec![2, BLOCK], &row);
    let q = quantize_tensor(&t, Format::Q4_1).expect("q4_1");
    assert_eq!(quantize_tensor(&q, Format::Q4_1).expect("copy"), q);
}

#[test]
fn a_row_that_is_not_whole_blocks_is_an_error_naming_the_tensor() {
    let t = Tensor::from_f32("blk.3.attn_q.weight", vec![2, 48], &[0.5; 96]);
    for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1] {
        let err = quantize_tensor(&t, format).expect_err("48 columns");
        assert!(
            matches!(err, QuantError::RowLength { cols: 48, .. }),
            "{err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("blk.3.attn_q.weight") && msg.contains("48"),
            "{msg}"
        );
    }
    // Float formats have no blocks.
    assert!(quantize_tensor(&t, Format::F16).is_ok());
}

#[test]
fn bad_values_and_bad_bytes_are_errors_not_panics() {
    let mut row = vec![0.5f32; BLOCK];
    row[7] = f32::NAN;
    let t = Tensor::from_f32("blk.0.ffn_gate.weight", vec![1, BLOCK], &row);
    let err = quantize_tensor(&t, Format::Q8_0).expect_err("NaN");
    assert!(
        matches!(err, QuantError::NonFinite { row: 0, col: 7, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("blk.0.ffn_gate.weight"));

    let big = Tensor::from_f32("big", vec![1, BLOCK], &[1e6; BLOCK]);
    let err = quantize_tensor(&big, Format::F16).expect_err("over f16's range");
    assert!(matches!(err, QuantError::OutOfRange { .. }), "{err}");

    let mut short = Tensor::from_f32("short", vec![2, BLOCK], &[1.0; 2 * BLOCK]);
    short.data.truncate(10);
    let err = quantize_tensor(&short, Format::Q8_0).expect_err("truncated");
    assert!(matches!(err, QuantError::Malformed { .. }), "{err}");
}

/// The model shape plans are asked about (only llama.cpp's mixtures depend on it).
const SHAPE: MixShape = MixShape {
    layers: 30,
    tied: true,
    seventy_b: false,
};

fn matrix(name: &str) -> Tensor {
    Tensor::from_f32(name, vec![2, BLOCK], &[0.0; 2 * BLOCK])
}

#[test]
fn plan_defaults_keep_norms_and_widen_the_embedding_for_4_bit() {
    let norm = Tensor::from_f32("blk.0.attn_norm.weight", vec![BLOCK], &[1.0; BLOCK]);
    for default in Format::QUANTIZABLE {
        let plan = QuantPlan::new(default);
        assert_eq!(
            plan.format_for("blk.0.attn_norm", &norm, &SHAPE),
            Format::F32
        );
        assert_eq!(
            plan.format_for("blk.0.ffn_down", &matrix("blk.0.ffn_down.weight"), &SHAPE),
            default
        );
        let four_bit = matches!(default, Format::Q4_0 | Format::Q4_1);
        for role in ["token_embd", "output"] {
            let want = if four_bit { Format::Q8_0 } else { default };
            assert_eq!(plan.format_for(role, &matrix(role), &SHAPE), want, "{role}");
        }
    }
}

#[test]
fn override_patterns_match_roles_and_own_names_last_one_winning() {
    let plan = QuantPlan::new(Format::Q4_0)
        .with_override("blk.*.ffn_down=q8_0")
        .and_then(|p| p.with_override("token_embd=q4_0"))
        .and_then(|p| p.with_override("model.layers.1?.self_attn.*=f16"))
        .and_then(|p| p.with_override("blk.2.ffn_down=q4_1"))
        .expect("plan");
    let f = |role: &str, name: &str| plan.format_for(role, &matrix(name), &SHAPE);
    assert_eq!(f("blk.7.ffn_down", "blk.7.ffn_down.weight"), Format::Q8_0);
    assert_eq!(f("blk.2.ffn_down", "blk.2.ffn_down.weight"), Format::Q4_1);
    assert_eq!(f("blk.7.ffn_up", "blk.7.ffn_up.weight"), Format::Q4_0);
    assert_eq!(f("token_embd", "token_embd.weight"), Format::Q4_0);
    assert_eq!(f("output", "lm_head.weight"), Format::Q8_0);
    // Hugging Face names match too, with or without `.weight`.
    assert_eq!(
        f("blk.12.attn_q", "model.layers.12.self_attn.q_proj.weight"),
        Format::F16
    );
    assert_eq!(
        f("blk.2.attn_q", "model.layers.2.self_attn.q_proj.weight"),
        Format::Q4_0
    );
}

#[test]
fn malformed_overrides_are_clear_errors() {
    for (spec, why) in [
        ("blk.*.ffn_down", "PATTERN=FORMAT"),
        ("=q8_0", "empty"),
        ("blk.*.ffn_down=bf16", "bf16"),
        ("blk.*.ffn_down=q3_k", "q3_k"),
    ] {
        let err = QuantPlan::new(Format::Q4_0)
            .with_override(spec)
            .expect_err(spec);
        let msg = err.to_string();
        assert!(msg.contains(spec) && msg.contains(why), "{msg}");
    }
}
