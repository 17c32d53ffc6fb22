//! `Sampler::sample` must not touch the heap: decoding a token is allocation-free by design.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use kiln_runtime::sampler::{Sampler, SamplerConfig};

thread_local! {
    // Per thread, so tests running in parallel do not count each other's allocations.
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

struct CountingAllocator;

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only a
// const-initialised thread-local `Cell`, which itself never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

fn allocations() -> usize {
    ALLOCATIONS.with(Cell::get)
}

/// Llama 3's vocabulary size, with logits that vary without a random-number dependency.
fn logits(step: usize) -> Vec<f32> {
    (0..128_256)
        .map(|i| ((i * 7919 + step * 104_729) % 100_003) as f32 / 5_000.0 - 10.0)
        .collect()
}

#[test]
fn sample_and_accept_never_allocate() {
    let configs = [
        SamplerConfig::default(),
        SamplerConfig::greedy(),
        SamplerConfig {
            repeat_penalty: 1.3,
            repeat_last_n: 64,
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
}
