"""AlpacaEval head-to-head: `python -m jax_implicit.evaluate.alpaca --config=configs/eval/alpaca.py`."""

from ml_collections import ConfigDict

from jax_implicit import config


def get_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.outputs = ""  # the model's outputs, AlpacaEval JSON ({instruction, output, generator, dataset})
    cfg.references = ""  # the reference outputs; the paper: the instruction-tuned model of the same base
    cfg.eval_set = "alpaca_eval"  # "alpaca_eval" (805 instructions) or "val" (the paper's 56): a results folder name
    cfg.name = ""  # leaderboard name of the model; default: the outputs' `generator` field
    cfg.max_instances = 0  # 0: every instruction; n: alpaca_eval's seeded subset of n
    cfg.judge = ConfigDict(dict(
        kind="auto",  # "gpt4" (weighted_alpaca_eval_gpt4_turbo, needs OPENAI_API_KEY), "local", or "auto"
        model=config.model(),  # the local judge's HF folder
        sharded=False,  # True: place the judge model on `mesh` (large judges on TPU/GPU hosts)
        mesh=config.mesh(),
        prompt_template="",  # "": the GPT-4 judge's own prompt (answers "m" / "M")
        answers=("m", "M"),  # the tokens meaning "output_1 is better" / "output_2 is better" in that prompt
        batch_tokens=4096,  # rows x padded length per forward pass of the local judge
    ))
    cfg.run = ConfigDict(dict(results="results", base="", method="", seed=0))  # results/<base>/<method>/seed<N>/
    cfg.out = ""  # an explicit output folder instead of the results layout
    return cfg
