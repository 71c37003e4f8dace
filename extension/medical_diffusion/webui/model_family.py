"""Which family the webui's loaded model is (SD1, SD2, SDXL), its text blocks, and why not when unsupported.

Reads only what A1111 v1.10 puts on the model: ``sd_models.set_model_type``'s flags
(``is_sd1``/``is_sd2``/``is_sdxl``/``is_sd3``, ``is_sdxl_inpaint``), ``cond_stage_model`` (an
``sd_hijack`` text wrapper, or for SDXL the ``GeneralConditioner`` with the wrapped embedders),
``model.model.conditioning_key`` and the UNet's ``in_channels``. Nothing here imports ``modules``.
"""

from __future__ import annotations

from typing import Any

from medical_diffusion.errors import MedDiffError

#: A1111's ``EmbeddingsWithFixes.textual_inversion_key`` of each SDXL text encoder, by wrapper class
#: (``sd_hijack.StableDiffusionModelHijack.hijack``): CLIP ViT-L -> clip_l, OpenCLIP ViT-bigG -> clip_g
_SDXL_KEY_BY_CLASS = {"FrozenCLIPEmbedderForSDXLWithCustomWords": "clip_l",
                      "FrozenOpenCLIPEmbedder2WithCustomWords": "clip_g"}
SDXL_BLOCKS = ("clip_l", "clip_g")


def model_name(model: Any) -> str:
    """The checkpoint's name as the webui shows it (else the model's class)."""
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "model_name", None) or getattr(info, "title", None) or type(model).__name__


def model_error(model: Any, problem: str) -> MedDiffError:
    """``loaded model <name>: <problem>`` as a MedDiffError (the Train tab shows it)."""
    return MedDiffError(f"loaded model {model_name(model)!r}: {problem}")


def detect_family(model: Any) -> str:
    """``"SD1"``, ``"SD2"`` or ``"SDXL"``; :class:`MedDiffError` naming the model when training
    textual-inversion vectors on it is not supported here."""
    if model is None:
        raise MedDiffError("no Stable Diffusion checkpoint is loaded in the webui")
    if getattr(model, "is_sd3", False):
        raise model_error(model, "SD3 is not supported: its conditioning (CLIP-L + CLIP-G + T5, MMDiT) has no "
                           "textual-inversion path in A1111; load an SD 1.x, SD 2.x or SDXL checkpoint")
    if getattr(model, "is_sdxl", False) or hasattr(model, "conditioner"):
        family = "SDXL"
    elif getattr(model, "is_sd2", False):
        family = "SD2"
    elif getattr(model, "is_sd1", False):
        family = "SD1"
    else:  # no flags (a fork or an older webui): the structure A1111's set_model_type reads
        wrapped = getattr(getattr(model, "cond_stage_model", None), "wrapped", None)
        if hasattr(wrapped, "model"):
            family = "SD2"
        elif hasattr(wrapped, "transformer") or hasattr(wrapped, "roberta"):
            family = "SD1"
        else:
            raise model_error(model, f"unknown model type {type(model).__name__} (no is_sd1/is_sd2/is_sdxl flag and no "
                               "A1111 CLIP/OpenCLIP text encoder in cond_stage_model); SD 1.x, SD 2.x and SDXL "
                               "are supported")
    _check_supported(model, family)
    return family


def _check_supported(model: Any, family: str) -> None:
    cond = getattr(model, "cond_stage_model", None)
    if cond is None or not hasattr(cond, "encode_embedding_init_text"):
        raise model_error(model, "it has no A1111 text encoder (cond_stage_model with encode_embedding_init_text), "
                           "so trainable vectors cannot reach its conditioning")
    for method in ("apply_model", "encode_first_stage", "decode_first_stage"):
        if not callable(getattr(model, method, None)):
            raise model_error(model, f"it has no {method}()")
    if getattr(model, "is_sdxl_inpaint", False):
        raise model_error(model, "SDXL inpainting UNets take 9 input channels (latent + mask + masked image); "
                           "train on the SDXL base checkpoint and use the embedding with the inpainting model")
    latent = int(getattr(model, "latent_channels", 4))
    if latent != 4:
        raise model_error(model, f"latents have {latent} channels; only 4-channel (SD 1.x/2.x/SDXL) VAEs are supported")
    wrapper = getattr(model, "model", None)
    key = getattr(wrapper, "conditioning_key", "crossattn")
    if key not in ("crossattn", None):
        raise model_error(model, f"its UNet is conditioned as {key!r} (inpainting, depth, instruct-pix2pix or unCLIP "
                           "models take extra image inputs); train on a text-to-image checkpoint of the same family")
    in_channels = getattr(getattr(wrapper, "diffusion_model", None), "in_channels", latent)
    if isinstance(in_channels, int) and in_channels != latent:
        raise model_error(model, f"its UNet takes {in_channels} input channels, not {latent} (an inpainting or "
                           "instruct-pix2pix UNet); train on a text-to-image checkpoint of the same family")
    if family == "SDXL":
        if not callable(getattr(model, "get_learned_conditioning", None)):
            raise model_error(model, "SDXL model without get_learned_conditioning (A1111's sd_models_xl patch)")
        keys = [sdxl_block_key(e) for e in sdxl_text_embedders(model)]
        if keys != list(SDXL_BLOCKS):
            raise model_error(model, f"SDXL text encoders {keys} are not the base model's clip_l + clip_g (an SDXL "
                               "refiner has only clip_g); train on an SDXL base checkpoint")


def sdxl_text_embedders(model: Any) -> list:
    """The conditioner's text embedders in their order (what ``encode_embedding_init_text`` concatenates)."""
    conditioner = getattr(model, "conditioner", None)
    embedders = getattr(conditioner, "embedders", None)
    if embedders is None:
        raise model_error(model, "SDXL model without conditioner.embedders")
    return [e for e in embedders if hasattr(e, "encode_embedding_init_text")]


def token_embedding_module(embedder: Any, model: Any = None):
    """The (hijacked) token-embedding module of one A1111 text wrapper: HF CLIP, OpenCLIP or XLM-R."""
    wrapped = getattr(embedder, "wrapped", None)
    if hasattr(wrapped, "model"):  # OpenCLIP (SD2, SDXL clip_g)
        return wrapped.model.token_embedding
    if hasattr(wrapped, "transformer"):  # HF CLIP (SD1, SDXL clip_l)
        return wrapped.transformer.text_model.embeddings.token_embedding
    if hasattr(wrapped, "roberta"):  # XLM-R (AltDiffusion)
        return wrapped.roberta.embeddings.token_embedding
    raise model_error(model, f"text encoder {type(embedder).__name__} exposes no token-embedding matrix")


def sdxl_block_key(embedder: Any) -> str:
    """``clip_l``/``clip_g``: the key A1111's ``EmbeddingsWithFixes`` reads from a dict ``Embedding.vec``."""
    try:
        key = getattr(token_embedding_module(embedder), "textual_inversion_key", None)
    except MedDiffError:
        key = None
    return key or _SDXL_KEY_BY_CLASS.get(type(embedder).__name__, type(embedder).__name__)


def text_widths(model: Any, family: str) -> dict[str, int]:
    """The blocks of one token vector in order: ``{"vectors": W}`` or ``{"clip_l": 768, "clip_g": 1280}``."""
    if family == "SDXL":
        return {sdxl_block_key(e): int(e.encode_embedding_init_text(",", 1).shape[-1])
                for e in sdxl_text_embedders(model)}
    return {"vectors": int(model.cond_stage_model.encode_embedding_init_text(",", 1).shape[-1])}
