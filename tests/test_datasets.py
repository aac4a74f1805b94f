"""Every named dataset resolves offline to its shipped file with the row count data/README.md states, and a
hub id that cannot be reached is a one-line error naming the dataset and the flag, before any model work."""

import csv
import json
import re

import pytest

from jax_implicit import datasets

LOCAL = sorted(name for name, entry in datasets.CATALOG.items() if entry.file)


def readme_rows(data_dir) -> dict[str, int]:
    """file -> rows, from the table in data/README.md (`| file | what | rows | ...`)."""
    table = {}
    for line in (data_dir / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"\d+( lists)?", cells[2]):
            table[cells[0]] = int(cells[2].split()[0])
    return table


def count_rows(path) -> int:
    """Rows as a user would count them: JSON Lines lines, JSON list items or object keys, CSV records, text lines."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return sum(1 for line in text.splitlines() if line.strip())
    if path.suffix == ".json":
        return len(json.loads(text))
    if path.suffix == ".csv":
        return len(list(csv.DictReader(text.splitlines(keepends=True))))
    return len(text.splitlines())


@pytest.mark.parametrize("name", LOCAL)
def test_named_dataset_resolves_offline_to_its_file_with_the_readme_row_count(name, data_dir):
    source = datasets.resolve(name)
    assert source.path == data_dir / datasets.CATALOG[name].file and not source.hub_id
    rows = count_rows(source.path)
    assert rows == datasets.CATALOG[name].rows == readme_rows(data_dir)[datasets.CATALOG[name].file]


def test_readme_lists_every_shipped_file_and_its_license(data_dir):
    listed = readme_rows(data_dir)
    shipped = {str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file()} - {"README.md"}
    tokenizer = {f for f in shipped if f.startswith(datasets.LLAMA2_TOKENIZER)}
    assert shipped - tokenizer == set(listed) == {e.file for e in datasets.CATALOG.values() if e.file}
    assert f"| {datasets.LLAMA2_TOKENIZER}/ |" in (data_dir / "README.md").read_text()


def test_a_path_overrides_and_a_bad_spec_names_the_flag(data_dir, tmp_path):
    own = tmp_path / "mine.jsonl"
    own.write_text('{"instruction": "hi"}\n')
    assert datasets.resolve(str(own)).path == own
    with pytest.raises(datasets.DataSourceError, match=r"^--config.x: data file nope.jsonl does not exist$"):
        datasets.resolve("nope.jsonl", flag="--config.x")
    with pytest.raises(datasets.DataSourceError, match=r"--config.x='lmia' is not a dataset name \(lima, "):
        datasets.resolve("lmia", flag="--config.x")


def test_data_folder_override_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "val_eval").mkdir()
    (tmp_path / "val_eval" / "val.jsonl").write_text('{"instruction": "mine"}\n')
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    assert datasets.resolve("val").path == tmp_path / "val_eval" / "val.jsonl"
    with pytest.raises(datasets.DataSourceError, match=r"'lima': .*lima_data.jsonl is missing from the data folder"):
        datasets.resolve("lima")


def test_unreachable_hub_id_is_one_line(monkeypatch):
    with pytest.raises(datasets.DataSourceError) as err:  # HF_HUB_OFFLINE=1 (conftest)
        datasets.resolve("tatsu-lab/alpaca", flag="--config.data")
    assert "\n" not in str(err.value)
    assert "'tatsu-lab/alpaca'" in str(err.value) and "--config.data" in str(err.value)
    # Online settings, but nothing answers: the connection is refused.
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(datasets.DataSourceError, match=r"dataset 'mbpp' needs the hub id 'google-research-datasets/mbpp'"
                                                       r", which cannot be reached \(no connection to 127.0.0.1"):
        datasets.resolve("mbpp", flag="--config.data.path")


@pytest.mark.parametrize("command", ["generate", "train", "demo"])
def test_unreachable_hub_id_fails_before_any_model_work(command, monkeypatch, tmp_path):
    from jax_implicit import convert, demo, files, generate, pretrained, train

    def no_model_work(*args, **kwargs):
        raise AssertionError("a model was loaded or converted before the data was checked")

    monkeypatch.setattr(pretrained, "model_dir", no_model_work)
    monkeypatch.setattr(convert, "load_hf", no_model_work)
    root = files.load_config_file
    if command == "generate":
        cfg = root("configs/generate.py")
        cfg.data.instructions, run = "tatsu-lab/alpaca_eval", generate.run
    elif command == "train":
        cfg = root("configs/train/smollm2_cpu.py", "response")
        cfg.data.path, cfg.train.out_dir, run = "GAIR/lima", str(tmp_path / "run"), train.run
    else:
        cfg = root("configs/demo.py")
        cfg.data.ranking, cfg.report, run = "tatsu-lab/alpaca", str(tmp_path / "report"), demo.run
    with pytest.raises(ValueError, match=r"cannot be reached \(HF_HUB_OFFLINE is set\); set --config\.data\S* to a local"):
        run(cfg)
    assert not (tmp_path / "run").exists() and not (tmp_path / "report").exists()
