//! The worst kernels the contract allows: the reference kernels with every result moved to the
//! edge of its error budget ([`super::budget`], [`super::q8::error_budget`]), up or down as a
//! hash of the result decides. Any kernel level that meets its contract differs from the
//! reference by at most this much per result, so running a model on this table shows how far
//! such differences can carry to the logits: end-to-end tests derive their budgets from it.

use alloc::vec;

use super::product::Product;
use super::q8;
use super::{budget, generic, Kernels, KvRows, TILE_ROWS};

/// Moves `v` by `by`, up or down as a hash of `v`, `at` and the table's seed `S` says.
fn push<const S: u64>(v: f32, by: f32, at: usize) -> f32 {
    let key = (u64::from(v.to_bits()) << 32 | at as u64) ^ S.wrapping_mul(0xd1b5_4a32_d192_ed03);
    let mut h = key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 29;
    if h & 1 == 0 {
        v + by
    } else {
        v - by
    }
}

fn abs_dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum()
}

pub fn dot<const S: u64>(a: &[f32], b: &[f32]) -> f32 {
    push::<S>(
        generic::dot(a, b),
        budget::dot(a.len(), abs_dot(a, b)),
        a.len(),
    )
}

pub fn dot4<const S: u64>(w: &[f32], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
    generic::dot4(w, x, out);
    push_rows::<S>(w, x, out);
}

pub fn dot4_f16<const S: u64>(w: &[u16], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
    generic::dot4_f16(w, x, out);
    let wide: vec::Vec<f32> = w.iter().map(|&h| q8::f16_to_f32(h)).collect();
    push_rows::<S>(&wide, x, out);
}

/// Moves each of [`dot4`]'s sums by its budget.
fn push_rows<const S: u64>(w: &[f32], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
    let k = w.len() / TILE_ROWS;
    for (t, sums) in out.iter_mut().enumerate() {
        let xt = &x[t * k..(t + 1) * k];
        for (r, v) in sums.iter_mut().enumerate() {
            let row = &w[r * k..(r + 1) * k];
            *v = push::<S>(*v, budget::float_product(k, abs_dot(row, xt)), r);
        }
    }
}

pub fn gemm_q8<const S: u64>(mut p: Product<'_>) {
    let (g, x, n, rows) = (p.w.geometry, p.x, p.n, p.rows.clone());
    let bytes = p.w.bytes;
    let out = p.out.checked(n, rows.len());
    let stride = p.out.stride();
    q8::gemm(p);
    let nb = g.blocks;
    let mut row = vec![0u8; g.row_bytes()];
    for (c, r) in rows.enumerate() {
        g.row(bytes, r, &mut row);
        for t in 0..n {
            let terms = q8::abs_terms(g.format, &row, &x[t * nb..(t + 1) * nb]);
            // SAFETY: `(t, c)` is inside the output `checked` vouched for; the reference has
            // finished writing it.
            let o = unsafe { &mut *out.add(t * stride + c) };
            *o = push::<S>(*o, q8::error_budget(nb, terms), t * g.rows + r);
        }
    }
}

pub fn rms_norm<const S: u64>(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    super::rms_norm(x, weight, eps, out);
    for (i, o) in out.iter_mut().enumerate() {
        *o = push::<S>(*o, budget::rms_norm(x.len(), *o), i);
    }
}

pub fn swiglu<const S: u64>(gate: &[f32], up: &[f32], out: &mut [f32]) {
    super::swiglu(gate, up, out);
    for (i, o) in out.iter_mut().enumerate() {
        *o = push::<S>(*o, budget::swiglu(*o), i);
    }
}

pub fn softmax<const S: u64>(x: &mut [f32]) {
    super::softmax(x);
    let len = x.len();
    for (i, p) in x.iter_mut().enumerate() {
        *p = push::<S>(*p, budget::softmax(len, *p), i);
    }
}

/// The value at `at` of a row of keys or values, as f32.
fn kv(rows: KvRows<'_>, at: usize) -> f32 {
    match rows {
        KvRows::F32(r) => r[at],
        KvRows::F16(r) => q8::f16_to_f32(r[at]),
    }
}

pub fn scores<const S: u64>(q: &[f32], k: KvRows<'_>, scale: f32, out: &mut [f32]) {
    super::scores(q, k, scale, out);
    let hd = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let terms: f32 = (0..hd).map(|d| (q[d] * kv(k, j * hd + d)).abs()).sum();
        *o = push::<S>(*o, scale.abs() * budget::dot(hd, terms), j);
    }
}

pub fn mix<const S: u64>(w: &[f32], v: KvRows<'_>, out: &mut [f32]) {
    super::mix(w, v, out);
    let hd = out.len();
    for (d, o) in out.iter_mut().enumerate() {
        let terms: f32 = w
            .iter()
            .enumerate()
            .map(|(j, wj)| (wj * kv(v, j * hd + d)).abs())
            .sum();
        *o = push::<S>(*o, budget::mix(w.len(), terms), d);
    }
}

/// The worst table with seed `S` over the reference `base`.
pub fn table<const S: u64>(base: &Kernels) -> Kernels {
    Kernels {
        name: "worst-case",
        dot: dot::<S>,
        dot4: dot4::<S>,
        dot4_f16: dot4_f16::<S>,
        gemm_q8: gemm_q8::<S>,
        gemm_q5: gemm_q8::<S>,
        rms_norm: rms_norm::<S>,
        swiglu: swiglu::<S>,
        softmax: softmax::<S>,
        scores: scores::<S>,
        mix: mix::<S>,
        ..*base
    }
}
