//! 2-D convolution through a burn backend extension, so that training on the CPU uses the
//! gradient kernels of [`super::conv_grad`].
//!
//! burn's autodiff asks the inner backend for `conv2d_x_backward` / `conv2d_weight_backward`;
//! Flex does not implement them, and the generic fallbacks cost 10-14 times the forward pass.
//! A backend extension is burn's way to give one backend its own kernels: on Flex the
//! gradients below run im2col + GEMM or depthwise loops, on the cubecl (wgpu) backend they
//! are burn's own kernels, so the GPU path is unchanged.
//!
//! One concern, in one file: the convolution extension for every backend (about 700 lines) and
//! its tests.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::{Autodiff, NodeId};
use burn::backend::flex::{FlexTensor, Layout};
use burn::backend::ops::{BoolTensorOps, FloatTensorOps};
use burn::backend::ops::{ConvOptions, ModuleOps};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{
    Backend, Cube, Dispatch, Flex, TensorMetadata, backend_extension, get_or_init_device_settings,
};
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::tensor::{Bytes, DType, Shape, Tensor};

use super::conv_grad::{self, ConvKind, ConvShape};
use super::elementwise;
use super::norm_host::{self, NormShape};
use super::pool_host::{self, PoolShape};

/// Convolution with gradients a backend may provide itself.
#[cfg_attr(feature = "remote", backend_extension(Flex, Cube, Remote, Autodiff))]
#[cfg_attr(not(feature = "remote"), backend_extension(Flex, Cube, Autodiff))]
pub trait ConvGradOps: Backend {
    /// A bias-free `conv2d`; under autodiff its backward calls the methods below.
    fn conv2d_with_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d(x, weight, None, options)
    }

    /// The gradient with respect to the input.
    fn conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_x_backward(x, weight, output_grad, options)
    }

    /// The gradient with respect to the weight.
    fn conv2d_weight_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        Self::conv2d_weight_backward(x, weight, output_grad, options)
    }

    /// Both gradients, `(input, weight)`; a backend may share work between them.
    fn conv2d_input_and_weight_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        (
            Self::conv2d_x_backward(
                x.clone(),
                weight.clone(),
                output_grad.clone(),
                options.clone(),
            ),
            Self::conv2d_weight_backward(x, weight, output_grad, options),
        )
    }

    /// BatchNorm with batch statistics: `(output, mean, biased variance)`; under autodiff
    /// its backward calls [`ConvGradOps::batch_norm_grads`].
    fn batch_norm_train_with_grads(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let result = Self::batch_norm_train(x, gamma, beta, epsilon);
        (result.output, result.mean, result.variance)
    }

    /// The gradients of [`ConvGradOps::batch_norm_train_with_grads`]: `(x, gamma, beta)`.
    fn batch_norm_grads(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let grads = Self::batch_norm_train_backward(x, gamma, mean, variance, epsilon, output_grad);
        (grads.x_grad, grads.gamma_grad, grads.beta_grad)
    }

    /// `x` clamped to `[min, max]`; under autodiff its backward calls
    /// [`ConvGradOps::clamp_grad`].
    fn clamp_with_grads(x: FloatTensor<Self>, min: f32, max: f32) -> FloatTensor<Self> {
        Self::float_clamp(x, min.into(), max.into())
    }

    /// The gradient of [`ConvGradOps::clamp_with_grads`]: `output_grad` where
    /// `min <= x <= max`, zero elsewhere (as PyTorch's `clamp`).
    fn clamp_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        min: f32,
        max: f32,
    ) -> FloatTensor<Self> {
        let dtype = get_or_init_device_settings::<Self>(&x.device()).bool_dtype;
        let outside = Self::bool_or(
            Self::float_lower_elem(x.clone(), min.into(), dtype),
            Self::float_greater_elem(x, max.into(), dtype),
        );
        Self::float_mask_fill(output_grad, outside, 0.0.into())
    }

    /// BatchNorm with given (running) statistics.
    fn batch_norm_with_statistics(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        Self::batch_norm(x, gamma, beta, mean, variance, epsilon)
    }

    /// Max pooling (dilation 1, output size rounded down); under autodiff its backward calls
    /// [`ConvGradOps::max_pool2d_grad`].
    fn max_pool2d_with_grads(x: FloatTensor<Self>, pool: PoolOptions) -> FloatTensor<Self> {
        Self::max_pool2d(x, pool.kernel, pool.stride, pool.padding, [1, 1], false)
    }

    /// Max pooling with the position of each window's maximum, for the gradient.
    fn max_pool2d_indexed(
        x: FloatTensor<Self>,
        pool: PoolOptions,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let int_dtype = get_or_init_device_settings::<Self>(&x.device()).int_dtype;
        let pooled = Self::max_pool2d_with_indices(
            x,
            pool.kernel,
            pool.stride,
            pool.padding,
            [1, 1],
            false,
            int_dtype,
        );
        (pooled.output, pooled.indices)
    }

    /// The input gradient of [`ConvGradOps::max_pool2d_indexed`].
    fn max_pool2d_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        indices: IntTensor<Self>,
        pool: PoolOptions,
    ) -> FloatTensor<Self> {
        Self::max_pool2d_with_indices_backward(
            x,
            pool.kernel,
            pool.stride,
            pool.padding,
            [1, 1],
            false,
            output_grad,
            indices,
        )
        .x_grad
    }
}

