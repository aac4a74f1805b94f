"""Every command's command line: --help lists its settings with their defaults, and a misspelled setting, a
value of the wrong type or a stray argument is one line on stderr with exit status 2, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from jax_implicit import cli

ROOT = Path(__file__).resolve().parents[1]

# command -> (arguments that pick a config, a setting --help must list with its default, a misspelling of a key
# and the close match the error must name)
COMMANDS = {
    "train": ("--config=configs/train/smollm2_cpu.py", "--config.optim.lr=3e-05", "optim.lrr", "optim.lr"),
    "generate": ("", "--config.decode.max_new_tokens=512", "decode.max_new_token", "decode.max_new_tokens"),
    "demo": ("", "--config.tune.examples=64", "tune.exampels", "tune.examples"),
    "sweep": ("", "--config.seeds=(1, 2, 3, 4, 5)", "seed", "seeds"),
    "plan": ("--config=configs/plan.py:olmo_7b", "--config.model.path='allenai/OLMo-7B-hf'", "hardwar", "hardware"),
    "evaluate.alpaca": ("", "--config.judge.kind='auto'", "judge.knd", "judge.kind"),
    "evaluate.ranking": ("", "--config.k=5", "kk", "k"),
    "evaluate.similarity": ("", "--config.lima='lima'", "lmia", "lima"),
    "evaluate.tables": ("", "--config.eval_set='alpaca_eval'", "eval_st", "eval_set"),
    "evaluate.safety": ("", "--config.decode.max_new_tokens=512", "decode.max_new_token", "decode.max_new_tokens"),
    "safety_demo": ("", "--config.limit=6", "limt", "limit"),
    "export": ("", "--config.step=0", "stpe", "step"),
    "benchmarks.decode": ("", "--config.new_tokens=128", "new_token", "new_tokens"),
    "benchmarks.generate": ("", "--config.hf_batch_sizes=(8, 16)", "hf_batch_size", "hf_batch_sizes"),
    "benchmarks.forward": ("", "--config.seq=256", "repeat", "repeats"),
    "benchmarks.scoring": ("", "--config.batch_tokens=4096", "batch_token", "batch_tokens"),
    "benchmarks.train": ("", "--config.variants=('full',)", "step", "steps"),
    "benchmarks.hlo_copies": ("", "--config.slots=640", "slot", "slots"),
}


def module(name: str) -> str:
    """A command's module: the benchmarks are `benchmarks.X`, the rest `jax_implicit.X`."""
    return name if name.startswith("benchmarks.") else f"jax_implicit.{name}"


def command(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module(name), *[a for a in args if a]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_and_a_misspelled_setting(name):
    config, listed, typo, close = COMMANDS[name]
    shown = command(name, config, "--help")
    assert shown.returncode == 0, shown.stderr
    assert f"usage: python -m {module(name)}" in shown.stdout and listed in shown.stdout
    wrong = command(name, config, f"--config.{typo}=1")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.count("\n") == 1 and "Traceback" not in wrong.stderr
    assert f"{module(name)}: error: unknown setting '{typo}'" in wrong.stderr and close in wrong.stderr


def test_wrong_type_stray_argument_and_bad_config_argument():
    for args, message in [
        (("--config.decode.batch_size=sixteen",), "--config.decode.batch_size='sixteen': expected int (default 16)"),
        (("--config.use_rules=maybe",), "--config.use_rules='maybe': expected bool"),
        (("val",), "unexpected argument 'val'; settings go in --config.KEY=VALUE"),
        (("--config=configs/generate.py:no_eso",), "unknown variant 'no_eso'"),
        (("--config=configs/nope.py",), "config file configs/nope.py does not exist"),
        (("--config.decode=1",), "--config.decode is a section"),
    ]:
        out = command("generate", *args)
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and message in out.stderr, (args, out.stderr)


def test_a_command_without_a_default_config_lists_the_config_files():
    out = command("train", "--help")
    assert out.returncode == 0 and "configs/train/paper.py" in out.stdout
    out = command("train")
    assert out.returncode == 2 and "give a config" in out.stderr


def test_values_parse_as_their_defaults_types():
    cfg = ConfigDict(dict(a=1, b=0.5, c=True, d="x", e=(1, 2), f=("p",), g=None, s=dict(t=3)))
    cli.apply_overrides(cfg, [("a", "7"), ("b", "1e-5"), ("c", "false"), ("d", "12"), ("e", "3,4"), ("f", "q, r"),
                              ("g", "0.25"), ("s.t", "9")])
    assert cfg.to_dict() == dict(a=7, b=1e-5, c=False, d="12", e=(3, 4), f=("q", "r"), g=0.25, s=dict(t=9))
    with pytest.raises(cli.UsageError, match=r"^unknown setting 's.u'; close matches: s.t$"):
        cli.apply_overrides(cfg, [("s.u", "1")])


def test_help_descriptions_come_from_the_comments_beside_the_values():
    about = cli.descriptions(ROOT / "configs" / "demo.py")
    assert about("ranking.k") == "random other responses per row"
    assert about("model.dtype").startswith("compute dtype")  # from config.model(), a function of another module
    assert about("tune.epochs") == ""  # no comment beside it


def test_each_decoding_variant_has_its_own_label_and_file():
    from jax_implicit import files, generate

    named = {}
    for variant in ("", "no_eos", "no_uniform", "no_diversity", "no_rules"):
        cfg = files.load_config_file(ROOT / "configs" / "generate.py", variant)
        cfg.data.instructions = "alpaca_eval"
        named[variant] = generate.names(cfg)
    assert named[""] == ("smollm2-135m-instruct-rules", Path("outputs/generate/smollm2-135m-instruct-rules-alpaca_eval.json"))
    assert named["no_eos"][0] == "smollm2-135m-instruct-rules-no_eos" and named["no_rules"][0].endswith("-greedy")
    assert len({g for g, _ in named.values()}) == len({p for _, p in named.values()}) == 5


CACHED_RUN = """
import jax
from jax_implicit import cli

hits = []
jax.monitoring.register_event_listener(lambda event, **_: hits.append(event))

def run(cfg):
    jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()
    return {"dir": jax.config.jax_compilation_cache_dir, "hits": hits.count("/jax/compilation_cache/cache_hits")}

cli.main(run, "configs/bench/generate.py", argv=[])
"""


def test_every_command_keeps_its_compiled_programs_between_runs(tmp_path):
    import json

    def cached_run(**env) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"} | env | {
            "JAX_PLATFORMS": "cpu", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
        out = subprocess.run([sys.executable, "-c", CACHED_RUN], cwd=ROOT, capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    mine = str(tmp_path / "xla")
    assert cached_run(JAX_COMPILATION_CACHE_DIR=mine) == {"dir": mine, "hits": 0}
    assert cached_run(JAX_COMPILATION_CACHE_DIR=mine) == {"dir": mine, "hits": 1}  # the second run compiles nothing
    assert cached_run()["dir"] == str(ROOT / ".jax_cache")
