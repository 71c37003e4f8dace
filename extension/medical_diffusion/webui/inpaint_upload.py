"""Send an image and its mask to img2img's "Inpaint upload" tab of the webui.

The webui builds img2img before the extension tabs, so the two image components are captured as
they are created (``on_after_component``) and the extension's button writes into them directly.
"""

from __future__ import annotations

from typing import Callable

#: elem_id of img2img's "Inpaint upload" image and mask components (A1111 ``modules/ui.py``)
TARGET_IDS = ("img_inpaint_base", "img_inpaint_mask")
#: position of "Inpaint upload" among img2img's mode tabs (img2img, Sketch, Inpaint, Inpaint sketch, ...)
INPAINT_UPLOAD_TAB = 4

_targets: dict = {}


def capture(component, **_kwargs) -> None:
    """``on_after_component`` callback: keep the inpaint-upload image and mask components."""
    elem_id = getattr(component, "elem_id", None)
    if elem_id in TARGET_IDS:
        _targets[elem_id] = component


def targets() -> tuple | None:
    """(image, mask) components, or None when this webui has no such tab."""
    if all(key in _targets for key in TARGET_IDS):
        return tuple(_targets[key] for key in TARGET_IDS)
    return None


def bind(button, fn: Callable, inputs: list) -> None:
    """On click: ``fn(*inputs) -> (image, mask)`` goes to "Inpaint upload", then that tab is shown."""
    found = targets()
    if found is None:
        button.visible = False
        return
    button.click(fn, inputs, list(found)).then(
        None, None, None, _js=f"() => {{ switch_to_img2img_tab({INPAINT_UPLOAD_TAB}); return []; }}")
