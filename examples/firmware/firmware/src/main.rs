//! A binary that carries its model and opens no file: kiln's runtime core without std, over an
//! artifact baked in by the build script, in a static arena of the planned size. It answers
//! the prompt the build script tokenized and prints the generated ids:
//!
//! ```text
//! firmware             # the kernels this build targets (dotprod for a Pi 5)
//! firmware reference   # kiln's reference kernels, which give llama.cpp's ids exactly
//! ```
//!
//! The C library stands in for a board support package: `malloc` for the few setup
//! allocations, `write` for output. A bare-metal board would provide those two instead.

#![no_std]
#![no_main]

extern crate alloc;

mod sys;

use core::cell::UnsafeCell;
use core::fmt::Write;

use kiln_runtime::artifact::{check_cpu_features, parse};
use kiln_runtime::exec::Session;
use kiln_runtime::kernels::{Kernels, Level};
use kiln_runtime::sampler::{Sampler, SamplerConfig};

mod model {
    include!(concat!(env!("OUT_DIR"), "/model.rs"));
}
mod prompt {
    include!(concat!(env!("OUT_DIR"), "/prompt.rs"));
}

/// The session's KV cache, buffers and scratch: zeroed memory of the size the build planned,
/// so nothing is allocated for them and the peak is known before the program runs.
struct Arena(UnsafeCell<[f32; model::ARENA_FLOATS]>);

// SAFETY: the arena is handed out once, by `main` on the only thread (see `take_arena`).
unsafe impl Sync for Arena {}

static ARENA: Arena = Arena(UnsafeCell::new([0.0; model::ARENA_FLOATS]));

/// The arena, to the one session this program makes.
fn take_arena() -> &'static mut [f32] {
    // SAFETY: called once, from `run`, on the program's only thread: no other reference to the
    // arena exists or will.
    unsafe { &mut *ARENA.0.get() }
}

/// # Safety
/// Called by the C runtime with `argc` valid C strings in `argv`.
#[no_mangle]
pub unsafe extern "C" fn main(argc: i32, argv: *const *const u8) -> i32 {
    // SAFETY: the C runtime passes `argc` arguments.
    let reference = argc > 1 && unsafe { sys::arg(argv, 1) } == b"reference";
    let mut out = sys::Stdout;
    match run(reference, &mut out) {
        Ok(()) => 0,
        Err(e) => {
            let _ = writeln!(sys::Stderr, "firmware: {e}");
            1
        }
    }
}

/// Greedy generation after the prompt; prints the kernels, the arena and the ids.
fn run(reference: bool, out: &mut impl Write) -> Result<(), Error> {
    let parsed = parse(model::ARTIFACT)?;
    check_cpu_features(&parsed.meta)?;
    let mut options = model::session_options();
    if reference {
        options.kernels = Some(Kernels::for_level(Level::Generic)?);
    }
    let weights = &model::ARTIFACT[parsed.weights.clone()];
    let mut session = Session::with_arena(&parsed.meta, weights, options, take_arena())?;
    let facts = &parsed.meta.facts;
    let mut sampler = Sampler::new(SamplerConfig::greedy(), facts.vocab_size);
    writeln!(
        out,
        "kernels: {} (the artifact requires {:?})\narena: {} bytes, static: KV cache {} for {} tokens, buffers {}, scratch {}, logits {}; weights {} in the binary\nprompt: {:?}",
        session.kernels_name(),
        model::REQUIRED_CPU_FEATURES,
        core::mem::size_of_val(&ARENA),
        model::KV_CACHE_BYTES,
        model::CONTEXT,
        model::BUFFER_BYTES,
        model::SCRATCH_BYTES,
        model::LOGITS_BYTES,
        model::WEIGHT_BYTES,
        prompt::PROMPT_IDS
    )?;
    write!(out, "ids:")?;
    let mut next = sampler.sample(session.forward(prompt::PROMPT_IDS)?);
    for step in 0..prompt::GENERATE {
        write!(out, " {next}")?;
        if facts.eog_ids.contains(&next) || step + 1 == prompt::GENERATE {
            break;
        }
        next = sampler.sample(session.forward(&[next])?);
    }
    writeln!(out)?;
    Ok(())
}

/// What can stop the firmware, each the runtime's own error.
enum Error {
    Artifact(kiln_runtime::artifact::ArtifactError),
    Session(kiln_runtime::exec::SessionError),
    Kernels(kiln_runtime::kernels::LevelError),
    Output,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Artifact(e) => write!(f, "the baked-in artifact: {e}"),
            Error::Session(e) => write!(f, "{e}"),
            Error::Kernels(e) => write!(f, "{e}"),
            Error::Output => f.write_str("writing the output failed"),
        }
    }
}

impl From<kiln_runtime::artifact::ArtifactError> for Error {
    fn from(e: kiln_runtime::artifact::ArtifactError) -> Self {
        Error::Artifact(e)
    }
}

impl From<kiln_runtime::exec::SessionError> for Error {
    fn from(e: kiln_runtime::exec::SessionError) -> Self {
        Error::Session(e)
    }
}

impl From<kiln_runtime::kernels::LevelError> for Error {
    fn from(e: kiln_runtime::kernels::LevelError) -> Self {
        Error::Kernels(e)
    }
}

impl From<core::fmt::Error> for Error {
    fn from(_: core::fmt::Error) -> Self {
        Error::Output
    }
}
