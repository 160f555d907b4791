//! The shape facts of the network that follow from its configuration and a batch size: every
//! op's geometry in one column, the widths the columns exchange, the work of a step.
//!
//! A leaf of the model: the layers, the column exchange's byte counts and the benchmark read
//! it; it reads only the configuration and the backend's geometry types.

use super::config::{
    NetConfig, Sides, COLUMNS, CONV_KERNEL, CONV_PAD, CONV_STRIDE, POOL_SIZE, POOL_STRIDE,
};
use crate::backend::{ConvGeom, LinearGeom, PlaneGeom, PoolGeom};

/// Geometry of every op of one column for a batch size.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geoms {
    pub batch: usize,
    pub conv: [ConvGeom; 5],
    pub lrn: [PlaneGeom; 2],
    pub pool: [PoolGeom; 3],
    pub fc: [LinearGeom; 3],
}

impl Geoms {
    pub fn new(cfg: &NetConfig, s: &Sides, batch: usize) -> Self {
        let h = |n: usize| n / COLUMNS;
        let c = cfg.conv_channels;
        let conv = |i: usize, in_c: usize, side: usize, out_c: usize| ConvGeom {
            batch,
            in_c,
            in_h: side,
            in_w: side,
            out_c,
            kernel: CONV_KERNEL[i],
            stride: CONV_STRIDE[i],
            pad: CONV_PAD[i],
            groups: 1,
        };
        let pool = |channels: usize, side: usize| PoolGeom {
            batch,
            channels,
            in_h: side,
            in_w: side,
            size: POOL_SIZE,
            stride: POOL_STRIDE,
        };
        Geoms {
            batch,
            conv: [
                conv(0, cfg.in_channels, s.input, h(c[0])),
                conv(1, h(c[0]), s.pool1, h(c[1])),
                conv(2, c[1], s.pool2, h(c[2])),
                conv(3, h(c[2]), s.conv3, h(c[3])),
                conv(4, h(c[3]), s.conv3, h(c[4])),
            ],
            lrn: [
                PlaneGeom {
                    batch,
                    channels: h(c[0]),
                    plane: s.conv1 * s.conv1,
                },
                PlaneGeom {
                    batch,
                    channels: h(c[1]),
                    plane: s.conv2 * s.conv2,
                },
            ],
            pool: [
                pool(h(c[0]), s.conv1),
                pool(h(c[1]), s.conv2),
                pool(h(c[4]), s.conv3),
            ],
            fc: [
                LinearGeom {
                    rows: batch,
                    inp: cfg.fc6_inputs(s),
                    out: h(cfg.fc_widths[0]),
                },
                LinearGeom {
                    rows: batch,
                    inp: cfg.fc_widths[0],
                    out: h(cfg.fc_widths[1]),
                },
                LinearGeom {
                    rows: batch,
                    inp: cfg.fc_widths[1],
                    out: h(cfg.classes),
                },
            ],
        }
    }

    /// Per-sample widths of the exchanged tensors (one column's half): pool2, pool5, fc6, fc7, fc8.
    pub fn exchange_widths(&self) -> [usize; 5] {
        let p = |g: &PoolGeom| g.channels * g.out_h() * g.out_w();
        [
            p(&self.pool[1]),
            p(&self.pool[2]),
            self.fc[0].out,
            self.fc[1].out,
            self.fc[2].out,
        ]
    }
}

/// Features per sample that one column contributes at each exchange point (pool2, pool5, fc6,
/// fc7, logits).
pub fn exchange_widths(cfg: &NetConfig) -> anyhow::Result<[usize; 5]> {
    let sides = cfg.validate()?;
    Ok(Geoms::new(cfg, &sides, 1).exchange_widths())
}

/// The largest batch one process runs (larger ones are split over replicas or steps).
pub const MAX_BATCH: usize = 1 << 16;

/// Multiply-adds of one image's forward pass through the whole network (both columns).
pub fn forward_macs_per_image(cfg: &NetConfig) -> anyhow::Result<u64> {
    let g = Geoms::new(cfg, &cfg.validate()?, 1);
    let conv: usize = g.conv.iter().map(|c| c.forward_macs()).sum();
    let fc: usize = g.fc.iter().map(|f| f.inp * f.out).sum();
    Ok((COLUMNS * (conv + fc)) as u64)
}

