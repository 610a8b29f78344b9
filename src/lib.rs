//! SeFi Studio: private, on-device identity personalisation of Stable Diffusion.
//!
//! The core (everything but `app` and `cli`) holds no UI code: it reports through return
//! values and callbacks, and every read of a tensor back from the GPU is `async`, because a
//! synchronous read panics on WebGPU. Native code drives the same futures with
//! `block_on` (native targets only).

#![warn(missing_docs)]

#[cfg(all(
    feature = "compute",
    not(any(feature = "cpu", feature = "wgpu", feature = "cuda"))
))]
compile_error!("enable a backend feature: `cpu`, `wgpu` or `cuda`");
#[cfg(all(feature = "cli", not(feature = "compute")))]
compile_error!("the `sefi` command line needs a backend: enable `cpu`, `wgpu` or `cuda`");

pub mod check;
pub mod clip;
pub mod config;
pub mod device;
pub mod face;
pub mod identity;
#[cfg(feature = "compute")]
pub mod nn;
pub mod pipeline;
pub mod rgb;
pub mod schedule;
#[cfg(feature = "compute")]
pub mod sd;
#[cfg(all(feature = "web", target_family = "wasm"))]
pub mod store;
#[cfg(feature = "compute")]
pub mod unet;
#[cfg(feature = "compute")]
pub mod vae;
pub mod weights;

pub mod app;
#[cfg(feature = "cli")]
pub mod cli;

/// Drives one of the crate's futures to completion on native targets.
#[cfg(not(target_family = "wasm"))]
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    futures::executor::block_on(future)
}
