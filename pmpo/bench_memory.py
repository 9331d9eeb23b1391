"""Peak memory of one step, each measured in a fresh interpreter so that earlier work does not
pollute its peak (process RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU); on CPU the child
caps its address space so an over-large step fails there instead of starving the machine."""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from .backbone import load_backbone
from .bench_cases import BenchConfig, _make_model, _sync, autocast, bench_classnames, train_step
from .device import resolve_device
from .errors import PMPOError

# --- memory (subprocess) ----------------------------------------------------------------------------

def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux lets a process reset its own peak RSS (VmHWM) by writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def memory_step(cfg: BenchConfig, grad_checkpointing: bool, method: str = "pmpo", infer: bool = False
                ) -> dict[str, Any]:
    """Peak memory of one training step of ``method`` (or, with ``infer``, of one inference batch with
    the class weights already cached where the method can cache them), measured in *this* process
    (run it in a fresh one).

    CPU: the rise of the process's peak RSS over its RSS just before the step (model loaded,
    batch built). GPU: ``max_memory_allocated`` over ``memory_allocated`` before the step.
    """
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = load_backbone(cfg.model, cfg.pretrained, device=device)
    model = _make_model(cfg, method, backbone, device).train(not infer)
    model.text.grad_checkpointing = grad_checkpointing
    names = bench_classnames(cfg.memory_classes)
    size = backbone.image_size
    images = torch.randn(cfg.memory_batch, 3, size, size, device=device)
    labels = torch.arange(cfg.memory_batch, device=device) % len(names)
    optimizer = torch.optim.SGD(model.learnable_parameters(), lr=1e-3, momentum=0.9)
    with torch.no_grad():
        weights = model.class_weights(names) if infer else None  # evaluation computes them once per class list

    def infer_step() -> None:
        with torch.no_grad(), autocast(device, cfg.dtype):
            model.logits_from(model.encode_image(images), weights)

    step = infer_step if infer else train_step(model, optimizer, images, labels, names, device, cfg.dtype)
    gc.collect()
    result: dict[str, Any] = {"classes": cfg.memory_classes, "batch": cfg.memory_batch, "n_prompts": cfg.n_prompts,
                              "grad_checkpointing": grad_checkpointing, "device": str(device), "method": method,
                              "kind": "infer" if infer else "train"}
    peaks, seconds = [], []
    for _ in range(cfg.memory_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            base = (_proc_status_kib("VmRSS") or 0) * 1024
            if not _reset_peak_rss():
                import resource

                base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        if device.type == "cuda":
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
            result["measure"] = "torch.cuda.max_memory_allocated increase"
        else:
            hwm = _proc_status_kib("VmHWM")
            if hwm is None:
                import resource

                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            peaks.append(hwm * 1024 - base)
            result["measure"] = "peak RSS increase (VmHWM after clear_refs)"
    result["peak_bytes"] = max(peaks)
    result["step_s"] = statistics.median(seconds)
    return result


def _memory_budget_bytes() -> int | None:
    """80% of MemAvailable: the child may not push a shared machine into the OOM killer."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 8 // 10
    except OSError:
        return None
    return None


def measure_memory(cfg: BenchConfig, grad_checkpointing: bool, timeout: float | None = None, method: str = "pmpo",
                   infer: bool = False) -> dict[str, Any]:
    """Run :func:`memory_step` in a fresh interpreter, so earlier work does not pollute its peak."""
    payload = json.dumps({"cfg": _cfg_dict(cfg), "grad_checkpointing": grad_checkpointing, "method": method,
                          "infer": infer})
    env = dict(os.environ)
    budget = _memory_budget_bytes() if cfg.device == "cpu" or not cfg.device.startswith("cuda") else None
    if budget:
        env["PMPO_BENCH_MEMORY_LIMIT"] = str(budget)
    proc = subprocess.run([sys.executable, "-m", "pmpo.bench_memory", "--memory-child", payload], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=os.path.dirname(os.path.dirname(__file__)))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"classes": cfg.memory_classes, "batch": cfg.memory_batch, "n_prompts": cfg.n_prompts,
            "grad_checkpointing": grad_checkpointing, "error": tail, "limit_bytes": budget, "method": method,
            "kind": "infer" if infer else "train"}


def _child_main(payload: str) -> int:
    data = json.loads(payload)
    cfg = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["cfg"].items()})
    torch.set_num_threads(torch.get_num_threads())
    limit = os.environ.get("PMPO_BENCH_MEMORY_LIMIT")
    if limit and cfg.device == "cpu":
        import resource

        # Cap the address space at what is mapped now plus the budget: an over-large step then
        # fails with an allocation error in this child instead of starving the machine.
        now = (_proc_status_kib("VmSize") or 0) * 1024
        cap = now + int(limit) + (4 << 30)  # + slack for code and thread arenas mapped later
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    try:
        print(json.dumps(memory_step(cfg, data["grad_checkpointing"], data.get("method", "pmpo"),
                                     data.get("infer", False))))
    except (MemoryError, RuntimeError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"out of memory within the budget: {message}", file=sys.stderr)
        return 3
    return 0


def _cfg_dict(cfg: BenchConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-child":
        try:
            sys.exit(_child_main(sys.argv[2]))
        except PMPOError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(1)
    print("usage: pmpo bench (this module's own entry point is internal)", file=sys.stderr)
    sys.exit(2)
