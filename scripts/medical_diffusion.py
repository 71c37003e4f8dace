"""AUTOMATIC1111 entry point: put ``extension/`` on ``sys.path`` and register callbacks."""

import os
import sys

_EXTENSION_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "extension")
if _EXTENSION_SRC not in sys.path:
    sys.path.insert(0, _EXTENSION_SRC)

from medical_diffusion.webui.callbacks import register  # noqa: E402

register()
