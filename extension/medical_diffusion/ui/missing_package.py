"""The message a tab shows in place of its widgets when a package it imports is missing."""

from __future__ import annotations

#: import name -> pip requirement, for the packages the tabs import that the webui may lack
#: (install.py adds these unless the webui runs with --skip-install)
PIP_NAMES = {
    "SimpleITK": "SimpleITK",
    "h5py": "h5py",
    "pydicom": "pydicom",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "cv2": "opencv-python",
    "PIL": "Pillow",
    "yaml": "PyYAML",
}


def missing_package_message(title: str, exc: ImportError, *, in_webui: bool) -> str:
    """Markdown naming the missing module and the pip command that adds it."""
    module = (exc.name or "").split(".")[0]
    if not module or not isinstance(exc, ModuleNotFoundError):
        return f"**{title} is unavailable:** {exc}"
    requirement = PIP_NAMES.get(module, module)
    where = ("in the webui's Python, or restart the webui without `--skip-install`" if in_webui
             else "in this Python")
    return f"**{title} is unavailable:** {module} is not installed: run `pip install {requirement}` {where}."
