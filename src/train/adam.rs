//! Adam with one pass over each parameter on the CPU.
//!
//! burn's `Adam` updates a parameter with about a dozen tensor operations (scale the moments,
//! square the gradient, add, bias-correct, square root, divide, scale, subtract), each a pass
//! over the parameter's size: for ResNet-18's 11 M weights about 1.5 GB of memory traffic a
//! step. On Flex the update here reads the parameter, its gradient and both moments once and
//! writes the three results once; the other backends run burn's sequence of operations.
//!
//! The state is burn's `AdamState`, so checkpoints written with burn's Adam load unchanged.

use std::mem::MaybeUninit;

use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Cube, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::optim::{AdamState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Bytes, DType, Device, Tensor};
use rayon::prelude::*;

/// PyTorch's and burn's defaults for the moments' decay rates.
const BETA_1: f32 = 0.9;
const BETA_2: f32 = 0.999;

/// Values per parallel task of the host update.
const CHUNK: usize = 1 << 14;

/// The scalars of one Adam update at step `time` (from 1), as burn's `Adam` computes them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamCoefficients {
    /// Learning rate.
    pub learning_rate: f32,
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// `sqrt(1 - beta_2^t) / (1 - beta_1^t)`: both bias corrections in one factor.
    pub step_factor: f32,
    /// `epsilon * sqrt(1 - beta_2^t)`: epsilon as it is added to the uncorrected `sqrt(v)`.
    pub scaled_epsilon: f32,
}

impl AdamCoefficients {
    /// The coefficients of step `time` (1 for the first update).
    pub fn new(learning_rate: LearningRate, epsilon: f32, time: usize) -> Self {
        let time = i32::try_from(time).unwrap_or(i32::MAX);
        let correction_2_sqrt = (1.0 - BETA_2.powi(time)).sqrt();
        Self {
            learning_rate: learning_rate as f32,
            beta_1: BETA_1,
            beta_2: BETA_2,
            step_factor: correction_2_sqrt / (1.0 - BETA_1.powi(time)),
            scaled_epsilon: epsilon * correction_2_sqrt,
        }
    }
}

/// One Adam update of a parameter, `(parameter, first moment, second moment)`, that a backend
/// may fuse.
#[cfg_attr(feature = "remote", backend_extension(Flex, Cube, Remote))]
#[cfg_attr(not(feature = "remote"), backend_extension(Flex, Cube))]
pub trait AdamOps: Backend {
    /// `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
    /// `p = p - lr (m k) / (sqrt(v) + e)` with `k` and `e` from [`AdamCoefficients`]: burn's
    /// operations, in its order.
    fn adam_update(
        parameter: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        coefficients: AdamCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        operations::<Self>(parameter, grad, moment_1, moment_2, coefficients)
    }
}

/// [`AdamOps::adam_update`] as burn's sequence of tensor operations.
fn operations<B: Backend>(
    parameter: FloatTensor<B>,
    grad: FloatTensor<B>,
    moment_1: FloatTensor<B>,
    moment_2: FloatTensor<B>,
    c: AdamCoefficients,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let moment_1 = B::float_add(
        B::float_mul_scalar(moment_1, c.beta_1.into()),
        B::float_mul_scalar(grad.clone(), (1.0 - c.beta_1).into()),
    );
    let moment_2 = B::float_add(
        B::float_mul_scalar(moment_2, c.beta_2.into()),
        B::float_mul_scalar(B::float_mul(grad.clone(), grad), (1.0 - c.beta_2).into()),
    );
    let step = B::float_div(
        B::float_mul_scalar(moment_1.clone(), c.step_factor.into()),
        B::float_add_scalar(B::float_sqrt(moment_2.clone()), c.scaled_epsilon.into()),
    );
    let parameter = B::float_sub(parameter, B::float_mul_scalar(step, c.learning_rate.into()));
    (parameter, moment_1, moment_2)
}

/// The cubecl backends run burn's operations (fused by burn where its fusion is on).
impl AdamOps for Cube {}

/// A remote device runs them on the server.
#[cfg(feature = "remote")]
impl AdamOps for burn::backend::Remote {}

impl AdamOps for Flex {
    fn adam_update(
        parameter: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        coefficients: AdamCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let tensors = [&parameter, &grad, &moment_1, &moment_2];
        let shape = parameter.shape();
        if tensors
            .iter()
            .any(|tensor| tensor.dtype() != DType::F32 || tensor.shape() != shape)
        {
            return operations::<Flex>(parameter, grad, moment_1, moment_2, coefficients);
        }
        let contiguous = tensors.map(FlexTensor::to_contiguous);
        let [p, g, m, v] = contiguous.each_ref().map(|tensor| {
            tensor
                .as_slice::<f32>()
                .unwrap_or_else(|| unreachable!("contiguous f32 tensors"))
        });
        let [p, m, v] = update_host(p, g, m, v, coefficients);
        let tensor = |values: Vec<f32>| {
            FlexTensor::new(
                Bytes::from_elems(values),
                Layout::contiguous(shape.clone()),
                DType::F32,
            )
        };
        (tensor(p), tensor(m), tensor(v))
    }
}

