//! Our CUDA kernels, run on the CPU. Each `kernels/*.cu` is compiled as C++ (headers and line
//! numbers expanded as for NVRTC), with a small header standing in for CUDA's built-ins: the
//! thread and block indices, `__shared__` arrays, and `__syncthreads` as a barrier between
//! real threads, one per CUDA thread of a block. Each kernel is launched with the grid and the
//! arguments the CUDA backend gives it (`src/backend/cuda/mod.rs`), rebuilt here, and checked
//! against the CPU backend's op on random inputs, the convolution in one pass over its batch
//! and in several.
//!
//! This checks every kernel's arithmetic and indexing without a GPU. It cannot check what only
//! a GPU does (the compiler's fused multiply-adds, memory races between blocks, the launch
//! itself): `alexnet selftest --backend cuda` does that on one. Needs a C++20 compiler (`c++`);
//! without one the checks are skipped, unless `ALEXNET_REQUIRE_CXX=1` (CI sets it).

mod common;

#[cfg(feature = "cuda")]
mod emulated {
    use super::common::*;
    use alexnet::backend::cuda::kernels::{expand, SOURCES};
    use alexnet::backend::{
        Backend, ConvGeom, Cpu, DropoutKey, LrnParams, PlaneGeom, PoolGeom, SgdParams,
    };
    use std::ffi::{c_void, CString};
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    /// CUDA's built-ins for plain C++: one CUDA thread is one call of the kernel function with
    /// `threadIdx` and `blockIdx` set (thread-local, so that a block's threads may be real
    /// threads); `__shared__` arrays are statics, shared by the threads of the one block that
    /// runs at a time.
    const SHIM: &str = r#"
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
struct dim3_emulated { unsigned x, y, z; };
inline thread_local dim3_emulated threadIdx, blockIdx;
inline dim3_emulated blockDim, gridDim;
inline std::barrier<>* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
"#;

