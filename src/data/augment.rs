//! The paper's views of a stored 256x256 image: random 224 crops with horizontal flips and PCA
//! colour noise for training; the centre crop and the ten patches for evaluation.
//!
//! Every random choice is a function of (seed, epoch, sample index), so that the two processes
//! that hold the two columns of one network draw the same views without talking to each other,
//! and a resumed run draws what the uninterrupted run would have.

use crate::rng;

/// Where a view sits in the stored image, and whether it is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    pub x0: usize,
    pub y0: usize,
    pub flip: bool,
}

/// One training view: the crop and the colour shift added to every pixel (0..255 units).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainView {
    pub crop: Crop,
    pub alphas: [f32; 3],
}

/// The key of sample `index`'s random choices in `epoch`.
pub fn sample_key(seed: u64, epoch: u64, index: u64) -> u64 {
    rng::subkey(rng::subkey(rng::key(seed, "augment"), epoch), index)
}

/// The training view of sample `index` in `epoch`: crop corner uniform over the
/// `(side - out + 1)^2` positions, flip with probability 1/2, alphas ~ N(0, 0.1).
pub fn train_view(seed: u64, epoch: u64, index: u64, side: usize, out: usize) -> TrainView {
    let key = sample_key(seed, epoch, index);
    let positions = (side - out + 1) as f32;
    let pick = |i: u64| ((rng::uniform(key, i) * positions) as usize).min(side - out);
    TrainView {
        crop: Crop {
            x0: pick(0),
            y0: pick(1),
            flip: rng::uniform(key, 2) < 0.5,
        },
        alphas: [
            0.1 * rng::normal(key, 3),
            0.1 * rng::normal(key, 4),
            0.1 * rng::normal(key, 5),
        ],
    }
}

/// The centre crop.
pub fn centre(side: usize, out: usize) -> Crop {
    let o = (side - out) / 2;
    Crop {
        x0: o,
        y0: o,
        flip: false,
    }
}

/// The paper's ten test patches: the four corners and the centre, then the same mirrored.
pub fn ten_patches(side: usize, out: usize) -> [Crop; 10] {
    let (e, c) = (side - out, (side - out) / 2);
    let corners = [(0, 0), (e, 0), (0, e), (e, e), (c, c)];
    std::array::from_fn(|i| {
        let (x0, y0) = corners[i % 5];
        Crop {
            x0,
            y0,
            flip: i >= 5,
        }
    })
}

/// The PCA colour shift `sum_i alpha_i lambda_i p_i` (the paper's formula, with the eigen
/// decomposition of RGB values scaled to [0, 1]), returned in 0..255 units.
pub fn pca_shift(alphas: [f32; 3], eigenvalues: [f64; 3], eigenvectors: [[f64; 3]; 3]) -> [f32; 3] {
    let mut shift = [0.0f64; 3];
    for i in 0..3 {
        for (c, s) in shift.iter_mut().enumerate() {
            *s += alphas[i] as f64 * eigenvalues[i] * eigenvectors[i][c];
        }
    }
    shift.map(|s| (255.0 * s) as f32)
}

/// Writes one view of a planar `[3, side, side]` image into `out` (`[3, out_side, out_side]`,
/// f32): `image - mean + shift`, cropped at `crop` and mirrored if asked.
pub fn render(
    image: &[u8],
    mean: &[f32],
    side: usize,
    crop: Crop,
    shift: [f32; 3],
    out_side: usize,
    out: &mut [f32],
) {
    let plane = side * side;
    let out_plane = out_side * out_side;
    assert_eq!(image.len(), 3 * plane, "image size");
    assert_eq!(out.len(), 3 * out_plane, "view size");
    assert!(
        crop.x0 + out_side <= side && crop.y0 + out_side <= side,
        "crop outside the image"
    );
    for c in 0..3 {
        for y in 0..out_side {
            let row = (crop.y0 + y) * side + crop.x0 + c * plane;
            let dst = &mut out[c * out_plane + y * out_side..][..out_side];
            finish_row(
                &image[row..][..out_side],
                &mean[row..][..out_side],
                shift[c],
                crop.flip,
                dst,
            );
        }
    }
}

/// One row of a view: `src - mean + shift`, written mirrored if asked. The one place the
/// views' arithmetic is written on the CPU (`kernels/augment.cu` does the same).
fn finish_row(src: &[u8], mean: &[f32], shift: f32, flip: bool, dst: &mut [f32]) {
    if flip {
        for ((d, &v), &m) in dst.iter_mut().rev().zip(src).zip(mean) {
            *d = v as f32 - m + shift;
        }
    } else {
        for ((d, &v), &m) in dst.iter_mut().zip(src).zip(mean) {
            *d = v as f32 - m + shift;
        }
    }
}

