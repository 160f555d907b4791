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
            "scale",
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

/// NVRTC's options for every kernel: strict IEEE f32 without fused multiply-adds, rounding as
/// the CPU's code does (it is checked against the CPU to 1e-4; the ops without products match
/// it bit for bit).
const FLAGS: &[&str] = &[
    "--ftz=false",
    "--prec-sqrt=true",
    "--prec-div=true",
    "--fmad=false",
    "--std=c++17",
];

fn require_nvrtc() -> anyhow::Result<()> {
    anyhow::ensure!(
        nvrtc_present(),
        "NVRTC (libnvrtc.so.13) is not on this machine: install the CUDA toolkit or the wheel \
         nvidia-cuda-nvrtc and put its lib folder on LD_LIBRARY_PATH"
    );
    Ok(())
}

/// Compiles one kernel file to PTX for `arch` (e.g. `compute_90`; `None`: NVRTC's default).
/// A failure is an error whose text is NVRTC's log, which names the file and line.
pub fn compile(name: &str, source: &str, arch: Option<&'static str>) -> anyhow::Result<Ptx> {
    require_nvrtc()?;
    let src = expand(name, source)?;
    let opts = CompileOptions {
        name: Some(name.to_string()),
        arch,
        options: FLAGS.iter().map(|f| f.to_string()).collect(),
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

/// Compiles one kernel file to machine code (a CUBIN) for `arch` (e.g. `sm_90`). Unlike PTX,
/// which the driver compiles again and refuses when NVRTC is newer than it
/// (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), a CUBIN loads on any driver of NVRTC's major
/// version. cudarc compiles to PTX only, so this drives NVRTC itself.
pub fn compile_cubin(name: &str, source: &str, arch: &str) -> anyhow::Result<Vec<u8>> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::{CStr, CString};
    require_nvrtc()?;
    let src = CString::new(expand(name, source)?)
        .map_err(|_| anyhow::anyhow!("kernel {name} contains a NUL byte"))?;
    let cname = CString::new(name).map_err(|_| anyhow::anyhow!("{name:?} contains a NUL"))?;
    let mut options: Vec<String> = FLAGS.iter().map(|f| f.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let nvrtc = |what: &str, e: result::NvrtcError| anyhow::anyhow!("kernel {name}: {what}: {e:?}");
    let prog =
        result::create_program(&src, Some(&cname)).map_err(|e| nvrtc("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` was just created and is destroyed once, below, after its last use; `src`
    // and `cname`, which it may point into, outlive it; the buffer handed to nvrtcGetCUBIN has
    // the size nvrtcGetCUBINSize gave.
    let out = unsafe {
        let compiled = match result::compile_program(prog, &options) {
            Ok(()) => {
                let mut size = 0usize;
                sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .and_then(|()| {
                        let mut cubin = vec![0u8; size];
                        sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast())
                            .result()
                            .map(|()| cubin)
                    })
                    .map_err(|e| nvrtc("nvrtcGetCUBIN", e))
            }
            Err(_) => {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log = if log.is_empty() {
                    String::new()
                } else {
                    CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned()
                };
                Err(anyhow::anyhow!(
                    "kernel {name} does not compile:\n{}",
                    log.trim_end()
                ))
            }
        };
        let _ = result::destroy_program(prog);
        compiled
    }?;
    anyhow::ensure!(
        !out.is_empty(),
        "kernel {name}: NVRTC wrote no CUBIN for {arch}"
    );
    Ok(out)
}

/// The version of the NVRTC that is loaded, `(major, minor)`, or `None` without one.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !nvrtc_present() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; the call only writes the two numbers.
    let answered = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (answered == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// A CUDA version as `cuDriverGetVersion` counts it (13000) written `13.0`.
pub fn cuda_version_text(version: i32) -> String {
    format!("{}.{}", version / 1000, version % 1000 / 10)
}

/// Why a kernel compiled by NVRTC `nvrtc` may not load on a driver of CUDA `driver` (as
/// `cuDriverGetVersion` counts it), or `None` when NVRTC is no newer than the driver.
pub fn nvrtc_newer_than_driver(nvrtc: (i32, i32), driver: i32) -> Option<String> {
    let ours = nvrtc.0 * 1000 + nvrtc.1 * 10;
    (ours > driver).then(|| {
        format!(
            "NVRTC is {}.{} and the driver supports CUDA up to {}: use an NVRTC no newer than \
             the driver (pip install 'nvidia-cuda-nvrtc=={}.*', its lib folder first on \
             LD_LIBRARY_PATH), or update the driver",
            nvrtc.0,
            nvrtc.1,
            cuda_version_text(driver),
            cuda_version_text(driver)
        )
    })
}

/// NVRTC's name for compute capability `major.minor` (`compute_90`), as the `'static` string
/// it wants: made once per process and capability, however many backends open.
pub fn arch_name(major: i32, minor: i32) -> &'static str {
    leaked_name("compute", major, minor)
}

/// The machine-code architecture of compute capability `major.minor` (`sm_90`), made once.
pub fn sm_name(major: i32, minor: i32) -> &'static str {
    leaked_name("sm", major, minor)
}

fn leaked_name(prefix: &'static str, major: i32, minor: i32) -> &'static str {
    type Names = Mutex<HashMap<(&'static str, i32, i32), &'static str>>;
    static NAMES: OnceLock<Names> = OnceLock::new();
    let names = NAMES.get_or_init(Default::default);
    let mut names = names.lock().unwrap_or_else(|p| p.into_inner());
    names
        .entry((prefix, major, minor))
        .or_insert_with(|| Box::leak(format!("{prefix}_{major}{minor}").into_boxed_str()))
}

/// [`compile_cubin`] for one of the [`SOURCES`] and an `sm_XY` architecture, once per process
/// and architecture: every backend a process opens (the selftest's two, one per case in the
/// op tests) shares the module image rather than compiling every file again.
pub fn compile_once(
    name: &'static str,
    source: &'static str,
    arch: &'static str,
) -> anyhow::Result<Ptx> {
    type Cache = Mutex<HashMap<(&'static str, &'static str), Vec<u8>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(cubin) = cache.lock().unwrap().get(&(name, arch)) {
        return Ok(Ptx::from_binary(cubin.clone()));
    }
    let cubin = compile_cubin(name, source, arch)?;
    cache.lock().unwrap().insert((name, arch), cubin.clone());
    Ok(Ptx::from_binary(cubin))
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
        assert_eq!(sm_name(9, 0), "sm_90");
        assert!(std::ptr::eq(sm_name(9, 0), sm_name(9, 0)));
    }

    #[test]
    fn nvrtc_newer_than_the_driver_is_named_with_both_versions() {
        assert_eq!(cuda_version_text(13000), "13.0");
        assert_eq!(cuda_version_text(12080), "12.8");
        assert_eq!(cuda_version_text(13020), "13.2");
        assert_eq!(nvrtc_newer_than_driver((13, 0), 13000), None);
        assert_eq!(nvrtc_newer_than_driver((13, 0), 13010), None);
        let why = nvrtc_newer_than_driver((13, 1), 13000).unwrap();
        assert!(
            why.contains("NVRTC is 13.1")
                && why.contains("up to 13.0")
                && why.contains("nvidia-cuda-nvrtc==13.0.*"),
            "{why}"
        );
        assert!(nvrtc_newer_than_driver((14, 0), 13090).is_some());
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
