//! The plain RGB image shared by photos, attention heat-maps and generated pictures: no
//! compute backend and no codec, so every layer (and the page) can use it.

/// An RGB image, 8 bits per channel, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes: R, G, B of each pixel, rows top to bottom.
    pub data: Vec<u8>,
}
