"""Runs kiln's exported ONNX decoders outside kiln, for the parity tests in compiler/tests/onnx_*.rs.

Subcommands (all write little-endian f32 rows, one per step, vocab long):

  ort --model M --steps S --out F
      onnxruntime (CPU, ORT_ENABLE_BASIC): a prefill of the prompt ids, then one decode step
      per next id through the KV cache; the logits of the last position of every step.
  reference --checkpoint D --steps S --out F
      the same steps through an independent numpy forward pass of a Llama 3 decoder (float64,
      no KV cache: every step recomputes the whole sequence) over the weights in D.
  padding --model M --steps S
      onnxruntime on a batch of two: the prompt, and the prompt without its first two ids,
      left-padded; prints the largest difference between each row's logits and the same
      sequence run alone, as JSON.

S is JSON: {"prompt_ids": [...], "next_ids": [...], "position_offset": 0}; position_offset is
added to every position id (it moves RoPE angles, not the mask). D holds manifest.json
({"config": {...}, "tensors": {name: {"shape": [...], "file": ...}}}) and raw f32 files in the
Hugging Face layout ([out, in]).
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import onnxruntime as ort


def load_steps(path):
    with open(path) as f:
        steps = json.load(f)
    chunks = [steps["prompt_ids"]] + [[i] for i in steps["next_ids"]]
    return chunks, int(steps.get("position_offset", 0))


def session(model):
    opts = ort.SessionOptions()
    # Above BASIC, onnxruntime rewrites subgraphs into fused kernels whose results move.
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.intra_op_num_threads = int(os.environ.get("KILN_ORT_THREADS", "2"))
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def empty_past(sess, batch):
    past = {}
    for i in sess.get_inputs():
        if i.name.startswith("past_key_values."):
            _, heads, _, head_dim = i.shape
            past[i.name] = np.zeros((batch, heads, 0, head_dim), dtype=np.float32)
    return past


def step(sess, past, ids, mask, positions):
    """One run; returns the logits [batch, seq, vocab] and the next past."""
    feed = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
    names = [o.name for o in sess.get_outputs()]
    outs = dict(zip(names, sess.run(names, feed)))
    nxt = {k: outs[k.replace("past_key_values.", "present.")] for k in past}
    return outs["logits"], nxt


def run_ort(model, chunks, offset):
    sess = session(model)
    past = empty_past(sess, 1)
    rows, done = [], 0
    for chunk in chunks:
        n = len(chunk)
        ids = np.array([chunk], dtype=np.int64)
        mask = np.ones((1, done + n), dtype=np.int64)
        positions = np.arange(offset + done, offset + done + n, dtype=np.int64)[None, :]
        logits, past = step(sess, past, ids, mask, positions)
        rows.append(logits[0, -1])
        done += n
    return np.stack(rows)


def run_padding(model, chunks, offset):
    """Left padding pins the mask semantics: pads are never attended to, and each row's
    positions count only its real tokens."""
    sess = session(model)
    prompt = chunks[0]
    short = prompt[2:]
    pad = len(prompt) - len(short)
    ids = np.array([prompt, [0] * pad + short], dtype=np.int64)
    mask = np.array([[1] * len(prompt), [0] * pad + [1] * len(short)], dtype=np.int64)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + offset
    past = empty_past(sess, 2)
    batched, past = step(sess, past, ids, mask, positions)
    worst = {"prefill": 0.0, "decode": 0.0}
    alone = [run_ort(model, [prompt] + chunks[1:], offset), run_ort(model, [short] + chunks[1:], offset)]
    for row in range(2):
        worst["prefill"] = max(worst["prefill"], float(np.abs(batched[row, -1] - alone[row][0]).max()))
    # Decode steps on top of the padded cache.
    for k, chunk in enumerate(chunks[1:], start=1):
        ids = np.array([chunk, chunk], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        positions = positions[:, -1:] + 1
        logits, past = step(sess, past, ids, mask, positions)
        for row in range(2):
            worst["decode"] = max(worst["decode"], float(np.abs(logits[row, -1] - alone[row][k]).max()))
    return worst


# ---- independent numpy reference ----------------------------------------------------------


def inv_freq(cfg):
    """RoPE inverse frequencies with Meta's llama3 `apply_scaling`
    (llama_models/llama3/reference_impl/model.py)."""
    dim, theta = cfg["head_dim"], cfg["rope_theta"]
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim))
    sc = cfg.get("rope_scaling")
    if not sc:
        return freqs
    scale_factor = sc["factor"]
    low_freq_factor = sc["low_freq_factor"]
    high_freq_factor = sc["high_freq_factor"]
    old_context_len = sc["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return np.array(new_freqs, dtype=np.float64)


def load_checkpoint(d):
    with open(os.path.join(d, "manifest.json")) as f:
        manifest = json.load(f)
    weights = {}
    for name, t in manifest["tensors"].items():
        data = np.fromfile(os.path.join(d, t["file"]), dtype="<f4")
        weights[name] = data.reshape(t["shape"]).astype(np.float64)
    return manifest["config"], weights


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def forward(cfg, w, ids, positions):
    """Logits [seq, vocab] of a Llama decoder over the whole sequence."""
    heads, kv_heads, hd, eps = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["rms_eps"]
    n = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    angles = positions[:, None].astype(np.float64) * inv_freq(cfg)[None, :]
    emb = np.concatenate([angles, angles], axis=-1)
    cos, sin = np.cos(emb)[None], np.sin(emb)[None]
    causal = np.tril(np.ones((n, n), dtype=bool))
    for i in range(cfg["layers"]):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd).transpose(1, 0, 2)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(n, kv_heads, hd).transpose(1, 0, 2)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(n, kv_heads, hd).transpose(1, 0, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # GQA: query head j reads KV head j // (heads / kv_heads).
        k = np.repeat(k, heads // kv_heads, axis=0)
        v = np.repeat(v, heads // kv_heads, axis=0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        scores = np.where(causal[None], scores, -np.inf)
        o = (softmax(scores) @ v).transpose(1, 0, 2).reshape(n, heads * hd)
        x = x + o @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].T
        up = h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


def run_reference(checkpoint, chunks, offset):
    cfg, w = load_checkpoint(checkpoint)
    ids, rows = [], []
    for chunk in chunks:
        ids.extend(chunk)
        positions = np.arange(offset, offset + len(ids))
        rows.append(forward(cfg, w, np.array(ids), positions)[-1])
    return np.stack(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["ort", "reference", "padding"])
    ap.add_argument("--model")
    ap.add_argument("--checkpoint")
    ap.add_argument("--steps", required=True)
    ap.add_argument("--out")
    args = ap.parse_args()
    chunks, offset = load_steps(args.steps)
    if args.mode == "padding":
        print(json.dumps(run_padding(args.model, chunks, offset)))
        return 0
    if args.mode == "ort":
        rows = run_ort(args.model, chunks, offset)
    else:
        rows = run_reference(args.checkpoint, chunks, offset)
    rows.astype("<f4").tofile(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
