//! Compute kernels: one table of generic reference kernels, entries replaced after a CPU
//! check by versions compiled for wider vector units (at run time with `std`, from the
//! build's target features without it). `KILN_KERNELS=<level>` forces a level ([`Level`]),
//! `generic` the reference table.

#[cfg(target_arch = "aarch64")]
mod arm;
#[cfg(target_arch = "aarch64")]
mod arm_k;
pub mod budget;
mod generic;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod lanes;
mod level;
pub mod product;
pub mod q8;
pub mod q8k;
#[cfg(target_arch = "x86_64")]
mod vnni;
mod worst;
#[cfg(target_arch = "x86_64")]
mod x16;
#[cfg(target_arch = "aarch64")]
mod x4;
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(target_arch = "x86_64")]
mod x86_k;

pub use level::{Level, LevelError};
pub use product::{Out, Product, QWeights};

use crate::layout::{Geometry, Layout};
use crate::quant::{Format, BLOCK};
use q8::Q8Block;
use q8k::Q8KBlock;

/// Rows of a weight matrix handled together by [`Kernels::dot4`] (and by the optimized block
/// kernels): parallel splits by rows keep to multiples of it.
pub const TILE_ROWS: usize = 4;

/// Tokens the optimized block kernels handle together: parallel splits of a batch by tokens
/// keep to multiples of it.
pub const TILE_TOKENS: usize = 4;

/// Floats of scratch the aarch64 4×8 kernels stage per block of a row for a batch: 8 tokens
/// as 4 pairs of 96 bytes (their `smmla` operands and scales), whatever the batch.
pub const STAGED_PAIR_FLOATS: usize = 96;

/// Floats of scratch each participant of a product over rows of `cols` values, for batches of
/// up to `batch` tokens, needs: [`TILE_ROWS`] dequantized rows for float products, or a
/// block kernel's staging (per block: 16 bytes a token on x86-64, [`STAGED_PAIR_FLOATS`] on
/// aarch64 4×8; 64-byte aligned). The same on every machine, so plans do not depend on it.
pub const fn scratch_floats(cols: usize, batch: usize) -> usize {
    let rows = TILE_ROWS * cols;
    let per_block = if 4 * batch > STAGED_PAIR_FLOATS {
        4 * batch
    } else {
        STAGED_PAIR_FLOATS
    };
    let staged = cols.div_ceil(BLOCK) * per_block + 16;
    if rows > staged {
        rows
    } else {
        staged
    }
}

