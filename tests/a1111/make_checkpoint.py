"""Write a random-weight checkpoint for ``tiny-sd2-v.yaml`` (run with the webui's Python).

Usage: python make_checkpoint.py WEBUI_DIR OUT.safetensors
The model classes come from the webui's own ``repositories/stable-diffusion-stability-ai``; the
yaml is copied beside the checkpoint, where the webui looks for a checkpoint's config.
"""

import shutil
import sys
from pathlib import Path

webui, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(webui / "repositories" / "stable-diffusion-stability-ai"))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm.util import instantiate_from_config  # noqa: E402

config_path = Path(__file__).with_name("tiny-sd2-v.yaml")
torch.manual_seed(0)
model = instantiate_from_config(OmegaConf.load(config_path).model)
# ldm starts some output projections at zero (attention proj_out, resblock out): with random weights
# the prompt would then have no effect at all, so those get small random values too.
with torch.no_grad():
    for param in model.parameters():
        if param.dim() > 1 and not param.any():
            param.normal_(0.0, 0.02)
    # A1111 rescales the text encoding by its mean (emphasis); a fresh LayerNorm makes that mean ~0
    # and the gradient of the rescale NaN. A trained OpenCLIP's final norm has a non-zero bias.
    model.cond_stage_model.model.ln_final.bias.normal_(0.1, 0.02)
state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
out.parent.mkdir(parents=True, exist_ok=True)
save_file(state, str(out))
shutil.copyfile(config_path, out.with_suffix(".yaml"))
print(f"{out}: {sum(v.numel() for v in state.values()) / 1e6:.1f} M parameters")
