//! The network's shape as configuration, with the paper's values as defaults.

use crate::backend::LrnParams;
use serde::{Deserialize, Serialize};

/// The two-column network of the paper; widths are the whole layer (both columns together).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetConfig {
    /// Side of the square input crop, in pixels (the paper: 224).
    pub input_size: usize,
    /// Channels of the input image (3 for RGB).
    pub in_channels: usize,
    /// Kernels of conv1..conv5, both columns together (the paper: 96, 256, 384, 384, 256).
    pub conv_channels: [usize; 5],
    /// Units of fc6 and fc7, both columns together (the paper: 4096, 4096).
    pub fc_widths: [usize; 2],
    /// Classes, the width of fc8 (the paper: 1000), split evenly over the columns.
    pub classes: usize,
    /// Local response normalisation after conv1 and conv2.
    pub lrn: LrnParams,
    /// Normalise over the whole layer's channels instead of each column's own (the paper, and
    /// the default, is per column). PyTorch's `LocalResponseNorm` on an unsplit model does this;
    /// it needs both columns in one process, since the columns exchange nothing before conv3.
    pub lrn_across_columns: bool,
    /// Dropout probability on the outputs of fc6 and fc7 while training (the paper: 0.5).
    pub dropout: f32,
    /// Standard deviation of the initial weights (the paper: 0.01).
    pub init_std: f32,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            input_size: 224,
            in_channels: 3,
            conv_channels: [96, 256, 384, 384, 256],
            fc_widths: [4096, 4096],
            classes: 1000,
            lrn: LrnParams::default(),
            lrn_across_columns: false,
            dropout: 0.5,
            init_std: 0.01,
        }
    }
}

/// The paper's fixed kernel sizes, strides and paddings, and the pooling after conv1, conv2, conv5.
pub const CONV_KERNEL: [usize; 5] = [11, 5, 3, 3, 3];
pub const CONV_STRIDE: [usize; 5] = [4, 1, 1, 1, 1];
pub const CONV_PAD: [usize; 5] = [2, 2, 1, 1, 1];
pub const POOL_SIZE: usize = 3;
pub const POOL_STRIDE: usize = 2;
/// Columns of the network: each holds half the kernels of every layer (defined where the
/// columns' exchanges are, which the network sits on).
pub use crate::comm::COLUMNS;

/// Spatial sides of the feature maps that follow from the input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sides {
    pub input: usize,
    pub conv1: usize,
    pub pool1: usize,
    /// conv2 keeps pool1's side (5x5, pad 2).
    pub conv2: usize,
    pub pool2: usize,
    /// conv3, conv4 and conv5 keep pool2's side (3x3, pad 1).
    pub conv3: usize,
    pub pool5: usize,
}

/// A configuration that cannot form a valid network; the message names the field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid network configuration: {field}: {reason}")]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.into(),
        reason: reason.into(),
    }
}

fn conv_side(side: usize, layer: usize) -> Option<usize> {
    let span = side + 2 * CONV_PAD[layer];
    (span >= CONV_KERNEL[layer]).then(|| (span - CONV_KERNEL[layer]) / CONV_STRIDE[layer] + 1)
}

fn pool_side(side: usize) -> Option<usize> {
    (side >= POOL_SIZE).then(|| (side - POOL_SIZE) / POOL_STRIDE + 1)
}

/// The feature-map sides for an input side, or the first stage whose window does not fit.
fn sides_for(input: usize) -> Result<Sides, &'static str> {
    let conv1 = conv_side(input, 0).ok_or("conv1")?;
    let pool1 = pool_side(conv1).ok_or("pool1")?;
    let conv2 = conv_side(pool1, 1).ok_or("conv2")?;
    let pool2 = pool_side(conv2).ok_or("pool2")?;
    let conv3 = conv_side(pool2, 2).ok_or("conv3")?;
    let pool5 = pool_side(conv3).ok_or("pool5")?;
    Ok(Sides {
        input,
        conv1,
        pool1,
        conv2,
        pool2,
        conv3,
        pool5,
    })
}

impl NetConfig {
    /// The narrow network of the default training job (`--net demo`): the paper's topology at
    /// a quarter to a sixteenth of its widths, for 28x28 grey images upscaled to 64.
    pub fn demo() -> NetConfig {
        NetConfig {
            input_size: 64,
            in_channels: 1,
            conv_channels: [32, 64, 96, 96, 64],
            fc_widths: [256, 256],
            classes: 10,
            init_std: 0.03,
            ..NetConfig::default()
        }
    }

    /// The paper's network with other widths, classes and input size (tests use narrow ones).
    pub fn narrow(
        input_size: usize,
        conv_channels: [usize; 5],
        fc_widths: [usize; 2],
        classes: usize,
    ) -> Self {
        NetConfig {
            input_size,
            conv_channels,
            fc_widths,
            classes,
            ..NetConfig::default()
        }
    }

