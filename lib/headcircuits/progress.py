"""Progress bars for anything longer than a few seconds.

``tqdm.auto``: a widget in Jupyter when ipywidgets is installed, a text bar otherwise. The book build sets
``TQDM_DISABLE=1`` (bars are stderr output, which the strict build treats as a warning); it wins over an explicit
``disable=False`` (tqdm's own environment override does not). Import it from here so the harmless
"IProgress not found" warning of notebooks without ipywidgets is filtered first.
"""

import os
import warnings

warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm.auto")

from tqdm.auto import tqdm as _tqdm  # noqa: E402


def tqdm(*args, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm``, always off when the environment says ``TQDM_DISABLE``."""
    if os.environ.get("TQDM_DISABLE", "") not in ("", "0"):
        disable = True
    return _tqdm(*args, disable=disable, **kwargs)


__all__ = ["tqdm"]
