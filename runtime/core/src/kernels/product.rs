//! The arguments of a block-quantized matrix product, as data: the weights (a whole matrix in
//! its layout), the rows to compute, the quantized activations, where the results go and the
//! participant's scratch.

use core::marker::PhantomData;
use core::ops::Range;

use super::q8::Q8Block;
use crate::layout::{Geometry, Layout};

/// Block-quantized weights: all rows of one matrix, so that kernels for an interleaved layout
/// find the groups of whichever rows they are given.
#[derive(Clone, Copy, Debug)]
pub struct QWeights<'a> {
    pub geometry: Geometry,
    pub bytes: &'a [u8],
}

impl<'a> QWeights<'a> {
    /// The bytes of `rows`, which must be stored as ggml rows (any row of a [`Layout::Rows`]
    /// matrix, the rows past the last group of an interleaved one).
    pub fn plain_rows(&self, rows: Range<usize>) -> &'a [u8] {
        let g = &self.geometry;
        debug_assert!(g.layout == Layout::Rows || rows.start >= g.groups() * crate::layout::GROUP);
        let rb = g.row_bytes();
        &self.bytes[g.plain_row(rows.start)..g.plain_row(rows.start) + rows.len() * rb]
    }
}

/// Where a product writes: the result for token `t` and the `c`-th of its rows at
/// `t·stride + c` of a row-major output. Several participants write disjoint columns of one
/// output at once, which `&mut` slices cannot express, hence the pointer.
pub struct Out<'a> {
    ptr: *mut f32,
    stride: usize,
    len: usize,
    _out: PhantomData<&'a mut [f32]>,
}

// SAFETY: an `Out` is only ever created from a `&mut` slice or split from one into views
// whose columns do not overlap (see `columns`), so sending one to another thread shares nothing.
unsafe impl Send for Out<'_> {}

impl<'a> Out<'a> {
    /// All of `out`, with rows of results `stride` apart.
    pub fn new(out: &'a mut [f32], stride: usize) -> Out<'a> {
        Out {
            ptr: out.as_mut_ptr(),
            stride,
            len: out.len(),
            _out: PhantomData,
        }
    }

    /// The view that starts at column `first`.
    ///
    /// # Safety
    /// The caller gives no two live views (this one included) a column in common.
    pub unsafe fn columns(&self, first: usize) -> Out<'a> {
        assert!(first <= self.len, "columns past the output");
        Out {
            // SAFETY: `first` is inside the output, checked above.
            ptr: unsafe { self.ptr.add(first) },
            stride: self.stride,
            len: self.len - first,
            _out: PhantomData,
        }
    }

    pub fn stride(&self) -> usize {
        self.stride
    }

    /// Asserts the view holds `n` tokens of `cols` columns, and returns the pointer to write
    /// them at (`t·stride + c`).
    pub fn checked(&mut self, n: usize, cols: usize) -> *mut f32 {
        let fits = n == 0
            || cols == 0
            || ((n == 1 || cols <= self.stride) && (n - 1) * self.stride + cols <= self.len);
        assert!(
            fits,
            "product output: {n} tokens of {cols} do not fit (stride {}, {} floats)",
            self.stride, self.len
        );
        self.ptr
    }

    /// Writes the result of token `t`, column `c`.
    pub fn set(&mut self, t: usize, c: usize, v: f32) {
        let at = t * self.stride + c;
        assert!(at < self.len, "product output: ({t}, {c}) is outside");
        // SAFETY: in bounds (checked above) and this view's column by its construction.
        unsafe { *self.ptr.add(at) = v };
    }
}

/// One participant's block-quantized product: `out(t, r − rows.start) = row r of w · token t
/// of x` for `r` in `rows` (starting on a group of an interleaved matrix) and `t < n`.
pub struct Product<'a> {
    pub w: QWeights<'a>,
    pub rows: Range<usize>,
    /// `n` tokens of `w.geometry.blocks` blocks each.
    pub x: &'a [Q8Block],
    pub n: usize,
    pub out: Out<'a>,
    /// The participant's scratch (see `exec::plan`); kernels may stage activations in it.
    pub scratch: &'a mut [f32],
}
