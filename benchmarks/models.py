"""Training-step throughput and memory of the emotion models; fast versus naive local re-attention.

    PYTHONPATH=$PWD python benchmarks/models.py [--models resnet101_va lora lora_v] [--image-size N]
        [--batch-size N] [--steps N] [--device cpu|cuda] [--repeats N]

Table 1, per model and precision: training images/s (forward + backward over ``--steps`` timed steps,
after ``--warmup`` steps; CUDA is synchronised before the clock is read), images per second of process
CPU time (on a shared CPU machine less sensitive to other load than wall time; on CUDA only the
host's share), the speed-up over fp32 (taken round by round) and the peak memory of those steps in
MiB. Models are built the way the recipes build them, ``emotion_models.build_model(ModelSpec)``,
from scratch (``weights: none``): ``resnet101_va`` (the two-stage VA model on resnet101), ``lora``
(PVT-small + the byte-level text encoder) and ``lora_v`` (LORA without text). The loss is a plain
sum of squares of the outputs (the step's cost, not a recipe's loss).
Precisions: ``fp32`` and ``bf16+cl`` (``torch.autocast(bfloat16)`` with the model and the input in
``channels_last``). The GPU goal is bf16+cl >= 2.5x fp32 for resnet101 at 448 px.

Table 2: local re-attention selection for every selecting LORA stage at the given image size, on
random attention maps of the real shapes: :func:`selection_scores` (the cls row only, vector-matrix
products in float64) against :func:`naive_selection_scores` (the published token x token products);
peak memory (MiB) and time (ms) of the selection alone (the attention maps are inputs of both), the
size of one ``(1+N)^2`` matrix that the published path forms (for the whole batch, capped at 8
images; computed, not measured), and the largest difference of the two results (checked once).

``--repeats N``: N rounds; in each, every model's fp32 and bf16+cl runs (interleaved: model 1 fp32,
model 1 bf16+cl, model 2 fp32, ...), then every stage's fast and naive selection; every measured
figure is printed as ``median (min–max, n=N)``.

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the measured code.
On CPU the peak resident-set growth: the kernel's high-water mark ``VmHWM`` is reset through
``/proc/self/clear_refs`` before the measured code and compared with ``VmRSS`` before it, and glibc
is told to serve blocks >= 64 KiB by ``mmap`` so freed tensors leave the RSS at once. (tracemalloc
does not see torch's allocations; ``ru_maxrss`` cannot be reset and is the fallback where
``clear_refs`` is not writable: a lower bound.) CPU figures include allocator and thread-pool noise of
a few MiB.

Needs only torch and timm (the project's ``emotion_models``; no Ray, no MLflow). CPU defaults are
small (128 px, batch 2, 2 steps) so one round ends in about a minute or two; CUDA defaults are 448 px,
batch 32, 20 steps.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import resource
import time
from typing import Callable, Iterator, TypeVar

import torch

from emotion_models import ModelSpec, build_model
from emotion_models.pvt import stage_grids
from emotion_models.reattention import naive_selection_scores, selection_scores
from emotion_models.text import TEXT_LEN, tokenize
from repeats import add_repeats_arg, interleave, paired, print_table

MODELS: dict[str, ModelSpec] = {
    "resnet101_va": ModelSpec("va", backbone="resnet101", weights="none"),
    "lora": ModelSpec("lora", weights="none", options={"text_encoder": "bytes"}),
    "lora_v": ModelSpec("lora_v", weights="none"),
}
DEFAULTS = {"cpu": {"image_size": 128, "batch_size": 2, "steps": 2, "warmup": 1},
            "cuda": {"image_size": 448, "batch_size": 32, "steps": 20, "warmup": 5}}
MiB = 2 ** 20
T = TypeVar("T")


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _pin_malloc_to_mmap() -> None:
    """glibc: blocks >= 64 KiB come from mmap and go back on free, so RSS follows live tensors."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also stops its auto-growth)


class PeakMemory:
    """Context manager: ``peak`` = bytes the enclosed code added at its peak (see module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as refs:
                    refs.write("5")  # reset VmHWM to the current RSS
                self._resettable, self._base = True, _status_bytes("VmRSS")
            except OSError:
                self._resettable, self._base = False, _max_rss()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            top = torch.cuda.max_memory_allocated(self.device)
        else:
            top = _status_bytes("VmHWM") if self._resettable else _max_rss()
        self.peak = max(top - self._base, 0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _inputs(name: str, batch: int, size: int, device: torch.device, channels_last: bool) -> tuple:
    images = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if name == "lora":
        ids, mask = tokenize(["so happy today"] * batch, TEXT_LEN)
        return images, ids.to(device), mask.to(device)
    return (images,)


def _train_step(model: torch.nn.Module, inputs: tuple, device: torch.device, bf16: bool) -> None:
    with _precision(device, bf16):
        out = model(*inputs)
        loss = sum(v.float().square().mean() for v in out.values())
    loss.backward()
    model.zero_grad(set_to_none=True)


def build(name: str, size: int) -> torch.nn.Module:
    """The model ``name`` for ``size`` px images (the LORA models check their token grids against it)."""
    spec = MODELS[name]
    return build_model(spec) if spec.name == "va" else build_model(spec, img_size=size)


def bench_model(name: str, size: int, batch: int, steps: int, warmup: int, device: torch.device,
                bf16: bool) -> dict[str, float]:
    """Images per wall second, images per process-CPU second and peak MiB of ``steps``
    forward+backward steps after ``warmup`` steps."""
    torch.manual_seed(0)
    model = build(name, size).to(device).train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    inputs = _inputs(name, batch, size, device, channels_last=bf16)

    def run(num_steps: int) -> None:
        for _ in range(num_steps):
            _train_step(model, inputs, device, bf16)

    run(warmup)
    start_cpu = time.process_time()
    _, peak, elapsed = _timed(functools.partial(run, steps), device)
    return {"img/s": batch * steps / elapsed, "img/cpu-s": batch * steps / (time.process_time() - start_cpu),
            "peak": peak / MiB}


def _timed(fn: Callable[[], T], device: torch.device) -> tuple[T, int, float]:
    """``fn()``'s result, peak memory (bytes) and seconds; CUDA is synchronised around it."""
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        elapsed = time.perf_counter() - start
    return out, memory.peak, elapsed


