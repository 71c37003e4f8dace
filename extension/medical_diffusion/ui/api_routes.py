"""HTTP API of the extension, ``/medical-diffusion/v1/...``: training, interpolation, FID.

The same router serves the webui (``on_app_started``, behind its API auth) and ``meddiff ui``
(behind :mod:`medical_diffusion.ui.api_guard`). Bodies are JSON objects sent as
``application/json`` (415 otherwise); a missing field or other user error answers 400 with the
message, a value outside its limit (:mod:`medical_diffusion.limits`) 422, a busy trainer 409.
Every path goes through the allowed-roots resolver. Long work runs in a thread and is stopped
between sampler steps when the client disconnects.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import threading
from typing import Any, Callable, Sequence, TypeVar

from fastapi import APIRouter, HTTPException, Request

from medical_diffusion.errors import Cancelled, MedDiffError, OutOfRangeError
from medical_diffusion.ui.api_guard import read_json_object
from medical_diffusion.ui.api_models import BodyError, FidRequest, InterpolateRequest, TrainRequest, parse_body
from medical_diffusion.ui.context import UIContext, evaluation_device
from medical_diffusion.ui.stopping import stopping_progress

PREFIX = "/medical-diffusion/v1"
#: how often a running job looks whether its client is still there (seconds)
DISCONNECT_POLL_S = 0.25

log = logging.getLogger(__name__)
T = TypeVar("T")
#: what a route answers with 400 and its message (anything else is a bug: 500 with its traceback logged)
USER_ERRORS = (MedDiffError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError)


def _user_error(route: str, exc: Exception) -> HTTPException:
    """400 (422 for a value out of range) with the message; the server log gets one line, no traceback."""
    message = str(exc) or exc.__class__.__name__
    log.warning("%s%s: %s", PREFIX, route, message)
    return HTTPException(status_code=422 if isinstance(exc, OutOfRangeError) else 400, detail=message)


async def _body(request: Request, model):
    data = await read_json_object(request)
    try:
        return parse_body(model, data)
    except BodyError as exc:
        log.warning("%s: %s", request.url.path, exc.message)
        raise HTTPException(status_code=exc.status, detail=exc.message) from None


async def wait_for_disconnect(request: Request, poll: float = DISCONNECT_POLL_S) -> None:
    """Return once the client has gone. The body is read by then, so ``receive()`` only ever answers
    ``http.disconnect``; this works behind the webui's ``BaseHTTPMiddleware``, where starlette 0.26's
    ``request.is_disconnected()`` never turns True (its cancelled receive loses the message). Without
    a usable ``receive`` it polls ``is_disconnected()``."""
    try:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                return
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - no receive channel: ask the request instead
        pass
    while not await request.is_disconnected():
        await asyncio.sleep(poll)


async def run_while_connected(request: Request, work: Callable[[threading.Event], T],
                              poll: float = DISCONNECT_POLL_S) -> T:
    """``work(stop)`` in a worker thread; when the client disconnects, ``stop`` is set (the work ends
    at its next sampler step with :class:`Cancelled`) and this waits for it to let go of the model."""
    stop = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, stop)
    gone = asyncio.ensure_future(wait_for_disconnect(request, poll))
    try:
        done, _ = await asyncio.wait({future, gone}, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            return future.result()
    finally:
        gone.cancel()
    stop.set()
    log.info("%s: the client has gone; stopping its job", request.url.path)
    try:
        await future
    except Exception:  # noqa: BLE001 - nobody is left to tell
        pass
    raise Cancelled("the client disconnected")


#: how a refusal of a prompt without embeddings says to ask for one
PLAIN_HINT = 'send "allow_plain_prompt": true to sample a prompt without embeddings'


def check_prompt_names(ctx: UIContext, prompts: Sequence[str], allow_plain: bool = False) -> None:
    """Refuse (:class:`~medical_diffusion.generation.prompts.UnknownEmbeddingError`, a 400) prompts with a
    part that names none of the embeddings in ``ctx.embeddings_dir``, naming those parts and the folder."""
    from medical_diffusion.generation import loading

    folder = ctx.embeddings_dir
    where = f"the embeddings folder {folder}" + ("" if folder.is_dir() else ", which does not exist")
    loading.check_prompt_names(prompts, folder, where=where, allow_plain=allow_plain, plain_hint=PLAIN_HINT)


def _interpolation_grid(ctx: UIContext, req: InterpolateRequest, stop: threading.Event) -> dict[str, Any]:
    from medical_diffusion.generation.interpolation import Frame, frame_label, frames_grid, interpolation_prompts
    from medical_diffusion.generation.sampling import resolve_seed
    from medical_diffusion.ui.rendering import render_prompts

    items = interpolation_prompts(req.healthy, req.diseased, req.k)
    check_prompt_names(ctx, [prompt for _, prompt in items], req.allow_plain_prompt)  # before any sampling
    seed = resolve_seed(req.seed)
    sample = req.sample_kwargs()
    sample["should_stop"] = stop.is_set  # the core sampler and the webui's txt2img stop within one step
    frames = []
    for t, prompt in items:  # one frame at a time: the model lock is free between frames
        if stop.is_set():
            raise Cancelled("stopped before the interpolation was finished")
        (image,), _ = render_prompts(ctx, [(prompt, None)], seed=seed, **sample)
        frames.append(Frame(t, prompt, frame_label(t), image))
    buffer = io.BytesIO()
    frames_grid(frames, title=f"{req.healthy} -> {req.diseased}").save(buffer, format="PNG")
    return {"prompts": [f.prompt for f in frames], "labels": [f.label for f in frames], "seed": seed,
            "grid_png_base64": base64.b64encode(buffer.getvalue()).decode("ascii")}


def make_router(ctx: UIContext, dependencies: Sequence = ()) -> APIRouter:
    router = APIRouter(prefix=PREFIX, dependencies=list(dependencies), tags=["Medical Diffusion"])

    @router.post("/train")
    async def start_training(request: Request):
        """Start a run: ``{"config": {TrainConfig fields}, "run_dir": str?, "resume": bool?,
        "replace_published": bool?}``; with ``resume`` the config may hold only what changes (steps, learning
        rate ...); ``replace_published`` lets the final embedding replace a different one of its name in the
        embeddings folder (refused otherwise, before training)."""
        req = await _body(request, TrainRequest)
        if ctx.trainer.running:
            raise HTTPException(status_code=409, detail=f"a training run ({ctx.trainer.state.name}) is already going")
        config = dict(req.config)
        if not req.resume:
            config.setdefault("model", ctx.model_id or "webui")
        try:
            state = ctx.trainer.start(config, req.run_dir, resume=req.resume, replace_published=req.replace_published)
        except MedDiffError as exc:
            raise _user_error("/train", exc) from exc
        return state.to_dict(with_losses=False)

    @router.post("/train/stop")
    def stop_training():
        return ctx.trainer.stop().to_dict(with_losses=False)

    @router.get("/train/status")
    def training_status(losses: bool = False):
        """The run's state: step, loss, ``val_loss``, ``best_step``/``best_val_loss`` (with validation), the
        ``best``/``ema`` files once finished; ``?losses=true`` adds ``losses`` and ``val_losses``."""
        return ctx.trainer.state.to_dict(with_losses=losses)

    @router.post("/interpolate")
    async def interpolate(request: Request):
        """Healthy -> diseased grid: ``{"healthy", "diseased", "k", "seed", "steps", "cfg_scale", "width", "height",
        "negative_prompt", "allow_plain_prompt"}``. A name that is not in the embeddings folder answers 400
        naming it and the folder, unless ``allow_plain_prompt``."""
        req = await _body(request, InterpolateRequest)
        try:
            return await run_while_connected(request, lambda stop: _interpolation_grid(ctx, req, stop))
        except USER_ERRORS as exc:
            raise _user_error("/interpolate", exc) from exc

    @router.post("/fid")
    async def fid(request: Request):
        """FID/MFID: ``{"real", "generated", "extractor", "weights", "mode", "bootstrap_reps", "resample", "seed"}``."""
        req = await _body(request, FidRequest)

        def work(stop: threading.Event):
            from medical_diffusion.evaluation.fid import compute_fid

            real = ctx.path(req.real, must_exist=True, label="real images")
            generated = ctx.path(req.generated, must_exist=True, label="generated images")
            weights = str(ctx.path(req.weights, must_exist=True, kind="file", label="weights")) if req.weights else None
            with ctx.work_lock():
                if stop.is_set():
                    raise Cancelled("the client disconnected")
                return compute_fid(real, generated, extractor=req.extractor, weights=weights, mode=req.mode,
                                   bootstrap_reps=req.bootstrap_reps, resample=req.resample, seed=req.seed,
                                   cache_dir=ctx.work_dir / "feature_cache", device=evaluation_device(ctx),
                                   progress=stopping_progress(None, stop.is_set)).to_dict()

        from medical_diffusion.evaluation.weights import MissingWeightsError

        try:
            return await run_while_connected(request, work)
        except MissingWeightsError as exc:
            raise _user_error("/fid", exc.with_hint("or send its path as 'weights'")) from exc
        except USER_ERRORS as exc:
            raise _user_error("/fid", exc) from exc

    return router


def has_routes(app) -> bool:
    """True when the app already serves this API (registration must happen once)."""
    return any(getattr(route, "path", "").startswith(PREFIX) for route in app.routes)
