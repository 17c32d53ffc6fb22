//! Run-time CPU feature detection by name, for checking an artifact's required features.

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

/// `Some(present)` for a name this architecture checks, `None` for an unknown one.
fn detect(feature: &str) -> Option<bool> {
    #[cfg(target_arch = "x86_64")]
    {
        Some(match feature {
            "sse4.1" => std::arch::is_x86_feature_detected!("sse4.1"),
            "avx" => std::arch::is_x86_feature_detected!("avx"),
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "f16c" => std::arch::is_x86_feature_detected!("f16c"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
            "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
            _ => return None,
        })
    }
    #[cfg(target_arch = "aarch64")]
    {
        Some(match feature {
            "neon" => std::arch::is_aarch64_feature_detected!("neon"),
            "fp16" => std::arch::is_aarch64_feature_detected!("fp16"),
            "dotprod" => std::arch::is_aarch64_feature_detected!("dotprod"),
            "i8mm" => std::arch::is_aarch64_feature_detected!("i8mm"),
            _ => return None,
        })
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = feature;
        None
    }
}
