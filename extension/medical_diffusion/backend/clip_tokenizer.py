"""An offline CLIP tokenizer with the ids SD1, SD2 and SDXL use (one BPE vocabulary for all).

The BPE vocabulary ships inside ``open_clip_torch`` (``open_clip/bpe_simple_vocab_16e6.txt.gz``);
from it we write the ``vocab.json``/``merges.txt`` pair that Hugging Face's ``CLIPTokenizer``
reads, in OpenCLIP's order, so token ids equal those of A1111's SD2 tokenizer and of
``stabilityai/stable-diffusion-2``'s ``tokenizer/`` folder. Nothing is downloaded.

OpenAI's CLIP ViT-L/14 (SD1, SDXL's first encoder) has the same vocabulary; the tokenizers differ
only in the pad token: SD1 and SDXL's ``tokenizer`` pad with the end token ``<|endoftext|>``,
SD2 and SDXL's ``tokenizer_2`` (OpenCLIP) with id 0 (``"!"``).
"""

from __future__ import annotations

import copy
import functools
import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from medical_diffusion.errors import MedDiffError

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
#: OpenCLIP keeps merges ``[1, 49152 - 256 - 2 + 1)`` of the file (first line is a header)
N_MERGES = 49152 - 256 - 2
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
#: OpenCLIP's pad token (id 0): SD2 and SDXL's second text encoder
PAD_OPENCLIP = "!"


def find_bpe_file() -> Path:
    """Path of the BPE vocabulary shipped by ``open_clip_torch`` (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise MedDiffError(
            f"the CLIP tokenizer needs {BPE_FILE_NAME} from the open_clip_torch package: "
            "pip install open_clip_torch (extra 'standalone')"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BPE_FILE_NAME
        if path.is_file():
            return path
    raise MedDiffError(f"{BPE_FILE_NAME} not found in the installed open_clip package")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_tokenizer_files(folder: str | Path, bpe_file: str | Path | None = None, pad_token: str = PAD_OPENCLIP) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and the tokenizer configs into ``folder``.

    ``pad_token`` ``"!"`` (id 0) is SD2's; :data:`EOS` is SD1's (OpenAI CLIP pads with the end token).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bpe_file = Path(bpe_file) if bpe_file else find_bpe_file()
    lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m.split()) for m in merges]
    vocab += [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": pad_token,  # SD2 pads with id 0 like OpenCLIP, SD1 with the end token
        "model_max_length": 77,
        "do_lower_case": True,
        "errors": "replace",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), "utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), "utf-8")
    return folder


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(pad_token: str = PAD_OPENCLIP):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="meddiff-clip-tokenizer-") as folder:
        write_tokenizer_files(folder, pad_token=pad_token)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_sd2_tokenizer():
    """A ``transformers.CLIPTokenizer`` for SD2 built offline from OpenCLIP's BPE file.

    Each call returns its own copy (diffusers' ``load_textual_inversion`` adds tokens in place).
    """
    return copy.deepcopy(_cached_tokenizer())


def load_sd1_tokenizer():
    """The SD1 (OpenAI CLIP ViT-L/14) tokenizer: the same ids, padding with the end token.

    Also SDXL's first tokenizer (``tokenizer/``); its second (``tokenizer_2/``) is :func:`load_sd2_tokenizer`'s.
    """
    return copy.deepcopy(_cached_tokenizer(EOS))


def load_tokenizer_for(family: str, second: bool = False):
    """The tokenizer of ``family``'s text encoder (``second``: SDXL's OpenCLIP bigG one)."""
    if family == "SD2" or (family == "SDXL" and second):
        return load_sd2_tokenizer()
    return load_sd1_tokenizer()
