//! Element-wise activations on host memory (f32), for burn's Flex backend: one pass forward
//! and one backward, in parallel chunks.

use super::host_buffers::par_filled;

/// Values per parallel task: large enough to amortise scheduling, small enough to share.
const CHUNK: usize = 1 << 16;

/// `x` clamped to `[min, max]`.
pub fn clamp(x: &[f32], min: f32, max: f32) -> Vec<f32> {
    // SAFETY: every value of every chunk is written (the chunks of `x` have the same lengths).
    unsafe {
        par_filled(x.len(), CHUNK, |index, out| {
            let x = &x[index * CHUNK..][..out.len()];
            for (out, &value) in out.iter_mut().zip(x) {
                out.write(value.max(min).min(max));
            }
        })
    }
}

/// The gradient of [`clamp`]: `grad` where `min <= x <= max`, zero elsewhere.
pub fn clamp_grad(x: &[f32], grad: &[f32], min: f32, max: f32) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "gradient size");
    // SAFETY: every value of every chunk is written (the chunks of `x` and `grad` have the
    // same lengths).
    unsafe {
        par_filled(x.len(), CHUNK, |index, out| {
            let x = &x[index * CHUNK..][..out.len()];
            let grad = &grad[index * CHUNK..][..out.len()];
            for ((out, &value), &g) in out.iter_mut().zip(x).zip(grad) {
                out.write(if (min..=max).contains(&value) { g } else { 0.0 });
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clamp_passes_gradients_inside_the_range_only() {
        let x = [-1.0, 0.0, 3.0, 6.0, 7.5];
        assert_eq!(clamp(&x, 0.0, 6.0), vec![0.0, 0.0, 3.0, 6.0, 6.0]);
        let grad = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert_eq!(
            clamp_grad(&x, &grad, 0.0, 6.0),
            vec![0.0, 2.0, 3.0, 4.0, 0.0]
        );
    }
}
