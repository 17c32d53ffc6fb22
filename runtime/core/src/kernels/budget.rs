//! The error budgets of the kernel contract: how far an optimized kernel may be from the
//! reference (`generic`) one. Integer parts, activation quantization and f16 rounding are
//! exact; only float sums taken in another order (and the vector `e^x`, within 2 ulp) differ.
//! The proptests hold every level to these, and [`super::worst`] moves every result by them.
//! The block products' budget is [`super::q8::error_budget`].

/// `Σ a·b` over `len` products whose magnitudes sum to `abs_terms`: `(len/16 + 24)·ε·Σ|a·b|`
/// (lanes of partial sums, then a reduction, against one running sum of 16 lanes).
pub fn dot(len: usize, abs_terms: f32) -> f32 {
    (len / 16 + 24) as f32 * f32::EPSILON * abs_terms
}

/// One float weight row against one token, `len` products whose magnitudes sum to
/// `abs_terms`: `(len/8 + 24)·ε·Σ|w·x|` (the tile kernels keep 8 lanes of partial sums where
/// registers are 256 bits or fewer, against the reference's 16).
pub fn float_product(len: usize, abs_terms: f32) -> f32 {
    (len / 8 + 24) as f32 * f32::EPSILON * abs_terms
}

/// One RMSNorm output of value `e` over a row of `len`: the mean square is summed in another
/// order, `(len/16 + 24)·ε·|e|`.
pub fn rms_norm(len: usize, e: f32) -> f32 {
    (len / 16 + 24) as f32 * f32::EPSILON * e.abs()
}

/// One SwiGLU output of value `e`: a vector `e^x` within 2 ulp, 8 ulp in all.
pub fn swiglu(e: f32) -> f32 {
    8.0 * f32::EPSILON * e.abs() + f32::MIN_POSITIVE
}

/// One probability `e` of a softmax over `len` values: `e^x` within 2 ulp and the sum in
/// another order, `(len/16 + 32)·ε·e`.
pub fn softmax(len: usize, e: f32) -> f32 {
    (len / 16 + 32) as f32 * f32::EPSILON * e + f32::MIN_POSITIVE
}

/// One lane of a weighted sum of `rows` value rows whose products' magnitudes sum to
/// `abs_terms`: both sum in the order of the rows, fused or not, `(2·rows + 4)·ε·Σ|w·v|`.
pub fn mix(rows: usize, abs_terms: f32) -> f32 {
    (2 * rows + 4) as f32 * f32::EPSILON * abs_terms
}
