//! The browser app: a leptos UI on the main thread and all model work in a dedicated Web
//! Worker, talking through the typed messages of [`protocol`].

pub mod protocol;
mod ui;
pub mod worker;

pub use ui::mount;
