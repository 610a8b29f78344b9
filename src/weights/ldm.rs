//! Tensor names of an original single-file Stable Diffusion checkpoint (CompVis/LDM for 1.x /
//! 2.x, Stability's sgm for XL) mapped onto the diffusers names of its models (UNet, VAE, text
//! encoder, and SDXL's second text encoder).
//!
//! The mapping works on names and shapes only; no tensor data is read. Every key goes through
//! one pass over a rule table (`GROUPS`): the first rule whose pattern matches decides whether
//! the key is mapped, ignored, or (no rule matches) unknown. A rule's target is a template whose
//! `{placeholders}` are filled from the pattern's captures, some through an index function that
//! renumbers blocks with the layout inferred from the keys (`Layout`); the remainder of a
//! block's name (`{rest}`) is renamed by the inner table of that block kind (UNet resnet,
//! transformer, VAE resnet, VAE attention, CLIP / OpenCLIP layer), which also says whether the
//! tensor is copied, squeezed (VAE attention stored as 1x1 convolutions), split (OpenCLIP's
//! fused q/k/v projection) or transposed (OpenCLIP's `text_projection`, a matrix applied as
//! `x @ P` where transformers has a linear layer).
//!
//! Target names carry the component as a prefix: `unet.`, `vae.`, `text_encoder.`,
//! `text_encoder_2.` (text encoder names include transformers' `text_model.`).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::LazyLock;

use regex::{Captures, Regex};

/// How a diffusers tensor is made from a single-file tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transform {
    /// Taken as it is.
    Copy,
    /// Chunk `index` of `count` equal chunks along the first dimension (OpenCLIP's fused q/k/v
    /// `in_proj_weight`/`in_proj_bias`).
    Chunk {
        /// Which chunk, counting from 0 (q, k, v).
        index: usize,
        /// How many equal chunks the tensor is split into.
        count: usize,
    },
    /// Trailing size-1 dimensions dropped: [C, C, 1, 1] -> [C, C] (VAE attention stored as 1x1
    /// convolutions).
    Squeeze,
    /// A matrix transposed: [a, b] -> [b, a] (OpenCLIP's `text_projection`).
    Transpose,
}

impl Transform {
    /// The shape of the result for a source tensor of shape `shape`.
    ///
    /// `Squeeze` keeps at least two dimensions (a linear weight), so [1, 1, 1, 1] -> [1, 1].
    pub fn apply_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut out = shape.to_vec();
        match *self {
            Transform::Copy => {}
            Transform::Chunk { count, .. } => {
                if let Some(first) = out.first_mut() {
                    *first /= count.max(1);
                }
            }
            Transform::Squeeze => {
                while out.len() > 2 && out.last() == Some(&1) {
                    out.pop();
                }
            }
            Transform::Transpose => out.reverse(),
        }
        out
    }

    /// The elements of the source tensor (row-major, shape `shape`) that make up the result, as
    /// a range of flat element indices. Squeezing does not change the element order, so only a
    /// chunk is a proper sub-range (a transposed matrix needs all of its elements, reordered).
    pub fn element_range(&self, shape: &[usize]) -> Range<usize> {
        let numel: usize = shape.iter().product();
        match *self {
            Transform::Copy | Transform::Squeeze | Transform::Transpose => 0..numel,
            Transform::Chunk { index, count } => {
                let len = numel / count.max(1);
                index * len..(index + 1) * len
            }
        }
    }

    /// The data of the result from the source tensor's data (row-major, shape `shape`).
    ///
    /// Panics if `data` holds fewer elements than `shape` says.
    pub fn apply_data<T: Copy>(&self, data: &[T], shape: &[usize]) -> Vec<T> {
        let part = &data[self.element_range(shape)];
        match (self, shape) {
            (Transform::Transpose, &[rows, cols]) => (0..rows * cols)
                .map(|i| part[(i % rows) * cols + i / rows])
                .collect(),
            _ => part.to_vec(),
        }
    }
}

/// One diffusers tensor and the single-file tensor it is made from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The single-file name.
    pub source: String,
    /// The diffusers name with its component prefix (`unet.`, `vae.`, `text_encoder.`).
    pub target: String,
    /// How the diffusers tensor is made from the single-file one.
    pub transform: Transform,
}

