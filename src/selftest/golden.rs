//! PyTorch's reference outputs for every op (`tests/golden/`, computed in float64 by PyTorch
//! and stored as f32), compiled into the binary so that `alexnet selftest` can judge a backend
//! against them on a machine that has only the binary (a GPU machine with no source tree).
//! The op tests (`tests/ops.rs`) judge every backend with the same functions, reading the
//! files from the tree.
//!
//! The error of a golden check is `‖tested − reference‖₂ / ‖reference‖₂` over the whole
//! output.

use super::Check;
use crate::backend::{Backend, ConvGeom, LinearGeom, LrnParams, PlaneGeom, PoolGeom, SgdParams};
use safetensors::SafeTensors;
use std::collections::HashMap;

macro_rules! op_file {
    ($name:literal) => {
        (
            $name,
            include_bytes!(concat!("../../tests/golden/", $name)).as_slice(),
        )
    };
}

/// The op files, as compiled in: the narrow network's file (`mini_alexnet`) is not among
/// them, since the network is judged against the CPU in `selftest`.
pub const OP_FILES: [(&str, &[u8]); 9] = [
    op_file!("conv_11x11_s4_p2.safetensors"),
    op_file!("conv_3x3_p1.safetensors"),
    op_file!("conv_5x5_p2_groups2.safetensors"),
    op_file!("linear.safetensors"),
    op_file!("lrn_paper.safetensors"),
    op_file!("lrn_strong.safetensors"),
    op_file!("maxpool_3_s2.safetensors"),
    op_file!("softmax_xent.safetensors"),
    op_file!("sgd_paper.safetensors"),
];

/// A golden file: tensors by name (shape, f32 values) and its metadata (the op's settings).
pub struct Golden {
    pub name: String,
    pub tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub meta: HashMap<String, String>,
}

impl Golden {
    /// Reads a safetensors file of f32 tensors.
    pub fn parse(name: &str, bytes: &[u8]) -> anyhow::Result<Golden> {
        let bad = |e: safetensors::SafeTensorError| anyhow::anyhow!("golden file {name}: {e}");
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
        let meta = header.metadata().clone().unwrap_or_default();
        let st = SafeTensors::deserialize(bytes).map_err(bad)?;
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(k, v)| {
                anyhow::ensure!(
                    v.dtype() == safetensors::Dtype::F32,
                    "golden file {name}: tensor {k} is {:?}, not F32",
                    v.dtype()
                );
                let data = v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok((k, (v.shape().to_vec(), data)))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Golden {
            name: name.to_string(),
            tensors,
            meta,
        })
    }

    /// A tensor's values. The files are fixed data: a missing tensor is a defect, not input.
    pub fn get(&self, tensor: &str) -> &[f32] {
        &self.entry(tensor).1
    }

    pub fn shape(&self, tensor: &str) -> &[usize] {
        &self.entry(tensor).0
    }

    fn entry(&self, tensor: &str) -> &(Vec<usize>, Vec<f32>) {
        self.tensors
            .get(tensor)
            .unwrap_or_else(|| panic!("golden file {}: no tensor {tensor}", self.name))
    }

    /// A setting from the metadata (stored as JSON scalars, possibly quoted).
    pub fn meta<T: std::str::FromStr>(&self, key: &str) -> T
    where
        T::Err: std::fmt::Debug,
    {
        let raw = self
            .meta
            .get(key)
            .unwrap_or_else(|| panic!("golden file {}: no metadata {key}", self.name));
        raw.trim_matches('"')
            .parse()
            .unwrap_or_else(|e| panic!("golden file {}: metadata {key} = {raw}: {e:?}", self.name))
    }

    /// The convolution the file was computed for, from its tensors' shapes and metadata.
    pub fn conv_geom(&self) -> ConvGeom {
        let (xs, ws) = (self.shape("x"), self.shape("w"));
        ConvGeom {
            batch: xs[0],
            in_c: xs[1],
            in_h: xs[2],
            in_w: xs[3],
            out_c: ws[0],
            kernel: ws[2],
            stride: self.meta("stride"),
            pad: self.meta("pad"),
            groups: self.meta("groups"),
        }
    }

    /// The fully connected layer the file was computed for.
    pub fn linear_geom(&self) -> LinearGeom {
        LinearGeom {
            rows: self.shape("x")[0],
            inp: self.shape("x")[1],
            out: self.shape("w")[0],
        }
    }
}

/// `‖got − want‖₂ / ‖want‖₂`; infinite where the lengths differ or a value is NaN.
pub fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    if got.len() != want.len() {
        return f64::INFINITY;
    }
    let diff: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let e = (diff / norm.max(1e-30)).sqrt();
    if e.is_nan() {
        f64::INFINITY
    } else {
        e
    }
}

