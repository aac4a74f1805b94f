"""Refusal evaluation as Response Tuning runs it: greedy replies to AdvBench, HarmBench (standard + contextual),
MaliciousInstruct and XSTest, each called a refusal or a compliance, and that paper's metrics.

Replies come from the project's compiled decoder (`serving.generate_texts`, optionally with the rules).
Every reply is classified by GCG's refusal-prefix list (offline, always) and, unless `judge.kind=none`, by
an LLM judge given Response Tuning's judge prompt: an OpenAI-compatible endpoint when its key is set, else a
local model decoding through this project's decoder. Replies and judgements are kept beside the results
folder as they come, so a run that stops (a judge endpoint failing mid-run, say) resumes where it stopped;
the results folder itself appears only once complete.

    python -m jax_implicit.evaluate.safety --config=configs/eval/safety.py --config.model.path=... \
        --config.run.base=gemma-3-270m --config.run.method=response_10ep
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

from jax_implicit import datasets, files, pretrained
from jax_implicit.evaluate import benchmarks, layout, refusal

FOLDER = layout.SAFETY
JUDGE_KINDS = ("auto", "endpoint", "local", "none")
# headline column -> (benchmark, metric key), in the order of Response Tuning's tables
HEADLINE = {"AdvBench": ("advbench", "defense_success_rate"),
            "HarmBench std": ("harmbench", "standard_defense_success_rate"),
            "HarmBench ctx": ("harmbench", "contextual_defense_success_rate"),
            "HarmBench avg": ("harmbench", "avg_defense_success_rate"),
            "MaliciousInstruct": ("malicious_instruct", "defense_success_rate"),
            "XSTest unsafe refused": ("xstest", "unsafe_query_defense_success_rate"),
            "XSTest safe complied": ("xstest", "safe_query_compliance_success_rate"),
            "XSTest F1": ("xstest", "f1"),
            "XSTest acc": ("xstest", "behavior_acc")}


class JudgeError(RuntimeError):
    """The judge failed; what it judged before failing is kept for the next run."""


def key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def judge_kind(cfg) -> str:
    """The judge to use; an endpoint request without its key fails here, before anything loads."""
    kind, env = cfg.judge.kind, cfg.judge.endpoint.api_key_env
    if kind not in JUDGE_KINDS:
        raise ValueError(f"judge.kind={kind!r}; expected one of {JUDGE_KINDS}")
    if kind == "auto":
        return "endpoint" if os.environ.get(env) else "local"
    if kind == "endpoint" and not os.environ.get(env):
        raise ValueError(f"judge.kind='endpoint' needs an API key in ${env} (any value for a keyless vLLM server)")
    return kind


class EndpointJudge:
    """An OpenAI-compatible chat endpoint, sent each filled judge prompt as the only user message."""

    def __init__(self, c):
        from openai import OpenAI

        self.c, self.name = c, f"endpoint-{c.model.replace('/', '_')}"
        self.settings = json.dumps(dict(base_url=c.base_url, model=c.model, max_tokens=c.max_tokens,
                                        temperature=c.temperature, top_p=c.top_p, seed=c.seed), sort_keys=True)
        self.label = f"{c.model} at {c.base_url or 'the OpenAI API'}"
        self.client = OpenAI(api_key=os.environ[c.api_key_env], base_url=c.base_url or None,
                             max_retries=c.max_retries, timeout=c.timeout)

    def outputs(self, prompts: Sequence[str]) -> Iterator[str]:
        import openai

        for prompt in prompts:
            try:
                reply = self.client.chat.completions.create(
                    model=self.c.model, messages=[{"role": "user", "content": prompt}], n=1,
                    max_tokens=self.c.max_tokens, temperature=self.c.temperature, top_p=self.c.top_p, seed=self.c.seed)
            except openai.OpenAIError as e:
                raise JudgeError(f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
            yield reply.choices[0].message.content or ""


class LocalJudge:
    """A local model in its own chat format, decoding greedily through the project's decoder."""

    def __init__(self, c):
        self.c, self.name = c, f"local-{Path(c.model.path).name}"
        self.settings = json.dumps(dict(model=c.model.to_dict(), max_new_tokens=c.max_new_tokens), sort_keys=True)
        self.label = f"local judge ({Path(c.model.path).name}), not comparable with Response Tuning's Llama-3.1-70B judge"

    def outputs(self, prompts: Sequence[str]) -> Iterator[str]:
        """Loads the judge model only when something is left to judge."""
        from jax_implicit import serving
        from jax_implicit.evaluate import judge

        decoder, tokenizer = pretrained.load_with_tokenizer(self.c.model)
        encoded = [serving.Prompt(judge.encode(tokenizer, p), 0) for p in prompts]
        serving.check_fit(encoded, self.c.max_new_tokens, decoder.cfg.max_position_embeddings, "judge prompt")
        for start in range(0, len(encoded), self.c.batch_size):
            yield from serving.generate_prompts(decoder, tokenizer, encoded[start:start + self.c.batch_size],
                                               max_new_tokens=self.c.max_new_tokens, batch_size=self.c.batch_size)