    /// Appended to each kernel file: `emulate_<kernel>(grid, block, args)` runs the kernel over
    /// the grid, its arguments passed as CUDA's launch API passes them (an array of pointers to
    /// each value). Blocks run one after the other; the threads of a block run one after the
    /// other too, or, for kernels that synchronise, as real threads meeting at a barrier.
    const LAUNCHER: &str = r#"
template <class... A, std::size_t... I>
static void call_emulated(void (*f)(A...), void** args, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}
template <class... A>
static void emulate(void (*f)(A...), unsigned grid, unsigned block, bool threads, void** args) {
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    for (unsigned b = 0; b < grid; ++b) {
        if (!threads) {
            for (unsigned t = 0; t < block; ++t) {
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                call_emulated(f, args, std::index_sequence_for<A...>{});
            }
            continue;
        }
        std::barrier<> bar(block);
        block_barrier = &bar;
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t)
            ts.emplace_back([=] {
                blockIdx = {b, 0, 0};
                threadIdx = {t, 0, 0};
                call_emulated(f, args, std::index_sequence_for<A...>{});
            });
        for (auto& th : ts) th.join();
    }
}
"#;

    /// The kernels compiled into one shared library, loaded (`None`: no C++ compiler here).
    fn library() -> Option<usize> {
        static LIB: OnceLock<Option<usize>> = OnceLock::new();
        *LIB.get_or_init(|| {
            let have = Command::new("c++").arg("--version").output().is_ok();
            if !have {
                assert!(
                    std::env::var("ALEXNET_REQUIRE_CXX").is_err(),
                    "ALEXNET_REQUIRE_CXX is set but there is no `c++` to compile the kernels with"
                );
                eprintln!("no C++ compiler (c++): the kernels are not run on the CPU");
                return None;
            }
            let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("kernels-on-cpu");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("cuda_emulated.h"), SHIM).unwrap();
            let mut files = Vec::new();
            for (file, source, names) in SOURCES {
                let threads = source.contains("__syncthreads");
                let mut text = expand(file, source).unwrap();
                text.push_str(LAUNCHER);
                for name in names.iter() {
                    text.push_str(&format!(
                        "extern \"C\" void emulate_{name}(unsigned g, unsigned b, void** a) \
                         {{ emulate({name}, g, b, {threads}, a); }}\n"
                    ));
                }
                let stem = Path::new(file).file_stem().unwrap().to_str().unwrap();
                let path = dir.join(format!("{stem}.cpp"));
                std::fs::write(&path, text).unwrap();
                files.push(path);
            }
            let lib = dir.join("libkernels_on_cpu.so");
            let out = Command::new("c++")
                .args(["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread"])
                .args(["-include", "cuda_emulated.h", "-I"])
                .arg(&dir)
                .args(&files)
                .arg("-o")
                .arg(&lib)
                .output()
                .expect("running c++");
            assert!(
                out.status.success(),
                "compiling the kernels as C++ failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let path = CString::new(lib.to_str().unwrap()).unwrap();
            // SAFETY: a library we just built, with no initialisers beyond C++ statics.
            let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
            assert!(!handle.is_null(), "loading {}", lib.display());
            Some(handle as usize)
        })
    }

    /// One kernel argument, as the CUDA backend passes it.
    enum Arg {
        Ptr(*mut c_void),
        I32(i32),
        I64(i64),
        F32(f32),
        U64(u64),
    }

    fn ptr<T>(v: &[T]) -> Arg {
        Arg::Ptr(v.as_ptr() as *mut c_void)
    }
    fn ptr_mut<T>(v: &mut [T]) -> Arg {
        Arg::Ptr(v.as_mut_ptr() as *mut c_void)
    }

    /// The CUDA backend's `grid(n)` (one thread per element, 256 per block) and `per_item`
    /// (one block of 256 per item).
    fn grid(n: usize) -> (u32, u32) {
        (n.div_ceil(256).max(1) as u32, 256)
    }
    fn per_item(items: usize) -> (u32, u32) {
        (items.max(1) as u32, 256)
    }

    /// Runs `kernel` over `(blocks, threads)`; false where the kernels cannot run here. One
    /// launch at a time: the grid's and block's sizes are the library's globals.
    fn launch(kernel: &str, (blocks, threads): (u32, u32), mut args: Vec<Arg>) -> bool {
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let Some(lib) = library() else { return false };
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let mut ptrs: Vec<*mut c_void> = (args.iter_mut())
            .map(|a| match a {
                Arg::Ptr(p) => p as *mut *mut c_void as *mut c_void,
                Arg::I32(v) => v as *mut i32 as *mut c_void,
                Arg::I64(v) => v as *mut i64 as *mut c_void,
                Arg::F32(v) => v as *mut f32 as *mut c_void,
                Arg::U64(v) => v as *mut u64 as *mut c_void,
            })
            .collect();
        let name = CString::new(format!("emulate_{kernel}")).unwrap();
        // SAFETY: the library is loaded; the symbol, if there, has this signature.
        let f = unsafe { libc::dlsym(lib as *mut c_void, name.as_ptr()) };
        assert!(!f.is_null(), "no kernel {kernel}");
        let f: extern "C" fn(u32, u32, *mut *mut c_void) = unsafe { std::mem::transmute(f) };
        f(blocks, threads, ptrs.as_mut_ptr());
        true
    }

    fn cpu() -> Cpu {
        Cpu::with_threads(1)
    }

    #[test]
    fn elementwise_kernels_match_the_cpu() {
        let b = cpu();
        let n = 1000;
        let x = random(n, 1);
        // ReLU forward and backward.
        let mut got = x.clone();
        if !launch(
            "relu_forward",
            grid(n),
            vec![ptr_mut(&mut got), Arg::I64(n as i64)],
        ) {
            return;
        }
        let mut want = x.clone();
        b.relu_forward(&mut want);
        assert_eq!(got, want, "relu_forward");
        let dy = random(n, 2);
        let mut got_dx = dy.clone();
        launch(
            "relu_backward",
            grid(n),
            vec![ptr(&want), ptr_mut(&mut got_dx), Arg::I64(n as i64)],
        );
        let mut want_dx = dy.clone();
        b.relu_backward(&want, &mut want_dx);
        assert_eq!(got_dx, want_dx, "relu_backward");

        // The replicas' mean from their sum: bit for bit the CPU's.
        let mut got = x.clone();
        launch(
            "scale",
            grid(n),
            vec![ptr_mut(&mut got), Arg::F32(1.0 / 3.0), Arg::I64(n as i64)],
        );
        let mut want = x.clone();
        b.scale(&mut want, 1.0 / 3.0);
        assert_eq!(got, want, "scale");

        // The SGD step, as `sgd_update` passes it (the decay times the rate).
        let p = SgdParams {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 5e-4,
        };
        let (w, v, g) = (random(n, 3), random(n, 4), random(n, 5));
        let (mut gw, mut gv) = (w.clone(), v.clone());
        launch(
            "sgd_update",
            grid(n),
            vec![
                ptr_mut(&mut gw),
                ptr_mut(&mut gv),
                ptr(&g),
                Arg::F32(p.lr),
                Arg::F32(p.momentum),
                Arg::F32(p.weight_decay * p.lr),
                Arg::I64(n as i64),
            ],
        );
        let (mut cw, mut cv) = (w.clone(), v.clone());
        b.sgd_update(&p, &mut cw, &mut cv, &g);
        assert_close("sgd w", &gw, &cw, 1e-6);
        assert_close("sgd v", &gv, &cv, 1e-6);

        // Bias broadcasts: over rows (linear), over channels' planes (conv).
        let (rows, out) = (7, 13);
        let bias = random(out, 6);
        let mut y = vec![f32::NAN; rows * out];
        launch(
            "broadcast_rows",
            grid(rows * out),
            vec![
                ptr_mut(&mut y),
                ptr(&bias),
                Arg::I64(rows as i64),
                Arg::I32(out as i32),
            ],
        );
        assert!(
            (0..rows * out).all(|i| y[i] == bias[i % out]),
            "broadcast_rows"
        );
        let (batch, channels, plane) = (3, 5, 11);
        let mut y = vec![f32::NAN; batch * channels * plane];
        launch(
            "broadcast_channels",
            grid(y.len()),
            vec![
                ptr_mut(&mut y),
                ptr(&bias),
                Arg::I64(batch as i64),
                Arg::I32(channels as i32),
                Arg::I32(plane as i32),
            ],
        );
        assert!(
            (0..y.len()).all(|i| y[i] == bias[(i / plane) % channels]),
            "broadcast_channels"
        );
    }

    #[test]
    fn the_column_exchanges_copies_match_the_cpu() {
        let b = cpu();
        let (rows, widths) = (6, [5usize, 9]);
        let total: usize = widths.iter().sum();
        let parts = [random(rows * widths[0], 1), random(rows * widths[1], 2)];
        // The all-gather's concat, one launch per part, as `concat_rows` does.
        let mut got = vec![f32::NAN; rows * total];
        let mut offset = 0;
        for (p, &w) in parts.iter().zip(&widths) {
            if !launch(
                "copy_into_rows",
                grid(rows * w),
                vec![
                    ptr_mut(&mut got),
                    ptr(p),
                    Arg::I64(rows as i64),
                    Arg::I32(total as i32),
                    Arg::I32(offset as i32),
                    Arg::I32(w as i32),
                ],
            ) {
                return;
            }
            offset += w;
        }
        let mut want = vec![0.0; rows * total];
        b.concat_rows(rows, &[&parts[0], &parts[1]], &widths, &mut want);
        assert_eq!(got, want, "copy_into_rows");
        // The reduce-scatter's slice, overwriting and adding.
        for accumulate in [false, true] {
            let start = random(rows * widths[1], 3);
            let mut got = start.clone();
            launch(
                "slice_rows",
                grid(rows * widths[1]),
                vec![
                    ptr_mut(&mut got),
                    ptr(&want),
                    Arg::I64(rows as i64),
                    Arg::I32(total as i32),
                    Arg::I32(widths[0] as i32),
                    Arg::I32(widths[1] as i32),
                    Arg::I32(accumulate as i32),
                ],
            );
            let mut expect = start.clone();
            b.slice_rows(
                rows,
                total,
                widths[0],
                widths[1],
                &want,
                &mut expect,
                accumulate,
            );
            assert_eq!(got, expect, "slice_rows, accumulate {accumulate}");
        }
    }

    #[test]
    fn lrn_kernels_match_the_cpu() {
        let b = cpu();
        let g = PlaneGeom {
            batch: 3,
            channels: 9,
            plane: 17,
        };
        let p = LrnParams {
            size: 5,
            alpha: 0.05,
            beta: 0.75,
            k: 2.0,
        };
        let x: Vec<f32> = random(g.len(), 1).iter().map(|v| 3.0 * v).collect();
        let dy = random(g.len(), 2);
        let (mut y, mut scale, mut dx) =
            (vec![0.0; g.len()], vec![0.0; g.len()], vec![0.0; g.len()]);
        let dims = [
            g.batch as i32,
            g.channels as i32,
            g.plane as i32,
            p.size as i32,
        ];
        let mut args = vec![ptr(&x), ptr_mut(&mut y), ptr_mut(&mut scale)];
        args.extend(dims.map(Arg::I32));
        args.extend([Arg::F32(p.alpha), Arg::F32(p.beta), Arg::F32(p.k)]);
        if !launch("lrn_forward", grid(g.batch * g.plane), args) {
            return;
        }
        let (mut cy, mut cscale, mut cdx) =
            (vec![0.0; g.len()], vec![0.0; g.len()], vec![0.0; g.len()]);
        b.lrn_forward(&g, &p, &x, &mut cy, &mut cscale);
        assert_close("lrn y", &y, &cy, 1e-5);
        assert_close("lrn scale", &scale, &cscale, 1e-6);
        let mut args = vec![ptr(&x), ptr(&cy), ptr(&cscale), ptr(&dy), ptr_mut(&mut dx)];
        args.extend(dims.map(Arg::I32));
        args.extend([Arg::F32(p.alpha), Arg::F32(p.beta)]);
        launch("lrn_backward", grid(g.batch * g.plane), args);
        b.lrn_backward(&g, &p, &x, &cy, &cscale, &dy, &mut cdx);
        assert_close("lrn dx", &dx, &cdx, 1e-5);
    }

    #[test]
    fn max_pooling_kernels_match_the_cpu() {
        let b = cpu();
        for g in [
            PoolGeom {
                batch: 2,
                channels: 3,
                in_h: 13,
                in_w: 11,
                size: 3,
                stride: 2,
            },
            PoolGeom {
                batch: 1,
                channels: 2,
                in_h: 8,
                in_w: 8,
                size: 2,
                stride: 2,
            },
        ] {
            // Rounded to a few values, so that windows hold ties: the first maximum wins.
            let x: Vec<f32> = (random(g.in_len(), 1).iter())
                .map(|v| (v * 4.0).round())
                .collect();
            let dims = [g.in_h, g.in_w, g.out_h(), g.out_w(), g.size, g.stride].map(|v| v as i32);
            let planes = (g.batch * g.channels) as i64;
            let mut y = vec![0.0; g.out_len()];
            let mut args = vec![ptr(&x), ptr_mut(&mut y), Arg::I64(planes)];
            args.extend(dims.map(Arg::I32));
            if !launch("maxpool_forward", grid(g.out_len()), args) {
                return;
            }
            let mut cy = vec![0.0; g.out_len()];
            b.maxpool_forward(&g, &x, &mut cy);
            assert_eq!(y, cy, "maxpool forward");
            let dy = random(g.out_len(), 2);
            let mut dx = vec![f32::NAN; g.in_len()];
            let mut args = vec![
                ptr(&x),
                ptr(&cy),
                ptr(&dy),
                ptr_mut(&mut dx),
                Arg::I64(planes),
            ];
            args.extend(dims.map(Arg::I32));
            launch("maxpool_backward", grid(g.in_len()), args);
            let mut cdx = vec![0.0; g.in_len()];
            b.maxpool_backward(&g, &x, &cy, &dy, &mut cdx);
            assert_close("maxpool dx", &dx, &cdx, 1e-6);
        }
    }

    #[test]
    fn dropout_draws_the_cpus_mask() {
        let b = cpu();
        let (rows, cols, p) = (9, 37, 0.5f32);
        // A column's block inside a larger layer: the mask depends on the global position.
        let key = DropoutKey {
            seed: 0x5eed_1234,
            row_offset: 64,
            col_offset: 37,
            total_cols: 74,
        };
        let x = random(rows * cols, 1);
        let mut got = x.clone();
        if !launch(
            "dropout",
            grid(rows * cols),
            vec![
                ptr_mut(&mut got),
                Arg::I64(rows as i64),
                Arg::I32(cols as i32),
                Arg::F32(p),
                Arg::U64(key.seed),
                Arg::U64(key.row_offset),
                Arg::U64(key.col_offset),
                Arg::U64(key.total_cols),
            ],
        ) {
            return;
        }
        let mut want = x.clone();
        b.dropout_forward(rows, cols, p, &key, &mut want);
        assert_eq!(got, want, "dropout");
        assert!(got.contains(&0.0) && got.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn softmax_and_bias_reductions_match_the_cpu() {
        let b = cpu();
        // More classes than threads, so that each thread sums several.
        let (rows, classes) = (5, 300);
        let logits: Vec<f32> = random(rows * classes, 1).iter().map(|v| 4.0 * v).collect();
        let labels: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 61) % classes as u32)
            .collect();
        let mut dlogits = vec![0.0; rows * classes];
        let mut row_loss = vec![0.0f64; rows];
        if !launch(
            "softmax_xent",
            per_item(rows),
            vec![
                ptr(&logits),
                ptr(&labels),
                ptr_mut(&mut dlogits),
                ptr_mut(&mut row_loss),
                Arg::I32(rows as i32),
                Arg::I32(classes as i32),
            ],
        ) {
            return;
        }
        let mut want = vec![0.0; rows * classes];
        let loss = b.softmax_xent(rows, classes, &logits, &labels, &mut want);
        assert_close("softmax dlogits", &dlogits, &want, 1e-6);
        let got_loss = (row_loss.iter().sum::<f64>() / rows as f64) as f32;
        assert_close("softmax loss", &[got_loss], &[loss], 1e-6);

        // Bias gradients, per channel over images and pixels, and per output over rows.
        let (batch, channels, plane) = (3, 4, 200);
        let dy = random(batch * channels * plane, 2);
        let mut db = vec![f32::NAN; channels];
        launch(
            "bias_grad_channels",
            per_item(channels),
            vec![
                ptr(&dy),
                ptr_mut(&mut db),
                Arg::I32(batch as i32),
                Arg::I32(channels as i32),
                Arg::I32(plane as i32),
            ],
        );
        let want: Vec<f32> = (0..channels)
            .map(|c| {
                (0..batch)
                    .flat_map(|n| (0..plane).map(move |p| (n, p)))
                    .map(|(n, p)| dy[(n * channels + c) * plane + p] as f64)
                    .sum::<f64>() as f32
            })
            .collect();
        assert_close("bias_grad_channels", &db, &want, 1e-5);
        let (rows, out) = (600, 3);
        let dy = random(rows * out, 3);
        let mut db = vec![f32::NAN; out];
        launch(
            "bias_grad_rows",
            per_item(out),
            vec![
                ptr(&dy),
                ptr_mut(&mut db),
                Arg::I32(rows as i32),
                Arg::I32(out as i32),
            ],
        );
        let want: Vec<f32> = (0..out)
            .map(|o| (0..rows).map(|r| dy[r * out + o] as f64).sum::<f64>() as f32)
            .collect();
        assert_close("bias_grad_rows", &db, &want, 1e-5);
    }

    #[test]
    fn views_finished_from_bytes_exactly() {
        let b = cpu();
        let (views, _) = alexnet::selftest::random_byte_views(4, 7);
        let n = views.views() * views.view_len();
        let crops: Vec<i32> = (views.crops.iter())
            .flat_map(|c| [c.x0 as i32, c.y0 as i32, c.flip as i32])
            .collect();
        let shifts: Vec<f32> = views.shifts.iter().flatten().copied().collect();
        let mut out = vec![f32::NAN; n];
        if !launch(
            "finish_views",
            grid(n),
            vec![
                ptr(&views.pixels),
                ptr(&views.mean),
                ptr(&crops),
                ptr(&shifts),
                ptr_mut(&mut out),
                Arg::I32(views.views() as i32),
                Arg::I32(views.side as i32),
                Arg::I32(views.out_side as i32),
            ],
        ) {
            return;
        }
        let want = b.finish_views(&views, &views.mean.to_vec()).unwrap();
        assert_eq!(out, want, "finish_views");
    }

    /// A convolution the way the CUDA backend's unfolding path runs it, in passes of `pass`
    /// images (the last one shorter) as when a batch's unfolding outgrows its buffer: per pass
    /// and group, im2col (`[images][rows, pixels]`) and one product per image for the output;
    /// im2col by row (`[rows][images, pixels]`), the output gradient regrouped by swap_outer,
    /// and one product for the weight gradient, added across passes; one product per image and
    /// col2im for the input gradient. The offsets are the backend's `unfold_args` and
    /// `output_span`; the products are plain loops here (cuBLAS runs them there).
    #[test]
    fn convolution_by_unfolding_matches_the_cpu() {
        let b = cpu();
        for (g, pass) in [
            (
                ConvGeom {
                    batch: 3,
                    in_c: 3,
                    in_h: 19,
                    in_w: 17,
                    out_c: 4,
                    kernel: 5,
                    stride: 2,
                    pad: 2,
                    groups: 1,
                },
                3,
            ),
            (
                ConvGeom {
                    batch: 5,
                    in_c: 6,
                    in_h: 9,
                    in_w: 9,
                    out_c: 8,
                    kernel: 3,
                    stride: 1,
                    pad: 1,
                    groups: 2,
                },
                2,
            ),
        ] {
            let (x, w, bias, dy) = (
                random(g.in_len(), 1),
                random(g.weight_len(), 2),
                random(g.out_c, 3),
                random(g.out_len(), 4),
            );
            let (cout, cin) = (g.out_c / g.groups, g.in_c / g.groups);
            let plane = g.out_h() * g.out_w();
            let kk = cin * g.kernel * g.kernel;
            let per = kk * plane;
            let image = g.in_c * g.in_h * g.in_w;
            let dims = [
                cin,
                g.in_h,
                g.in_w,
                g.kernel,
                g.stride,
                g.pad,
                g.out_h(),
                g.out_w(),
            ]
            .map(|v| v as i32);
            // `unfold_args`: where group `grp` of images n0.. starts in the input.
            let in_start = |n0: usize, grp: usize| n0 * image + grp * cin * g.in_h * g.in_w;
            // `output_span`: where it starts in the output.
            let out_start = |n0: usize, grp: usize| (n0 * g.out_c + grp * cout) * plane;
            let mut y = vec![0.0f32; g.out_len()];
            let mut dw = vec![f32::NAN; g.weight_len()];
            let mut dx = vec![f32::NAN; g.in_len()];
            let mut col = vec![f32::NAN; pass * per];
            let mut dyt = vec![f32::NAN; pass * cout * plane];
            for n0 in (0..g.batch).step_by(pass) {
                let nb = pass.min(g.batch - n0);
                for grp in 0..g.groups {
                    let im2col = |by_row: bool, col: &mut Vec<f32>| {
                        let (col_image, col_row) = if by_row {
                            (plane as i64, (nb * plane) as i64)
                        } else {
                            (per as i64, plane as i64)
                        };
                        let mut args = vec![
                            ptr(&x[in_start(n0, grp)..]),
                            ptr_mut(col),
                            Arg::I32(nb as i32),
                            Arg::I64(image as i64),
                            Arg::I64(col_image),
                            Arg::I64(col_row),
                        ];
                        args.extend(dims.map(Arg::I32));
                        launch("im2col", grid(nb * per), args)
                    };
                    // Forward: y_i[cout, P] = b + w[cout, K] col_i[K, P].
                    if !im2col(false, &mut col) {
                        return;
                    }
                    for i in 0..nb {
                        for o in 0..cout {
                            let oc = grp * cout + o;
                            for p in 0..plane {
                                let s: f64 = (0..kk)
                                    .map(|k| (w[oc * kk + k] * col[i * per + k * plane + p]) as f64)
                                    .sum();
                                y[((n0 + i) * g.out_c + oc) * plane + p] = bias[oc] + s as f32;
                            }
                        }
                    }
                    // Weight gradient: dw[cout, K] (+)= dyt[cout, nb P] col[K, nb P]^T.
                    im2col(true, &mut col);
                    launch(
                        "swap_outer",
                        grid(nb * cout * plane),
                        vec![
                            ptr_mut(&mut dyt),
                            ptr(&dy[out_start(n0, grp)..]),
                            Arg::I64(nb as i64),
                            Arg::I32(cout as i32),
                            Arg::I32(plane as i32),
                            Arg::I64((g.out_c * plane) as i64),
                        ],
                    );
                    for o in 0..cout {
                        for k in 0..kk {
                            let s: f64 = (0..nb * plane)
                                .map(|j| (dyt[o * nb * plane + j] * col[k * nb * plane + j]) as f64)
                                .sum();
                            let d = &mut dw[(grp * cout + o) * kk + k];
                            *d = if n0 == 0 { s as f32 } else { *d + s as f32 };
                        }
                    }
                    // Input gradient: dcol_i[K, P] = w[cout, K]^T dy_i[cout, P], then col2im.
                    for i in 0..nb {
                        for k in 0..kk {
                            for p in 0..plane {
                                let s: f64 = (0..cout)
                                    .map(|o| {
                                        let oc = grp * cout + o;
                                        let at = ((n0 + i) * g.out_c + oc) * plane + p;
                                        (w[oc * kk + k] * dy[at]) as f64
                                    })
                                    .sum();
                                col[i * per + k * plane + p] = s as f32;
                            }
                        }
                    }
                    let mut args = vec![
                        ptr(&col),
                        ptr_mut(&mut dx[in_start(n0, grp)..]),
                        Arg::I32(nb as i32),
                        Arg::I64(image as i64),
                    ];
                    args.extend(dims.map(Arg::I32));
                    launch("col2im", grid(nb * cin * g.in_h * g.in_w), args);
                }
            }
            let mut cy = vec![0.0; g.out_len()];
            b.conv2d_forward(&g, &x, &w, &bias, &mut cy);
            let (mut cdx, mut cdw, mut cdb) = (
                vec![0.0; g.in_len()],
                vec![0.0; g.weight_len()],
                vec![0.0; g.out_c],
            );
            b.conv2d_backward(&g, &x, &w, &dy, Some(&mut cdx), &mut cdw, &mut cdb);
            assert_close(&format!("{g:?} y"), &y, &cy, 1e-5);
            assert_close(&format!("{g:?} dw"), &dw, &cdw, 1e-5);
            assert_close(&format!("{g:?} dx"), &dx, &cdx, 1e-5);
        }
    }
}