/// Every compiled-in op file judged on `b`.
pub fn ops<B: Backend>(b: &B, tolerance: f64) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    for (name, bytes) in OP_FILES {
        checks.extend(check(b, &Golden::parse(name, bytes)?, tolerance));
    }
    Ok(checks)
}

/// The op a golden file was computed for (named by the file), run on `b` from the file's
/// inputs, every output compared with PyTorch's.
pub fn check<B: Backend>(b: &B, g: &Golden, tolerance: f64) -> Vec<Check> {
    let mut c = Compare {
        g,
        tolerance,
        checks: Vec::new(),
    };
    let op = g.name.split(['_', '.']).next().unwrap_or_default();
    match op {
        "conv" => conv(b, &mut c),
        "linear" => linear(b, &mut c),
        "lrn" => lrn(b, &mut c),
        "maxpool" => maxpool(b, &mut c),
        "softmax" => softmax(b, &mut c),
        "sgd" => sgd(b, &mut c),
        _ => c.fail("the op it was computed for (no op of that name)"),
    }
    c.checks
}

struct Compare<'a> {
    g: &'a Golden,
    tolerance: f64,
    checks: Vec<Check>,
}

impl Compare<'_> {
    /// `got` against the file's tensor `want`.
    fn values(&mut self, output: &str, got: &[f32], want: &str) {
        let error = rel_err(got, self.g.get(want));
        self.push(output, error);
    }
    fn fail(&mut self, output: &str) {
        self.push(output, f64::INFINITY);
    }
    fn push(&mut self, output: &str, error: f64) {
        let file = self.g.name.trim_end_matches(".safetensors");
        self.checks.push(Check {
            what: format!("golden {file}: {output}"),
            error,
            tolerance: self.tolerance,
        });
    }
}

fn conv<B: Backend>(b: &B, c: &mut Compare) {
    let g = c.g;
    let geom = g.conv_geom();
    if g.shape("y")[2] != geom.out_h() {
        return c.fail("output side (the file's geometry is not the one read from it)");
    }
    let (x, w, bias, dy) = (
        b.upload(g.get("x")),
        b.upload(g.get("w")),
        b.upload(g.get("b")),
        b.upload(g.get("dy")),
    );
    let mut y = b.zeros(geom.out_len());
    b.conv2d_forward(&geom, &x, &w, &bias, &mut y);
    c.values("y", &b.download(&y), "y");
    let (mut dx, mut dw, mut db) = (
        b.zeros(geom.in_len()),
        b.zeros(geom.weight_len()),
        b.zeros(geom.out_c),
    );
    b.conv2d_backward(&geom, &x, &w, &dy, Some(&mut dx), &mut dw, &mut db);
    c.values("dx", &b.download(&dx), "dx");
    c.values("dw", &b.download(&dw), "dw");
    c.values("db", &b.download(&db), "db");
}

fn linear<B: Backend>(b: &B, c: &mut Compare) {
    let g = c.g;
    let geom = g.linear_geom();
    let (x, w, bias, dy) = (
        b.upload(g.get("x")),
        b.upload(g.get("w")),
        b.upload(g.get("b")),
        b.upload(g.get("dy")),
    );
    let mut y = b.zeros(geom.rows * geom.out);
    b.linear_forward(&geom, &x, &w, &bias, &mut y);
    c.values("y", &b.download(&y), "y");
    let (mut dx, mut dw, mut db) = (
        b.zeros(geom.rows * geom.inp),
        b.zeros(geom.out * geom.inp),
        b.zeros(geom.out),
    );
    b.linear_backward(&geom, &x, &w, &dy, Some(&mut dx), &mut dw, &mut db);
    c.values("dx", &b.download(&dx), "dx");
    c.values("dw", &b.download(&dw), "dw");
    c.values("db", &b.download(&db), "db");
}

fn lrn<B: Backend>(b: &B, c: &mut Compare) {
    let g = c.g;
    let p = LrnParams {
        size: g.meta("n"),
        alpha: g.meta("alpha"),
        beta: g.meta("beta"),
        k: g.meta("k"),
    };
    let s = g.shape("x");
    let geom = PlaneGeom {
        batch: s[0],
        channels: s[1],
        plane: s[2] * s[3],
    };
    let x = b.upload(g.get("x"));
    let (mut y, mut scale, mut dx) = (
        b.zeros(geom.len()),
        b.zeros(geom.len()),
        b.zeros(geom.len()),
    );
    b.lrn_forward(&geom, &p, &x, &mut y, &mut scale);
    c.values("y", &b.download(&y), "y");
    b.lrn_backward(&geom, &p, &x, &y, &scale, &b.upload(g.get("dy")), &mut dx);
    c.values("dx", &b.download(&dx), "dx");
}

