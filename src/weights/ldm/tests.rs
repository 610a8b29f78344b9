//! The key map against the layouts it maps: every Stable Diffusion family's keys, built the
//! way both formats name them, and the checkpoints the fixtures hold.

use super::*;
use std::collections::{BTreeMap, BTreeSet};

type Keys = Vec<(String, Vec<usize>)>;

/// A Stable Diffusion layout, described the way both formats are built from it.
struct Spec {
    unet_channels: Vec<usize>,
    layers_per_block: usize,
    /// Per down block (up blocks: reversed).
    cross_attention: Vec<bool>,
    /// SD 2 projects in and out of the transformer with linear layers.
    linear_projection: bool,
    context_dim: usize,
    vae_channels: Vec<usize>,
    vae_layers_per_block: usize,
    /// Single-file layers (SD 2's diffusers text encoder has one fewer).
    text_layers: usize,
    text_dim: usize,
    family: LdmFamily,
}

fn sd15() -> Spec {
    Spec {
        unet_channels: vec![320, 640, 1280, 1280],
        layers_per_block: 2,
        cross_attention: vec![true, true, true, false],
        linear_projection: false,
        context_dim: 768,
        vae_channels: vec![128, 256, 512, 512],
        vae_layers_per_block: 2,
        text_layers: 12,
        text_dim: 768,
        family: LdmFamily::Sd1,
    }
}

fn sd21() -> Spec {
    Spec {
        linear_projection: true,
        context_dim: 1024,
        text_layers: 24,
        text_dim: 1024,
        family: LdmFamily::Sd2,
        ..sd15()
    }
}

fn tiny(family: LdmFamily) -> Spec {
    Spec {
        unet_channels: vec![32, 64, 64, 64],
        context_dim: 32,
        vae_channels: vec![32, 32, 64, 64],
        text_layers: 5,
        text_dim: 32,
        family,
        linear_projection: family == LdmFamily::Sd2,
        ..sd15()
    }
}

fn push(keys: &mut Keys, name: String, shape: &[usize]) {
    keys.push((name, shape.to_vec()));
}

/// `{prefix}{module}.weight` and `.bias`.
fn push_wb(keys: &mut Keys, name: &str, weight: &[usize], bias: usize) {
    push(keys, format!("{name}.weight"), weight);
    push(keys, format!("{name}.bias"), &[bias]);
}

fn push_norm(keys: &mut Keys, name: &str, c: usize) {
    push_wb(keys, name, &[c], c);
}

/// Transformer2D, the same names in both formats.
fn transformer(keys: &mut Keys, p: &str, c: usize, ctx: usize, linear: bool) {
    let proj: &[usize] = if linear { &[c, c] } else { &[c, c, 1, 1] };
    push_norm(keys, &format!("{p}.norm"), c);
    push_wb(keys, &format!("{p}.proj_in"), proj, c);
    let b = format!("{p}.transformer_blocks.0");
    for (attn, kv) in [("attn1", c), ("attn2", ctx)] {
        push(keys, format!("{b}.{attn}.to_q.weight"), &[c, c]);
        push(keys, format!("{b}.{attn}.to_k.weight"), &[c, kv]);
        push(keys, format!("{b}.{attn}.to_v.weight"), &[c, kv]);
        push_wb(keys, &format!("{b}.{attn}.to_out.0"), &[c, c], c);
    }
    for norm in ["norm1", "norm2", "norm3"] {
        push_norm(keys, &format!("{b}.{norm}"), c);
    }
    push_wb(keys, &format!("{b}.ff.net.0.proj"), &[8 * c, c], 8 * c);
    push_wb(keys, &format!("{b}.ff.net.2"), &[c, 4 * c], c);
    push_wb(keys, &format!("{p}.proj_out"), proj, c);
}

/// UNet resnet; `names`: norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut.
fn unet_resnet(keys: &mut Keys, p: &str, cin: usize, cout: usize, names: [&str; 6]) {
    let temb = 4 * 320;
    push_norm(keys, &format!("{p}.{}", names[0]), cin);
    push_wb(keys, &format!("{p}.{}", names[1]), &[cout, cin, 3, 3], cout);
    push_wb(keys, &format!("{p}.{}", names[2]), &[cout, temb], cout);
    push_norm(keys, &format!("{p}.{}", names[3]), cout);
    push_wb(
        keys,
        &format!("{p}.{}", names[4]),
        &[cout, cout, 3, 3],
        cout,
    );
    if cin != cout {
        push_wb(keys, &format!("{p}.{}", names[5]), &[cout, cin, 1, 1], cout);
    }
}

const LDM_RESNET: [&str; 6] = [
    "in_layers.0",
    "in_layers.2",
    "emb_layers.1",
    "out_layers.0",
    "out_layers.3",
    "skip_connection",
];
const DIFFUSERS_RESNET: [&str; 6] = [
    "norm1",
    "conv1",
    "time_emb_proj",
    "norm2",
    "conv2",
    "conv_shortcut",
];

