"""The paper's rule-based adapter (Section 6): a hand-written next-token distribution that is
multiplied with the base model's (`log_softmax(base) + log_softmax(rules)`) inside the compiled
decoding step.

Three rules, each switchable: an EOS ramp over the response length, fixed offsets for 15 token
strings, and a diversity penalty on every token id already seen since the end of the user tag.
The token table is written as strings (`▁` = SentencePiece's space, `\\n` = newline) and mapped
through the model's own tokenizer, so the same config works for Llama-2's SentencePiece vocabulary
and byte-level BPE vocabularies (SmolLM2, OLMo). The result is a `RuleTables` pytree of arrays:
switching rules or weights changes values, never shapes, so ablations share one compilation.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

SPACE = "▁"

# name -> (token string, weight). Names exist so a weight can be overridden from the command line.
TOKENS: dict[str, tuple[str, float]] = {
    "lt": ("<", -4.0),
    "space_lt": ("▁<", -4.0),
    "bar": ("|", -4.0),
    "space_I": ("▁I", -5.0),
    "I": ("I", -5.0),
    "space_We": ("▁We", -3.0),
    "What": ("What", -5.0),  # the paper's Table 8 prints -3; its code (and this default) uses -5
    "space_should": ("▁should", -6.0),
    "space_star": ("▁*", 1.0),
    "space_dash": ("▁-", 1.0),
    "three_spaces": ("▁▁▁", 1.0),
    "space_hash": ("▁#", 1.0),
    "space_hashes": ("▁##", 1.0),
    "newline": ("\n", 1.0),
    "bang": ("!", 1.0),
}


def default_config() -> ConfigDict:
    """The paper's rules and weights; Table 4's ablations switch `eos`, `uniform` or `diversity` off."""
    return ConfigDict(dict(
        eos=True,  # rule 1: ramp up the EOS score with the response length
        eos_scale=15.0,  # EOS score 15 * n / horizon while 0 < n < horizon (n = response tokens so far)
        eos_horizon=250,
        eos_monotone=False,  # False: the authors' quirk, score 0 from n = horizon on; True: stays at eos_scale
        uniform=True,  # rule 2: fixed offsets on 15 tokens (strings / weights below)
        strings={name: s for name, (s, _) in TOKENS.items()},
        weights={name: w for name, (_, w) in TOKENS.items()},
        diversity=True,  # rule 3: penalise tokens already in the response
        diversity_penalty=-1.5,  # once per distinct id seen since the end of the user tag
    ))


def variant(cfg: ConfigDict | None) -> str:
    """The decoding variant's name: "greedy" without rules, "rules", or "rules-no_eos" etc. for an ablation."""
    if cfg is None:
        return "greedy"
    return "rules" + "".join(f"-no_{rule}" for rule in ("eos", "uniform", "diversity") if not cfg[rule])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RuleTables:
    """The rules as arrays; a switched-off rule is all zeros, so every ablation has the same shapes."""

    offsets: jax.Array  # (V,) float32: the uniform token offsets
    eos: jax.Array  # (V,) float32: 1 at the EOS id when the EOS rule is on
    eos_scale: jax.Array  # () float32
    eos_horizon: jax.Array  # () float32
    eos_monotone: jax.Array  # () bool
    diversity: jax.Array  # () float32: added once for every seen id


def scores(tables: RuleTables, n: jax.Array, seen: jax.Array) -> jax.Array:
    """Rule scores (B, V) after `n` response tokens, given the (B, V) bool set of seen ids."""
    n = jnp.asarray(n, jnp.float32)
    ramp = tables.eos_scale * n / tables.eos_horizon
    after = jnp.where(tables.eos_monotone, tables.eos_scale, 0.0)
    ramp = jnp.where(n >= tables.eos_horizon, after, jnp.where(n > 0, ramp, 0.0))
    return tables.offsets + ramp * tables.eos + tables.diversity * seen.astype(jnp.float32)


