//! Reference kernels in portable Rust, written with independent lanes so compilers vectorize them.

use super::q8::f16_to_f32;
use super::TILE_ROWS;

const LANES: usize = 16;

#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    dot_of(a, b, |v| v)
}

/// `Σ a·value(b)` in [`LANES`] independent sums, then the tail.
#[inline(always)]
fn dot_of<T: Copy>(a: &[f32], b: &[T], value: impl Fn(T) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, &y)| x * value(y))
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * value(y[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// [`super::Kernels::dot4`], token by token.
#[inline(always)]
pub fn dot4(w: &[f32], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
    dot4_of(w, x, out, |v| v);
}

/// [`super::Kernels::dot4_f16`]: as [`dot4`] on the widened (exact) values.
#[inline(always)]
pub fn dot4_f16(w: &[u16], x: &[f32], out: &mut [[f32; TILE_ROWS]]) {
    dot4_of(w, x, out, f16_to_f32);
}

/// Four rows of `value(w)` against each token of `x`, each sum as [`dot_of`] takes it.
#[inline(always)]
fn dot4_of<T: Copy>(w: &[T], x: &[f32], out: &mut [[f32; TILE_ROWS]], value: impl Fn(T) -> f32) {
    let k = w.len() / TILE_ROWS;
    for (t, sums) in out.iter_mut().enumerate() {
        let xt = &x[t * k..(t + 1) * k];
        for (r, sum) in sums.iter_mut().enumerate() {
            *sum = dot_of(xt, &w[r * k..(r + 1) * k], &value);
        }
    }
}

/// `Σ a·b` against f16 bits `b` (attention scores over an f16 key cache).
#[inline(always)]
pub fn dot_f16(a: &[f32], b: &[u16]) -> f32 {
    dot_of(a, b, f16_to_f32)
}

/// `y += a·x` for f16 bits `x` (the weighted sum over an f16 value cache).
pub fn axpy_f16(a: f32, x: &[u16], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * f16_to_f32(x);
    }
}

/// `x` to f16 bits, rounding to nearest even (keys and values entering an f16 cache).
pub fn to_f16(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = half::f16::from_f32(v).to_bits();
    }
}
