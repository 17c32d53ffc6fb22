//! Records the triple this crate is built for, which is what the `host` descriptor's
//! `triple = "host"` resolves to.

fn main() {
    let triple = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=KILN_HOST_TRIPLE={triple}");
    println!("cargo:rerun-if-changed=build.rs");
}
