"""The Ray executor: each stage a Ray task, the graph as ObjectRef arguments.

A task gets its inputs' statuses as arguments (Ray starts it once they are done) and returns its own;
a failed input makes it return ``blocked`` without working. Stages that use a GPU ask for
``num_gpus=1`` when the cluster has GPUs. Outputs go to the experiment folder, which must be on a
path every node sees (a shared file system). This is the only module that imports Ray.
"""

from __future__ import annotations

from typing import Callable

from medical_diffusion.errors import MedDiffError


def _pydantic_hint() -> str:
    """Recent Ray refuses pydantic 1 in its node processes; the ui extra pins pydantic 1 for gradio 3.41."""
    try:
        import pydantic
    except ImportError:
        return ""
    if str(getattr(pydantic, "VERSION", "2")).startswith("1."):
        return (f" (this environment has pydantic {pydantic.VERSION}, which the ui extra pins for gradio 3.41 and "
                "Ray 2.56 and later refuse; install the cluster extra (ray<2.56), or use an environment without the ui "
                "extra)")
    return ""


def _stage_task(spec: dict, *inputs: dict) -> dict:
    bad = [i["id"] for i in inputs if i.get("status") in ("failed", "blocked")]
    if bad:
        return {"id": spec["id"], "status": "blocked", "error": f"needs {', '.join(bad)}"}
    from medical_diffusion.experiment.stages import run_stage

    return run_stage(spec)


def run_on_ray(specs: list[dict], address: str | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """Submit every spec as a task (in topological order) and collect the statuses as they finish."""
    try:
        import ray
    except ImportError:
        raise MedDiffError("the ray executor needs Ray: pip install 'sd-webui-medical-diffusion[cluster]'") from None
    from tqdm import tqdm

    try:  # Ray's serialisers import its pydantic shim in every process; recent Ray refuses pydantic 1 there
        import ray._common.pydantic_compat  # noqa: F401
    except ImportError as exc:
        raise MedDiffError(f"Ray {ray.__version__} cannot run here: {exc}{_pydantic_hint()}") from None
    except Exception:  # noqa: BLE001 - older Ray without the shim
        pass
    started_here = False
    if not ray.is_initialized():
        try:
            ctx = ray.init(address=address, log_to_driver=True)
        except Exception as exc:  # noqa: BLE001 - Ray raises plain Exceptions for a node that did not start
            raise MedDiffError(f"could not {'connect to Ray at ' + address if address else 'start a local Ray'}: "
                               f"{str(exc).splitlines()[0]}{_pydantic_hint()}") from None
        started_here = True
        url = getattr(ctx, "dashboard_url", None)
        if url:
            echo(f"Ray dashboard: http://{url}")
    try:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        remote = ray.remote(_stage_task)
        refs: dict[str, object] = {}
        for spec in specs:
            inputs = [refs[d] for d in spec["dep_order"] if d in refs]
            opts = {"num_cpus": 1, "num_gpus": 1 if spec.get("gpu") and has_gpus else 0, "max_retries": 0,
                    "name": spec["id"]}
            refs[spec["id"]] = remote.options(**opts).remote(spec, *inputs)
        echo(f"submitted {len(refs)} Ray task(s) ({'GPU stages ask for 1 GPU' if has_gpus else 'no GPUs in the cluster'})")
        statuses: dict[str, dict] = {}
        waiting = list(refs.values())
        with tqdm(total=len(waiting), desc="stages (ray)", unit="stage", dynamic_ncols=True) as bar:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                for ref in done:
                    try:
                        st = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a crashed worker is a failed stage
                        sid = next(k for k, v in refs.items() if v == ref)
                        st = {"id": sid, "status": "failed", "error": f"Ray task failed: {type(exc).__name__}: {exc}"}
                    statuses[st["id"]] = st
                    bar.write(f"{st['status']:>6}  {st['id']}")
                    bar.update(1)
        return [statuses[s["id"]] for s in specs]
    finally:
        if started_here:
            ray.shutdown()