/// The kernel table.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    /// The level the table was built for.
    pub level: Level,
    /// Name of the table, for `--verbose` output and benchmarks (the level's, or a variant's).
    pub name: &'static str,
    /// `Σ a[i]·b[i]`.
    pub dot: fn(&[f32], &[f32]) -> f32,
    /// Float weights against a batch: four rows of `w` (`k = w.len() / 4` values each) times
    /// each of the `out.len()` tokens of `x` (`k` values each), `out[t][r] = w_r · x_t`.
    pub dot4: fn(&[f32], &[f32], &mut [[f32; TILE_ROWS]]),
    /// [`Kernels::dot4`] over f16 weight bits, widened (exactly) as they are read.
    pub dot4_f16: fn(&[u16], &[f32], &mut [[f32; TILE_ROWS]]),
    /// Block-quantized weight rows against 8-bit activations of a batch of tokens
    /// ([`Product`]); [`q8::gemm`] is the reference.
    pub gemm_q8: GemmQ8,
    /// Quantizes activations to 8-bit blocks, bit-identical to [`q8::quantize`].
    pub quantize: fn(&[f32], &mut [Q8Block]),
    /// K-quant weight rows against `q8_K` activations, bit-identical to [`q8k::gemm`].
    pub gemm_q8k: GemmQ8K,
    /// Quantizes activations to `q8_K` super-blocks, bit-identical to [`q8k::quantize`].
    pub quantize_q8k: fn(&[f32], &mut [Q8KBlock]),
    /// 5-bit weights (`q5_0`, `q5_1`) against 8-bit activations: in ggml's rows bit-identical
    /// to [`q8::gemm`], interleaved (x86-64 4×16) within [`q8::error_budget`] of it.
    pub gemm_q5: GemmQ8,
    /// [`rms_norm`].
    pub rms_norm: fn(&[f32], &[f32], f32, &mut [f32]),
    /// [`swiglu`].
    pub swiglu: fn(&[f32], &[f32], &mut [f32]),
    /// [`softmax`].
    pub softmax: fn(&mut [f32]),
    /// [`scores`]: one query against every cached key.
    pub scores: fn(&[f32], KvRows<'_>, f32, &mut [f32]),
    /// [`mix`]: the weighted sum of cached values.
    pub mix: fn(&[f32], KvRows<'_>, &mut [f32]),
    /// f32 to f16 bits, rounding to nearest even, bit-identical to `half`.
    pub to_f16: fn(&[f32], &mut [u16]),
}

/// A block-quantized matrix product, see [`Product`] and [`q8::gemm`].
pub type GemmQ8 = fn(Product<'_>);

/// A K-quant matrix product over rows `rows` of the matrix and `n` tokens, see [`q8k::gemm`].
pub type GemmQ8K = fn(&Matrix<'_>, core::ops::Range<usize>, &[Q8KBlock], usize, Out<'_>);

impl Kernels {
    /// The reference kernels.
    pub fn generic() -> Kernels {
        Kernels {
            level: Level::Generic,
            name: "generic",
            dot: generic::dot,
            dot4: generic::dot4,
            dot4_f16: generic::dot4_f16,
            gemm_q8: q8::gemm,
            quantize: q8::quantize,
            gemm_q8k: q8k::gemm,
            quantize_q8k: q8k::quantize,
            gemm_q5: q8::gemm,
            rms_norm,
            swiglu,
            softmax,
            scores,
            mix,
            to_f16: generic::to_f16,
        }
    }

    /// The table of `level`, or why this CPU cannot run it.
    pub fn for_level(level: Level) -> Result<Kernels, LevelError> {
        level.check()?;
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = x86::table(level) {
            return Ok(k);
        }
        #[cfg(target_arch = "aarch64")]
        if let Some(k) = arm::table(level) {
            return Ok(k);
        }
        Ok(Kernels::generic())
    }

    /// The table `KILN_KERNELS` names, else the best one for this CPU ([`Level::from_env`]).
    pub fn detect() -> Result<Kernels, LevelError> {
        Kernels::for_level(Level::from_env()?)
    }

    /// The best table for this CPU, whatever `KILN_KERNELS` says.
    pub fn best() -> Kernels {
        Kernels::for_level(Level::best()).unwrap_or_else(|_| Kernels::generic())
    }

    /// The worst tables the kernel contract allows ([`worst`]): the reference with every
    /// result moved by its whole error budget, up or down by a hash that differs between the
    /// two, so that tests deriving end-to-end budgets from them see the spread.
    pub fn worst_cases() -> [Kernels; 2] {
        let g = Kernels::generic();
        [worst::table::<0>(&g), worst::table::<1>(&g)]
    }
}

/// Variants of [`Kernels::gemm_q8`] this CPU runs (tile shapes, prefetching), by name, for
/// benchmarks that compare them in one run; empty where there are none.
#[doc(hidden)]
pub fn gemm_q8_variants() -> alloc::vec::Vec<(&'static str, GemmQ8)> {
    #[cfg(target_arch = "x86_64")]
    if Level::best() == Level::Avx512Vnni {
        return vnni::variants();
    }
    alloc::vec::Vec::new()
}

/// A weight matrix as the kernels read it.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub format: Format,
    pub layout: Layout,
    pub rows: usize,
    pub cols: usize,
    pub bytes: &'a [u8],
    /// The values in place, when stored as f32 and aligned.
    pub f32: Option<&'a [f32]>,
    /// The f16 bits in place, when stored as f16 and aligned.
    pub f16: Option<&'a [u16]>,
}

impl<'a> Matrix<'a> {
    pub fn new(
        format: Format,
        layout: Layout,
        rows: usize,
        cols: usize,
        bytes: &'a [u8],
    ) -> Matrix<'a> {
        let f32 = (format == Format::F32)
            .then(|| bytemuck::try_cast_slice(bytes).ok())
            .flatten();
        let f16 = (format == Format::F16)
            .then(|| bytemuck::try_cast_slice(bytes).ok())
            .flatten();
        Matrix {
            format,
            layout,
            rows,
            cols,
            bytes,
            f32,
            f16,
        }
    }

    /// Where its blocks lie (for block formats).
    pub fn geometry(&self) -> Geometry {
        Geometry {
            format: self.format,
            layout: self.layout,
            rows: self.rows,
            blocks: self.cols / self.format.block_len(),
        }
    }

    /// Rows `r0..r0+count` as f32: in place when possible, else dequantized into `scratch`.
    pub fn rows_f32<'s>(&self, r0: usize, count: usize, scratch: &'s mut [f32]) -> &'s [f32]
    where
        'a: 's,
    {
        if let Some(values) = self.f32 {
            return &values[r0 * self.cols..(r0 + count) * self.cols];
        }
        let g = self.geometry();
        let plain = g.groups() * crate::layout::GROUP;
        let (rb, bl) = (g.row_bytes(), self.format.block_len());
        let mut block = [0u8; Format::MAX_BLOCK_BYTES];
        for (i, r) in (r0..r0 + count).enumerate() {
            let row = &mut scratch[i * self.cols..(i + 1) * self.cols];
            if r >= plain {
                let at = g.plain_row(r);
                self.format.dequantize_row(&self.bytes[at..at + rb], row);
                continue;
            }
            let bb = self.format.block_bytes();
            for (b, values) in row.chunks_exact_mut(bl).enumerate() {
                g.block(self.bytes, r, b, &mut block);
                self.format.dequantize_row(&block[..bb], values);
            }
        }
        &scratch[..count * self.cols]
    }
}