/// FLOPs of one image's training step: forward, input gradients and weight gradients (3x the
/// forward's multiply-adds, less conv1's input gradient, which nothing needs), 2 FLOPs each.
pub fn train_flops_per_image(cfg: &NetConfig) -> anyhow::Result<u64> {
    let g = Geoms::new(cfg, &cfg.validate()?, 1);
    let conv1 = (COLUMNS * g.conv[0].forward_macs()) as u64;
    Ok(2 * (3 * forward_macs_per_image(cfg)? - conv1))
}

/// The FLOPs of one layer's passes per image, both columns (as [`train_flops_per_image`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerFlops {
    /// As the benchmark's profile names it.
    pub layer: &'static str,
    pub forward: u64,
    /// Input gradient and weight gradient (conv1: the weight gradient only).
    pub backward: u64,
}

/// The layers with multiply-adds, in the order they run forward, each counted as a direct
/// convolution or matrix product (2 FLOPs per multiply-add; biases, ReLU and the like not
/// counted): they sum to [`train_flops_per_image`]. The other layers of a profile (LRN,
/// pooling, the exchange, SGD) count none.
pub fn layer_flops_per_image(cfg: &NetConfig) -> anyhow::Result<Vec<LayerFlops>> {
    const CONV: [&str; 5] = ["conv1", "conv2", "conv3", "conv4", "conv5"];
    const FC: [&str; 3] = ["fc6", "fc7", "fc8"];
    let g = Geoms::new(cfg, &cfg.validate()?, 1);
    let flops = |macs: usize| 2 * (COLUMNS * macs) as u64;
    let conv = g.conv.iter().zip(CONV).enumerate().map(|(i, (c, layer))| {
        let f = flops(c.forward_macs());
        LayerFlops {
            layer,
            forward: f,
            // Nothing needs the image's gradient.
            backward: if i == 0 { f } else { 2 * f },
        }
    });
    let fc = g.fc.iter().zip(FC).map(|(l, layer)| {
        let f = flops(l.inp * l.out);
        LayerFlops {
            layer,
            forward: f,
            backward: 2 * f,
        }
    });
    Ok(conv.chain(fc).collect())
}

/// Bytes one column sends to the other in one training step (forward all-gathers of pool2,
/// pool5, fc6, fc7 and the logits; backward reduce-scatters of all but the logits, whose
/// gradient both columns already hold), from the layer shapes.
pub fn column_bytes_per_step(cfg: &NetConfig, batch: usize) -> anyhow::Result<ColumnBytes> {
    let w = exchange_widths(cfg)?;
    let per = |width: usize| (batch * width * 4) as u64;
    Ok(ColumnBytes {
        forward: w.map(per),
        backward: [per(w[0]), per(w[1]), per(w[2]), per(w[3]), 0],
    })
}

/// Bytes per exchange point (pool2, pool5, fc6, fc7, logits) one column sends per step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnBytes {
    pub forward: [u64; 5],
    pub backward: [u64; 5],
}

impl ColumnBytes {
    pub const POINTS: [&'static str; 5] = ["pool2", "pool5", "fc6", "fc7", "logits"];

    pub fn total(&self) -> u64 {
        self.forward.iter().chain(&self.backward).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layers_flops_sum_to_the_steps() {
        for cfg in [NetConfig::default(), NetConfig::demo()] {
            let layers = layer_flops_per_image(&cfg).unwrap();
            let names: Vec<_> = layers.iter().map(|l| l.layer).collect();
            assert_eq!(
                names,
                ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
            );
            let sum: u64 = layers.iter().map(|l| l.forward + l.backward).sum();
            assert_eq!(sum, train_flops_per_image(&cfg).unwrap());
            let forward: u64 = layers.iter().map(|l| l.forward).sum();
            assert_eq!(forward, 2 * forward_macs_per_image(&cfg).unwrap());
        }
    }

    #[test]
    fn paper_layers_count_the_direct_convolution() {
        let layers = layer_flops_per_image(&NetConfig::default()).unwrap();
        // conv1: 2 columns x 48 maps of 55x55, each output 3x11x11 multiply-adds.
        assert_eq!(layers[0].forward, 2 * 2 * 48 * 55 * 55 * 3 * 11 * 11);
        assert_eq!(layers[0].backward, layers[0].forward);
        // conv3 reads both columns' 128 maps of 13x13 with 3x3 kernels into 192 maps each.
        assert_eq!(layers[2].forward, 2 * 2 * 192 * 13 * 13 * 256 * 3 * 3);
        assert_eq!(layers[2].backward, 2 * layers[2].forward);
        // fc6: 9216 inputs, 2 x 2048 outputs.
        assert_eq!(layers[5].forward, 2 * 9216 * 4096);
    }
}
