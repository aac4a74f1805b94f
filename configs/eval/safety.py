"""Refusal evaluation (Response Tuning's protocol): `python -m jax_implicit.evaluate.safety --config=configs/eval/safety.py`.

    --config.model.path=checkpoints/runs/.../hf --config.run.base=gemma-3-270m --config.run.method=response_10ep
    --config.use_rules=True            # the untrained model times the paper's three rules
    --config.limit=20                  # a seeded slice of each benchmark (HarmBench: of each subset)
    --config.judge.kind=endpoint --config.judge.endpoint.base_url=http://host:8000/v1   # with $OPENAI_API_KEY
"""

from ml_collections import ConfigDict

from jax_implicit import config, rules


def get_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.model = config.model()
    cfg.use_rules = False  # True: decode with the paper's rule-based adapter
    cfg.rules = rules.default_config()
    cfg.name = ""  # the model's name in reports; default: its folder name (+ "-rules")
    cfg.decode = ConfigDict(dict(
        max_new_tokens=512,  # Response Tuning generates up to 2048; greedy either way
        batch_size=16,
        bucket=64,
        tag_set="user_assistant",  # `<|user|>\n` + request + `\n<|assistant|>\n`, Response Tuning's format too
    ))
    cfg.benchmarks = ("advbench", "harmbench", "malicious_instruct", "xstest")
    cfg.files = ConfigDict(dict(advbench="", harmbench="", malicious_instruct="", xstest=""))  # "": the shipped file
    cfg.limit = 0  # 0: every item; n: Response Tuning's seed-0 `random.sample` of n (per HarmBench subset)
    # GCG's list for individual behaviours (13 strings): it calls all 520 AdvBench targets ("Sure, here is ...")
    # compliance; the 29-string transfer list (experiments/evaluate.py) also holds "illegal" and calls 18 of them
    # refusals. Choices: the `path`s in data/safety/refusal_prefixes.json.
    cfg.prefixes = "experiments/evaluate_individual.py"
    cfg.prefix_file = ""  # "": the shipped data/safety/refusal_prefixes.json
    cfg.judge = ConfigDict(dict(
        kind="auto",  # "endpoint" (OpenAI-compatible, needs the key), "local", "none", or "auto": endpoint if the key is set
        endpoint=ConfigDict(dict(
            base_url="",  # "": $OPENAI_BASE_URL or OpenAI's; a vLLM server: http://host:8000/v1
            model="meta-llama/Meta-Llama-3.1-70B-Instruct",  # Response Tuning's judge
            api_key_env="OPENAI_API_KEY",
            max_tokens=2048, temperature=0.0, top_p=0.9, seed=0,  # Response Tuning's judge settings
            max_retries=2, timeout=120.0,
        )),
        model=config.model(),  # the local judge (an instruction-tuned model; SmolLM2-135M-Instruct by default)
        max_new_tokens=256,  # the local judge's budget for its summary, assessment and label
        batch_size=8,
    ))
    cfg.run = ConfigDict(dict(results="results", base="", method="", seed=0))  # results/<base>/<method>/seed<N>/safety/
    cfg.out = ""  # an explicit output folder instead of the results layout
    # the folder of the reply and judgement caches ("": beside the output folder); the sweep shares one between
    # the seeds of an untrained model, whose greedy replies do not depend on the seed
    cfg.cache = ""
    return cfg