/// Activations of a batch of tokens, as a matrix product reads them.
#[derive(Clone, Copy)]
pub enum Input<'x> {
    /// `n × cols` floats (for float weights).
    F32(&'x [f32]),
    /// `n × cols / 32` quantized blocks (for block-quantized weights).
    Q8(&'x [Q8Block]),
    /// `n × cols / 256` quantized super-blocks (for K-quant weights).
    Q8K(&'x [Q8KBlock]),
}

/// `out(t, r − rows.start) = x[t] · w[r]` for tokens `t < n` and rows `rows` of `w`;
/// `scratch` holds [`TILE_ROWS`] dequantized weight rows (or what a block kernel stages).
pub fn matmul_rows(
    k: &Kernels,
    x: Input<'_>,
    n: usize,
    w: &Matrix<'_>,
    rows: core::ops::Range<usize>,
    mut out: Out<'_>,
    scratch: &mut [f32],
) {
    let cols = w.cols;
    if let Input::Q8(xq) = x {
        let product = Product {
            w: QWeights {
                geometry: w.geometry(),
                bytes: w.bytes,
            },
            rows,
            x: &xq[..n * (cols / BLOCK)],
            n,
            out,
            scratch,
        };
        if q8::has_level_kernels(w.format) {
            (k.gemm_q8)(product);
        } else {
            (k.gemm_q5)(product);
        }
        return;
    }
    if let Input::Q8K(xq) = x {
        (k.gemm_q8k)(
            w,
            rows,
            &xq[..n * (cols / crate::quant::SUPER_BLOCK)],
            n,
            out,
        );
        return;
    }
    let Input::F32(x) = x else { return };
    let x = &x[..n * cols];
    let mut r0 = rows.start;
    while r0 < rows.end {
        let count = TILE_ROWS.min(rows.end - r0);
        let c = r0 - rows.start;
        let tile = r0 * cols..(r0 + count) * cols;
        match w.f16 {
            Some(bits) if count == TILE_ROWS => float_tile(k.dot4_f16, &bits[tile], x, c, &mut out),
            _ if count == TILE_ROWS => {
                float_tile(k.dot4, w.rows_f32(r0, count, scratch), x, c, &mut out)
            }
            _ => {
                let part = w.rows_f32(r0, count, scratch);
                for (t, xt) in x.chunks_exact(cols).enumerate() {
                    for (i, row) in part.chunks_exact(cols).enumerate() {
                        out.set(t, c + i, (k.dot)(row, xt));
                    }
                }
            }
        }
        r0 += count;
    }
}

/// Tokens a float tile kernel takes per call: its sums stay on the stack.
const FLOAT_BATCH: usize = 16;

/// Four float rows `w` against every token of `x`, written to columns `c..c + 4` of `out`.
fn float_tile<W>(
    dot4: fn(&[W], &[f32], &mut [[f32; TILE_ROWS]]),
    w: &[W],
    x: &[f32],
    c: usize,
    out: &mut Out<'_>,
) {
    let cols = w.len() / TILE_ROWS;
    let mut sums = [[0f32; TILE_ROWS]; FLOAT_BATCH];
    for (b, xs) in x.chunks(FLOAT_BATCH * cols).enumerate() {
        let sums = &mut sums[..xs.len() / cols];
        dot4(w, xs, sums);
        for (i, s) in sums.iter().enumerate() {
            for (r, &v) in s.iter().enumerate() {
                out.set(b * FLOAT_BATCH + i, c + r, v);
            }
        }
    }
}

/// `out = x / sqrt(mean(x²) + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_sq = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / libm::sqrtf(mean_sq + eps);
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// `out = gate · sigmoid(gate) · up`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + libm::expf(-g)) * u;
    }
}