def judge_all(judge, prompts: Sequence[str], cache_path: Path, save_every: int = 16) -> list[str]:
    """The judge's output for every prompt, reusing and extending the cache at `cache_path` (keyed by the
    judge's settings and the prompt, so a changed judge judges again)."""
    keys = [key(judge.settings + "\0" + p) for p in prompts]
    cache = files.read_rows(cache_path, ("key", "output"), "judge cache") if cache_path.is_file() else []
    done = {r["key"]: r["output"] for r in cache}
    todo = {k: p for k, p in zip(keys, prompts) if k not in done}

    def save() -> None:
        if done:
            files.write_atomic(cache_path, "".join(json.dumps(dict(key=k, output=o)) + "\n" for k, o in done.items()))

    try:
        for n, (k, out) in enumerate(zip(todo, judge.outputs(list(todo.values()))), 1):
            done[k] = out
            if n % save_every == 0:
                save()
    except JudgeError as e:
        save()
        raise JudgeError(f"judge {judge.label} failed after {sum(k in done for k in set(keys))} of {len(set(keys))} "
                         f"judgements ({e}); they are kept in {cache_path} and a re-run resumes from there") from None
    save()
    return [done[k] for k in keys]


def generation_settings(cfg) -> dict:
    return dict(model=str(cfg.model.path), dtype=cfg.model.dtype, use_rules=cfg.use_rules,
                rules=cfg.rules.to_dict() if cfg.use_rules else None, decode=cfg.decode.to_dict())


def generate(cfg, items: list[dict], cache_path: Path) -> list[str]:
    """Greedy replies, from the cache when the same settings made them before (it is rewritten after every
    batch, so a rerun of a killed evaluation decodes only what is left); prompt lengths are checked against
    the model's context before its weights load."""

    from jax_implicit import model, rules, serving

    settings = generation_settings(cfg)
    cached = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    done = cached.get("responses", {}) if cached.get("settings") == settings else {}
    todo = list(dict.fromkeys(x["prompt"] for x in items if key(x["prompt"]) not in done))
    if todo:
        path, tokenizer = pretrained.locate(cfg.model)
        mcfg = model.from_hf_config(path)
        d = cfg.decode
        encoded = {p: serving.encode(tokenizer, p, d.tag_set) for p in todo}
        for x in items:
            n = len(encoded[x["prompt"]].ids) if x["prompt"] in encoded else 0
            if n + d.max_new_tokens > mcfg.max_position_embeddings:
                raise ValueError(f"{x['benchmark']} item {x['id']} is {n} tokens; with decode.max_new_tokens="
                                 f"{d.max_new_tokens} it exceeds the context of {mcfg.max_position_embeddings} positions")
        decoder = pretrained.load(cfg.model, path=path)
        tables = rules.build(cfg.rules, tokenizer, mcfg.vocab_size, tokenizer.eos_token_id) if cfg.use_rules else None

        def keep(batch: dict[int, str], _tokens: int) -> None:  # each finished batch, so a killed run loses one
            done.update({key(todo[i]): o for i, o in batch.items()})
            files.write_json(cache_path, dict(settings=settings, responses=done))

        serving.generate_prompts(decoder, tokenizer, list(encoded.values()), max_new_tokens=d.max_new_tokens,
                                rules=tables, batch_size=d.batch_size, bucket=d.bucket, on_batch=keep)
    return [done[key(x["prompt"])] for x in items]


def load_items(cfg) -> list[dict]:
    benchmarks.check_names(cfg.benchmarks)
    unknown = sorted(set(cfg.files) - set(benchmarks.BENCHMARKS))
    if unknown:
        raise ValueError(f"files.{unknown[0]}: unknown benchmark; expected some of {benchmarks.BENCHMARKS}")
    if cfg.limit < 0:
        raise ValueError(f"limit={cfg.limit}; use 0 for every item")
    return [x for name in cfg.benchmarks for x in benchmarks.load(name, cfg.files.get(name, ""), cfg.limit)]