/// The UNet as `ldm.modules.diffusionmodules.openaimodel.UNetModel` names it.
fn ldm_unet(s: &Spec, keys: &mut Keys) {
    let p = "model.diffusion_model";
    let (ch0, ctx, lin, lpb) = (
        s.unet_channels[0],
        s.context_dim,
        s.linear_projection,
        s.layers_per_block,
    );
    let n = s.unet_channels.len();
    push_wb(keys, &format!("{p}.time_embed.0"), &[4 * ch0, ch0], 4 * ch0);
    push_wb(
        keys,
        &format!("{p}.time_embed.2"),
        &[4 * ch0, 4 * ch0],
        4 * ch0,
    );
    push_wb(keys, &format!("{p}.input_blocks.0.0"), &[ch0, 4, 3, 3], ch0);
    let mut skips = vec![ch0];
    let mut ch = ch0;
    let mut i = 1;
    for (level, &c) in s.unet_channels.iter().enumerate() {
        for _ in 0..lpb {
            unet_resnet(keys, &format!("{p}.input_blocks.{i}.0"), ch, c, LDM_RESNET);
            ch = c;
            if s.cross_attention[level] {
                transformer(keys, &format!("{p}.input_blocks.{i}.1"), c, ctx, lin);
            }
            skips.push(ch);
            i += 1;
        }
        if level + 1 != n {
            push_wb(
                keys,
                &format!("{p}.input_blocks.{i}.0.op"),
                &[ch, ch, 3, 3],
                ch,
            );
            skips.push(ch);
            i += 1;
        }
    }
    unet_resnet(keys, &format!("{p}.middle_block.0"), ch, ch, LDM_RESNET);
    transformer(keys, &format!("{p}.middle_block.1"), ch, ctx, lin);
    unet_resnet(keys, &format!("{p}.middle_block.2"), ch, ch, LDM_RESNET);
    let mut i = 0;
    for level in (0..n).rev() {
        let c = s.unet_channels[level];
        for j in 0..=lpb {
            let skip = skips.pop().unwrap();
            unet_resnet(
                keys,
                &format!("{p}.output_blocks.{i}.0"),
                ch + skip,
                c,
                LDM_RESNET,
            );
            ch = c;
            let mut next = 1;
            if s.cross_attention[level] {
                transformer(keys, &format!("{p}.output_blocks.{i}.1"), c, ctx, lin);
                next = 2;
            }
            if level != 0 && j == lpb {
                push_wb(
                    keys,
                    &format!("{p}.output_blocks.{i}.{next}.conv"),
                    &[c, c, 3, 3],
                    c,
                );
            }
            i += 1;
        }
    }
    push_norm(keys, &format!("{p}.out.0"), ch);
    push_wb(keys, &format!("{p}.out.2"), &[4, ch, 3, 3], 4);
}

/// The UNet as diffusers' `UNet2DConditionModel` names it.
fn diffusers_unet(s: &Spec, keys: &mut Keys) {
    let p = "unet";
    let (ch0, ctx, lin, lpb) = (
        s.unet_channels[0],
        s.context_dim,
        s.linear_projection,
        s.layers_per_block,
    );
    let n = s.unet_channels.len();
    push_wb(keys, &format!("{p}.conv_in"), &[ch0, 4, 3, 3], ch0);
    push_wb(
        keys,
        &format!("{p}.time_embedding.linear_1"),
        &[4 * ch0, ch0],
        4 * ch0,
    );
    push_wb(
        keys,
        &format!("{p}.time_embedding.linear_2"),
        &[4 * ch0, 4 * ch0],
        4 * ch0,
    );
    let mut out = ch0;
    for (b, &c) in s.unet_channels.iter().enumerate() {
        for j in 0..lpb {
            let cin = if j == 0 { out } else { c };
            unet_resnet(
                keys,
                &format!("{p}.down_blocks.{b}.resnets.{j}"),
                cin,
                c,
                DIFFUSERS_RESNET,
            );
            if s.cross_attention[b] {
                transformer(
                    keys,
                    &format!("{p}.down_blocks.{b}.attentions.{j}"),
                    c,
                    ctx,
                    lin,
                );
            }
        }
        out = c;
        if b + 1 != n {
            push_wb(
                keys,
                &format!("{p}.down_blocks.{b}.downsamplers.0.conv"),
                &[c, c, 3, 3],
                c,
            );
        }
    }
    let top = s.unet_channels[n - 1];
    unet_resnet(
        keys,
        &format!("{p}.mid_block.resnets.0"),
        top,
        top,
        DIFFUSERS_RESNET,
    );
    transformer(keys, &format!("{p}.mid_block.attentions.0"), top, ctx, lin);
    unet_resnet(
        keys,
        &format!("{p}.mid_block.resnets.1"),
        top,
        top,
        DIFFUSERS_RESNET,
    );
    let reversed: Vec<usize> = s.unet_channels.iter().rev().copied().collect();
    let mut prev = top;
    for (b, &c) in reversed.iter().enumerate() {
        let input = reversed[(b + 1).min(n - 1)];
        for j in 0..=lpb {
            let skip = if j == lpb { input } else { c };
            let cin = if j == 0 { prev } else { c };
            unet_resnet(
                keys,
                &format!("{p}.up_blocks.{b}.resnets.{j}"),
                cin + skip,
                c,
                DIFFUSERS_RESNET,
            );
            if s.cross_attention[n - 1 - b] {
                transformer(
                    keys,
                    &format!("{p}.up_blocks.{b}.attentions.{j}"),
                    c,
                    ctx,
                    lin,
                );
            }
        }
        prev = c;
        if b + 1 != n {
            push_wb(
                keys,
                &format!("{p}.up_blocks.{b}.upsamplers.0.conv"),
                &[c, c, 3, 3],
                c,
            );
        }
    }
    push_norm(keys, &format!("{p}.conv_norm_out"), ch0);
    push_wb(keys, &format!("{p}.conv_out"), &[4, ch0, 3, 3], 4);
}

