"""Weights between HF directories and the Flax model, in both directions, tensor by tensor.

Import checks every tensor's presence and shape from the file headers before reading any data,
then fills each parameter with `jax.make_array_from_callback`, so a sharded parameter only ever
reads the slices its local devices hold. Export gathers one tensor at a time into a temporary
folder that is renamed into place only once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from jax_implicit import files
from jax_implicit import model as M
from jax_implicit.pretrained import TOKENIZER_FILES

Sharding = jax.sharding.Sharding
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints still carry


def _layout(cfg: M.ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable, Callable]]:
    """Our parameter path -> (HF tensor name, HF->ours transform, ours->HF transform).

    Per-layer names contain `{i}`. HF linear weights are (out, in); ours are (in, ..., out) with
    heads split out, which is why q/k/v/o carry reshapes. RoPE needs no permutation: both sides
    use the rotate-half layout.
    """
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    same = (lambda w: w, lambda w: w)
    linear = (lambda w: w.T, lambda w: w.T)

    def heads_in(n):  # (n*Dh, D) <-> (D, n, Dh)
        return (lambda w: w.T.reshape(D, n, Dh), lambda w: w.reshape(D, n * Dh).T)

    out = {
        ("embed",): ("model.embed_tokens.weight", *same),
        ("layers", "wq"): ("model.layers.{i}.self_attn.q_proj.weight", *heads_in(H)),
        ("layers", "wk"): ("model.layers.{i}.self_attn.k_proj.weight", *heads_in(K)),
        ("layers", "wv"): ("model.layers.{i}.self_attn.v_proj.weight", *heads_in(K)),
        ("layers", "wo"): ("model.layers.{i}.self_attn.o_proj.weight",
                           lambda w: w.T.reshape(H, Dh, D), lambda w: w.reshape(H * Dh, D).T),
        ("layers", "w_gate"): ("model.layers.{i}.mlp.gate_proj.weight", *linear),
        ("layers", "w_up"): ("model.layers.{i}.mlp.up_proj.weight", *linear),
        ("layers", "w_down"): ("model.layers.{i}.mlp.down_proj.weight", *linear),
    }
    norms = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
    if cfg.post_norms:  # Gemma: "post_attention_layernorm" is the attention output's norm
        norms = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                 "mlp_norm": "pre_feedforward_layernorm", "mlp_post_norm": "post_feedforward_layernorm"}
    if cfg.qk_norm:
        norms |= {"q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}
    if cfg.norm != "layernorm":
        out |= {("layers", ours): (f"model.layers.{{i}}.{hf}.weight", *same) for ours, hf in norms.items()}
        out[("final_norm",)] = ("model.norm.weight", *same)
    if not cfg.tie_word_embeddings:
        out[("lm_head",)] = ("lm_head.weight", *same)
    return out


def _hf_names(cfg: M.ModelConfig, template: str) -> list[str]:
    return [template.format(i=i) for i in range(cfg.num_layers)] if "{i}" in template else [template]


# ----------------------------------------------------------------------------- reading


class _Reader:
    """Reads named tensors from an HF folder: single or sharded safetensors, or PyTorch `.bin`."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        self.torch_state = None
        if files:
            self.entries = {name: (path / f, *entry) for f in files for name, entry in _safetensors_header(path / f).items()}
            self.shapes = {name: e[2] for name, e in self.entries.items()}
        else:
            bins = sorted(path.glob("pytorch_model*.bin"))
            if not bins:
                raise FileNotFoundError(f"{path}: no model.safetensors, safetensors shards or pytorch_model*.bin")
            import torch  # only for legacy .bin checkpoints

            self.torch_state = {}
            for b in bins:
                self.torch_state.update(torch.load(b, map_location="cpu", weights_only=True, mmap=True))
            self.shapes = {n: tuple(t.shape) for n, t in self.torch_state.items()}

    def read(self, name: str) -> np.ndarray:
        if self.torch_state is not None:
            t = self.torch_state[name]
            return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
        file, dtype, shape, offset = self.entries[name]
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)


# safetensors dtype names -> numpy (ml_dtypes for bfloat16, which numpy lacks)
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _safetensors_header(file: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, byte offset of the data) from a safetensors file's JSON header. Tensors are then
    memory-mapped as numpy arrays: no JAX array is made (nor compiled for) before every value is checked."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{file}: tensor {name} has dtype {entry['dtype']}, which this reader does not know")
        out[name] = (SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), 8 + size + entry["data_offsets"][0])
    return out


def _check_tensors(reader: _Reader, cfg: M.ModelConfig, layout: dict) -> None:
    """Every expected tensor present with the right shape, nothing unexpected: checked from headers."""
    abstract_params = nnx.to_pure_dict(nnx.state(M.abstract(cfg), nnx.Param))
    expected: dict[str, tuple[int, ...]] = {}
    for path, (template, _, to_hf) in layout.items():
        shape = _get(abstract_params, path).shape
        per_layer = shape[1:] if "{i}" in template else shape
        hf_shape = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(per_layer, jnp.float32)).shape
        expected.update({n: hf_shape for n in _hf_names(cfg, template)})
    found = {n: s for n, s in reader.shapes.items() if not n.endswith(IGNORED_HF_TENSORS)}
    if cfg.tie_word_embeddings:
        found.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    problems = [f"missing tensor {n} (expected shape {s})" for n, s in expected.items() if n not in found]
    problems += [f"unexpected tensor {n} {s}" for n, s in found.items() if n not in expected]
    problems += [f"tensor {n} has shape {found[n]}, expected {s}"
                 for n, s in expected.items() if n in found and tuple(found[n]) != tuple(s)]
    if problems:
        raise ValueError(f"{reader.path}: checkpoint does not match its config.json:\n  " + "\n  ".join(problems[:20]))


