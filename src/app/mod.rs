//! The browser app: a leptos UI on the main thread and all model work in a dedicated Web
//! Worker, talking through the typed messages of `protocol`. [`catalog`], [`fit`] and
//! [`memory`] are plain data and build (and are tested) everywhere.

#[cfg(all(feature = "web", target_family = "wasm"))]
pub mod acquire;
pub mod catalog;
pub mod fit;
pub mod memory;
#[cfg(all(feature = "web", target_family = "wasm"))]
pub mod protocol;
#[cfg(all(feature = "web", target_family = "wasm"))]
pub mod run;
#[cfg(all(feature = "web", target_family = "wasm"))]
mod ui;
pub mod view;
#[cfg(all(feature = "web", target_family = "wasm"))]
pub mod worker;

#[cfg(all(feature = "web", target_family = "wasm"))]
pub use ui::mount;
