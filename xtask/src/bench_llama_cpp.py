"""llama.cpp's side of `cargo xtask bench`, through llama-cpp-python's low-level API.

  python3 -c SCRIPT version
      prints {"llama_cpp_python": VERSION}
  python3 -c SCRIPT quantize SRC DST QUANT THREADS
      writes DST from the GGUF SRC with llama.cpp's own quantizer (requantizing quantized
      tensors; with a 4-bit QUANT the token embedding and output head get q8_0, as kiln's do)
  python3 -c SCRIPT bench MODEL THREADS N_PROMPT N_GEN DEPTH
      one repetition, as `kiln bench --reps 1` measures it: DEPTH random tokens are cached
      (untimed), one untimed warm-up, then N_PROMPT random tokens in one pass (prompt speed;
      time to first token includes picking that token), the cache is cut back to DEPTH and
      N_GEN tokens are decoded one at a time; prints one JSON object

The CPU backend's extra buffer types (weights repacked for AMX and others) are off (llama-cpp-python
0.3.36's build segfaults on its first pass with them on, seen on AVX-512 x86-64), flash
attention is off, the KV cache is f16 (llama.cpp's default). Peak RSS leaves out the Python
interpreter and numpy, measured before llama.cpp's libraries are loaded.
"""

import ctypes
import json
import sys
import time

import numpy as np


def peak_rss_mb():
    """VmHWM of this process, as kiln reports it (ru_maxrss would carry the parent's peak
    across fork and exec)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


BASELINE_RSS_MB = peak_rss_mb()

import llama_cpp  # noqa: E402  (after the baseline, on purpose)

FTYPES = {
    "f32": "LLAMA_FTYPE_ALL_F32",
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
}
# ggml type ids (ggml.h) of the formats kiln stores.
GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 8}


def fail(message):
    print(f"bench_llama_cpp: {message}", file=sys.stderr)
    sys.exit(1)


def quantize(src, dst, quant, threads):
    if quant not in FTYPES:
        fail(f"no llama.cpp file type for {quant!r} (one of {', '.join(FTYPES)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(threads)
    params.ftype = getattr(llama_cpp, FTYPES[quant])
    params.allow_requantize = True
    head = GGML_TYPES["q8_0"] if quant.startswith("q4") else GGML_TYPES[quant]
    params.output_tensor_type = head
    params.token_embedding_type = head
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        fail(f"llama_model_quantize({src} -> {dst}, {quant}) returned {rc}")
    print(json.dumps({"path": dst, "quant": quant}))


def tokens(n, salt, vocab):
    return [((i + salt) * 2654435761 % 2**32 >> 7) % vocab for i in range(n)]


class Bench:
    def __init__(self, path, threads, n_ctx, n_batch):
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 0
        if hasattr(mparams, "use_extra_bufts"):
            mparams.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
        if not self.model:
            fail(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.type_k = GGML_TYPES["f16"]
        cparams.type_v = GGML_TYPES["f16"]
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            fail("llama_init_from_model failed")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.pos = 0

    def forward(self, ids):
        """Runs `ids` after the cached tokens in batches; returns the last token's argmax."""
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start : start + self.n_batch]
            b = self.batch
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = self.pos + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = i == len(chunk) - 1
            rc = llama_cpp.llama_decode(self.ctx, b)
            if rc != 0:
                fail(f"llama_decode returned {rc}")
            self.pos += len(chunk)
        logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())

    def rewind(self, pos):
        llama_cpp.llama_memory_seq_rm(self.memory, 0, pos, -1)
        self.pos = pos


def bench(path, threads, n_prompt, n_gen, depth):
    threads, n_prompt, n_gen, depth = int(threads), int(n_prompt), int(n_gen), int(depth)
    b = Bench(path, threads, depth + max(n_prompt, n_gen) + 1, n_prompt)
    prompt = tokens(n_prompt, 0, b.vocab)
    if depth > 0:
        b.forward(tokens(depth, 1 << 20, b.vocab))
    nxt = b.forward(prompt)
    b.rewind(depth)
    b.forward([nxt])

    b.rewind(depth)
    t0 = time.perf_counter()
    nxt = b.forward(prompt)
    prompt_s = time.perf_counter() - t0
    b.rewind(depth)
    t1 = time.perf_counter()
    for _ in range(n_gen):
        nxt = b.forward([nxt])
    decode_s = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "prompt_tokens_per_s": n_prompt / prompt_s,
                "decode_tokens_per_s": n_gen / decode_s,
                "ttft_ms": prompt_s * 1e3,
                "peak_rss_mb": peak_rss_mb() - BASELINE_RSS_MB,
                "python_rss_mb": BASELINE_RSS_MB,
                "threads": threads,
                "n_prompt": n_prompt,
                "n_gen": n_gen,
                "depth": depth,
                "backend": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
            }
        )
    )


def main(argv):
    if argv[:1] == ["version"] and len(argv) == 1:
        print(json.dumps({"llama_cpp_python": llama_cpp.__version__}))
    elif argv[:1] == ["quantize"] and len(argv) == 5:
        quantize(*argv[1:])
    elif argv[:1] == ["bench"] and len(argv) == 6:
        bench(*argv[1:])
    else:
        fail(f"bad arguments {argv!r} (see the docstring)")


main(sys.argv[1:])
