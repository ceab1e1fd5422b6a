"""Prompt templates: turn one data row into text segments, each marked trained or not.

A formatted example is a list of ``(text, trained)`` segments. The tokenizer sees their
concatenation once (so tokens at segment borders are what the model will see at inference), and a
token is a target when its first character lies in a trained segment. Prompt text is never trained
unless ``train_on_inputs`` is set.

Templates:

* ``alpaca``: the Stanford Alpaca prompt (with or without an input) then the response.
* ``chatml``: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message; assistant contents and their
  ``<|im_end|>`` are trained.
* ``tokenizer_default``: the tokenizer's own ``chat_template``, rendered turn by turn so that the
  assistant parts can be located; the template must render each conversation prefix as a prefix
  of the whole (true of the common templates).
"""

from __future__ import annotations

from typing import Any

Segment = tuple[str, bool]

TEMPLATES = ("alpaca", "chatml", "tokenizer_default")

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The alpaca prompt text up to and including ``### Response:\\n``."""
    if input:
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def chatml_segments(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> list[Segment]:
    """ChatML segments; an assistant turn's content and closing ``<|im_end|>`` are trained."""
    segs: list[Segment] = []
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            segs += [(head, False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segs.append((head + m["content"] + "<|im_end|>\n", False))
    if add_generation_prompt:
        segs.append(("<|im_start|>assistant\n", False))
    return segs


def tokenizer_template_segments(messages: list[dict[str, str]], tokenizer: Any) -> list[Segment]:
    """Segments from the tokenizer's chat template, rendered prefix by prefix.

    For each assistant turn i: the text of ``messages[:i]`` with the generation prompt is the
    untrained part, and what ``messages[:i+1]`` adds to it is the trained answer (without trailing
    whitespace, as in ``chatml``).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_template 'tokenizer_default' needs a tokenizer with a chat_template; "
                         "this tokenizer has none (use 'chatml' or 'alpaca')")

    def render(msgs: list[dict[str, str]], gen: bool) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    segs: list[Segment] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(messages[:i], True), render(messages[: i + 1], False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render a conversation prefix as a prefix of "
                             "the whole, so assistant turns cannot be located; use prompt_template 'chatml'")
        answer = full[len(prompt):]
        core = answer.rstrip()  # trailing whitespace after the end-of-turn marker is template, not answer
        segs += [(prompt[len(done):], False), (core, True), (answer[len(core):], False)]
        done = full
    whole = render(messages, False)
    if not whole.startswith(done):
        raise ValueError("the tokenizer's chat template is not prefix-stable; use prompt_template 'chatml'")
    if whole[len(done):]:
        segs.append((whole[len(done):], False))
    return [s for s in segs if s[0]]


def chat_segments(messages: list[dict[str, str]], template: str, tokenizer: Any = None) -> list[Segment]:
    """Segments of a conversation under ``template`` ('chatml' or 'tokenizer_default')."""
    if template == "chatml":
        return chatml_segments(messages)
    if template == "tokenizer_default":
        return tokenizer_template_segments(messages, tokenizer)
    raise ValueError(f"prompt_template {template!r} cannot format chat messages; allowed: 'chatml', "
                     "'tokenizer_default'")


def alpaca_segments(instruction: str, input: str, output: str, template: str, tokenizer: Any = None) -> list[Segment]:
    """Segments of an alpaca row under ``template``: its prompt untrained, its output trained."""
    if template == "alpaca":
        return [(alpaca_prompt(instruction, input), False), (output, True)]
    user = f"{instruction}\n\n{input}" if input else instruction
    return chat_segments([{"role": "user", "content": user}, {"role": "assistant", "content": output}],
                         template, tokenizer)