def reattention_cases(size: int, batch: int, device: torch.device) -> Iterator[dict]:
    """One case per re-attending stage of the default LORA: its label, the fast and the naive selection
    on the same random attention maps (as argument-free callables), its token count, the size of one
    ``(1+N)^2`` fp32 product of the naive path and the largest difference of the two results."""
    trunk = build("lora_v", size).vision_model
    generator = torch.Generator(device=device).manual_seed(0)
    grids = stage_grids(size, trunk.patch_size, trunk.num_stages)
    for stage in trunk.selecting_stages():
        (height, width), sr, heads = grids[stage], trunk.sr_ratios[stage], trunk.num_heads[stage]
        last = stage == trunk.num_stages - 1
        depth = len(getattr(trunk, f"block{stage + 1}"))
        tokens = 1 + height * width
        keys = 1 + (height // sr) * (width // sr)
        attns = [torch.rand(batch, heads, tokens, keys, device=device, generator=generator).softmax(-1)
                 for _ in range(depth)]
        fast = functools.partial(selection_scores, attns, last)
        naive = functools.partial(naive_selection_scores, [a.float() for a in attns], last)
        yield {"label": f"{stage + 1}: {height}x{width} sr{sr} h{heads} d{depth}", "tokens": tokens - 1,
               "fast": fast, "naive": naive, "one_matrix": batch * heads * tokens ** 2 * 4 / MiB,
               "diff": (fast() - naive()).abs().max().item()}   # also the warm-up of both


def _selection(fn: Callable[[], torch.Tensor], device: torch.device) -> dict[str, float]:
    _, peak, seconds = _timed(fn, device)
    return {"MiB": peak / MiB, "ms": seconds * 1e3}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS),
                        help="default: all; none (a bare --models) runs only the re-attention table")
    parser.add_argument("--image-size", type=int, help="default: 128 on cpu, 448 on cuda")
    parser.add_argument("--batch-size", type=int, help="default: 2 on cpu, 32 on cuda")
    parser.add_argument("--steps", type=int, help="timed steps; default: 2 on cpu, 20 on cuda")
    parser.add_argument("--warmup", type=int, help="untimed steps first; default: 1 on cpu, 5 on cuda")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    add_repeats_arg(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    cfg = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in DEFAULTS[device.type].items()}
    size, batch = cfg["image_size"], cfg["batch_size"]
    if device.type == "cpu":
        _pin_malloc_to_mmap()
    else:
        torch.backends.cudnn.benchmark = True
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch {torch.__version__}, image {size}px, batch {batch}, {cfg['steps']} timed steps "
          f"after {cfg['warmup']} warm-up, threads {torch.get_num_threads()}\n")

    units = {"img/s": ("img/s", 2), "img/cpu-s": ("img/cpu-s", 2), "peak": ("MiB", 0), "MiB": ("MiB", 1),
             "ms": ("ms", 1)}
    precisions = {"fp32": False, "bf16+cl": True}
    peers = {f"{name} {label}": functools.partial(bench_model, name, size, batch, cfg["steps"], cfg["warmup"], device,
                                                  bf16)
             for name in args.models for label, bf16 in precisions.items()}
    sel_batch = min(batch, 8)  # the naive product at 448 px is ~630 MB per image and matrix
    cases = list(reattention_cases(size, sel_batch, device))
    for case in cases:
        for kind in ("fast", "naive"):
            peers[f"stage {case['label']} {kind}"] = functools.partial(_selection, case[kind], device)
    results = interleave(peers, args.repeats, units, log=lambda line: print(line, flush=True))

    if args.models:
        rows = []
        for name in args.models:
            fp32 = results[f"{name} fp32"]["img/s"]
            for label in precisions:
                figures = results[f"{name} {label}"]
                rows.append([name, label, figures["img/s"], paired(figures["img/s"], fp32, unit="x"),
                             figures["img/cpu-s"], figures["peak"]])
        print_table(["model", "precision", "img/s (fwd+bwd)", "vs fp32", "img/cpu-s", "peak MiB"], rows,
                    title=f"training steps, median (min–max, n=rounds), {size}px, batch {batch}:")

    rows = []
    for c in cases:
        fast, naive = results[f"stage {c['label']} fast"], results[f"stage {c['label']} naive"]
        rows.append([c["label"], c["tokens"], fast["MiB"], naive["MiB"], f"{c['one_matrix']:.1f} MiB", fast["ms"],
                     naive["ms"], f"{c['diff']:.1e}"])
    print_table(["stage", "tokens", "fast peak", "naive peak", "one NxN", "fast time", "naive time", "max |diff|"],
                rows, title=f"local re-attention selection, default LORA stages at {size}px, batch {sel_batch}, "
                            f"median (min–max, n=rounds):")


if __name__ == "__main__":
    main()
