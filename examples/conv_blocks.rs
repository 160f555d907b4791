//! Times the CPU convolution (forward, backward with input gradient) at the paper's layer
//! shapes, batch 32 per column.
use alexnet::backend::{Backend, ConvGeom, Cpu};
use std::time::Instant;

fn main() {
    let cpu = Cpu::new();
    let layers = [
        (
            "conv1",
            ConvGeom {
                batch: 32,
                in_c: 3,
                in_h: 224,
                in_w: 224,
                out_c: 48,
                kernel: 11,
                stride: 4,
                pad: 2,
                groups: 1,
            },
        ),
        (
            "conv2",
            ConvGeom {
                batch: 32,
                in_c: 48,
                in_h: 27,
                in_w: 27,
                out_c: 128,
                kernel: 5,
                stride: 1,
                pad: 2,
                groups: 1,
            },
        ),
        (
            "conv3",
            ConvGeom {
                batch: 32,
                in_c: 256,
                in_h: 13,
                in_w: 13,
                out_c: 192,
                kernel: 3,
                stride: 1,
                pad: 1,
                groups: 1,
            },
        ),
    ];
    for (name, g) in layers {
        let x = cpu.upload(&vec![0.5; g.in_len()]);
        let w = cpu.upload(&vec![0.01; g.weight_len()]);
        let b = cpu.upload(&vec![0.0; g.out_c]);
        let (mut y, mut dx, mut dw, mut db) = (
            cpu.zeros(g.out_len()),
            cpu.zeros(g.in_len()),
            cpu.zeros(g.weight_len()),
            cpu.zeros(g.out_c),
        );
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t = Instant::now();
            cpu.conv2d_forward(&g, &x, &w, &b, &mut y);
            let f = t.elapsed().as_secs_f64();
            let t = Instant::now();
            cpu.conv2d_backward(&g, &x, &w, &y, Some(&mut dx), &mut dw, &mut db);
            let bw = t.elapsed().as_secs_f64();
            best = (best.0.min(f), best.1.min(bw));
        }
        let gf = 2.0 * g.forward_macs() as f64 / 1e9;
        println!(
            "{name}: fwd {:.1} ms ({:.0} GFLOP/s), bwd {:.1} ms ({:.0} GFLOP/s)",
            best.0 * 1e3,
            gf / best.0,
            best.1 * 1e3,
            2.0 * gf / best.1
        );
    }
}
