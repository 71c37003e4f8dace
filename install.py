"""AUTOMATIC1111 installer: add only what the webui's venv lacks. Never touches torch, numpy or gradio."""

import launch

# import name -> pip requirement
_REQUIREMENTS = {
    "SimpleITK": "SimpleITK>=2.3",
    "h5py": "h5py>=3.8",
    "pydicom": "pydicom>=2.4",
    "safetensors": "safetensors>=0.4",
    "scipy": "scipy>=1.10",
    "matplotlib": "matplotlib>=3.7",
}


def _skip_install() -> bool:
    args = getattr(launch, "args", None)
    return bool(getattr(args, "skip_install", False))


if not _skip_install():
    for module_name, requirement in _REQUIREMENTS.items():
        if not launch.is_installed(module_name):
            launch.run_pip(f"install {requirement}", f"Medical Diffusion requirement: {requirement}")
