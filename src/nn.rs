//! Building blocks shared by the models, built from checkpoint tensors by name (each layer
//! asks [`Vars`] for its weights under its diffusers path), and the loader that streams a
//! checkpoint's tensors onto the device one at a time.
//!
//! The models are frozen: their weights are plain tensors, never trained, so they carry no
//! gradients and need no optimizer state.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use burn::tensor::{
    DType, Device, Int, Tensor, TensorCreationOptions, TensorData,
    activation::{gelu, sigmoid, silu},
    module::{conv2d, embedding, layer_norm, linear},
    ops::ConvOptions,
};

use crate::device::binding_limit;
use crate::weights::{Component, HostData, TensorSource, WeightsError};

/// Where tensors come from while a model is built.
enum Mode {
    /// Record the names and shapes the model asks for; hand out zero-cost placeholders.
    Shapes,
    /// Hand out loaded tensors (flat, reshaped on request); one larger than the device's
    /// binding limit is held in row chunks, for [`Vars::get_rows`].
    Loaded(RefCell<HashMap<String, Vec<Tensor<1>>>>),
    /// Hand out random weights of the right scale (benchmarks: speed does not depend on the
    /// values).
    Random(DType),
}

/// The tensors a model is built from.
pub struct VarStore {
    device: Device,
    mode: Mode,
    requested: RefCell<BTreeMap<String, Vec<usize>>>,
    /// Those of `requested` asked for in row chunks ([`Vars::get_rows`]).
    in_rows: RefCell<BTreeSet<String>>,
    path: String,
    component: Component,
}

impl VarStore {
    /// A store that only records what is asked for: build a model with it to learn the
    /// names and shapes it needs, and its parameter count, without allocating weights.
    pub fn shapes(device: &Device, component: Component) -> Self {
        Self {
            device: device.clone(),
            mode: Mode::Shapes,
            requested: Default::default(),
            in_rows: Default::default(),
            path: String::new(),
            component,
        }
    }

    /// A store of random weights: normal with standard deviation 1/sqrt(fan-in) for
    /// matrices and kernels, ones for norm scales, zeros for biases.
    pub fn random(device: &Device, component: Component, dtype: DType) -> Self {
        Self {
            device: device.clone(),
            mode: Mode::Random(dtype),
            requested: Default::default(),
            in_rows: Default::default(),
            path: "random weights".into(),
            component,
        }
    }

    /// The path at the root of the store, from which a model asks for its weights.
    pub fn root(&self) -> Vars<'_> {
        Vars {
            store: self,
            prefix: String::new(),
        }
    }

    /// Names and shapes asked for so far.
    pub fn requested(&self) -> BTreeMap<String, Vec<usize>> {
        self.requested.borrow().clone()
    }

    /// Elements of the largest tensor asked for so far that must be one buffer (token tables,
    /// asked for in row chunks, are not).
    pub fn largest_whole(&self) -> u64 {
        let in_rows = self.in_rows.borrow();
        self.requested
            .borrow()
            .iter()
            .filter(|(name, _)| !in_rows.contains(*name))
            .map(|(_, s)| s.iter().product::<usize>() as u64)
            .max()
            .unwrap_or(0)
    }

    /// Number of parameters asked for so far.
    pub fn param_count(&self) -> u64 {
        self.requested
            .borrow()
            .values()
            .map(|s| s.iter().product::<usize>() as u64)
            .sum()
    }
}

/// A path into a [`VarStore`], like `down_blocks.0.resnets.1`.
#[derive(Clone)]
pub struct Vars<'a> {
    store: &'a VarStore,
    prefix: String,
}

