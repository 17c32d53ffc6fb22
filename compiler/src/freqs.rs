//! RoPE base θ and Llama 3 `rope_scaling` recovered from the inverse frequencies a graph
//! rotates by, accepted only when kiln's own formula reproduces every frequency.
//!
//! Unscaled and fully scaled frequencies both step by θ^(-2/head_dim), which gives θ.
//! `llama3` scaling divides the low frequencies by `factor` and blends the band between; only
//! `low_freq_factor`, `high_freq_factor` and `original_max_position_embeddings` together shape
//! that band, so Llama 3's `1` and `4` are assumed first and the context solved from the band.

use std::f64::consts::PI;

use kiln_runtime::model::{rope_inv_freq, Llama3RopeScaling};

/// Largest relative difference between a recovered frequency and kiln's.
pub const MATCH: f64 = 1e-6;
/// Llama 3's band edges (every released `llama3` config).
const LOW_FREQ_FACTOR: f64 = 1.0;
const HIGH_FREQ_FACTOR: f64 = 4.0;
/// Llama 3's pre-extension context, preferred when the band does not pin it down.
const LLAMA3_CONTEXT: f64 = 8192.0;

/// RoPE parameters as kiln's facts hold them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rope {
    pub theta: f32,
    pub scaling: Option<Llama3RopeScaling>,
}

/// Whether kiln's frequencies for `rope` are `freqs` to [`MATCH`].
pub fn reproduces(rope: &Rope, head_dim: usize, freqs: &[f64]) -> bool {
    let ours = rope_inv_freq(head_dim, rope.theta, rope.scaling.as_ref());
    ours.len() == freqs.len()
        && ours
            .iter()
            .zip(freqs)
            .all(|(&o, &g)| g > 0.0 && ((f64::from(o) - g) / g).abs() <= MATCH)
}

/// θ and scaling whose frequencies are `freqs`, if the formula kiln implements makes them.
pub fn fit(freqs: &[f64], head_dim: usize) -> Option<Rope> {
    let d = head_dim as f64;
    if freqs.len() < 2 || freqs.iter().any(|&f| f.is_nan() || f <= 0.0) {
        // One pair always turns at 1 rad per position, whatever θ.
        let rope = Rope {
            theta: 10_000.0,
            scaling: None,
        };
        return reproduces(&rope, head_dim, freqs).then_some(rope);
    }
    // Outside llama3's blended band the frequencies are geometric with ratio θ^(-2/d): each
    // group of equal log-steps proposes a θ, averaged over the group for precision.
    let logs: Vec<f64> = freqs.iter().map(|f| f.ln()).collect();
    let steps: Vec<f64> = logs.windows(2).map(|w| w[1] - w[0]).collect();
    let mut thetas: Vec<f64> = Vec::new();
    for &seed in &steps {
        let group: Vec<f64> = steps
            .iter()
            .copied()
            .filter(|s| (s - seed).abs() <= 1e-4 * seed.abs())
            .collect();
        let slope = group.iter().sum::<f64>() / group.len() as f64;
        let theta = (-slope * d / 2.0).exp();
        for t in [theta.round(), theta] {
            if !thetas.contains(&t) {
                thetas.push(t);
            }
        }
    }
    thetas
        .iter()
        .flat_map(|&t| {
            let plain = Rope {
                theta: t as f32,
                scaling: None,
            };
            std::iter::once(plain).chain(llama3(freqs, t, d).unwrap_or_default())
        })
        .find(|rope| reproduces(rope, head_dim, freqs))
}

