"""Sleep mode: give the device memory of the weights and the KV cache back between generation
phases (RL loops that train and generate on the same GPUs), and take it again on wake-up.

Owned by the Worker. State machine (per resource, woken independently by tag):

    weights:  "device"  --sleep(1)-->  "offloaded" (exact copy in CPU memory, pinned on CUDA)
              "device"  --sleep(2)-->  "discarded" (values gone; non-weight buffers backed up)
              "offloaded" --wake--> "device" (values restored exactly)
              "discarded" --wake--> "device" with every parameter *missing* until
                                    reload_weights() has written it (serving is refused)
    kv_cache: "device" --sleep--> "freed" --wake--> "device" (same num_blocks, zeroed)

Invariants:
- Parameter *objects* never change: only `param.data` is swapped (to an empty tensor while
  asleep). Tied weights (lm_head = embed_tokens) are one Parameter, so they stay tied, and each
  parameter keeps its `weight_loader`.
- At level 2 every tensor the model holds besides its parameters — all `named_buffers()`,
  persistent or not (the rotary cos/sin table is a non-persistent buffer rebuilt only in
  __init__), plus any plain tensor attribute of a module — is backed up to CPU and restored on
  the weights wake. Nothing but checkpoint weights is ever "missing".
- CUDA graphs bake in the addresses of the weights, the KV cache and their own memory pool. The
  rule is simple: sleep drops the graphs (their pool is freed with them), and they are
  re-captured once both weights and KV cache are back on the device. reload_weights() copies
  into the existing storage (addresses unchanged), so it needs no re-capture.
"""
from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Iterable, Optional

import torch

from kvflow.gc_heap import full_collect

if TYPE_CHECKING:  # pragma: no cover
    from kvflow.worker.worker import Worker

logger = logging.getLogger("kvflow")

TAGS = ("weights", "kv_cache")
# Attributes that are engine state, not model state: the KV cache has its own life cycle.
_NOT_MODEL_STATE = ("kv_cache",)


