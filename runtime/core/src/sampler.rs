//! Token sampling with llama.cpp's default chain: penalties (repeat, frequency, presence) → top-k → top-p → min-p →
//! temperature → seeded draw (or argmax when the temperature is zero).
//!
//! All scratch is allocated in [`Sampler::new`]; [`Sampler::sample`] never touches the heap, so
//! decoding a token stays allocation-free.

use alloc::vec::Vec;
use core::cmp::Ordering;

/// Sampling settings. Each filter has a value that switches it off, as in llama.cpp.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one; 0 = off.
    pub min_p: f32,
    /// Divide positive (multiply non-positive) logits of recent tokens by this; 1 = off.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at; 0 = off.
    pub repeat_last_n: usize,
    /// Subtract this × how often a recent token occurs from its logit (OpenAI's
    /// `frequency_penalty`, llama.cpp's `--frequency-penalty`); 0 = off.
    pub frequency_penalty: f32,
    /// Subtract this from the logit of every token that occurs recently (OpenAI's
    /// `presence_penalty`); 0 = off.
    pub presence_penalty: f32,
    /// Seed of the random draw.
    pub seed: u64,
}

impl SamplerConfig {
    /// The default seed. llama.cpp draws a random seed by default; kiln fixes one so that two
    /// runs with default settings produce the same text.
    pub const DEFAULT_SEED: u64 = 0x5EED_C0FFEE;

    /// llama.cpp's defaults with the model's recommended sampling in their place where it has
    /// one (as llama.cpp reads `general.sampling.*`): what a setting the user leaves out takes.
    pub fn for_model(model: &crate::model::SamplingDefaults) -> Self {
        let d = Self::default();
        Self {
            temperature: model.temperature.unwrap_or(d.temperature),
            top_k: model.top_k.map_or(d.top_k, |k| k as usize),
            top_p: model.top_p.unwrap_or(d.top_p),
            min_p: model.min_p.unwrap_or(d.min_p),
            ..d
        }
    }

    /// Greedy decoding: always the most likely token (lowest id on ties), no penalty.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            repeat_penalty: 1.0,
            ..Self::default()
        }
    }
}

impl Default for SamplerConfig {
    /// llama.cpp's defaults, except for the fixed seed.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: Self::DEFAULT_SEED,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Candidate {
    id: u32,
    logit: f32,
}

/// Most likely first; equal logits in id order, so the unstable sorts stay deterministic.
fn by_logit_desc(a: &Candidate, b: &Candidate) -> Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// Softmax weight of `logit` relative to `max`, without normalisation. Comparing for equality
/// first keeps infinite logits well defined (`inf - inf` would be NaN).
fn weight(logit: f32, max: f32) -> f32 {
    if logit == max {
        1.0
    } else {
        libm::expf(logit - max)
    }
}

/// PCG32 (XSH-RR variant): small, fast, and the same stream on every platform for a seed.
#[derive(Debug, Clone)]
struct Pcg32 {
    state: u64,
}

impl Pcg32 {
    const MULTIPLIER: u64 = 6364136223846793005;
    const INCREMENT: u64 = 1442695040888963407;

    fn new(seed: u64) -> Self {
        let mut rng = Self { state: 0 };
        rng.next_u32();
        rng.state = rng.state.wrapping_add(seed);
        rng.next_u32();
        rng
    }