/// The update on host slices of one length: `[parameter, moment_1, moment_2]`, each value
/// computed with the same f32 operations in the same order as burn's `Adam`.
pub fn update_host(
    parameter: &[f32],
    grad: &[f32],
    moment_1: &[f32],
    moment_2: &[f32],
    c: AdamCoefficients,
) -> [Vec<f32>; 3] {
    let len = parameter.len();
    assert!(
        [grad.len(), moment_1.len(), moment_2.len()] == [len; 3],
        "Adam update of tensors of different sizes"
    );
    let (keep_1, keep_2) = (1.0 - c.beta_1, 1.0 - c.beta_2);
    let update = |range: std::ops::Range<usize>,
                  [p_out, m_out, v_out]: [&mut [MaybeUninit<f32>]; 3]| {
        let inputs = (
            &parameter[range.clone()],
            &grad[range.clone()],
            &moment_1[range.clone()],
            &moment_2[range],
        );
        for (index, (((&p, &g), &m), &v)) in inputs
            .0
            .iter()
            .zip(inputs.1)
            .zip(inputs.2)
            .zip(inputs.3)
            .enumerate()
        {
            let m = m * c.beta_1 + g * keep_1;
            let v = v * c.beta_2 + (g * g) * keep_2;
            let step = (m * c.step_factor) / (v.sqrt() + c.scaled_epsilon);
            p_out[index].write(p - step * c.learning_rate);
            m_out[index].write(m);
            v_out[index].write(v);
        }
    };
    let mut outputs = [(); 3].map(|_| Vec::<f32>::with_capacity(len));
    {
        let [p_out, m_out, v_out] = outputs
            .each_mut()
            .map(|values| &mut values.spare_capacity_mut()[..len]);
        if len <= CHUNK {
            update(0..len, [p_out, m_out, v_out]);
        } else {
            p_out
                .par_chunks_mut(CHUNK)
                .zip(m_out.par_chunks_mut(CHUNK))
                .zip(v_out.par_chunks_mut(CHUNK))
                .enumerate()
                .for_each(|(index, ((p_out, m_out), v_out))| {
                    let start = index * CHUNK;
                    update(start..start + p_out.len(), [p_out, m_out, v_out]);
                });
        }
    }
    for values in &mut outputs {
        // SAFETY: the chunks cover `0..len` and `update` wrote every index of each (its
        // input slices have the chunk's length).
        unsafe { values.set_len(len) };
    }
    outputs
}

/// burn's Adam (betas 0.9 and 0.999, no weight decay) with the fused update of [`AdamOps`].
#[derive(Debug, Clone, Copy)]
pub struct FusedAdam {
    epsilon: f32,
}

impl FusedAdam {
    /// Adam with `epsilon` added to the corrected `sqrt(v)` (PyTorch's default is 1e-8).
    pub fn new(epsilon: f32) -> Self {
        Self { epsilon }
    }

    /// The optimiser for a whole module.
    pub fn init(self) -> ModuleOptimizer {
        ModuleOptimizer::from(self)
    }
}

impl Optimizer for FusedAdam {
    type State<const D: usize> = AdamState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        // The first step starts from zero moments: `0 * b + x` is `x` exactly, so the result
        // is burn's first step.
        let (time, moment_1, moment_2) = match state {
            Some(state) => (
                state.momentum.time + 1,
                state.momentum.moment_1,
                state.momentum.moment_2,
            ),
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let coefficients = AdamCoefficients::new(lr, self.epsilon, time);
        let (parameter, moment_1, moment_2) = <Dispatch as AdamOps>::adam_update(
            tensor.into_dispatch(),
            grad.into_dispatch(),
            moment_1.into_dispatch(),
            moment_2.into_dispatch(),
            coefficients,
        );
        let momentum = AdaptiveMomentumState::new(
            time,
            Tensor::from_dispatch(moment_1),
            Tensor::from_dispatch(moment_2),
        );
        (
            Tensor::from_dispatch(parameter),
            Some(AdamState::new(momentum)),
        )
    }

    fn to_device<const D: usize>(mut state: Self::State<D>, device: &Device) -> Self::State<D> {
        state.momentum = state.momentum.to_device(device);
        state
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, Param};
    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{AdamConfig, GradientsParams};
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    /// Three steps of a linear layer under both optimisers, on the CPU backend: the fused update
    /// gives burn's parameters exactly.
    #[test]
    fn fused_adam_follows_burns_adam() {
        let device = Device::flex();
        let training = device.clone().autodiff();
        device.seed(5);
        let layer: Linear = LinearConfig::new(40, 30).init(&device);
        let start = values(&layer.weight);
        let input = Tensor::<2>::random([8, 40], Distribution::Normal(0.0, 1.0), &training);
        let mut ours = FusedAdam::new(1e-8).init();
        let mut theirs = AdamConfig::new().with_epsilon(1e-8).init();
        let mut fused = layer.clone().fork(&training).train();
        let mut reference = layer.fork(&training).train();
        for step in 0..3 {
            let learning_rate = 1e-2 / f64::from(step + 1);
            let grads = |layer: &Linear| {
                let loss = layer.forward(input.clone()).square().mean();
                GradientsParams::from_grads(loss.backward(), layer)
            };
            let (fused_grads, reference_grads) = (grads(&fused), grads(&reference));
            fused = ours.step(learning_rate, fused, fused_grads);
            reference = theirs.step(learning_rate, reference, reference_grads);
        }
        let (found, expected) = (values(&fused.weight), values(&reference.weight));
        assert!(
            found.iter().zip(&start).any(|(a, b)| a != b),
            "the weights did not change"
        );
        // The same IEEE operations in the same order: the same bits.
        assert_eq!(found, expected, "fused Adam against burn's");
    }

    fn values(param: &Param<Tensor<2>>) -> Vec<f32> {
        param
            .val()
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 weights")
    }
}