class SleepManager:
    def __init__(self, worker: "Worker"):
        # Weakly: the worker owns this manager, and a cycle would leave a dropped worker (and
        # its model) to the cyclic collector, which never sees the frozen startup heap
        # (kvflow/gc_heap.py).
        self._worker = weakref.ref(worker)
        self.level: Optional[int] = None
        self.weights_state = "device"
        self.kv_state = "device"
        self._cpu_params: dict[str, torch.Tensor] = {}   # level 1
        self._cpu_state: dict[str, torch.Tensor] = {}    # level 2: buffers + tensor attributes
        self._num_blocks = 0
        self._shapes: dict[str, torch.Size] = {}         # parameter shapes, for a level-2 wake
        # Parameter names not yet written by reload_weights after a level-2 wake.
        self.missing: set[str] = set()
        self.last_freed_bytes = 0

    # ------------------------------------------------------------------ views
    @property
    def worker(self) -> "Worker":
        return self._worker()

    @property
    def is_sleeping(self) -> bool:
        return self.weights_state != "device" or self.kv_state != "device"

    def serving_error(self) -> Optional[str]:
        """Why the model cannot run a step now (None when it can)."""
        if self.is_sleeping:
            asleep = [t for t, s in (("weights", self.weights_state), ("kv_cache", self.kv_state))
                      if s != "device"]
            return f"the engine is sleeping ({', '.join(asleep)} not on the device); call wake_up() first"
        if self.missing:
            return (f"the weights were discarded by sleep(level=2) and {len(self.missing)} "
                    f"parameters (e.g. {sorted(self.missing)[0]!r}) have not been reloaded; call "
                    "reload_weights() before serving")
        return None

    def _device(self) -> torch.device:
        return self.worker.device

    def _model(self):
        return self.worker.model

    # ------------------------------------------------------------------ model state
    def _extra_tensors(self):
        """(name, module, attr) of every non-parameter tensor the model holds: registered
        buffers (persistent or not) and plain tensor attributes."""
        seen: set[int] = set()
        for mod_name, mod in self._model().named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for attr, t in list(mod._buffers.items()):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    yield prefix + attr, mod, attr
            for attr, t in list(vars(mod).items()):
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) \
                        and attr not in _NOT_MODEL_STATE and id(t) not in seen:
                    seen.add(id(t))
                    yield prefix + attr, mod, attr

    def _empty_like(self, t: torch.Tensor) -> torch.Tensor:
        return torch.empty(0, dtype=t.dtype, device=t.device)

    # ------------------------------------------------------------------ sleep
    def sleep(self, level: int) -> int:
        """Release weights (offload or discard) and the KV cache. Returns the bytes released
        (measured free device memory on CUDA; tensor sizes elsewhere)."""
        if level not in (1, 2):
            raise ValueError(f"level: must be 1 or 2, got {level!r}")
        if self.is_sleeping:
            raise RuntimeError("the engine is already sleeping; call wake_up() first")
        dev = self._device()
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize(dev)
            free_before = torch.cuda.mem_get_info(dev)[0]
        released = 0
        # Graphs first: they hold the weights' and KV cache's addresses and their own pool.
        self.worker.runner.drop_cuda_graphs()
        model = self._model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                released += p.numel() * p.element_size()
                self._shapes[name] = p.shape
                if level == 1:
                    cpu = torch.empty(p.shape, dtype=p.dtype, device="cpu", pin_memory=cuda)
                    cpu.copy_(p.data, non_blocking=cuda)
                    self._cpu_params[name] = cpu
            if cuda:
                torch.cuda.synchronize(dev)  # the D2H copies must land before storage is freed
            if level == 2:
                # Parameters a checkpoint may legitimately omit (optional_in_checkpoint, e.g.
                # GPTQ g_idx) could never be reloaded: keep them, like buffers.
                for name, p in model.named_parameters():
                    if getattr(p, "optional_in_checkpoint", False):
                        self._cpu_state["param:" + name] = p.detach().to("cpu", copy=True)
                for name, mod, attr in self._extra_tensors():
                    t = getattr(mod, attr)
                    self._cpu_state[name] = t.detach().to("cpu", copy=True)
                    released += t.numel() * t.element_size()
                    t.data = self._empty_like(t)
            for _, p in model.named_parameters():
                p.data = self._empty_like(p)
        runner = self.worker.runner
        self._num_blocks = runner.kv_caches[0].shape[1] if runner.kv_caches else 0
        released += sum(c.numel() * c.element_size() for c in runner.kv_caches)
        runner.release_kv_cache()
        self.level, self.weights_state, self.kv_state = level, (
            "offloaded" if level == 1 else "discarded"), "freed"
        self.missing = set()
        full_collect()
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.empty_cache()
            released = torch.cuda.mem_get_info(dev)[0] - free_before
        self.last_freed_bytes = released
        logger.info("sleep(level=%d): released %.3f GiB of device memory", level, released / 2**30)
        return released

    # ------------------------------------------------------------------ wake
    def wake_up(self, tags: Optional[Iterable[str]] = None) -> None:
        tags = list(TAGS) if tags is None else list(tags)
        bad = [t for t in tags if t not in TAGS]
        if bad:
            raise ValueError(f"tags: unknown tag(s) {bad}; valid tags are {list(TAGS)}")
        if "weights" in tags and self.weights_state != "device":
            self._wake_weights()
        if "kv_cache" in tags and self.kv_state != "device":
            self.worker.runner.allocate_kv_cache(self._num_blocks)
            self.kv_state = "device"
        if not self.is_sleeping:
            self.level = None
            # Graphs captured now see the final addresses of weights and KV cache.
            if self.worker.use_cuda_graphs and self.worker.runner.graphs is None:
                self.worker.runner.capture_cuda_graphs()

    def _wake_weights(self) -> None:
        dev = self._device()
        model = self._model()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if self.weights_state == "offloaded":
                    p.data = self._cpu_params.pop(name).to(dev, non_blocking=dev.type == "cuda")
                else:  # discarded: storage only; values come from reload_weights()
                    p.data = torch.empty(self._shape_of(name), dtype=p.dtype, device=dev)
            if self.weights_state == "discarded":
                for name, mod, attr in self._extra_tensors():
                    getattr(mod, attr).data = self._cpu_state.pop(name).to(dev)
                self.missing = set()
                for name, p in model.named_parameters():
                    kept = self._cpu_state.pop("param:" + name, None)
                    if kept is not None:
                        p.data.copy_(kept)
                    else:
                        self.missing.add(name)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self._cpu_params.clear()
        self._cpu_state.clear()
        self.weights_state = "device"

    def _shape_of(self, name: str) -> torch.Size:
        return self._shapes[name]

    # ------------------------------------------------------------------ reload
    def reload_weights(self, weights=None) -> int:
        """Write new values into the (awake) parameters: None re-reads the checkpoint;
        otherwise an iterable of (checkpoint name, tensor), possibly a subset, possibly spread
        over several calls. Returns the number of parameters written."""
        from kvflow.models.loader import init_dummy_weights, iterate_safetensors, load_weights
        if self.weights_state != "device":
            raise RuntimeError("reload_weights: the weights are asleep; call "
                               "wake_up(tags=['weights']) first")
        model = self._model()
        cfg = self.worker.config.model
        if weights is None:
            if cfg.load_format == "dummy":
                init_dummy_weights(model, cfg.seed)
                loaded = {n for n, _ in model.named_parameters()}
            else:
                loaded = load_weights(model, iterate_safetensors(cfg.model))
        else:
            loaded = load_weights(model, weights, strict=False)
        self.missing -= loaded
        if self._device().type == "cuda":
            torch.cuda.synchronize(self._device())
        return len(loaded)
