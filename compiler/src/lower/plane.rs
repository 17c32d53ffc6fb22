//! Reads an evaluated tensor as the 2-D plane over two of its axes, checking that it does not
//! vary along the others (which only broadcast).

use tract_onnx::prelude::Tensor as TractTensor;

/// `rows × cols` values: `row_axis` × `col_axis` of the tensor, where an axis of size 1
/// broadcasts to the plane's size.
pub struct Plane<T> {
    pub rows: usize,
    pub cols: usize,
    pub values: Vec<T>,
}

impl<T: Copy + PartialEq> Plane<T> {
    pub fn at(&self, row: usize, col: usize) -> T {
        self.values[row * self.cols + col]
    }

    /// Reads `values` of `shape` as the plane `rows × cols` over `(row_axis, col_axis)`.
    pub fn read(
        values: &[T],
        shape: &[usize],
        (row_axis, col_axis): (usize, usize),
        (rows, cols): (usize, usize),
    ) -> Result<Plane<T>, String> {
        let fits = |axis: usize, n: usize| shape.get(axis).is_some_and(|&d| d == n || d == 1);
        if !fits(row_axis, rows) || !fits(col_axis, cols) || row_axis == col_axis {
            return Err(format!("shape {shape:?} does not cover {rows} × {cols}"));
        }
        let strides: Vec<usize> = (0..shape.len())
            .map(|i| shape[i + 1..].iter().product())
            .collect();
        let at = |r: usize, c: usize| {
            let r = if shape[row_axis] == 1 { 0 } else { r };
            let c = if shape[col_axis] == 1 { 0 } else { c };
            values[r * strides[row_axis] + c * strides[col_axis]]
        };
        // Every element must equal the plane's element at its row and column.
        for (i, v) in values.iter().enumerate() {
            let (r, c) = (
                i / strides[row_axis] % shape[row_axis],
                i / strides[col_axis] % shape[col_axis],
            );
            if *v != at(r, c) {
                return Err(format!(
                    "values of shape {shape:?} vary along a broadcast axis"
                ));
            }
        }
        let values = (0..rows)
            .flat_map(|r| (0..cols).map(move |c| (r, c)))
            .map(|(r, c)| at(r, c))
            .collect();
        Ok(Plane { rows, cols, values })
    }

    /// [`Plane::read`] of a tract tensor of element type `T`.
    pub fn of(
        t: &TractTensor,
        axes: (usize, usize),
        size: (usize, usize),
    ) -> Result<Plane<T>, String>
    where
        T: tract_onnx::prelude::Datum,
    {
        let view = t.try_as_plain_ram().map_err(|e| format!("{e}"))?;
        let values = view.as_slice::<T>().map_err(|e| format!("{e}"))?;
        Plane::read(values, t.shape(), axes, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_axes_read_as_the_plane() {
        // [2 heads, 3 rows, 1 col] with the same values for both heads.
        let values = [1, 2, 3, 1, 2, 3];
        let plane = Plane::read(&values, &[2, 3, 1], (1, 2), (3, 4)).expect("plane");
        assert_eq!((plane.at(2, 3), plane.at(0, 0)), (3, 1));
        let varying = [1, 2, 3, 1, 2, 4];
        assert!(Plane::read(&varying, &[2, 3, 1], (1, 2), (3, 4)).is_err());
    }
}
