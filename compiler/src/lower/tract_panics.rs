//! tract panics on some malformed models (an `Unsqueeze` axis out of range, for one) instead of
//! returning an error. A bad file must get an error naming it, so tract's reading of a model
//! runs under [`contained`], which turns such a panic into its message.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while this thread runs [`contained`] code: its panics are reported, not printed.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
    /// The message of the last contained panic on this thread.
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`; a panic inside it becomes `Err` with the panic's message and place. Panics on
/// other threads, or outside `f`, go to the hook that was there before.
pub(super) fn contained<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(Cell::get) {
                return previous(info);
            }
            let place = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let text = info.payload_as_str().unwrap_or("a panic");
            MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{text}{place}")));
        }));
    });
    let was = CONTAINED.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(was));
    result.map_err(|_| {
        MESSAGE
            .with(|m| m.borrow_mut().take())
            .unwrap_or_else(|| "a panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_the_rest_is_untouched() {
        assert_eq!(contained(|| 7), Ok(7));
        let e = contained(|| -> u8 { panic!("axis 9 out of range") }).expect_err("caught");
        assert!(e.starts_with("axis 9 out of range at "), "{e}");
        assert!(e.contains("tract_panics.rs"), "{e}");
        // Outside, a panic still unwinds as it did.
        assert!(panic::catch_unwind(|| panic!("outside")).is_err());
    }
}
