//! The two services the firmware needs from its platform — memory for setup and a way to
//! print — taken from the C library here; a bare-metal board would provide them instead.
//! Also the allocator and panic handler a `no_std` binary must name.

use core::alloc::{GlobalAlloc, Layout};
use core::ffi::c_void;

#[link(name = "c")]
extern "C" {
    fn malloc(size: usize) -> *mut c_void;
    fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32;
    fn free(ptr: *mut c_void);
    fn write(fd: i32, buf: *const c_void, count: usize) -> isize;
    fn abort() -> !;
}

/// `malloc` guarantees this alignment; larger ones go through `posix_memalign`.
const MALLOC_ALIGN: usize = 16;

struct Malloc;

// SAFETY: `malloc`/`posix_memalign` return blocks of at least `size` bytes aligned as asked (or
// null), and `free` takes any of them back.
unsafe impl GlobalAlloc for Malloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() <= MALLOC_ALIGN {
            // SAFETY: plain C allocation; null on failure, as `GlobalAlloc` expects.
            return unsafe { malloc(layout.size()) }.cast();
        }
        let mut ptr = core::ptr::null_mut();
        // SAFETY: `ptr` is a valid out-pointer; the alignment is a power of two and a multiple
        // of the pointer size, as `Layout` guarantees for alignments above 16.
        match unsafe { posix_memalign(&mut ptr, layout.align(), layout.size()) } {
            0 => ptr.cast(),
            _ => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above.
        unsafe { free(ptr.cast()) }
    }
}

#[global_allocator]
static ALLOCATOR: Malloc = Malloc;

/// Writes all of `bytes` to file descriptor `fd`.
fn write_all(fd: i32, mut bytes: &[u8]) -> core::fmt::Result {
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for its length.
        let n = unsafe { write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return Err(core::fmt::Error);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Standard output.
pub struct Stdout;

impl core::fmt::Write for Stdout {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_all(1, s.as_bytes())
    }
}

/// Standard error.
pub struct Stderr;

impl core::fmt::Write for Stderr {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        write_all(2, s.as_bytes())
    }
}

/// Argument `i` of `argv`, without its terminating NUL.
///
/// # Safety
/// `argv` holds more than `i` valid NUL-terminated strings.
pub unsafe fn arg(argv: *const *const u8, i: usize) -> &'static [u8] {
    // SAFETY: by the contract, `argv[i]` is a NUL-terminated string that lives as long as the
    // program.
    unsafe { core::ffi::CStr::from_ptr((*argv.add(i)).cast()).to_bytes() }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    use core::fmt::Write;
    let _ = writeln!(Stderr, "firmware: {info}");
    // SAFETY: ends the process; nothing runs after it.
    unsafe { abort() }
}

/// The prebuilt `core` names the unwinder's personality routine; with `panic = "abort"` nothing
/// unwinds, so it is linked but never called.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
