//! Every CUDA kernel in `kernels/` compiles with NVRTC (no GPU needed), for the architectures
//! we target, and defines the functions the backend loads; a kernel that does not compile is
//! an error naming its file and line.
//!
//! NVRTC comes from the CUDA toolkit or the `nvidia-cuda-nvrtc` wheel, found through
//! `LD_LIBRARY_PATH`. Where it is absent these tests say so and pass, unless
//! `ALEXNET_REQUIRE_NVRTC=1` (as in CI), which makes its absence a failure.
#![cfg(feature = "cuda")]

use alexnet::backend::cuda::kernels;

fn nvrtc_here() -> bool {
    if kernels::nvrtc_present() {
        return true;
    }
    assert!(
        std::env::var("ALEXNET_REQUIRE_NVRTC").is_err(),
        "ALEXNET_REQUIRE_NVRTC is set but libnvrtc.so.13 cannot be loaded: install the wheel \
         nvidia-cuda-nvrtc and put site-packages/nvidia/cu13/lib on LD_LIBRARY_PATH"
    );
    eprintln!("NVRTC not found (LD_LIBRARY_PATH): kernel compilation not checked here");
    false
}

#[test]
fn every_kernel_compiles_for_the_gpus_we_target() {
    if !nvrtc_here() {
        return;
    }
    // Turing (T4, the oldest the README supports), Ampere (A100), Hopper (H100, H200),
    // Blackwell (B200).
    for arch in ["compute_75", "compute_80", "compute_90", "compute_100"] {
        for (file, source, functions) in kernels::SOURCES {
            let ptx = kernels::compile(file, source, Some(arch))
                .unwrap_or_else(|e| panic!("{arch}: {e:#}"))
                .to_src();
            for f in functions.iter() {
                assert!(
                    ptx.contains(&format!(".entry {f}(")),
                    "{file} ({arch}) does not define the kernel `{f}`"
                );
            }
        }
    }
    // Every .cu file in kernels/ is built into the binary.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for entry in std::fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".cu") {
            assert!(
                kernels::SOURCES
                    .iter()
                    .any(|s| s.0 == format!("kernels/{name}")),
                "kernels/{name} is not in kernels::SOURCES"
            );
        }
    }
}

#[test]
fn a_kernel_that_does_not_compile_names_its_file_and_line() {
    if !nvrtc_here() {
        return;
    }
    let src = "#include \"rng.cuh\"\nextern \"C\" __global__ void k(float* x) {\n    x[0] = not_declared;\n}\n";
    let err = kernels::compile("kernels/broken.cu", src, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kernel kernels/broken.cu does not compile")
            && err.contains("kernels/broken.cu(3)")
            && err.contains("not_declared"),
        "{err}"
    );
}
