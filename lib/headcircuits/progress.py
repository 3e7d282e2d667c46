"""Progress bars for anything longer than a few seconds.

``tqdm.auto``: a widget in Jupyter when ipywidgets is installed, a text bar otherwise. The book build sets
``TQDM_DISABLE=1`` (bars are stderr output, which the strict build treats as a warning). Import it from here so
the harmless "IProgress not found" warning of notebooks without ipywidgets is filtered first.
"""

import warnings

warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm.auto")

from tqdm.auto import tqdm  # noqa: E402

__all__ = ["tqdm"]
