"""torch.compile of the model forward, backed by the content-addressed compile cache.

Contract (for the model runner):

    compiled = compile_model(model, engine_config, device)

- Call it after the model is loaded and an attention backend is bound (every Attention layer has
  `.impl`), before or after the KV cache is allocated: the attention op reads `layer.kv_cache`
  at call time, and the warm-up forward run here binds a 1-block scratch cache where none is
  bound yet, writes no KV slot (slot_mapping = -1), and unbinds it.
- It returns a `CompiledModel` (an nn.Module). `compiled(input_ids, positions)` has the contract
  of `model(input_ids, positions)`: int64 [T] each -> hidden states [T, hidden], run inside
  `set_forward_context(metadata)` and, like the runner, under torch.inference_mode() with
  inputs created under it (inference tensors); another grad mode, or inputs that are normal
  tensors (their dispatch keys differ, and dynamo guards on them), cost one more trace, compiled
  lazily outside the compile cache. Every T >= 1 runs the same compiled graph (the token
  dimension is symbolic and attention is an opaque custom op that reads the per-step metadata
  itself), so batch sizes never recompile. (Only model code dynamo cannot trace with a symbolic
  unbacked T falls back to backed shapes: T=1 then has a second graph, also compiled here, and a
  Python branch on T compiles more lazily, into inductor's default cache.) All other attributes
  (compute_logits, config, ...) are the wrapped model's; the model is a submodule, so
  `.modules()` still finds the Attention layers. CUDA graphs can be captured around `compiled(...)` like around the eager model.
- Compilation happens here (the warm-up), not at the first step. `compiled.compile_info` says
  what happened; one INFO line "torch.compile took X s (compile cache hit|miss ...)" is logged.
- A corrupt, truncated or mismatching cache entry is logged with its path, discarded and
  rebuilt; it never fails the call. A model that dynamo cannot trace as one graph raises
  (fullgraph=True): fix the model or run with enforce_eager=True.
- Intended once per model per process; every call traces afresh (its own backend instance), so
  an entry published by a call always holds the artifacts of that call's compilation.

Caching: the key (cache_key.py) covers everything that can change compiled code; the entry
(store.py) holds inductor's portable artifacts (torch.compiler.save_cache_artifacts), and
inductor's own cache dir is isolated per key (TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR point
into the entry while compiling). On a hit the artifacts are loaded into that dir first, so
inductor finds every graph in its cache and compiles nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import threading
import time
import types
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from kvflow.attention.backend import AttentionMetadata
from kvflow.attention.layer import Attention, bind_attention_layers
from kvflow.compilation.cache_key import compute_factors, diff_factors, key_of
from kvflow.compilation.eager import disable_registered
from kvflow.compilation.store import CompileStore, Entry
from kvflow.forward_context import GLOBAL, set_forward_context

logger = logging.getLogger("kvflow")

# From here on torch.compile can trace: eager_only functions become disabled ones (eager.py).
disable_registered()

# Bump when the way we compile or lay out entries changes: it is a key factor.
COMPILE_FORMAT = 2  # 2: the warm-up's inputs are inference tensors (the runner's kind)
_WARMUP_TOKENS = 8


def _deterministic_options() -> dict[str, Any]:
    """Inductor config patches: its deterministic mode, where this torch has it.

    Without it inductor benchmarks several block sizes of a generated reduction at the first
    launch and keeps the fastest. Sizes sum in different orders, so a fresh compile and a
    restarted process that loads the same entry could keep different ones and round
    differently: on an H200 a restarted engine's logprob differed from the first engine's in
    the last bit (docs/performance.md, session 16). Deterministic mode keeps only configs of
    one reduction order and skips numerics-changing benchmarks; pointwise kernels, which
    round alike under any tile, still autotune."""
    import torch._inductor.config as inductor_cfg
    return {"deterministic": True} if hasattr(inductor_cfg, "deterministic") else {}


_INDUCTOR_OPTIONS: dict[str, Any] = _deterministic_options()  # inductor config patches

# The token dimension T of input_ids / positions is symbolic in one of two ways:
#  "unbacked": one graph for every T >= 1, T=1 included. Needs mark_unbacked to tie both inputs
#              to one symbol (shape_id); a traced torch._check(T >= 1) lets shape arithmetic
#              such as reshape(T, -1, D) prove T != 0 (torch 2.11's mark_unbacked has no `min`).
#              Some model code (a branch on T) cannot be traced this way, so it is tried first
#              and ...
#  "backed":   ... the fallback: mark_dynamic, where dynamo specialises T=1 into a second graph
#              (warm-up compiles both).
# The mode a build ended up with is recorded in its entry, and a hit uses it directly.
try:
    from torch._dynamo.decorators import mark_dynamic, mark_unbacked
    _UNBACKED_PARAMS = inspect.signature(mark_unbacked).parameters
except ImportError:
    from torch._dynamo import mark_dynamic
    _UNBACKED_PARAMS = {}
_HAS_UNBACKED = "shape_id" in _UNBACKED_PARAMS
TOKEN_DIM_POLICY = "unbacked|backed" if _HAS_UNBACKED else "backed"

_HAS_ARTIFACTS_API = (hasattr(torch.compiler, "save_cache_artifacts")
                      and hasattr(torch.compiler, "load_cache_artifacts"))
# compile_model mutates process environment (the inductor cache dir): one at a time.
_COMPILE_LOCK = threading.RLock()


@dataclass(frozen=True)
class CompileInfo:
    key: str
    entry_dir: str
    cache_hit: bool              # a valid kvflow entry was used
    seconds: float
    graphs_compiled: int         # inductor FX-graph cache misses (graphs compiled from scratch)
    graphs_loaded: int           # inductor FX-graph cache hits
    token_dim: str               # "unbacked" (one graph for all T) or "backed" (T=1 apart)


class CompiledModel(nn.Module):
    """The compiled forward plus the wrapped model (see the module doc for the contract)."""

    def __init__(self, model: nn.Module, compiled_forward, token_dim: str):
        super().__init__()
        self.model = model
        self._compiled_forward = compiled_forward
        self.token_dim = token_dim
        self.compile_info: Optional[CompileInfo] = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mark_token_dim(input_ids, positions, self.token_dim)
        return self._compiled_forward(input_ids, positions)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None:
                raise
            return getattr(model, name)


def mark_token_dim(input_ids: torch.Tensor, positions: torch.Tensor, token_dim: str) -> None:
    """Declare dim 0 (tokens) of both inputs symbolic. Only read when dynamo traces (a cheap
    attribute write otherwise); done on every call so a retrace can never specialise T."""
    if token_dim == "unbacked":
        mark_unbacked(input_ids, 0, shape_id="num_tokens")
        mark_unbacked(positions, 0, shape_id="num_tokens")
    else:
        mark_dynamic(input_ids, 0)
        mark_dynamic(positions, 0)


# ------------------------------------------------------------------------------ helpers
@contextlib.contextmanager
def inductor_cache_dir(path: str, triton_dir: str) -> Iterator[None]:
    """Point inductor's on-disk cache at `path` and triton's at `triton_dir` for the duration.
    (Not torch's temporary_cache_dir: that also clears in-memory caches, which are
    content-keyed and safe to keep.) Triton's cache is shared by all keys: triton keys it by
    kernel source, options and target itself, and its group files hold absolute paths, so it
    cannot live in an entry that is renamed into place; inductor's graphs carry their kernels
    anyway (bundled into its cache entries, and into the artifacts)."""
    os.makedirs(path, exist_ok=True)
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {n: os.environ.get(n) for n in names}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = triton_dir
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def _fresh_artifact_recording():
    """Record only this compilation's artifacts (not earlier ones of this process)."""
    try:
        from torch.compiler._cache import CacheArtifactManager
        return CacheArtifactManager.with_fresh_cache()
    except (ImportError, AttributeError):
        return contextlib.nullcontext()


