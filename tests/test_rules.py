"""The rule table mapped through real tokenizers, and bad rule configs."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from transformers import AutoTokenizer

from jax_implicit import rules as R

# The paper's ids for its 15 strings (in TOKENS order) with the Llama-2 tokenizer; EOS is 2.
PAPER_IDS = [29966, 529, 29989, 306, 29902, 1334, 5618, 881, 334, 448, 1678, 396, 444, 13, 29991]


def test_llama2_ids_are_the_papers(llama2_tokenizer):
    cfg = R.default_config()
    found, missing = R.token_ids(llama2_tokenizer, dict(cfg.strings), 32000)
    assert missing == []
    assert [found[name] for name in R.TOKENS] == PAPER_IDS
    assert llama2_tokenizer.eos_token_id == 2
    tables = R.build(cfg, llama2_tokenizer, 32000, eos_id=2)
    offsets = np.asarray(tables.offsets)
    assert offsets[5618] == -5.0 and offsets[881] == -6.0 and offsets[13] == 1.0
    assert np.count_nonzero(offsets) == 15 and np.flatnonzero(np.asarray(tables.eos)).tolist() == [2]


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_byte_level_bpe_finds_the_right_tokens(smol_tok):
    """SmolLM2's vocabulary spells spaces as `Ġ` and newlines as `Ċ`: each mapped id decodes back to the
    string it stands for, and the ids are the tokenizer's own pieces."""
    tok = smol_tok
    cfg = R.default_config()
    found, missing = R.token_ids(tok, dict(cfg.strings), 49152)
    assert missing == []
    for name, i in found.items():
        assert tok.decode([i]) == cfg.strings[name].replace("▁", " "), name
    assert tok.convert_ids_to_tokens([found["space_I"], found["newline"], found["three_spaces"]]) == ["ĠI", "Ċ", "ĠĠĠ"]
    # and the encoder really produces these pieces in running text
    assert found["space_should"] in tok("You should go")["input_ids"]
    assert found["newline"] in tok("a\nb")["input_ids"]


def test_string_that_is_not_one_token_is_reported_and_left_out(smol_tok, caplog):
    tok = smol_tok
    cfg = R.default_config()
    cfg.strings["long"] = "▁antidisestablishmentarianism"
    cfg.weights["long"] = -2.0
    found, missing = R.token_ids(tok, dict(cfg.strings), 49152)
    assert missing == ["long"] and len(found) == 15
    tables = R.build(cfg, tok, 49152, tok.eos_token_id)
    assert "long='▁antidisestablishmentarianism' is not a single token" in caplog.text
    assert np.count_nonzero(np.asarray(tables.offsets)) == 15
    # an id beyond the model's vocabulary is also left out, never wrapped
    found, missing = R.token_ids(tok, {"bang": "!"}, vocab_size=10)
    assert found == {} and missing == ["bang"]


@pytest.mark.parametrize("key, value, message", [
    ("weights.What", "minus five", r"rules\.weights\.What: 'minus five' is not a finite number"),
    ("weights.bang", math.nan, r"rules\.weights\.bang: nan is not a finite number"),
    ("diversity_penalty", None, r"rules\.diversity_penalty: None is not a finite number"),
    ("eos", "yes", r"rules\.eos: 'yes' is not a bool"),
    ("eos_horizon", 0, r"rules\.eos_horizon: 0 must be positive"),
])
def test_bad_rule_config_is_an_error(llama2_tokenizer, key, value, message):
    cfg = R.default_config().to_dict()
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=message):
        R.build(ConfigDict(cfg), llama2_tokenizer, 32000, eos_id=2)


def test_scores_follow_the_formulas():
    """EOS: 15 n / 250 while 0 < n < 250, else 0 (monotone: 15 from 250 on); diversity -1.5 per seen id."""
    cfg = R.default_config()
    vocab = 8
    tables = R.RuleTables(offsets=jnp.zeros(vocab).at[3].set(-4.0), eos=jnp.zeros(vocab).at[2].set(1.0),
                          eos_scale=jnp.float32(15.0), eos_horizon=jnp.float32(250.0),
                          eos_monotone=jnp.bool_(False), diversity=jnp.float32(cfg.diversity_penalty))
    seen = jnp.zeros((1, vocab), bool).at[0, 5].set(True)
    for n, eos in [(0, 0.0), (1, 15 / 250), (100, 6.0), (249, 15 * 249 / 250), (250, 0.0), (400, 0.0)]:
        got = np.asarray(R.scores(tables, n, seen))[0]
        np.testing.assert_allclose(got, [0, 0, eos, -4.0, 0, -1.5, 0, 0], rtol=1e-6, err_msg=f"n={n}")
    mono = R.RuleTables(**{**vars(tables), "eos_monotone": jnp.bool_(True)})
    assert [float(R.scores(mono, n, seen)[0, 2]) for n in (249, 250, 1000)] == pytest.approx([14.94, 15.0, 15.0])