    /// Checks everything that must hold for the two-column network to exist.
    pub fn validate(&self) -> Result<Sides, ConfigError> {
        if self.in_channels == 0 {
            return Err(invalid("in_channels", "must be at least 1"));
        }
        // Bounds far above any real network, so that sizes computed from them cannot overflow.
        let limits = [
            ("in_channels", self.in_channels, 1 << 10),
            ("input_size", self.input_size, 1 << 13),
            ("classes", self.classes, 1 << 20),
        ]
        .into_iter()
        .chain(
            self.conv_channels
                .iter()
                .map(|&c| ("conv_channels", c, 1 << 14)),
        )
        .chain(self.fc_widths.iter().map(|&f| ("fc_widths", f, 1 << 17)));
        for (field, value, max) in limits {
            if value > max {
                return Err(invalid(
                    field,
                    format!("{value} is beyond the supported {max}"),
                ));
            }
        }
        for (i, &c) in self.conv_channels.iter().enumerate() {
            if c == 0 || c % COLUMNS != 0 {
                return Err(invalid(
                    format!("conv_channels[{i}] (conv{})", i + 1),
                    format!("{c} kernels cannot be split into two equal columns: use a positive even number"),
                ));
            }
        }
        for (i, &f) in self.fc_widths.iter().enumerate() {
            if f == 0 || f % COLUMNS != 0 {
                return Err(invalid(
                    format!("fc_widths[{i}] (fc{})", i + 6),
                    format!("{f} units cannot be split into two equal columns: use a positive even number"),
                ));
            }
        }
        if self.classes < 2 || !self.classes.is_multiple_of(COLUMNS) {
            return Err(invalid(
                "classes",
                format!("{} classes cannot be split into two equal halves of fc8: use an even number of at least 2", self.classes),
            ));
        }
        if self.lrn.size == 0 || self.lrn.size.is_multiple_of(2) {
            return Err(invalid(
                "lrn.size",
                format!(
                    "{} must be odd (a window centred on its channel)",
                    self.lrn.size
                ),
            ));
        }
        if !(self.lrn.k > 0.0 && self.lrn.alpha >= 0.0 && self.lrn.beta >= 0.0) {
            return Err(invalid(
                "lrn",
                "k must be positive, alpha and beta non-negative",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid(
                "dropout",
                format!("{} is not a probability in [0, 1)", self.dropout),
            ));
        }
        if !(self.init_std.is_finite() && self.init_std >= 0.0) {
            return Err(invalid(
                "init_std",
                format!("{} must be finite and non-negative", self.init_std),
            ));
        }
        sides_for(self.input_size).map_err(|stage| {
            let smallest = (1..4096).find(|&s| sides_for(s).is_ok()).unwrap_or(0);
            invalid(
                "input_size",
                format!(
                    "{} pixels is too small: the maps reaching {stage} are smaller than its window; the smallest input is \
                     {smallest}",
                    self.input_size
                ),
            )
        })
    }

    /// Inputs of fc6: pool5 flattened, both columns.
    pub fn fc6_inputs(&self, sides: &Sides) -> usize {
        self.conv_channels[4] * sides.pool5 * sides.pool5
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_sides() {
        let s = NetConfig::default().validate().unwrap();
        assert_eq!(
            (s.conv1, s.pool1, s.conv2, s.pool2, s.conv3, s.pool5),
            (55, 27, 27, 13, 13, 6)
        );
    }

    #[test]
    fn odd_widths_are_refused_by_name() {
        let mut c = NetConfig::default();
        c.conv_channels[1] = 255;
        assert_eq!(c.validate().unwrap_err().field, "conv_channels[1] (conv2)");
        let mut c = NetConfig::default();
        c.fc_widths[1] = 4095;
        assert_eq!(c.validate().unwrap_err().field, "fc_widths[1] (fc7)");
        let c = NetConfig {
            classes: 7,
            ..NetConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("classes"));
    }

    #[test]
    fn too_small_inputs_are_refused_by_name() {
        for side in [0, 8, 20, 34, 62] {
            let c = NetConfig {
                input_size: side,
                ..NetConfig::default()
            };
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, "input_size", "side {side}");
            assert!(e.reason.contains("smallest input is 63"), "{e}");
        }
        let e = NetConfig {
            input_size: 40,
            ..NetConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.reason.contains("reaching pool5"), "{e}");
        let e = NetConfig {
            input_size: 6,
            ..NetConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.reason.contains("reaching conv1"), "{e}");
        assert!(NetConfig {
            input_size: 63,
            ..NetConfig::default()
        }
        .validate()
        .is_ok());
    }

    #[test]
    fn absurd_sizes_are_refused_by_name() {
        let e = NetConfig {
            input_size: 100_000,
            ..NetConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "input_size");
        let e = NetConfig {
            fc_widths: [1 << 40, 4096],
            ..NetConfig::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(e.field, "fc_widths");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = serde_json::from_str::<NetConfig>(r#"{"clases": 10}"#).unwrap_err();
        assert!(e.to_string().contains("clases"));
    }
}
