"""EM Lens core library: model pairs, residual-stream hooks, directions, detection.

Never imports streamlit; the dashboard pages and the CLI are thin layers over this package.
"""

__version__ = "0.1.0"