/// The cubecl backends keep burn's kernels.
impl ConvGradOps for Cube {}

/// A remote device runs burn's kernels on the server (the server's own backend picks them).
#[cfg(feature = "remote")]
impl ConvGradOps for burn::backend::Remote {}

/// The shape of a Flex convolution with output `output_size` if the host kernels handle it
/// (f32, dense or depthwise); `None` sends it to burn's own kernels.
fn flex_shape(
    tensors: &[&FlexTensor],
    x: &FlexTensor,
    weight: &FlexTensor,
    output_size: [usize; 2],
    options: &ConvOptions<2>,
) -> Option<ConvShape> {
    if tensors.iter().any(|tensor| tensor.dtype() != DType::F32) {
        return None;
    }
    let [batch, channels_in, height, width] = x.shape().dims();
    let [channels_out, _, kernel_h, kernel_w] = weight.shape().dims();
    let shape = ConvShape {
        batch,
        channels_in,
        channels_out,
        input: [height, width],
        output: output_size,
        kernel: [kernel_h, kernel_w],
        stride: options.stride,
        padding: options.padding_begin(),
        dilation: options.dilation,
        groups: options.groups,
    };
    shape.kind().map(|_| shape)
}

/// The shape of a convolution's backward pass on Flex, as [`flex_shape`].
fn flex_grad_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    output_grad: &FlexTensor,
    options: &ConvOptions<2>,
) -> Option<ConvShape> {
    let [_, _, out_h, out_w] = output_grad.shape().dims();
    flex_shape(
        &[x, weight, output_grad],
        x,
        weight,
        [out_h, out_w],
        options,
    )
}

/// A contiguous f32 copy (or view) of a Flex tensor's values.
fn host_values(tensor: &FlexTensor) -> FlexTensor {
    tensor.to_contiguous()
}

fn values(tensor: &FlexTensor) -> &[f32] {
    tensor
        .as_slice::<f32>()
        .unwrap_or_else(|| unreachable!("host_values returns contiguous f32 tensors"))
}

fn flex_tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

