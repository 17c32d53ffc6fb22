//! Matrix–vector (decode) and matrix–matrix (prefill) products at SmolLM2-135M's shapes, for
//! every weight format, the generic kernel table against the one this CPU selects, in one run.
//!
//! `cargo bench -p kiln-runtime --bench kernels [-- FILTER]`; `KILN_BENCH_TOKENS` sets the
//! batch of the matrix–matrix products (default 64).

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use kiln_runtime::kernels::q8::{self, Q8Block};
use kiln_runtime::kernels::{
    gemm_q8_variants, matmul_rows, scratch_floats, Input, Kernels, Level, Matrix, Out,
};
use kiln_runtime::layout::{Geometry, Layout};
use kiln_runtime::quant::{Format, BLOCK};

/// `(rows, cols)`: attention q/o and k/v-sized, the feed-forward up/gate and down, the head.
const SHAPES: [(usize, usize); 4] = [(576, 576), (1536, 576), (576, 1536), (49152, 576)];

fn weights(format: Format, rows: usize, cols: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| (next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
        .collect();
    let mut out = vec![0u8; format.row_bytes(cols).unwrap() * rows];
    let bb = format.block_bytes();
    match format {
        Format::F32 => {
            for (o, v) in out.chunks_exact_mut(4).zip(&values) {
                o.copy_from_slice(&v.to_le_bytes());
            }
        }
        Format::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(&values) {
                o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
            }
        }
        _ => {
            // Arbitrary but valid blocks: scale from the block's range, random quants.
            for (b, vals) in out.chunks_exact_mut(bb).zip(values.chunks_exact(BLOCK)) {
                let amax = vals.iter().fold(0f32, |m, v| m.max(v.abs()));
                b[0..2].copy_from_slice(&f16::from_f32(amax / 8.0).to_le_bytes());
                if format == Format::Q4_1 {
                    b[2..4].copy_from_slice(&f16::from_f32(-amax).to_le_bytes());
                }
                let start = if format == Format::Q4_1 { 4 } else { 2 };
                for (q, v) in b[start..].iter_mut().zip(vals) {
                    *q = (v.to_bits() >> 7) as u8;
                }
            }
        }
    }
    out
}

fn bench_matmul(c: &mut Criterion) {
    let tokens: usize = std::env::var("KILN_BENCH_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let mut tables = vec![Kernels::generic(), Kernels::best()];
    // `KILN_BENCH_VARIANTS=1`: also every tile shape of the block kernels.
    if std::env::var("KILN_BENCH_VARIANTS").is_ok_and(|v| v == "1") {
        for (name, gemm) in gemm_q8_variants().into_iter().skip(1) {
            let mut k = Kernels::best();
            k.name = name;
            k.gemm_q8 = gemm;
            tables.push(k);
        }
    }
    for format in [
        Format::Q4_0,
        Format::Q4_1,
        Format::Q8_0,
        Format::F16,
        Format::F32,
    ] {
        for (rows, cols) in SHAPES {
            let rows_major = weights(format, rows, cols);
            // Each table runs ggml's rows, and the optimized ones their preferred layout too.
            let mut layouts = vec![
                Layout::Rows,
                Level::best().preferred_layout().for_format(format),
            ];
            layouts.dedup();
            let packed: Vec<(Layout, Vec<u8>)> = layouts
                .iter()
                .map(|&layout| {
                    let g = Geometry {
                        format,
                        layout,
                        rows,
                        blocks: cols / format.block_len(),
                    };
                    let bytes = if layout == Layout::Rows {
                        rows_major.clone()
                    } else {
                        g.pack(&rows_major)
                    };
                    (layout, bytes)
                })
                .collect();
            for n in [1, tokens] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
                    .collect();
                let mut xq = vec![Q8Block::default(); n * cols / BLOCK];
                q8::quantize(&x, &mut xq);
                let input = if format.block_len() == 1 {
                    Input::F32(&x)
                } else {
                    Input::Q8(&xq)
                };
                let mut out = vec![0f32; n * rows];
                let mut scratch = vec![0f32; scratch_floats(cols, n)];
                let kind = if n == 1 { "matvec" } else { "matmul" };
                let mut group = c.benchmark_group(format!("{kind}/{}", format.name()));
                group
                    .throughput(Throughput::Elements((n * rows * cols) as u64))
                    .sample_size(10)
                    .warm_up_time(Duration::from_millis(300))
                    .measurement_time(Duration::from_secs(2));
                for k in &tables {
                    if format.block_len() == 1 && k.name.starts_with("vnni ") {
                        continue;
                    }
                    // The generic table on the large batched products takes seconds per call.
                    if k.name == "generic" && n > 1 && rows * cols > 1536 * 576 {
                        continue;
                    }
                    for (layout, bytes) in &packed {
                        if !k.level.layouts().contains(layout)
                            || (k.name == "generic" && *layout != Layout::Rows)
                        {
                            continue;
                        }
                        let m = Matrix::new(format, *layout, rows, cols, bytes);
                        group.bench_with_input(
                            BenchmarkId::new(
                                format!("{} {}", k.name, layout.name()),
                                format!("{rows}x{cols}"),
                            ),
                            &(),
                            |b, ()| {
                                b.iter(|| {
                                    matmul_rows(
                                        k,
                                        black_box(input),
                                        n,
                                        &m,
                                        0..rows,
                                        Out::new(&mut out, rows),
                                        &mut scratch,
                                    );
                                    black_box(&out);
                                })
                            },
                        );
                    }
                }
                group.finish();
            }
        }
    }
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
