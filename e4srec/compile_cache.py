"""A compile cache shared by runs and processes: torch.compile's on-disk caches in one folder.

A training job compiles E4SRec's step (or its decoder layer, ``compile_scope="layers"``) again in each
fresh process. torch keeps what it compiled in modular on-disk caches, all under
``TORCHINDUCTOR_CACHE_DIR`` (torch 2.13, "Compile Time Caching in torch.compile" and "Compile Time
Caching Configuration", docs.pytorch.org/tutorials/recipes/torch_compile_caching_tutorial.html and
torch_compile_caching_configuration_tutorial.html):

- ``FXGraphCache`` (``TORCHINDUCTOR_FX_GRAPH_CACHE=1``): Inductor's compiled graphs, keyed by the
  graph, its input shapes and strides, and the configuration; with it the Triton kernels' code and
  the autotuning results (``autotune_local_cache``, on by default) beside them;
- ``AOTAutogradCache`` (``TORCHINDUCTOR_AUTOGRAD_CACHE=1``, needs the FX graph cache): the joint
  forward/backward graphs, so that a hit skips AOTAutograd's tracing as well;
- Triton's own kernel cache (``TRITON_CACHE_DIR``; Inductor's default is
  ``<TORCHINDUCTOR_CACHE_DIR>/triton/<device>``; set here to ``<folder>/triton``: Triton keys its
  entries by the GPU's target, so jobs on different GPUs share it).

Dynamo still traces the Python code in every process and CUDA graphs are still recorded; what a
warm cache saves is Inductor's code generation, the C++/Triton compilation and autotuning. The whole
step (``compile_scope="step"``) holds autocast regions, which torch 2.13's AOTAutogradCache does not
take ("Bypassing autograd cache due to: Unsupported call_function target _enter_autocast"): there the
FX graph cache hits and AOTAutograd traces again; the regionally compiled layer hits both.

:func:`configure` points these caches at one folder and switches them on (or off), before the first
compile. ``e4srec train --compile-cache DIR`` calls it first thing, before torch is imported, so it
holds for ``e4srec train`` run by hand and for every process of ``accelerate launch ... -m
e4srec.cli train`` (each process parses the same arguments); it sets the environment variables
(inherited by Inductor's compile workers, which read ``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR``) and, where torch's config modules were already imported (they read these
variables on import), their settings as well.

Sharing the folder between concurrent jobs is what these caches are built for: every entry is written
to a temporary file named after the writing process and thread and renamed into place
(``torch._inductor.codecache.write_atomic``), readers skip those temporary files, an entry's name is
the hash of its content (two processes writing the same graph write the same file), compilations of
the same C++ module are serialised by file locks under ``<folder>/locks``, and Triton's
``FileCacheManager`` also writes a temporary file and renames it. A hit is used only for the same
torch and Triton versions and (on a GPU) the same device type; anything else misses and compiles.

The portable "Mega-Cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``) was
not chosen: it collects one process's artifacts into one blob that must be saved after the compile and
loaded before the next one, so concurrent jobs would overwrite one another's blobs; the modular caches
merge one entry at a time. (It remains the way to ship a cache to machines without a shared folder.)

A cached graph is the code a fresh compile generates, so the cache changes no numbers on the CPU
(tests/test_compile_cache.py: same losses and scores, cache off, cold and warm). On a GPU a fresh
compile may autotune to another kernel configuration than the cached one; a warm cache repeats the
first compile's choice.

:func:`report` is what a run records (``run.json``, key ``compile_cache``): whether the cache was on,
its folder, the effective torch settings, this process's cache counters
(``torch._dynamo.utils.counters``) and its compile seconds (Dynamo's ``entire_frame_compile`` plus
``entire_backward_compile``, as ``torch._dynamo.utils.calculate_time_spent`` adds them up).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ENVIRONMENT = "E4SREC_COMPILE_CACHE"  # the folder the `e4srec` command configures where no option names one ("": off)
# the variables configure() sets (and report() reads back)
CACHE_VARIABLES = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE",
                   "TORCHINDUCTOR_AUTOGRAD_CACHE")
FX_COUNTERS = ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")
AOT_COUNTERS = ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass", "autograd_cache_saved",
                "autograd_cache_guard_miss")

_state: dict = {"configured": False, "enabled": None, "folder": None}


def environment(folder: str | os.PathLike | None) -> dict[str, str]:
    """The variables for a cache in ``folder`` (absolute); None or "": the persistent caches off."""
    if not folder:
        return {"TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0"}
    folder = Path(folder).expanduser().resolve()
    return {"TORCHINDUCTOR_CACHE_DIR": str(folder), "TRITON_CACHE_DIR": str(folder / "triton"),
            "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def configure(folder: str | os.PathLike | None) -> dict:
    """Point torch.compile's FX graph, AOTAutograd, autotuning and Triton caches at ``folder`` and
    switch them on; None or "" switches the FX graph and AOTAutograd caches off (every compile starts
    from nothing, and nothing is written to a shared folder). Call it before the first compile (best:
    before torch is imported). Idempotent: calling it again with the same folder changes nothing.
    Returns :func:`settings`."""
    enabled = bool(folder)
    variables = environment(folder)
    os.environ.update(variables)  # the folder itself is made by the first compile
    # torch's config modules read these variables when imported; when they already were (transformers
    # and accelerate import them), set the settings too. An environment variable that was set before
    # that import still wins over them, so settings() reports what is in effect.
    inductor = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.fx_graph_cache = enabled
    functorch = sys.modules.get("torch._functorch.config")
    if functorch is not None:
        functorch.enable_autograd_cache = enabled
    _state.update(configured=True, enabled=enabled, folder=variables.get("TORCHINDUCTOR_CACHE_DIR"))
    return settings()


def settings() -> dict:
    """The cache settings in effect in this process (torch's config where imported, else the environment)."""
    def flag(module: str, name: str, variable: str):
        config = sys.modules.get(module)
        if config is not None:
            return bool(getattr(config, name))
        value = os.environ.get(variable)
        return None if value is None else value == "1"

    return {"configured": _state["configured"], "enabled": _state["enabled"], "folder": _state["folder"],
            "fx_graph_cache": flag("torch._inductor.config", "fx_graph_cache", "TORCHINDUCTOR_FX_GRAPH_CACHE"),
            "autograd_cache": flag("torch._functorch.config", "enable_autograd_cache", "TORCHINDUCTOR_AUTOGRAD_CACHE"),
            "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "triton_cache_dir": os.environ.get("TRITON_CACHE_DIR")}


def counters() -> dict:
    """This process's compile-cache counters so far (zeros before any compile)."""
    if "torch._dynamo" not in sys.modules:
        return {name: 0 for name in (*FX_COUNTERS, *AOT_COUNTERS)}
    from torch._dynamo.utils import counters as dynamo_counters

    found = {name: int(value) for group in ("inductor", "aot_autograd") for name, value in dynamo_counters[group].items()
             if "cache" in name}  # the named ones and any other cache counter this torch keeps
    return {**{name: 0 for name in (*FX_COUNTERS, *AOT_COUNTERS)}, **found}


def compile_seconds() -> float:
    """Seconds this process spent in torch.compile so far: Dynamo's frame compiles (tracing, AOTAutograd,
    Inductor, loading cached graphs) and the backward graphs compiled at the first backward."""
    if "torch._dynamo" not in sys.modules:
        return 0.0
    from torch._dynamo.utils import calculate_time_spent

    spent = calculate_time_spent()
    return float(spent.get("entire_frame_compile", 0.0) + spent.get("entire_backward_compile", 0.0))


def report() -> dict:
    """What a run records: :func:`settings`, :func:`counters` and :func:`compile_seconds`."""
    return {**settings(), "counters": counters(), "compile_seconds": compile_seconds(),
            "what": "counters and compile seconds of this process (the main one under several); "
                    "compile_seconds: Dynamo's entire_frame_compile + entire_backward_compile"}