/// Views still in bytes: each view's pixels cut from its stored image as stored (not yet
/// mirrored), with what finishing them takes (mirror, mean subtraction, colour shift). A GPU
/// finishes them itself (the backends' `finish_views`), so that the host ships a
/// quarter of the bytes of float views and leaves the arithmetic to the device.
#[derive(Clone, Debug)]
pub struct ByteViews {
    /// Side of the stored images.
    pub side: usize,
    /// Side of the views.
    pub out_side: usize,
    /// `[views, 3, out_side, out_side]`: view `v` is `cut(image, crop[v])`.
    pub pixels: Vec<u8>,
    pub crops: Vec<Crop>,
    /// Colour shift of each view (0..255 units).
    pub shifts: Vec<[f32; 3]>,
    /// The stored images' mean, `[3, side, side]` (shared by every batch of a dataset).
    pub mean: std::sync::Arc<[f32]>,
}

impl ByteViews {
    pub fn views(&self) -> usize {
        self.crops.len()
    }

    /// Values in one view.
    pub fn view_len(&self) -> usize {
        3 * self.out_side * self.out_side
    }

    /// Refuses views whose parts disagree (the device reads them unchecked).
    pub fn check(&self) -> anyhow::Result<()> {
        let (side, out) = (self.side, self.out_side);
        anyhow::ensure!(
            self.pixels.len() == self.views() * self.view_len()
                && self.shifts.len() == self.views(),
            "{} bytes and {} colour shifts for {} views of side {out}",
            self.pixels.len(),
            self.shifts.len(),
            self.views()
        );
        anyhow::ensure!(
            self.mean.len() == 3 * side * side,
            "a mean image of {} values for images of side {side}",
            self.mean.len()
        );
        if let Some(c) = self
            .crops
            .iter()
            .find(|c| c.x0 + out > side || c.y0 + out > side)
        {
            anyhow::bail!("the crop {c:?} of side {out} leaves the {side}-pixel image");
        }
        Ok(())
    }

    /// The float views, finished here: what [`render`] makes of the same images.
    pub fn finish(&self) -> anyhow::Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.views() * self.view_len()];
        self.finish_with(&self.mean, &mut out)?;
        Ok(out)
    }

    /// [`Self::finish`] with `mean` (a copy of `self.mean`) into `out` (`[views, 3, out_side,
    /// out_side]`), a view per rayon task.
    pub fn finish_with(&self, mean: &[f32], out: &mut [f32]) -> anyhow::Result<()> {
        use rayon::prelude::*;
        self.check()?;
        let per = self.view_len();
        anyhow::ensure!(
            mean.len() == self.mean.len() && out.len() == self.views() * per,
            "finishing {} views: a mean of {} values, room for {}",
            self.views(),
            mean.len(),
            out.len()
        );
        out.par_chunks_mut(per)
            .zip(self.pixels.par_chunks(per))
            .zip(self.crops.par_iter().zip(&self.shifts))
            .for_each(|((dst, cut), (&crop, &shift))| {
                finish(cut, mean, self.side, crop, shift, self.out_side, dst)
            });
        Ok(())
    }
}

/// Copies the `out_side` square at `crop` of a planar `[3, side, side]` image into `dst`
/// (`[3, out_side, out_side]` bytes), as stored: the mirror is left to [`finish`].
pub fn cut(image: &[u8], side: usize, crop: Crop, out_side: usize, dst: &mut [u8]) {
    let plane = side * side;
    assert_eq!(image.len(), 3 * plane, "image size");
    assert_eq!(dst.len(), 3 * out_side * out_side, "cut size");
    for (r, row) in dst.chunks_mut(out_side).enumerate() {
        let (c, y) = (r / out_side, r % out_side);
        let at = c * plane + (crop.y0 + y) * side + crop.x0;
        row.copy_from_slice(&image[at..at + out_side]);
    }
}

