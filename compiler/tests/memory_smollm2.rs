//! Memory is planned before the model runs: the compiler's prediction is exactly what a session
//! allocates, a caller-provided arena of that size works and one float less is refused, and
//! decoding a token after warm-up performs zero heap allocations.

mod common;
#[path = "../../runtime/tests/counting_alloc/mod.rs"]
mod counting_alloc;

use std::sync::{Mutex, MutexGuard};

use counting_alloc::allocations;
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{MemoryPlan, SessionError, SessionOptions};
use kiln_runtime::quant::Format;
use kiln_runtime::sampler::{Sampler, SamplerConfig};

/// The tests of this file run one at a time, so process-wide allocation counts see only the
/// test being run (and the worker threads it started).
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn the_plan_is_what_a_session_allocates() {
    let _serial = serial();
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let artifact = Artifact::open(&common::smollm2_artifact(Format::Q4_1)).expect("open");
    for opts in [
        SessionOptions::default(),
        SessionOptions {
            context: 256,
            batch: 256,
            logits_all: true,
            threads: 2,
        },
        SessionOptions {
            context: 8192,
            batch: 1,
            logits_all: false,
            threads: 4,
        },
    ] {
        let predicted = kiln_compiler::emit::memory_plan(&checkpoint, &opts).expect("plan");
        assert_eq!(
            predicted,
            MemoryPlan::new(artifact.meta(), &opts).expect("plan"),
            "{opts:?}"
        );
        let session = artifact.session(opts.clone()).expect("session");
        assert_eq!(
            session.allocated_bytes(),
            predicted.session_bytes(),
            "{opts:?}"
        );
        assert_eq!(
            predicted.weights as u64,
            artifact.meta().tensors.iter().map(|t| t.len).sum::<u64>()
        );
    }
}

#[test]
fn decoding_a_token_allocates_nothing() {
    let _serial = serial();
    let artifact = Artifact::open(&common::smollm2_artifact(Format::Q4_1)).expect("open");
    let vocab = artifact.meta().facts.vocab_size;
    for threads in [1, 2] {
        let opts = SessionOptions {
            threads,
            ..SessionOptions::default()
        };
        let mut session = artifact.session(opts).expect("session");
        let mut sampler = Sampler::new(
            SamplerConfig {
                seed: 7,
                ..SamplerConfig::default()
            },
            vocab,
        );
        let prompt = [504, 3575, 282, 4649, 314];
        let mut next = sampler.sample(session.forward(&prompt).expect("prefill"));
        // Counted after a short warm-up, as a server would run one before taking requests.
        for _ in 0..2 {
            sampler.accept(next);
            next = sampler.sample(session.forward(&[next]).expect("decode"));
        }
        let before = allocations();
        for _ in 0..64 {
            sampler.accept(next);
            next = sampler.sample(session.forward(&[next]).expect("decode"));
        }
        assert_eq!(
            allocations() - before,
            0,
            "heap allocations (any thread) while decoding 64 tokens on {threads} threads"
        );
    }
}

#[test]
fn a_caller_arena_of_the_planned_size_runs_and_one_float_less_is_refused() {
    let _serial = serial();
    let artifact = Artifact::open(&common::smollm2_artifact(Format::Q4_1)).expect("open");
    let opts = SessionOptions {
        context: 512,
        ..SessionOptions::default()
    };
    let plan = MemoryPlan::new(artifact.meta(), &opts).expect("plan");
    let floats = plan.session_bytes() / std::mem::size_of::<f32>();
    let prompt = [504, 3575, 282, 4649, 314];

    let mut own = artifact.session(opts.clone()).expect("session");
    let expected = own.forward(&prompt).expect("forward").to_vec();
    let mut arena = vec![0f32; floats];
    let mut lent = artifact
        .session_in(opts.clone(), &mut arena)
        .expect("session in a planned arena");
    assert_eq!(lent.forward(&prompt).expect("forward"), expected.as_slice());

    let mut short = vec![0f32; floats - 1];
    match artifact.session_in(opts, &mut short) {
        Err(e @ SessionError::ArenaTooSmall { needed, given }) => {
            assert_eq!(
                (needed, given),
                (plan.session_bytes(), plan.session_bytes() - 4)
            );
            let message = e.to_string();
            assert!(
                message.contains(&needed.to_string()) && message.contains(&given.to_string()),
                "{message}"
            );
        }
        Err(e) => panic!("wrong error for a short arena: {e}"),
        Ok(_) => panic!("a session accepted an arena one float too small"),
    }
}

/// Without a file system: the artifact streamed through `embedded_io::Read` into a caller's
/// buffer, run in a caller's arena, gives the mapped artifact's logits; a short buffer is an error.
#[test]
fn an_artifact_read_through_embedded_io_runs_in_caller_memory() {
    let _serial = serial();
    let path = common::smollm2_artifact(Format::Q4_1);
    let bytes = std::fs::read(&path).expect("read artifact");
    let opts = SessionOptions {
        context: 256,
        ..SessionOptions::default()
    };
    let prompt = [504, 3575, 282, 4649, 314];
    let mapped = Artifact::open(&path).expect("open");
    let expected = mapped
        .session(opts.clone())
        .expect("session")
        .forward(&prompt)
        .expect("forward")
        .to_vec();

    let mut buffer = vec![0u64; bytes.len().div_ceil(8)];
    let (image, parsed) =
        kiln_runtime::artifact::read_into(&mut bytes.as_slice(), &mut buffer).expect("read_into");
    let plan = MemoryPlan::new(&parsed.meta, &opts).expect("plan");
    let mut arena = vec![0f32; plan.session_bytes() / 4];
    let weights = &image[parsed.weights.clone()];
    let mut session =
        kiln_runtime::exec::Session::with_arena(&parsed.meta, weights, opts, &mut arena)
            .expect("session");
    assert_eq!(
        session.forward(&prompt).expect("forward"),
        expected.as_slice()
    );

    let mut short = vec![0u64; bytes.len() / 8 - 1];
    let err = kiln_runtime::artifact::read_into(&mut bytes.as_slice(), &mut short)
        .err()
        .expect("a short buffer fails");
    assert!(err.to_string().contains(&bytes.len().to_string()), "{err}");
    let err = kiln_runtime::artifact::read_into(&mut &bytes[..bytes.len() / 2], &mut buffer)
        .err()
        .expect("a cut stream fails");
    assert!(err.to_string().contains("truncated"), "{err}");
}
