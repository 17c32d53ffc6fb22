"""Reference chat-template renderer for kiln's tests: Python jinja2 set up as transformers'
`apply_chat_template` sets it up, so kiln's minijinja rendering is checked against an
implementation we did not write.

Reads one JSON object on stdin:
  {"template": str, "messages": [{"role", "content"}], "add_generation_prompt": bool,
   "bos_token": str, "eos_token": str, "now": unix seconds for strftime_now (UTC)}
As transformers does, `tools` and `documents` are passed (as None).
Writes one JSON object on stdout: {"ok": rendered} or {"raised": message}.
"""

import datetime
import json
import sys

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(Exception):
    pass


def main():
    req = json.load(sys.stdin)
    now = datetime.datetime.fromtimestamp(req["now"], datetime.timezone.utc)

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        return now.strftime(fmt)

    # transformers replaces jinja2's HTML-escaping tojson with plain json.dumps.
    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    template = env.from_string(req["template"])
    try:
        out = {
            "ok": template.render(
                messages=req["messages"],
                tools=None,
                documents=None,
                add_generation_prompt=req["add_generation_prompt"],
                bos_token=req["bos_token"],
                eos_token=req["eos_token"],
            )
        }
    except TemplateError as e:
        out = {"raised": str(e)}
    sys.stdout.buffer.write(json.dumps(out).encode("utf-8"))


if __name__ == "__main__":
    main()
