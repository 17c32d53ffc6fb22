//! Finding and loading `libonnxruntime`, with errors that say which version is needed and where
//! to get it.

use std::ffi::{c_char, CStr};
use std::path::{Path, PathBuf};

use super::OrtError;

/// The oldest onnxruntime kiln's `ort` bindings accept (`api-22`).
const MIN_VERSION: (u32, u32) = (1, 22);

const HOW_TO_GET: &str =
    "get one with `cargo xtask fetch onnxruntime` (PyPI's onnxruntime wheel), \
     `pip install onnxruntime` or your board's SDK, then pass --ort-lib PATH or set ORT_DYLIB_PATH";

/// The library in use: onnxruntime allows one per process, with one environment.
#[derive(Clone)]
pub struct Loaded {
    pub version: String,
    pub path: PathBuf,
    pub env: ::ort::environment::Environment,
}

static LOADED: std::sync::Mutex<Option<Loaded>> = std::sync::Mutex::new(None);

/// The file name the dynamic loader searches for.
const SYSTEM_NAME: &str = if cfg!(target_os = "macos") {
    "libonnxruntime.dylib"
} else if cfg!(windows) {
    "onnxruntime.dll"
} else {
    "libonnxruntime.so"
};

/// Loads `explicit`, else `ORT_DYLIB_PATH`, else the kiln cache's copy, else the system's; once
/// per process (a second call gets the same library, or an error if it names another).
pub fn load(explicit: Option<&Path>) -> Result<Loaded, OrtError> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
        .or_else(cached)
        .unwrap_or_else(|| PathBuf::from(SYSTEM_NAME));
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(done) = loaded.as_ref() {
        if explicit.is_some_and(|p| p != done.path) {
            // A missing or foreign file is reported as such first.
            check_version(&path)?;
            return Err(OrtError::Library(format!(
                "cannot load onnxruntime from {}: this process already uses {} (one per process)",
                path.display(),
                done.path.display()
            )));
        }
        return Ok(done.clone());
    }
    let version = check_version(&path)?;
    let builder = ::ort::init_from(&path).map_err(|e| {
        OrtError::Library(format!("loading onnxruntime from {}: {e}", path.display()))
    })?;
    let env = builder.with_name("kiln").build().map_err(|e| {
        OrtError::Library(format!(
            "onnxruntime {version} at {}: creating its environment: {e}",
            path.display()
        ))
    })?;
    let done = Loaded { version, path, env };
    *loaded = Some(done.clone());
    Ok(done)
}

/// Where `cargo xtask fetch onnxruntime` puts the library for this machine.
fn cached() -> Option<PathBuf> {
    let home = std::env::var_os("KILN_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kiln")))?;
    let path = home
        .join("onnxruntime")
        .join(format!(
            "{}-{}",
            std::env::consts::ARCH,
            std::env::consts::OS
        ))
        .join(SYSTEM_NAME);
    path.is_file().then_some(path)
}

/// Opens the library just to read its version, so an old or foreign file is refused with a
/// message instead of failing deep inside onnxruntime.
fn check_version(path: &Path) -> Result<String, OrtError> {
    let missing = |why: String| {
        OrtError::Library(format!(
            "cannot load onnxruntime from {}: {why}; kiln needs onnxruntime ≥ {}.{}: {HOW_TO_GET}",
            path.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        ))
    };
    // SAFETY: loading onnxruntime runs only its static initializers, which have no preconditions.
    let lib = unsafe { libloading::Library::new(path) }.map_err(|e| {
        // libloading's message is generic; the loader's own reason is its source.
        let reason = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
        missing(reason)
    })?;
    type GetApiBase = unsafe extern "C" fn() -> *const ::ort::sys::OrtApiBase;
    // SAFETY: `OrtGetApiBase` has this signature in every onnxruntime release.
    let get_base = unsafe { lib.get::<GetApiBase>(b"OrtGetApiBase\0") }.map_err(|_| {
        missing("it does not export OrtGetApiBase (not an onnxruntime library)".into())
    })?;
    // SAFETY: the function takes nothing and returns a pointer to a static table (or null).
    let base = unsafe { get_base() };
    if base.is_null() {
        return Err(missing("OrtGetApiBase returned nothing".into()));
    }
    // SAFETY: `base` is non-null and points to the library's static `OrtApiBase`, whose
    // `GetVersionString` returns a static NUL-terminated string.
    let raw: *const c_char = unsafe { ((*base).GetVersionString)() };
    if raw.is_null() {
        return Err(missing("it reports no version".into()));
    }
    // SAFETY: non-null, NUL-terminated and static (see above).
    let version = unsafe { CStr::from_ptr(raw) }
        .to_string_lossy()
        .into_owned();
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_VERSION {
        return Err(OrtError::Library(format!(
            "{} is onnxruntime {version}; kiln needs ≥ {}.{}: {HOW_TO_GET}",
            path.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        )));
    }
    // Kept loaded: `ort` opens the same file next, and unloading onnxruntime is not supported.
    std::mem::forget(lib);
    Ok(version)
}

/// The providers compiled into the loaded library, e.g. `CUDAExecutionProvider`.
pub fn available_providers() -> Result<Vec<String>, OrtError> {
    let api = ::ort::api();
    let mut list: *mut *mut c_char = std::ptr::null_mut();
    let mut len: std::ffi::c_int = 0;
    // SAFETY: both out-pointers are valid; onnxruntime fills them with an array it owns.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut len) };
    status_ok(status)?;
    if list.is_null() {
        return Ok(Vec::new());
    }
    let names = (0..len.max(0) as usize)
        .map(|i| {
            // SAFETY: `list` holds `len` NUL-terminated strings.
            unsafe { CStr::from_ptr(*list.add(i)) }
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    // SAFETY: releases exactly the array returned above, once.
    let status = unsafe { (api.ReleaseAvailableProviders)(list, len) };
    status_ok(status)?;
    Ok(names)
}

/// Turns an `OrtStatus` into a result, releasing it.
pub fn status_ok(status: ::ort::sys::OrtStatusPtr) -> Result<(), OrtError> {
    let ptr = status.0;
    if ptr.is_null() {
        return Ok(());
    }
    let api = ::ort::api();
    // SAFETY: `ptr` is a live status; its message is NUL-terminated and valid until released.
    let message = unsafe { CStr::from_ptr((api.GetErrorMessage)(ptr)) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: released once, after its message was copied.
    unsafe { (api.ReleaseStatus)(ptr) };
    Err(OrtError::Run(message))
}
