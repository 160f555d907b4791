//! Our CUDA kernels (`kernels/*.cu`), carried in the binary and compiled by NVRTC when the
//! backend starts, for the GPU it runs on.
//!
//! A kernel may `#include "rng.cuh"` (the counter-based random numbers shared with the CPU);
//! the include is expanded here and followed by a `#line` directive, so that NVRTC's messages
//! name the kernel's own file and line.

use cudarc::nvrtc::{CompileOptions, Ptx};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The headers kernels may include, by name.
const HEADERS: &[(&str, &str)] = &[("rng.cuh", include_str!("../../../kernels/rng.cuh"))];

/// Every kernel file, by its path in the repository, and the functions it defines.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "kernels/elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
        &[
            "relu_forward",
            "relu_backward",
            "sgd_update",
            "broadcast_rows",
            "broadcast_channels",
            "copy_into_rows",
            "slice_rows",
            "swap_outer",
        ],
    ),
    (
        "kernels/lrn.cu",
        include_str!("../../../kernels/lrn.cu"),
        &["lrn_forward", "lrn_backward"],
    ),
    (
        "kernels/pool.cu",
        include_str!("../../../kernels/pool.cu"),
        &["maxpool_forward", "maxpool_backward"],
    ),
    (
        "kernels/dropout.cu",
        include_str!("../../../kernels/dropout.cu"),
        &["dropout"],
    ),
    (
        "kernels/softmax.cu",
        include_str!("../../../kernels/softmax.cu"),
        &["softmax_xent"],
    ),
    (
        "kernels/bias.cu",
        include_str!("../../../kernels/bias.cu"),
        &["bias_grad_channels", "bias_grad_rows"],
    ),
    (
        "kernels/im2col.cu",
        include_str!("../../../kernels/im2col.cu"),
        &["im2col", "col2im"],
    ),
    (
        "kernels/augment.cu",
        include_str!("../../../kernels/augment.cu"),
        &["finish_views"],
    ),
];

/// `source` with its `#include "header"` lines replaced by the headers, and `#line` directives
/// that keep NVRTC's line numbers those of `name`.
pub fn expand(name: &str, source: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    for (i, line) in source.lines().enumerate() {
        let included = line
            .trim()
            .strip_prefix("#include")
            .map(|rest| rest.trim().trim_matches(['"', '<', '>']));
        match included {
            Some(header) => {
                let (_, text) = HEADERS.iter().find(|h| h.0 == header).ok_or_else(|| {
                    anyhow::anyhow!(
                        "{name}:{}: includes `{header}`, which is not a kernel header (known: {})",
                        i + 1,
                        HEADERS.iter().map(|h| h.0).collect::<Vec<_>>().join(", ")
                    )
                })?;
                out.push_str(&format!("#line 1 \"kernels/{header}\"\n"));
                out.push_str(text);
                out.push_str(&format!("\n#line {} \"{name}\"\n", i + 2));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    Ok(out)
}

/// Whether NVRTC can be loaded (it is found through `LD_LIBRARY_PATH` as `libnvrtc.so.13`).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles one kernel file for `arch` (e.g. `compute_90`; `None`: NVRTC's default). A
/// failure is an error whose text is NVRTC's log, which names the file and line.
pub fn compile(name: &str, source: &str, arch: Option<&'static str>) -> anyhow::Result<Ptx> {
    anyhow::ensure!(
        nvrtc_present(),
        "NVRTC (libnvrtc.so.13) is not on this machine: install the CUDA toolkit or the wheel \
         nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH"
    );
    let src = expand(name, source)?;
    let opts = CompileOptions {
        name: Some(name.to_string()),
        arch,
        // Strict IEEE f32 without fused multiply-adds, rounding as the CPU's code does (it is
        // checked against the CPU to 1e-4; the ops without products match it bit for bit).
        ftz: Some(false),
        fmad: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(src, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => anyhow::anyhow!(
            "kernel {name} does not compile:\n{}",
            log.to_string_lossy().trim_end()
        ),
        other => anyhow::anyhow!("kernel {name}: NVRTC failed: {other:?}"),
    })
}

/// NVRTC's name for compute capability `major.minor` (`compute_90`), as the `'static` string
/// it wants: made once per process and capability, however many backends open.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    static NAMES: OnceLock<Mutex<HashMap<(i32, i32), &'static str>>> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
    names
        .entry((major, minor))
        .or_insert_with(|| Box::leak(format!("compute_{major}{minor}").into_boxed_str()))
}

/// [`compile`] for one of the [`SOURCES`], once per process and architecture: every backend a
/// process opens (the selftest's two, one per case in the op tests) shares the PTX rather
/// than compiling every file again.
pub fn compile_once(
    name: &'static str,
    source: &'static str,
    arch: &'static str,
) -> anyhow::Result<Ptx> {
    type Cache = Mutex<HashMap<(&'static str, &'static str), Ptx>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(ptx) = cache.lock().unwrap().get(&(name, arch)) {
        return Ok(ptx.clone());
    }
    let ptx = compile(name, source, Some(arch))?;
    cache.lock().unwrap().insert((name, arch), ptx.clone());
    Ok(ptx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_architecture_name_is_made_once() {
        let a = arch_name(9, 0);
        assert_eq!(a, "compute_90");
        assert!(
            std::ptr::eq(a, arch_name(9, 0)),
            "the same string, not another leak"
        );
        assert_eq!(arch_name(12, 1), "compute_121");
    }

    #[test]
    fn includes_expand_and_keep_the_kernel_files_line_numbers() {
        let src = "// one\n#include \"rng.cuh\"\nint x;\n";
        let out = expand("kernels/k.cu", src).unwrap();
        assert!(out.contains("__device__ __forceinline__ u64 mix64"));
        assert!(out.contains("#line 3 \"kernels/k.cu\"\nint x;"));
        let err = expand("kernels/k.cu", "#include \"nope.h\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kernels/k.cu:1") && err.contains("nope.h"),
            "{err}"
        );
    }
}
