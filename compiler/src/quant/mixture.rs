//! llama.cpp's K-quant mixtures, `llama-quantize`'s `Q4_K_M`, `Q5_K_M` and `Q6_K` file types:
//! which format each matrix of a Llama model gets, as llama.cpp's `llama_tensor_get_type`
//! (src/llama-quant.cpp) decides it without an importance matrix, fallbacks for rows that hold
//! no whole super-block included.

use kiln_runtime::model::ModelFacts;
use kiln_runtime::quant::Format;

/// One of llama.cpp's K-quant file types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mixture {
    /// Mostly `q4_k`; `q6_k` for the output head and for the value projections and `ffn_down`
    /// of the layers [`use_more_bits`] picks.
    Q4KM,
    /// Mostly `q5_k`, with `Q4_K_M`'s `q6_k` layers.
    Q5KM,
    /// `q6_k` throughout.
    Q6K,
}

/// The facts of a model the mixtures depend on.
#[derive(Clone, Copy, Debug)]
pub struct MixShape {
    pub layers: usize,
    /// The token embedding doubles as the output head (no `output.weight`).
    pub tied: bool,
    /// llama.cpp's `LLM_TYPE_70B` for a Llama: 80 layers with grouped-query attention.
    pub seventy_b: bool,
}

impl MixShape {
    /// The shape of the model `facts` describes; `tied` as its checkpoint stores the head.
    pub fn new(facts: &ModelFacts, tied: bool) -> MixShape {
        MixShape {
            layers: facts.layers,
            tied,
            seventy_b: facts.layers == 80 && facts.heads != facts.kv_heads,
        }
    }
}

/// llama.cpp's choice of layers that get more bits: the first and last eighth, and every third
/// layer in between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// The format llama.cpp falls back to when rows of `cols` values hold no whole block of
/// `format`: a 32-value block format of about the same size, or f16 when even that does not fit.
fn fallback(format: Format, cols: usize) -> Format {
    if cols.is_multiple_of(format.block_len()) {
        return format;
    }
    let smaller = match format {
        Format::Q4K => Format::Q5_0,
        Format::Q5K => Format::Q5_1,
        Format::Q6K => Format::Q8_0,
        other => other,
    };
    if cols.is_multiple_of(smaller.block_len()) {
        smaller
    } else {
        Format::F16
    }
}

/// `blk.N.KIND` as `(N, KIND)`.
fn layer_role(role: &str) -> Option<(usize, &str)> {
    let (layer, kind) = role.strip_prefix("blk.")?.split_once('.')?;
    Some((layer.parse().ok()?, kind))
}

impl Mixture {
    pub const ALL: [Mixture; 3] = [Mixture::Q4KM, Mixture::Q5KM, Mixture::Q6K];

    /// The name `--quant` takes (llama-quantize's, in lower case).
    pub fn name(self) -> &'static str {
        match self {
            Mixture::Q4KM => "q4_k_m",
            Mixture::Q5KM => "q5_k_m",
            Mixture::Q6K => "q6_k",
        }
    }

    pub fn from_name(name: &str) -> Option<Mixture> {
        Mixture::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The format of every matrix no rule singles out.
    fn base(self) -> Format {
        match self {
            Mixture::Q4KM => Format::Q4K,
            Mixture::Q5KM => Format::Q5K,
            Mixture::Q6K => Format::Q6K,
        }
    }

    /// The format of the matrix in canonical role `role` (`token_embd`, `output`,
    /// `blk.3.attn_v`, …) whose rows hold `cols` values.
    pub fn format_for(self, role: &str, cols: usize, shape: &MixShape) -> Format {
        let base = self.base();
        // The output head (or the embedding that serves as one) is q6_k, or q8_0 when its
        // rows hold no whole super-block.
        let head = role == "output" || (role == "token_embd" && shape.tied);
        let wanted = if head {
            if cols.is_multiple_of(base.block_len()) {
                Format::Q6K
            } else {
                Format::Q8_0
            }
        } else {
            match layer_role(role) {
                Some((layer, "attn_v")) => {
                    let more = self != Mixture::Q6K && use_more_bits(layer, shape.layers);
                    match (more, base) {
                        (true, _) => Format::Q6K,
                        // 70B's eight query heads share each value head: the bits are cheap.
                        (false, Format::Q4K) if shape.seventy_b => Format::Q5K,
                        (false, b) => b,
                    }
                }
                Some((layer, "ffn_down"))
                    if self != Mixture::Q6K && use_more_bits(layer, shape.layers) =>
                {
                    Format::Q6K
                }
                _ => base,
            }
        };
        fallback(wanted, cols)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOLLM2: MixShape = MixShape {
        layers: 30,
        tied: true,
        seventy_b: false,
    };

    #[test]
    fn more_bits_go_to_the_ends_and_every_third_layer() {
        let picked: Vec<usize> = (0..30).filter(|&l| use_more_bits(l, 30)).collect();
        assert_eq!(picked, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    #[test]
    fn rows_without_whole_super_blocks_fall_back_as_in_llama_cpp() {
        assert_eq!(fallback(Format::Q4K, 576), Format::Q5_0);
        assert_eq!(fallback(Format::Q5K, 576), Format::Q5_1);
        assert_eq!(fallback(Format::Q6K, 576), Format::Q8_0);
        assert_eq!(fallback(Format::Q4K, 1536), Format::Q4K);
        assert_eq!(fallback(Format::Q4K, 100), Format::F16);
        assert_eq!(fallback(Format::Q8_0, 100), Format::F16);
    }

    #[test]
    fn untied_heads_and_the_70b_value_rule() {
        let untied = MixShape {
            layers: 32,
            tied: false,
            seventy_b: false,
        };
        let q4 = Mixture::Q4KM;
        assert_eq!(q4.format_for("output", 4096, &untied), Format::Q6K);
        assert_eq!(q4.format_for("token_embd", 4096, &untied), Format::Q4K);
        assert_eq!(q4.format_for("token_embd", 576, &SMOLLM2), Format::Q8_0);
        let big = MixShape {
            layers: 80,
            tied: false,
            seventy_b: true,
        };
        assert_eq!(q4.format_for("blk.40.attn_v", 8192, &big), Format::Q5K);
        assert_eq!(q4.format_for("blk.42.attn_v", 8192, &big), Format::Q6K);
        assert_eq!(q4.format_for("blk.40.attn_k", 8192, &big), Format::Q4K);
    }
}
