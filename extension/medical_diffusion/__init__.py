"""Textual Inversion for medical images on Stable Diffusion 2.

The core (data, embeddings, training loop, prompts, masks, metrics) is plain
torch/numpy. Everything that touches AUTOMATIC1111 lives in ``medical_diffusion.webui``.
"""

__version__ = "0.1.0"
