// Records ggml's reference quantizers on edge-case rows, for compiler/tests/quant_blocks.rs:
// prints testdata/quant/ggml_blocks.json (each case's f32 input bits and, per format, the
// bytes ggml's quantize_row_*_ref writes). Built against llama.cpp's own ggml-base:
//
//   SRC=~/.cache/kiln/llama.cpp/src-0c1e570 BUILD=~/.cache/kiln/llama.cpp/build-0c1e570-native
//   cc -O2 -I$SRC/ggml/include -I$SRC/ggml/src testdata/quant/ggml_blocks.c \
//      $BUILD/ggml/src/libggml-base.a -lm -lpthread -lstdc++ -lgomp -o /tmp/ggml_blocks
//   /tmp/ggml_blocks > testdata/quant/ggml_blocks.json

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ggml-common.h"
#include "ggml-quants.h"

#define N 256 // one super-block per case

typedef void (*quantize_fn)(const float *, void *, int64_t);

static const struct {
    const char * name;
    quantize_fn  fn;
    size_t       block_bytes;
    int          block_len;
} formats[] = {
    {"q4_k", (quantize_fn) quantize_row_q4_K_ref, sizeof(block_q4_K), QK_K},
    {"q5_k", (quantize_fn) quantize_row_q5_K_ref, sizeof(block_q5_K), QK_K},
    {"q6_k", (quantize_fn) quantize_row_q6_K_ref, sizeof(block_q6_K), QK_K},
    {"q5_0", (quantize_fn) quantize_row_q5_0_ref, sizeof(block_q5_0), QK5_0},
    {"q5_1", (quantize_fn) quantize_row_q5_1_ref, sizeof(block_q5_1), QK5_1},
};

static uint64_t state = 0x6b696c6e;

// SplitMix64, uniform in [-1, 1).
static float uniform(void) {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float) (z >> 40) / (float) (1 << 23) - 1.0f;
}

static void emit(const char * name, const float * x, int first) {
    printf("%s    {\"name\": \"%s\", \"x\": \"", first ? "" : ",\n", name);
    for (int i = 0; i < N; ++i) {
        uint32_t bits;
        memcpy(&bits, &x[i], 4);
        printf("%08x", bits);
    }
    printf("\"");
    static uint8_t out[N * 4];
    for (size_t f = 0; f < sizeof(formats) / sizeof(formats[0]); ++f) {
        formats[f].fn(x, out, N);
        size_t len = N / formats[f].block_len * formats[f].block_bytes;
        printf(", \"%s\": \"", formats[f].name);
        for (size_t i = 0; i < len; ++i) {
            printf("%02x", out[i]);
        }
        printf("\"");
    }
    printf("}");
}

int main(void) {
    float x[N];
    int first = 1;
#define CASE(name, expr) \
    do { \
        for (int i = 0; i < N; ++i) { x[i] = (expr); } \
        emit(name, x, first); \
        first = 0; \
    } while (0)
    printf("{\n  \"what\": \"ggml's quantize_row_*_ref (llama.cpp 0c1e570 ggml-base) on edge-case rows; x: f32 bits, big-endian hex per value; written by ggml_blocks.c\",\n  \"cases\": [\n");
    CASE("zeros", 0.0f);
    CASE("constant positive", 1.0f);
    CASE("constant negative", -0.75f);
    CASE("alternating sign", (i % 2) ? 0.5f : -0.5f);
    CASE("ramp", (float) (i - N / 2) / (N / 2));
    CASE("all positive", 1.0f + 0.25f * uniform());
    CASE("all negative", -2.0f + 0.5f * uniform());
    CASE("one spike", i == 77 ? 1000.0f : 1e-4f * uniform());
    CASE("huge range", (i % 7 == 0) ? 60000.0f * uniform() : 1e-3f * uniform());
    CASE("near f16 max", 30000.0f * uniform());
    CASE("tiny", 1e-20f * uniform());
    CASE("subnormal", 1e-40f * (float) (i % 5));
    CASE("sub-blocks of zeros", ((i / 16) % 3 == 0) ? 0.0f : 0.05f * uniform());
    CASE("one loud sub-block", (i / 32 == 3) ? 100.0f * uniform() : 1e-6f * uniform());
    CASE("one value per sub-block", (i % 16 == 5) ? 0.3f : 0.0f);
    CASE("weights", 0.02f * (uniform() + uniform() + uniform()));
    CASE("weights, another seed", 0.05f * (uniform() + uniform() + uniform()));
    CASE("ties", (float) ((i % 9) - 4) * 0.125f);
    printf("\n  ]\n}\n");
    return 0;
}
