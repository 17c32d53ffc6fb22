"""Reference chat-template renderer for kiln's tool-calling tests: transformers'
`render_jinja_template`, what `apply_chat_template(messages, tools=..., **kwargs)` runs, so
kiln's minijinja rendering of tool conversations is checked against the library whose setup
the model cards assume.

Reads one JSON object on stdin:
  {"template": str, "messages": [...], "tools": [...] or null, "add_generation_prompt": bool,
   "bos_token": str, "eos_token": str, "extra": {name: value}}
Writes one JSON object on stdout: {"ok": rendered} or {"raised": message}.
"""

import json
import sys

from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template


def main():
    req = json.load(sys.stdin)
    try:
        rendered, _ = render_jinja_template(
            conversations=[req["messages"]],
            tools=req["tools"],
            chat_template=req["template"],
            add_generation_prompt=req["add_generation_prompt"],
            bos_token=req["bos_token"],
            eos_token=req["eos_token"],
            **req["extra"],
        )
        out = {"ok": rendered[0]}
    except TemplateError as e:
        out = {"raised": str(e)}
    sys.stdout.buffer.write(json.dumps(out).encode("utf-8"))


if __name__ == "__main__":
    main()