impl<'a> Vars<'a> {
    /// The sub-path `name` (e.g. `vars.pp("resnets").pp(0)`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Vars<'a> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Vars {
            store: self.store,
            prefix,
        }
    }

    /// The device the store's tensors live on.
    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// The tensor `name` under this path, of the given shape.
    pub fn get<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, WeightsError> {
        let full = self.pp(name).prefix;
        self.store
            .requested
            .borrow_mut()
            .insert(full.clone(), shape.to_vec());
        match &self.store.mode {
            Mode::Shapes => Ok(Tensor::<1>::zeros([1], &self.store.device)
                .reshape([1; D])
                .expand(shape)),
            Mode::Random(dtype) if D == 1 && name == "weight" => {
                Ok(Tensor::<D>::ones(shape, &self.store.device).cast(*dtype))
            }
            Mode::Random(dtype) if D == 1 => {
                Ok(Tensor::<D>::zeros(shape, &self.store.device).cast(*dtype))
            }
            Mode::Random(dtype) => {
                let fan_in = shape[1..].iter().product::<usize>().max(1) as f64;
                Ok(Tensor::<D>::random(
                    shape,
                    burn::tensor::Distribution::Normal(0.0, fan_in.powf(-0.5)),
                    &self.store.device,
                )
                .cast(*dtype))
            }
            Mode::Loaded(_) => {
                let mut parts = self.take(&full, &shape)?;
                if parts.len() > 1 {
                    let bytes = parts
                        .iter()
                        .map(|p| (p.dims()[0] * p.dtype().size()) as u64)
                        .sum();
                    return Err(WeightsError::TooLarge {
                        component: self.store.component,
                        name: full,
                        bytes,
                        limit: binding_limit(&self.store.device).unwrap_or(u64::MAX),
                    });
                }
                Ok(parts.remove(0).reshape(shape))
            }
        }
    }

    /// The matrix `name` under this path, `[rows, width]`, as consecutive row chunks, each
    /// within the device's binding limit (one chunk where it fits): a token table that a
    /// small GPU cannot bind whole.
    pub fn get_rows(&self, name: &str, shape: [usize; 2]) -> Result<Vec<Tensor<2>>, WeightsError> {
        let full = self.pp(name).prefix;
        let [rows, width] = shape;
        self.store.in_rows.borrow_mut().insert(full.clone());
        match &self.store.mode {
            Mode::Loaded(_) => Ok(self
                .take(&full, &shape)?
                .into_iter()
                .map(|p| {
                    let n = p.dims()[0];
                    p.reshape([n / width, width])
                })
                .collect()),
            Mode::Random(dtype) => {
                // Drawn in f32, then cast: the f32 chunk must fit too.
                let limit = binding_limit(&self.store.device);
                let chunks = row_chunks(rows, width * dtype.size().max(4), limit)
                    .map(|r| self.get(name, [r.len(), width]))
                    .collect::<Result<_, _>>()?;
                // `get` recorded a chunk's shape; the model asked for the whole.
                self.store
                    .requested
                    .borrow_mut()
                    .insert(full, shape.to_vec());
                Ok(chunks)
            }
            Mode::Shapes => Ok(vec![self.get(name, shape)?]),
        }
    }

    /// The loaded parts of `full`, checked against `shape`'s size.
    fn take(&self, full: &str, shape: &[usize]) -> Result<Vec<Tensor<1>>, WeightsError> {
        let Mode::Loaded(map) = &self.store.mode else {
            unreachable!("only loaded stores hold parts")
        };
        self.store
            .requested
            .borrow_mut()
            .insert(full.to_string(), shape.to_vec());
        let parts = map
            .borrow_mut()
            .remove(full)
            .ok_or_else(|| WeightsError::Missing {
                path: self.store.path.clone(),
                component: self.store.component,
                name: full.to_string(),
            })?;
        let found: usize = parts.iter().map(|p| p.dims()[0]).sum();
        if found != shape.iter().product::<usize>() {
            return Err(WeightsError::Shape {
                path: self.store.path.clone(),
                component: self.store.component,
                name: full.to_string(),
                expected: shape.to_vec(),
                found: vec![found],
            });
        }
        Ok(parts)
    }
}

