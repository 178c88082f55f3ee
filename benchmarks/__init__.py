"""Speed and memory figures (``python -m core bench``); see bench.py."""
