"""Training-step throughput and memory of the emotion models; fast versus naive local re-attention.

    python benchmarks/models.py [--models resnet101_va lora lora_v] [--image-size N] [--batch-size N]
                                [--steps N] [--device cpu|cuda]

Table 1, per model and precision: forward + backward images/s over ``--steps`` timed steps (after
warm-up steps; CUDA is synchronised before the clock is read), images per second of process CPU time
(on a shared CPU machine less sensitive to other load than wall time; on CUDA only the host's share)
and peak memory of those steps.
Precisions: ``fp32`` and ``bf16+cl`` (``torch.autocast(bfloat16)`` with the model and the input in
``channels_last``). The GPU goal is bf16+cl >= 2.5x fp32 for resnet101 at 448 px.

Table 2: local re-attention selection for every selecting LORA stage at the given image size, on
random attention maps of the real shapes: :func:`selection_scores` (the cls row only, vector-matrix
products in float64) against :func:`naive_selection_scores` (the published token x token products);
peak memory and time of the selection alone (the attention maps are inputs of both), and the size
of one ``(1+N)^2`` matrix that the published path forms (for the whole batch, capped at 8 images).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the measured code.
On CPU the peak resident-set growth: the kernel's high-water mark ``VmHWM`` is reset through
``/proc/self/clear_refs`` before the measured code and compared with ``VmRSS`` before it, and glibc
is told to serve blocks >= 64 KiB by ``mmap`` so freed tensors leave the RSS at once. (tracemalloc
does not see torch's allocations; ``ru_maxrss`` cannot be reset and is the fallback where
``clear_refs`` is not writable: a lower bound.) CPU figures include allocator and thread-pool noise of
a few MiB.

Needs only torch and timm (the project's ``emotion_models``; no Ray, no MLflow). CPU defaults are
small (128 px, batch 2, 2 steps) so the run ends in about a minute or two; CUDA defaults are 448 px,
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


from emotion_models import create_model
from emotion_models.pvt import stage_grids
from emotion_models.reattention import naive_selection_scores, selection_scores
from emotion_models.text import TEXT_LEN, tokenize

MODELS: dict[str, tuple[str, dict]] = {
    "resnet101_va": ("va", {"backbone": "resnet101"}),
    "lora": ("lora", {}),
    "lora_v": ("lora_v", {}),
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


def bench_model(name: str, size: int, batch: int, steps: int, warmup: int, device: torch.device,
                bf16: bool) -> tuple[float, float, int]:
    """(images per wall second, images per process-CPU second, peak bytes) of ``steps``
    forward+backward steps after ``warmup`` steps."""
    registry_name, kwargs = MODELS[name]
    if registry_name != "va":
        kwargs = dict(kwargs, img_size=size)
    torch.manual_seed(0)
    model = create_model(registry_name, **kwargs).to(device).train()
    if bf16:
        model = model.to(memory_format=torch.channels_last)
    inputs = _inputs(name, batch, size, device, channels_last=bf16)
    def run(num_steps: int) -> None:
        for _ in range(num_steps):
            _train_step(model, inputs, device, bf16)

    run(warmup)
    start_cpu = time.process_time()
    _, peak, elapsed = _timed(functools.partial(run, steps), device)
    return batch * steps / elapsed, batch * steps / (time.process_time() - start_cpu), peak


def _timed(fn: Callable[[], T], device: torch.device) -> tuple[T, int, float]:
    """``fn()``'s result, peak memory (bytes) and seconds; CUDA is synchronised around it."""
    with PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        out = fn()
        _sync(device)
        elapsed = time.perf_counter() - start
    return out, memory.peak, elapsed


def bench_reattention(size: int, batch: int, device: torch.device) -> Iterator[list[str]]:
    """Table rows, one per re-attending stage of the default LORA (columns: see ``main``)."""
    trunk = create_model("lora_v", img_size=size).vision_model
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
        fast_fn = functools.partial(selection_scores, attns, last)
        naive_fn = functools.partial(naive_selection_scores, [a.float() for a in attns], last)
        fast_fn()  # warm-up
        fast, fast_peak, fast_s = _timed(fast_fn, device)
        naive, naive_peak, naive_s = _timed(naive_fn, device)
        one_matrix = batch * heads * tokens ** 2 * 4  # fp32 bytes of one (1+N) x (1+N) product
        yield [f"{stage + 1}: {height}x{width} sr{sr} h{heads} d{depth}", tokens - 1,
               f"{fast_peak / MiB:.1f}", f"{naive_peak / MiB:.1f}", f"{one_matrix / MiB:.1f}",
               f"{fast_s * 1e3:.1f}", f"{naive_s * 1e3:.1f}", f"{(fast - naive).abs().max().item():.1e}"]


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for line in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(line, widths)))


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

    rows = []
    for name in args.models:
        fp32_speed = None
        for label, bf16 in (("fp32", False), ("bf16+cl", True)):
            speed, cpu_speed, peak = bench_model(name, size, batch, cfg["steps"], cfg["warmup"], device, bf16)
            fp32_speed = fp32_speed or speed
            rows.append([name, label, f"{speed:.2f}", f"{speed / fp32_speed:.2f}x", f"{cpu_speed:.2f}",
                         f"{peak / MiB:.0f}"])
            print(f"  {name} {label}: {speed:.2f} img/s", flush=True)
    if rows:
        print()
        _print_table(["model", "precision", "img/s (fwd+bwd)", "vs fp32", "img/cpu-s", "peak MiB"], rows)

    batch = min(batch, 8)  # the naive product at 448 px is ~630 MB per image and matrix
    print(f"\nlocal re-attention selection, default LORA stages at {size}px, batch {batch}:")
    header = ["stage", "tokens", "fast MiB", "naive MiB", "one NxN MiB", "fast ms", "naive ms", "max |diff|"]
    _print_table(header, list(bench_reattention(size, batch, device)))


if __name__ == "__main__":
    main()
