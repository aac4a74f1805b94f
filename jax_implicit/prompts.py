"""The paper's text formats, exactly as its authors' code builds them (see data/README.md)."""

from __future__ import annotations

TAG_SETS: dict[str, tuple[str, str]] = {
    "user_assistant": ("<|user|>", "<|assistant|>"),
    "AB": ("<|A|>", "<|B|>"),  # the paper's tag ablation
}


def tags(tag_set: str) -> tuple[str, str]:
    if tag_set not in TAG_SETS:
        raise ValueError(f"unknown tag set {tag_set!r}; expected one of {sorted(TAG_SETS)}")
    return TAG_SETS[tag_set]


def chat_template(tag_set: str = "user_assistant") -> str:
    """A Jinja chat template for exported tokenizers that reproduces these formats with `apply_chat_template`:
    with `add_generation_prompt`, `generation_prompt` (contents as given); without it, the training text
    (each content stripped, EOS after each response, the whole text stripped), as `data.render` builds it."""
    user, assistant = tags(tag_set)
    return (
        "{%- set tags = {'system': '<|system|>', 'user': '" + user + "', 'assistant': '" + assistant + "'} -%}"
        "{%- set ns = namespace(text='') -%}"
        "{%- for m in messages -%}"
        "{%- set content = m['content'] if add_generation_prompt else m['content'] | trim -%}"
        "{%- set ns.text = ns.text + tags[m['role']] + '\n' + content"
        " + (eos_token if m['role'] == 'assistant' else '') + '\n' -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ns.text + '" + assistant + "\n' }}{%- else -%}{{ ns.text | trim }}{%- endif -%}"
    )


def generation_prompt(instruction: str, tag_set: str = "user_assistant") -> str:
    """The evaluation prompt; the instruction is deliberately not stripped (as in the authors' code)."""
    user, assistant = tags(tag_set)
    return f"{user}\n{instruction}\n{assistant}\n"
