"""The texts verify sends every engine, shared with convert, which records at conversion how llama.cpp splits
exactly these texts (so verify can tell an accepted tokenizer difference from a new one)."""

PROMPTS = (
    "import os\nimport sys\n\n\ndef main(",
    "class Parser:\n    def __init__(self",
    "    for i in range(",
    "# Copyright",
)
CHAT_MESSAGES = [{"role": "user", "content": "Write a function that parses a file."}]  # the chat probes' turn


def probe_texts(tok) -> list[str]:
    """The prompts, and the chat turn as ``tok``'s template renders it (when it has one)."""
    texts = list(PROMPTS)
    if tok.chat_template is not None:
        texts.append(tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True))
    return texts
