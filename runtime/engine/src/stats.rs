//! Median and spread of a figure measured over repetitions, for `kiln bench` and
//! `cargo xtask bench`.

/// Median and spread of one figure over the repetitions.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Sample standard deviation (0 for one repetition).
    pub stddev: f64,
    /// In the order measured.
    pub samples: Vec<f64>,
}

impl Stats {
    /// The statistics of `samples` (at least one).
    pub fn of(samples: Vec<f64>) -> Stats {
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        let mean = sorted.iter().sum::<f64>() / n as f64;
        let stddev = if n > 1 {
            (sorted.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Stats {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            stddev,
            samples,
        }
    }

    /// Half the min–max range, in percent of the median.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / 2.0 / self.median.abs() * 100.0
        }
    }

    /// `412.3 tokens/s (min 405.1, max 420.2, sd 6.1)` for `unit` `tokens/s`.
    pub fn describe(&self, unit: &str) -> String {
        format!(
            "{:.1} {unit} (min {:.1}, max {:.1}, sd {:.1})",
            self.median, self.min, self.max, self.stddev
        )
    }

    /// `412.3 ±0.9%` with `decimals` decimals.
    pub fn cell(&self, decimals: usize) -> String {
        format!(
            "{:.d$} ±{:.1}%",
            self.median,
            self.spread_pct(),
            d = decimals
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_of_an_even_count_is_the_mean_of_the_middle_two() {
        let s = Stats::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!(s.median, 2.5);
        assert_eq!((s.min, s.max), (1.0, 4.0));
        assert_eq!(
            s.samples,
            vec![4.0, 1.0, 3.0, 2.0],
            "samples keep their order"
        );
        assert!((s.stddev - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(s.spread_pct(), 60.0);
    }

    #[test]
    fn one_sample_has_no_spread_and_cells_format() {
        let s = Stats::of(vec![7.5]);
        assert_eq!((s.median, s.min, s.max, s.stddev), (7.5, 7.5, 7.5, 0.0));
        assert_eq!(s.spread_pct(), 0.0);
        assert_eq!(
            Stats::of(vec![3.0, 9.0, 6.0]).describe("ms"),
            "6.0 ms (min 3.0, max 9.0, sd 3.0)"
        );
        assert_eq!(Stats::of(vec![98.0, 100.0, 102.0]).cell(1), "100.0 ±2.0%");
    }
}