    fn next_u32(&mut self) -> u32 {
        let old = self.state;
        self.state = old
            .wrapping_mul(Self::MULTIPLIER)
            .wrapping_add(Self::INCREMENT);
        let xorshifted = (((old >> 18) ^ old) >> 27) as u32;
        let rot = (old >> 59) as u32;
        xorshifted.rotate_right(rot)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision (every value exactly representable).
    fn next_f32(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

/// Picks the next token from a row of logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplerConfig,
    vocab_size: usize,
    candidates: Vec<Candidate>,
    /// Ring of the last `repeat_last_n` accepted ids.
    history: Vec<u32>,
    history_next: usize,
    /// Sorted copy of `history`: each id is penalised once, by how often it occurs.
    distinct: Vec<u32>,
    rng: Pcg32,
}

impl Sampler {
    /// Creates a sampler for logits of `vocab_size` entries, allocating all its scratch now.
    pub fn new(config: SamplerConfig, vocab_size: usize) -> Self {
        let penalized = config.repeat_penalty != 1.0
            || config.frequency_penalty != 0.0
            || config.presence_penalty != 0.0;
        let history_len = if penalized { config.repeat_last_n } else { 0 };
        Self {
            config,
            vocab_size,
            candidates: Vec::with_capacity(vocab_size),
            history: Vec::with_capacity(history_len),
            history_next: 0,
            distinct: Vec::with_capacity(history_len),
            rng: Pcg32::new(config.seed),
        }
    }

    /// Records a token (prompt or generated) for the penalties.
    pub fn accept(&mut self, id: u32) {
        let cap = self.history.capacity();
        if cap == 0 {
            return;
        }
        if self.history.len() < cap {
            self.history.push(id);
        } else {
            self.history[self.history_next] = id;
        }
        self.history_next = (self.history_next + 1) % cap;
    }

    /// Forgets the history and restarts the random stream from the seed.
    pub fn reset(&mut self) {
        self.history.clear();
        self.history_next = 0;
        self.rng = Pcg32::new(self.config.seed);
    }

    /// Chooses the next token id. Entries beyond `vocab_size` are ignored, NaN counts as
    /// `-inf`, and an empty row yields 0. Performs no heap allocation.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_where(logits, |_| true)
    }

    /// [`Sampler::sample`] among the ids `allowed` accepts (a grammar's mask, which always
    /// accepts one at least): the others count as `-inf`, before the repeat penalty and every
    /// filter.
    pub fn sample_where(&mut self, logits: &[f32], allowed: impl Fn(u32) -> bool) -> u32 {
        self.candidates.clear();
        self.candidates
            .extend(
                logits
                    .iter()
                    .take(self.vocab_size)
                    .enumerate()
                    .map(|(id, &logit)| Candidate {
                        id: id as u32,
                        logit: if logit.is_nan() || !allowed(id as u32) {
                            f32::NEG_INFINITY
                        } else {
                            logit
                        },
                    }),
            );
        if self.candidates.is_empty() {
            return 0;
        }
        self.apply_repeat_penalty();

        let c = self.config;
        if c.temperature <= 0.0 {
            return self.argmax();
        }
        if c.top_k > 0 && c.top_k < self.candidates.len() {
            self.candidates
                .select_nth_unstable_by(c.top_k - 1, by_logit_desc);
            self.candidates.truncate(c.top_k);
            self.candidates.sort_unstable_by(by_logit_desc);
        } else if c.top_k > 0 || c.top_p < 1.0 || c.min_p > 0.0 {
            self.candidates.sort_unstable_by(by_logit_desc);
        }
        if c.top_p < 1.0 {
            self.top_p(c.top_p);
        }
        if c.min_p > 0.0 {
            self.min_p(c.min_p);
        }
        for cand in &mut self.candidates {
            cand.logit /= c.temperature;
        }
        self.draw()
    }

    /// llama.cpp's penalties over the recent tokens: each id that occurs `n` times has its
    /// logit divided (positive) or multiplied (otherwise) by the repeat penalty, then lowered
    /// by `n` × the frequency penalty and once by the presence penalty.
    fn apply_repeat_penalty(&mut self) {
        let c = self.config;
        if self.history.is_empty() {
            return;
        }
        self.distinct.clear();
        self.distinct.extend_from_slice(&self.history);
        self.distinct.sort_unstable();
        // Candidates are still in id order here, so an id indexes its own candidate.
        for run in self.distinct.chunk_by(|a, b| a == b) {
            let Some(cand) = self.candidates.get_mut(run[0] as usize) else {
                continue;
            };
            cand.logit = if cand.logit <= 0.0 {
                cand.logit * c.repeat_penalty
            } else {
                cand.logit / c.repeat_penalty
            };
            cand.logit -= run.len() as f32 * c.frequency_penalty + c.presence_penalty;
        }
    }

    fn argmax(&self) -> u32 {
        let mut best = self.candidates[0];
        for &cand in &self.candidates[1..] {
            if cand.logit > best.logit {
                best = cand;
            }
        }
        best.id
    }

    /// Keeps the shortest most-likely prefix whose probability reaches `p` (at least one).
    /// Expects candidates sorted most likely first.
    fn top_p(&mut self, p: f32) {
        let max = self.candidates[0].logit;
        let total: f32 = self.candidates.iter().map(|c| weight(c.logit, max)).sum();
        let mut cumulative = 0.0;
        let mut keep = self.candidates.len();
        for (i, cand) in self.candidates.iter().enumerate() {
            cumulative += weight(cand.logit, max) / total;
            if cumulative >= p {
                keep = i + 1;
                break;
            }
        }
        self.candidates.truncate(keep);
    }

    /// Keeps candidates at least `p` times as likely as the best one (at least one).
    /// Expects candidates sorted most likely first.
    fn min_p(&mut self, p: f32) {
        let max = self.candidates[0].logit;
        let threshold = libm::logf(p);
        let keep = self
            .candidates
            .iter()
            .take_while(|c| c.logit == max || c.logit - max >= threshold)
            .count();
        self.candidates.truncate(keep.max(1));
    }

    /// Draws from the softmax of the remaining candidates.
    fn draw(&mut self) -> u32 {
        let max = self
            .candidates
            .iter()
            .fold(f32::NEG_INFINITY, |m, c| m.max(c.logit));
        let total: f32 = self.candidates.iter().map(|c| weight(c.logit, max)).sum();
        let target = self.rng.next_f32() * total;
        let mut cumulative = 0.0;
        for cand in &self.candidates {
            cumulative += weight(cand.logit, max);
            if target < cumulative {
                return cand.id;
            }
        }
        // Rounding can leave `target` a hair above the last partial sum.
        self.candidates[self.candidates.len() - 1].id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn cfg() -> SamplerConfig {
        SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 7,
        }
    }

    /// Pseudo-random logits in [-8, 8), reproducible without a `rand` dependency.
    fn logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = Pcg32::new(seed);
        (0..n).map(|_| rng.next_f32() * 16.0 - 8.0).collect()
    }