/// Row ranges of a `[rows, ...]` tensor whose rows have `row_bytes` bytes, each range as many
/// rows as fit `limit` bytes (at least one): one range without a limit or where all fit.
pub fn row_chunks(
    rows: usize,
    row_bytes: usize,
    limit: Option<u64>,
) -> impl Iterator<Item = std::ops::Range<usize>> {
    let per = limit.map_or(rows, |l| (l / row_bytes.max(1) as u64).max(1) as usize);
    let per = per.clamp(1, rows.max(1));
    (0..rows.div_ceil(per).max(1)).map(move |i| i * per..((i + 1) * per).min(rows))
}

/// Progress of a model load.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadProgress {
    /// The model being loaded.
    pub component: Component,
    /// Tensors loaded onto the device so far.
    pub tensors_done: usize,
    /// Tensors the model needs in all.
    pub tensors_total: usize,
}

/// Loads one model of a checkpoint onto `device` in `dtype`: learns what the model needs
/// (`build` on a shape-recording store), checks the checkpoint has exactly that, then streams
/// the tensors in file order, one on the host at a time, and builds the model from them.
pub async fn load<M>(
    checkpoint: &impl TensorSource,
    component: Component,
    device: &Device,
    dtype: DType,
    build: impl Fn(Vars) -> Result<M, WeightsError>,
    progress: &mut dyn FnMut(LoadProgress),
) -> Result<M, WeightsError> {
    let shapes = VarStore::shapes(device, component);
    build(shapes.root())?;
    checkpoint.check(component, &shapes.requested())?;
    let order = checkpoint.read_order(component);
    let mut map = HashMap::with_capacity(order.len());
    let options = TensorCreationOptions::new(device.clone()).with_dtype(dtype);
    let limit = binding_limit(device);
    for (i, name) in order.iter().enumerate() {
        let host = checkpoint.read(component, name).await?;
        let rows = host.shape.first().copied().unwrap_or(1);
        let width = host.shape.iter().skip(1).product::<usize>();
        // A tensor over the binding limit goes up in row chunks (each its own buffer), sized
        // for the larger of the file's dtype and the device's (the data may be cast there).
        let stored = match host.data {
            HostData::F32(_) => 4,
            HostData::F16(_) | HostData::BF16(_) => 2,
        };
        let parts = row_chunks(rows, width * dtype.size().max(stored), limit)
            .map(|r| {
                let (start, end) = (r.start * width, r.end * width);
                let data = match &host.data {
                    HostData::F32(v) => TensorData::new(v[start..end].to_vec(), [end - start]),
                    HostData::F16(v) => TensorData::new(v[start..end].to_vec(), [end - start]),
                    HostData::BF16(v) => TensorData::new(v[start..end].to_vec(), [end - start]),
                };
                Tensor::<1>::from_data(data, options.clone())
            })
            .collect();
        map.insert(name.clone(), parts);
        progress(LoadProgress {
            component,
            tensors_done: i + 1,
            tensors_total: order.len(),
        });
    }
    let store = VarStore {
        device: device.clone(),
        mode: Mode::Loaded(RefCell::new(map)),
        requested: Default::default(),
        in_rows: Default::default(),
        path: checkpoint.path().to_string(),
        component,
    };
    build(store.root())
}

/// `torch.nn.Linear`. The weight is kept as [in, out], the layout burn's `linear` takes.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The weight, transposed from the checkpoint's `[d_out, d_in]` to `[d_in, d_out]`.
    pub weight: Tensor<2>,
    /// The bias, `[d_out]`, if the layer has one.
    pub bias: Option<Tensor<1>>,
}

impl Linear {
    /// Reads `weight` (and `bias` if `bias`) under `vars`, for `d_in` input and `d_out` output
    /// features.
    pub fn new(vars: Vars, d_in: usize, d_out: usize, bias: bool) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: vars.get("weight", [d_out, d_in])?.transpose(),
            bias: if bias {
                Some(vars.get("bias", [d_out])?)
            } else {
                None
            },
        })
    }

    /// `[..., d_in]` -> `[..., d_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        linear(x, self.weight.clone(), self.bias.clone())
    }
}

