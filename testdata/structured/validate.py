"""Validates kiln's structured outputs with Python `jsonschema` (draft 2020-12 and its format
checker, with the `format-nongpl` extra installed so that `date-time`, `time`, `uri`,
`hostname` and the others are really checked).

Reads a JSON list on stdin: [{"name", "schema", "text"}]. Writes a JSON list of the failures:
[{"name", "error"}]; every format a schema uses must have a checker, or it is a failure too.
"""

import json
import sys

from jsonschema import Draft202012Validator

CHECKER = Draft202012Validator.FORMAT_CHECKER


def formats(schema):
    if isinstance(schema, dict):
        if isinstance(schema.get("format"), str):
            yield schema["format"]
        for value in schema.values():
            yield from formats(value)
    elif isinstance(schema, list):
        for value in schema:
            yield from formats(value)


def main():
    failures = []
    for case in json.load(sys.stdin):
        unchecked = [f for f in formats(case["schema"]) if f not in CHECKER.checkers]
        if unchecked:
            failures.append({"name": case["name"], "error": f"no checker for formats {unchecked}"})
            continue
        try:
            instance = json.loads(case["text"])
        except ValueError as e:
            failures.append({"name": case["name"], "error": f"not JSON: {e}: {case['text']!r}"})
            continue
        Draft202012Validator.check_schema(case["schema"])
        errors = [e.message for e in Draft202012Validator(case["schema"], format_checker=CHECKER).iter_errors(instance)]
        if errors:
            failures.append({"name": case["name"], "error": f"{errors}: {case['text']!r}"})
    json.dump(failures, sys.stdout)


if __name__ == "__main__":
    main()
