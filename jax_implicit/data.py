"""Training data: the paper's datasets by name, its tuning modes, and its authors' exact token ids and loss masks.

Every dataset becomes rows in the open-instruct `messages` format the authors trained on
(`{"dataset", "id", "messages": [{"role", "content"}]}`), built exactly as their `data/processed/*/make_*.py`
scripts built them (`formats.py`). Rows load from the public dataset id with `datasets` or from a local
JSON/JSONL file or folder; a row that already holds `messages` is taken as it is, so the authors' own files
load unchanged. Batches of the tokens are `batching.py`'s.
Tokenization and masking follow their `encode_with_messages_format`: masks come from token counts of
prefixes, so they are what their training saw, not a re-derivation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from ml_collections import ConfigDict

from jax_implicit import datasets, files, formats, prompts, refusals
from jax_implicit.formats import DATASETS, DataError

MODES = ("instruction", "response", "single_task")
SINGLE_TASK = ("gsm8k", "mbpp", "poetry", "recipes", "chess")
CHAT_FORMATS = ("paper", "rt")  # the paper's authors' format, or Response Tuning's (An et al.)
RT_MARKER = "\n<|assistant|>\n"  # RT's TRL response template; its first three token ids are dropped


def data_config(name: str = "lima", path: str = "", mode: str = "instruction", tag_set: str = "user_assistant",
                max_seq_length: int = 2048, limit: int = 0, bucket_min: int = 64, chat_format: str = "paper") -> ConfigDict:
    """`path`: a file or folder, a named dataset or a hub id to read instead of the name's own source; `limit`:
    keep the first N examples (0: all); `bucket_min`: the shortest padded length (`batching.sizes` up to
    `max_seq_length`); `chat_format`: one of CHAT_FORMATS (`encode` or `encode_rt`); `refusals`: refusals
    mixed in (`refusals.refusal_config`; kind "" adds none)."""
    return ConfigDict(dict(name=name, path=path, mode=mode, tag_set=tag_set, max_seq_length=max_seq_length,
                           limit=limit, bucket_min=bucket_min, chat_format=chat_format,
                           refusals=refusals.refusal_config()))


# ----------------------------------------------------------------------------- rows


def _read_rows(path: Path) -> list[dict]:
    try:
        return files.read_rows(path, what="data file")
    except ValueError as e:
        raise DataError(str(e)) from None


def _local_rows(path: Path) -> tuple[list, Callable[[int], str]]:
    if path.is_dir():
        if (path / "state.json").is_file():  # a `datasets.Dataset.save_to_disk` folder
            import datasets

            return list(datasets.load_from_disk(str(path))), lambda i: f"{path} row {i}"
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.json")])
        if not files:
            raise DataError(f"data folder {path} holds no .json or .jsonl files")
        parts = [(f, _read_rows(f)) for f in files]
        rows = [r for _, rs in parts for r in rs]
        starts = np.cumsum([0] + [len(rs) for _, rs in parts])

        def where(i):
            k = int(np.searchsorted(starts, i, side="right")) - 1
            return f"{parts[k][0]} row {i - starts[k]}"
        return rows, where
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    return _read_rows(path), lambda i: f"{path} row {i}"


def load_rows(cfg: ConfigDict) -> list[dict]:
    """The dataset `cfg.name` as `messages` rows, from `cfg.path` if given (a file or folder, another named
    dataset such as `lima_rephrased`, or a hub id), else from the named dataset's own source."""
    if cfg.name not in DATASETS:
        raise DataError(f"unknown dataset {cfg.name!r}; known: {', '.join(DATASETS)}")
    if cfg.mode not in MODES:
        raise DataError(f"unknown tuning mode {cfg.mode!r}; expected one of {MODES}")
    if cfg.mode == "single_task" and cfg.name not in SINGLE_TASK:
        raise DataError(f"mode 'single_task' is for the narrow datasets {SINGLE_TASK}, not {cfg.name!r}")
    if cfg.chat_format not in CHAT_FORMATS:
        raise DataError(f"unknown chat format {cfg.chat_format!r}; expected one of {CHAT_FORMATS}")
    prompts.tags(cfg.tag_set)
    src = DATASETS[cfg.name]
    try:
        source = datasets.resolve(cfg.path or cfg.name, flag="--config.data.path")
    except datasets.DataSourceError as e:
        raise DataError(str(e)) from None
    if source.path is not None:
        raw, where = _local_rows(source.path)
    else:
        import datasets as hf_datasets

        raw = hf_datasets.load_dataset(source.hub_id, source.hub_config, split=source.split)
        where = lambda i: f"{source} row {i}"  # noqa: E731
    rows_in = itertools.islice(raw, src.source_rows)  # lazy: chess reads a large source only up to 1000 games
    first = next(rows_in, None)
    rows_in = enumerate(itertools.chain([] if first is None else [first], rows_in))
    if isinstance(first, dict) and "messages" in first:  # already in the authors' format
        rows = [formats.check_messages(row, where(i)) for i, row in itertools.islice(rows_in, src.examples)]
    else:
        rows = list(itertools.islice(src.convert(rows_in, where), src.examples))
    rows = rows[:cfg.limit] if cfg.limit else rows
    if not rows:
        raise DataError(f"dataset {cfg.name!r} ({source}) has no rows")
    return [apply_mode(r, cfg.mode, cfg.chat_format) for r in _with_refusals(rows, cfg.refusals)]


