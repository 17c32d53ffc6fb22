"""Reference dequantization for kiln's block-format tests, from code kiln did not write.

Reads rows of ggml blocks and writes their values as little-endian f32, dequantized by the
`gguf` package (llama.cpp's own Python reader, gguf-py).

usage: ggml_dequant.py TYPE ROW_BYTES IN OUT   (TYPE: a GGMLQuantizationType name, e.g. Q4_K)
"""

import sys

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize


def main() -> None:
    qtype, row_bytes, src, dst = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with open(src, "rb") as f:
        data = np.frombuffer(f.read(), dtype=np.uint8)
    rows = data.reshape(-1, row_bytes)
    values = dequantize(rows, GGMLQuantizationType[qtype]).astype("<f4")
    with open(dst, "wb") as f:
        f.write(values.tobytes())


if __name__ == "__main__":
    main()
