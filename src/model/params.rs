//! The parameters of one column: its half of every layer's kernels, as a unit that can live in
//! its own process.
//!
//! Column `c` of a layer is row block `c` of the whole layer's weight (`[out, ...]`), so the
//! unsplit PyTorch-style tensors and the columns' halves convert by slicing rows. Initial values
//! are drawn from the counter-based generator at each element's *unsplit* index: a column
//! initialised alone equals its half of a network initialised whole.

use super::config::{NetConfig, Sides, COLUMNS, CONV_KERNEL};
use crate::backend::Backend;
use crate::rng;

/// The layers that have parameters, in order.
pub const LAYERS: [&str; 8] = [
    "conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8",
];

/// The layers a flag names: comma-separated layer names or ranges (`fc8`, `fc7,fc8`,
/// `conv1..conv5`: both ends included), in [`LAYERS`] order, each once.
pub fn parse_layers(spec: &str) -> Result<Vec<String>, String> {
    let position = |name: &str| {
        LAYERS
            .iter()
            .position(|l| *l == name.trim())
            .ok_or_else(|| {
                format!(
                    "`{}` is not a layer: the layers are {} (ranges like conv1..conv5)",
                    name.trim(),
                    LAYERS.join(", ")
                )
            })
    };
    let mut chosen = [false; LAYERS.len()];
    for part in spec.split(',').filter(|p| !p.trim().is_empty()) {
        let (from, to) = match part.split_once("..") {
            Some((a, b)) => (position(a)?, position(b)?),
            None => (position(part)?, position(part)?),
        };
        if from > to {
            return Err(format!(
                "`{part}` runs backwards: write {}..{}",
                LAYERS[to], LAYERS[from]
            ));
        }
        chosen[from..=to].iter_mut().for_each(|c| *c = true);
    }
    if !chosen.contains(&true) {
        return Err("names no layer: e.g. fc8, or conv1..conv5".into());
    }
    Ok(LAYERS
        .iter()
        .zip(chosen)
        .filter(|(_, c)| *c)
        .map(|(l, _)| l.to_string())
        .collect())
}

/// One parameter tensor of a column: value, gradient of the last backward pass, momentum.
pub struct Param<B: Backend> {
    /// `conv1.weight`, `fc8.bias`, ...
    pub name: String,
    /// This column's shape (rows are half the layer's).
    pub shape: Vec<usize>,
    pub value: B::Buf,
    pub grad: B::Buf,
    pub momentum: B::Buf,
}

impl<B: Backend> Param<B> {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One column of the network: its half of every layer's parameters, in [`LAYERS`] order,
/// weight then bias (the order checkpoints and exports keep).
pub struct Column<B: Backend> {
    pub index: usize,
    pub params: Vec<Param<B>>,
}

impl<B: Backend> Column<B> {
    /// The parameter named `name` (`conv3.weight`, `fc8.bias`, ...).
    pub fn param(&self, name: &str) -> Option<&Param<B>> {
        self.params.iter().find(|p| p.name == name)
    }

    /// Position of `layer`'s weight; its bias follows.
    fn weight_at(&self, layer: &str) -> usize {
        let at = (self.params.iter())
            .position(|p| p.name.strip_suffix(".weight") == Some(layer))
            .unwrap_or_else(|| panic!("a column has no layer {layer}"));
        debug_assert_eq!(self.params[at + 1].name, format!("{layer}.bias"));
        at
    }

    /// `layer`'s weight and bias.
    pub fn weight_and_bias(&self, layer: &str) -> (&Param<B>, &Param<B>) {
        let at = self.weight_at(layer);
        (&self.params[at], &self.params[at + 1])
    }