fn vae_resnet(keys: &mut Keys, p: &str, cin: usize, cout: usize, shortcut: &str) {
    push_norm(keys, &format!("{p}.norm1"), cin);
    push_wb(keys, &format!("{p}.conv1"), &[cout, cin, 3, 3], cout);
    push_norm(keys, &format!("{p}.norm2"), cout);
    push_wb(keys, &format!("{p}.conv2"), &[cout, cout, 3, 3], cout);
    if cin != cout {
        push_wb(keys, &format!("{p}.{shortcut}"), &[cout, cin, 1, 1], cout);
    }
}

/// The VAE as `ldm.models.autoencoder.AutoencoderKL` (`diffusers`: false) or diffusers'
/// `AutoencoderKL` (true) names it.
fn vae(s: &Spec, keys: &mut Keys, diffusers: bool) {
    let p = if diffusers {
        "vae"
    } else {
        "first_stage_model"
    };
    let shortcut = if diffusers {
        "conv_shortcut"
    } else {
        "nin_shortcut"
    };
    let ch = &s.vae_channels;
    let n = ch.len();
    let lpb = s.vae_layers_per_block;
    let top = ch[n - 1];
    let mid = |keys: &mut Keys, part: &str| {
        let (r1, r2, a) = if diffusers {
            (
                format!("{p}.{part}.mid_block.resnets.0"),
                format!("{p}.{part}.mid_block.resnets.1"),
                format!("{p}.{part}.mid_block.attentions.0"),
            )
        } else {
            (
                format!("{p}.{part}.mid.block_1"),
                format!("{p}.{part}.mid.block_2"),
                format!("{p}.{part}.mid.attn_1"),
            )
        };
        vae_resnet(keys, &r1, top, top, shortcut);
        let names: [&str; 5] = if diffusers {
            ["group_norm", "to_q", "to_k", "to_v", "to_out.0"]
        } else {
            ["norm", "q", "k", "v", "proj_out"]
        };
        let linear: &[usize] = if diffusers {
            &[top, top]
        } else {
            &[top, top, 1, 1]
        };
        push_norm(keys, &format!("{a}.{}", names[0]), top);
        for name in &names[1..] {
            push_wb(keys, &format!("{a}.{name}"), linear, top);
        }
        vae_resnet(keys, &r2, top, top, shortcut);
    };
    // Encoder.
    push_wb(
        keys,
        &format!("{p}.encoder.conv_in"),
        &[ch[0], 3, 3, 3],
        ch[0],
    );
    let mut cin = ch[0];
    for (i, &c) in ch.iter().enumerate() {
        for j in 0..lpb {
            let name = if diffusers {
                format!("{p}.encoder.down_blocks.{i}.resnets.{j}")
            } else {
                format!("{p}.encoder.down.{i}.block.{j}")
            };
            vae_resnet(keys, &name, cin, c, shortcut);
            cin = c;
        }
        if i + 1 != n {
            let name = if diffusers {
                format!("{p}.encoder.down_blocks.{i}.downsamplers.0.conv")
            } else {
                format!("{p}.encoder.down.{i}.downsample.conv")
            };
            push_wb(keys, &name, &[c, c, 3, 3], c);
        }
    }
    mid(keys, "encoder");
    let norm_out = if diffusers {
        "conv_norm_out"
    } else {
        "norm_out"
    };
    push_norm(keys, &format!("{p}.encoder.{norm_out}"), top);
    push_wb(keys, &format!("{p}.encoder.conv_out"), &[8, top, 3, 3], 8);
    push_wb(keys, &format!("{p}.quant_conv"), &[8, 8, 1, 1], 8);
    push_wb(keys, &format!("{p}.post_quant_conv"), &[4, 4, 1, 1], 4);
    // Decoder.
    push_wb(keys, &format!("{p}.decoder.conv_in"), &[top, 4, 3, 3], top);
    mid(keys, "decoder");
    let mut cin = top;
    for level in (0..n).rev() {
        let c = ch[level];
        let b = if diffusers { n - 1 - level } else { level };
        for j in 0..=lpb {
            let name = if diffusers {
                format!("{p}.decoder.up_blocks.{b}.resnets.{j}")
            } else {
                format!("{p}.decoder.up.{b}.block.{j}")
            };
            vae_resnet(keys, &name, cin, c, shortcut);
            cin = c;
        }
        if level != 0 {
            let name = if diffusers {
                format!("{p}.decoder.up_blocks.{b}.upsamplers.0.conv")
            } else {
                format!("{p}.decoder.up.{b}.upsample.conv")
            };
            push_wb(keys, &name, &[c, c, 3, 3], c);
        }
    }
    push_norm(keys, &format!("{p}.decoder.{norm_out}"), ch[0]);
    push_wb(keys, &format!("{p}.decoder.conv_out"), &[3, ch[0], 3, 3], 3);
}