impl ConvGradOps for Flex {
    fn conv2d_with_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let [batch, _, height, width] = x.shape().dims();
        let [channels_out, _, kernel_h, kernel_w] = weight.shape().dims();
        let out_len = |axis: usize, size: usize, kernel: usize| {
            let (begin, end) = options.padding[axis];
            let span = options.dilation[axis] * (kernel - 1) + 1;
            (size + begin + end)
                .checked_sub(span)
                .map(|reach| reach / options.stride[axis] + 1)
        };
        let shape = match (out_len(0, height, kernel_h), out_len(1, width, kernel_w)) {
            (Some(out_h), Some(out_w)) => {
                flex_shape(&[&x, &weight], &x, &weight, [out_h, out_w], &options)
            }
            _ => None,
        };
        let Some(shape) = shape else {
            return Flex::conv2d(x, weight, None, options);
        };
        let output_shape = Shape::new([batch, channels_out, shape.output[0], shape.output[1]]);
        if shape.kind() == Some(ConvKind::Depthwise) {
            let (x_values, weight_values) = (host_values(&x), host_values(&weight));
            let output =
                conv_grad::depthwise_forward(&shape, values(&x_values), values(&weight_values));
            return flex_tensor(output, output_shape);
        }
        let (x_values, weight_values) = (host_values(&x), host_values(&weight));
        let output = conv_grad::dense_forward(&shape, values(&x_values), values(&weight_values));
        flex_tensor(output, output_shape)
    }

    fn conv2d_input_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let Some(shape) = flex_grad_shape(&x, &weight, &output_grad, &options) else {
            return Flex::conv2d_x_backward(x, weight, output_grad, options);
        };
        let (weight_values, grad_values) = (host_values(&weight), host_values(&output_grad));
        let grad = conv_grad::input_grad(&shape, values(&weight_values), values(&grad_values));
        flex_tensor(grad, x.shape())
    }

    fn conv2d_weight_grad(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let Some(shape) = flex_grad_shape(&x, &weight, &output_grad, &options) else {
            return Flex::conv2d_weight_backward(x, weight, output_grad, options);
        };
        let (x_values, grad_values) = (host_values(&x), host_values(&output_grad));
        let grad = conv_grad::weight_grad(&shape, values(&x_values), values(&grad_values));
        flex_tensor(grad, weight.shape())
    }

    fn conv2d_input_and_weight_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let Some(shape) = flex_grad_shape(&x, &weight, &output_grad, &options) else {
            return (
                Flex::conv2d_x_backward(
                    x.clone(),
                    weight.clone(),
                    output_grad.clone(),
                    options.clone(),
                ),
                Flex::conv2d_weight_backward(x, weight, output_grad, options),
            );
        };
        let (x_values, weight_values, grad_values) = (
            host_values(&x),
            host_values(&weight),
            host_values(&output_grad),
        );
        let (input_grad, weight_grad) = conv_grad::input_and_weight_grads(
            &shape,
            values(&x_values),
            values(&weight_values),
            values(&grad_values),
        );
        (
            flex_tensor(input_grad, x.shape()),
            flex_tensor(weight_grad, weight.shape()),
        )
    }

    fn batch_norm_train_with_grads(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let Some(shape) = norm_shape(&[&x, &gamma, &beta]) else {
            let result = Flex::batch_norm_train(x, gamma, beta, epsilon);
            return (result.output, result.mean, result.variance);
        };
        let (x_values, gamma, beta) = (host_values(&x), host_values(&gamma), host_values(&beta));
        let (output, mean, variance) = norm_host::train_forward(
            &shape,
            values(&x_values),
            values(&gamma),
            values(&beta),
            epsilon,
        );
        let channels = Shape::new([shape.channels]);
        (
            flex_tensor(output, x.shape()),
            flex_tensor(mean, channels.clone()),
            flex_tensor(variance, channels),
        )
    }

    fn batch_norm_grads(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let Some(shape) = norm_shape(&[&x, &gamma, &mean, &variance, &output_grad]) else {
            let grads =
                Flex::batch_norm_train_backward(x, gamma, mean, variance, epsilon, output_grad);
            return (grads.x_grad, grads.gamma_grad, grads.beta_grad);
        };
        let [x_values, gamma_values, mean, variance, grad] =
            [&x, &gamma, &mean, &variance, &output_grad].map(host_values);
        let (input_grad, gamma_grad, beta_grad) = norm_host::train_backward(
            &shape,
            values(&x_values),
            values(&gamma_values),
            values(&mean),
            values(&variance),
            epsilon,
            values(&grad),
        );
        (
            flex_tensor(input_grad, x.shape()),
            flex_tensor(gamma_grad, gamma.shape()),
            flex_tensor(beta_grad, gamma.shape()),
        )
    }

    fn batch_norm_with_statistics(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let Some(shape) = norm_shape(&[&x, &gamma, &beta, &mean, &variance]) else {
            return Flex::batch_norm(x, gamma, beta, mean, variance, epsilon);
        };
        let [x_values, gamma, beta, mean, variance] =
            [&x, &gamma, &beta, &mean, &variance].map(host_values);
        let (scale, shift) = norm_host::affine(
            values(&gamma),
            values(&beta),
            values(&mean),
            values(&variance),
            epsilon,
        );
        let output = norm_host::scale_shift(&shape, values(&x_values), &scale, &shift);
        flex_tensor(output, x.shape())
    }

    fn clamp_with_grads(x: FloatTensor<Self>, min: f32, max: f32) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return Flex::float_clamp(x, min.into(), max.into());
        }
        let x_values = host_values(&x);
        let output = elementwise::clamp(values(&x_values), min, max);
        flex_tensor(output, x.shape())
    }

    fn clamp_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        min: f32,
        max: f32,
    ) -> FloatTensor<Self> {
        if [x.dtype(), output_grad.dtype()] != [DType::F32; 2] {
            let dtype = get_or_init_device_settings::<Self>(&x.device()).bool_dtype;
            let outside = Flex::bool_or(
                Flex::float_lower_elem(x.clone(), min.into(), dtype),
                Flex::float_greater_elem(x, max.into(), dtype),
            );
            return Flex::float_mask_fill(output_grad, outside, 0.0.into());
        }
        let (x_values, grad_values) = (host_values(&x), host_values(&output_grad));
        let grad = elementwise::clamp_grad(values(&x_values), values(&grad_values), min, max);
        flex_tensor(grad, x.shape())
    }

    fn max_pool2d_with_grads(x: FloatTensor<Self>, pool: PoolOptions) -> FloatTensor<Self> {
        Self::max_pool2d_indexed(x, pool).0
    }

    fn max_pool2d_indexed(
        x: FloatTensor<Self>,
        pool: PoolOptions,
    ) -> (FloatTensor<Self>, IntTensor<Self>) {
        let Some((shape, output_shape)) = flex_pool_shape(&x, pool) else {
            let int_dtype = get_or_init_device_settings::<Self>(&x.device()).int_dtype;
            let pooled = Flex::max_pool2d_with_indices(
                x,
                pool.kernel,
                pool.stride,
                pool.padding,
                [1, 1],
                false,
                int_dtype,
            );
            return (pooled.output, pooled.indices);
        };
        let x_values = host_values(&x);
        let (output, indices) = pool_host::forward(&shape, values(&x_values));
        let indices = FlexTensor::new(
            Bytes::from_elems(indices),
            Layout::contiguous(output_shape.clone()),
            DType::U32,
        );
        (flex_tensor(output, output_shape), indices)
    }

    fn max_pool2d_grad(
        x: FloatTensor<Self>,
        output_grad: FloatTensor<Self>,
        indices: IntTensor<Self>,
        pool: PoolOptions,
    ) -> FloatTensor<Self> {
        let shape = flex_pool_shape(&x, pool).map(|(shape, _)| shape);
        match (shape, indices.dtype(), output_grad.dtype()) {
            (Some(shape), DType::U32, DType::F32) => {
                let grad_values = host_values(&output_grad);
                let indices = indices.to_contiguous();
                let indices = indices
                    .as_slice::<u32>()
                    .unwrap_or_else(|| unreachable!("contiguous u32 indices"));
                let grad = pool_host::backward(&shape, values(&grad_values), indices);
                flex_tensor(grad, x.shape())
            }
            _ => {
                Flex::max_pool2d_with_indices_backward(
                    x,
                    pool.kernel,
                    pool.stride,
                    pool.padding,
                    [1, 1],
                    false,
                    output_grad,
                    indices,
                )
                .x_grad
            }
        }
    }
}

