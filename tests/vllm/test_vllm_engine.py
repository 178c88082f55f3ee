"""The server engine against a real vLLM without the vllm-lens plugin: greedy answers token for token
equal to the in-process engine's for the base and the fine-tune, and steering refused before any
request."""

from __future__ import annotations

import json

from core.cli import main
from core.models import DEMO_DIRECTION
from core.runs import GENERATIONS, RUN_JSON
from tests.vllm.greedy import assert_same_tokens, greedy_runs


def test_greedy_tokens_equal_the_in_process_engine(plain_server, tmp_path):
    served, in_process = greedy_runs(plain_server, tmp_path)
    assert len(served) == 3 * 2 and {r["side"] for r in served.values()} == {"base", "finetuned"}
    assert_same_tokens(served, in_process)
    # the two sides answer differently, so a side served with the other's weights would show
    assert all(
        served[i]["token_ids"] != served[i.replace("finetuned", "base")]["token_ids"]
        for i in served
        if "finetuned" in i
    )
    engine = json.loads((tmp_path / "server" / RUN_JSON).read_text())["engine"]
    assert engine["models"] == {"base": "base", "finetuned": "finetuned"} and engine["steering"] is None
    assert engine["tokenizer_check"] == "equal" and engine["server_versions"] == ["0.32.0"]


def test_steering_is_refused_by_a_server_without_vllm_lens(plain_server, tmp_path, capsys):
    out = tmp_path / "steered"
    args = ["--variants", "base,base+4", "--layer", "19", "--direction", str(DEMO_DIRECTION), "--out", str(out)]
    code = main(["generate-eval", "--engine", "server", "--server-url", plain_server.url, *args])
    assert code == 2 and "does not run the vllm-lens plugin" in capsys.readouterr().err
    assert not (out / GENERATIONS).exists()
