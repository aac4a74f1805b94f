"""Head-to-head AlpacaEval: a model's outputs against reference outputs (the paper: the instruction-tuned
model of the same base), judged by the `alpaca_eval` package.

Judges: `gpt4` is the paper's `weighted_alpaca_eval_gpt4_turbo` (needs OPENAI_API_KEY); `local` is
`judge.LocalJudge` on this project's own model, offline; `auto` takes gpt4 when a key is set, else local.
The length-controlled win rate is reported when alpaca_eval can compute it (GPT-4 judge, all 805
instructions, `df_gamed.csv` reachable on the hub or in its cache); otherwise the raw win rate is
reported with the reason. Results land in a temporary folder renamed into place once complete.

    python -m jax_implicit.evaluate.alpaca --config=configs/eval/alpaca.py \
        --config.outputs=out/model.json --config.references=out/instruction_tuned.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from jax_implicit import files, partial, pinning, pretrained, runlock
from jax_implicit.evaluate import layout

GPT4 = "weighted_alpaca_eval_gpt4_turbo"
ALPACA_EVAL_SIZE = 805
JUDGES = ("auto", "gpt4", "local")
# Other `dataset` values that rows of an evaluation set carry: the hub's AlpacaEval subsets, the authors' val file.
EVAL_SET_ALIASES = {"alpaca_eval": ("helpful_base", "koala", "oasst", "selfinstruct", "vicuna"), "val": ("val_eval",)}


def has_openai_key() -> bool:
    return bool(os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEYS"))


def judge_kind(kind: str) -> str:
    """The judge to use; a gpt4 request without a key fails here, before anything is loaded."""
    if kind not in JUDGES:
        raise ValueError(f"judge.kind={kind!r}; expected one of {JUDGES}")
    if kind == "auto":
        return "gpt4" if has_openai_key() else "local"
    if kind == "gpt4" and not has_openai_key():
        raise RuntimeError(f"judge.kind='gpt4' ({GPT4}) needs an OpenAI API key: set OPENAI_API_KEY. Without network "
                           "use --config.judge.kind=local (a local judge, not comparable with GPT-4 numbers).")
    return kind


def lc_missing_reason(kind: str, n: int) -> str | None:
    """Why alpaca_eval's length-controlled win rate cannot be computed here, or None if it can."""
    if kind != "gpt4":
        return ("the length-controlled GLM is fitted together with GPT-4 annotations of gamed baselines "
                "(df_gamed.csv), so it is only defined for the GPT-4 judge")
    if n != ALPACA_EVAL_SIZE:
        return (f"the length-controlled GLM indexes instruction difficulty by AlpacaEval row, so it needs all "
                f"{ALPACA_EVAL_SIZE} instructions (this run has {n})")
    from alpaca_eval import constants
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(repo_id="tatsu-lab/alpaca_eval", filename="df_gamed.csv", repo_type="dataset",
                        cache_dir=constants.DEFAULT_CACHE_DIR)
    except Exception as e:  # offline, no cache, hub errors: all mean the same here
        return (f"it needs df_gamed.csv from the Hugging Face hub (tatsu-lab/alpaca_eval), which could not be "
                f"fetched ({type(e).__name__}); run once with network to cache it")
    return None


def judge_names(cfg, kind: str) -> tuple[str, str]:
    """The judge's folder name in the results layout and its label in reports."""
    if kind == "gpt4":
        return GPT4, f"GPT-4 ({GPT4})"
    from jax_implicit.evaluate import judge

    name = Path(cfg.judge.model.path).name
    return f"local-{name}", judge.label(name)


def summarize(folder: Path, name: str) -> dict:
    """The head-to-head numbers, read back from the leaderboard.csv and annotations.json alpaca_eval wrote."""
    board = pd.read_csv(folder / "leaderboard.csv", index_col=0)
    annotations = json.loads((folder / "annotations.json").read_text())
    row = board.loc[name]
    lc = row.get("length_controlled_winrate")
    return dict(model=name, reference=annotations[0].get("generator_1"), n=len(annotations),
                win_rate=float(row["win_rate"]), standard_error=float(row["standard_error"]),
                discrete_win_rate=float(row["discrete_win_rate"]), n_wins=int(row["n_wins"]),
                n_draws=int(row["n_draws"]), avg_length=int(row["avg_length"]),
                length_controlled_winrate=None if lc is None or pd.isna(lc) else float(lc),
                mean_preference=sum(a["preference"] for a in annotations) / len(annotations))


def _local_judge(cfg, keep: partial.Partial, sharder):
    from jax_implicit.evaluate import judge

    template = judge.template_path(cfg.judge.prompt_template)
    decoder, tokenizer = pretrained.load_with_tokenizer(cfg.judge.model, sharder)
    local = judge.LocalJudge(decoder, tokenizer, name=Path(cfg.judge.model.path).name,
                             answers=tuple(cfg.judge.answers), batch_tokens=cfg.judge.batch_tokens, keep=keep)
    return lambda tmp: dict(annotators_config=str(judge.write_config(tmp / "judge", local, template)),
                            Annotator=judge.LocalPairwiseAnnotator, fn_completions=local,
                            caching_path=tmp / "annotations_cache.json")


def _gpt4_judge(out: Path):
    """GPT-4 annotations are paid for: their cache sits beside the result folder and survives a failed run."""
    from alpaca_eval import constants

    return lambda tmp: dict(annotators_config=str(Path(constants.EVALUATORS_CONFIG_DIR) / GPT4),
                            caching_path=out.with_name(f"{out.name}.gpt4_annotations_cache.json"))