fn maxpool<B: Backend>(b: &B, c: &mut Compare) {
    let g = c.g;
    let s = g.shape("x");
    let geom = PoolGeom {
        batch: s[0],
        channels: s[1],
        in_h: s[2],
        in_w: s[3],
        size: g.meta("size"),
        stride: g.meta("stride"),
    };
    let x = b.upload(g.get("x"));
    let (mut y, mut dx) = (b.zeros(geom.out_len()), b.zeros(geom.in_len()));
    b.maxpool_forward(&geom, &x, &mut y);
    c.values("y", &b.download(&y), "y");
    b.maxpool_backward(&geom, &x, &y, &b.upload(g.get("dy")), &mut dx);
    c.values("dx", &b.download(&dx), "dx");
}

fn softmax<B: Backend>(b: &B, c: &mut Compare) {
    let g = c.g;
    let (rows, classes) = (g.shape("logits")[0], g.shape("logits")[1]);
    let labels: Vec<u32> = g.get("labels").iter().map(|&l| l as u32).collect();
    let mut d = b.zeros(rows * classes);
    let loss = b.softmax_xent(rows, classes, &b.upload(g.get("logits")), &labels, &mut d);
    c.values("loss", &[loss], "loss");
    c.values("dlogits", &b.download(&d), "dlogits");
    // The top-5 classes come from the logits on the host, whichever backend made them.
    let top5: Vec<f32> = crate::backend::cpu::top_k(rows, classes, g.get("logits"), 5)
        .into_iter()
        .flatten()
        .map(|i| i as f32)
        .collect();
    let same = top5.as_slice() == g.get("top5");
    c.push("top-5 classes", if same { 0.0 } else { f64::INFINITY });
}

fn sgd<B: Backend>(b: &B, c: &mut Compare) {
    let g = c.g;
    let p = SgdParams {
        lr: g.meta("lr"),
        momentum: g.meta("momentum"),
        weight_decay: g.meta("weight_decay"),
    };
    let (mut w, mut v) = (b.upload(g.get("w")), b.upload(g.get("v")));
    b.sgd_update(&p, &mut w, &mut v, &b.upload(g.get("grad")));
    c.values("w", &b.download(&w), "w_next");
    c.values("v", &b.download(&v), "v_next");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    /// Every op file in the tree is compiled in, and the network's is the only one left out.
    #[test]
    fn every_op_file_is_compiled_in() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".safetensors") && n != "mini_alexnet.safetensors")
            .collect();
        on_disk.sort();
        let mut compiled: Vec<String> = OP_FILES.iter().map(|(n, _)| n.to_string()).collect();
        compiled.sort();
        assert_eq!(on_disk, compiled);
    }

    #[test]
    fn the_cpu_passes_and_a_wrong_output_fails() {
        let cpu = Cpu::with_threads(1);
        let checks = ops(&cpu, 1e-4).unwrap();
        // conv 3 files x 4 outputs, linear 4, lrn 2 x 2, maxpool 2, softmax 3, sgd 2.
        assert_eq!(checks.len(), 27);
        for c in &checks {
            assert!(c.passed(), "{}: {:e}", c.what, c.error);
        }
        // A reference output off by 1% fails its check, and only that one.
        let (name, bytes) = OP_FILES[0];
        let mut g = Golden::parse(name, bytes).unwrap();
        for v in &mut g.tensors.get_mut("dw").unwrap().1 {
            *v *= 1.01;
        }
        let failed: Vec<String> = check(&cpu, &g, 1e-4)
            .into_iter()
            .filter(|c| !c.passed())
            .map(|c| c.what)
            .collect();
        assert_eq!(failed, ["golden conv_11x11_s4_p2: dw"]);
        // A file of no known op is a failure, not a silent pass.
        g.name = "no_such_op.safetensors".into();
        let unknown = check(&cpu, &g, 1e-4);
        assert!(!unknown.is_empty() && unknown.iter().all(|c| !c.passed()));
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let (_, bytes) = OP_FILES[0];
        let e = Golden::parse("conv.safetensors", &bytes[..bytes.len() / 2])
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("golden file conv.safetensors"),
            "{e:#}"
        );
    }

    #[test]
    fn rel_err_is_infinite_for_nan_or_other_lengths() {
        assert_eq!(rel_err(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_err(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        assert!(rel_err(&[1.0], &[1.0, 2.0]).is_infinite());
        assert!((rel_err(&[1.1], &[1.0]) - 0.1).abs() < 1e-6);
    }
}
