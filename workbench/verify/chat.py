"""What a chat turn must look like in the engine, taken from the artifact's own files, and the probes that
ask the engine for it. These catch the deployment failures users report most: turns that never end (the
engine does not know the end-of-turn token), a double BOS, special tokens split into pieces, and rope
scaling that breaks only past the original context."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..engines import TokenizeEndpoint
from ..safety import remote_code_trusted
from ..prompts import CHAT_MESSAGES, PROMPTS, probe_texts
from .probes import Check, Client, EndpointUnanswered

MARK = "Q7xZ"  # an assistant reply that no template writes, to find what follows a turn
LONG_MARGIN = 32  # tokens past the original context


@dataclass(frozen=True)
class ChatFacts:
    """What a chat turn must look like in the engine, read from the artifact's own files: the ids that end a
    turn, the special tokens, the long-context probe, and the ids each probe text must encode to."""
    stop_ids: dict[int, str] = field(default_factory=dict)  # token id -> why it must end a turn
    chat_ids: tuple[int, ...] = ()  # the chat probe's prompt as the template renders it and the tokenizer encodes it
    bos_id: int | None = None
    specials: dict[str, int] = field(default_factory=dict)  # special tokens the chat template writes -> id
    long_prompt: str | None = None  # longer than the original context of a rope-scaled model
    long_tokens: int = 0  # its length in tokens
    original_context: int = 0  # that original context (0: not rope-scaled)
    long_note: str = ""  # the original and scaled context, or why there is no long probe
    source: str = ""  # the tokenizer the facts come from
    # the probes' prompts and the rendered chat prompt -> the artifact's ids (no special tokens added); empty
    # for a GGUF's own tokenizer, which transformers does not rebuild faithfully
    texts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    pieces: tuple[str, ...] = ()  # the artifact's token strings by id, to show where the engine differs
    # a GGUF converted with --accept-tokenizer-difference: each text its manifest records llama.cpp splitting
    # otherwise -> (transformers' ids, llama.cpp's ids) as recorded
    known_differences: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def _ids(encoded) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "input_ids") else encoded)


def _template_tokens(tok) -> tuple[dict[str, int], tuple[str, int] | None]:
    """(special tokens the chat template writes, the one that ends an assistant turn)."""
    rendered = tok.apply_chat_template(CHAT_MESSAGES + [{"role": "assistant", "content": MARK}], tokenize=False)
    special = {t.content: i for i, t in tok.added_tokens_decoder.items() if t.special}
    for name in (tok.bos_token, tok.eos_token):
        if name and name in tok.get_vocab():
            special.setdefault(name, tok.convert_tokens_to_ids(name))
    written = {text: i for text, i in special.items() if text in rendered}
    after = rendered[rendered.rfind(MARK) + len(MARK):].lstrip(" ")
    end = next(((t, i) for t, i in sorted(written.items(), key=lambda x: -len(x[0])) if after.startswith(t)), None)
    return written, end


def rope_original(config: dict) -> tuple[int | None, str]:
    """(the original context a rope-scaled model was trained on, a note); None when rope is not scaled."""
    text = config.get("text_config", config)
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None, "no rope scaling"
    original = rope.get("original_max_position_embeddings") or text.get("original_max_position_embeddings")  # Phi-3's is top level
    if not original:
        return None, f"rope scaling {kind} names no original_max_position_embeddings to exceed"
    return int(original), f"rope {kind}: original context {original}, max_position_embeddings {text.get('max_position_embeddings')}"


def long_prompt(tok, original: int) -> tuple[str, int]:
    """Code text just longer than ``original`` tokens, ending in a prompt to continue, and its length in tokens."""
    block = "\n".join(PROMPTS) + "\n"
    text = block
    while len(tok(text).input_ids) <= original + LONG_MARGIN:
        text += block
    return text + PROMPTS[0], len(tok(text + PROMPTS[0]).input_ids)


def load_tokenizer(source: Path):
    """transformers' tokenizer of a model folder, or the one a GGUF file carries in its metadata."""
    from transformers import AutoTokenizer

    if source.suffix == ".gguf":
        import gguf

        tok = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        # transformers misreads some files' special tokens (a SentencePiece file's EOS comes back as <s>):
        # llama.cpp uses the ids in the header
        fields = gguf.GGUFReader(source).fields
        for role in ("bos", "eos"):
            if (key := f"tokenizer.ggml.{role}_token_id") in fields:
                setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(int(fields[key].contents())))
        return tok
    return AutoTokenizer.from_pretrained(source, trust_remote_code=remote_code_trusted())


