"""HTTP API of the extension, ``/medical-diffusion/v1/...``: training, interpolation, FID.

The same router serves the webui (``on_app_started``, behind its API auth) and ``meddiff ui``.
Bodies are plain JSON objects; user errors answer 400 with the message, a busy trainer 409.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Dict, Sequence

from fastapi import APIRouter, Body, HTTPException

from medical_diffusion.errors import MedDiffError
from medical_diffusion.ui.context import UIContext

PREFIX = "/medical-diffusion/v1"


def _user_error(exc: Exception) -> HTTPException:
    return HTTPException(status_code=400, detail=str(exc) or exc.__class__.__name__)


def make_router(ctx: UIContext, dependencies: Sequence = ()) -> APIRouter:
    router = APIRouter(prefix=PREFIX, dependencies=list(dependencies), tags=["Medical Diffusion"])

    @router.post("/train")
    def start_training(body: Dict[str, Any] = Body(...)):
        """Start a run: ``{"config": {TrainConfig fields}, "run_dir": str?, "resume": bool?}``."""
        from medical_diffusion.training.config import TrainConfig

        if ctx.trainer.running:
            raise HTTPException(status_code=409, detail=f"a training run ({ctx.trainer.state.name}) is already going")
        try:
            config = TrainConfig.from_dict({"model": ctx.model_id or "webui", **dict(body.get("config") or {})})
            state = ctx.trainer.start(config, body.get("run_dir"), resume=bool(body.get("resume", False)))
        except (MedDiffError, ValueError, TypeError, FileNotFoundError) as exc:
            raise _user_error(exc) from exc
        return state.to_dict(with_losses=False)

    @router.post("/train/stop")
    def stop_training():
        return ctx.trainer.stop().to_dict(with_losses=False)

    @router.get("/train/status")
    def training_status(losses: bool = False):
        return ctx.trainer.state.to_dict(with_losses=losses)

    @router.post("/interpolate")
    def interpolate(body: Dict[str, Any] = Body(...)):
        """Healthy -> diseased grid: ``{"healthy", "diseased", "k", "seed", "steps", "cfg_scale", "width", "height"}``."""
        from medical_diffusion.generation.interpolation import Frame, frame_label, frames_grid, interpolation_prompts
        from medical_diffusion.ui.rendering import render_prompts

        try:
            healthy, diseased = str(body["healthy"]), str(body["diseased"])
            sample = {k: body[k] for k in ("steps", "cfg_scale", "width", "height", "negative_prompt") if k in body}
            items = interpolation_prompts(healthy, diseased, int(body.get("k", 5)))
            images, seed = render_prompts(ctx, [(p, None) for _, p in items], seed=int(body.get("seed", 0)), **sample)
            frames = [Frame(t, p, frame_label(t), image) for (t, p), image in zip(items, images)]
        except KeyError as exc:
            raise HTTPException(status_code=400, detail=f"missing field {exc.args[0]!r}") from exc
        except (MedDiffError, ValueError, TypeError) as exc:
            raise _user_error(exc) from exc
        buffer = io.BytesIO()
        frames_grid(frames, title=f"{healthy} -> {diseased}").save(buffer, format="PNG")
        return {"prompts": [f.prompt for f in frames], "labels": [f.label for f in frames], "seed": seed,
                "grid_png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}

    @router.post("/fid")
    def fid(body: Dict[str, Any] = Body(...)):
        """FID/MFID: ``{"real", "generated", "extractor", "weights", "mode", "bootstrap_reps", "resample", "seed"}``."""
        from medical_diffusion.evaluation.fid import compute_fid

        try:
            weights = body.get("weights")
            with ctx.work_lock():
                result = compute_fid(
                    ctx.path(body["real"], must_exist=True), ctx.path(body["generated"], must_exist=True),
                    extractor=body.get("extractor", "inception"),
                    weights=str(ctx.path(weights, must_exist=True)) if weights else None,
                    mode=body.get("mode", "paper"), bootstrap_reps=int(body.get("bootstrap_reps", 0)),
                    resample=body.get("resample", "both"), seed=int(body.get("seed", 0)),
                    cache_dir=ctx.work_dir / "feature_cache")
        except KeyError as exc:
            raise HTTPException(status_code=400, detail=f"missing field {exc.args[0]!r}") from exc
        except (MedDiffError, ValueError, TypeError, FileNotFoundError) as exc:
            raise _user_error(exc) from exc
        return result.to_dict()

    return router


def has_routes(app) -> bool:
    """True when the app already serves this API (registration must happen once)."""
    return any(getattr(route, "path", "").startswith(PREFIX) for route in app.routes)
