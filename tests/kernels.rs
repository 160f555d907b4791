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
fn every_kernel_compiles_to_machine_code_for_hopper() {
    if !nvrtc_here() {
        return;
    }
    // The backend loads CUBINs (PTX from an NVRTC newer than the driver does not load).
    for (file, source, functions) in kernels::SOURCES {
        let cubin = kernels::compile_cubin(file, source, kernels::sm_name(9, 0))
            .unwrap_or_else(|e| panic!("sm_90: {e:#}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{file}: a CUBIN is an ELF file");
        for f in functions.iter() {
            assert!(
                cubin
                    .windows(f.len() + 2)
                    .any(|w| w[0] == 0 && &w[1..=f.len()] == f.as_bytes() && w[f.len() + 1] == 0),
                "{file} (sm_90) has no symbol `{f}`"
            );
        }
    }
    let err = kernels::compile_cubin(
        "kernels/broken.cu",
        "extern \"C\" __global__ void k(float* x) { x[0] = nope; }\n",
        "sm_90",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("kernel kernels/broken.cu does not compile") && err.contains("nope"),
        "{err}"
    );
    let (major, _) = kernels::nvrtc_version().expect("NVRTC answers its version");
    assert!(major >= 13, "libnvrtc.so.13 says it is {major}");
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