/// `torch.nn.Conv2d` with square kernels and symmetric padding.
#[derive(Clone, Debug)]
pub struct Conv2d {
    /// The kernels, `[c_out, c_in, kernel, kernel]`.
    pub weight: Tensor<4>,
    /// The bias, `[c_out]`.
    pub bias: Option<Tensor<1>>,
    options: ConvOptions<2>,
}

impl Conv2d {
    /// Reads `weight` and `bias` under `vars`: a `kernel` x `kernel` convolution from `c_in` to
    /// `c_out` channels, with the given stride and the same padding on every side.
    pub fn new(
        vars: Vars,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: vars.get("weight", [c_out, c_in, kernel, kernel])?,
            bias: Some(vars.get("bias", [c_out])?),
            options: ConvOptions::new([stride; 2], [padding; 2], [1, 1], 1),
        })
    }

    /// Reads `weight` only: a `kernel` x `kernel` convolution without bias or padding, such as
    /// CLIP's patch projection.
    pub fn without_bias(
        vars: Vars,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: vars.get("weight", [c_out, c_in, kernel, kernel])?,
            bias: None,
            options: ConvOptions::new([stride; 2], [0; 2], [1, 1], 1),
        })
    }

    /// Padding given as (begin, end) per spatial dimension, e.g. the VAE's (0, 1) downsampling.
    pub fn with_padding(mut self, padding: [(usize, usize); 2]) -> Self {
        self.options.padding = padding;
        self
    }

    /// `[n, c_in, h, w]` -> `[n, c_out, h', w']`, where
    /// `h' = (h + pad_begin + pad_end - kernel) / stride + 1` (rounded down; likewise `w'`).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(
            x,
            self.weight.clone(),
            self.bias.clone(),
            self.options.clone(),
        )
    }
}

/// `torch.nn.GroupNorm` (affine).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    /// Per-channel scale, `[channels]`.
    pub weight: Tensor<1>,
    /// Per-channel shift, `[channels]`.
    pub bias: Tensor<1>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Reads `weight` and `bias` under `vars`: `channels` channels normalised in `groups`
    /// groups, with `eps` added to the variance.
    pub fn new(vars: Vars, groups: usize, channels: usize, eps: f64) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: vars.get("weight", [channels])?,
            bias: vars.get("bias", [channels])?,
            groups,
            eps,
        })
    }

    /// `[n, c, h, w]` -> same shape.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        // Statistics in F32 whatever the weights' dtype (F16 variances overflow).
        let dtype = x.dtype();
        let grouped = x
            .cast(DType::F32)
            .reshape([n, self.groups, (c / self.groups) * h * w]);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed = (grouped - mean)
            .div(var.add_scalar(self.eps).sqrt())
            .reshape([n, c, h, w]);
        (normed * self.weight.clone().cast(DType::F32).reshape([1, c, 1, 1])
            + self.bias.clone().cast(DType::F32).reshape([1, c, 1, 1]))
        .cast(dtype)
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Per-feature scale, `[dim]`.
    pub weight: Tensor<1>,
    /// Per-feature shift, `[dim]`.
    pub bias: Tensor<1>,
    eps: f64,
}

impl LayerNorm {
    /// Reads `weight` and `bias` under `vars` for a last dimension of `dim`, with `eps` added
    /// to the variance.
    pub fn new(vars: Vars, dim: usize, eps: f64) -> Result<Self, WeightsError> {
        Ok(Self {
            weight: vars.get("weight", [dim])?,
            bias: vars.get("bias", [dim])?,
            eps,
        })
    }

    /// `[..., dim]` -> same shape, normalised over the last dimension (computed in F32,
    /// returned in the input's dtype).
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        // In F32 whatever the weights' dtype, as for group norm.
        let dtype = x.dtype();
        layer_norm(
            x.cast(DType::F32),
            self.weight.clone().cast(DType::F32),
            Some(self.bias.clone().cast(DType::F32)),
            self.eps,
        )
        .cast(dtype)
    }
}

