"""Response-ranking capability (Table 2): `python -m jax_implicit.evaluate.ranking --config=configs/eval/ranking.py`."""

from ml_collections import ConfigDict

from jax_implicit import config


def get_config() -> ConfigDict:
    cfg = ConfigDict()
    cfg.model = config.model()
    cfg.sharded = False  # True: place the model on the device mesh below (e.g. Llama-2-7B on a TPU slice)
    cfg.mesh = config.mesh()
    cfg.data = "tatsu-lab/alpaca"  # the paper's (online); offline: "dolly" (data/) or a JSON/JSONL file of {instruction, input, output}
    cfg.n = 1000  # the first n examples (the paper: 1000)
    cfg.k = 5  # random other responses per example, drawn with replacement
    cfg.tag_set = "user_assistant"
    cfg.max_seq_length = 2048  # prompt + response + EOS are cut on the right here (and at the model context)
    cfg.batch_tokens = 4096  # rows x padded length per forward pass (bounds the logits' memory)
    cfg.run = ConfigDict(dict(
        results="results",  # ranking.json lands in <results>/<base>/<method>/seed<seed>/
        base="",  # the base model's folder name
        method="",  # the tuning method's folder name
        seed=0,  # seed of the draw of random responses, and of the folder seed<seed>
    ))
    cfg.out = ""  # an explicit ranking.json path instead of the results layout
    return cfg
