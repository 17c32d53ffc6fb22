"""Reference token ids for kiln's tokenizer tests, from code kiln did not write.

Builds tiktoken.Encoding from Meta's Llama 3 tokenizer.model exactly as
llama_models/llama3/tokenizer.py (llama-models 0.3.0) does, and optionally loads a
tokenizer.json with Hugging Face `tokenizers`. Prints, as JSON, the ids of every string
with special tokens parsed ("special") and encoded as text ("plain").

usage: tiktoken_ids.py MODEL|- STRINGS_JSON [TOKENIZER_JSON]   (- skips tiktoken)
"""

import base64
import json
import sys

import tiktoken

PAT_STR = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501
NUM_RESERVED_SPECIAL_TOKENS = 256


def load_bpe_file(path):
    ranks = {}
    with open(path, encoding="utf-8") as f:
        for line in f.read().splitlines():
            if not line.strip():
                continue
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def llama3_encoding(path):
    ranks = load_bpe_file(path)
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|finetune_right_pad_id|>",
        "<|step_id|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eom_id|>",
        "<|eot_id|>",
        "<|python_tag|>",
        "<|image|>",
    ]
    specials += [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(specials))
    ]
    return tiktoken.Encoding(
        name="llama3",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(specials)},
    )


def main():
    model, strings_path = sys.argv[1], sys.argv[2]
    with open(strings_path, encoding="utf-8") as f:
        strings = json.load(f)
    out = {}
    if model != "-":
        enc = llama3_encoding(model)
        out["tiktoken"] = {
            "special": [enc.encode(s, allowed_special="all") for s in strings],
            "plain": [enc.encode(s, allowed_special=set(), disallowed_special=()) for s in strings],
        }
    if len(sys.argv) > 3:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(sys.argv[3])
        special = [tok.encode(s, add_special_tokens=False).ids for s in strings]
        default = [tok.encode(s).ids for s in strings]
        tok.encode_special_tokens = True
        plain = [tok.encode(s, add_special_tokens=False).ids for s in strings]
        out["hf"] = {
            "special": special,
            "plain": plain,
            "decoded": [tok.decode(ids, skip_special_tokens=False) for ids in plain],
            "default": default,
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