/// `torch.nn.Embedding`, its table held in row chunks where it is larger than the device
/// binds (SD 1.5's f32 token table is 145 MiB; WebGPU's default binding limit is 128 MiB).
#[derive(Clone, Debug)]
pub struct Embedding {
    /// The lookup table, `[count, dim]`, as consecutive row chunks: one row per id.
    chunks: Vec<Tensor<2>>,
}

impl Embedding {
    /// Reads `weight` under `vars`: `count` vectors of `dim` values.
    pub fn new(vars: Vars, count: usize, dim: usize) -> Result<Self, WeightsError> {
        Ok(Self {
            chunks: vars.get_rows("weight", [count, dim])?,
        })
    }

    /// Number of rows (ids).
    pub fn count(&self) -> usize {
        self.chunks.iter().map(|c| c.dims()[0]).sum()
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.chunks[0].dims()[1]
    }

    /// The row of `id`, `[1, dim]`, in the table's dtype.
    pub fn row(&self, id: usize) -> Tensor<2> {
        let mut start = 0;
        for chunk in &self.chunks {
            let rows = chunk.dims()[0];
            if id < start + rows {
                return chunk.clone().narrow(0, id - start, 1);
            }
            start += rows;
        }
        panic!("embedding row {id} of {start}")
    }

    /// `[batch, seq]` ids -> `[batch, seq, dim]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        if let [table] = self.chunks.as_slice() {
            return embedding(table.clone(), ids);
        }
        // Each chunk looks up the ids in its range (others clamped, then zeroed); the sum
        // holds every id's row. Ids stay on the device: no readback.
        let [b, s] = ids.dims();
        let mut start = 0;
        let mut out: Option<Tensor<3>> = None;
        for chunk in &self.chunks {
            let rows = chunk.dims()[0];
            let local = ids.clone().sub_scalar(start as i64);
            let outside = local
                .clone()
                .lower_elem(0)
                .bool_or(local.clone().greater_equal_elem(rows as i64));
            let rows_here = embedding(chunk.clone(), local.clamp(0, rows as i64 - 1)).mask_fill(
                outside.unsqueeze_dim::<3>(2).expand([b, s, self.dim()]),
                0.0,
            );
            out = Some(match out {
                Some(sum) => sum + rows_here,
                None => rows_here,
            });
            start += rows;
        }
        out.expect("at least one chunk")
    }
}

/// Activation functions by their config names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `gelu`: exact (erf) GELU, as OpenCLIP (SD 2.x) uses.
    Gelu,
    /// `quick_gelu`: `x * sigmoid(1.702 x)`, OpenAI CLIP's (SD 1.x) approximation of GELU.
    QuickGelu,
    /// `silu` (or `swish`): `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    /// The activation a config's `hidden_act` / `act_fn` names; `None` for an unknown name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Self::Gelu),
            "quick_gelu" => Some(Self::QuickGelu),
            "silu" | "swish" => Some(Self::Silu),
            _ => None,
        }
    }

    /// Applies the activation elementwise: any shape -> the same shape.
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::Gelu => gelu(x),
            // x * sigmoid(1.702 x), OpenAI CLIP's approximation.
            Self::QuickGelu => x.clone() * sigmoid(x.mul_scalar(1.702)),
            Self::Silu => silu(x),
        }
    }
}

thread_local! {
    static READBACKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Readbacks through [`read_f32`] on this thread so far: each one waits for the device to
/// finish its queue (a sync). Benchmarks and tests count them.
pub fn readbacks() -> usize {
    READBACKS.get()
}

/// Reads a tensor back to the host as f32, asynchronously (a synchronous read panics on
/// WebGPU).
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    READBACKS.set(READBACKS.get() + 1);
    let data = t.into_data_async().await.map_err(|e| e.to_string())?;
    data.convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| format!("{e:?}"))
}