/// Finishes one view [`cut`] at `crop`: mirrored if asked, minus the mean at the crop, plus
/// the colour shift; the same arithmetic as [`render`], so the same bits.
pub fn finish(
    cut: &[u8],
    mean: &[f32],
    side: usize,
    crop: Crop,
    shift: [f32; 3],
    out_side: usize,
    out: &mut [f32],
) {
    let (plane, out_plane) = (side * side, out_side * out_side);
    assert_eq!(cut.len(), 3 * out_plane, "cut size");
    assert_eq!(out.len(), 3 * out_plane, "view size");
    for c in 0..3 {
        for y in 0..out_side {
            let src = &cut[c * out_plane + y * out_side..][..out_side];
            let m = &mean[c * plane + (crop.y0 + y) * side + crop.x0..][..out_side];
            let dst = &mut out[c * out_plane + y * out_side..][..out_side];
            finish_row(src, m, shift[c], crop.flip, dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_then_finish_is_render_bit_for_bit() {
        let (side, out) = (11, 7);
        let image: Vec<u8> = (0..3 * side * side)
            .map(|i| (rng::mix64(i as u64) & 0xff) as u8)
            .collect();
        let mean: Vec<f32> = (0..3 * side * side)
            .map(|i| 100.0 + 30.0 * rng::normal(9, i as u64))
            .collect();
        for (i, (x0, y0, flip)) in [(0, 0, false), (4, 1, true), (2, 4, false), (4, 4, true)]
            .into_iter()
            .enumerate()
        {
            let crop = Crop { x0, y0, flip };
            let shift = [0.3 * i as f32, -1.7, 2.25];
            let mut want = vec![0.0f32; 3 * out * out];
            render(&image, &mean, side, crop, shift, out, &mut want);
            let mut bytes = vec![0u8; 3 * out * out];
            cut(&image, side, crop, out, &mut bytes);
            let mut got = vec![1.0f32; 3 * out * out];
            finish(&bytes, &mean, side, crop, shift, out, &mut got);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "crop {crop:?}");
        }
    }

    #[test]
    fn byte_views_with_parts_that_disagree_are_refused() {
        let views = ByteViews {
            side: 8,
            out_side: 4,
            pixels: vec![0; 2 * 48],
            crops: vec![
                Crop {
                    x0: 0,
                    y0: 0,
                    flip: false
                };
                2
            ],
            shifts: vec![[0.0; 3]; 2],
            mean: vec![0.0; 3 * 64].into(),
        };
        views.check().unwrap();
        let short = ByteViews {
            pixels: vec![0; 48],
            ..views.clone()
        };
        assert!(format!("{}", short.check().unwrap_err()).contains("48 bytes"));
        let outside = ByteViews {
            crops: vec![
                Crop {
                    x0: 5,
                    y0: 0,
                    flip: false
                };
                2
            ],
            ..views.clone()
        };
        assert!(format!("{}", outside.check().unwrap_err()).contains("leaves the 8-pixel image"));
    }

    #[test]
    fn ten_patches_are_the_corners_the_centre_and_their_mirrors() {
        let p = ten_patches(256, 224);
        let corners: Vec<(usize, usize, bool)> = p.iter().map(|c| (c.x0, c.y0, c.flip)).collect();
        assert_eq!(
            corners,
            vec![
                (0, 0, false),
                (32, 0, false),
                (0, 32, false),
                (32, 32, false),
                (16, 16, false),
                (0, 0, true),
                (32, 0, true),
                (0, 32, true),
                (32, 32, true),
                (16, 16, true)
            ]
        );
        assert_eq!(
            centre(256, 224),
            Crop {
                x0: 16,
                y0: 16,
                flip: false
            }
        );
    }

    #[test]
    fn render_crops_mirrors_and_subtracts_by_hand() {
        // A 4x4 image whose value at (c, y, x) is 16c + 4y + x; a mean of 1 everywhere.
        let image: Vec<u8> = (0..48).map(|i| i as u8).collect();
        let mean = vec![1.0f32; 48];
        let mut out = vec![0.0f32; 12];
        render(
            &image,
            &mean,
            4,
            Crop {
                x0: 1,
                y0: 2,
                flip: false,
            },
            [0.0, 0.5, -0.5],
            2,
            &mut out,
        );
        // Channel 0 rows 2..4, columns 1..3: 9 10 / 13 14, minus 1.
        assert_eq!(&out[..4], &[8.0, 9.0, 12.0, 13.0]);
        // Channel 1: 16 more, plus 0.5.
        assert_eq!(&out[4..8], &[24.5, 25.5, 28.5, 29.5]);
        render(
            &image,
            &mean,
            4,
            Crop {
                x0: 1,
                y0: 2,
                flip: true,
            },
            [0.0; 3],
            2,
            &mut out,
        );
        assert_eq!(&out[..4], &[9.0, 8.0, 13.0, 12.0]);
    }

    #[test]
    fn pca_shift_is_the_papers_sum() {
        let values = [0.2, 0.02, 0.002];
        let vectors = [[0.6, 0.6, 0.52915], [0.6, 0.0, -0.8], [0.3, -0.8, 0.5196]];
        let s = pca_shift([1.0, -2.0, 0.5], values, vectors);
        for c in 0..3 {
            let want = 255.0
                * (0.2 * vectors[0][c] - 2.0 * 0.02 * vectors[1][c] + 0.5 * 0.002 * vectors[2][c]);
            assert!((s[c] as f64 - want).abs() < 1e-4, "{c}: {} vs {want}", s[c]);
        }
    }

    #[test]
    fn train_views_are_a_function_of_seed_epoch_and_index() {
        let a = train_view(7, 3, 1000, 256, 224);
        assert_eq!(a, train_view(7, 3, 1000, 256, 224));
        assert_ne!(a, train_view(7, 4, 1000, 256, 224));
        assert_ne!(a, train_view(8, 3, 1000, 256, 224));
        // Over many samples: corners cover 0..=32, flips about half, alphas with sd about 0.1.
        let views: Vec<TrainView> = (0..20_000).map(|i| train_view(1, 0, i, 256, 224)).collect();
        assert_eq!(views.iter().map(|v| v.crop.x0).max(), Some(32));
        assert_eq!(views.iter().map(|v| v.crop.y0).min(), Some(0));
        let flips = views.iter().filter(|v| v.crop.flip).count() as f64 / views.len() as f64;
        assert!((flips - 0.5).abs() < 0.02, "{flips}");
        let var = views
            .iter()
            .map(|v| (v.alphas[1] as f64).powi(2))
            .sum::<f64>()
            / views.len() as f64;
        assert!((var.sqrt() - 0.1).abs() < 0.005, "{}", var.sqrt());
    }
}
