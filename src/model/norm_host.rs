//! BatchNorm on host memory (f32, NCHW), for burn's Flex backend.
//!
//! burn's generic BatchNorm swaps the batch and channel axes and copies the activation into a
//! `[C, N*H*W]` layout for every reduction (twice forward, twice backward). These kernels read
//! each channel's planes in place, two passes forward and two backward, per channel in a
//! fixed order (results do not depend on the number of threads).

use rayon::prelude::*;

use super::host_buffers::par_filled;

/// An activation `[N, C, plane]` (plane = product of the spatial sizes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    /// Images.
    pub batch: usize,
    /// Channels.
    pub channels: usize,
    /// Values per channel and image.
    pub plane: usize,
}

impl NormShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Values per channel over the batch.
    fn count(&self) -> usize {
        self.batch * self.plane
    }

    /// The planes of `channel`, image by image.
    fn planes<'a>(&self, values: &'a [f32], channel: usize) -> impl Iterator<Item = &'a [f32]> {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |image| &values[(image * channels + channel) * plane..][..plane])
    }
}

/// `sum f(a[k], b[k])` with eight partial sums ([`crate::linalg::lane_sums`]), returned in f64.
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let (lanes, tail) = crate::linalg::lane_sums(a, b, f);
    lanes.iter().map(|&lane| f64::from(lane)).sum::<f64>() + f64::from(tail)
}

/// Per-channel mean and biased variance over the batch and the plane.
///
/// # Panics
/// If `x` does not hold `shape`.
pub fn batch_statistics(shape: &NormShape, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), shape.len(), "activation size");
    let count = shape.count().max(1) as f64;
    (0..shape.channels)
        .into_par_iter()
        .map(|channel| {
            let sum: f64 = shape
                .planes(x, channel)
                .map(|plane| lane_sum(plane, plane, |value, _| value))
                .sum();
            let mean = sum / count;
            let mean_f32 = mean as f32;
            let squares: f64 = shape
                .planes(x, channel)
                .map(|plane| {
                    lane_sum(plane, plane, |value, _| {
                        (value - mean_f32) * (value - mean_f32)
                    })
                })
                .sum();
            (mean_f32, (squares / count) as f32)
        })
        .unzip()
}

/// `y = x * scale[c] + shift[c]`.
///
/// # Panics
/// If `x` does not hold `shape` or the vectors are not one value per channel.
pub fn scale_shift(shape: &NormShape, x: &[f32], scale: &[f32], shift: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), shape.len(), "activation size");
    assert!(scale.len() == shape.channels && shift.len() == shape.channels);
    let plane = shape.plane.max(1);
    // SAFETY: the chunks of `y` and `x` have the same lengths, and every value is written.
    unsafe {
        par_filled(x.len(), plane, |index, out| {
            let input = &x[index * plane..][..out.len()];
            let channel = index % shape.channels;
            let (a, b) = (scale[channel], shift[channel]);
            for (out, &value) in out.iter_mut().zip(input) {
                out.write(value * a + b);
            }
        })
    }
}

/// The per-channel `(scale, shift)` that normalise with `mean`, `variance` and apply `gamma`,
/// `beta`: `scale = gamma / sqrt(variance + epsilon)`, `shift = beta - mean * scale`.
pub fn affine(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    variance: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>) {
    gamma
        .iter()
        .zip(beta)
        .zip(mean.iter().zip(variance))
        .map(|((&gamma, &beta), (&mean, &variance))| {
            let scale = (f64::from(gamma) / (f64::from(variance) + epsilon).sqrt()) as f32;
            (scale, beta - mean * scale)
        })
        .unzip()
}

/// BatchNorm in training mode: the output and the batch's `(mean, variance)`.
pub fn train_forward(
    shape: &NormShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mean, variance) = batch_statistics(shape, x);
    let (scale, shift) = affine(gamma, beta, &mean, &variance, epsilon);
    (scale_shift(shape, x, &scale, &shift), mean, variance)
}