def chat_facts(tokenizer_source: Path | None, config: dict | None, generation_eos: tuple[int, ...] = (),
               gguf_stops: dict[int, str] | None = None) -> ChatFacts:
    """The facts from a tokenizer (a model folder, or a GGUF file's own metadata) and the artifact's own EOS
    ids (a GGUF's from its header: transformers' reading of a GGUF's EOS is not relied on)."""
    stops = {i: "generation_config eos" for i in generation_eos}
    stops.update(gguf_stops or {})
    if tokenizer_source is None:
        return ChatFacts(stop_ids=stops)
    tok = load_tokenizer(tokenizer_source)
    if tok.eos_token_id is not None and gguf_stops is None:
        stops.setdefault(tok.eos_token_id, "tokenizer eos")
    specials, end = ({}, None) if tok.chat_template is None else _template_tokens(tok)
    if end is not None:
        stops.setdefault(end[1], f"the template's end of turn {end[0]}")
    chat_ids = () if tok.chat_template is None else tuple(_ids(tok.apply_chat_template(CHAT_MESSAGES, add_generation_prompt=True)))
    original, note = rope_original(config or {})
    long, long_tokens = long_prompt(tok, original) if original else (None, 0)
    return ChatFacts(stop_ids=stops, chat_ids=chat_ids, bos_id=tok.bos_token_id, specials=specials,
                     long_prompt=long, long_tokens=long_tokens, original_context=original or 0,
                     long_note=note, source=str(tokenizer_source), texts=_probe_texts(tok, tokenizer_source),
                     pieces=tuple(tok.convert_ids_to_tokens(list(range(len(tok))))))


def _probe_texts(tok, source: Path) -> dict[str, tuple[int, ...]]:
    if source.suffix == ".gguf":
        return {}
    return {t: tuple(tok(t, add_special_tokens=False).input_ids) for t in probe_texts(tok)}


# ---------------------------------------------------------------- probes

def probe_end_of_turn(client: Client, facts: ChatFacts) -> Check:
    """Forcing each token of the stop set as the first reply token must end the chat turn with "stop"."""
    if not facts.stop_ids:
        return Check("end-of-turn", "incomplete", "the artifact names no end-of-sequence or end-of-turn token")
    missed = []
    for token_id, why in facts.stop_ids.items():
        r = client.post("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": 4, "temperature": 0,
                                                 "logit_bias": {str(token_id): 100}})
        finish, made = r["choices"][0].get("finish_reason"), r.get("usage", {}).get("completion_tokens")
        if finish != "stop" or (made or 0) > 1:
            missed.append(f"id {token_id} ({why}): finish_reason={finish} after {made} tokens")
    names = ", ".join(f"{i} ({why})" for i, why in facts.stop_ids.items())
    if missed:
        return Check("end-of-turn", "failed", "the engine does not end a turn on " + "; ".join(missed) +
                     " (list every end-of-turn id in generation_config.json eos_token_id)")
    return Check("end-of-turn", "passed", f"a chat turn ends with finish_reason=stop on each of {names}")


def engine_tokens(client: Client, api: TokenizeEndpoint, text: str) -> list[int]:
    """The ids the engine's tokenizer endpoint gives ``text``; an HTTP 5xx answer is an EndpointUnanswered."""
    try:
        return list(client.post(api.path, {api.text_field: text, **api.extra})["tokens"])
    except RuntimeError as exc:
        if str(exc).startswith("HTTP 5"):
            raise EndpointUnanswered(f"the engine's tokenizer endpoint could not answer: {exc}") from None
        raise


