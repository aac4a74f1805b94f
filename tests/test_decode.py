"""The compiled decoder against an independent reference on SmolLM2-135M, batching, sampling,
EOS stopping, the command line, and bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from jax_implicit import batching, convert, decode, generate, serving
from jax_implicit import model as M
from jax_implicit import rules as R

NEW = 16
# The first ten instructions of val.jsonl, skipping row 4 (a 257-token paragraph that would make the
# no-cache reference several times slower). Prompt lengths 24..45 tokens: one bucket of 64.
ROWS = [0, 1, 2, 3, 5, 6, 7, 8, 9, 10]
# The issue's token table, spelled by hand in SmolLM2's byte-level vocabulary (Ġ = space, Ċ = newline).
PIECES = {"<": -4, "Ġ<": -4, "|": -4, "ĠI": -5, "I": -5, "ĠWe": -3, "What": -5, "Ġshould": -6,
          "Ġ*": 1, "Ġ-": 1, "ĠĠĠ": 1, "Ġ#": 1, "Ġ##": 1, "Ċ": 1, "!": 1}
TINY_PROMPTS, TINY_NEW = ["Name a colour.", "Write one word about the sea, please.", "Why?"], 100
CONFIGS = {"all": {}, "no_eos": {"eos": False}, "no_uniform": {"uniform": False}, "no_diversity": {"diversity": False}}


class Reference:
    """Deliberately simple: batch 1, no KV cache (the whole sequence through transformers' PyTorch
    model every step), rules written from the issue text. Logits are memoised per exact token
    sequence so configs that share a prefix share its forward pass."""

    def __init__(self, path, new_tokens):
        self.new_tokens = new_tokens
        self.tok = AutoTokenizer.from_pretrained(path)
        self.hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.memo = {}

    def logits(self, ids):
        if tuple(ids) not in self.memo:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # on a shared 2-core machine, 2 OpenMP threads make small ops ~5x slower
            try:
                with torch.no_grad():
                    self.memo[tuple(ids)] = self.hf(torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
            finally:
                torch.set_num_threads(threads)
        return self.memo[tuple(ids)]

    def generate(self, instruction, eos=True, uniform=True, diversity=True):
        tok = self.tok
        ids = tok("<|user|>\n" + instruction + "\n<|assistant|>\n")["input_ids"]
        after_user_tag = len(tok("<|user|>")["input_ids"])
        out, margins = [], []
        for n in range(self.new_tokens):
            rule = torch.zeros(self.hf.config.vocab_size)
            if uniform:
                for piece, weight in PIECES.items():
                    rule[tok.convert_tokens_to_ids(piece)] += weight
            if eos and 0 < n < 250:
                rule[tok.eos_token_id] += 15 * n / 250
            if diversity:
                for t in set(ids[after_user_tag:]):
                    rule[t] -= 1.5
            scores = torch.log_softmax(self.logits(ids), -1) + torch.log_softmax(rule, -1)
            top = torch.topk(scores, 2).values
            margins.append(float(top[0] - top[1]))
            out.append(int(scores.argmax()))
            ids.append(out[-1])
            if out[-1] == tok.eos_token_id:
                break
        return out, margins


@pytest.fixture(scope="module")
def val(data_dir):
    rows = [json.loads(line) for line in (data_dir / "val_eval" / "val.jsonl").read_text().splitlines()]
    return [rows[k]["instruction"] for k in ROWS]


@pytest.fixture(scope="module")
def smol(smollm2_dir, val):
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    dec = convert.load_hf(smollm2_dir)
    encoded = [serving.encode(tok, ins) for ins in val]
    return tok, dec, encoded, serving.eos_ids_for(dec.cfg, tok)


def tables_for(tok, name):
    cfg = R.default_config()
    cfg.update(CONFIGS[name])
    return R.build(cfg, tok, 49152, tok.eos_token_id)


def rows_of(tokens, lengths):
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    return [tokens[r, :lengths[r]].tolist() for r in range(len(lengths))]


@pytest.fixture(scope="module")
def batched(smol):
    """All ten prompts in one left-padded batch, for every rule config (one compilation for all four)."""
    tok, dec, encoded, eos = smol
    ids, mask, seen = batching.pad_prompts(encoded, len(encoded), 64, dec.cfg.pad_token_id)
    assert len(set(mask.sum(1))) > 5  # really mixed lengths
    return {name: rows_of(*decode.generate(dec, ids, mask, seen_mask=seen, max_new_tokens=NEW,
                                           rules=tables_for(tok, name), eos_ids=eos))
            for name in CONFIGS}


def mismatches(reference, results, instructions, name):
    """Rows where the compiled decoder's tokens differ from the reference's, with where and how close."""
    out = []
    for r, ins in enumerate(instructions):
        want, margins = reference.generate(ins, **{k: False for k in CONFIGS[name]})
        got = results[name][r]
        if got != want:
            step = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            out.append(f"{name} row {r} step {step}: ours {got} reference {want} "
                       f"(reference top-2 margin there {margins[min(step, len(margins) - 1)]:.2e})")
    return out


@pytest.fixture(scope="module")
def smol_reference(smollm2_dir):
    return Reference(smollm2_dir, NEW)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_smollm2_equals_reference(smol_reference, batched, val, name):
    assert not mismatches(smol_reference, batched, val, name)
    # Dropping these rules changes what SmolLM2 says within 16 tokens, so those comparisons are not vacuous.
    # The EOS ramp stays below 1 nat that early and flips nothing here; the tiny model below covers it.
    if name in ("no_uniform", "no_diversity"):
        assert any(batched[name][r] != batched["all"][r] for r in range(len(val)))


@pytest.mark.slow
def test_batched_equals_batch_one(smol, batched):
    tok, dec, encoded, eos = smol
    tables = tables_for(tok, "all")
    for r, p in enumerate(encoded):
        ids, mask, seen = batching.pad_prompts([p], 1, 64, dec.cfg.pad_token_id)
        alone = rows_of(*decode.generate(dec, ids, mask, seen_mask=seen, max_new_tokens=NEW, rules=tables,
                                         eos_ids=eos))
        assert alone[0] == batched["all"][r], f"row {ROWS[r]}"


# ----------------------------------------------------------------------------- tiny model: behaviour


@pytest.fixture(scope="module")
def tiny(tiny_smol_dir):
    tok = AutoTokenizer.from_pretrained(tiny_smol_dir)
    dec = convert.load_hf(tiny_smol_dir)
    ids, mask, seen = batching.pad_prompts([serving.encode(tok, s) for s in TINY_PROMPTS], 3, 16, 2)
    return tok, dec, ids, mask, seen


@pytest.fixture(scope="module")
def tiny_reference(tiny_smol_dir):
    return Reference(tiny_smol_dir, TINY_NEW)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_equals_reference_through_the_eos_ramp(tiny_reference, tiny, name):
    """A tiny random Llama with SmolLM2's tokenizer, 100 tokens: long enough for the EOS ramp to end
    every row early, and cheap enough for the no-cache reference."""
    tok, dec, ids, mask, seen = tiny
    tokens, lengths = decode.generate(dec, ids, mask, seen_mask=seen, max_new_tokens=TINY_NEW,
                                      rules=tables_for(tok, name), eos_ids=(tok.eos_token_id,))
    got = {name: rows_of(tokens, lengths)}
    assert not mismatches(tiny_reference, got, TINY_PROMPTS, name)
    stopped = [len(row) < TINY_NEW for row in got[name]]
    assert all(stopped) if name != "no_eos" else not any(stopped)  # the EOS rule is what ends them


def test_rows_prefilled_alone_equal_the_reference(tiny_reference, tiny, monkeypatch):
    """Prompts padded far beyond their length are prefilled one row at a time, 4 tokens at a time: each row
    skips its chunks of padding (10-12 of 16) and runs the rest, one of them part padding, and the tokens still
    equal the reference's."""
    tok, dec, *_ = tiny
    ids, mask, seen = batching.left_pad([serving.encode(tok, s) for s in TINY_PROMPTS], 3, 65, 2)
    monkeypatch.setattr(decode, "PREFILL_CHUNK", 4)
    chosen, choose = [], decode._row_chunk
    monkeypatch.setattr(decode, "_row_chunk", lambda cache, mask: chosen.append(choose(cache, mask)) or chosen[-1])
    for name in CONFIGS:
        got = {name: rows_of(*decode.generate(dec, ids, mask, seen_mask=seen, max_new_tokens=TINY_NEW,
                                              rules=tables_for(tok, name), eos_ids=(tok.eos_token_id,)))}
        assert not mismatches(tiny_reference, got, TINY_PROMPTS, name)
    assert chosen == [4] * len(CONFIGS)


