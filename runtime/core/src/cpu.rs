//! CPU feature detection by name, for checking an artifact's required features and choosing
//! kernels: at run time with `std`, from the build's target features without it.

/// Whether this CPU has `feature` (names as in `is_x86_feature_detected!` /
/// `is_aarch64_feature_detected!`); unknown names are reported as missing.
pub fn has_feature(feature: &str) -> bool {
    detect(feature).unwrap_or(false)
}

/// Whether [`has_feature`] can check `feature` on this architecture (the names target
/// descriptors may use for it).
pub fn knows_feature(feature: &str) -> bool {
    detect(feature).is_some()
}

/// Whether the CPU has `$name`: asked at run time with `std`; without it (firmware), what the
/// build was compiled for (`-C target-feature`, `-C target-cpu`), as tract's `linalg` does.
#[cfg(target_arch = "x86_64")]
macro_rules! has {
    ($name:tt) => {{
        #[cfg(feature = "std")]
        let present = std::arch::is_x86_feature_detected!($name);
        #[cfg(not(feature = "std"))]
        let present = cfg!(target_feature = $name);
        present
    }};
}

#[cfg(target_arch = "aarch64")]
macro_rules! has {
    ($name:tt) => {{
        #[cfg(feature = "std")]
        let present = std::arch::is_aarch64_feature_detected!($name);
        #[cfg(not(feature = "std"))]
        let present = cfg!(target_feature = $name);
        present
    }};
}

/// `Some(present)` for a name this architecture checks, `None` for an unknown one.
fn detect(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(match feature {
            "sse4.1" => has!("sse4.1"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "avxvnni" => has!("avxvnni"),
            "fma" => has!("fma"),
            "f16c" => has!("f16c"),
            "avx512f" => has!("avx512f"),
            "avx512bw" => has!("avx512bw"),
            "avx512vl" => has!("avx512vl"),
            "avx512vnni" => has!("avx512vnni"),
            _ => return None,
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        Some(match feature {
            "neon" => has!("neon"),
            "fp16" => has!("fp16"),
            "dotprod" => has!("dotprod"),
            "i8mm" => has!("i8mm"),
            _ => return None,
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        None
    }
}
