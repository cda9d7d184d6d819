//! Element-wise activations on host memory (f32), for burn's Flex backend: one pass forward
//! and one backward, in parallel chunks.

use rayon::prelude::*;

/// Values per parallel task: large enough to amortise scheduling, small enough to share.
const CHUNK: usize = 1 << 16;

/// `x` clamped to `[min, max]`.
pub fn clamp(x: &[f32], min: f32, max: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(out, x)| {
            for (out, &value) in out.iter_mut().zip(x) {
                *out = value.max(min).min(max);
            }
        });
    out
}

/// The gradient of [`clamp`]: `grad` where `min <= x <= max`, zero elsewhere.
pub fn clamp_grad(x: &[f32], grad: &[f32], min: f32, max: f32) -> Vec<f32> {
    assert_eq!(x.len(), grad.len(), "gradient size");
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
        .for_each(|(out, (x, grad))| {
            for ((out, &value), &g) in out.iter_mut().zip(x).zip(grad) {
                *out = if (min..=max).contains(&value) { g } else { 0.0 };
            }
        });
    out
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