def test_rows_are_prefilled_together_when_it_saves_little_or_on_a_mesh(tiny):
    dec = tiny[1]
    cache = M.KVCache.init(dec.cfg, 8, 40)
    mask = np.zeros((8, 257), bool)
    mask[:, -3:] = True
    assert decode._row_chunk(cache, mask) == 64  # a chunk of 64 per row, against 256 columns together
    mesh = jax.make_mesh((8,), ("data",))
    split = jax.tree.map(lambda a: jax.device_put(a, jax.NamedSharding(mesh, jax.P(*("data",)[:a.ndim]))), cache)
    assert decode._row_chunk(split, mask) == 0
    mask[:, 100:] = True  # the rows' chunks (3 of 4) would hold most of the padded tokens
    assert decode._row_chunk(cache, mask) == 0


def test_stops_at_eos_per_row(tiny):
    tok, dec, ids, mask, _ = tiny
    free, lengths = (np.asarray(a) for a in decode.generate(dec, ids, mask, max_new_tokens=10, eos_ids=()))
    assert (lengths == 10).all()
    eos = int(free[0, 3])
    first = [list(row).index(eos) if eos in row else None for row in free]
    tokens, lengths = (np.asarray(a) for a in decode.generate(dec, ids, mask, max_new_tokens=10, eos_ids=(eos,)))
    for r in range(2):
        n = 10 if first[r] is None else first[r] + 1
        assert lengths[r] == n and (tokens[r, :n] == free[r, :n]).all()
        assert (tokens[r, n:] == dec.cfg.pad_token_id).all()


