//! `Sampler::sample` must not touch the heap: decoding a token is allocation-free by design.
//!
//! Built without libtest's harness (`harness = false`): the harness's own thread allocates
//! while a test runs (it records the test it started), and the count is process-wide.

mod counting_alloc;

use counting_alloc::allocations;
use kiln_runtime::sampler::{Sampler, SamplerConfig};

/// Llama 3's vocabulary size, with logits that vary without a random-number dependency.
fn logits(step: usize) -> Vec<f32> {
    (0..128_256)
        .map(|i| ((i * 7919 + step * 104_729) % 100_003) as f32 / 5_000.0 - 10.0)
        .collect()
}

fn main() {
    let configs = [
        SamplerConfig::default(),
        SamplerConfig::greedy(),
        SamplerConfig {
            repeat_penalty: 1.3,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            ..SamplerConfig::default()
        },
        // No top-k: the whole vocabulary is sorted for top-p.
        SamplerConfig {
            top_k: 0,
            repeat_penalty: 1.1,
            ..SamplerConfig::default()
        },
        SamplerConfig {
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        },
    ];
    let rows: Vec<Vec<f32>> = (0..4).map(logits).collect();
    for config in configs {
        let mut sampler = Sampler::new(config, 128_256);
        for id in 0..100 {
            sampler.accept(id);
        }
        let before = allocations();
        for step in 0..32 {
            let id = sampler.sample(&rows[step % rows.len()]);
            sampler.accept(id);
        }
        sampler.reset();
        let id = sampler.sample(&rows[0]);
        let allocated = allocations() - before;
        assert!(id < 128_256);
        assert_eq!(allocated, 0, "{config:?} allocated {allocated} times");
    }
    println!(
        "sample and accept: no allocation under {} configurations",
        configs.len()
    );
}
