//! Matrix products on host memory through the `gemm` crate (the GEMM burn's Flex backend
//! uses), for the CPU paths that work on plain slices: convolution gradients and k-means.
//!
//! `gemm` splits a product over blocks of its output and never over its depth, so every
//! result is the same whatever the number of threads.

use gemm::{Parallelism, gemm};

/// A read-only `rows x cols` matrix inside a slice, with any row and column strides.
#[derive(Debug, Clone, Copy)]
pub struct MatRef<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    row_stride: usize,
    col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// The row-major matrix `data[r * cols + c]`.
    ///
    /// # Panics
    /// If `data` is shorter than `rows * cols`.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert!(data.len() >= rows * cols, "matrix data too short");
        Self {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// The matrix `data[r * row_stride + c * col_stride]`.
    ///
    /// # Panics
    /// If the last element lies outside `data`.
    pub fn strided(
        data: &'a [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let matrix = Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        };
        assert!(
            matrix.last_index() < data.len().max(1),
            "matrix data too short"
        );
        matrix
    }

    /// The transpose, without copying.
    pub fn transposed(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn last_index(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
        }
    }
}

/// Whether a product may use the rayon pool or must stay on the calling thread (when the
/// caller already runs one product per thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    /// Split the product over rayon's threads.
    Pool,
    /// Run it on the calling thread.
    Current,
}

/// `dst [m, n] (row-major) = lhs [m, k] x rhs [k, n]`, or `dst += lhs x rhs` when
/// `accumulate`.
///
/// # Panics
/// If the inner dimensions differ or `dst` is not `m * n` long.
pub fn matmul(
    dst: &mut [f32],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
    threads: Threads,
) {
    let (m, n) = (lhs.rows, rhs.cols);
    assert_eq!(dst.len(), m * n, "destination size");
    matmul_strided(dst, [n, 1], lhs, rhs, accumulate, threads);
}

/// [`matmul`] into `dst[r * row_stride + c * col_stride]` (`[row_stride, col_stride]` in
/// `dst_strides`): a product can land transposed, with no separate transpose pass.
///
/// # Panics
/// If the inner dimensions differ or the last element lies outside `dst`.
pub fn matmul_strided(
    dst: &mut [f32],
    dst_strides: [usize; 2],
    lhs: MatRef<'_>,
    rhs: MatRef<'_>,
    accumulate: bool,
    threads: Threads,
) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    let [dst_row_stride, dst_col_stride] = dst_strides;
    assert_eq!(rhs.rows, k, "inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        (m - 1) * dst_row_stride + (n - 1) * dst_col_stride < dst.len(),
        "destination too short"
    );
    if k == 0 {
        if !accumulate {
            for row in 0..m {
                for col in 0..n {
                    dst[row * dst_row_stride + col * dst_col_stride] = 0.0;
                }
            }
        }
        return;
    }
    assert!(lhs.last_index() < lhs.data.len() && rhs.last_index() < rhs.data.len());
    let parallelism = match threads {
        Threads::Pool => Parallelism::Rayon(0),
        Threads::Current => Parallelism::None,
    };
    // SAFETY: every index the product touches is inside the slices (checked above), and `dst`
    // is borrowed exclusively, so it aliases neither input.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_col_stride as isize,
            dst_row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `term(a[i], b[i])` summed into eight lanes (lane `i % 8`) and a tail (the last `len % 8`
/// terms, summed in order). Eight independent accumulators vectorise where one running sum,
/// a chain of dependent additions the compiler may not reorder, does not; the order is fixed,
/// so the result depends only on the inputs (never on threads or alignment).
#[inline]
pub fn lane_sums(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> ([f32; 8], f32) {
    let mut lanes = [0f32; 8];
    let (chunks_a, chunks_b) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(&x, &y)| term(x, y))
        .sum();
    for (x, y) in chunks_a.zip(chunks_b) {
        for lane in 0..8 {
            lanes[lane] += term(x[lane], y[lane]);
        }
    }
    (lanes, tail)
}

/// `Σ term(a[i], b[i])` in f32: [`lane_sums`] combined pairwise.
#[inline]
pub fn lane_sum(a: &[f32], b: &[f32], term: impl Fn(f32, f32) -> f32) -> f32 {
    let (lanes, tail) = lane_sums(a, b, term);
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
        + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))
        + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_of_strided_views_match_the_definition() {
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect(); // [2, 3]
        let b: Vec<f32> = (0..12).map(|v| (v as f32) * 0.5 - 2.0).collect(); // [3, 4]
        let mut product = vec![0.0; 8];
        matmul(
            &mut product,
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 3, 4),
            false,
            Threads::Pool,
        );
        for r in 0..2 {
            for c in 0..4 {
                let expected: f32 = (0..3).map(|k| a[r * 3 + k] * b[k * 4 + c]).sum();
                assert_eq!(product[r * 4 + c], expected);
            }
        }
        // (B^T)^T A^T... : [4, 3] x [3, 2] = (A B)^T, accumulated on top of itself.
        let mut transposed = vec![1.0; 8];
        matmul(
            &mut transposed,
            MatRef::row_major(&b, 3, 4).transposed(),
            MatRef::row_major(&a, 2, 3).transposed(),
            true,
            Threads::Current,
        );
        for r in 0..4 {
            for c in 0..2 {
                assert_eq!(transposed[r * 2 + c], product[c * 4 + r] + 1.0);
            }
        }
        // A B written transposed into a destination with a gap after each row of (A B)^T.
        let mut strided = vec![-1.0; 4 * 3];
        matmul_strided(
            &mut strided,
            [1, 3],
            MatRef::row_major(&a, 2, 3),
            MatRef::strided(&b, 3, 4, 4, 1),
            false,
            Threads::Pool,
        );
        for r in 0..2 {
            for c in 0..4 {
                assert_eq!(strided[c * 3 + r], product[r * 4 + c]);
            }
        }
        assert!(strided.iter().skip(2).step_by(3).all(|&gap| gap == -1.0));
    }
}