def score(items: list[dict], labels: Sequence[str | None], names: Sequence[str]) -> dict:
    return {b: refusal.metrics(b, [x for x in items if x["benchmark"] == b],
                               [lab for x, lab in zip(items, labels) if x["benchmark"] == b]) for b in names}


def headline(metrics: dict) -> dict[str, float]:
    """The headline numbers of one classifier's metrics, for the benchmarks that were run."""
    return {col: metrics[b][m] for col, (b, m) in HEADLINE.items() if b in metrics}


def run(cfg) -> dict:
    kind = judge_kind(cfg)
    items = load_items(cfg)
    strings = refusal.prefixes(cfg.prefixes, cfg.prefix_file or datasets.path("refusal_prefixes"))
    if cfg.use_rules:
        from jax_implicit import rules

        rules.validate(cfg.rules)
    name = cfg.name or Path(cfg.model.path).name + ("-rules" if cfg.use_rules else "")
    out = layout.out_path(cfg, FOLDER).absolute()
    stem = Path(cfg.cache).absolute() / FOLDER if cfg.cache else out  # the caches are named after it
    responses = generate(cfg, items, stem.with_name(f"{stem.name}.generations.json"))
    labels = {"prefix": [refusal.prefix_label(r, strings) for r in responses]}
    judged, judge_label = None, None
    if kind != "none":
        judge = EndpointJudge(cfg.judge.endpoint) if kind == "endpoint" else LocalJudge(cfg.judge)
        prompts = [refusal.judge_prompt(x["prompt"], r) for x, r in zip(items, responses)]
        judged = judge_all(judge, prompts, stem.with_name(f"{stem.name}.{judge.name}.judgements.jsonl"))
        labels["judge"] = [refusal.parse_judgement(j) for j in judged]
        judge_label = judge.label
    result = dict(model=name, model_path=str(cfg.model.path), use_rules=cfg.use_rules, benchmarks=list(cfg.benchmarks),
                  limit=cfg.limit, n=len(items), prefixes=cfg.prefixes, judge=judge_label,
                  metrics={c: score(items, ls, cfg.benchmarks) for c, ls in labels.items()})
    result["headline"] = {c: headline(m) for c, m in result["metrics"].items()}
    rows = [dict(x, response=r, **{f"{c}_label": ls[i] for c, ls in labels.items()},
                 **({"judge_output": judged[i]} if judged else {})) for i, (x, r) in enumerate(zip(items, responses))]
    with files.atomic_dir(out) as tmp:
        files.write_json(tmp / layout.RESULT, result)
        files.write_json(tmp / "responses.json", rows)
        files.write_atomic(tmp / "table.md", table({name: result}) + "\n")
        chart(result, tmp / "refusal_rates.png")
    print(table({name: result}))
    print(f"files: {out}/{layout.RESULT}, responses.json, table.md, refusal_rates.png")
    return result


def table(results: dict[str, dict]) -> str:
    """A markdown table of headline rates (percent): one row per model and classifier."""
    cols = list(dict.fromkeys(c for r in results.values() for h in r["headline"].values() for c in h))
    lines = ["| model | classifier | N | " + " | ".join(cols) + " |", "|---|---|---:|" + "---:|" * len(cols)]
    for name, r in results.items():
        for classifier, h in r["headline"].items():
            cells = [f"{100 * h[c]:.1f}" if c in h else "" for c in cols]
            lines.append(f"| {name} | {classifier} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(result: dict, path: Path) -> Path:
    """One model's headline rates as grouped bars, one colour per classifier."""
    import numpy as np

    classifiers = list(result["headline"])
    cols = list(result["headline"][classifiers[0]])
    fig, ax = files.figure((max(6.0, 0.9 * len(cols) + 2), 4))
    width = 0.8 / len(classifiers)
    x = np.arange(len(cols))
    for k, c in enumerate(classifiers):
        ax.bar(x + k * width, [100 * result["headline"][c][col] for col in cols], width, label=c)
    ax.set_xticks(x + width * (len(classifiers) - 1) / 2, cols, rotation=30, ha="right")
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of items")
    ax.set_title(f"{result['model']}: refusal rates (N={result['n']})")
    ax.legend()
    return files.save_figure(fig, path)


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(run, "configs/eval/safety.py", errors=(JudgeError,))
