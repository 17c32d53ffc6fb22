//! Logits saved by one run and compared with another's, as llama.cpp's
//! `llama-perplexity --kl-divergence-base` does: `kiln perplexity` writes the logits of every
//! token it scores, then another model, kernel level or machine is scored over the same
//! windows and compared row by row (KL divergence, top-1 agreement, largest logit gap).
//!
//! The file (little-endian): magic `KILNLOGT`, version u32, vocabulary u32, window length
//! (`--ctx`) u32, window count u32; then per window its token ids (u32 each) followed by the
//! f32 logits of its scored positions (the second half, as [`crate::perplexity`] scores).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

pub const MAGIC: [u8; 8] = *b"KILNLOGT";
/// Bumped on any change a reader of the previous version would misread.
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 24;

/// The windows a logits file covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub vocab: usize,
    /// Tokens per window.
    pub ctx: usize,
    pub chunks: usize,
}

impl Header {
    /// The first scored position of a window (its first half is context only).
    pub fn first_scored(&self) -> usize {
        self.ctx / 2
    }

    /// Scored positions per window: each predicts the next token, so the last one is not.
    pub fn rows(&self) -> usize {
        self.ctx - 1 - self.first_scored()
    }
}

/// Why a logits file could not be read or does not fit the run it is compared with.
#[derive(Debug, thiserror::Error)]
pub enum LogitsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a kiln logits file (wrong magic)")]
    BadMagic { path: PathBuf },
    #[error("{path}: logits file version {found}, this kiln reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated: window {chunk} of {chunks} is incomplete")]
    Truncated {
        path: PathBuf,
        chunk: usize,
        chunks: usize,
    },
    #[error("{path}: {what}")]
    Mismatch { path: PathBuf, what: String },
}

/// Writes a logits file through a temporary file beside it, renamed into place by
/// [`LogitsWriter::finish`]: an interrupted run leaves any earlier file as it was.
pub struct LogitsWriter {
    out: BufWriter<tempfile::NamedTempFile>,
    path: PathBuf,
    header: Header,
    written: usize,
}

impl LogitsWriter {
    pub fn create(path: &Path, header: Header) -> Result<LogitsWriter, LogitsError> {
        let io = |source| LogitsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::Builder::new()
            .prefix(".kiln-logits-")
            .tempfile_in(dir)
            .map_err(io)?;
        let mut out = BufWriter::new(tmp);
        let mut head = Vec::with_capacity(HEADER_LEN);
        head.extend_from_slice(&MAGIC);
        for v in [VERSION as usize, header.vocab, header.ctx, header.chunks] {
            head.extend_from_slice(&(v as u32).to_le_bytes());
        }
        out.write_all(&head).map_err(io)?;
        Ok(LogitsWriter {
            out,
            path: path.to_path_buf(),
            header,
            written: 0,
        })
    }

    /// Appends one window: its `ctx` token ids and its `rows × vocab` scored logits.
    pub fn chunk(&mut self, window: &[u32], logits: &[f32]) -> Result<(), LogitsError> {
        let h = self.header;
        assert!(
            window.len() == h.ctx && logits.len() == h.rows() * h.vocab && self.written < h.chunks,
            "logits window does not match the file's header"
        );
        let io = |source| LogitsError::Io {
            path: self.path.clone(),
            source,
        };
        let mut bytes = Vec::with_capacity(4 * (window.len() + logits.len()));
        bytes.extend(window.iter().flat_map(|t| t.to_le_bytes()));
        bytes.extend(logits.iter().flat_map(|v| v.to_le_bytes()));
        self.out.write_all(&bytes).map_err(io)?;
        self.written += 1;
        Ok(())
    }

    /// Renames the file into place once every window is written.
    pub fn finish(self) -> Result<(), LogitsError> {
        let path = self.path;
        let io = |source| LogitsError::Io {
            path: path.clone(),
            source,
        };
        assert_eq!(self.written, self.header.chunks, "unwritten logits windows");
        let tmp = self.out.into_inner().map_err(|e| io(e.into_error()))?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&path).map_err(|e| io(e.error))?;
        Ok(())
    }
}

/// Reads a logits file window by window.
pub struct LogitsReader {
    input: BufReader<File>,
    path: PathBuf,
    header: Header,
    read: usize,
}