    /// `layer`'s weight and bias, to write their gradients.
    pub fn weight_and_bias_mut(&mut self, layer: &str) -> (&mut Param<B>, &mut Param<B>) {
        let at = self.weight_at(layer);
        let (w, rest) = self.params[at..].split_at_mut(1);
        (&mut w[0], &mut rest[0])
    }
}

/// Shapes of one column's weight and bias for each layer in [`LAYERS`] order.
pub fn column_shapes(cfg: &NetConfig, sides: &Sides) -> Vec<(Vec<usize>, Vec<usize>)> {
    let half = |n: usize| n / COLUMNS;
    let c = cfg.conv_channels;
    // Which input channels each conv reads: its own column's half, or both columns ("both").
    let conv_in = [cfg.in_channels, half(c[0]), c[1], half(c[2]), half(c[3])];
    let mut shapes = Vec::new();
    for i in 0..5 {
        let k = CONV_KERNEL[i];
        shapes.push((vec![half(c[i]), conv_in[i], k, k], vec![half(c[i])]));
    }
    let [f6, f7] = cfg.fc_widths;
    shapes.push((vec![half(f6), cfg.fc6_inputs(sides)], vec![half(f6)]));
    shapes.push((vec![half(f7), f6], vec![half(f7)]));
    shapes.push((vec![half(cfg.classes), f7], vec![half(cfg.classes)]));
    shapes
}

/// The paper's bias initialisation: 1 for conv2, conv4, conv5, fc6, fc7 (so that the ReLUs
/// start with positive inputs), 0 for conv1, conv3 and fc8.
pub fn bias_init(layer: &str) -> f32 {
    match layer {
        "conv2" | "conv4" | "conv5" | "fc6" | "fc7" => 1.0,
        _ => 0.0,
    }
}

/// Parameters of one column, initialised as in the paper from `seed`.
pub fn init_column<B: Backend>(
    backend: &B,
    cfg: &NetConfig,
    sides: &Sides,
    column: usize,
    seed: u64,
) -> Vec<Param<B>> {
    let mut params = Vec::with_capacity(16);
    for (layer, (wshape, bshape)) in LAYERS.iter().zip(column_shapes(cfg, sides)) {
        let wlen: usize = wshape.iter().product();
        let key = rng::key(seed, &format!("{layer}.weight"));
        let first = (column * wlen) as u64;
        let w: Vec<f32> = (0..wlen as u64)
            .map(|i| cfg.init_std * rng::normal(key, first + i))
            .collect();
        let b = vec![bias_init(layer); bshape[0]];
        params.push(new_param(backend, format!("{layer}.weight"), wshape, &w));
        params.push(new_param(backend, format!("{layer}.bias"), bshape, &b));
    }
    params
}

pub fn new_param<B: Backend>(
    backend: &B,
    name: String,
    shape: Vec<usize>,
    value: &[f32],
) -> Param<B> {
    let len = value.len();
    debug_assert_eq!(len, shape.iter().product::<usize>());
    Param {
        name,
        shape,
        value: backend.upload(value),
        grad: backend.zeros(len),
        momentum: backend.zeros(len),
    }
}

/// Column `column`'s rows of an unsplit tensor with `rows` rows.
pub fn column_rows(unsplit: &[f32], rows: usize, column: usize) -> &[f32] {
    let per_row = unsplit.len() / rows;
    let half = rows / COLUMNS;
    &unsplit[column * half * per_row..(column + 1) * half * per_row]
}

/// Total parameters of the network (both columns).
pub fn parameter_count(cfg: &NetConfig, sides: &Sides) -> usize {
    column_shapes(cfg, sides)
        .iter()
        .map(|(w, b)| w.iter().product::<usize>() + b[0])
        .sum::<usize>()
        * COLUMNS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn layer_lists_and_ranges_are_read_and_mistakes_named() {
        assert_eq!(parse_layers("fc8").unwrap(), ["fc8"]);
        assert_eq!(
            parse_layers("conv1..conv3,fc8").unwrap(),
            ["conv1", "conv2", "conv3", "fc8"]
        );
        assert_eq!(parse_layers("fc8, fc7").unwrap(), ["fc7", "fc8"]);
        let e = parse_layers("fc9").unwrap_err();
        assert!(
            e.contains("`fc9` is not a layer") && e.contains("conv1, conv2"),
            "{e}"
        );
        let e = parse_layers("conv5..conv1").unwrap_err();
        assert!(e.contains("write conv1..conv5"), "{e}");
        assert!(parse_layers("").is_err());
    }

    #[test]
    fn paper_parameter_count() {
        let cfg = NetConfig::default();
        let sides = cfg.validate().unwrap();
        assert_eq!(parameter_count(&cfg, &sides), 60_965_224);
    }

    #[test]
    fn columns_initialised_apart_equal_the_halves_of_one_draw() {
        let cfg = NetConfig::narrow(63, [4, 4, 4, 4, 4], [4, 4], 4);
        let sides = cfg.validate().unwrap();
        let cpu = Cpu::new();
        let c0 = init_column(&cpu, &cfg, &sides, 0, 9);
        let c1 = init_column(&cpu, &cfg, &sides, 1, 9);
        let key = rng::key(9, "conv3.weight");
        let whole: Vec<f32> = (0..2 * c0[4].len() as u64)
            .map(|i| cfg.init_std * rng::normal(key, i))
            .collect();
        assert_eq!(column_rows(&whole, 4, 0), &c0[4].value[..]);
        assert_eq!(column_rows(&whole, 4, 1), &c1[4].value[..]);
        assert_eq!(c0[3].value, vec![1.0; 2], "conv2 bias starts at 1");
        assert_eq!(c0[5].value, vec![0.0; 2], "conv3 bias starts at 0");
    }
}