/// In-place softmax.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = libm::expf(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Keys or values of one KV head, `rows × head_dim`, as the cache stores them.
#[derive(Clone, Copy)]
pub enum KvRows<'a> {
    F32(&'a [f32]),
    /// f16 bits.
    F16(&'a [u16]),
}

impl KvRows<'_> {
    /// Values held.
    pub fn values(&self) -> usize {
        match self {
            KvRows::F32(r) => r.len(),
            KvRows::F16(r) => r.len(),
        }
    }
}

/// `out[j] = scale · q · row j` for the `out.len()` rows of `k` (each `q.len()` long).
pub fn scores(q: &[f32], k: KvRows<'_>, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    for (j, o) in out.iter_mut().enumerate() {
        let at = j * hd..(j + 1) * hd;
        *o = match k {
            KvRows::F32(k) => generic::dot(q, &k[at]),
            KvRows::F16(k) => generic::dot_f16(q, &k[at]),
        } * scale;
    }
}

/// `out = Σ_j w[j] · row j` of `v` (rows `out.len()` long), summed in the order of `j`.
pub fn mix(w: &[f32], v: KvRows<'_>, out: &mut [f32]) {
    let hd = out.len();
    out.fill(0.0);
    for (j, &wj) in w.iter().enumerate() {
        let at = j * hd..(j + 1) * hd;
        match v {
            KvRows::F32(v) => {
                for (o, &x) in out.iter_mut().zip(&v[at]) {
                    *o += wj * x;
                }
            }
            KvRows::F16(v) => generic::axpy_f16(wj, &v[at], out),
        }
    }
}

/// Rotate-half RoPE on each head of `x` (`heads × head_dim`) with this position's cos/sin pairs.
pub fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    let half = head_dim / 2;
    for head in x.chunks_exact_mut(head_dim) {
        let (a, b) = head.split_at_mut(half);
        for i in 0..half {
            let (x0, x1) = (a[i], b[i]);
            a[i] = x0 * cos[i] - x1 * sin[i];
            b[i] = x1 * cos[i] + x0 * sin[i];
        }
    }
}

