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


def generation_prompt(instruction: str, tag_set: str = "user_assistant") -> str:
    """The evaluation prompt; the instruction is deliberately not stripped (as in the authors' code)."""
    user, assistant = tags(tag_set)
    return f"{user}\n{instruction}\n{assistant}\n"
