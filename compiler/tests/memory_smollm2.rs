//! Memory is planned before the model runs: the compiler's prediction is exactly what a session
//! allocates, activation buffers share the arena by lifetime, a caller-provided arena of that
//! size works and one float less is refused, decoding a token after warm-up performs zero heap
//! allocations, and the `kiln` process with a full context stays within the predicted peak.

mod common;
#[path = "../../runtime/core/tests/counting_alloc/mod.rs"]
mod counting_alloc;

use std::ffi::OsStr;
use std::fs::File;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use counting_alloc::allocations;
use kiln_engine::generate::Model;
use kiln_runtime::artifact::Artifact;
use kiln_runtime::exec::{KvType, MemoryPlan, SessionError, SessionOptions};
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
            kv_type: KvType::F32,
            kernels: None,
        },
        SessionOptions {
            context: 8192,
            batch: 1,
            logits_all: false,
            threads: 4,
            kv_type: KvType::F16,
            kernels: None,
        },
    ] {
        let predicted = kiln_compiler::emit::memory_plan(&checkpoint, &opts).expect("plan");
        assert_eq!(
            predicted,
            MemoryPlan::new(artifact.meta(), &opts).expect("plan"),
            "{opts:?}"
        );
        // The compiler's tokenizer encoding is the artifact's tokenizer section.
        assert_eq!(
            predicted.with_tokenizer(checkpoint.tokenizer.to_bytes().len()),
            MemoryPlan::new(artifact.meta(), &opts)
                .expect("plan")
                .with_tokenizer(artifact.tokenizer_bytes().len()),
        );
        // On the real op list the packing is optimal: the busiest op is the MLP's SwiGlu, with
        // the residual stream, gate, up and activated buffers live at once.
        let widths = &artifact.meta().graph.buffers;
        let width = |name: &str| {
            widths
                .iter()
                .find(|b| b.name == name)
                .unwrap_or_else(|| panic!("buffer {name}"))
                .width
        };
        let busiest = ["hidden", "gate", "up", "activated"]
            .map(width)
            .iter()
            .sum::<usize>();
        let batch = predicted.batch;
        assert_eq!(predicted.buffers, busiest * batch * 4, "{opts:?}");
        assert_eq!(
            predicted.buffers_sum,
            widths.iter().map(|b| b.width).sum::<usize>() * batch * 4
        );
        assert!(
            predicted.buffers * 3 < predicted.buffers_sum * 2,
            "{predicted:?}"
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

/// The longest prefix of the golden text (cut anywhere, so that the model goes on writing rather
/// than ending its turn) that encodes to at most `tokens` ids, and its length in ids.
fn prompt_of(model: &Model, tokens: usize) -> (String, usize) {
    let text = std::fs::read_to_string(common::testdata().join("golden/apache-2.0.txt"))
        .expect("golden text");
    let ids = |len: usize| model.encode_prompt(&text[..len], false).len();
    assert!(ids(text.len()) > tokens, "the golden text is too short");
    // Bisect on byte length (the id count grows with the prefix): `ids(lo) <= tokens < ids(hi)`.
    let (mut lo, mut hi) = (0, text.len());
    loop {
        let mut mid = (lo + hi) / 2;
        while !text.is_char_boundary(mid) {
            mid -= 1;
        }
        if mid == lo {
            break;
        }
        if ids(mid) <= tokens {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (text[..lo].to_owned(), ids(lo))
}

/// `VmHWM` of process `pid` in bytes, while it runs.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Waits for `child`, reading its `VmHWM` every 20 ms (its last value before exit: a zombie
/// has none); returns the peak seen.
fn poll_peak(child: &mut Child) -> u64 {
    let mut peak = 0;
    while child.try_wait().expect("waiting for kiln").is_none() {
        peak = peak.max(vm_hwm(child.id()).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(20));
    }
    peak
}

/// Runs `kiln ARGS` (stdout and stderr to files under `dir`) and returns its peak RSS in bytes,
/// measured by `/usr/bin/time -v`, or, where that is not installed, by polling the child's
/// `/proc/PID/status`; with the run's JSON output and the method used.
fn measure_kiln(args: &[&OsStr], dir: &Path) -> (u64, serde_json::Value, &'static str) {
    let time = Path::new("/usr/bin/time");
    let timed = time.is_file();
    let mut cmd = if timed {
        let mut cmd = Command::new(time);
        cmd.arg("-v").arg(common::kiln_binary());
        cmd
    } else {
        Command::new(common::kiln_binary())
    };
    let (out_path, err_path) = (dir.join("kiln.out"), dir.join("kiln.err"));
    let file = |path: &Path| File::create(path).expect("create an output file");
    let mut child = cmd
        .args(args)
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .spawn()
        .expect("spawn kiln");
    let polled = (!timed).then(|| poll_peak(&mut child));
    let status = child.wait().expect("kiln run");
    let stderr = std::fs::read_to_string(&err_path).expect("kiln's stderr");
    assert!(status.success(), "kiln failed: {stderr}");
    let (peak, method) = match polled {
        Some(bytes) => (
            bytes,
            "VmHWM of /proc/PID/status, polled (no /usr/bin/time)",
        ),
        None => {
            let kb: u64 = stderr
                .lines()
                .find_map(|l| l.trim().strip_prefix("Maximum resident set size (kbytes):"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no maximum RSS in /usr/bin/time's output: {stderr}"));
            (kb * 1024, "/usr/bin/time -v")
        }
    };
    let json = serde_json::from_slice(&std::fs::read(&out_path).expect("kiln's stdout"))
        .expect("kiln run --json output");
    (peak, json, method)
}

/// The bound: `kiln run` on the default model (q4_1) at a 2048-token context, with the
/// context filled, stays within the compiler's predicted peak + 5 %.
#[test]
fn kiln_run_with_a_full_context_stays_within_the_predicted_peak() {
    let _serial = serial();
    const CONTEXT: usize = 2048;
    const THREADS: usize = 2;
    let path = common::smollm2_artifact(Format::Q4_1);
    let checkpoint = kiln_compiler::import::import(&common::smollm2_gguf()).expect("import");
    let converted = kiln_compiler::emit::convert(&checkpoint, Format::Q4_1).expect("convert");
    drop(checkpoint);
    let opts = SessionOptions {
        context: CONTEXT,
        threads: THREADS,
        ..SessionOptions::default()
    };
    let predicted = kiln_compiler::emit::memory_plan(&converted, &opts)
        .expect("plan")
        .with_tokenizer(converted.tokenizer.to_bytes().len());
    drop(converted);

    // A prompt that leaves the model a few dozen tokens before the context is full.
    let model = Model::open(&path).expect("open");
    let (prompt, prompt_len) = prompt_of(&model, CONTEXT - 48);
    drop(model);
    assert!(prompt_len > CONTEXT * 9 / 10, "{prompt_len}-token prompt");
    let dir = tempfile::tempdir().expect("temp dir");
    let prompt_path = dir.path().join("prompt.txt");
    std::fs::write(&prompt_path, &prompt).expect("write the prompt");

    let (ctx, threads) = (CONTEXT.to_string(), THREADS.to_string());
    let args: [&OsStr; 14] = [
        "run".as_ref(),
        path.as_os_str(),
        "-f".as_ref(),
        prompt_path.as_os_str(),
        "-c".as_ref(),
        ctx.as_ref(),
        "-t".as_ref(),
        threads.as_ref(),
        "-n".as_ref(),
        ctx.as_ref(),
        "--temp".as_ref(),
        "0".as_ref(),
        "--no-special".as_ref(),
        "--json".as_ref(),
    ];
    let (peak, out, method) = measure_kiln(&args, dir.path());
    let count = |key: &str| out[key].as_array().map_or(0, Vec::len);
    let (prompt_ids, generated) = (count("prompt_ids"), count("ids"));
    let limit = predicted.total() as f64 * 1.05;
    println!(
        "kiln run, q4_1, {CONTEXT}-token context: {prompt_ids} prompt + {generated} generated ids, stop {}, {THREADS} threads: peak RSS {:.1} MB ({method}); predicted {:.1} MB ({:+.1} %), limit {:.1} MB; {predicted:?}",
        out["stop"],
        peak as f64 / 1e6,
        predicted.total() as f64 / 1e6,
        (peak as f64 / predicted.total() as f64 - 1.0) * 100.0,
        limit / 1e6
    );
    assert_eq!(
        out["stop"], "context_full",
        "the run must fill the context: {out}"
    );
    assert!(
        peak as f64 <= limit,
        "peak RSS {peak} bytes exceeds the predicted {} + 5 %",
        predicted.total()
    );
}