def probe_tokenizer(client: Client, facts: ChatFacts, api: TokenizeEndpoint | None) -> Check:
    """The engine's tokenizer gives the artifact's ids for every probe text (the prompts, the rendered chat prompt,
    the texts a conversion recorded): an engine that rebuilds the tokenizer its own way feeds the model other
    tokens than it was trained on. A difference accepted at conversion passes only as recorded: the same text,
    the same ids on both sides."""
    if api is None:
        return Check("tokenizer", "incomplete", "the engine has no tokenizer endpoint")
    accepted, differ = [], []
    for text, ids in facts.texts.items():
        got = engine_tokens(client, api, text)
        splits = [tuple(got)] + ([tuple(got[1:])] if api.adds_bos and got[:1] == [facts.bos_id] else [])
        if tuple(ids) in splits:
            continue
        if any(facts.known_differences.get(text) == (tuple(ids), split) for split in splits):
            accepted.append(text)
            continue
        got = list(splits[-1])
        at = next((i for i, (a, b) in enumerate(zip(got, ids)) if a != b), min(len(got), len(ids)))
        differ.append(f"the engine tokenizes {text[:48]!r} into {len(got)} tokens, the artifact's tokenizer into {len(ids)}: "
                      f"from token {at}, {_shown(facts, got[at:at + 3])} where the artifact's gives {_shown(facts, ids[at:at + 3])}")
    if differ:
        known = " (not as the difference accepted at conversion records it)" if facts.known_differences else ""
        return Check("tokenizer", "failed", f"{len(differ)}/{len(facts.texts)} texts{known}: " + "; ".join(differ[:3]))
    detail = f"{len(facts.texts)} texts (the probes' prompts and the chat prompt) tokenized as the artifact's tokenizer does"
    if accepted:
        detail = (f"{len(facts.texts) - len(accepted)}/{len(facts.texts)} texts tokenized as the artifact's tokenizer does; "
                  f"{len(accepted)} exactly as the difference accepted at conversion records them (--accept-tokenizer-difference)")
    return Check("tokenizer", "passed", detail, metrics={"texts": len(facts.texts), "accepted_differences": len(accepted)})


def _shown(facts: ChatFacts, ids) -> str:
    return "[" + ", ".join(f"{i} {facts.pieces[i]!r}" if 0 <= i < len(facts.pieces) else str(i) for i in ids) + "]"


def probe_special_tokens(client: Client, facts: ChatFacts, api: TokenizeEndpoint | None) -> Check:
    """Each special token the chat template writes is one token, the same id, in the engine's tokenizer."""
    if api is None:
        return Check("special-tokens", "incomplete", "the engine has no tokenizer endpoint")
    if not facts.chat_ids:
        return Check("special-tokens", "incomplete", "the artifact has no chat template to take special tokens from")
    if not facts.specials:
        return Check("special-tokens", "passed", "the chat template writes no special tokens")
    split = []
    for text, token_id in facts.specials.items():
        got = engine_tokens(client, api, text)
        if api.adds_bos and len(got) == 2 and got[0] == facts.bos_id:
            got = got[1:]
        if got != [token_id]:
            split.append(f"{text!r} -> {got} (expected [{token_id}])")
    if split:
        return Check("special-tokens", "failed", "split or renumbered by the engine's tokenizer: " + "; ".join(split))
    return Check("special-tokens", "passed", f"{len(facts.specials)} template tokens are single tokens: {', '.join(facts.specials)}")


def chat_prompt_problem(facts: ChatFacts, prompt_tokens: int | None) -> str | None:
    """Why the engine's chat prompt length differs from the template's, naming a double BOS when that is it."""
    if facts.bos_id is not None and facts.chat_ids.count(facts.bos_id) > 1:
        return f"the chat template itself writes BOS {facts.chat_ids.count(facts.bos_id)} times"
    if not facts.chat_ids or prompt_tokens is None or prompt_tokens == len(facts.chat_ids):
        return None
    expected = len(facts.chat_ids)
    if prompt_tokens == expected + 1 and facts.bos_id is not None and facts.chat_ids[:1] == (facts.bos_id,):
        return f"double BOS: the engine's chat prompt has {prompt_tokens} tokens, the template's {expected} already start with BOS"
    return f"the engine's chat prompt has {prompt_tokens} tokens, the chat template gives {expected}"


def probe_chat(client: Client, facts: ChatFacts, max_tokens: int) -> Check:
    """A chat completion through the engine's own chat template: the prompt it built has the template's length."""
    r = client.post("/v1/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": max_tokens, "temperature": 0})
    prompt_tokens = r.get("usage", {}).get("prompt_tokens")
    content = r["choices"][0]["message"].get("content")
    problem = chat_prompt_problem(facts, prompt_tokens)
    if problem:
        return Check("chat", "failed", problem)
    ok = isinstance(content, str) and r["choices"][0].get("finish_reason") in ("stop", "length")
    compared = "the template's length" if facts.chat_ids else "length not compared: no tokenizer files"
    return Check("chat", "passed" if ok else "failed", f"{prompt_tokens} prompt tokens ({compared}): {str(content)[:60]!r}")
