//! Status codes, the last error's message (per thread), and the guard that keeps a panic from
//! crossing into C.

use std::cell::RefCell;
use std::ffi::{c_char, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What a call did: `KILN_OK`, or which kind of failure (`kiln_last_error()` says why).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KilnStatus {
    /// Done.
    KilnOk = 0,
    /// A null pointer, text that is not UTF-8, options that are not valid JSON.
    KilnInvalidArgument = 1,
    /// The model could not be loaded.
    KilnModelError = 2,
    /// The conversation or the options cannot be answered (a bad tool choice, a schema that
    /// does not compile, a template error).
    KilnRequestError = 3,
    /// Generation failed (the context is full, say).
    KilnGenerationError = 4,
    /// A snapshot could not be saved or loaded.
    KilnSnapshotError = 5,
    /// A bug in kiln: a panic was caught before it reached the caller.
    KilnInternalError = 6,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// Records `message` as this thread's last error and returns `status`.
pub(crate) fn fail(status: KilnStatus, message: impl std::fmt::Display) -> KilnStatus {
    let text = message.to_string().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(text).unwrap_or_default());
    status
}

/// Runs `body`, turning a panic into `KilnInternalError` with its message.
pub(crate) fn guard(body: impl FnOnce() -> KilnStatus) -> KilnStatus {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(status) => status,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            fail(
                KilnStatus::KilnInternalError,
                format!("internal error: {what}"),
            )
        }
    }
}

/// The message of the last failed call on this thread (empty if none failed); valid until the
/// next failing call on this thread. Never null.
#[no_mangle]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}