/// Gradients of [`train_forward`]: `(x, gamma, beta)`, from the statistics it returned.
///
/// With `xhat = (x - mean) / std`: `dbeta = sum dy`, `dgamma = sum dy * xhat`, and
/// `dx = gamma / std * (dy - dbeta / M - xhat * dgamma / M)` over the `M` values per channel.
pub fn train_backward(
    shape: &NormShape,
    x: &[f32],
    gamma: &[f32],
    mean: &[f32],
    variance: &[f32],
    epsilon: f64,
    output_grad: &[f32],
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), shape.len(), "activation size");
    assert_eq!(output_grad.len(), shape.len(), "gradient size");
    let count = shape.count().max(1) as f64;
    // Per channel: dx = a * dy + b * x + c.
    let per_channel: Vec<(f32, f32, [f32; 3])> = (0..shape.channels)
        .into_par_iter()
        .map(|channel| {
            let (sum_grad, sum_grad_x) = shape
                .planes(output_grad, channel)
                .zip(shape.planes(x, channel))
                .fold((0.0f64, 0.0f64), |(g, gx), (grad, input)| {
                    (
                        g + lane_sum(grad, grad, |value, _| value),
                        gx + lane_sum(grad, input, |dy, value| dy * value),
                    )
                });
            let inv_std = 1.0 / (f64::from(variance[channel]) + epsilon).sqrt();
            let mean = f64::from(mean[channel]);
            let gamma = f64::from(gamma[channel]);
            let beta_grad = sum_grad;
            let gamma_grad = inv_std * (sum_grad_x - mean * sum_grad);
            let a = gamma * inv_std;
            let b = -a * inv_std * gamma_grad / count;
            let c = -a * beta_grad / count - b * mean;
            (
                gamma_grad as f32,
                beta_grad as f32,
                [a as f32, b as f32, c as f32],
            )
        })
        .collect();
    let plane = shape.plane.max(1);
    // SAFETY: the chunks of `input_grad`, `x` and `output_grad` have the same lengths, and
    // every value is written.
    let input_grad = unsafe {
        par_filled(x.len(), plane, |index, out| {
            let input = &x[index * plane..][..out.len()];
            let grad = &output_grad[index * plane..][..out.len()];
            let [a, b, c] = per_channel[index % shape.channels].2;
            for ((out, &value), &dy) in out.iter_mut().zip(input).zip(grad) {
                out.write(a * dy + b * value + c);
            }
        })
    };
    let gamma_grad = per_channel.iter().map(|entry| entry.0).collect();
    let beta_grad = per_channel.iter().map(|entry| entry.1).collect();
    (input_grad, gamma_grad, beta_grad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nudges one of (input, gamma, beta) by the given step, for a numeric derivative.
    type Perturbation<'a> = dyn Fn(&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>, f32) + 'a;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let h = (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(seed.wrapping_mul(97));
                ((h >> 8) % 2001) as f32 / 500.0 - 1.5
            })
            .collect()
    }

    /// The loss `sum(y * weights)`, whose gradient with respect to `y` is `weights`.
    fn loss(shape: &NormShape, x: &[f32], gamma: &[f32], beta: &[f32], weights: &[f32]) -> f64 {
        let (y, _, _) = train_forward(shape, x, gamma, beta, 1e-5);
        y.iter()
            .zip(weights)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    }

    #[test]
    fn statistics_and_output_match_the_definition() {
        let shape = NormShape {
            batch: 3,
            channels: 2,
            plane: 13,
        };
        let x = values(shape.len(), 1);
        let (y, mean, variance) = train_forward(&shape, &x, &[2.0, 0.5], &[0.1, -0.3], 1e-5);
        for channel in 0..2 {
            let members: Vec<f64> = shape
                .planes(&x, channel)
                .flatten()
                .map(|&v| f64::from(v))
                .collect();
            let m = members.iter().sum::<f64>() / members.len() as f64;
            let v = members.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / members.len() as f64;
            assert!((f64::from(mean[channel]) - m).abs() < 1e-6);
            assert!((f64::from(variance[channel]) - v).abs() < 1e-5);
            let out: Vec<f32> = shape.planes(&y, channel).flatten().copied().collect();
            let out_mean = out.iter().map(|&v| f64::from(v)).sum::<f64>() / out.len() as f64;
            assert!((out_mean - [0.1, -0.3][channel]).abs() < 1e-5);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let shape = NormShape {
            batch: 2,
            channels: 3,
            plane: 10,
        };
        let x = values(shape.len(), 2);
        let gamma = vec![1.5, -0.7, 0.9];
        let beta = vec![0.2, 0.0, -1.0];
        let weights = values(shape.len(), 3);
        let (mean, variance) = batch_statistics(&shape, &x);
        let (dx, dgamma, dbeta) =
            train_backward(&shape, &x, &gamma, &mean, &variance, 1e-5, &weights);
        let step = 1e-2f32;
        let numeric = |change: &Perturbation<'_>| {
            let (mut x1, mut g1, mut b1) = (x.clone(), gamma.clone(), beta.clone());
            change(&mut x1, &mut g1, &mut b1, step);
            let (mut x2, mut g2, mut b2) = (x.clone(), gamma.clone(), beta.clone());
            change(&mut x2, &mut g2, &mut b2, -step);
            (loss(&shape, &x1, &g1, &b1, &weights) - loss(&shape, &x2, &g2, &b2, &weights))
                / (2.0 * f64::from(step))
        };
        for index in [0, 7, 25, 59] {
            let expected = numeric(&|x, _, _, h| x[index] += h);
            assert!(
                (f64::from(dx[index]) - expected).abs() < 2e-2,
                "dx[{index}]"
            );
        }
        for channel in 0..3 {
            let expected = numeric(&|_, g, _, h| g[channel] += h);
            assert!(
                (f64::from(dgamma[channel]) - expected).abs() < 2e-2,
                "dgamma"
            );
            let expected = numeric(&|_, _, b, h| b[channel] += h);
            assert!((f64::from(dbeta[channel]) - expected).abs() < 2e-2, "dbeta");
        }
    }
}