def test_sampling_is_keyed_and_top_p_narrows_to_greedy(tiny):
    tok, dec, ids, mask, _ = tiny

    def run(**kw):
        return np.asarray(decode.generate(dec, ids, mask, max_new_tokens=8, eos_ids=(), **kw)[0])

    a = run(temperature=5.0, key=jax.random.key(1))
    assert (a == run(temperature=5.0, key=jax.random.key(1))).all()
    assert (a != run(temperature=5.0, key=jax.random.key(2))).any()
    assert (run(temperature=5.0, top_p=1e-6, key=jax.random.key(3)) == run()).all()


def test_command_line_writes_alpaca_eval_json(tiny_smol_dir, tmp_path):
    rows = [{"instruction": "Say hi."}, {"instruction": "  Count to three.\n", "dataset": "helpful_base"},
            {"instruction": "Name a fruit."}]
    src = tmp_path / "ins.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out" / "gen.json"
    proc = subprocess.run(
        [sys.executable, "-m", "jax_implicit.generate", "--config=configs/generate.py:no_diversity",
         f"--config.model.path={tiny_smol_dir}", f"--config.data.instructions={src}", f"--config.output={out}",
         "--config.decode.max_new_tokens=6", "--config.decode.batch_size=2", "--config.decode.bucket=16",
         "--config.generator=tiny"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert [g["instruction"] for g in got] == [r["instruction"] for r in rows]
    assert [g["dataset"] for g in got] == ["ins", "helpful_base", "ins"]
    assert all(set(g) == {"instruction", "output", "generator", "dataset"} and g["generator"] == "tiny" for g in got)
    assert all(isinstance(g["output"], str) and g["output"] for g in got)
    assert [p.name for p in out.parent.iterdir()] == ["gen.json"]  # nothing temporary left behind
    assert "tok_per_s" in proc.stderr


# ----------------------------------------------------------------------------- bad input, before compiling


@pytest.fixture
def no_compile(monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("compiled before validating the input")

    monkeypatch.setattr(decode, "_generate_jit", forbidden)


def test_bad_arrays_fail_before_compiling(tiny, no_compile):
    tok, dec, ids, mask, _ = tiny
    for n in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
            decode.generate(dec, ids, mask, max_new_tokens=n)
    with pytest.raises(ValueError, match="prompt row 1 has .* exceeds the context of 256"):
        long = np.ones((2, 200), bool)
        long[0, :50] = False
        decode.generate(dec, np.full((2, 200), 5), long, max_new_tokens=100)
    with pytest.raises(ValueError, match="prompt row 0 does not end in a real token"):
        decode.generate(dec, ids, mask[:, ::-1], max_new_tokens=4)
    with pytest.raises(ValueError, match="needs an explicit PRNG key"):
        decode.generate(dec, ids, mask, max_new_tokens=4, temperature=1.0)


def test_bad_instructions_fail_before_compiling(tiny, no_compile):
    tok, dec, *_ = tiny
    with pytest.raises(ValueError, match="no instructions"):
        serving.generate_texts(dec, tok, [], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        serving.generate_texts(dec, tok, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="instruction 1 is .* tokens; with max_new_tokens=16 it exceeds the context"):
        serving.generate_texts(dec, tok, ["hi", "word " * 300], max_new_tokens=16)


def test_bad_instruction_files_are_named(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="empty.json is empty"):
        generate.read_instructions(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "ok"}\n{"prompt": "no instruction key"}\n')
    with pytest.raises(ValueError, match="bad.jsonl, row 1: key 'instruction' is missing"):
        generate.read_instructions(str(bad))
    with pytest.raises(ValueError, match="data.instructions: data file .*nope.json does not exist"):
        generate.read_instructions(str(tmp_path / "nope.json"))
    assert len(generate.read_instructions("val")) == 56  # the dataset name resolves to data/val_eval/val.jsonl


def test_bad_rule_weight_fails_before_loading_the_model(tiny_smol_dir, monkeypatch):
    from ml_collections import ConfigDict

    from configs.generate import get_config

    cfg = get_config().to_dict()
    cfg["model"]["path"] = str(tiny_smol_dir)
    cfg["rules"]["weights"]["What"] = "-5x"
    monkeypatch.setattr(convert, "load_hf", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=r"rules\.weights\.What: '-5x' is not a finite number"):
        generate.run(ConfigDict(cfg))