/// Candidate `llama3` scalings over base `theta`.
fn llama3(freqs: &[f64], theta: f64, d: f64) -> Option<Vec<Rope>> {
    let base = |j: usize| theta.powf(-2.0 * j as f64 / d);
    let ratios: Vec<f64> = (0..freqs.len()).map(|j| freqs[j] / base(j)).collect();
    let factor = 1.0 / ratios.last()?;
    if factor <= 1.0 + 1e-6 {
        return None;
    }
    let factor = if (factor - factor.round()).abs() < 1e-3 {
        factor.round()
    } else {
        factor
    };
    let wavelen = |j: usize| 2.0 * PI / base(j);
    // Pairs inside the blended band, as (1 / wavelength, blend).
    let band: Vec<(f64, f64)> = ratios
        .iter()
        .enumerate()
        .map(|(j, r)| (1.0 / wavelen(j), (r - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .filter(|&(_, s)| s > 1e-4 && s < 1.0 - 1e-4)
        .collect();
    let mut contexts = Vec::new();
    if band.is_empty() {
        // Any context between the band edges gives the same frequencies.
        let high = (0..freqs.len())
            .filter(|&j| ratios[j] > 0.5)
            .map(wavelen)
            .fold(0.0, f64::max);
        let low = (0..freqs.len())
            .filter(|&j| ratios[j] <= 0.5)
            .map(wavelen)
            .fold(f64::MAX, f64::min);
        let (from, to) = (high * HIGH_FREQ_FACTOR, low * LOW_FREQ_FACTOR);
        contexts.push(if (from..to).contains(&LLAMA3_CONTEXT) {
            LLAMA3_CONTEXT
        } else {
            ((from + to) / 2.0).round()
        });
    } else {
        // blend = (context / wavelength - low) / (high - low)
        let each = band
            .iter()
            .map(|&(inv, s)| (s * (HIGH_FREQ_FACTOR - LOW_FREQ_FACTOR) + LOW_FREQ_FACTOR) / inv);
        contexts.push((each.sum::<f64>() / band.len() as f64).round());
    }
    let mut ropes: Vec<Rope> = contexts
        .into_iter()
        .map(|context| scaling(theta, factor, LOW_FREQ_FACTOR, HIGH_FREQ_FACTOR, context))
        .collect();
    if band.len() >= 2 {
        // Other band edges: a least-squares line blend = a / wavelength - b, low = 1.
        let n = band.len() as f64;
        let (sx, sy) = band
            .iter()
            .fold((0.0, 0.0), |(x, y), &(i, s)| (x + i, y + s));
        let (sxx, sxy) = band
            .iter()
            .fold((0.0, 0.0), |(xx, xy), &(i, s)| (xx + i * i, xy + i * s));
        let a = (n * sxy - sx * sy) / (n * sxx - sx * sx);
        let b = (a * sx - sy) / n;
        if a > 0.0 && b > 0.0 {
            let high = 1.0 + 1.0 / b;
            ropes.push(scaling(
                theta,
                factor,
                1.0,
                (high * 1e3).round() / 1e3,
                (a / b).round(),
            ));
        }
    }
    Some(ropes)
}

fn scaling(theta: f64, factor: f64, low: f64, high: f64, context: f64) -> Rope {
    Rope {
        theta: theta as f32,
        scaling: Some(Llama3RopeScaling {
            factor: factor as f32,
            low_freq_factor: low as f32,
            high_freq_factor: high as f32,
            original_max_position_embeddings: context as u32,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn freqs(rope: &Rope, head_dim: usize) -> Vec<f64> {
        rope_inv_freq(head_dim, rope.theta, rope.scaling.as_ref())
            .into_iter()
            .map(f64::from)
            .collect()
    }

    #[test]
    fn recovers_plain_theta() {
        for (theta, d) in [(10_000.0, 64), (100_000.0, 64), (500_000.0, 128)] {
            let rope = Rope {
                theta,
                scaling: None,
            };
            assert_eq!(fit(&freqs(&rope, d), d), Some(rope));
        }
    }

    #[test]
    fn recovers_llama3_scaling() {
        let llama = |factor, context| Rope {
            theta: 500_000.0,
            scaling: Some(Llama3RopeScaling {
                factor,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: context,
            }),
        };
        // Llama 3.2 (head_dim 64, factor 32), 3.1 (128, 8), the tiny test model (16, 32) and
        // the transformers fixture (16, 8, context 64: only the first pair is unscaled).
        for (factor, d, context) in [
            (32.0, 64, 8192),
            (8.0, 128, 8192),
            (32.0, 16, 8192),
            (8.0, 16, 64),
        ] {
            let rope = llama(factor, context);
            let fitted = fit(&freqs(&rope, d), d).expect("fits");
            assert!(reproduces(&fitted, d, &freqs(&rope, d)));
            assert_eq!(fitted.theta, rope.theta);
        }
    }

    #[test]
    fn refuses_frequencies_no_base_makes() {
        let mut f = freqs(
            &Rope {
                theta: 10_000.0,
                scaling: None,
            },
            64,
        );
        f[7] *= 1.01;
        assert_eq!(fit(&f, 64), None);
    }
}