def _save_artifacts() -> bytes:
    if not _HAS_ARTIFACTS_API:
        return b""
    saved = torch.compiler.save_cache_artifacts()
    return saved[0] if saved else b""


def _inductor_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters
    c = counters["inductor"]
    return c["fxgraph_cache_miss"], c["fxgraph_cache_hit"]


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (set, frozenset)):
        return sorted(repr(v) for v in obj)  # set order differs between processes
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def _torch_config_hash() -> str:
    """Inductor / AOTAutograd settings changed in code rather than through the environment.
    (Inductor's own cache keys cover them too; this is defence in depth.) Dynamo's config is
    left out: it only shapes the traced graph, which inductor's keys cover, and it holds
    runtime-only knobs (recompile limits, logging) that would split the cache for nothing."""
    import torch._functorch.config as functorch_cfg
    import torch._inductor.config as inductor_cfg
    snap = {m.__name__: m.save_config_portable() if hasattr(m, "save_config_portable") else None
            for m in (functorch_cfg, inductor_cfg)}
    text = json.dumps(_canonical(snap), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_hash(path: Optional[str]) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (OSError, TypeError):
        return None


def compile_factors_extra(model: nn.Module) -> dict[str, Any]:
    """Key factors that come from how we compile, not from the engine config."""
    impls = sorted({f"{type(m.impl).__module__}.{type(m.impl).__qualname__}"
                    for m in model.modules() if isinstance(m, Attention)})
    cls = type(model)
    return {
        # The model class and its file: kvflow's own are in the source hash already, this also
        # covers a model defined elsewhere (a plugin, a test).
        "model.class": f"{cls.__module__}.{cls.__qualname__}",
        "model.class_source": _file_hash(inspect.getsourcefile(cls)),
        "compile.format": COMPILE_FORMAT,
        "compile.options": {"backend": "inductor", "fullgraph": True, "token_dim": TOKEN_DIM_POLICY,
                            "inductor_options": _INDUCTOR_OPTIONS,
                            "warmup_tokens": _WARMUP_TOKENS},
        "compile.torch_config": _torch_config_hash(),
        "attention.impls": impls,
    }


# ------------------------------------------------------------------------------ compile
def _new_backend():
    """A distinct backend callable per compile: dynamo never reuses another call's compiled
    code for it (its backend-match guard), so each call really compiles into its own entry."""
    from torch._inductor.compile_fx import compile_fx

    def kvflow_inductor(gm, example_inputs):
        return compile_fx(gm, example_inputs, config_patches=dict(_INDUCTOR_OPTIONS))
    return kvflow_inductor


def _warm_up(compiled: CompiledModel, model: nn.Module, config, device: torch.device) -> None:
    """Run the compiled forward once per graph it needs, so compilation happens now."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    bs = config.cache.block_size
    scratch = [m for m in layers if m.kv_cache is None]
    for m in scratch:
        m.kv_cache = torch.zeros((2, 1, bs, m.num_kv_heads, m.head_dim),
                                 dtype=config.model.dtype, device=device)
    try:
        for t in ((_WARMUP_TOKENS,) if compiled.token_dim == "unbacked" else (_WARMUP_TOKENS, 1)):
            nb = -(-t // bs)
            md = AttentionMetadata(
                num_actual_tokens=t, max_query_len=t, max_seq_len=t,
                query_start_loc=torch.tensor([0, t], dtype=torch.int32, device=device),
                seq_lens=torch.tensor([t], dtype=torch.int32, device=device),
                block_table=torch.zeros((1, nb), dtype=torch.int32, device=device),
                slot_mapping=torch.full((t,), -1, dtype=torch.int64, device=device),
                query_start_loc_cpu=torch.tensor([0, t], dtype=torch.int32),
                seq_lens_cpu=torch.tensor([t], dtype=torch.int32), is_decode_only=t == 1,
                num_decode_reqs=int(t == 1))
            # Layers of other kinds (chunked local) get the same metadata: attention is an
            # opaque op to the compiler, and the warm-up's outputs are discarded.
            extra = {m.attn_kind: md for m in layers if m.attn_kind != GLOBAL}
            with torch.inference_mode():
                # Inputs made under inference_mode, like the runner's: dynamo guards on the
                # inputs' dispatch keys, and a normal tensor would trace a second graph.
                ids = torch.zeros(t, dtype=torch.int64, device=device)
                pos = torch.arange(t, dtype=torch.int64, device=device)
                with set_forward_context(md, extra):
                    compiled(ids, pos)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        for m in scratch:
            m.kv_cache = None


def _traced_forward(model: nn.Module):
    def forward(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # Traced: gives the token count the range [1, inf) (a no-op for a backed size).
        torch._check(input_ids.shape[0] >= 1)
        return model(input_ids, positions)
    # A code object of its own (an identical copy) per compile: dynamo keeps compiled entries,
    # and counts its recompile limit (8), per code object. With the one shared `forward` code,
    # every compile_model of the process (each engine built, each model) added an entry to it,
    # and the 9th failed hard under fullgraph=True ("recompile limit exceeded"). The copy's
    # entries die with the CompiledModel. Same bytecode, so inductor's content-keyed caches
    # (and so the compile cache) are unaffected.
    code = forward.__code__.replace()
    return types.FunctionType(code, forward.__globals__, forward.__name__, forward.__defaults__,
                              forward.__closure__)


def _compile_and_warm(model: nn.Module, config, device: torch.device,
                      token_dim: Optional[str]) -> CompiledModel:
    """token_dim: the mode an entry recorded, or None to try unbacked, then backed."""
    modes = [token_dim] if token_dim else (["unbacked", "backed"] if _HAS_UNBACKED else ["backed"])
    for i, mode in enumerate(modes):
        fn = torch.compile(_traced_forward(model), backend=_new_backend(), fullgraph=True,
                           dynamic=False)
        compiled = CompiledModel(model, fn, mode)
        try:
            _warm_up(compiled, model, config, device)
            return compiled
        except Exception as e:  # noqa: BLE001 - the next mode decides; the last one re-raises
            if i == len(modes) - 1:
                raise
            logger.info("the model cannot be traced with an unbacked token count (%s); using "
                        "backed dynamic shapes, where T=1 compiles into a graph of its own",
                        _first_lines(e, 1))
    raise AssertionError("unreachable")


def _first_lines(e: BaseException, n: int) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: " + " | ".join(lines[:n])[:400]


def _from_entry(store: CompileStore, entry: Entry, model, config,
                device) -> Optional[CompiledModel]:
    """Compile with the entry's artifacts loaded; None (logged) if that fails."""
    try:
        with inductor_cache_dir(entry.inductor_dir, store.triton_dir):
            if entry.artifacts and _HAS_ARTIFACTS_API:
                torch.compiler.load_cache_artifacts(entry.artifacts)
            token_dim = entry.manifest.get("meta", {}).get("token_dim")
            if token_dim not in ("unbacked", "backed") or (token_dim == "unbacked"
                                                           and not _HAS_UNBACKED):
                token_dim = None
            return _compile_and_warm(model, config, device, token_dim)
    except Exception as e:  # noqa: BLE001 - any failure of a cached entry means: rebuild it
        logger.warning("compile cache: compiling from entry %s failed (%s); discarding it, the "
                       "model will be recompiled", entry.path, _first_lines(e, 3))
        return None


def _build(store: CompileStore, key: str, factors: dict, model, config, device):
    """Compile into the key's entry and publish it (caller holds the key's lock)."""
    inductor_dir = store.begin_build(key)
    t0 = time.perf_counter()
    try:
        with inductor_cache_dir(inductor_dir, store.triton_dir), _fresh_artifact_recording():
            compiled = _compile_and_warm(model, config, device, None)
            artifacts = _save_artifacts()
        meta = {"architecture": config.model.architecture, "model": config.model.model,
                "dtype": str(config.model.dtype), "device": factors.get("device.name",
                                                                        device.type),
                "torch": torch.__version__, "compile_seconds": round(time.perf_counter() - t0, 2),
                "artifacts_api": _HAS_ARTIFACTS_API, "token_dim": compiled.token_dim}
        entry = store.publish(key, factors, artifacts, meta)
    except BaseException:
        store.abort_build(key)
        raise
    return compiled, entry


def _compile_cached(store: CompileStore, key: str, factors: dict, model, config, device):
    """(compiled model, entry, cache hit): from a valid entry if there is one, else built and
    published. Readers take no lock; only building and discarding happen under the key's lock,
    after looking again (another process may have built or repaired the entry meanwhile)."""
    entry = store.load(key, factors)
    if entry is not None:
        compiled = _from_entry(store, entry, model, config, device)
        if compiled is not None:
            return compiled, entry, True
    failed = entry.manifest.get("created") if entry is not None else None
    with store.lock(key):
        entry = store.load(key, factors, repair=True)
        # Retry only an entry published since ours failed; the one that failed is discarded.
        if entry is not None and entry.manifest.get("created") != failed:
            compiled = _from_entry(store, entry, model, config, device)
            if compiled is not None:
                return compiled, entry, True
        compiled, entry = _build(store, key, factors, model, config, device)  # discards first
        return compiled, entry, False


def _check_key_stable(factors: dict, engine_config, device, model) -> None:
    """A factor that compiling itself changes (an environment variable torch sets on first use,
    say) would make every later compile of this process miss: say so, naming it."""
    after = compute_factors(engine_config, device, compile_factors_extra(model))
    if key_of(after) != key_of(factors):
        logger.warning("compile cache: key factors changed while compiling (%s); later compiles "
                       "in this process will miss. If they cannot change compiled code, add them "
                       "to kvflow/compilation/cache_key.py's ignore lists",
                       diff_factors(factors, after))


def compile_model(model: nn.Module, engine_config, device: Optional[torch.device] = None, *,
                  cache_dir: Optional[str] = None) -> CompiledModel:
    """Compile `model`'s forward through the compile cache; see the module doc for the contract.
    cache_dir: the store root (default $KVFLOW_CACHE_DIR/compile)."""
    device = torch.device(device) if device is not None else engine_config.device
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers or any(m.impl is None for m in layers):
        raise ValueError("compile_model: bind an attention backend to every Attention layer first "
                         "(ModelRunner.bind_attention_backend)")
    with _COMPILE_LOCK:
        bind_attention_layers(model)
        factors = compute_factors(engine_config, device, compile_factors_extra(model))
        key = key_of(factors)
        store = CompileStore(cache_dir)
        t0 = time.perf_counter()
        miss0, hit0 = _inductor_counts()
        compiled, entry, cache_hit = _compile_cached(store, key, factors, model, engine_config,
                                                     device)
        seconds = time.perf_counter() - t0
        miss1, hit1 = _inductor_counts()
        _check_key_stable(factors, engine_config, device, model)
    info = CompileInfo(key, entry.path, cache_hit, seconds,
                       miss1 - miss0, hit1 - hit0, compiled.token_dim)
    compiled.compile_info = info
    logger.info("torch.compile took %.2f s (compile cache %s, key %s at %s; inductor compiled %d "
                "graph(s), loaded %d from cache)", seconds, "hit" if cache_hit else "miss", key,
                info.entry_dir, info.graphs_compiled, info.graphs_loaded)
    if cache_hit and info.graphs_compiled:
        logger.warning("compile cache: entry %s was valid but inductor still compiled %d graph(s)",
                       info.entry_dir, info.graphs_compiled)
    return compiled