def _check_same_instructions(a: list[dict], b: list[dict], a_name: str, b_name: str) -> None:
    """Both files must hold the same instructions, each once: head-to-head pairs rows by instruction."""
    for rows, name in ((a, a_name), (b, b_name)):
        first: dict[str, int] = {}
        for i, row in enumerate(rows):
            if row["instruction"] in first:
                raise ValueError(f"{name}: row {i} repeats the instruction of row {first[row['instruction']]}: "
                                 f"{row['instruction'][:80]!r}")
            first[row["instruction"]] = i
    for (rows, name), (other, other_name) in (((a, a_name), (b, b_name)), ((b, b_name), (a, a_name))):
        known = {r["instruction"] for r in other}
        missing = [i for i, r in enumerate(rows) if r["instruction"] not in known]
        if missing:
            raise ValueError(f"outputs and references hold different instructions: {len(missing)} of the {len(rows)} "
                             f"in {name} are not in {other_name}, first row {missing[0]}: "
                             f"{rows[missing[0]]['instruction'][:80]!r}")


def _check_dataset(rows: list[dict], eval_set: str, name: str) -> None:
    """Outputs must answer the evaluation set their results are filed under (rows without `dataset` pass)."""
    allowed = {eval_set, *EVAL_SET_ALIASES.get(eval_set, ())}
    for i, row in enumerate(rows):
        if row.get("dataset", eval_set) not in allowed:
            raise ValueError(f"{name}, row {i}: dataset {row['dataset']!r} is not the evaluation set "
                             f"eval_set={eval_set!r}; set --config.eval_set to the set these outputs answer")


def run(cfg) -> dict:
    kind = judge_kind(cfg.judge.kind)
    if cfg.max_instances < 0:
        raise ValueError(f"max_instances={cfg.max_instances}; use 0 for all instructions")
    outputs = files.read_rows(cfg.outputs, ("instruction", "output"), "outputs file")
    references = files.read_rows(cfg.references, ("instruction", "output"), "references file")
    _check_dataset(outputs, cfg.eval_set, cfg.outputs)
    _check_same_instructions(outputs, references, cfg.outputs, cfg.references)
    by_instruction = {r["instruction"]: r for r in references}
    references = [by_instruction[r["instruction"]] for r in outputs]  # same order: max_instances takes the same rows
    name = cfg.name or outputs[0].get("generator") or Path(cfg.outputs).stem
    slug, judge_label = judge_names(cfg, kind)
    out = layout.out_path(cfg, cfg.eval_set, slug).absolute()
    lc_reason = lc_missing_reason(kind, min(len(outputs), cfg.max_instances or len(outputs)))
    with runlock.hold(runlock.beside(out), f"results {out}"):  # also: the folder is writable, before the judge loads
        keep = None
        if kind == "local":
            settings = dict(judge=cfg.judge.to_dict(), weights=partial.stamp(pretrained.model_dir(cfg.judge.model.path)))
            keep = partial.Partial(partial.path_for(out), settings)
        from jax_implicit.sharding import Sharder

        sh = Sharder.from_config(cfg.judge.mesh) if kind == "local" and cfg.judge.sharded else None
        judge_kwargs = _local_judge(cfg, keep, sh) if kind == "local" else _gpt4_judge(out)
        import alpaca_eval.main

        with files.atomic_dir(out) as tmp, pinning.active(sh):
            alpaca_eval.main.evaluate(
                model_outputs=pd.DataFrame(outputs).assign(generator=name), reference_outputs=pd.DataFrame(references),
                output_path=tmp, precomputed_leaderboard=None, is_return_instead_of_print=True,
                fn_metric="get_winrate" if lc_reason else "get_length_controlled_winrate",
                sort_by="win_rate" if lc_reason else "length_controlled_winrate",
                metric_kwargs=None if lc_reason else {"save_weights_dir": None},
                max_instances=cfg.max_instances or None, **judge_kwargs(tmp))
            result = summarize(tmp, name)
            result.update(judge=judge_label, judge_kind=kind, comparable_with_gpt4=kind == "gpt4",
                          eval_set=cfg.eval_set, lc_missing_reason=lc_reason,
                          outputs=str(cfg.outputs), references=str(cfg.references))
            files.write_json(tmp / layout.RESULT, result)
        if keep is not None:
            keep.finish()
    print(report(result, out))
    return result


def report(result: dict, out: Path) -> str:
    lc = result["length_controlled_winrate"]
    lines = [f"AlpacaEval head-to-head: {result['model']} vs {result['reference']} on {result['n']} instructions "
             f"({result['eval_set']})",
             f"  judge: {result['judge']}",
             f"  win rate: {result['win_rate']:.2f} +/- {result['standard_error']:.2f} "
             f"({result['n_wins']} wins, {result['n_draws']} draws; discrete {result['discrete_win_rate']:.2f})",
             f"  length-controlled win rate: {lc:.2f}" if lc is not None
             else f"  length-controlled win rate: not computed: {result['lc_missing_reason']}",
             f"  files: {out}/leaderboard.csv, annotations.json, {layout.RESULT}"]
    return "\n".join(lines)


if __name__ == "__main__":
    from jax_implicit import cli

    cli.main(run, "configs/eval/alpaca.py")
