//! Strings across the boundary: reading the caller's, handing out kiln's (freed with
//! `kiln_string_free`), and the version.

use std::ffi::{c_char, CStr, CString};

use crate::error::{fail, KilnStatus};

/// The caller's NUL-terminated UTF-8 `text`, or the failure to report (`what` names it).
///
/// # Safety
/// `text` is null or points at a NUL-terminated string that outlives the returned borrow.
pub(crate) unsafe fn read<'a>(text: *const c_char, what: &str) -> Result<&'a str, KilnStatus> {
    if text.is_null() {
        return Err(fail(
            KilnStatus::KilnInvalidArgument,
            format!("{what} is null"),
        ));
    }
    // SAFETY: non-null, and NUL-terminated and alive by the contract.
    let bytes = unsafe { CStr::from_ptr(text) };
    bytes.to_str().map_err(|e| {
        fail(
            KilnStatus::KilnInvalidArgument,
            format!("{what} is not UTF-8: {e}"),
        )
    })
}

/// [`read`] for an argument that may be null (then `None`).
///
/// # Safety
/// As [`read`].
pub(crate) unsafe fn read_optional<'a>(
    text: *const c_char,
    what: &str,
) -> Result<Option<&'a str>, KilnStatus> {
    if text.is_null() {
        return Ok(None);
    }
    // SAFETY: passed on from the caller.
    unsafe { read(text, what) }.map(Some)
}

/// `text` as a string the caller owns (freed with `kiln_string_free`).
pub(crate) fn hand_out(text: String) -> *mut c_char {
    CString::new(text.replace('\0', " "))
        .unwrap_or_default()
        .into_raw()
}

/// Frees a string kiln handed out (null is ignored).
///
/// # Safety
/// `text` is null or came from kiln and was not freed yet.
#[no_mangle]
pub unsafe extern "C" fn kiln_string_free(text: *mut c_char) {
    if !text.is_null() {
        // SAFETY: by the contract it came from `CString::into_raw` and is freed once.
        drop(unsafe { CString::from_raw(text) });
    }
}

/// kiln's version, e.g. `"0.1.0"` (static; never freed).
#[no_mangle]
pub extern "C" fn kiln_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}