/// A max pooling's window, stride and padding (dilation 1, output size rounded down).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolOptions {
    /// Window `[height, width]`.
    pub kernel: [usize; 2],
    /// Step between windows.
    pub stride: [usize; 2],
    /// Border on each side.
    pub padding: [usize; 2],
}

/// The host pooling's shape of an f32 Flex activation `[N, C, H, W]` and its output shape, if
/// a window fits and the padding is at most half the window.
fn flex_pool_shape(x: &FlexTensor, pool: PoolOptions) -> Option<(PoolShape, Shape)> {
    if x.dtype() != DType::F32 {
        return None;
    }
    let [batch, channels, height, width] = x.shape().dims();
    let shape = PoolShape {
        planes: batch * channels,
        input: [height, width],
        kernel: pool.kernel,
        stride: pool.stride,
        padding: pool.padding,
    };
    let [rows, cols] = shape.output()?;
    Some((shape, Shape::new([batch, channels, rows, cols])))
}

/// The `[N, C, plane]` shape of a Flex activation for the host BatchNorm, if it is f32 with
/// at least two axes.
fn norm_shape(tensors: &[&FlexTensor]) -> Option<NormShape> {
    if tensors.iter().any(|tensor| tensor.dtype() != DType::F32) {
        return None;
    }
    let shape = tensors.first()?.shape();
    if shape.num_dims() != 4 {
        return None;
    }
    let dims = shape.dims::<4>();
    Some(NormShape {
        batch: dims[0],
        channels: dims[1],
        plane: dims[2] * dims[3],
    })
}

