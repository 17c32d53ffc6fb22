"""The CUDA execution-provider check, run on a machine with an NVIDIA GPU:
greedy ids of the default model on onnxruntime's CUDA provider against llama.cpp's golden ids
and the CPU provider, q4_1 (MatMulNBits) perplexity on CUDA, and speed.

    python3 cuda_check.py KILN ORT_LIB FLOAT_ONNX Q4_1_ONNX OUT_JSON
"""
import json
import subprocess
import sys
import tempfile
from pathlib import Path

kiln, lib, float_onnx, q41_onnx, out = sys.argv[1:6]
root = Path(__file__).resolve().parents[2]
golden = json.loads((root / "testdata/golden/smollm2-135m-instruct.json").read_text())
eog = {0, 2, 4}
report = {"greedy": {}, "perplexity": {}, "bench": {}}


def kiln_json(*args):
    cmd = [kiln, *args, "--ort-lib", lib, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    print(" ".join(cmd), "\n", p.stderr.strip()[-600:], flush=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip()[-600:]}
    return json.loads(p.stdout.strip().splitlines()[-1])


ok = True
for case in golden["greedy"]["cases"]:
    expected = list(case["F32"]["generated_ids"])
    if expected and expected[-1] in eog:
        expected.pop()
    n = min(len(expected), 32)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(case["prompt"])
    row = {}
    for ep in ("cuda", "cpu"):
        r = kiln_json("run", float_onnx, "--ep", ep, "-f", f.name, "--temp", "0", "-n", str(n))
        row[ep] = r.get("ids", r)
    row["llama_cpp"] = expected[:n]
    row["cuda_equals_llama_cpp"] = row["cuda"] == expected[:n]
    row["cuda_equals_cpu"] = row["cuda"] == row["cpu"]
    ok &= row["cuda_equals_llama_cpp"] and row["cuda_equals_cpu"]
    report["greedy"][case["name"]] = row
    print(case["name"], row["cuda_equals_llama_cpp"], row["cuda_equals_cpu"], flush=True)

text = root / "testdata/golden/apache-2.0.txt"
for ep in ("cuda", "cpu"):
    report["perplexity"][ep] = kiln_json("perplexity", q41_onnx, "--ep", ep, "-f", str(text),
                                         "-c", str(golden["perplexity"]["ctx"]))
report["perplexity"]["llama_cpp_Q4_1"] = golden["perplexity"]["ppl"]["Q4_1"]
for ep, model in (("cuda", float_onnx), ("cuda", q41_onnx), ("cpu", float_onnx)):
    key = f"{ep}:{Path(model).name}"
    report["bench"][key] = kiln_json("bench", model, "--ep", ep, "-p", "128", "-n", "64", "-r", "3")
report["all_greedy_ok"] = ok
Path(out).write_text(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
