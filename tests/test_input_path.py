"""The input path: uint8 batches, normalisation on the device, the device decode path, the evaluation
cache, and compiling in place. No Ray except where a test says so."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_io.prep import DeviceImagePipeline, ImageBytes, ImageNorm, ImagePrep, ImageTransform
from pipelines import core
from pipelines.batches import DeviceBatches


def _prep(size: int, **kw) -> ImagePrep:
    return ImagePrep(size=size, **kw)


class _Objective:
    """The smallest objective the core accepts: cross-entropy on a classifier's logits."""

    def inputs(self, b):
        return (b["image"],), {}

    def loss(self, outputs, b):
        loss = torch.nn.functional.cross_entropy(outputs["logits"], b["label"])
        return loss, {"loss": float(loss.detach())}


def _jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def _rows(n: int = 5) -> dict:
    return {"image": np.array([_jpeg(40 + 7 * i, 50 - 3 * i, i) for i in range(n)], dtype=object),
            "image_id": np.array([f"img{i}" for i in range(n)], dtype=object),
            "label": np.arange(n) % 3, "valence": np.linspace(-0.5, 0.5, n), "arousal": np.zeros(n)}


@pytest.mark.parametrize("train", [True, False])
def test_image_transform_hands_out_uint8_nchw(train):
    out = ImageTransform(_prep(24), train=train, num_classes=3, seed=1)(_rows())
    assert out["image"].dtype == np.uint8 and out["image"].shape == (5, 3, 24, 24)
    assert out["image"].flags.c_contiguous


def test_normalisation_on_the_device_equals_the_float_arithmetic():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = ImageTransform(_prep(32), train=False, num_classes=3)(_rows())["image"]
    # The float32 arithmetic written out (/ 255, - mean, / std).
    old = (pixels.astype(np.float32) / 255.0 - np.asarray(mean, np.float32).reshape(1, 3, 1, 1)) \
        / np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    precision = core.Precision.for_device("cpu", norm=_prep(32, mean=mean, std=std).norm())
    got = precision.to_device({"image": torch.from_numpy(pixels), "label": torch.zeros(5)})["image"]
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), old, rtol=0, atol=1e-6)
    cl = ImageNorm(mean, std)(torch.from_numpy(pixels), channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(cl.numpy(), old, rtol=0, atol=1e-6)
    # Without a recipe value: timm's ImageNet values.
    from timm.data import IMAGENET_DEFAULT_MEAN

    assert core.Precision.for_device("cpu").norm.mean == tuple(IMAGENET_DEFAULT_MEAN)


def _device_batch(epoch: int, pipeline: DeviceImagePipeline, rows: dict) -> torch.Tensor:
    images, kept, skipped = pipeline(rows["image"], rows["image_id"], epoch=epoch)
    assert skipped == 0 and list(kept) == list(range(len(rows["image"])))
    return images


@pytest.mark.parametrize("augment", ["basic", "randaugment"])
def test_device_path_is_reproducible_per_seed_epoch_image_and_differs_across_epochs(augment):
    rows = _rows(6)
    pipe = DeviceImagePipeline(_prep(24, augment=augment), train=True, seed=3)
    a = _device_batch(0, pipe, rows)
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 24, 24)
    torch.testing.assert_close(a, _device_batch(0, pipe, rows), rtol=0, atol=0)
    # Independent of batching: the same image in a smaller batch gets the same pixels.
    sub = {k: v[2:4] for k, v in rows.items()}
    torch.testing.assert_close(_device_batch(0, pipe, sub), a[2:4], rtol=0, atol=0)
    b = _device_batch(1, pipe, rows)
    assert all(not torch.equal(a[i], b[i]) for i in range(6))       # fresh draws every epoch
    other_seed = DeviceImagePipeline(_prep(24, augment=augment), train=True, seed=4)
    assert not torch.equal(_device_batch(0, other_seed, rows), a)
    # Eval: resize + centre crop, no randomness; close to the CPU eval transform (PIL vs tensor resize).
    ev = DeviceImagePipeline(_prep(24), train=False)
    e = _device_batch(0, ev, rows)
    torch.testing.assert_close(e, _device_batch(5, ev, rows), rtol=0, atol=0)
    cpu = torch.from_numpy(ImageTransform(_prep(24), train=False, num_classes=3)(rows)["image"])
    assert (e.float() - cpu.float()).abs().mean() < 12


