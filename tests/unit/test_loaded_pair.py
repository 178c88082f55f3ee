"""The dashboard's one loaded pair (ui.LoadedPair) with a stand-in loader: loaded once per spec, the held
pair released before another loads, one load at a time across sessions, nothing held after a failure."""

import threading
import time

import pytest

import ui
from core.models import LoadError

SPEC = {"base": "b", "finetuned": "f", "device": "cpu", "dtype": "auto", "cache": "cache"}


class StandInLoader:
    """Records each load: its spec, the pair the holder held meanwhile, and how many loads ran at once."""

    def __init__(self, holder):
        self.holder, self.loads, self.running, self.most_at_once = holder, [], 0, 0
        self.count = threading.Lock()

    def __call__(self, spec):
        with self.count:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.loads.append((dict(spec), self.holder.pair))
        time.sleep(0.01)
        with self.count:
            self.running -= 1
        if spec["base"] == "fail":
            raise LoadError("no such model")
        return object()


@pytest.fixture
def holder(monkeypatch):
    holder = ui.LoadedPair()
    monkeypatch.setattr(ui, "_load", StandInLoader(holder))
    return holder


def test_one_load_per_spec_and_the_held_pair_released_first(holder):
    first = holder.get(SPEC)
    assert holder.get(dict(SPEC)) is first and len(ui._load.loads) == 1
    other = holder.get({**SPEC, "finetuned": "none"})
    assert other is not first and ui._load.loads[1][1] is None  # nothing held while the other one loaded
    assert holder.spec == {**SPEC, "finetuned": "none"}
    with pytest.raises(LoadError):
        holder.get({**SPEC, "base": "fail"})
    assert holder.pair is None and holder.spec is None  # a failed load holds nothing
    holder.get(SPEC)
    holder.release()
    assert holder.pair is None and holder.spec is None


def test_sessions_asking_at_once_load_one_at_a_time(holder):
    got = {}

    def ask(session: int) -> None:
        got[session] = holder.get(SPEC if session % 2 else {**SPEC, "dtype": "fp32"})

    threads = [threading.Thread(target=ask, args=(session,)) for session in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(got) == 6 and ui._load.most_at_once == 1
    assert all(held is None for _, held in ui._load.loads)  # never two pairs in memory


def test_the_server_holds_one_and_clearing_the_resource_cache_releases_it(holder):
    ui.loaded_pair.clear()
    shared = ui.loaded_pair()
    assert ui.loaded_pair() is shared
    shared.get(SPEC)
    ui.loaded_pair.clear()  # e.g. "Clear cache" in Streamlit's menu
    assert shared.pair is None and shared.spec is None