/// Test helpers shared by the kernel tests: random weights and activations, and every kernel
/// table this CPU can run.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use alloc::vec;
    use alloc::vec::Vec;
    use half::f16;

    /// xorshift64*, so a proptest case is reproducible from its seed.
    pub struct Rng(pub u64);

    impl Rng {
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        pub fn byte(&mut self) -> u8 {
            (self.next() >> 56) as u8
        }
        /// Uniform in `[-1, 1)`.
        pub fn unit(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// `rows` random rows of `blocks` blocks of `format`: random quants (every byte value,
    /// `i8::MIN` included), finite scales of either sign over three decades, random mins.
    pub fn weights(rng: &mut Rng, format: Format, rows: usize, blocks: usize) -> Vec<u8> {
        let bb = format.block_bytes();
        let mut w = vec![0u8; rows * blocks * bb];
        for b in w.chunks_exact_mut(bb) {
            for q in b.iter_mut() {
                *q = rng.byte();
            }
            let mut half = |at: usize, rng: &mut Rng| {
                let v = rng.unit() * libm::powf(10.0, -1.0 - 2.0 * rng.unit().abs());
                b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            };
            half(0, rng);
            if matches!(format, Format::Q4_1 | Format::Q5_1) {
                half(2, rng);
            }
        }
        w
    }

    /// `n` tokens of `cols` random activations (some blocks all zero, some large), quantized.
    pub fn activations(rng: &mut Rng, n: usize, cols: usize) -> (Vec<f32>, Vec<Q8Block>) {
        let mut x = vec![0f32; n * cols];
        for block in x.chunks_exact_mut(BLOCK) {
            let scale = match rng.byte() % 16 {
                0 => 0.0,
                1 => 100.0,
                2 => 1e-38,
                _ => 1.0,
            };
            for v in block.iter_mut() {
                *v = rng.unit() * scale;
            }
        }
        let mut q = vec![Q8Block::default(); n * cols / BLOCK];
        q8::quantize(&x, &mut q);
        (x, q)
    }

    /// The optimized tables this CPU runs (each level separately), not the generic one.
    pub fn optimized() -> Vec<Kernels> {
        let mut v: Vec<Kernels> = Level::available()
            .into_iter()
            .filter(|&l| l != Level::Generic)
            .map(|l| Kernels::for_level(l).expect("an available level"))
            .collect();
        for (name, gemm) in gemm_q8_variants().into_iter().skip(1) {
            let mut k = Kernels::best();
            k.name = name;
            k.gemm_q8 = gemm;
            v.push(k);
        }
        v
    }
}

/// Test inputs for the quantized dots: activations spread over [-1, 1), and the check that a
/// dot `got` of the stored `row` with them (8-bit quantized) is within half an 8-bit step of
/// the exact dot of the dequantized weights, term by term.
#[cfg(test)]
pub(crate) mod near {
    use alloc::vec;
    use alloc::vec::Vec;

    use crate::quant::Format;

    pub fn activations(cols: usize) -> Vec<f32> {
        (0..cols)
            .map(|i| ((i * 7919) % 200) as f32 / 100.0 - 1.0)
            .collect()
    }

    pub fn assert_near_dequantized(format: Format, row: &[u8], x: &[f32], got: f32) {
        let mut w = vec![0f32; x.len()];
        format.dequantize_row(row, &mut w);
        let exact: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum();
        let scale: f32 = w.iter().zip(x).map(|(a, b)| (a * b).abs()).sum();
        assert!(
            (got - exact).abs() <= scale / 127.0,
            "{}: {got} vs {exact} (Σ|terms| {scale})",
            format.name()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use alloc::vec;
    use proptest::prelude::*;

    /// A product to run in every layout: `rows` ggml rows of `blocks` blocks, computed from
    /// row `first` on, against `n` tokens.
    struct Case<'a> {
        format: Format,
        rows: usize,
        blocks: usize,
        first: usize,
        row_major: &'a [u8],
        x: &'a [Q8Block],
        n: usize,
    }

    impl Case<'_> {
        /// Runs `gemm` on the weights packed into `layout`, into `out` (rows `stride` apart).
        fn run(&self, gemm: GemmQ8, layout: Layout, out: &mut [f32], stride: usize) {
            let geometry = Geometry {
                format: self.format,
                layout,
                rows: self.rows,
                blocks: self.blocks,
            };
            let packed = geometry.pack(self.row_major);
            let mut scratch = vec![0f32; scratch_floats(self.blocks * BLOCK, self.n)];
            gemm(Product {
                w: QWeights {
                    geometry,
                    bytes: &packed,
                },
                rows: self.first..self.rows,
                x: self.x,
                n: self.n,
                out: Out::new(out, stride),
                scratch: &mut scratch,
            });
        }
    }

    /// Every optimized block-quantized product against the reference, in every layout its
    /// format takes, on ragged shapes (rows not a multiple of the tile or the group, tokens not
    /// a multiple of the tile, odd block counts, row ranges starting on a later group), within
    /// [`q8::error_budget`] of each output; the reference itself is bit-identical in every
    /// layout.
    fn check_gemm(format: Format, rows: usize, blocks: usize, n: usize, pad: usize, seed: u64) {
        let mut rng = testing::Rng(seed | 1);
        let w = weights(&mut rng, format, rows, blocks);
        let (_, x) = activations(&mut rng, n, blocks * BLOCK);
        let first = if rows > 4 && seed.is_multiple_of(2) {
            4
        } else {
            0
        };
        let cols = rows - first;
        let stride = cols + pad;
        let case = Case {
            format,
            rows,
            blocks,
            first,
            row_major: &w,
            x: &x,
            n,
        };
        let mut want = vec![f32::NAN; n * stride];
        case.run(q8::gemm, Layout::Rows, &mut want, stride);
        let rb = w.len() / rows;
        for layout in Layout::ALL.map(|l| l.for_format(format)) {
            let mut same = vec![f32::NAN; n * stride];
            case.run(q8::gemm, layout, &mut same, stride);
            assert!(
                same.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "the reference in {layout:?} differs from ggml rows"
            );
            for k in optimized() {
                let gemm = if q8::has_level_kernels(format) {
                    k.gemm_q8
                } else {
                    k.gemm_q5
                };
                let mut got = vec![f32::NAN; n * stride];
                case.run(gemm, layout, &mut got, stride);
                for t in 0..n {
                    let xt = &x[t * blocks..(t + 1) * blocks];
                    for c in 0..stride {
                        let (g, e) = (got[t * stride + c], want[t * stride + c]);
                        if c >= cols {
                            assert!(
                                g.is_nan(),
                                "{} {layout:?}: wrote padding at ({t}, {c})",
                                k.name
                            );
                            continue;
                        }
                        let r = first + c;
                        let terms = q8::abs_terms(format, &w[r * rb..(r + 1) * rb], xt);
                        let budget = q8::error_budget(blocks, terms);
                        assert!(
                            (g - e).abs() <= budget,
                            "{} {format:?} {layout:?} {rows}x{blocks} blocks from row {first}, {n} tokens: ({t}, {r}) {g} vs {e}, budget {budget}",
                            k.name
                        );
                    }
                }
            }
        }
    }

    /// Every table's 5-bit product gives the reference's bits on ggml's rows.
    fn check_gemm_q5(format: Format, rows: usize, blocks: usize, n: usize, seed: u64) {
        let mut rng = testing::Rng(seed | 1);
        let w = weights(&mut rng, format, rows, blocks);
        let (_, x) = activations(&mut rng, n, blocks * BLOCK);
        let case = Case {
            format,
            rows,
            blocks,
            first: 0,
            row_major: &w,
            x: &x,
            n,
        };
        let mut want = vec![f32::NAN; n * rows];
        case.run(q8::gemm, Layout::Rows, &mut want, rows);
        for k in optimized() {
            let mut got = vec![f32::NAN; n * rows];
            case.run(k.gemm_q5, Layout::Rows, &mut got, rows);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{} {format:?} {rows}x{blocks}, {n} tokens: {got:?} vs {want:?}",
                k.name
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn gemm_q5_0_equals_the_reference(rows in 1usize..12, blocks in 1usize..8, n in 1usize..10, seed: u64) {
            check_gemm_q5(Format::Q5_0, rows, blocks, n, seed);
        }

        #[test]
        fn gemm_q5_1_equals_the_reference(rows in 1usize..12, blocks in 1usize..8, n in 1usize..10, seed: u64) {
            check_gemm_q5(Format::Q5_1, rows, blocks, n, seed);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn gemm_q4_0_matches_the_reference(rows in 1usize..40, blocks in 1usize..12, n in 1usize..10, pad in 0usize..3, seed: u64) {
            check_gemm(Format::Q4_0, rows, blocks, n, pad, seed);
        }

        #[test]
        fn gemm_q4_1_matches_the_reference(rows in 1usize..40, blocks in 1usize..12, n in 1usize..10, pad in 0usize..3, seed: u64) {
            check_gemm(Format::Q4_1, rows, blocks, n, pad, seed);
        }

        #[test]
        fn gemm_q8_0_matches_the_reference(rows in 1usize..40, blocks in 1usize..12, n in 1usize..10, pad in 0usize..3, seed: u64) {
            check_gemm(Format::Q8_0, rows, blocks, n, pad, seed);
        }

        #[test]
        fn gemm_q5_0_matches_the_reference(rows in 1usize..40, blocks in 1usize..12, n in 1usize..10, pad in 0usize..3, seed: u64) {
            check_gemm(Format::Q5_0, rows, blocks, n, pad, seed);
        }

        #[test]
        fn gemm_q5_1_matches_the_reference(rows in 1usize..40, blocks in 1usize..12, n in 1usize..10, pad in 0usize..3, seed: u64) {
            check_gemm(Format::Q5_1, rows, blocks, n, pad, seed);
        }

        /// Quantizing activations is bit-identical in every table (llama.cpp's rounding).
        #[test]
        fn quantize_is_bit_identical(blocks in 1usize..40, seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let (x, want) = activations(&mut rng, 1, blocks * BLOCK);
            for k in optimized() {
                let mut got = vec![Q8Block::default(); blocks];
                (k.quantize)(&x, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    prop_assert_eq!(g.qs, w.qs, "{}", k.name);
                    prop_assert_eq!(g.d.to_bits(), w.d.to_bits(), "{}", k.name);
                    prop_assert_eq!(g.s.to_bits(), w.s.to_bits(), "{}", k.name);
                }
            }
        }
    }

    fn floats(rng: &mut testing::Rng, len: usize, scale: f32) -> alloc::vec::Vec<f32> {
        (0..len).map(|_| rng.unit() * scale).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Dot products sum the same products in another order: within
        /// `(len/16 + 24)·ε·Σ|a·b|` of the reference.
        #[test]
        fn dot_matches_the_reference(len in 0usize..300, seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let (a, b) = (floats(&mut rng, len, 3.0), floats(&mut rng, len, 3.0));
            let want = generic::dot(&a, &b);
            let terms: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum();
            let budget = budget::dot(len, terms);
            for k in optimized() {
                let got = (k.dot)(&a, &b);
                prop_assert!((got - want).abs() <= budget, "{}: {got} vs {want}", k.name);
            }
        }

        /// RMSNorm: the mean square is summed in another order, so each output is within
        /// `(len/16 + 24)·ε` of the reference, relatively.
        #[test]
        fn rms_norm_matches_the_reference(len in 1usize..700, seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let (x, w) = (floats(&mut rng, len, 4.0), floats(&mut rng, len, 2.0));
            let mut want = alloc::vec![0f32; len];
            rms_norm(&x, &w, 1e-5, &mut want);
            for k in optimized() {
                let mut got = alloc::vec![f32::NAN; len];
                (k.rms_norm)(&x, &w, 1e-5, &mut got);
                for (g, e) in got.iter().zip(&want) {
                    prop_assert!((g - e).abs() <= budget::rms_norm(len, *e), "{}: {g} vs {e}", k.name);
                }
            }
        }

        /// SwiGLU with a vector `e^x` (2 ulp): each output within 8 ulp of the reference.
        #[test]
        fn swiglu_matches_the_reference(len in 0usize..700, seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let (g, u) = (floats(&mut rng, len, 30.0), floats(&mut rng, len, 2.0));
            let mut want = alloc::vec![0f32; len];
            swiglu(&g, &u, &mut want);
            for k in optimized() {
                let mut got = alloc::vec![f32::NAN; len];
                (k.swiglu)(&g, &u, &mut got);
                for (a, e) in got.iter().zip(&want) {
                    prop_assert!((a - e).abs() <= budget::swiglu(*e), "{}: {a} vs {e}", k.name);
                }
            }
        }

        /// Softmax: `e^x` within 2 ulp and the sum in another order: each probability within
        /// `(len/16 + 32)·ε` of the reference, relatively.
        #[test]
        fn softmax_matches_the_reference(len in 1usize..600, seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let x = floats(&mut rng, len, 20.0);
            let mut want = x.clone();
            softmax(&mut want);
            for k in optimized() {
                let mut got = x.clone();
                (k.softmax)(&mut got);
                for (g, e) in got.iter().zip(&want) {
                    prop_assert!((g - e).abs() <= budget::softmax(len, *e), "{}: {g} vs {e}", k.name);
                }
            }
        }
    }

    fn halves(rng: &mut testing::Rng, len: usize, scale: f32) -> alloc::vec::Vec<u16> {
        (0..len)
            .map(|_| half::f16::from_f32(rng.unit() * scale).to_bits())
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Scores against f32 and f16 keys: each within the budget of
        /// [`dot_matches_the_reference`], for head sizes with and without a vector kernel.
        #[test]
        fn scores_match_the_reference(hd in 1usize..140, rows in 0usize..40, f16 in any::<bool>(), seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let q = floats(&mut rng, hd, 3.0);
            let (keys32, keys16) = (floats(&mut rng, rows * hd, 3.0), halves(&mut rng, rows * hd, 3.0));
            let keys = if f16 { KvRows::F16(&keys16) } else { KvRows::F32(&keys32) };
            let key = |j: usize, d: usize| if f16 { q8::f16_to_f32(keys16[j * hd + d]) } else { keys32[j * hd + d] };
            let mut want = vec![0f32; rows];
            scores(&q, keys, 0.125, &mut want);
            for k in optimized() {
                let mut got = vec![f32::NAN; rows];
                (k.scores)(&q, keys, 0.125, &mut got);
                for (j, (g, e)) in got.iter().zip(&want).enumerate() {
                    let terms: f32 = (0..hd).map(|d| (q[d] * key(j, d)).abs()).sum();
                    let budget = 0.125 * budget::dot(hd, terms);
                    prop_assert!((g - e).abs() <= budget, "{} hd {hd}: row {j}: {g} vs {e}", k.name);
                }
            }
        }

        /// The weighted sum of f32 and f16 values: both sum in the order of the rows, fused or
        /// not, so each output is within `(2·rows + 4)·ε·Σ|w·v|` of the reference.
        #[test]
        fn mix_matches_the_reference(hd in 1usize..140, rows in 0usize..40, f16 in any::<bool>(), seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let w = floats(&mut rng, rows, 1.0);
            let (vals32, vals16) = (floats(&mut rng, rows * hd, 3.0), halves(&mut rng, rows * hd, 3.0));
            let vals = if f16 { KvRows::F16(&vals16) } else { KvRows::F32(&vals32) };
            let val = |j: usize, d: usize| if f16 { q8::f16_to_f32(vals16[j * hd + d]) } else { vals32[j * hd + d] };
            let mut want = vec![0f32; hd];
            mix(&w, vals, &mut want);
            for k in optimized() {
                let mut got = vec![f32::NAN; hd];
                (k.mix)(&w, vals, &mut got);
                for (d, (g, e)) in got.iter().zip(&want).enumerate() {
                    let terms: f32 = (0..rows).map(|j| (w[j] * val(j, d)).abs()).sum();
                    let budget = budget::mix(rows, terms);
                    prop_assert!((g - e).abs() <= budget, "{} hd {hd}: lane {d}: {g} vs {e}", k.name);
                }
            }
        }

        /// Float weight products, f32 or f16 in place (4-row tiles, any row tail, batches
        /// longer than one call of the tile kernel): every table, the reference included, within
        /// `(len/8 + 24)·ε·Σ|w·x|` of the sum in f64.
        #[test]
        fn float_products_match_the_exact_sums(rows in 1usize..14, cols in 1usize..70, n in 1usize..40, f16 in any::<bool>(), seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let halves = halves(&mut rng, rows * cols, 2.0);
            let values: alloc::vec::Vec<f32> = if f16 {
                halves.iter().map(|&h| q8::f16_to_f32(h)).collect()
            } else {
                floats(&mut rng, rows * cols, 2.0)
            };
            let (format, bytes): (Format, &[u8]) = if f16 {
                (Format::F16, bytemuck::cast_slice(&halves))
            } else {
                (Format::F32, bytemuck::cast_slice(&values))
            };
            let w = Matrix::new(format, Layout::Rows, rows, cols, bytes);
            prop_assert!(w.f16.is_some() == f16 && w.f32.is_some() != f16);
            let x = floats(&mut rng, n * cols, 3.0);
            let mut scratch = vec![0f32; scratch_floats(cols, n)];
            for k in core::iter::once(Kernels::generic()).chain(optimized()) {
                let mut out = vec![f32::NAN; n * rows];
                matmul_rows(&k, Input::F32(&x), n, &w, 0..rows, Out::new(&mut out, rows), &mut scratch);
                for t in 0..n {
                    let xt = &x[t * cols..(t + 1) * cols];
                    for r in 0..rows {
                        let row = &values[r * cols..(r + 1) * cols];
                        let exact: f64 = row.iter().zip(xt).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
                        let terms: f32 = row.iter().zip(xt).map(|(a, b)| (a * b).abs()).sum();
                        let got = out[t * rows + r];
                        let err = (f64::from(got) - exact).abs();
                        prop_assert!(err <= f64::from(budget::float_product(cols, terms)), "{}: token {t} row {r}: {got} vs {exact}", k.name);
                    }
                }
            }
        }

        /// Rounding to f16 is bit-identical in every table, from subnormals to overflow.
        #[test]
        fn to_f16_is_bit_identical(len in 0usize..100, seed: u64) {
            let mut rng = testing::Rng(seed | 1);
            let x: alloc::vec::Vec<f32> = (0..len)
                .map(|_| rng.unit() * libm::powf(10.0, 6.0 * rng.unit()))
                .collect();
            let mut want = alloc::vec![0u16; len];
            generic::to_f16(&x, &mut want);
            for k in optimized() {
                let mut got = alloc::vec![0u16; len];
                (k.to_f16)(&x, &mut got);
                prop_assert_eq!(&got, &want, "{}", k.name);
            }
        }
    }

    /// Each worst table moves every block product by its whole budget, up or down, and the
    /// four tables do not all move the same way.
    #[test]
    fn worst_tables_sit_on_the_edge_of_the_budget() {
        let mut rng = testing::Rng(7);
        let (rows, blocks, n) = (6, 5, 3);
        for format in [Format::Q4_0, Format::Q4_1, Format::Q8_0] {
            let w = weights(&mut rng, format, rows, blocks);
            let (_, x) = activations(&mut rng, n, blocks * BLOCK);
            let case = Case {
                format,
                rows,
                blocks,
                first: 0,
                row_major: &w,
                x: &x,
                n,
            };
            let mut want = vec![0f32; n * rows];
            case.run(q8::gemm, Layout::Rows, &mut want, rows);
            let mut ups = 0;
            for k in Kernels::worst_cases() {
                let mut got = vec![0f32; n * rows];
                case.run(k.gemm_q8, Layout::X16, &mut got, rows);
                for t in 0..n {
                    for r in 0..rows {
                        let rb = w.len() / rows;
                        let xt = &x[t * blocks..(t + 1) * blocks];
                        let budget = q8::error_budget(
                            blocks,
                            q8::abs_terms(format, &w[r * rb..(r + 1) * rb], xt),
                        );
                        let (g, e) = (got[t * rows + r], want[t * rows + r]);
                        // Moved by the budget, up to the rounding of that one addition.
                        let off = ((g - e).abs() - budget).abs();
                        assert!(
                            off <= f32::EPSILON * g.abs(),
                            "{format:?} ({t}, {r}): {g} vs {e}, budget {budget}"
                        );
                        ups += usize::from(g > e);
                    }
                }
            }
            assert!(ups > 0 && ups < 2 * n * rows, "{format:?}: {ups} moved up");
        }
    }

    /// SmolLM2's shapes, where a tile covers whole rows and tokens, once each.
    #[test]
    fn gemm_at_smollm2_shapes() {
        for format in Format::ALL.into_iter().filter(|&f| q8::uses_q8(f)) {
            check_gemm(format, 64, 18, 5, 0, 7);
            check_gemm(format, 24, 48, 1, 0, 9);
        }
    }
}