# ----------------------------------------------------------------------------- host side


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ValueError(f"rules.{where}: {value!r} is not a finite number")
    return float(value)


def validate(cfg: ConfigDict) -> None:
    """Every switch a bool, every weight a finite number, strings and weights naming the same tokens."""
    for key in ("eos", "eos_monotone", "uniform", "diversity"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"rules.{key}: {cfg[key]!r} is not a bool")
    for key in ("eos_scale", "diversity_penalty"):
        _number(cfg[key], key)
    if _number(cfg.eos_horizon, "eos_horizon") <= 0:
        raise ValueError(f"rules.eos_horizon: {cfg.eos_horizon!r} must be positive")
    strings, weights = dict(cfg.strings), dict(cfg.weights)
    if set(strings) != set(weights):
        raise ValueError(f"rules.strings and rules.weights name different tokens: "
                         f"{sorted(set(strings) ^ set(weights))}")
    for name, s in strings.items():
        if not isinstance(s, str) or not s:
            raise ValueError(f"rules.strings.{name}: {s!r} is not a non-empty string")
        _number(weights[name], f"weights.{name}")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    spec = json.loads(backend.to_str())
    return '"ByteLevel"' in json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])


def vocabulary_piece(text: str, byte_level: bool) -> list[str]:
    """How `text` (with `▁` for spaces) is spelled in a vocabulary; SentencePiece byte fallback second."""
    plain = text.replace(SPACE, " ")
    if byte_level:
        table = _bytes_to_unicode()
        return ["".join(table[b] for b in plain.encode("utf-8"))]
    piece = plain.replace(" ", SPACE)
    raw = plain.encode("utf-8")
    return [piece] + ([f"<0x{raw[0]:02X}>"] if len(raw) == 1 else [])


def token_ids(tokenizer, strings: dict[str, str], vocab_size: int) -> tuple[dict[str, int], list[str]]:
    """Map each named string to the one token id that spells it; names of strings that are no single
    token of this vocabulary (or fall outside the model's `vocab_size`) come back as `missing`."""
    vocab = tokenizer.get_vocab()
    byte_level = _is_byte_level(tokenizer)
    found, missing = {}, []
    for name, s in strings.items():
        ids = [vocab[p] for p in vocabulary_piece(s, byte_level) if p in vocab]
        if ids and ids[0] < vocab_size:
            found[name] = ids[0]
        else:
            missing.append(name)
    return found, missing


def build(cfg: ConfigDict, tokenizer, vocab_size: int, eos_id: int) -> RuleTables:
    """The RuleTables for a model's vocabulary. Strings that are not one token are logged by name
    and left out (never mapped to an unknown id)."""
    validate(cfg)
    if not isinstance(eos_id, (int, np.integer)) or not 0 <= eos_id < vocab_size:
        raise ValueError(f"EOS id {eos_id!r} is not an id of this vocabulary (size {vocab_size}); the EOS rule needs one")
    found, missing = token_ids(tokenizer, dict(cfg.strings), vocab_size)
    for name in missing:
        logging.warning("rule token %s=%r is not a single token of this vocabulary; left out",
                        name, cfg.strings[name])
    offsets = np.zeros(vocab_size, np.float32)
    if cfg.uniform:
        for name, i in found.items():
            offsets[i] += float(cfg.weights[name])
    eos = np.zeros(vocab_size, np.float32)
    eos[eos_id] = 1.0 if cfg.eos else 0.0
    return RuleTables(
        offsets=jnp.asarray(offsets), eos=jnp.asarray(eos),
        eos_scale=jnp.float32(cfg.eos_scale), eos_horizon=jnp.float32(cfg.eos_horizon),
        eos_monotone=jnp.bool_(cfg.eos_monotone),
        diversity=jnp.float32(cfg.diversity_penalty if cfg.diversity else 0.0))