/// The Stable Diffusion generation, which decides the text encoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LdmFamily {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder (`cond_stage_model.transformer.`).
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder (`cond_stage_model.model.`).
    Sd2,
    /// SDXL base (sgm layout): CLIP ViT-L/14 (`conditioner.embedders.0.transformer.`) and
    /// OpenCLIP ViT-bigG/14 (`conditioner.embedders.1.model.`).
    Sdxl,
    /// SDXL's refiner: OpenCLIP bigG alone, as `conditioner.embedders.0.model.`. Recognised
    /// so that it can be refused by name.
    SdxlRefiner,
}

/// The result of [`map_keys`].
#[derive(Clone, Debug, Default)]
pub struct LdmMap {
    /// Diffusers tensors, in the order of the input keys (a fused q/k/v key gives three, q, k, v).
    pub mapped: Vec<Mapping>,
    /// Keys real checkpoints carry that diffusers does not use (EMA copies, noise schedule
    /// buffers, training losses, SD 2's last text layer and projection, ...).
    pub ignored: Vec<String>,
    /// Keys no rule recognises, and keys whose target an earlier key already produced.
    pub unknown: Vec<String>,
}

/// Maps every tensor name of a single-file checkpoint (`keys`: name and shape) onto diffusers
/// names. The layout (UNet layers per block, VAE block count, OpenCLIP layer count) is inferred
/// from the keys themselves.
pub fn map_keys(keys: &[(String, Vec<usize>)], family: LdmFamily) -> LdmMap {
    let layout = Layout::infer(keys);
    let rules = &*RULES;
    let mut map = LdmMap::default();
    let mut seen = HashSet::new();
    for (key, shape) in keys {
        match classify(rules, key, shape, family, &layout) {
            Outcome::Mapped(mappings) => {
                if mappings.iter().all(|m| !seen.contains(&m.target)) {
                    seen.extend(mappings.iter().map(|m| m.target.clone()));
                    map.mapped.extend(mappings);
                } else {
                    map.unknown.push(key.clone());
                }
            }
            Outcome::Ignored => map.ignored.push(key.clone()),
            Outcome::Unknown => map.unknown.push(key.clone()),
        }
    }
    map
}

/// Sdxl when bigG's keys `conditioner.embedders.1.model.` are present (the refiner when it is
/// `embedders.0` and alone), Sd2 when OpenCLIP text keys `cond_stage_model.model.` are, Sd1
/// when `cond_stage_model.transformer.` are; None otherwise.
pub fn detect_family(keys: &[(String, Vec<usize>)]) -> Option<LdmFamily> {
    let has = |prefix: &str| keys.iter().any(|(k, _)| k.starts_with(prefix));
    if has(XL_TEXT_2) {
        Some(LdmFamily::Sdxl)
    } else if has("conditioner.embedders.0.model.") {
        Some(LdmFamily::SdxlRefiner)
    } else if has(SD2_TEXT) {
        Some(LdmFamily::Sd2)
    } else if has(SD1_TEXT) {
        Some(LdmFamily::Sd1)
    } else {
        None
    }
}

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const SD1_TEXT: &str = "cond_stage_model.transformer.";
const SD2_TEXT: &str = "cond_stage_model.model.";
const XL_TEXT: &str = "conditioner.embedders.0.transformer.";
const XL_TEXT_2: &str = "conditioner.embedders.1.model.";

// ---------------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------------

/// What the block renumbering needs to know about the checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Layout {
    /// UNet resnets per down block (`layers_per_block`; up blocks have one more).
    layers_per_block: usize,
    /// VAE decoder `up.N` blocks (numbered in reverse of diffusers' `up_blocks`).
    vae_up_blocks: usize,
    /// OpenCLIP `transformer.resblocks.N` layers.
    openclip_layers: usize,
}

