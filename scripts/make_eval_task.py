"""Writes workbench/evals/python_next_chars.jsonl, the task `verify --eval python_next_chars` runs with its data
shipped (no dataset hub is reachable here): 200 four-way choices of the 6 characters that come next in Python
source, after 400 characters of context, from the standard library's evaluation split (texts.py: every 10th
module, which no calibration reads); the three wrong choices are such spans from elsewhere in it.
Run once with the Python whose standard library it should read; the file is committed."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.texts import default_text  # noqa: E402

ITEMS, CONTEXT_CHARS, SPAN = 200, 400, 8


def spans(text: str, rng: random.Random):
    """Random spans of SPAN characters within one line that start where a name starts or ends, not at white
    space (a tokenizer starts a token there, so the context's tokens end where the span's begin): (start, text)."""
    while True:
        at = rng.randrange(CONTEXT_CHARS, len(text) - SPAN)
        span, before = text[at:at + SPAN], text[at - 1]
        named = (before.isalnum() or before == "_", span[0].isalnum() or span[0] == "_")
        if "\n" not in span and not span[0].isspace() and not before.isspace() and named[0] != named[1]:
            yield at, span


def main() -> None:
    text, rng = default_text("evaluation"), random.Random(0)
    draw = spans(text, rng)
    out = Path(__file__).resolve().parents[1] / "workbench" / "evals" / "python_next_chars.jsonl"
    with out.open("w") as f:
        for _ in range(ITEMS):
            at, target = next(draw)
            wrong = []
            while len(wrong) < 3:
                _, other = next(draw)
                if other != target and other not in wrong:
                    wrong.append(other)
            choices = wrong + [target]
            rng.shuffle(choices)
            f.write(json.dumps({"context": text[at - CONTEXT_CHARS:at], "choices": choices, "label": choices.index(target)}) + "\n")
    print(f"{ITEMS} items -> {out}")


if __name__ == "__main__":
    main()