/// The autodiff node of [`ConvGradOps::conv2d_with_grads`].
#[derive(Debug)]
struct ConvWithGrads;

impl<B: Backend + ConvGradOps> Backward<B, 2> for ConvWithGrads {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, options) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let weight = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(weight_state);
        match (node_x, node_weight) {
            (Some(node_x), Some(node_weight)) => {
                let (input_grad, weight_grad) =
                    B::conv2d_input_and_weight_grads(x, weight, output_grad, options);
                grads.register::<B>(node_x.id, input_grad);
                grads.register::<B>(node_weight.id, weight_grad);
            }
            (Some(node_x), None) => {
                let grad = B::conv2d_input_grad(x, weight, output_grad, options);
                grads.register::<B>(node_x.id, grad);
            }
            (None, Some(node_weight)) => {
                let grad = B::conv2d_weight_grad(x, weight, output_grad, options);
                grads.register::<B>(node_weight.id, grad);
            }
            (None, None) => {}
        }
    }
}

/// The autodiff node of [`ConvGradOps::batch_norm_train_with_grads`].
#[derive(Debug)]
struct BatchNormWithGrads;

impl<B: Backend + ConvGradOps> Backward<B, 3> for BatchNormWithGrads {
    type State = (
        NodeId,
        NodeId,
        B::FloatTensorPrimitive,
        B::FloatTensorPrimitive,
        f64,
    );

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let (x_state, gamma_state, mean, variance, epsilon) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        let gamma = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(gamma_state);
        let (input_grad, gamma_grad, beta_grad) =
            B::batch_norm_grads(x, gamma, mean, variance, epsilon, output_grad);
        for (node, grad) in [
            (node_x, input_grad),
            (node_gamma, gamma_grad),
            (node_beta, beta_grad),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

/// The autodiff node of [`ConvGradOps::clamp_with_grads`].
#[derive(Debug)]
struct ClampWithGrads;

impl<B: Backend + ConvGradOps> Backward<B, 1> for ClampWithGrads {
    type State = (NodeId, f32, f32);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let (x_state, min, max) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::clamp_grad(x, output_grad, min, max));
        }
    }
}

/// The autodiff node of [`ConvGradOps::max_pool2d_with_grads`].
#[derive(Debug)]
struct MaxPoolWithGrads;

impl<B: Backend + ConvGradOps> Backward<B, 1> for MaxPoolWithGrads {
    type State = (NodeId, IntTensor<B>, PoolOptions);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let (x_state, indices, pool) = ops.state;
        let x = checkpointer.retrieve_node_output::<B::FloatTensorPrimitive>(x_state);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::max_pool2d_grad(x, output_grad, indices, pool));
        }
    }
}