const VOCAB: usize = 49408;

/// transformers' CLIPTextModel under `prefix` with `layers` layers.
fn clip_text(keys: &mut Keys, prefix: &str, layers: usize, d: usize) {
    let t = format!("{prefix}text_model");
    push(
        keys,
        format!("{t}.embeddings.token_embedding.weight"),
        &[VOCAB, d],
    );
    push(
        keys,
        format!("{t}.embeddings.position_embedding.weight"),
        &[77, d],
    );
    for l in 0..layers {
        let p = format!("{t}.encoder.layers.{l}");
        for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
            push_wb(keys, &format!("{p}.self_attn.{proj}"), &[d, d], d);
        }
        push_norm(keys, &format!("{p}.layer_norm1"), d);
        push_wb(keys, &format!("{p}.mlp.fc1"), &[4 * d, d], 4 * d);
        push_wb(keys, &format!("{p}.mlp.fc2"), &[d, 4 * d], d);
        push_norm(keys, &format!("{p}.layer_norm2"), d);
    }
    push_norm(keys, &format!("{t}.final_layer_norm"), d);
}

/// OpenCLIP's text tower as `FrozenOpenCLIPEmbedder` stores it.
fn openclip_text(keys: &mut Keys, layers: usize, d: usize) {
    let p = "cond_stage_model.model";
    push(keys, format!("{p}.positional_embedding"), &[77, d]);
    push(keys, format!("{p}.text_projection"), &[d, d]);
    push(keys, format!("{p}.logit_scale"), &[]);
    push(keys, format!("{p}.token_embedding.weight"), &[VOCAB, d]);
    for l in 0..layers {
        let r = format!("{p}.transformer.resblocks.{l}");
        push_norm(keys, &format!("{r}.ln_1"), d);
        push(keys, format!("{r}.attn.in_proj_weight"), &[3 * d, d]);
        push(keys, format!("{r}.attn.in_proj_bias"), &[3 * d]);
        push_wb(keys, &format!("{r}.attn.out_proj"), &[d, d], d);
        push_norm(keys, &format!("{r}.ln_2"), d);
        push_wb(keys, &format!("{r}.mlp.c_fc"), &[4 * d, d], 4 * d);
        push_wb(keys, &format!("{r}.mlp.c_proj"), &[d, 4 * d], d);
    }
    push_norm(keys, &format!("{p}.ln_final"), d);
}

/// What a real single file carries besides the weights.
const EXTRAS: [&str; 18] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "lvlb_weights",
    "model_ema.decay",
    "model_ema.num_updates",
    "model_ema.diffusion_modelinput_blocks00weight",
    "first_stage_model.loss.logvar",
];

/// The whole single file.
fn single_file(s: &Spec) -> Keys {
    let mut keys = Keys::new();
    for extra in EXTRAS {
        push(&mut keys, extra.to_string(), &[1000]);
    }
    ldm_unet(s, &mut keys);
    vae(s, &mut keys, false);
    match s.family {
        LdmFamily::Sd1 => {
            clip_text(
                &mut keys,
                "cond_stage_model.transformer.",
                s.text_layers,
                s.text_dim,
            );
            push(
                &mut keys,
                "cond_stage_model.transformer.text_model.embeddings.position_ids".into(),
                &[1, 77],
            );
        }
        LdmFamily::Sd2 => openclip_text(&mut keys, s.text_layers, s.text_dim),
        LdmFamily::Sdxl | LdmFamily::SdxlRefiner => {
            panic!("SDXL single files are tested on tests/fixtures/sd/tiny-sdxl.safetensors")
        }
    }
    keys
}

