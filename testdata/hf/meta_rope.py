"""Meta's Llama 3 RoPE frequencies, computed by Meta's own code without torch.

Reads `llama3/model.py` of the `llama_models` package (llama-models==0.3.0), takes
`apply_scaling` and the frequency lines of `precompute_freqs_cis` out of it with `ast`, and
runs them on numpy float32 arrays behind a stand-in for the few `torch` names they use.

Meta's `apply_scaling` hard-codes Llama 3.1's constants (factor 8, low 1, high 4, original
context 8192). With --factor and friends, those assignments are replaced by the given values
(Llama 3.2's Hugging Face configs say factor 32); the constants Meta wrote are reported.

Prints JSON: {"meta_constants": {...}, "inv_freq": [...]} (float32 values, exactly).
"""

import argparse
import ast
import json
import math
import os
import sys
import types

import numpy as np

SCALING_NAMES = {
    "factor": "scale_factor",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "original_max_position_embeddings": "old_context_len",
}


class Tensor(np.ndarray):
    """A numpy array with the two torch.Tensor members the extracted code touches."""

    def float(self):
        return self.astype(np.float32).view(Tensor)

    @property
    def device(self):
        return None


def arange(*args, dtype=None, device=None):
    # torch.arange of ints is int64, like numpy's default.
    return np.arange(*args, dtype=dtype).view(Tensor)


torch = types.SimpleNamespace(
    Tensor=Tensor,
    pi=math.pi,
    float32=np.float32,
    arange=arange,
    where=lambda cond, a, b: np.where(cond, a, b).view(Tensor),
)


def function(tree, name):
    found = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if len(found) != 1:
        raise SystemExit(f"model.py: expected one function {name}, found {len(found)}")
    return found[0]


def substitute_constants(fn, values):
    """Replaces `name = <number>` assignments in `fn`; returns the numbers Meta wrote."""
    meta = {}
    for stmt in fn.body:
        if (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
            and isinstance(stmt.value, ast.Constant)
            and stmt.targets[0].id in values
        ):
            name = stmt.targets[0].id
            meta[name] = stmt.value.value
            if values[name] is not None:
                stmt.value = ast.copy_location(ast.Constant(values[name]), stmt.value)
    if set(meta) != set(values):
        raise SystemExit(f"apply_scaling: expected constants {sorted(values)}, found {sorted(meta)}")
    return meta


def frequency_lines(fn):
    """`precompute_freqs_cis` up to its `if use_scaled:` block, returning `freqs`."""
    body = []
    for stmt in fn.body:
        targets = stmt.targets if isinstance(stmt, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "freqs" for t in targets):
            body.append(stmt)
        elif isinstance(stmt, ast.If):
            body.append(stmt)
            break
    if len(body) != 2 or not isinstance(body[1], ast.If):
        raise SystemExit("precompute_freqs_cis: expected `freqs = ...` then `if use_scaled:`")
    body.append(ast.Return(ast.Name("freqs", ast.Load())))
    fn.body = body
    return fn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama-models", required=True, help="the llama_models package directory")
    p.add_argument("--head-dim", type=int, required=True)
    p.add_argument("--theta", type=float, required=True)
    p.add_argument("--factor", type=float)
    p.add_argument("--low-freq-factor", type=float)
    p.add_argument("--high-freq-factor", type=float)
    p.add_argument("--original-max-position-embeddings", type=int)
    args = p.parse_args()

    path = os.path.join(args.llama_models, "llama3", "model.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    given = {meta: getattr(args, field) for field, meta in SCALING_NAMES.items()}
    scaled = any(v is not None for v in given.values())
    if scaled and any(v is None for v in given.values()):
        raise SystemExit("give all four llama3 scaling values or none")

    apply_scaling = function(tree, "apply_scaling")
    meta_constants = substitute_constants(apply_scaling, given)
    precompute = frequency_lines(function(tree, "precompute_freqs_cis"))
    module = ast.fix_missing_locations(ast.Module(body=[apply_scaling, precompute], type_ignores=[]))
    scope = {"torch": torch}
    exec(compile(module, path, "exec"), scope)

    freqs = scope["precompute_freqs_cis"](args.head_dim, 1, args.theta, scaled)
    out = np.asarray(freqs)
    if out.dtype != np.float32:
        raise SystemExit(f"expected float32 frequencies, got {out.dtype}")
    json.dump({"meta_constants": meta_constants, "inv_freq": [float(x) for x in out]}, sys.stdout)


if __name__ == "__main__":
    main()
