//! Heap traffic of a decode step on the onnxruntime backend: kiln's side (the Rust global
//! allocator, counted) must make no allocation; onnxruntime's own C/C++ allocations are counted
//! by interposing `malloc` and friends for the whole process, and reported.
//!
//! This binary holds one test so that nothing else allocates while it counts.

mod common;
#[path = "../../runtime/core/tests/counting_alloc/mod.rs"]
mod counting_alloc;

use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln_compiler::onnx::{export, ExportOptions};
use kiln_engine::decoder::Decoder;
use kiln_engine::onnxrt::{OrtModel, OrtOptions};
use kiln_runtime::exec::SessionOptions;

/// Every `malloc`-family call in the process, Rust's allocator's included.
static MALLOCS: AtomicUsize = AtomicUsize::new(0);

extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
}

// The executable's definitions take precedence over glibc's for every library in the process,
// onnxruntime included (glibc supports replacing malloc this way); each forwards to glibc's own.

/// # Safety
/// As `malloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    MALLOCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: glibc's allocator, same contract.
    unsafe { __libc_malloc(size) }
}

/// # Safety
/// As `calloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    MALLOCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: glibc's allocator, same contract.
    unsafe { __libc_calloc(n, size) }
}

/// # Safety
/// As `realloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    MALLOCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: glibc's allocator, same contract.
    unsafe { __libc_realloc(ptr, size) }
}

/// # Safety
/// As `posix_memalign(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    MALLOCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: glibc's allocator; `out` is valid per this function's contract.
    unsafe {
        let p = __libc_memalign(align, size);
        if p.is_null() {
            return 12; // ENOMEM
        }
        *out = p;
    }
    0
}

/// # Safety
/// As `aligned_alloc(3)`.
#[no_mangle]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    MALLOCS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: glibc's allocator, same contract.
    unsafe { __libc_memalign(align, size) }
}

#[test]
fn an_ort_decode_step_allocates_nothing_on_kilns_side() {
    let before_load = MALLOCS.load(Ordering::Relaxed);
    let checkpoint =
        kiln_compiler::import::import(&common::smollm2_gguf()).expect("import SmolLM2");
    let dir = tempfile::tempdir().expect("temp dir");
    let onnx = dir.path().join("smollm2.onnx");
    export(&checkpoint, &onnx, &ExportOptions::default()).expect("export");
    drop(checkpoint);
    let library = std::env::var_os("KILN_TEST_ORT_DYLIB")
        .expect("KILN_TEST_ORT_DYLIB (cargo xtask test sets it)");
    let opts = OrtOptions {
        library: Some(library.into()),
        threads: 1,
        ..OrtOptions::default()
    };
    let model = OrtModel::load(&onnx, &opts).expect("load");
    assert!(
        MALLOCS.load(Ordering::Relaxed) > before_load + 1000,
        "malloc is not interposed: loading a model counted almost nothing"
    );
    let mut session = model
        .session(&SessionOptions {
            context: 256,
            threads: 1,
            ..SessionOptions::default()
        })
        .expect("session");
    let prompt: Vec<u32> = (0..32u32).map(|i| 100 + i * 37).collect();
    let mut next = argmax(session.forward(&prompt).expect("prefill"));
    for _ in 0..8 {
        next = argmax(session.forward(&[next]).expect("warm-up"));
    }
    const STEPS: usize = 64;
    let (rust_before, all_before) = (
        counting_alloc::allocations(),
        MALLOCS.load(Ordering::Relaxed),
    );
    for _ in 0..STEPS {
        next = argmax(session.forward(&[next]).expect("decode"));
    }
    let rust = counting_alloc::allocations() - rust_before;
    let all = MALLOCS.load(Ordering::Relaxed) - all_before;
    println!(
        "{STEPS} ort decode steps: {rust} allocations by kiln (Rust), {} by onnxruntime \
         ({:.1} per step)",
        all - rust,
        (all - rust) as f64 / STEPS as f64
    );
    assert_eq!(rust, 0, "kiln allocated during ort decode steps");
}

fn argmax(logits: &[f32]) -> u32 {
    logits
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i as u32)
}
