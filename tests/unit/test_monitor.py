"""The training-time monitor's arithmetic and state file, without a model (the monitor on a tiny
random model is in tests/integration/test_monitor.py)."""

from __future__ import annotations

import pytest

from core.monitor import STATE, MonitorError, crossing, lead, read_state, threshold


def test_thresholds_crossings_and_the_lead_on_known_curves():
    steps = [0, 10, 20, 30, 40]
    assert threshold(1.0, 3.0) == 2.0 and threshold(2.0, 2.0) is None
    # The projection reaches half-way (2.0) at step 10, the behaviour (0.5 of 1.0) only at step 30.
    result = lead(steps, [1.0, 2.5, 2.8, 2.9, 3.0], [0.0, 0.1, 0.3, 0.6, 1.0], projection_start=1.0)
    assert (result["projection_crossed_at"], result["behaviour_crossed_at"], result["steps"]) == (10, 30, 20)
    assert result["projection_threshold"] == 2.0 and result["behaviour_threshold"] == 0.5
    assert "led by 20 steps" in result["summary"] and result["resolution_steps"] == 10
    # A falling curve crosses downwards; the behaviour first: a negative lead.
    result = lead(steps, [0.0, -0.1, -0.2, -0.9, -1.0], [0.0, 0.8, 0.9, 1.0, 1.0], projection_start=0.0)
    assert (result["projection_crossed_at"], result["behaviour_crossed_at"], result["steps"]) == (30, 10, -20)
    assert "lagged by 20 steps" in result["summary"]
    # A curve that never moves has no threshold, so no lead.
    result = lead(steps, [1.0] * 5, [0.0, 0.2, 0.4, 0.6, 0.8], projection_start=1.0)
    assert result["steps"] is None and result["projection_threshold"] is None
    assert "the projection never crossed" in result["summary"]
    assert crossing(steps, [0.0, 0.5, 0.2, 0.7, 1.0], 0.0, 1.0) == 10  # the first crossing, not the last


def test_a_state_line_cut_off_by_a_kill_is_dropped_and_a_corrupt_one_is_named(tmp_path):
    path = tmp_path / STATE
    path.write_text('{"kind": "header"}\n{"kind": "point", "step": 0}\n{"kind": "point", "st')
    assert read_state(path) == [{"kind": "header"}, {"kind": "point", "step": 0}]
    assert path.read_text() == '{"kind": "header"}\n{"kind": "point", "step": 0}\n'  # appends start clean
    path.write_text('{"kind": "header"}\nnot json\n{"kind": "point", "step": 0}\n')
    with pytest.raises(MonitorError, match=r"monitor.jsonl:2: not a JSON line"):
        read_state(path)