impl<B: Backend + ConvGradOps, C: CheckpointStrategy> ConvGradOps for Autodiff<B, C> {
    fn conv2d_with_grads(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        match ConvWithGrads
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let output = B::conv2d_with_grads(
                    x.into_primitive(),
                    weight.into_primitive(),
                    options.clone(),
                );
                prep.finish((x_state, weight_state, options), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_with_grads(
                x.into_primitive(),
                weight.into_primitive(),
                options,
            )),
        }
    }

    fn batch_norm_train_with_grads(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let prepared = BatchNormWithGrads
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful();
        let (output, mean, variance) = match prepared {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let (output, mean, variance) = B::batch_norm_train_with_grads(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                let state = (
                    x_state,
                    gamma_state,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                );
                (prep.finish(state, output), mean, variance)
            }
            OpsKind::UnTracked(prep) => {
                let (output, mean, variance) = B::batch_norm_train_with_grads(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                );
                (prep.finish(output), mean, variance)
            }
        };
        // The statistics only update the running averages: no gradient flows through them.
        (
            output,
            FloatTensor::<Self>::new(mean),
            FloatTensor::<Self>::new(variance),
        )
    }

    fn clamp_with_grads(x: FloatTensor<Self>, min: f32, max: f32) -> FloatTensor<Self> {
        match ClampWithGrads
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let output = B::clamp_with_grads(x.into_primitive(), min, max);
                prep.finish((x_state, min, max), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::clamp_with_grads(x.into_primitive(), min, max))
            }
        }
    }

    fn max_pool2d_with_grads(x: FloatTensor<Self>, pool: PoolOptions) -> FloatTensor<Self> {
        match MaxPoolWithGrads
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let (output, indices) = B::max_pool2d_indexed(x.into_primitive(), pool);
                prep.finish((x_state, indices, pool), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::max_pool2d_with_grads(x.into_primitive(), pool))
            }
        }
    }
}

/// `layer.forward(input)` with the gradients of [`ConvGradOps`]: the same options as burn's
/// `Conv2d::forward`, the bias added afterwards (its gradient is a plain sum). `Same` padding,
/// which the networks do not use, keeps burn's path.
pub fn conv2d_forward(layer: &Conv2d, input: Tensor<4>) -> Tensor<4> {
    let padding = match layer.padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
        PaddingConfig2d::Same => return layer.forward(input),
    };
    let options =
        ConvOptions::new_with_padding(layer.stride, padding, layer.dilation, layer.groups);
    let output = Tensor::<4>::from_dispatch(<Dispatch as ConvGradOps>::conv2d_with_grads(
        input.into_dispatch(),
        layer.weight.val().into_dispatch(),
        options,
    ));
    match &layer.bias {
        Some(bias) => {
            let [channels] = bias.val().dims();
            output + bias.val().reshape([1, channels, 1, 1])
        }
        None => output,
    }
}

/// `norm.forward(input)` with the kernels of [`ConvGradOps`]: batch statistics (and an update
/// of the running averages, as burn's `BatchNorm` does) when training on an autodiff device,
/// the running statistics otherwise.
pub fn batch_norm_forward(norm: &BatchNorm, input: Tensor<4>) -> Tensor<4> {
    let device = input.device();
    if !(device.is_autodiff() && norm.training.is_enabled()) {
        return Tensor::<4>::from_dispatch(<Dispatch as ConvGradOps>::batch_norm_with_statistics(
            input.into_dispatch(),
            norm.gamma.val().into_dispatch(),
            norm.beta.val().into_dispatch(),
            norm.running_mean.value().to_device(&device).into_dispatch(),
            norm.running_var.value().to_device(&device).into_dispatch(),
            norm.epsilon,
        ));
    }
    let (output, mean, variance) = <Dispatch as ConvGradOps>::batch_norm_train_with_grads(
        input.into_dispatch(),
        norm.gamma.val().into_dispatch(),
        norm.beta.val().into_dispatch(),
        norm.epsilon,
    );
    let (mean, variance) = (
        Tensor::<1>::from_dispatch(mean),
        Tensor::<1>::from_dispatch(variance),
    );
    let momentum = norm.momentum;
    let running_mean = norm.running_mean.value_sync().to_device(&device);
    let running_var = norm.running_var.value_sync().to_device(&device);
    norm.running_mean.update(
        (running_mean.mul_scalar(1.0 - momentum) + mean.detach().mul_scalar(momentum)).detach(),
    );
    norm.running_var.update(
        (running_var.mul_scalar(1.0 - momentum) + variance.detach().mul_scalar(momentum)).detach(),
    );
    Tensor::<4>::from_dispatch(output)
}

