"""Writes the third-party ONNX fixture: a tiny random Llama 3 decoder built with Hugging Face
`transformers`, exported by PyTorch's own ONNX exporter (not by kiln) with the standard KV-cache
interface, a tokenizer trained with HF `tokenizers`, and torch's reference logits.

Needs torch, transformers, tokenizers, onnx and onnxruntime (the GPU machine's image has them):
    python3 make.py OUT_DIR
Writes OUT_DIR/{model.onnx, tokenizer.json, reference.json, versions.json}.
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)

TEXT = (Path(__file__).with_name("corpus.txt").read_text()
        if Path(__file__).with_name("corpus.txt").exists() else
        "The quick brown fox jumps over the lazy dog. " * 20 +
        "Llama models run on small boards; kiln compiles them ahead of time. " * 20)

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
trainer = trainers.BpeTrainer(
    vocab_size=320,
    special_tokens=["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
)
tok.train_from_iterator([TEXT], trainer)
tok.save(str(out / "tokenizer.json"))
vocab = tok.get_vocab_size()

torch.manual_seed(1234)
cfg = LlamaConfig(
    vocab_size=vocab,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    tie_word_embeddings=False,
    initializer_range=0.2,
    bos_token_id=0, eos_token_id=[1, 2],
    attn_implementation="eager",
)
model = LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    for n, p in model.named_parameters():
        if "norm" in n:
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
L, KV, HD = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim


class Decoder(torch.nn.Module):
    """input_ids, attention_mask, position_ids, past_key_values.* -> logits, present.*"""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for i in range(L):
            cache.update(past[2 * i], past[2 * i + 1], i)
        o = self.m(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   past_key_values=cache, use_cache=True)
        kv = o.past_key_values
        presents = []
        for i in range(L):
            layer = kv.layers[i] if hasattr(kv, "layers") else None
            k, v = (layer.keys, layer.values) if layer is not None else kv[i]
            presents += [k, v]
        return (o.logits, *presents)


dec = Decoder(model).eval()
past_names = [f"past_key_values.{i}.{kind}" for i in range(L) for kind in ("key", "value")]
present_names = [f"present.{i}.{kind}" for i in range(L) for kind in ("key", "value")]


def inputs(ids, past_len, past):
    s = len(ids)
    return (torch.tensor([ids]), torch.ones(1, past_len + s, dtype=torch.int64),
            torch.arange(past_len, past_len + s).unsqueeze(0), *past)


empty = [torch.zeros(1, KV, 0, HD) for _ in range(2 * L)]
prompt = tok.encode("The quick brown fox jumps over the lazy dog, and kiln").ids
prompt = [0] + prompt
steps = [5, 17, 99]

# Reference logits from torch: the prompt, then one token at a time.
with torch.no_grad():
    outs = dec(*inputs(prompt, 0, empty))
    ref = [outs[0][0].tolist()]
    past = list(outs[1:])
    pos = len(prompt)
    for t in steps:
        outs = dec(*inputs([t], pos, past))
        ref.append(outs[0][0].tolist())
        past = list(outs[1:])
        pos += 1

dyn = {"input_ids": {1: "sequence_length"}, "attention_mask": {1: "total_sequence_length"},
       "position_ids": {1: "sequence_length"}, "logits": {1: "sequence_length"}}
for n in past_names:
    dyn[n] = {2: "past_sequence_length"}
for n in present_names:
    dyn[n] = {2: "total_sequence_length"}
example = inputs(prompt[:3], 2, [torch.randn(1, KV, 2, HD) for _ in range(2 * L)])
onnx_path = out / "model.onnx"
exporter = "torchscript"
try:
    torch.onnx.export(dec, example, str(onnx_path), input_names=["input_ids", "attention_mask",
                      "position_ids", *past_names], output_names=["logits", *present_names],
                      dynamic_axes=dyn, opset_version=17, dynamo=False)
except Exception as e:  # torch without the TorchScript exporter
    print("torchscript exporter failed:", repr(e)[:500], file=sys.stderr)
    exporter = "dynamo"
    seq, tot, pst = torch.export.Dim("seq"), torch.export.Dim("tot"), torch.export.Dim("past")
    shapes = ({1: seq}, {1: tot}, {1: seq}, *[{2: pst} for _ in range(2 * L)])
    prog = torch.onnx.export(dec, example, input_names=["input_ids", "attention_mask", "position_ids",
                             *past_names], output_names=["logits", *present_names],
                             dynamic_shapes=shapes, opset_version=18, dynamo=True)
    prog.save(str(onnx_path))

# The ONNX must reproduce torch in onnxruntime at every shape the test uses.
import numpy as np
import onnxruntime as ort

sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
feed_names = [i.name for i in sess.get_inputs()]


def run(ids, past_len, past):
    vals = inputs(ids, past_len, [torch.from_numpy(p) for p in past])
    return sess.run(None, {n: v.numpy() for n, v in zip(feed_names, vals)})


o = run(prompt, 0, [np.zeros((1, KV, 0, HD), np.float32)] * (2 * L))
got = [o[0][0]]
past, pos = o[1:], len(prompt)
for t in steps:
    o = run([t], pos, past)
    got.append(o[0][0])
    past, pos = o[1:], pos + 1
diff = max(float(np.abs(np.array(g) - np.array(r)).max()) for g, r in zip(got, ref))
spread = max(float(np.abs(np.array(r)).max()) for r in ref)
print(f"exporter {exporter}: onnxruntime vs torch max abs diff {diff:.3e}, max |logit| {spread:.3f}")
assert diff < 1e-3, diff

json.dump({"prompt_ids": prompt, "next_ids": steps, "logits": ref,
           "torch_vs_onnxruntime": diff},
          open(out / "reference.json", "w"))
json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
           "onnxruntime": ort.__version__, "exporter": exporter,
           "ops": sorted({n.op_type for n in __import__("onnx").load(str(onnx_path)).graph.node})},
          open(out / "versions.json", "w"), indent=1)
print(open(out / "versions.json").read())
