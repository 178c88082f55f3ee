"""Steered cells on a real vLLM running the vllm-lens plugin: the direction, its layer and alpha sent
in the plugin's request fields give the in-process engine's greedy tokens, token for token, for the
induce (base + alpha d) and restore (fine-tune - alpha d) cells: the plugin's layer i is this
project's block output i, and its scale is alpha."""

from __future__ import annotations

import json

from core.models import DEMO_DIRECTION
from core.runs import RUN_JSON
from tests.vllm.greedy import assert_same_tokens, greedy_runs


def test_steered_greedy_tokens_equal_the_in_process_engine(steering_server, tmp_path):
    variants = "base,finetuned,base+4,finetuned-4"
    served, in_process = greedy_runs(
        steering_server, tmp_path, "--variants", variants, "--layer", "19", "--direction", str(DEMO_DIRECTION)
    )
    assert len(served) == 3 * 4
    assert_same_tokens(served, in_process)
    for row_id in served:  # steering changed the answers it was applied to
        if "@L19" in row_id:
            plain = row_id.replace("+4@L19", "").replace("-4@L19", "")
            assert served[row_id]["token_ids"] != served[plain]["token_ids"], row_id
    assert json.loads((tmp_path / "server" / RUN_JSON).read_text())["engine"]["steering"] == "vllm-lens"