/// The diffusers tensors (component-prefixed) with their shapes.
fn diffusers(s: &Spec) -> BTreeMap<String, Vec<usize>> {
    let mut keys = Keys::new();
    diffusers_unet(s, &mut keys);
    vae(s, &mut keys, true);
    let layers = match s.family {
        LdmFamily::Sd1 => s.text_layers,
        LdmFamily::Sd2 => s.text_layers - 1,
        LdmFamily::Sdxl | LdmFamily::SdxlRefiner => {
            panic!("SDXL single files are tested on tests/fixtures/sd/tiny-sdxl.safetensors")
        }
    };
    clip_text(&mut keys, "text_encoder.", layers, s.text_dim);
    let len = keys.len();
    let map: BTreeMap<_, _> = keys.into_iter().collect();
    assert_eq!(map.len(), len, "duplicate diffusers names");
    map
}

/// Maps the single file of `s` and checks the result against the diffusers names and shapes.
fn check(s: &Spec) -> LdmMap {
    let keys = single_file(s);
    assert_eq!(detect_family(&keys), Some(s.family));
    let map = map_keys(&keys, s.family);
    assert!(map.unknown.is_empty(), "unknown: {:?}", map.unknown);
    let shapes: BTreeMap<&str, &[usize]> = keys
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    let mut targets = BTreeMap::new();
    for m in &map.mapped {
        let shape = m.transform.apply_shape(shapes[m.source.as_str()]);
        assert!(
            targets.insert(m.target.clone(), shape).is_none(),
            "duplicate target {}",
            m.target
        );
    }
    let expected = diffusers(s);
    let missing: Vec<_> = expected
        .keys()
        .filter(|k| !targets.contains_key(*k))
        .collect();
    let extra: Vec<_> = targets
        .keys()
        .filter(|k| !expected.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}\nextra {extra:?}"
    );
    assert_eq!(targets, expected, "shapes differ");
    // Every key is accounted for exactly once.
    let sources: BTreeSet<&str> = map.mapped.iter().map(|m| m.source.as_str()).collect();
    assert_eq!(sources.len() + map.ignored.len(), keys.len());
    map
}

fn count(map: &LdmMap, component: &str) -> usize {
    map.mapped
        .iter()
        .filter(|m| m.target.starts_with(component))
        .count()
}

/// Parameters of the mapped tensors of one component.
fn params(map: &LdmMap, keys: &Keys, component: &str) -> usize {
    let shapes: BTreeMap<&str, &[usize]> = keys
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_slice()))
        .collect();
    map.mapped
        .iter()
        .filter(|m| m.target.starts_with(component))
        .map(|m| {
            m.transform
                .apply_shape(shapes[m.source.as_str()])
                .iter()
                .product::<usize>()
        })
        .sum()
}

fn target<'a>(map: &'a LdmMap, source: &str) -> Vec<(&'a str, &'a Transform)> {
    map.mapped
        .iter()
        .filter(|m| m.source == source)
        .map(|m| (m.target.as_str(), &m.transform))
        .collect()
}

fn copy(target: &str) -> Vec<(&str, &Transform)> {
    vec![(target, &Transform::Copy)]
}

