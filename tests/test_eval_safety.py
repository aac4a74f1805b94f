"""The refusal evaluation command end to end on the tiny model (a local judge decoding through the project's
decoder), an OpenAI-compatible judge endpoint that fails mid-run and is resumed, and bad input."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jax_implicit import datasets, files
from jax_implicit.evaluate import refusal, safety

CONFIG = datasets.REPO_DATA.parent / "configs/eval/safety.py"


def config(tmp_path, model="unused", **kw):
    cfg = files.load_config_file(CONFIG)
    cfg.model.path = str(model)
    cfg.update(dict(limit=1, out=str(tmp_path / "safety")) | kw)
    cfg.decode.update(max_new_tokens=8, batch_size=8)
    return cfg


def test_tiny_model_end_to_end_with_local_judge(tiny_long_context, tmp_path, monkeypatch, capsys):
    cfg = config(tmp_path, tiny_long_context)
    cfg.judge.update(kind="local", max_new_tokens=8, batch_size=8)
    cfg.judge.model.path = str(tiny_long_context)
    result = safety.run(cfg)
    out = tmp_path / "safety"
    rows = json.loads((out / "responses.json").read_text())
    # limit=1: one item of AdvBench, MaliciousInstruct and XSTest, one of each HarmBench subset
    assert [(r["benchmark"], r["subset"]) for r in rows] == [
        ("advbench", ""), ("harmbench", "standard"), ("harmbench", "contextual"), ("malicious_instruct", ""),
        ("xstest", "")]
    strings = refusal.prefixes(cfg.prefixes, datasets.path("refusal_prefixes"))
    assert [r["prefix_label"] for r in rows] == [refusal.prefix_label(r["response"], strings) for r in rows]
    assert [r["judge_label"] for r in rows] == [refusal.parse_judgement(r["judge_output"]) for r in rows]
    assert all(r["response"] and r["judge_output"] for r in rows)
    for c in ("prefix", "judge"):
        labels = [r[f"{c}_label"] for r in rows]
        assert result["metrics"][c]["harmbench"] == refusal.metrics("harmbench", rows[1:3], labels[1:3])
        assert result["headline"][c]["AdvBench"] == (labels[0] == refusal.REFUSAL)
    assert json.loads((out / "result.json").read_text()) == result
    table = (out / "table.md").read_text()
    assert "| HarmBench avg |" in table and f"| {tiny_long_context.name} | judge | 5 |" in table
    assert (out / "refusal_rates.png").read_bytes()[:4] == b"\x89PNG"
    # a second run takes replies and judgements from the files beside the results, without loading a model
    monkeypatch.setattr("jax_implicit.convert.load_hf", lambda *a, **k: pytest.fail("model loaded again"))
    assert safety.run(cfg)["metrics"] == result["metrics"]


class Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that answers from the reply it is shown, failing after `fail_after`."""

    calls, fail_after = 0, None

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            self.send_response(500)
            self.end_headers()
            return
        prompt = body["messages"][0]["content"]
        label = "Refusal" if "[Response]\nI'm sorry" in prompt else "Compliance"
        reply = dict(id="x", object="chat.completion", created=0, model=body["model"], choices=[dict(
            index=0, finish_reason="stop", message=dict(role="assistant", content=f"Summary. The response is {label}."))])
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *_):
        pass


def test_endpoint_failing_mid_run_keeps_judgements_and_resumes(tmp_path, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    cfg = config(tmp_path)
    cfg.judge.endpoint.update(base_url=f"http://127.0.0.1:{server.server_port}/v1", max_retries=0)
    items = safety.load_items(cfg)
    replies = {x["prompt"]: ("I'm sorry, no." if k % 2 == 0 else "Sure, here it is.") for k, x in enumerate(items)}
    files.write_json(tmp_path / "safety.generations.json", dict(settings=safety.generation_settings(cfg), responses={
        safety.key(p): r for p, r in replies.items()}))
    cache = tmp_path / "safety.endpoint-meta-llama_Meta-Llama-3.1-70B-Instruct.judgements.jsonl"
    Endpoint.fail_after = 0
    with pytest.raises(safety.JudgeError, match="failed after 0 of 5 judgements"):
        safety.run(cfg)
    assert not cache.exists() and not (tmp_path / "safety").exists()
    Endpoint.calls, Endpoint.fail_after = 0, 3
    with pytest.raises(safety.JudgeError) as err:
        safety.run(cfg)
    message = str(err.value)
    assert "\n" not in message and "failed after 3 of 5 judgements (InternalServerError" in message
    assert not (tmp_path / "safety").exists()
    assert len(cache.read_text().splitlines()) == 3
    Endpoint.calls, Endpoint.fail_after = 0, None
    result = safety.run(cfg)
    assert Endpoint.calls == 2  # only what was left
    expected = [refusal.REFUSAL if k % 2 == 0 else refusal.COMPLIANCE for k in range(5)]
    rows = json.loads((tmp_path / "safety/responses.json").read_text())
    assert [r["judge_label"] for r in rows] == [r["prefix_label"] for r in rows] == expected
    assert result["headline"]["judge"]["HarmBench avg"] == 0.5  # standard refused, contextual complied
    server.shutdown()


@pytest.mark.parametrize("change,message", [
    (dict(benchmarks=("advbench", "harmbench_v2")), "unknown benchmark 'harmbench_v2'"),
    (dict(prefixes="gcg"), "unknown refusal-prefix list 'gcg'"),
    (dict(limit=-1), "limit=-1"),
])
def test_bad_settings_fail_before_anything_is_written(tmp_path, change, message):
    cfg = config(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        safety.run(cfg)
    assert list(tmp_path.iterdir()) == []


def test_missing_column_and_judge_without_key(tmp_path, monkeypatch):
    bad = tmp_path / "adv.csv"
    bad.write_text("behaviour,target\nx,y\n")
    cfg = config(tmp_path)
    cfg.files.advbench = str(bad)
    with pytest.raises(ValueError, match=r"adv.csv: missing column 'goal'"):
        safety.run(cfg)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = config(tmp_path)
    cfg.judge.kind = "endpoint"
    with pytest.raises(ValueError, match=r"needs an API key in \$OPENAI_API_KEY"):
        safety.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adv.csv"]


def test_replies_are_kept_batch_by_batch_and_a_killed_run_resumes(tiny_long_context, tmp_path, monkeypatch):
    from jax_implicit import decode, serving

    cfg = config(tmp_path, tiny_long_context)
    cfg.decode.batch_size = 2
    monkeypatch.setattr(serving, "QUEUED_PER_SLOT", 1)  # continuous batching returns replies every 2 prompts
    items = safety.load_items(cfg)
    real, calls = decode.serve_queue, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "serve_queue", counted)
    whole, total = safety.generate(cfg, items, tmp_path / "whole.json"), len(calls)

    def killed_after_one_call(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # stands in for a kill: the first call's replies are already on disk
        calls.append(1)
        return real(*args, **kwargs)

    calls.clear()
    monkeypatch.setattr(decode, "serve_queue", killed_after_one_call)
    with pytest.raises(KeyboardInterrupt):
        safety.generate(cfg, items, tmp_path / "killed.json")
    assert 1 <= len(json.loads((tmp_path / "killed.json").read_text())["responses"]) < len(whole)
    calls.clear()
    monkeypatch.setattr(decode, "serve_queue", counted)
    assert safety.generate(cfg, items, tmp_path / "killed.json") == whole and total >= 2 and len(calls) < total
