//! A GPU that binds little per buffer (WebGPU's default is 128 MiB; phones and some integrated
//! GPUs grant no more, SD 1.5's f32 token table is 145 MiB): the models split what would pass
//! the limit, and give the same outputs. One test, in its own process: the wgpu device and the
//! cap are the process's.
#![cfg(not(target_family = "wasm"))]

use burn::tensor::{DType, Device, Tensor, TensorData};
use sefi::block_on;
use sefi::config::DecodePlan;
use sefi::device::{DeviceChoice, binding_limit, cap_bindings, request_wgpu_binding_limit};
use sefi::nn::VarStore;
use sefi::unet::attention::Attention;
use sefi::weights::Component;

mod common;
use common::{Goldens, assert_close, check_parity, load_model, values};

/// lavapipe's f32 against diffusers, as in `models.rs`.
const TOL_WGPU: f32 = 1e-3;

/// The tiny SD 1.x's token table (49408 x 16 in f32) is 3.0 MiB: four chunks at 1 MiB.
const DEVICE_LIMIT: u64 = 1 << 20;

#[test]
fn a_device_that_binds_one_mebibyte_runs_the_tiny_model() {
    request_wgpu_binding_limit(DEVICE_LIMIT);
    let gpu = block_on(DeviceChoice::Wgpu.open()).expect(
        "no wgpu adapter: install Mesa's Vulkan driver (`apt-get install mesa-vulkan-drivers libvulkan1`) or run ./scripts/setup.sh test",
    );
    let limits = gpu.info.limits.clone().expect("wgpu reports its limits");
    assert_eq!(limits.max_storage_buffer_binding_size, DEVICE_LIMIT);
    assert_eq!(binding_limit(&gpu.device), Some(DEVICE_LIMIT));
    assert_eq!(
        binding_limit(&gpu.device.clone().autodiff()),
        Some(DEVICE_LIMIT)
    );
    assert_eq!(binding_limit(&Device::flex()), None);

    // The limit is real: a buffer over it cannot be made.
    let whole = Tensor::<1>::zeros([(DEVICE_LIMIT as usize / 4) * 2], &gpu.device);
    assert!(
        block_on(whole.into_data_async()).is_err(),
        "a 2 MiB tensor on a device that binds 1 MiB: this test needs the limit enforced"
    );

    // The token table loads in row chunks; every output matches diffusers.
    let (_, sd) = load_model("tiny-sd1", &gpu.device);
    check_parity("tiny-sd1", &sd, &gpu.device, TOL_WGPU);

    // Attention in query chunks: planned as if buffers held 16 KiB, the level-0
    // self-attention's scores (2 x 8 heads x 64 x 64 in f32, 256 KiB) run in 16 chunks, its
    // cross-attention's in 22, the feed-forward's projection (2 x 64 tokens x 256 in f32,
    // 128 KiB) in 8; outputs unchanged.
    cap_bindings(16 << 10);
    assert_eq!(binding_limit(&gpu.device), Some(16 << 10));
    check_parity("tiny-sd1", &sd, &gpu.device, TOL_WGPU);

    // The VAE decoder under the limit: two 96 x 80 images (960 KiB each at its widest) decode
    // one at a time, with the same result; under 512 KiB an image decodes in tiles of the
    // smallest size, 8 latent positions (the tiles' parity with diffusers is `check_parity`'s).
    cap_bindings(u64::MAX);
    let latents: Tensor<4> =
        Goldens::open("sd/tiny-sd1/goldens.safetensors").tensor("vae.tiled_latents", &gpu.device);
    let plan = |images| {
        let limit = binding_limit(&gpu.device);
        sd.vae.config.decode_plan(images, 96, 80, limit)
    };
    assert_eq!(plan(1), DecodePlan::Whole);
    assert_eq!(plan(2), DecodePlan::EachImage);
    let pair = Tensor::cat(vec![latents.clone(), latents.clone() * 0.5], 0);
    let one_by_one = Tensor::cat(
        vec![
            sd.vae.decode(latents.clone()),
            sd.vae.decode(latents.clone() * 0.5),
        ],
        0,
    );
    assert_close(sd.vae.decode(pair), values(one_by_one), 1e-6, "each image");
    cap_bindings(512 << 10);
    assert_eq!(plan(1), DecodePlan::Tiles(8));
    let tiles = values(sd.vae.decode_tiled(latents.clone(), 8));
    assert_close(sd.vae.decode(latents), tiles, 1e-6, "tiles under the limit");

    // On the CPU too, within its own tolerance of diffusers: loaded as if buffers held
    // 256 KiB (the table in 13 chunks; every other tensor is smaller), run as if they held
    // 16 KiB (attention in chunks).
    let cpu = Device::flex();
    cap_bindings(256 << 10);
    let (_, sd) = load_model("tiny-sd1", &cpu);
    cap_bindings(16 << 10);
    check_parity("tiny-sd1", &sd, &cpu, 1e-4);

    // Chunked attention keeps its gradient: the same as one whole op's, on the CPU.
    let device = Device::flex().autodiff();
    let store = VarStore::random(&device, Component::Unet, DType::F32);
    let attn = Attention::new(store.root(), 32, 32, 4, 8, false).unwrap();
    let x = Tensor::<3>::from_data(
        TensorData::new(
            (0..2 * 64 * 32)
                .map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0)
                .collect(),
            [2, 64, 32],
        ),
        &device,
    );
    let run = |cap: u64| {
        cap_bindings(cap);
        let x = x.clone().require_grad();
        let y = attn.forward(x.clone(), None, None);
        let grads = (y.clone() * y.clone()).sum().backward();
        let g = x.grad(&grads).unwrap();
        (
            y.into_data().try_to_vec::<f32>().unwrap(),
            g.into_data().try_to_vec::<f32>().unwrap(),
        )
    };
    // Scores of 2 x 4 heads x 64 x 64: 128 KiB whole, 2 KiB a query.
    let (y_whole, g_whole) = run(u64::MAX);
    let (y_chunked, g_chunked) = run(8 << 10);
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(max_diff(&y_whole, &y_chunked) < 1e-6);
    let scale = g_whole.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(max_diff(&g_whole, &g_chunked) < 1e-5 * scale, "{scale}");
}