#[test]
fn sd15_single_file() {
    let map = check(&sd15());
    // Tensor counts of SD 1.5's diffusers files (unet, vae, text_encoder).
    assert_eq!(count(&map, "unet."), 686);
    assert_eq!(count(&map, "vae."), 248);
    assert_eq!(count(&map, "text_encoder."), 196);
    // And the parameter counts of diffusers' SD 1.5 models.
    let keys = single_file(&sd15());
    assert_eq!(params(&map, &keys, "unet."), 859_520_964);
    assert_eq!(params(&map, &keys, "vae."), 83_653_863);
    assert_eq!(params(&map, &keys, "text_encoder."), 123_060_480);
    assert_eq!(map.ignored.len(), EXTRAS.len() + 1);
    let u = "model.diffusion_model.";
    let spots = [
        (
            format!("{u}output_blocks.2.1.conv.weight"),
            "unet.up_blocks.0.upsamplers.0.conv.weight",
        ),
        (
            format!("{u}output_blocks.5.2.conv.bias"),
            "unet.up_blocks.1.upsamplers.0.conv.bias",
        ),
        (
            format!("{u}output_blocks.8.2.conv.weight"),
            "unet.up_blocks.2.upsamplers.0.conv.weight",
        ),
        (
            format!("{u}input_blocks.3.0.op.weight"),
            "unet.down_blocks.0.downsamplers.0.conv.weight",
        ),
        (
            format!("{u}input_blocks.9.0.op.bias"),
            "unet.down_blocks.2.downsamplers.0.conv.bias",
        ),
        (
            format!("{u}input_blocks.4.0.skip_connection.weight"),
            "unet.down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        (
            format!("{u}input_blocks.11.0.emb_layers.1.weight"),
            "unet.down_blocks.3.resnets.1.time_emb_proj.weight",
        ),
        (
            format!("{u}input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight"),
            "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        ),
        (
            format!("{u}middle_block.2.out_layers.3.weight"),
            "unet.mid_block.resnets.1.conv2.weight",
        ),
        (
            format!("{u}middle_block.1.proj_in.weight"),
            "unet.mid_block.attentions.0.proj_in.weight",
        ),
        (
            format!("{u}output_blocks.0.0.in_layers.0.weight"),
            "unet.up_blocks.0.resnets.0.norm1.weight",
        ),
        (
            format!("{u}output_blocks.11.1.proj_out.bias"),
            "unet.up_blocks.3.attentions.2.proj_out.bias",
        ),
        (format!("{u}input_blocks.0.0.weight"), "unet.conv_in.weight"),
        (
            format!("{u}time_embed.2.bias"),
            "unet.time_embedding.linear_2.bias",
        ),
        (format!("{u}out.0.weight"), "unet.conv_norm_out.weight"),
        (format!("{u}out.2.bias"), "unet.conv_out.bias"),
        (
            "first_stage_model.decoder.up.3.block.0.conv1.weight".into(),
            "vae.decoder.up_blocks.0.resnets.0.conv1.weight",
        ),
        (
            "first_stage_model.decoder.up.0.block.2.norm2.bias".into(),
            "vae.decoder.up_blocks.3.resnets.2.norm2.bias",
        ),
        (
            "first_stage_model.decoder.up.1.upsample.conv.weight".into(),
            "vae.decoder.up_blocks.2.upsamplers.0.conv.weight",
        ),
        (
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight".into(),
            "vae.decoder.up_blocks.3.resnets.0.conv_shortcut.weight",
        ),
        (
            "first_stage_model.encoder.down.2.downsample.conv.bias".into(),
            "vae.encoder.down_blocks.2.downsamplers.0.conv.bias",
        ),
        (
            "first_stage_model.encoder.mid.block_2.conv1.weight".into(),
            "vae.encoder.mid_block.resnets.1.conv1.weight",
        ),
        (
            "first_stage_model.encoder.mid.attn_1.q.bias".into(),
            "vae.encoder.mid_block.attentions.0.to_q.bias",
        ),
        (
            "first_stage_model.decoder.norm_out.weight".into(),
            "vae.decoder.conv_norm_out.weight",
        ),
        (
            "first_stage_model.post_quant_conv.weight".into(),
            "vae.post_quant_conv.weight",
        ),
        (
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight".into(),
            "text_encoder.text_model.encoder.layers.11.mlp.fc2.weight",
        ),
    ];
    for (source, expected) in &spots {
        assert_eq!(target(&map, source), copy(expected), "{source}");
    }
    for (source, expected) in [
        (
            "first_stage_model.encoder.mid.attn_1.q.weight",
            "vae.encoder.mid_block.attentions.0.to_q.weight",
        ),
        (
            "first_stage_model.decoder.mid.attn_1.proj_out.weight",
            "vae.decoder.mid_block.attentions.0.to_out.0.weight",
        ),
    ] {
        assert_eq!(target(&map, source), vec![(expected, &Transform::Squeeze)]);
    }
    for ignored in [
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "model_ema.decay",
        "alphas_cumprod",
        "first_stage_model.loss.logvar",
    ] {
        assert!(map.ignored.iter().any(|k| k == ignored), "{ignored}");
    }
}

#[test]
fn sd21_single_file() {
    let map = check(&sd21());
    assert_eq!(count(&map, "unet."), 686);
    assert_eq!(count(&map, "vae."), 248);
    // 23 of OpenCLIP's 24 layers, 16 tensors each, and the embeddings and final norm.
    assert_eq!(count(&map, "text_encoder."), 372);
    let keys = single_file(&sd21());
    assert_eq!(params(&map, &keys, "unet."), 865_910_724);
    assert_eq!(params(&map, &keys, "vae."), 83_653_863);
    assert_eq!(params(&map, &keys, "text_encoder."), 340_387_840);
    let r = "cond_stage_model.model.transformer.resblocks";
    let t = "text_encoder.text_model.encoder.layers";
    assert_eq!(
        target(&map, &format!("{r}.0.attn.in_proj_weight")),
        vec![
            (
                format!("{t}.0.self_attn.q_proj.weight").as_str(),
                &Transform::Chunk { index: 0, count: 3 }
            ),
            (
                format!("{t}.0.self_attn.k_proj.weight").as_str(),
                &Transform::Chunk { index: 1, count: 3 }
            ),
            (
                format!("{t}.0.self_attn.v_proj.weight").as_str(),
                &Transform::Chunk { index: 2, count: 3 }
            ),
        ]
    );
    let bias = target(&map, &format!("{r}.22.attn.in_proj_bias"));
    assert_eq!(
        bias[2],
        (
            format!("{t}.22.self_attn.v_proj.bias").as_str(),
            &Transform::Chunk { index: 2, count: 3 }
        )
    );
    let spots = [
        (
            format!("{r}.5.ln_1.weight"),
            format!("{t}.5.layer_norm1.weight"),
        ),
        (
            format!("{r}.5.ln_2.bias"),
            format!("{t}.5.layer_norm2.bias"),
        ),
        (
            format!("{r}.7.attn.out_proj.weight"),
            format!("{t}.7.self_attn.out_proj.weight"),
        ),
        (
            format!("{r}.9.mlp.c_fc.bias"),
            format!("{t}.9.mlp.fc1.bias"),
        ),
        (
            format!("{r}.22.mlp.c_proj.weight"),
            format!("{t}.22.mlp.fc2.weight"),
        ),
        (
            "cond_stage_model.model.positional_embedding".into(),
            "text_encoder.text_model.embeddings.position_embedding.weight".into(),
        ),
        (
            "cond_stage_model.model.token_embedding.weight".into(),
            "text_encoder.text_model.embeddings.token_embedding.weight".into(),
        ),
        (
            "cond_stage_model.model.ln_final.bias".into(),
            "text_encoder.text_model.final_layer_norm.bias".into(),
        ),
        (
            "model.diffusion_model.input_blocks.1.1.proj_in.weight".into(),
            "unet.down_blocks.0.attentions.0.proj_in.weight".into(),
        ),
    ];
    for (source, expected) in &spots {
        assert_eq!(target(&map, source), copy(expected), "{source}");
    }
    // The last layer and the projection are not part of diffusers' SD 2 text encoder.
    for ignored in [
        format!("{r}.23.attn.in_proj_weight"),
        format!("{r}.23.ln_2.bias"),
        "cond_stage_model.model.text_projection".into(),
        "cond_stage_model.model.logit_scale".into(),
    ] {
        assert!(map.ignored.contains(&ignored), "{ignored}");
        assert!(target(&map, &ignored).is_empty());
    }
    assert_eq!(map.ignored.len(), EXTRAS.len() + 12 + 2);
}

#[test]
fn tiny_models() {
    for family in [LdmFamily::Sd1, LdmFamily::Sd2] {
        let map = check(&tiny(family));
        // SD 1.5's layout, but no shortcut in down block 2's first resnet (64 -> 64).
        assert_eq!(count(&map, "unet."), 684);
        // Likewise no shortcut in encoder block 2 and decoder block 1.
        assert_eq!(count(&map, "vae."), 244);
    }
}

#[test]
fn other_layouts() {
    // Fewer/more blocks, other layers_per_block, attention elsewhere, VAE of 2 and 3 blocks.
    let layouts = [
        (vec![32, 64], 1, vec![false, true], vec![32, 64], 1),
        (
            vec![32, 64, 64],
            3,
            vec![true, true, false],
            vec![32, 64, 64],
            2,
        ),
        (
            vec![32, 64, 128, 128, 128],
            2,
            vec![false, true, true, true, false],
            vec![32, 64, 64],
            3,
        ),
        (vec![32], 2, vec![true], vec![32], 1),
        (
            vec![32, 32, 64, 64],
            1,
            vec![true, true, true, true],
            vec![32, 32, 64, 64],
            2,
        ),
    ];
    for (unet_channels, layers_per_block, cross_attention, vae_channels, vae_layers_per_block) in
        layouts
    {
        for family in [LdmFamily::Sd1, LdmFamily::Sd2] {
            check(&Spec {
                unet_channels: unet_channels.clone(),
                layers_per_block,
                cross_attention: cross_attention.clone(),
                vae_channels: vae_channels.clone(),
                vae_layers_per_block,
                ..tiny(family)
            });
        }
    }
}

#[test]
fn unknown_keys_are_reported() {
    let mut keys = single_file(&sd15());
    let strange = [
        "model.diffusion_model.input_blocks.1.0.in_layers.1.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias",
        "model.diffusion_model.input_blocks.5.0.op.weight",
        "model.diffusion_model.output_blocks.3.1.conv.weight",
        "model.diffusion_model.label_emb.0.0.weight",
        "first_stage_model.decoder.up.7.block.0.conv1.weight",
        "first_stage_model.encoder.mid.block_3.conv1.weight",
        "cond_stage_model.model.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc3.weight",
        "control_model.input_hint_block.0.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "something_else",
    ];
    for key in strange {
        keys.push((key.to_string(), vec![4, 4, 1, 1]));
    }
    let map = map_keys(&keys, LdmFamily::Sd1);
    assert_eq!(map.unknown, strange);
    assert_eq!(count(&map, "unet."), 686);
}

#[test]
fn duplicate_targets_are_unknown() {
    let mut keys = single_file(&sd15());
    // The same tensor under the older name (without `text_model.`).
    keys.push((
        "cond_stage_model.transformer.final_layer_norm.weight".into(),
        vec![768],
    ));
    let map = map_keys(&keys, LdmFamily::Sd1);
    assert_eq!(
        map.unknown,
        ["cond_stage_model.transformer.final_layer_norm.weight"]
    );
}

#[test]
fn older_clip_names_without_text_model() {
    let keys: Keys = vec![
        (
            "cond_stage_model.transformer.embeddings.token_embedding.weight".into(),
            vec![1000, 768],
        ),
        (
            "cond_stage_model.transformer.embeddings.position_ids".into(),
            vec![1, 77],
        ),
    ];
    let map = map_keys(&keys, LdmFamily::Sd1);
    assert_eq!(
        map.mapped[0].target,
        "text_encoder.text_model.embeddings.token_embedding.weight"
    );
    assert_eq!(
        map.ignored,
        ["cond_stage_model.transformer.embeddings.position_ids"]
    );
}

#[test]
fn text_keys_of_the_other_family_are_unknown() {
    let keys = single_file(&sd21());
    let map = map_keys(&keys, LdmFamily::Sd1);
    let text = keys
        .iter()
        .filter(|(k, _)| k.starts_with("cond_stage_model."))
        .count();
    assert_eq!(map.unknown.len(), text);
    assert_eq!(count(&map, "text_encoder."), 0);
}

#[test]
fn linear_vae_attention_is_copied() {
    let keys: Keys = vec![
        (
            "first_stage_model.encoder.mid.attn_1.k.weight".into(),
            vec![512, 512],
        ),
        (
            "first_stage_model.encoder.mid.attn_1.proj_out.weight".into(),
            vec![512, 512, 1],
        ),
    ];
    let map = map_keys(&keys, LdmFamily::Sd1);
    assert_eq!(map.mapped[0].transform, Transform::Copy);
    assert_eq!(map.mapped[1].transform, Transform::Squeeze);
    assert_eq!(map.mapped[1].transform.apply_shape(&keys[1].1), [512, 512]);
}

#[test]
fn detects_the_family() {
    assert_eq!(detect_family(&single_file(&sd15())), Some(LdmFamily::Sd1));
    assert_eq!(detect_family(&single_file(&sd21())), Some(LdmFamily::Sd2));
    let unet_only: Keys = vec![(
        "model.diffusion_model.out.2.weight".into(),
        vec![4, 320, 3, 3],
    )];
    assert_eq!(detect_family(&unet_only), None);
}

#[test]
fn transforms() {
    let chunk = Transform::Chunk { index: 1, count: 3 };
    assert_eq!(chunk.apply_shape(&[3072, 1024]), [1024, 1024]);
    assert_eq!(chunk.apply_shape(&[3072]), [1024]);
    assert_eq!(chunk.element_range(&[6, 2]), 4..8);
    let data: Vec<u32> = (0..12).collect();
    assert_eq!(chunk.apply_data(&data, &[6, 2]), [4, 5, 6, 7]);
    assert_eq!(
        Transform::Squeeze.apply_shape(&[512, 512, 1, 1]),
        [512, 512]
    );
    assert_eq!(Transform::Squeeze.apply_shape(&[1, 1, 1, 1]), [1, 1]);
    assert_eq!(Transform::Squeeze.element_range(&[4, 4, 1, 1]), 0..16);
    assert_eq!(Transform::Copy.apply_shape(&[320, 4, 3, 3]), [320, 4, 3, 3]);
}

/// Names and shapes from a safetensors file's header.
fn header(path: &std::path::Path) -> Option<Keys> {
    let bytes = std::fs::read(path).ok()?;
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let keys = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, info)| {
            let shape = info["shape"].as_array().unwrap();
            (
                name.clone(),
                shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .collect();
    Some(keys)
}

/// The tiny single files against their diffusers folders: the targets are exactly the
/// folder's tensors, with the same shapes.
#[test]
fn tiny_fixture_files() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd");
    for (name, family) in [("tiny-sd1", LdmFamily::Sd1), ("tiny-sd2", LdmFamily::Sd2)] {
        let keys = header(&root.join(format!("{name}.safetensors")))
            .unwrap_or_else(|| panic!("tests/fixtures/sd/{name}.safetensors is missing"));
        assert_eq!(detect_family(&keys), Some(family));
        let map = map_keys(&keys, family);
        assert!(map.unknown.is_empty(), "{name}: unknown {:?}", map.unknown);
        let shapes: BTreeMap<&str, &[usize]> = keys
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let targets: BTreeMap<String, Vec<usize>> = map
            .mapped
            .iter()
            .map(|m| {
                (
                    m.target.clone(),
                    m.transform.apply_shape(shapes[m.source.as_str()]),
                )
            })
            .collect();
        assert_eq!(targets.len(), map.mapped.len(), "{name}: duplicate targets");
        let mut expected = BTreeMap::new();
        for (component, file) in [
            ("unet", "unet/diffusion_pytorch_model.safetensors"),
            ("vae", "vae/diffusion_pytorch_model.safetensors"),
            ("text_encoder", "text_encoder/model.safetensors"),
        ] {
            let keys = header(&root.join(name).join(file)).expect("diffusers folder");
            expected.extend(
                keys.into_iter()
                    .map(|(k, v)| (format!("{component}.{k}"), v)),
            );
        }
        assert_eq!(targets, expected, "{name}");
    }
}