/// `input.clamp(min, max)` with the single-pass kernels of [`ConvGradOps`] (burn's generic
/// clamp runs two masked fills forward and two backward).
pub fn clamp_forward(input: Tensor<4>, min: f32, max: f32) -> Tensor<4> {
    Tensor::<4>::from_dispatch(<Dispatch as ConvGradOps>::clamp_with_grads(
        input.into_dispatch(),
        min,
        max,
    ))
}

/// `layer.forward(input)` with the pooling of [`ConvGradOps`] (one pass per plane on Flex,
/// 32-bit indices). Dilated, ceil-mode or `Same`-padded pools keep burn's path.
pub fn max_pool_forward(layer: &MaxPool2d, input: Tensor<4>) -> Tensor<4> {
    let padding = match layer.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => {
            [top, left]
        }
        _ => return layer.forward(input),
    };
    if layer.dilation != [1, 1] || layer.ceil_mode {
        return layer.forward(input);
    }
    let pool = PoolOptions {
        kernel: layer.kernel_size,
        stride: layer.stride,
        padding,
    };
    Tensor::<4>::from_dispatch(<Dispatch as ConvGradOps>::max_pool2d_with_grads(
        input.into_dispatch(),
        pool,
    ))
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d};
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    fn assert_close(found: Tensor<1>, expected: Tensor<1>, what: &str) {
        let found = found.into_data().try_to_vec::<f32>().expect("f32 values");
        let expected = expected
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32 values");
        assert_eq!(found.len(), expected.len(), "{what}: length");
        let scale = expected.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        for (index, (a, b)) in found.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * scale,
                "{what}[{index}]: {a} against burn's {b}"
            );
        }
    }

    fn flat<const D: usize>(tensor: Tensor<D>) -> Tensor<1> {
        let count = tensor.shape().num_elements();
        tensor.reshape([count])
    }

    /// The layer through [`conv2d_forward`] and through burn's own `forward` on the Flex
    /// autodiff device: same output, same gradients for the input, weight and bias.
    fn check_conv(config: Conv2dConfig, input: [usize; 4]) {
        let device = Device::flex().autodiff();
        device.seed(3);
        let layer = config.init(&device);
        let x = Tensor::<4>::random(input, Distribution::Normal(0.0, 1.0), &device).require_grad();
        // A loss whose gradient differs at every output position.
        let weights = Tensor::<4>::random(
            layer.forward(x.clone()).shape(),
            Distribution::Default,
            &device,
        );
        let run = |ours: bool| {
            let output = if ours {
                conv2d_forward(&layer, x.clone())
            } else {
                layer.forward(x.clone())
            };
            let grads = (output.clone() * weights.clone()).sum().backward();
            let bias = layer
                .bias
                .as_ref()
                .map(|bias| bias.val().grad(&grads).expect("bias grad"));
            (
                flat(output.inner()),
                flat(x.grad(&grads).expect("input grad")),
                flat(layer.weight.val().grad(&grads).expect("weight grad")),
                bias,
            )
        };
        let ours = run(true);
        let burns = run(false);
        assert_close(ours.0, burns.0, "output");
        assert_close(ours.1, burns.1, "input gradient");
        assert_close(ours.2, burns.2, "weight gradient");
        if let (Some(a), Some(b)) = (ours.3, burns.3) {
            assert_close(a, b, "bias gradient");
        }
    }

    #[test]
    fn convolutions_match_burns_on_flex() {
        let explicit = |p| PaddingConfig2d::Explicit(p, p, p, p);
        check_conv(
            Conv2dConfig::new([6, 6], [3, 3])
                .with_stride([2, 2])
                .with_padding(explicit(1))
                .with_groups(6)
                .with_bias(false),
            [2, 6, 9, 10],
        );
        check_conv(Conv2dConfig::new([5, 7], [1, 1]), [3, 5, 6, 6]);
        check_conv(
            Conv2dConfig::new([3, 8], [3, 3])
                .with_padding(explicit(1))
                .with_bias(false),
            [2, 3, 8, 8],
        );
        check_conv(
            Conv2dConfig::new([3, 8], [7, 7])
                .with_stride([2, 2])
                .with_padding(explicit(3))
                .with_bias(false),
            [2, 3, 16, 16],
        );
        check_conv(
            Conv2dConfig::new([3, 8], [7, 7])
                .with_stride([2, 2])
                .with_padding(explicit(3))
                .with_bias(false),
            [2, 3, 19, 16],
        );
    }

    #[test]
    fn batch_norm_matches_burns_on_flex() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let ours_norm = BatchNormConfig::new(4).init(&device);
        let burns_norm = ours_norm.clone();
        let x = Tensor::<4>::random([3, 4, 5, 6], Distribution::Normal(1.0, 2.0), &device)
            .require_grad();
        let weights = Tensor::<4>::random([3, 4, 5, 6], Distribution::Default, &device);
        let run = |norm: &BatchNorm, ours: bool| {
            let output = if ours {
                batch_norm_forward(norm, x.clone())
            } else {
                norm.forward(x.clone())
            };
            let grads = (output.clone() * weights.clone()).sum().backward();
            (
                flat(output.inner()),
                flat(x.grad(&grads).expect("input grad")),
                norm.gamma.val().grad(&grads).expect("gamma grad"),
                norm.beta.val().grad(&grads).expect("beta grad"),
            )
        };
        let ours = run(&ours_norm, true);
        let burns = run(&burns_norm, false);
        assert_close(ours.0, burns.0, "output");
        assert_close(ours.1, burns.1, "input gradient");
        assert_close(ours.2, burns.2, "gamma gradient");
        assert_close(ours.3, burns.3, "beta gradient");
        assert_close(
            ours_norm.running_mean.value().inner(),
            burns_norm.running_mean.value().inner(),
            "running mean",
        );
        assert_close(
            ours_norm.running_var.value().inner(),
            burns_norm.running_var.value().inner(),
            "running variance",
        );
        // Inference with the updated running statistics.
        let (ours_eval, burns_eval) = (ours_norm.valid(), burns_norm.valid());
        let x = x.inner();
        assert_close(
            flat(batch_norm_forward(&ours_eval, x.clone())),
            flat(burns_eval.forward(x)),
            "inference output",
        );
    }

    /// ResNet's pooling (3x3, stride 2, padding 1) and an unpadded 2x2 one on odd sizes, through
    /// [`max_pool_forward`] and burn's `MaxPool2d` on the Flex autodiff device: same output,
    /// same input gradient; and without autodiff.
    #[test]
    fn max_pool_matches_burns_on_flex() {
        use burn::nn::pool::MaxPool2dConfig;
        let device = Device::flex().autodiff();
        device.seed(11);
        let pools = [
            MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            MaxPool2dConfig::new([2, 2]).init(),
        ];
        for pool in &pools {
            let x = Tensor::<4>::random([2, 3, 9, 11], Distribution::Normal(0.0, 1.0), &device)
                .require_grad();
            let weights = Tensor::<4>::random([2, 3, 9, 11], Distribution::Default, &device);
            let run = |ours: bool| {
                let output = if ours {
                    max_pool_forward(pool, x.clone())
                } else {
                    pool.forward(x.clone())
                };
                let [_, _, rows, cols] = output.dims();
                let weights = weights.clone().slice([0..2, 0..3, 0..rows, 0..cols]);
                let grads = (output.clone() * weights).sum().backward();
                (
                    flat(output.inner()),
                    flat(x.grad(&grads).expect("input grad")),
                )
            };
            let (ours, burns) = (run(true), run(false));
            assert_close(ours.0, burns.0, "output");
            assert_close(ours.1, burns.1, "input gradient");
            let x = x.inner();
            assert_close(
                flat(max_pool_forward(pool, x.clone())),
                flat(pool.forward(x)),
                "output without autodiff",
            );
        }
    }
}
