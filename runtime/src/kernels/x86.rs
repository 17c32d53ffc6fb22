//! x86-64 versions of the generic kernels, compiled for AVX2+FMA and for AVX-512.

use super::q8::{self, Q8Block};
use super::{generic, Kernels, TILE_ROWS};
use crate::quant::Format;

#[target_feature(enable = "avx2,fma")]
fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    generic::dot(a, b)
}

#[target_feature(enable = "avx2,fma")]
fn dot4_avx2(w: &[f32], x: &[f32]) -> [f32; TILE_ROWS] {
    generic::dot4(w, x)
}

#[target_feature(enable = "avx2,fma")]
fn dot_q8_avx2(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    q8::dot_row(format, row, x)
}

#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn dot_q8_avx512(format: Format, row: &[u8], x: &[Q8Block]) -> f32 {
    q8::dot_row(format, row, x)
}

#[target_feature(enable = "avx512f,avx2,fma")]
fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    generic::dot(a, b)
}

#[target_feature(enable = "avx512f,avx2,fma")]
fn dot4_avx512(w: &[f32], x: &[f32]) -> [f32; TILE_ROWS] {
    generic::dot4(w, x)
}

/// Replaces table entries with the widest versions this CPU runs.
pub fn overwrite(k: &mut Kernels) {
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
    {
        // SAFETY: these functions only need avx512f/avx512bw/avx2/fma, which were just detected.
        *k = Kernels {
            name: "x86-64 avx512",
            dot: |a, b| unsafe { dot_avx512(a, b) },
            dot4: |w, x| unsafe { dot4_avx512(w, x) },
            dot_q8: |f, r, x| unsafe { dot_q8_avx512(f, r, x) },
        };
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        // SAFETY: these functions only need avx2/fma, which were just detected.
        *k = Kernels {
            name: "x86-64 avx2",
            dot: |a, b| unsafe { dot_avx2(a, b) },
            dot4: |w, x| unsafe { dot4_avx2(w, x) },
            dot_q8: |f, r, x| unsafe { dot_q8_avx2(f, r, x) },
        };
    }
}