    fn softmax(logits: &[f32], temp: f32) -> Vec<f64> {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let w: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temp as f64).exp())
            .collect();
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    /// Which ids a config can ever produce, found by drawing many times.
    fn support(config: SamplerConfig, logits: &[f32], draws: usize) -> Vec<u32> {
        let mut s = Sampler::new(config, logits.len());
        let mut seen = vec![false; logits.len()];
        for _ in 0..draws {
            seen[s.sample(logits) as usize] = true;
        }
        (0..logits.len() as u32)
            .filter(|&i| seen[i as usize])
            .collect()
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplerConfig::greedy(), 5);
        assert_eq!(s.sample(&[0.1, 3.0, -2.0, 2.9, 0.0]), 1);
        assert_eq!(s.sample(&[1.0, 5.0, 5.0, 5.0, 0.0]), 1);
        let row = logits(1000, 3);
        let mut s = Sampler::new(SamplerConfig::greedy(), 1000);
        let expected = (0..1000)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a)))
            .unwrap() as u32;
        assert_eq!(s.sample(&row), expected);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut greedy = Sampler::new(SamplerConfig::greedy(), 4096);
        let mut k1 = Sampler::new(
            SamplerConfig {
                top_k: 1,
                temperature: 1.5,
                ..SamplerConfig::default()
            },
            4096,
        );
        for seed in 0..50 {
            let row = logits(4096, seed);
            assert_eq!(k1.sample(&row), greedy.sample(&row));
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let row = logits(256, 11);
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg() }, 256);
            (0..64).map(|_| s.sample(&row)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));

        let mut s = Sampler::new(SamplerConfig { seed: 1, ..cfg() }, 256);
        let first: Vec<u32> = (0..64).map(|_| s.sample(&row)).collect();
        s.reset();
        let again: Vec<u32> = (0..64).map(|_| s.sample(&row)).collect();
        assert_eq!(first, again);
    }

    #[test]
    fn frequencies_match_softmax_with_temperature() {
        let row = [1.0f32, 0.0, 2.0, -1.0, 0.5];
        let temp = 0.7;
        let expected = softmax(&row, temp);
        let mut s = Sampler::new(
            SamplerConfig {
                temperature: temp,
                ..cfg()
            },
            row.len(),
        );
        let draws = 20_000;
        let mut counts = [0usize; 5];
        for _ in 0..draws {
            counts[s.sample(&row) as usize] += 1;
        }
        for (i, &p) in expected.iter().enumerate() {
            let freq = counts[i] as f64 / draws as f64;
            // Five standard deviations of a binomial proportion.
            let tol = 5.0 * (p * (1.0 - p) / draws as f64).sqrt();
            assert!(
                (freq - p).abs() <= tol,
                "id {i}: frequency {freq} vs probability {p} (tolerance {tol})"
            );
        }
    }

    #[test]
    fn top_k_keeps_the_k_best() {
        let row = [0.0f32, 3.0, 1.0, 2.9, -1.0, 2.0];
        let got = support(SamplerConfig { top_k: 3, ..cfg() }, &row, 3000);
        assert_eq!(got, vec![1, 3, 5]);
    }

    #[test]
    fn top_p_keeps_the_prefix_that_reaches_p() {
        // Probabilities 0.5, 0.25, 0.125, 0.125 (ids 2, 0, 1, 3).
        let l = |p: f32| libm::logf(p);
        let row = [l(0.25), l(0.125), l(0.5), l(0.125)];
        assert_eq!(
            support(
                SamplerConfig {
                    top_p: 0.45,
                    ..cfg()
                },
                &row,
                2000
            ),
            vec![2]
        );
        assert_eq!(
            support(
                SamplerConfig {
                    top_p: 0.6,
                    ..cfg()
                },
                &row,
                2000
            ),
            vec![0, 2]
        );
        assert_eq!(
            support(
                SamplerConfig {
                    top_p: 0.8,
                    ..cfg()
                },
                &row,
                4000
            ),
            vec![0, 1, 2]
        );
    }

    #[test]
    fn min_p_drops_tokens_below_the_ratio() {
        let l = |p: f32| libm::logf(p);
        // Ratios to the best (id 2): 0.4, 0.1, 1, 0.02, 0.2.
        let row = [l(0.2), l(0.05), l(0.5), l(0.01), l(0.1)];
        assert_eq!(
            support(
                SamplerConfig {
                    min_p: 0.3,
                    ..cfg()
                },
                &row,
                2000
            ),
            vec![0, 2]
        );
        assert_eq!(
            support(
                SamplerConfig {
                    min_p: 0.15,
                    ..cfg()
                },
                &row,
                4000
            ),
            vec![0, 2, 4]
        );
        // Above 1 nothing qualifies, but the best token always survives.
        assert_eq!(
            support(
                SamplerConfig {
                    min_p: 2.0,
                    ..cfg()
                },
                &row,
                200
            ),
            vec![2]
        );
    }

    #[test]
    fn frequency_and_presence_penalties_subtract_as_llama_cpp_does() {
        // Logits 3.0, 2.5, 2.0; id 0 seen twice, id 1 once.
        let logits = [3.0, 2.5, 2.0];
        let pick = |frequency_penalty: f32, presence_penalty: f32| {
            let mut s = Sampler::new(
                SamplerConfig {
                    frequency_penalty,
                    presence_penalty,
                    ..SamplerConfig::greedy()
                },
                3,
            );
            for id in [0, 0, 1] {
                s.accept(id);
            }
            s.sample(&logits)
        };
        assert_eq!(pick(0.0, 0.0), 0);
        // 3.0 - 2×0.3 = 2.4 still beats 2.5 - 0.3 = 2.2 and 2.0.
        assert_eq!(pick(0.3, 0.0), 0);
        // 3.0 - 2×0.6 = 1.8, 2.5 - 0.6 = 1.9, 2.0: id 2.
        assert_eq!(pick(0.6, 0.0), 2);
        // Presence: 3.0 - 0.6 = 2.4, 2.5 - 0.6 = 1.9, 2.0: id 0; - 1.1 each: id 2.
        assert_eq!(pick(0.0, 0.6), 0);
        assert_eq!(pick(0.0, 1.1), 2);
    }

    #[test]
    fn repeat_penalty_changes_the_argmax() {
        let config = SamplerConfig {
            repeat_penalty: 1.5,
            repeat_last_n: 4,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            ..SamplerConfig::greedy()
        };
        let row = [3.0f32, 2.5, -1.0, 0.0];
        let mut s = Sampler::new(config, 4);
        assert_eq!(s.sample(&row), 0);
        // 3.0 / 1.5 = 2.0 < 2.5, however often 0 was seen.
        s.accept(0);
        s.accept(0);
        assert_eq!(s.sample(&row), 1);
        // Negative logits are multiplied: -1 * 1.5 = -1.5 < 0 * 1.5 for id 3.
        let row = [-1.0f32, -1.2, -5.0, -5.0];
        let mut s = Sampler::new(config, 4);
        s.accept(0);
        assert_eq!(s.sample(&row), 1);
        // Once 0 falls out of the last 4, the penalty no longer applies.
        for id in [2, 3, 2, 3] {
            s.accept(id);
        }
        assert_eq!(s.sample(&row), 0);
        s.accept(0);
        s.reset();
        assert_eq!(s.sample(&row), 0);
    }

    #[test]
    fn bad_input_does_not_panic() {
        let mut s = Sampler::new(SamplerConfig::default(), 4);
        assert_eq!(s.sample(&[]), 0);
        assert_eq!(s.sample(&[f32::NAN, 10.0, f32::NAN, 0.0]), 1);
        let id = s.sample(&[f32::NAN; 4]);
        assert!(id < 4);
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0, f32::NEG_INFINITY]), 1);
        // Longer than the vocabulary: the tail is ignored.
        assert_eq!(
            Sampler::new(SamplerConfig::greedy(), 2).sample(&[0.0, 1.0, 9.0]),
            1
        );
        // Ids outside the vocabulary in the history are ignored.
        let mut s = Sampler::new(
            SamplerConfig {
                repeat_penalty: 2.0,
                ..SamplerConfig::greedy()
            },
            2,
        );
        s.accept(u32::MAX);
        assert_eq!(s.sample(&[0.0, 1.0]), 1);
    }
}