impl LogitsReader {
    pub fn open(path: &Path) -> Result<LogitsReader, LogitsError> {
        let io = |source| LogitsError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut input = BufReader::new(File::open(path).map_err(io)?);
        let mut head = [0u8; HEADER_LEN];
        input.read_exact(&mut head).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => LogitsError::BadMagic {
                path: path.to_path_buf(),
            },
            _ => io(e),
        })?;
        if head[..8] != MAGIC {
            return Err(LogitsError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        let field = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
        if field(8) != VERSION {
            return Err(LogitsError::Version {
                path: path.to_path_buf(),
                found: field(8),
            });
        }
        let header = Header {
            vocab: field(12) as usize,
            ctx: field(16) as usize,
            chunks: field(20) as usize,
        };
        if header.vocab == 0 || header.ctx < 4 {
            return Err(LogitsError::Mismatch {
                path: path.to_path_buf(),
                what: format!(
                    "implausible header (vocabulary {}, windows of {})",
                    header.vocab, header.ctx
                ),
            });
        }
        Ok(LogitsReader {
            input,
            path: path.to_path_buf(),
            header,
            read: 0,
        })
    }

    pub fn header(&self) -> Header {
        self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the next window into `window` (`ctx` ids) and `logits` (`rows × vocab`).
    pub fn chunk(&mut self, window: &mut [u32], logits: &mut [f32]) -> Result<(), LogitsError> {
        let h = self.header;
        assert!(window.len() == h.ctx && logits.len() == h.rows() * h.vocab);
        let truncated = || LogitsError::Truncated {
            path: self.path.clone(),
            chunk: self.read,
            chunks: h.chunks,
        };
        if self.read >= h.chunks {
            return Err(truncated());
        }
        let mut bytes = vec![0u8; 4 * (window.len() + logits.len())];
        self.input
            .read_exact(&mut bytes)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => truncated(),
                _ => LogitsError::Io {
                    path: self.path.clone(),
                    source: e,
                },
            })?;
        let mut words = bytes.chunks_exact(4).map(|b| [b[0], b[1], b[2], b[3]]);
        for (t, w) in window.iter_mut().zip(&mut words) {
            *t = u32::from_le_bytes(w);
        }
        for (v, w) in logits.iter_mut().zip(&mut words) {
            *v = f32::from_le_bytes(w);
        }
        self.read += 1;
        Ok(())
    }
}

/// How one row of logits differs from the base row it is compared with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowDivergence {
    /// `KL(base ‖ other)` of the two softmax distributions, in nats.
    pub kld: f64,
    /// The base row's and the other row's most likely ids.
    pub base_top: usize,
    pub top: usize,
    /// How far the base row's top logit leads its runner-up.
    pub base_margin: f32,
    /// The largest `|other − base|` over the vocabulary.
    pub max_abs_diff: f32,
}

fn top2(row: &[f32]) -> (usize, f32) {
    let mut best = (0, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            best = (i, v, best.1);
        } else if v > best.2 {
            best.2 = v;
        }
    }
    (best.0, best.1 - best.2)
}

/// The row's largest value and `ln Σ e^(row − max)`, in f64 as llama.cpp sums them.
fn max_and_log_sum(row: &[f32]) -> (f32, f64) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&v| f64::from(v - max).exp()).sum();
    (max, sum.ln())
}

/// Compares `other` with `base` (two rows of logits over the same vocabulary).
pub fn compare(base: &[f32], other: &[f32]) -> RowDivergence {
    let ((mb, lb), (mo, lo)) = (max_and_log_sum(base), max_and_log_sum(other));
    let mut kld = 0f64;
    let mut max_abs_diff = 0f32;
    for (&b, &o) in base.iter().zip(other) {
        let log_pb = f64::from(b - mb) - lb;
        kld += log_pb.exp() * (log_pb - (f64::from(o - mo) - lo));
        max_abs_diff = max_abs_diff.max((o - b).abs());
    }
    let (base_top, base_margin) = top2(base);
    RowDivergence {
        kld: kld.max(0.0),
        base_top,
        top: top2(other).0,
        base_margin,
        max_abs_diff,
    }
}

