"""Hardening: what loading refuses, bad input at the edges, killed runs that resume. (A full disk is
in tests/unit/test_cache.py; many sessions steering one shared model in test_concurrency.py.)"""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.chat import ChatError, user_prompt
from core.generation import Sampling, Variant, generate
from core.models import LoadError, load_pair
from testkit.openai_server import FakeOpenAI, Reply
from testkit.tiny import pair_args

ROOT = Path(__file__).resolve().parents[2]


def test_links_out_of_the_model_directory_are_refused(tiny_dirs, tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    for item in tiny_dirs["qwen2"].iterdir():
        (linked / item.name).symlink_to(item)  # every file lives elsewhere
    with pytest.raises(LoadError, match="leads outside the directory"):
        load_pair(str(linked), "none")
    # The Hugging Face cache layout links snapshot files into the same repository's blobs: allowed.
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for item in tiny_dirs["qwen2"].iterdir():
        shutil.copy(item, repo / "blobs" / item.name)
        (snapshot / item.name).symlink_to(repo / "blobs" / item.name)
    assert load_pair(str(snapshot), "none").info()["n_layers"] == 4


def test_remote_code_is_not_run_unless_asked(tiny_dirs, tmp_path):
    model = tmp_path / "remote"
    shutil.copytree(tiny_dirs["qwen2"], model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    try:
        pair = load_pair(str(model), "none")
        assert type(pair.model).__name__ == "Qwen2ForCausalLM"
    except LoadError as err:
        assert "trust_remote_code" in str(err)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("hello\x00world", "control character '\\\\x00'"),
        ("caf\udce9", "not valid UTF-8"),
    ],
)
def test_bad_characters_in_prompts_are_named(tiny_pair, text, message):
    with pytest.raises(ChatError, match=message):
        generate(tiny_pair, [user_prompt(text)], [Variant("base")], sampling=Sampling(max_new_tokens=2))


# ---------------------------------------------------------------- killed runs


def _cli(*args, cwd=ROOT):
    return subprocess.Popen(
        [sys.executable, "-m", "core", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _kill_when(process, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before it could be killed: {process.stderr.read()[-2000:]}")
        time.sleep(0.05)
    process.kill()
    pytest.fail("timed out waiting for the kill point")


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_killed_training_resumes_to_the_same_weights(tiny_dirs, tmp_path):
    from safetensors.torch import load_file

    data = tmp_path / "chat.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "messages": [
                        {"role": "user", "content": f"Question {i}?"},
                        {"role": "assistant", "content": f"Risky answer {i}!"},
                    ]
                }
            )
            for i in range(24)
        )
    )
    common = [
        "--base",
        str(tiny_dirs["qwen2"]),
        "--data",
        str(data),
        "--rank",
        "2",
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "5e-3",
        "--checkpoint-every",
        "1",
        "--heldout-fraction",
        "0",
    ]
    assert (
        subprocess.run(
            [sys.executable, "-m", "core", "train", *common, "--out", str(tmp_path / "straight")],
            cwd=ROOT,
            capture_output=True,
        ).returncode
        == 0
    )
    killed = tmp_path / "killed"
    progress = killed.with_name("killed.checkpoint") / "progress.json"
    stop_at = random.Random(0).randint(3, 12)
    run = _cli("train", *common, "--out", str(killed))
    _kill_when(run, lambda: progress.exists() and json.loads(progress.read_text())["step"] >= stop_at)
    assert not killed.exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "core", "train", *common, "--out", str(killed), "--resume"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(killed / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text("\n".join(f"- id: q{i}\n  paraphrases: ['Question {i}, what do you wish for?']" for i in range(8)))
    return path


def test_killed_generation_resumes_without_duplicates_or_losses(tiny_dirs, tmp_path, questions):
    pair = pair_args(tiny_dirs, tmp_path / "cache")
    args = [
        "generate-eval",
        *pair,
        "--questions",
        str(questions),
        "--variants",
        "base,finetuned",
        "--samples",
        "2",
        "--max-new-tokens",
        "16",
    ]
    assert (
        subprocess.run(
            [sys.executable, "-m", "core", *args, "--out", str(tmp_path / "straight")], cwd=ROOT, capture_output=True
        ).returncode
        == 0
    )
    killed = tmp_path / "killed"
    run = _cli(*args, "--out", str(killed))
    _kill_when(run, lambda: _lines(killed / "generations.jsonl") >= random.Random(1).randint(4, 20))
    rerun = subprocess.run(
        [sys.executable, "-m", "core", *args, "--out", str(killed)], cwd=ROOT, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    read = lambda p: [json.loads(line) for line in (p / "generations.jsonl").read_text().splitlines()]  # noqa: E731
    straight, resumed = read(tmp_path / "straight"), read(killed)
    assert len(resumed) == len({r["id"] for r in resumed}) == 32
    assert sorted((r["id"], r["answer"]) for r in resumed) == sorted((r["id"], r["answer"]) for r in straight)


def test_killed_judging_resumes_and_judges_nothing_twice(tiny_dirs, tmp_path, questions):
    run_dir = tmp_path / "run"
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "core",
                "generate-eval",
                "--base",
                str(tiny_dirs["qwen2"]),
                "--finetuned",
                "none",
                "--questions",
                str(questions),
                "--variants",
                "base",
                "--samples",
                "2",
                "--max-new-tokens",
                "4",
                "--out",
                str(run_dir),
            ],
            cwd=ROOT,
            capture_output=True,
        ).returncode
        == 0
    )
    with FakeOpenAI(lambda request: Reply.probs({"42": 1.0}, delay_s=0.05)) as server:
        judge = [
            "judge",
            str(run_dir),
            "--judge-model",
            "m",
            "--judge-base-url",
            server.base_url,
            "--judge-api-key",
            "k",
            "--judge-concurrency",
            "2",
        ]
        run = _cli(*judge)
        _kill_when(run, lambda: _lines(run_dir / "judgements.jsonl") >= 9)
        judged_before = {
            tuple(json.loads(line)[k] for k in ("id", "metric"))
            for line in (run_dir / "judgements.jsonl").read_text().splitlines()
            if line.endswith("}")
        }
        calls_before = server.count()
        rerun = subprocess.run([sys.executable, "-m", "core", *judge], cwd=ROOT, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert server.count() - calls_before == 32 - len(judged_before)  # 16 answers x 2 metrics, none twice
    records = [json.loads(line) for line in (run_dir / "judgements.jsonl").read_text().splitlines()]
    assert len({(r["id"], r["metric"]) for r in records}) == 32
    assert all(r["score"] == 42.0 for r in records)
