"""A local pairwise judge that plugs into alpaca_eval's annotator machinery, for runs without network.

It uses the same judging prompt as the paper's GPT-4 judge (`weighted_alpaca_eval_gpt4_turbo`:
"answer m or M") by default, and the same weighted preference: 2 - P(output_1 is better), read
from the judge model's next-token log-probabilities of the two answer tokens. Each pair is scored
in both orders (output_1 shown first, then second) and the two probabilities are averaged, which
cancels the position bias small models have. alpaca_eval does everything else: pairing outputs by
instruction, the prompt template, its output-order randomisation, parsing, caching and metrics.

Its numbers are a small model's opinion: "local judge (<model>), not comparable with GPT-4 numbers".
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import yaml
from alpaca_eval import constants, utils
from alpaca_eval.annotators.pairwise_evaluator import PairwiseAnnotator, SinglePairwiseAnnotator

from jax_implicit import partial
from jax_implicit.evaluate import scoring
from jax_implicit.prompts import generation_prompt

GPT4_TEMPLATE = Path(constants.EVALUATORS_CONFIG_DIR) / "alpaca_eval_clf_gpt4_turbo" / "alpaca_eval_clf.txt"


def label(model_name: str) -> str:
    return f"local judge ({model_name}), not comparable with GPT-4 numbers"


def swap_outputs(template: str) -> str:
    """The template with the {output_1} and {output_2} slots exchanged."""
    return template.replace("{output_1}", "\0").replace("{output_2}", "{output_1}").replace("\0", "{output_2}")


def chat_text(tokenizer, prompt: str) -> tuple[str, bool]:
    """A judging prompt in the judge model's chat format (ChatML templates are split into messages), and
    whether the tokenizer should add its special tokens to it (only when there is no chat template)."""
    chat = prompt.strip().startswith("<|im_start|>")
    messages = utils.prompt_to_chatml(prompt) if chat else [{"role": "user", "content": prompt}]
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
    return generation_prompt("\n\n".join(m["content"] for m in messages)), True


def encode(tokenizer, prompt: str) -> list[int]:
    text, special = chat_text(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


class LocalJudge:
    """alpaca_eval `fn_completions`: takes (output_1 first, output_2 first) prompt pairs, returns JSON completions."""

    def __init__(self, decoder, tokenizer, *, name: str, answers: Sequence[str] = ("m", "M"), batch_tokens: int = 4096,
                 keep: partial.Partial | None = None):
        if len(answers) != 2 or answers[0] == answers[1]:
            raise ValueError(f"judge.answers must be two different strings (output_1 better, output_2 better), "
                             f"got {tuple(answers)}")
        self.decoder, self.tokenizer, self.name, self.batch_tokens = decoder, tokenizer, name, batch_tokens
        self.keep = keep  # finished batches of judgements, kept across a killed run
        self.answer_ids = [self._answer_id(a) for a in answers]

    def encode(self, prompt: str) -> list[int]:
        return encode(self.tokenizer, prompt)

    def _answer_id(self, answer: str) -> int:
        text, special = chat_text(self.tokenizer, "<|im_start|>user\nWhich one?<|im_end|>")
        probe = self.encode("<|im_start|>user\nWhich one?<|im_end|>")
        ids = list(self.tokenizer(text + answer, add_special_tokens=special)["input_ids"])
        if ids[:len(probe)] != probe or len(ids) != len(probe) + 1:
            raise ValueError(f"judge answer {answer!r} is not a single token after the judging prompt with this "
                             f"tokenizer; choose judge.answers that are")
        return ids[-1]

    def probabilities(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """(n, 2): P(output_1 is better) with output_1 shown first, and with it shown second."""
        seqs = [self.encode(p) for pair in pairs for p in pair]
        logp = scoring.next_token_logprobs(self.decoder, seqs, self.answer_ids, batch_tokens=self.batch_tokens,
                                           keep=self.keep)
        p_first = np.exp(logp[:, 0] - np.logaddexp(logp[:, 0], logp[:, 1])).reshape(-1, 2)
        return np.stack([p_first[:, 0], 1 - p_first[:, 1]], axis=1)

    def __call__(self, prompts: Sequence[tuple[str, str]], **_) -> dict[str, list]:
        start = time.time()
        p = self.probabilities(prompts)
        completions = [json.dumps([{"preference": float(2 - row.mean()), "p_output_1_shown_first": float(row[0]),
                                    "p_output_1_shown_second": float(row[1])}]) for row in p]
        per = (time.time() - start) / max(1, len(prompts))
        return dict(completions=completions, price_per_example=[0.0] * len(prompts),
                    time_per_example=[per] * len(prompts))


class _BothOrdersAnnotator(SinglePairwiseAnnotator):
    """Makes each prompt a pair: the template as is, and with the two outputs exchanged."""

    def _make_prompts(self, df_to_annotate, prompt_template=None):
        template = prompt_template or self.prompt_template
        first, df = utils.make_prompts(df_to_annotate, template=template, batch_size=self.batch_size)
        second, _ = utils.make_prompts(df_to_annotate, template=swap_outputs(template), batch_size=self.batch_size)
        return list(zip(first, second)), df


class LocalPairwiseAnnotator(PairwiseAnnotator):
    """alpaca_eval's pairwise annotator with both-order prompts; pass `fn_completions=LocalJudge(...)`."""

    @property
    def SingleAnnotator(self):
        return _BothOrdersAnnotator


def template_path(template: str | Path = "") -> Path:
    """The judging prompt file: the GPT-4 judge's own by default."""
    path = Path(template) if template else GPT4_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"judge prompt template {path} does not exist")
    text = path.read_text()
    for slot in ("{instruction}", "{output_1}", "{output_2}"):
        if text.count(slot) != 1:
            raise ValueError(f"judge prompt template {path} must contain {slot} exactly once")
    return path.resolve()


def write_config(folder: Path, judge: LocalJudge, template: Path) -> Path:
    """An alpaca_eval annotators config folder for `judge`, with a copy of its prompt (kept with the results).

    Output order is not randomised: both orders are scored anyway, and this keeps the raw completions
    in the annotations' own output_1/output_2 frame. `fn_completions` is passed at run time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompt.txt").write_text(template.read_text())
    config = {f"local_judge_{judge.name}": dict(
        prompt_template=f"{folder.name}/prompt.txt",  # alpaca_eval resolves it from the folder's parent
        fn_completion_parser="json_parser", completion_parser_kwargs={"annotation_key": "preference"},
        batch_size=1, is_randomize_output_order=False, pretty_name=label(judge.name))}
    (folder / "configs.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return folder
