//! Every kernel level this CPU runs, teacher-forced over the same windows of the golden text
//! as the reference kernels, on the default model in each block format, in ggml's rows and in
//! the level's packed layout, batched and token by token: each must stay within the budget the worst tables of the kernel contract set
//! (`common::forced`). `KILN_KERNELS`
//! does not matter here: each level is chosen explicitly, so every x86-64 machine checks every
//! level it has, AVX2 always.

mod common;

use common::forced;
use kiln_engine::generate::Model;
use kiln_runtime::kernels::{Kernels, Level};
use kiln_runtime::layout::Layout;
use kiln_runtime::quant::Format;

fn check_levels(quant: Format) {
    let model = Model::open(&common::smollm2_artifact(quant)).expect("open");
    let tokens = forced::tokens(&model);
    let reference = forced::scored_rows(&model, &tokens, Kernels::generic(), forced::CTX);
    let budget = forced::Budget::derive(&model, &tokens, &reference);
    let levels: Vec<Level> = Level::available()
        .into_iter()
        .filter(|&l| l != Level::Generic)
        .collect();
    println!("{}: levels {levels:?}, budget {budget:?}", quant.name());
    if cfg!(target_arch = "x86_64") {
        assert!(
            levels.contains(&Level::Avx2),
            "an x86-64 CI machine without AVX2"
        );
    }
    for level in levels {
        let kernels = Kernels::for_level(level).expect("an available level");
        // ggml's rows and the layout the level packs for (the reference is the same on both).
        let mut layouts = vec![Layout::Rows, level.preferred_layout()];
        layouts.dedup();
        for layout in layouts {
            let packed = Model::open(&common::smollm2_packed(quant, layout)).expect("open");
            // Whole windows go through the batched kernels, token by token (in the layout the
            // level packs for, which users run) through the decoding ones.
            let batches: &[usize] = if layout == level.preferred_layout() {
                &[forced::CTX, 1]
            } else {
                &[forced::CTX]
            };
            for &batch in batches {
                let rows = forced::scored_rows(&packed, &tokens, kernels, batch);
                budget.check(
                    &format!(
                        "{} {level}, {}, passes of {batch}",
                        quant.name(),
                        layout.name()
                    ),
                    &reference,
                    &rows,
                    model.facts().vocab_size,
                );
            }
        }
    }
}

#[test]
fn q4_1_every_level_stays_within_the_contract_budget() {
    check_levels(Format::Q4_1);
}

#[test]
fn q4_0_every_level_stays_within_the_contract_budget() {
    check_levels(Format::Q4_0);
}

#[test]
fn q8_0_every_level_stays_within_the_contract_budget() {
    check_levels(Format::Q8_0);
}

#[test]
fn q5_0_every_level_stays_within_the_contract_budget() {
    check_levels(Format::Q5_0);
}

#[test]
fn q5_1_every_level_stays_within_the_contract_budget() {
    check_levels(Format::Q5_1);
}

/// A level this CPU cannot run is refused when a session starts, naming the level and why.
#[test]
fn a_forced_level_the_cpu_lacks_is_refused_by_name() {
    let model = Model::open(&common::smollm2_artifact(Format::Q4_1)).expect("open");
    let other = if cfg!(target_arch = "x86_64") {
        "dotprod"
    } else {
        "avx2"
    };
    let out = std::process::Command::new(common::kiln_binary())
        .env("KILN_KERNELS", other)
        .arg("run")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args(["-p", "Hi", "-n", "2"])
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "KILN_KERNELS={other} ran");
    assert!(
        stderr.contains(&format!("KILN_KERNELS={other}: kernels for"))
            && !stderr.contains("panicked"),
        "{stderr}"
    );
    drop(model);
    let out = std::process::Command::new(common::kiln_binary())
        .env("KILN_KERNELS", "avx9")
        .arg("run")
        .arg(common::smollm2_artifact(Format::Q4_1))
        .args(["-p", "Hi", "-n", "2"])
        .output()
        .expect("run kiln");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("unknown kernel level (one of generic, avx2"),
        "{stderr}"
    );
}
