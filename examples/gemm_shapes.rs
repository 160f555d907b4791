//! GFLOP/s of the `gemm` crate, single-threaded, at the shapes the network's convolutions use.
use alexnet::backend::cpu::gemm::{sgemm, MatRef, Parallelism};
use std::time::Instant;

fn main() {
    fc_layout();
    // (name, m, n, k, a transposed, b transposed)
    let shapes = [
        ("conv1 fwd", 48, 3025, 363, false, false),
        ("conv1 dW", 48, 363, 3025, false, true),
        ("conv1x2 fwd", 96, 3025, 363, false, false),
        ("conv1x2 dW", 96, 363, 3025, false, true),
        ("conv1x2 fwd2", 96, 6050, 363, false, false),
        ("conv1 fwdT", 3025, 48, 363, true, true),
        ("conv2 fwd", 128, 729, 1200, false, false),
        ("conv2 dW", 128, 1200, 729, false, true),
        ("conv2 dcol", 1200, 729, 128, true, false),
        ("conv3 fwd", 192, 169, 2304, false, false),
        ("conv3 dW", 192, 2304, 169, false, true),
        ("conv3 dcol", 2304, 169, 192, true, false),
        ("conv3 fwd x8", 192, 1352, 2304, false, false),
        ("square", 1024, 1024, 1024, false, false),
        ("fc6 fwd half-n", 128, 1024, 9216, false, true),
        ("fc6 fwd B rows", 128, 1024, 9216, false, false),
        ("fc6 fwd m=64", 64, 1024, 9216, false, true),
        ("fc6 dW half", 1024, 9216, 128, true, false),
        ("fc6 dx half", 128, 4608, 2048, false, false),
    ];
    for (name, m, n, k, at, bt) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0.0f32; m * n];
        let am = if at {
            MatRef::transposed(&a, m)
        } else {
            MatRef::rows(&a, k)
        };
        let bm = if bt {
            MatRef::transposed(&b, k)
        } else {
            MatRef::rows(&b, n)
        };
        let reps = (2e9 / (2.0 * (m * n * k) as f64)).max(3.0) as usize;
        sgemm(m, n, k, am, bm, &mut c, n, false, Parallelism::None);
        let t = Instant::now();
        for _ in 0..reps {
            sgemm(m, n, k, am, bm, &mut c, n, true, Parallelism::None);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{name:<14} {m:>5}x{n:>5}x{k:>5}  {:>6.1} GFLOP/s",
            2.0 * (m * n * k) as f64 / s / 1e9
        );
    }
}

#[allow(dead_code)]
fn raw(
    m: usize,
    n: usize,
    k: usize,
    a: (&[f32], isize, isize),
    b: (&[f32], isize, isize),
    c: (&mut [f32], isize, isize),
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.0.as_mut_ptr(),
            c.2,
            c.1,
            false,
            a.0.as_ptr(),
            a.2,
            a.1,
            b.0.as_ptr(),
            b.2,
            b.1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

fn fc_layout() {
    let (rows, out, inp) = (128usize, 1024usize, 9216usize);
    let w = vec![0.5f32; out * inp];
    let x = vec![0.25f32; rows * inp];
    let mut y = vec![0.0f32; rows * out];
    let t = Instant::now();
    for _ in 0..5 {
        raw(
            out,
            rows,
            inp,
            (&w, inp as isize, 1),
            (&x, 1, inp as isize),
            (&mut y, 1, out as isize),
        );
    }
    let s = t.elapsed().as_secs_f64() / 5.0;
    println!(
        "fc6 fwd as W x^T        {:>6.1} GFLOP/s",
        2.0 * (rows * out * inp) as f64 / s / 1e9
    );
}