/// `log softmax(row)[target]`, accumulated in f64 as llama.cpp does.
pub fn log_prob(row: &[f32], target: usize) -> f64 {
    let (max, log_sum) = max_and_log_sum(row);
    f64::from(row[target] - max) - log_sum
}

/// The divergence of a run from its base over every scored row, as llama.cpp reports it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Divergence {
    pub rows: usize,
    /// Perplexity of the base logits over the same tokens.
    pub base_ppl: f64,
    pub kld_mean: f64,
    pub kld_max: f64,
    /// Percent of rows whose most likely id is the base's.
    pub same_top_p: f64,
    pub max_abs_logit_diff: f32,
    #[serde(skip)]
    base_nll: f64,
    #[serde(skip)]
    kld_sum: f64,
    #[serde(skip)]
    same: usize,
}

impl Divergence {
    /// Adds one row, whose base predicted `target` with log-probability `base_log_prob`.
    pub fn add(&mut self, row: &RowDivergence, base_log_prob: f64) {
        self.rows += 1;
        self.base_nll -= base_log_prob;
        self.kld_sum += row.kld;
        self.kld_max = self.kld_max.max(row.kld);
        self.same += usize::from(row.top == row.base_top);
        self.max_abs_logit_diff = self.max_abs_logit_diff.max(row.max_abs_diff);
        let n = self.rows as f64;
        self.base_ppl = (self.base_nll / n).exp();
        self.kld_mean = self.kld_sum / n;
        self.same_top_p = 100.0 * self.same as f64 / n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            vocab: 5,
            ctx: 6,
            chunks: 2,
        }
    }

    #[test]
    fn a_written_file_reads_back_and_truncation_is_named() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("base.logits");
        let h = header();
        let mut w = LogitsWriter::create(&path, h).expect("create");
        let rows = h.rows() * h.vocab;
        for c in 0..2u32 {
            let window: Vec<u32> = (0..6).map(|i| c * 10 + i).collect();
            let logits: Vec<f32> = (0..rows).map(|i| i as f32 * 0.5 - c as f32).collect();
            w.chunk(&window, &logits).expect("chunk");
        }
        assert!(!path.exists(), "visible before finish");
        w.finish().expect("finish");
        let mut r = LogitsReader::open(&path).expect("open");
        assert_eq!(r.header(), h);
        let (mut window, mut logits) = (vec![0u32; 6], vec![0f32; rows]);
        r.chunk(&mut window, &mut logits).expect("first");
        r.chunk(&mut window, &mut logits).expect("second");
        assert_eq!(window, [10, 11, 12, 13, 14, 15]);
        assert_eq!(logits[3], 0.5);
        assert!(matches!(
            r.chunk(&mut window, &mut logits),
            Err(LogitsError::Truncated { chunk: 2, .. })
        ));

        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("cut");
        let mut r = LogitsReader::open(&path).expect("open");
        r.chunk(&mut window, &mut logits).expect("first is whole");
        let err = r.chunk(&mut window, &mut logits).unwrap_err().to_string();
        assert!(
            err.contains("base.logits") && err.contains("window 1 of 2"),
            "{err}"
        );
        std::fs::write(&path, b"not logits at all, not at all").expect("write");
        assert!(matches!(
            LogitsReader::open(&path),
            Err(LogitsError::BadMagic { .. })
        ));
    }

    #[test]
    fn identical_rows_do_not_diverge_and_a_flip_is_counted() {
        let base = [1.0, 3.0, 2.5, -1.0];
        let same = compare(&base, &base);
        assert_eq!((same.kld, same.max_abs_diff, same.top), (0.0, 0.0, 1));
        assert_eq!(same.base_margin, 0.5);
        let flipped = compare(&base, &[1.0, 2.5, 3.0, -1.0]);
        assert_eq!((flipped.base_top, flipped.top), (1, 2));
        assert!(flipped.kld > 0.0 && flipped.max_abs_diff == 0.5);
        let mut d = Divergence::default();
        d.add(&same, log_prob(&base, 1));
        d.add(&flipped, log_prob(&base, 1));
        assert_eq!((d.rows, d.same_top_p), (2, 50.0));
        assert!((d.kld_mean - flipped.kld / 2.0).abs() < 1e-12);
        assert!((d.base_ppl - (-log_prob(&base, 1)).exp()).abs() < 1e-9);
    }
}