def _with_refusals(rows: list[dict], cfg: ConfigDict) -> list[dict]:
    """Response Tuning's contextual refusals after the training rows, the implicit-ins authors' selective ones
    before them (as in their `lima_no_instruction_plus_refusal.jsonl`)."""
    if not cfg.kind:
        return rows
    try:
        extra = refusals.refusals(cfg)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(str(e)) from None
    extra = [formats.check_messages(r, f"{refusals.source(cfg)} row {i}") for i, r in enumerate(extra)]
    return extra + rows if cfg.kind == "selective" else rows + extra


def apply_mode(row: dict, mode: str, chat_format: str = "paper") -> dict:
    """Response tuning empties every user turn (the paper) or drops it, leaving the assistant turns alone
    (RT: no user turn at all); the other modes keep the row."""
    if mode != "response":
        return row
    if chat_format == "rt":
        return {**row, "messages": [m for m in row["messages"] if m["role"] != "user"]}
    return {**row, "messages": [{**m, "content": ""} if m["role"] == "user" else m for m in row["messages"]]}


def write_jsonl(rows: Iterable[dict], out: str | Path) -> Path:
    """Rows as JSON Lines, byte-compatible with the authors' `json.dumps(record) + "\\n"` files."""
    return files.write_atomic(out, "".join(json.dumps(r) + "\n" for r in rows))


# ----------------------------------------------------------------------------- tokens and loss masks


def render(messages: list[dict], tag_set: str, eos: str) -> str:
    """The authors' `_concat_messages`: per-message text, not yet stripped."""
    user, assistant = prompts.tags(tag_set)
    tag = {"system": "<|system|>", "user": user, "assistant": assistant}
    return "".join(tag[m["role"]] + "\n" + m["content"].strip() + (eos if m["role"] == "assistant" else "") + "\n"
                   for m in messages)


def encode(messages: list[dict], tokenizer, tag_set: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and a loss mask (True on response tokens and their EOS) for one conversation.

    As in the authors' code, each non-assistant turn is masked from the token count of the text before it
    to the token count of the text through it plus the next assistant tag, both tokenized on their own
    (so BOS is counted exactly where the tokenizer adds one), and everything is truncated on the right.
    """
    count = lambda text: len(tokenizer(text, max_length=max_len, truncation=True)["input_ids"])  # noqa: E731
    eos = tokenizer.eos_token
    ids = np.asarray(tokenizer(render(messages, tag_set, eos).strip(), max_length=max_len, truncation=True)["input_ids"],
                     np.int32)
    loss = np.ones(len(ids), bool)
    assistant_tag = prompts.tags(tag_set)[1]
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            continue
        start = 0 if k == 0 else count(render(messages[:k], tag_set, eos))
        before = render(messages[:k + 1], tag_set, eos)
        followed = k + 1 < len(messages) and messages[k + 1]["role"] == "assistant"
        end = count(before + assistant_tag + "\n" if followed else before)
        loss[start:end] = False
        if end >= max_len:
            break
    return ids, loss


def encode_rt(messages: list[dict], tokenizer, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask in Response Tuning's format: `<|role|>\n` + content (not stripped) + `\n`, with
    EOS before the newline of assistant turns, tokenized as a whole and truncated on the right. As RT's TRL
    collator does, loss falls on every token after the first occurrence of the token ids of `RT_MARKER`
    without their first three; with no occurrence the example has no loss token."""
    text = "".join(f"<|{m['role']}|>\n{m['content']}" + (tokenizer.eos_token if m["role"] == "assistant" else "") + "\n"
                   for m in messages)
    ids = np.asarray(tokenizer(text, max_length=max_len, truncation=True)["input_ids"], np.int32)
    marker = tokenizer(RT_MARKER, add_special_tokens=False)["input_ids"][3:]
    loss = np.zeros(len(ids), bool)
    for start in range(len(ids) - len(marker) + 1):
        if ids[start:start + len(marker)].tolist() == marker:
            loss[start + len(marker):] = True
            break
    return ids, loss


@dataclasses.dataclass
class Examples:
    """Tokenized examples; `loss[i][t]` says whether token t of example i is trained on."""

    ids: list[np.ndarray]
    loss: list[np.ndarray]
    dropped: int  # examples with no loss token left after truncation
    names: list[str] = dataclasses.field(default_factory=list)  # each example's row id, for messages

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], np.int64)


def tokenize(rows: list[dict], tokenizer, tag_set: str, max_len: int, name: str = "", vocab_size: int = 0,
             source: str = "", chat_format: str = "paper") -> Examples:
    """`rows` as token ids and loss masks in `chat_format`; with `vocab_size`, every id must index the model's
    embedding (a tokenizer with added tokens can make ids the model has no row for: NaN loss, or silent garbage)."""
    ids, loss, names, dropped = [], [], [], 0
    for k, row in enumerate(rows):
        i, m = (encode_rt(row["messages"], tokenizer, max_len) if chat_format == "rt"
                else encode(row["messages"], tokenizer, tag_set, max_len))
        if vocab_size and len(i) and (i.max() >= vocab_size or i.min() < 0):
            bad = int(i[(i >= vocab_size) | (i < 0)][0])
            raise DataError(f"{source or name} row {k} (id {row.get('id')!r}): token id {bad} "
                            f"({tokenizer.convert_ids_to_tokens(bad)!r}) is outside the model's vocabulary of "
                            f"{vocab_size}")
        if m[1:].any():  # the first token is never a target
            ids.append(i)
            loss.append(m)
            names.append(str(row.get("id", k)))
        else:
            dropped += 1
    if not ids:
        raise DataError(f"dataset {name!r}: none of its {len(rows)} examples keeps a response token after "
                        f"truncation to {max_len} tokens")
    return Examples(ids, loss, dropped, names)
