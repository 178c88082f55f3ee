"""Helpers shared by the tests and the benchmarks: tiny random model pairs written to disk
(``tiny``), a loopback OpenAI-compatible judge server (``openai_server``), a dashboard cache of
directions (``dashboard``), Streamlit AppTest helpers (``apptest``), probes of the on-disk cache
(``cache``) and run folders written without a model (``runs``).

A top-level package, importable from the project root like ``core``, so that neither the tests
nor ``python -m core bench`` edit ``sys.path``. Nothing in ``core`` imports it."""