impl Layout {
    fn infer(keys: &[(String, Vec<usize>)]) -> Layout {
        // The lowest and the highest `N` a pattern captures.
        let scan = |pattern: &str| -> (Option<usize>, Option<usize>) {
            let re = Regex::new(pattern).expect("layout pattern");
            let indices = keys
                .iter()
                .filter_map(|(k, _)| re.captures(k).and_then(|c| c[1].parse::<usize>().ok()));
            indices.fold((None, None), |(lo, hi), n| {
                (
                    Some(lo.map_or(n, |lo: usize| lo.min(n))),
                    Some(hi.map_or(n, |hi: usize| hi.max(n))),
                )
            })
        };
        // Input blocks: conv_in, then per block `lpb` resnets and a downsampler (not after the
        // last block), so the first downsampler `input_blocks.N.0.op` sits at N = lpb + 1.
        // Output blocks: per block lpb + 1 resnets, the first upsampler after resnet lpb.
        let (first_down, _) = scan(r"^model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.");
        let (first_up, _) = scan(r"^model\.diffusion_model\.output_blocks\.(\d+)\.[12]\.conv\.");
        let (_, last_input) = scan(r"^model\.diffusion_model\.input_blocks\.(\d+)\.");
        let layers_per_block = match (first_down, first_up, last_input) {
            (Some(n), _, _) if n >= 1 => n - 1,
            (_, Some(n), _) => n,
            // One block, no resampling: conv_in and lpb resnets.
            (_, _, Some(n)) => n,
            _ => 0,
        };
        // The decoder has as many blocks as the encoder; counted there, a stray decoder index
        // cannot shift the reversed numbering.
        let (_, last_down) = scan(r"^first_stage_model\.encoder\.down\.(\d+)\.");
        let (_, last_up) = scan(r"^first_stage_model\.decoder\.up\.(\d+)\.");
        let (_, last_layer) = scan(r"^cond_stage_model\.model\.transformer\.resblocks\.(\d+)\.");
        Layout {
            layers_per_block,
            vae_up_blocks: last_down.or(last_up).map_or(0, |n| n + 1),
            openclip_layers: last_layer.map_or(0, |n| n + 1),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rule tables
// ---------------------------------------------------------------------------------------------

/// Rules for the keys under one prefix. A rule's pattern is matched against the rest of the key
/// (anchored at both ends); the first matching rule of the first matching group decides.
struct Group {
    prefix: &'static str,
    /// The family the group applies to; None: both.
    family: Option<LdmFamily>,
    rules: &'static [Rule],
}

struct Rule {
    pattern: &'static str,
    action: Action,
}

enum Action {
    /// Known, not used by diffusers.
    Ignore,
    /// Mapped onto `target`, a template: `{name}` is the capture `name`, `{name:function}` the
    /// capture passed through an index function (see [`index_fn`]), `{rest}` the capture `rest`
    /// renamed by `inner`.
    Map { target: &'static str, inner: Inner },
}

/// How the remainder (`rest`) of a block's key is renamed.
#[derive(Clone, Copy)]
enum Inner {
    /// The rule has no `rest`: the whole key is matched.
    None,
    /// As `None`, the tensor transposed.
    Transposed,
    UnetResnet,
    UnetTransformer,
    VaeResnet,
    VaeAttention,
    ClipText,
    OpenClipLayer,
}

/// What an inner rule does with the tensor.
#[derive(Clone, Copy)]
enum InnerOp {
    Copy,
    /// [C, C, 1, 1] (or [C, C, 1]) 1x1 convolution to linear [C, C]; a copy when it already is.
    Squeeze,
    /// Fused q/k/v: three targets, `{qkv}` in the replacement taking `q`, `k`, `v`.
    SplitQkv,
    /// A matrix transposed.
    Transpose,
}

/// Inner table entry: pattern (anchored), replacement (`${n}` for capture n), operation.
type InnerRule = (&'static str, &'static str, InnerOp);

const fn map(pattern: &'static str, target: &'static str, inner: Inner) -> Rule {
    Rule {
        pattern,
        action: Action::Map { target, inner },
    }
}

const fn ignore(pattern: &'static str) -> Rule {
    Rule {
        pattern,
        action: Action::Ignore,
    }
}

const P: &str = "(?P<p>weight|bias)";

/// The rule table. Patterns use `{P}` for the parameter name (`weight` or `bias`).
static GROUPS: &[Group] = &[
    // SDXL's added text/time embedding.
    Group {
        prefix: UNET,
        family: Some(LdmFamily::Sdxl),
        rules: &[
            map(
                r"label_emb\.0\.0\.{P}",
                "unet.add_embedding.linear_1.{p}",
                Inner::None,
            ),
            map(
                r"label_emb\.0\.2\.{P}",
                "unet.add_embedding.linear_2.{p}",
                Inner::None,
            ),
        ],
    },
    Group {
        prefix: UNET,
        family: None,
        rules: &[
            map(
                r"time_embed\.0\.{P}",
                "unet.time_embedding.linear_1.{p}",
                Inner::None,
            ),
            map(
                r"time_embed\.2\.{P}",
                "unet.time_embedding.linear_2.{p}",
                Inner::None,
            ),
            map(r"input_blocks\.0\.0\.{P}", "unet.conv_in.{p}", Inner::None),
            map(r"out\.0\.{P}", "unet.conv_norm_out.{p}", Inner::None),
            map(r"out\.2\.{P}", "unet.conv_out.{p}", Inner::None),
            map(
                r"input_blocks\.(?P<i>\d+)\.0\.op\.{P}",
                "unet.down_blocks.{i:down_sampler}.downsamplers.0.conv.{p}",
                Inner::None,
            ),
            map(
                r"input_blocks\.(?P<i>\d+)\.0\.(?P<rest>.+)",
                "unet.down_blocks.{i:down_block}.resnets.{i:down_layer}.{rest}",
                Inner::UnetResnet,
            ),
            map(
                r"input_blocks\.(?P<i>\d+)\.1\.(?P<rest>.+)",
                "unet.down_blocks.{i:down_block}.attentions.{i:down_layer}.{rest}",
                Inner::UnetTransformer,
            ),
            map(
                r"middle_block\.0\.(?P<rest>.+)",
                "unet.mid_block.resnets.0.{rest}",
                Inner::UnetResnet,
            ),
            map(
                r"middle_block\.1\.(?P<rest>.+)",
                "unet.mid_block.attentions.0.{rest}",
                Inner::UnetTransformer,
            ),
            map(
                r"middle_block\.2\.(?P<rest>.+)",
                "unet.mid_block.resnets.1.{rest}",
                Inner::UnetResnet,
            ),
            map(
                r"output_blocks\.(?P<i>\d+)\.0\.(?P<rest>.+)",
                "unet.up_blocks.{i:up_block}.resnets.{i:up_layer}.{rest}",
                Inner::UnetResnet,
            ),
            // The upsampler follows the resnet (block without attention) or the attention.
            map(
                r"output_blocks\.(?P<i>\d+)\.[12]\.conv\.{P}",
                "unet.up_blocks.{i:up_sampler}.upsamplers.0.conv.{p}",
                Inner::None,
            ),
            map(
                r"output_blocks\.(?P<i>\d+)\.1\.(?P<rest>.+)",
                "unet.up_blocks.{i:up_block}.attentions.{i:up_layer}.{rest}",
                Inner::UnetTransformer,
            ),
        ],
    },
    Group {
        prefix: VAE,
        family: None,
        rules: &[
            map(
                r"(?P<c>encoder|decoder)\.(?P<m>conv_in|conv_out)\.{P}",
                "vae.{c}.{m}.{p}",
                Inner::None,
            ),
            map(
                r"(?P<c>encoder|decoder)\.norm_out\.{P}",
                "vae.{c}.conv_norm_out.{p}",
                Inner::None,
            ),
            map(
                r"encoder\.down\.(?P<i>\d+)\.block\.(?P<j>\d+)\.(?P<rest>.+)",
                "vae.encoder.down_blocks.{i}.resnets.{j}.{rest}",
                Inner::VaeResnet,
            ),
            map(
                r"encoder\.down\.(?P<i>\d+)\.downsample\.conv\.{P}",
                "vae.encoder.down_blocks.{i}.downsamplers.0.conv.{p}",
                Inner::None,
            ),
            map(
                r"decoder\.up\.(?P<i>\d+)\.block\.(?P<j>\d+)\.(?P<rest>.+)",
                "vae.decoder.up_blocks.{i:vae_up}.resnets.{j}.{rest}",
                Inner::VaeResnet,
            ),
            map(
                r"decoder\.up\.(?P<i>\d+)\.upsample\.conv\.{P}",
                "vae.decoder.up_blocks.{i:vae_up}.upsamplers.0.conv.{p}",
                Inner::None,
            ),
            map(
                r"(?P<c>encoder|decoder)\.mid\.block_(?P<k>[12])\.(?P<rest>.+)",
                "vae.{c}.mid_block.resnets.{k:minus_one}.{rest}",
                Inner::VaeResnet,
            ),
            map(
                r"(?P<c>encoder|decoder)\.mid\.attn_1\.(?P<rest>.+)",
                "vae.{c}.mid_block.attentions.0.{rest}",
                Inner::VaeAttention,
            ),
            map(
                r"(?P<m>quant_conv|post_quant_conv)\.{P}",
                "vae.{m}.{p}",
                Inner::None,
            ),
            // Autoencoder training: LPIPS and discriminator.
            ignore(r"loss\..+"),
        ],
    },
    Group {
        prefix: SD1_TEXT,
        family: Some(LdmFamily::Sd1),
        rules: &[
            // A buffer (0..77), not a weight.
            ignore(r"(?:text_model\.)?embeddings\.position_ids"),
            // Older transformers versions saved CLIPTextTransformer without `text_model.`.
            map(
                r"(?:text_model\.)?(?P<rest>.+)",
                "text_encoder.text_model.{rest}",
                Inner::ClipText,
            ),
        ],
    },
    Group {
        prefix: SD2_TEXT,
        family: Some(LdmFamily::Sd2),
        rules: &[
            map(
                r"token_embedding\.weight",
                "text_encoder.text_model.embeddings.token_embedding.weight",
                Inner::None,
            ),
            map(
                r"positional_embedding",
                "text_encoder.text_model.embeddings.position_embedding.weight",
                Inner::None,
            ),
            map(
                r"ln_final\.{P}",
                "text_encoder.text_model.final_layer_norm.{p}",
                Inner::None,
            ),
            // The last layer is ignored by `openclip_layer`: SD 2 conditions on the penultimate
            // layer, and diffusers' text encoder has one layer fewer.
            map(
                r"transformer\.resblocks\.(?P<n>\d+)\.(?P<rest>.+)",
                "text_encoder.text_model.encoder.layers.{n:openclip_layer}.{rest}",
                Inner::OpenClipLayer,
            ),
            // The projection after the last layer (unused without it), CLIP's temperature, and
            // the causal mask buffer.
            ignore(r"text_projection|logit_scale|attn_mask"),
        ],
    },
    Group {
        prefix: XL_TEXT,
        family: Some(LdmFamily::Sdxl),
        rules: &[
            ignore(r"text_model\.embeddings\.position_ids"),
            map(
                r"text_model\.(?P<rest>.+)",
                "text_encoder.text_model.{rest}",
                Inner::ClipText,
            ),
        ],
    },
    Group {
        prefix: XL_TEXT_2,
        family: Some(LdmFamily::Sdxl),
        rules: &[
            map(
                r"token_embedding\.weight",
                "text_encoder_2.text_model.embeddings.token_embedding.weight",
                Inner::None,
            ),
            map(
                r"positional_embedding",
                "text_encoder_2.text_model.embeddings.position_embedding.weight",
                Inner::None,
            ),
            map(
                r"ln_final\.{P}",
                "text_encoder_2.text_model.final_layer_norm.{p}",
                Inner::None,
            ),
            // Every layer: SDXL takes the penultimate states from the full model itself.
            map(
                r"transformer\.resblocks\.(?P<n>\d+)\.(?P<rest>.+)",
                "text_encoder_2.text_model.encoder.layers.{n}.{rest}",
                Inner::OpenClipLayer,
            ),
            map(
                r"text_projection",
                "text_encoder_2.text_projection.weight",
                Inner::Transposed,
            ),
            ignore(r"logit_scale|attn_mask"),
        ],
    },
    Group {
        prefix: "",
        family: None,
        rules: &[
            // sgm's denoiser buffers (SDXL).
            ignore(r"denoiser\.(?:sigmas|log_sigmas)"),
            // EMA copy of the UNet (`model_ema.diffusion_modelinput_blocks00weight`, ...).
            ignore(r"model_ema\..+"),
            // LatentDiffusion's noise schedule buffers and loss weights.
            ignore(r"betas|alphas_cumprod|alphas_cumprod_prev|log_one_minus_alphas_cumprod"),
            ignore(r"sqrt_[a-z0-9_]+|posterior_[a-z0-9_]+"),
            ignore(r"logvar|lvlb_weights|scale_factor"),
        ],
    },
];

static UNET_RESNET: &[InnerRule] = &[
    (r"in_layers\.0\.(weight|bias)", "norm1.${1}", InnerOp::Copy),
    (r"in_layers\.2\.(weight|bias)", "conv1.${1}", InnerOp::Copy),
    (
        r"emb_layers\.1\.(weight|bias)",
        "time_emb_proj.${1}",
        InnerOp::Copy,
    ),
    (r"out_layers\.0\.(weight|bias)", "norm2.${1}", InnerOp::Copy),
    (r"out_layers\.3\.(weight|bias)", "conv2.${1}", InnerOp::Copy),
    (
        r"skip_connection\.(weight|bias)",
        "conv_shortcut.${1}",
        InnerOp::Copy,
    ),
];

/// Transformer2D: the same names in both formats.
static UNET_TRANSFORMER: &[InnerRule] = &[
    (
        r"(norm|proj_in|proj_out)\.(weight|bias)",
        "${1}.${2}",
        InnerOp::Copy,
    ),
    (
        r"(transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.to_out\.0)\.(?:weight|bias))",
        "${1}",
        InnerOp::Copy,
    ),
    (
        r"(transformer_blocks\.\d+\.ff\.net\.(?:0\.proj|2)\.(?:weight|bias))",
        "${1}",
        InnerOp::Copy,
    ),
    (
        r"(transformer_blocks\.\d+\.attn[12]\.to_[qkv]\.weight)",
        "${1}",
        InnerOp::Copy,
    ),
];

static VAE_RESNET: &[InnerRule] = &[
    (
        r"(norm1|conv1|norm2|conv2)\.(weight|bias)",
        "${1}.${2}",
        InnerOp::Copy,
    ),
    (
        r"nin_shortcut\.(weight|bias)",
        "conv_shortcut.${1}",
        InnerOp::Copy,
    ),
];

static VAE_ATTENTION: &[InnerRule] = &[
    (r"norm\.(weight|bias)", "group_norm.${1}", InnerOp::Copy),
    (r"(q|k|v)\.weight", "to_${1}.weight", InnerOp::Squeeze),
    (r"(q|k|v)\.bias", "to_${1}.bias", InnerOp::Copy),
    (r"proj_out\.weight", "to_out.0.weight", InnerOp::Squeeze),
    (r"proj_out\.bias", "to_out.0.bias", InnerOp::Copy),
];

/// transformers' CLIPTextTransformer (below `text_model.`): the same names in both formats.
static CLIP_TEXT: &[InnerRule] = &[
    (
        r"(embeddings\.(?:token|position)_embedding\.weight)",
        "${1}",
        InnerOp::Copy,
    ),
    (
        r"(encoder\.layers\.\d+\.self_attn\.(?:q|k|v|out)_proj\.(?:weight|bias))",
        "${1}",
        InnerOp::Copy,
    ),
    (
        r"(encoder\.layers\.\d+\.(?:layer_norm[12]|mlp\.fc[12])\.(?:weight|bias))",
        "${1}",
        InnerOp::Copy,
    ),
    (
        r"(final_layer_norm\.(?:weight|bias))",
        "${1}",
        InnerOp::Copy,
    ),
];

static OPENCLIP_LAYER: &[InnerRule] = &[
    (
        r"ln_([12])\.(weight|bias)",
        "layer_norm${1}.${2}",
        InnerOp::Copy,
    ),
    (
        r"attn\.in_proj_(weight|bias)",
        "self_attn.{qkv}_proj.${1}",
        InnerOp::SplitQkv,
    ),
    (
        r"attn\.out_proj\.(weight|bias)",
        "self_attn.out_proj.${1}",
        InnerOp::Copy,
    ),
    (r"mlp\.c_fc\.(weight|bias)", "mlp.fc1.${1}", InnerOp::Copy),
    (r"mlp\.c_proj\.(weight|bias)", "mlp.fc2.${1}", InnerOp::Copy),
];

impl Inner {
    fn table(self) -> &'static [InnerRule] {
        match self {
            Inner::None | Inner::Transposed => &[],
            Inner::UnetResnet => UNET_RESNET,
            Inner::UnetTransformer => UNET_TRANSFORMER,
            Inner::VaeResnet => VAE_RESNET,
            Inner::VaeAttention => VAE_ATTENTION,
            Inner::ClipText => CLIP_TEXT,
            Inner::OpenClipLayer => OPENCLIP_LAYER,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const INNER_KINDS: [Inner; 8] = [
    Inner::None,
    Inner::Transposed,
    Inner::UnetResnet,
    Inner::UnetTransformer,
    Inner::VaeResnet,
    Inner::VaeAttention,
    Inner::ClipText,
    Inner::OpenClipLayer,
];

/// An index placeholder's value, or a rendered target.
enum Resolved<T = usize> {
    Value(T),
    /// The key is known but unused.
    Ignore,
    /// Not a position this kind of block occupies in the layout.
    Reject,
}

/// The index functions of `{capture:function}` placeholders.
fn index_fn(name: &str, n: usize, layout: &Layout) -> Resolved {
    use Resolved::{Ignore, Reject, Value};
    // Input block n >= 1 is layer (n - 1) % (lpb + 1) of block (n - 1) / (lpb + 1); layer lpb is
    // the downsampler. Output block n is layer n % (lpb + 1) of block n / (lpb + 1); the last
    // layer (lpb) carries the upsampler.
    let per_block = layout.layers_per_block + 1;
    let down = n.checked_sub(1).map(|m| (m / per_block, m % per_block));
    let up = (n / per_block, n % per_block);
    let lpb = layout.layers_per_block;
    match name {
        "down_block" => down.map_or(Reject, |(b, _)| Value(b)),
        "down_layer" => match down {
            Some((_, j)) if j < lpb => Value(j),
            _ => Reject,
        },
        "down_sampler" => match down {
            Some((b, j)) if j == lpb => Value(b),
            _ => Reject,
        },
        "up_block" => Value(up.0),
        "up_layer" => Value(up.1),
        "up_sampler" if up.1 == lpb => Value(up.0),
        "vae_up" if n < layout.vae_up_blocks => Value(layout.vae_up_blocks - 1 - n),
        "minus_one" if n >= 1 => Value(n - 1),
        "openclip_layer" if n + 1 < layout.openclip_layers => Value(n),
        "openclip_layer" if n + 1 == layout.openclip_layers => Ignore,
        _ => Reject,
    }
}

// ---------------------------------------------------------------------------------------------
// Matching
// ---------------------------------------------------------------------------------------------

struct CompiledRule {
    group: &'static Group,
    regex: Regex,
    action: &'static Action,
}

struct Rules {
    rules: Vec<CompiledRule>,
    /// Compiled inner tables, indexed by [`Inner::index`].
    inner: Vec<Vec<(Regex, &'static str, InnerOp)>>,
}

static RULES: LazyLock<Rules> = LazyLock::new(|| {
    let anchored = |pattern: &str| {
        let pattern = pattern.replace("{P}", P);
        Regex::new(&format!("^(?:{pattern})$")).expect("rule pattern")
    };
    let rules = GROUPS
        .iter()
        .flat_map(|group| group.rules.iter().map(move |rule| (group, rule)))
        .map(|(group, rule)| CompiledRule {
            group,
            regex: anchored(rule.pattern),
            action: &rule.action,
        })
        .collect();
    let inner = INNER_KINDS
        .iter()
        .map(|kind| {
            kind.table()
                .iter()
                .map(|&(pattern, replacement, op)| (anchored(pattern), replacement, op))
                .collect()
        })
        .collect();
    Rules { rules, inner }
});

enum Outcome {
    Mapped(Vec<Mapping>),
    Ignored,
    Unknown,
}

fn classify(
    rules: &Rules,
    key: &str,
    shape: &[usize],
    family: LdmFamily,
    layout: &Layout,
) -> Outcome {
    for rule in &rules.rules {
        if rule.group.family.is_some_and(|f| f != family) {
            continue;
        }
        let Some(rest) = key.strip_prefix(rule.group.prefix) else {
            continue;
        };
        let Some(caps) = rule.regex.captures(rest) else {
            continue;
        };
        return match rule.action {
            Action::Ignore => Outcome::Ignored,
            Action::Map { target, inner } => {
                map_one(rules, key, shape, &caps, target, *inner, layout)
            }
        };
    }
    Outcome::Unknown
}

fn map_one(
    rules: &Rules,
    key: &str,
    shape: &[usize],
    caps: &Captures,
    template: &str,
    inner: Inner,
    layout: &Layout,
) -> Outcome {
    // The renamed remainder and what is done to the tensor.
    let (rest, op) = match caps.name("rest") {
        None if matches!(inner, Inner::Transposed) => (String::new(), InnerOp::Transpose),
        None => (String::new(), InnerOp::Copy),
        Some(rest) => {
            let found = rules.inner[inner.index()]
                .iter()
                .find_map(|(re, replacement, op)| {
                    re.captures(rest.as_str()).map(|c| {
                        let mut out = String::new();
                        c.expand(replacement, &mut out);
                        (out, *op)
                    })
                });
            match found {
                Some(found) => found,
                None => return Outcome::Unknown,
            }
        }
    };
    let target = match render(template, caps, &rest, layout) {
        Resolved::Value(target) => target,
        Resolved::Ignore => return Outcome::Ignored,
        Resolved::Reject => return Outcome::Unknown,
    };
    let mapping = |target: String, transform: Transform| Mapping {
        source: key.to_string(),
        target,
        transform,
    };
    match op {
        InnerOp::Copy => Outcome::Mapped(vec![mapping(target, Transform::Copy)]),
        InnerOp::Transpose if shape.len() == 2 => {
            Outcome::Mapped(vec![mapping(target, Transform::Transpose)])
        }
        InnerOp::Transpose => Outcome::Unknown,
        InnerOp::Squeeze => {
            // Only when there is something to squeeze: a linear weight stays a copy.
            let transform = if Transform::Squeeze.apply_shape(shape) == shape {
                Transform::Copy
            } else {
                Transform::Squeeze
            };
            Outcome::Mapped(vec![mapping(target, transform)])
        }
        InnerOp::SplitQkv => {
            if shape.first().is_none_or(|&n| n % 3 != 0) {
                return Outcome::Unknown;
            }
            let mappings = ["q", "k", "v"]
                .iter()
                .enumerate()
                .map(|(index, name)| {
                    mapping(
                        target.replace("{qkv}", name),
                        Transform::Chunk { index, count: 3 },
                    )
                })
                .collect();
            Outcome::Mapped(mappings)
        }
    }
}

/// Fills a target template: `{rest}` with the renamed remainder, `{name}` with the capture
/// `name`, `{name:function}` with [`index_fn`] of the capture.
fn render(template: &str, caps: &Captures, rest: &str, layout: &Layout) -> Resolved<String> {
    let mut out = String::with_capacity(template.len() + rest.len());
    let mut tail = template;
    while let Some(open) = tail.find('{') {
        out.push_str(&tail[..open]);
        let Some(close) = tail[open..].find('}').map(|c| open + c) else {
            return Resolved::Reject;
        };
        let placeholder = &tail[open + 1..close];
        tail = &tail[close + 1..];
        if placeholder == "rest" {
            out.push_str(rest);
            continue;
        }
        let (name, function) = match placeholder.split_once(':') {
            Some((name, function)) => (name, Some(function)),
            None => (placeholder, None),
        };
        let Some(value) = caps.name(name).map(|m| m.as_str()) else {
            return Resolved::Reject;
        };
        match function {
            None => out.push_str(value),
            Some(function) => {
                let Ok(n) = value.parse::<usize>() else {
                    return Resolved::Reject;
                };
                match index_fn(function, n, layout) {
                    Resolved::Value(v) => out.push_str(&v.to_string()),
                    Resolved::Ignore => return Resolved::Ignore,
                    Resolved::Reject => return Resolved::Reject,
                }
            }
        }
    }
    out.push_str(tail);
    Resolved::Value(out)
}

#[cfg(test)]
mod tests;
