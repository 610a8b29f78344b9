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

impl RgbImage {
    /// Channel `c` of the pixel at (`x`, `y`), black (0) outside the image: what samplers that
    /// reach past the edges read there.
    pub fn at_or_black(&self, x: i64, y: i64, c: usize) -> u8 {
        let (w, h) = (self.width as i64, self.height as i64);
        if (0..w).contains(&x) && (0..h).contains(&y) {
            self.data[((y * w + x) * 3) as usize + c]
        } else {
            0
        }
    }
}