def _get(tree: dict, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_hf(path: str | Path, *, param_dtype: str = "float32", dtype: str = "float32",
            sharding: Callable[[tuple[str, ...]], Sharding] | None = None) -> M.Decoder:
    """An HF model folder as a `Decoder`, parameters placed by `sharding(logical_axes)` if given.

    Peak host memory stays near one copy of the model plus one parameter: HF tensors are read one
    (layer) at a time, once each, and dropped when their parameter is placed.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    cfg = M.from_hf_config(path, param_dtype=param_dtype, dtype=dtype)
    layout = _layout(cfg)
    reader = _Reader(path)
    _check_tensors(reader, cfg, layout)
    graphdef, state = nnx.split(M.abstract(cfg))
    axes = M.logical_axes(M.abstract(cfg))
    target = jnp.dtype(M.DTYPES[param_dtype])
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params: dict = {}
    for p, (template, to_ours, _) in layout.items():
        names = _hf_names(cfg, template)
        shape = _get(nnx.to_pure_dict(state), p).shape
        stacked = "{i}" in template

        read: dict[int, np.ndarray] = {}  # each HF tensor is read once, however many local shards need it

        def tensor(i: int, names=names, to_ours=to_ours, read=read) -> np.ndarray:
            if i not in read:
                read[i] = np.asarray(to_ours(reader.read(names[i])), dtype=target)
                if not np.isfinite(read[i]).all():  # NaN weights would decode to empty strings, silently
                    raise ValueError(f"{path}: tensor {names[i]} holds non-finite values")
            return read[i]

        def fetch(index, stacked=stacked, tensor=tensor, n=len(names)):
            if not stacked:
                return tensor(0)[index]
            return np.stack([tensor(i)[index[1:]] for i in range(n)[index[0]]])

        shard = sharding(_get(axes, p)) if sharding else default
        _set(params, p, jax.make_array_from_callback(shape, shard, fetch))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- writing


def _to_host(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _hf_tensors(decoder: M.Decoder) -> Iterator[tuple[str, jax.Array]]:
    """(HF name, tensor) pairs, gathered one layer slice at a time."""
    cfg = decoder.cfg
    params = nnx.to_pure_dict(nnx.state(decoder, nnx.Param))
    for p, (template, _, to_hf) in _layout(cfg).items():
        value = _get(params, p)
        for i, name in enumerate(_hf_names(cfg, template)):
            yield name, jnp.asarray(to_hf(_to_host(value[i] if "{i}" in template else value)))


def export_hf(decoder: M.Decoder, out: str | Path, *, tokenizer_dir: str | Path | None = None,
              chat_template: str | None = None, max_shard_bytes: int = 2 << 30) -> Path:
    """Write an HF folder that `AutoModelForCausalLM.from_pretrained` loads with identical logits.

    `chat_template`: set on the exported tokenizer (the format the model was trained on, so that
    `apply_chat_template` and serving engines prompt it that way). All processes must call this (sharded
    tensors are gathered collectively); process 0 writes.
    """
    from safetensors.flax import save_file

    cfg = decoder.cfg
    writer = jax.process_index() == 0
    out = Path(out)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer_dir} does not exist")
    with files.atomic_dir(out) if writer else contextlib.nullcontext() as tmp:
        shards: list[list[str]] = []  # tensor names per written shard
        total_size = 0

        def flush(shard: dict[str, jax.Array]) -> None:
            if writer:
                save_file(shard, str(tmp / f"part-{len(shards)}"), metadata={"format": "pt"})
            shards.append(list(shard))

        shard: dict[str, jax.Array] = {}
        for name, tensor in _hf_tensors(decoder):
            if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > max_shard_bytes:
                flush(shard)
                shard = {}
            shard[name] = tensor
            total_size += tensor.nbytes
        flush(shard)
        if not writer:
            return out
        weight_map = {}
        for i, names in enumerate(shards):
            final = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(tmp / f"part-{i}", tmp / final)
            weight_map.update(dict.fromkeys(names, final))
        if len(shards) > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(M.to_hf_config(cfg), indent=2))
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids) or None,
               "pad_token_id": cfg.pad_token_id, "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        for f in TOKENIZER_FILES if tokenizer_dir else ():
            if (Path(tokenizer_dir) / f).is_file():
                shutil.copy(Path(tokenizer_dir) / f, tmp / f)
        if tokenizer_dir and chat_template:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            tokenizer.chat_template = chat_template
            tokenizer.save_pretrained(tmp)
    return out