def test_a_corrupt_jpeg_in_a_device_batch_is_skipped_and_counted():
    rows = _rows(5)
    rows["image"][2] = b"\xff\xd8 not a jpeg at all"
    rows["image"][4] = rows["image"][4][: len(rows["image"][4]) // 3]  # truncated mid-stream
    batch = ImageBytes(num_classes=3)(rows)
    assert batch["image"].dtype == object and batch["repeat"].tolist() == [0] * 5
    pipe = DeviceImagePipeline(_prep(16), train=True, seed=0)
    decoded, failed = pipe.decode(batch["image"])
    assert failed == sum(d is None for d in decoded) and decoded[2] is None
    batches = DeviceBatches([batch, ImageBytes(num_classes=3)(_rows(3))], pipe, epoch=0)
    out = list(batches)
    n_bad = failed
    assert batches.skipped == n_bad and n_bad >= 1
    assert out[0]["image"].shape[0] == 5 - n_bad and out[1]["image"].shape[0] == 3
    # The targets stay aligned with the images that were kept.
    kept = [i for i, d in enumerate(decoded) if d is not None]
    assert out[0]["label"].tolist() == [int(rows["label"][i]) for i in kept]
    assert "image_id" not in out[0] and out[0]["valence"].dtype == torch.float32
    # The count reaches the epoch's metrics (train_skipped in the history rows).
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 3))

    batches = DeviceBatches([batch], pipe, epoch=1)
    stats = core.train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), _Objective(),
                                 core.Precision.for_device("cpu"))
    assert stats["skipped"] == n_bad and stats["samples"] == 5 - n_bad


def test_device_batches_prefetch_in_order_and_pass_errors_through():
    pipe = DeviceImagePipeline(_prep(16), train=False)
    batches = [ImageBytes(num_classes=3)({k: v[i:i + 2] for k, v in _rows(6).items()}) for i in range(0, 6, 2)]
    eager = [b["image"] for b in DeviceBatches(batches, pipe, 0, prefetch=0)]
    ahead = [b["image"] for b in DeviceBatches(batches, pipe, 0, prefetch=2)]
    assert len(eager) == len(ahead) == 3 and all(torch.equal(x, y) for x, y in zip(eager, ahead))

    def broken():
        yield batches[0]
        raise RuntimeError("shard read failed")

    with pytest.raises(RuntimeError, match="shard read failed"):
        list(DeviceBatches(broken(), pipe, 0, prefetch=1))


def test_eval_cache_streams_once_then_replays_from_memory():
    from pipelines.batches import EvalCache

    calls = []

    def make(epoch):
        calls.append(epoch)
        return iter([{"image": torch.full((2, 3, 4, 4), epoch, dtype=torch.uint8)}])

    cache = EvalCache(make, torch.device("cpu"), budget_mb=1)
    for epoch in range(3):
        assert [b["image"][0, 0, 0, 0].item() for b in cache(epoch)] == [0]
    assert calls == [0]
    tiny = EvalCache(make, torch.device("cpu"), budget_mb=1e-6)  # over budget: streams every epoch
    calls.clear()
    for epoch in range(3):
        list(tiny(epoch))
    assert calls == [0, 1, 2]


def test_one_prep_builds_the_cpu_and_device_paths_and_decode_chooses():
    """decode="device": the training split hands over bytes and the worker's pipeline decodes them;
    decode="cpu": Ray Data decodes. Evaluation is always the CPU eval transform. One crop definition."""
    cpu, device = _prep(20), _prep(20, decode="device")
    assert isinstance(cpu.batch_transform(train=True, num_classes=3), ImageTransform)
    assert cpu.device_pipeline("cpu", seed=0) is None
    assert isinstance(device.batch_transform(train=True, num_classes=3), ImageBytes)
    assert isinstance(device.batch_transform(train=False, num_classes=3), ImageTransform)
    pipe = device.device_pipeline("cpu", seed=0)
    assert isinstance(pipe, DeviceImagePipeline) and pipe.prep.size == 20
    # The stored recipe round-trips through meta.json with its prep, and both pipelines' recipes carry one.
    from pipelines.recipe import StageRecipe

    recipe = StageRecipe(prep=device, compile=True)
    assert StageRecipe.from_dict(recipe.to_dict()) == recipe


@pytest.mark.slow
def test_a_compiled_epoch_runs_and_its_checkpoint_loads_into_an_eager_model(tmp_path):
    """--compile: the compiled model trains; the checkpoint carries the eager names (no ``_orig_mod.``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model.compile()                       # in place: the module stays itself, its state dict unprefixed
    compiled = model
    assert core.unwrap(compiled) is model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=g),
                "label": torch.randint(0, 3, (4,), generator=g)} for _ in range(3)]
    start = time.perf_counter()
    stats = core.train_one_epoch(compiled, batches, optimizer, _Objective(), core.Precision.for_device("cpu"))
    assert stats["samples"] == 12 and np.isfinite(stats["loss"])
    print(f"compiled epoch (warm-up included): {time.perf_counter() - start:.1f}s")
    from pipelines.checkpoints import load_state, save_state

    state = core.TrainState(compiled, optimizer, core.Schedule(optimizer, core.ScheduleSpec(name="constant"), 1),
                            core.EarlyStopping(0))
    save_state(tmp_path / "state.pt", state.state_dict())
    saved = load_state(tmp_path / "state.pt")["model"]
    assert not any(k.startswith("_orig_mod.") for k in saved)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3))
    eager.load_state_dict(saved)
    x = core.Precision.for_device("cpu").to_device({"image": batches[0]["image"]})["image"]
    torch.testing.assert_close(eager(x), model(x))
