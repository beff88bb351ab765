"""The published two-stage recipe, field by field, against the published rule written out here.

Each test restates one rule of sange1104/Dimensional-image-emotion-detection (``src/train.py``,
``src/dataset.py``, ``src/model.py``, ``src/utils.py``) in its own words (never by importing or copying
the authors' code) and checks that ``--recipe published`` does the same, and, where the project
corrects it, that ``--recipe default`` does not. The SER30K recipe's rules are in
tests/test_sticker_recipe.py.
"""
from __future__ import annotations

import bisect
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from emotion_models import losses
from pipelines import core
from pipelines.recipe import Recipe

SECTIONS = ("stage", "stage1", "stage1_single", "stage1_multi", "stage2", "stage2_single", "stage2_multi",
            "dimensional")
FI_EMO_CTG = ["amusement", "awe", "contentment", "excitement", "anger", "disgust", "fear", "sadness"]


@pytest.fixture(scope="module")
def published():
    return Recipe.load("two_stage", "published", SECTIONS)


@pytest.fixture(scope="module")
def default():
    return Recipe.load("two_stage", "default", SECTIONS)


# ----------------------------------------------------------------------------- model and weights

def test_backbone_is_torchvisions_imagenet_resnet101(published):
    """model.py: ``models.resnet101(pretrained=True)``, i.e. torchvision's IMAGENET1K_V1 weights."""
    import timm
    from torchvision.models import ResNet101_Weights

    model = published.stage("stage1").model
    assert model.weights == "hub"
    assert timm.get_pretrained_cfg(model.backbone).url == ResNet101_Weights.IMAGENET1K_V1.url


def test_head_is_relu_then_an_unbounded_linear_layer(published, default):
    """model.py: ``FC_va(relu(flatten(resnet(x))))`` with no activation after it."""
    assert published.stage("stage2").model.head == "relu_linear"
    assert default.stage("stage2").model.head == "tanh"          # the project's: predictions on [-1, 1]
    from emotion_models.va import build_va

    torch.manual_seed(0)
    model = build_va("resnet10t", head="relu_linear", weights="none").eval()
    nn.init.constant_(model.va_head.bias, 3.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = torch.relu(model.backbone(x).flatten(1)) @ model.va_head.weight.T + model.va_head.bias
        torch.testing.assert_close(model(x)["va"], expected)
    assert expected.max() > 1.0   # unbounded


# ----------------------------------------------------------------------------- images

def _photo(width: int = 500, height: int = 300) -> bytes:
    pixels = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_evaluation_is_resize_448_then_centre_crop_448_bilinear_imagenet(published):
    """dataset.py: ``Resize(448)``, ``CenterCrop(448)``, ``ToTensor()``, ``Normalize(ImageNet)``."""
    import torchvision.transforms as T

    from datasets_io.prep import ImageTransform

    prep = published.stage("stage2").prep
    data = _photo()
    ours = ImageTransform(prep, train=False, num_classes=1)({"image": np.array([data], dtype=object)})["image"]
    ours = prep.norm()(torch.from_numpy(ours))[0]
    theirs = T.Compose([T.Resize(448), T.CenterCrop(448), T.ToTensor(),
                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(
        Image.open(io.BytesIO(data)).convert("RGB"))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_training_crop_and_flip_are_torchvisions_defaults(published, default):
    """dataset.py: ``RandomResizedCrop(448)`` (torchvision's default scale, ratio, bilinear) and
    ``RandomHorizontalFlip()``; no other augmentation."""
    import torchvision.transforms as T

    prep = published.stage("stage1").prep
    crop, flip = T.RandomResizedCrop(448), T.RandomHorizontalFlip()
    assert prep.size == 448 and tuple(prep.scale) == tuple(crop.scale)
    assert prep.ratio == pytest.approx(crop.ratio) and prep.interpolation == crop.interpolation.value
    assert prep.hflip == flip.p and prep.augment == "basic"
    assert default.stage("stage1").prep.scale == (0.5, 1.0)      # the project keeps at least half the scene


def test_published_code_decodes_the_original_files(published, default):
    """dataset.py: ``Image.open(path).convert("RGB")`` on the files as downloaded: no re-encoded copies."""
    from pipelines.predict import stored_bytes

    assert published.stage().prep.max_side == 0 and default.stage().prep.max_side == 512
    data = _photo()
    assert stored_bytes(data, 0) == data              # what predict and the ingest keep: the bytes themselves
    assert stored_bytes(data, 512) != data


def test_validation_subsets_keep_the_training_transform(published, default):
    """dataset.py: Emotion6's and the LDL sets' validation splits are ``random_split``s of the train-mode
    dataset, so they are cropped and flipped at random like training; FI has its own val/ folder."""
    assert set(published.stage().prep.val_augment) == {"emotion6", "ldl"}
    for layout, augmented in (("emotion6", True), ("ldl", True), ("folder", False)):
        assert published.stage().prep.validates_like_training(layout) is augmented
        assert default.stage().prep.validates_like_training(layout) is False


def test_an_augmented_validation_split_draws_new_crops_each_epoch(ray_session, published, default):
    """Through the data builder: the published prep's Emotion6 validation batches differ between two
    executions (fresh random crops), the default's are identical (the evaluation transform)."""
    from pipelines import data

    shards = data.demo_shards(images_per_class=6, image_size=32, seed=0)
    manifest = data.check_shards(shards["emotion6"], role="dimensional", need_va=True)

    def two_epochs(prep):
        val = data.training_datasets(manifest, prep, num_classes=7, seed=0, splits=("val",))["val"]
        return [np.concatenate([b["image"] for b in val.iter_batches(batch_size=64, batch_format="numpy")])
                for _ in range(2)]

    first, second = two_epochs(published.stage().prep.resolve())
    assert not np.array_equal(first, second)
    first, second = two_epochs(default.stage().prep.resolve())
    assert np.array_equal(first, second)


# ----------------------------------------------------------------------------- optimiser, schedule, batch

def test_optimizer_is_torchs_adam_with_the_published_lr_and_decay(published):
    """train.py 66, 504-505: ``Adam(params, lr=1e-4, weight_decay=1e-5)`` over every trainable parameter."""
    spec = published.stage("stage1").optimizer
    assert (spec.name, spec.lr, spec.weight_decay) == ("adam", 1e-4, 1e-5)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)))
    ours = core.build_optimizer(nets[0], spec, global_batch=10)
    theirs = torch.optim.Adam(nets[1].parameters(), lr=1e-4, weight_decay=1e-5)
    assert type(ours) is torch.optim.Adam and len(ours.param_groups) == 1
    x = torch.randn(6, 4)
    for net, opt in zip(nets, (ours, theirs)):
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_lr_of_every_step_equals_multisteplr_stepped_per_batch(published, default):
    """train.py 67, 105-106: ``MultiStepLR(milestones=[10, 20, 30, 40, 50], gamma=0.5)``, ``scheduler.step()``
    after every batch: the step k trains at ``lr * 0.5 ** (milestones passed by k)``, 1/32 after 50."""
    spec = published.stage("stage1").schedule
    assert spec.name == "multistep_per_batch" and default.stage("stage1").schedule.name == "cosine_after_warmup"
    model = nn.Linear(3, 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    schedule = core.Schedule(optimizer, spec, epochs=3)
    seen = []

    class Objective:
        def inputs(self, batch):
            return (batch["image"].flatten(1)[:, :3],), {}

        def loss(self, outputs, batch):
            loss = outputs["logits"].square().mean()
            return loss, {"loss": loss.item()}

    batches = [{"image": torch.rand(2, 3, 1, 1)} for _ in range(24)]
    for epoch in range(3):   # 72 steps over three epochs: the per-batch schedule ignores epoch boundaries
        core.train_one_epoch(model, batches, optimizer, Objective(), core.Precision.for_device("cpu"),
                             schedule=schedule, on_batch=lambda step: seen.append(optimizer.param_groups[0]["lr"]))
        schedule.after_epoch(epoch)
    milestones = [10, 20, 30, 40, 50]
    expected = [1e-4 * 0.5 ** bisect.bisect_right(milestones, k) for k in range(72)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)
    assert seen[-1] == pytest.approx(1e-4 / 32)


def test_the_global_batch_is_ten_whatever_the_worker_count(published, default):
    """train.py 506: ``batch_size=10`` on one GPU. ``--batch-size`` is the global batch here."""
    for recipe in (published, default):
        stage = recipe.stage("stage2")
        assert stage.batch_size == 10
        assert stage.per_worker_batch(1) == 10 and stage.per_worker_batch(2) == 5 and stage.per_worker_batch(10) == 1
        with pytest.raises(ValueError, match="does not divide among 4 workers"):
            stage.per_worker_batch(4)


# ----------------------------------------------------------------------------- selection and stopping

def _published_selection(scores: list[float], early_stop: int) -> tuple[int, int]:
    """train.py 457-475 written out: (epochs run, index of the model that is tested and starts stage two)."""
    best_v, patience, saved = 0, 0, None
    it = -1
    for it, val_v in enumerate(scores):
        if val_v > best_v:
            best_v, patience, saved = val_v, 0, it
        else:
            patience += 1
        if patience > early_stop:
            saved = it          # the last model overwrites the saved best
            break
    return it + 1, saved


@pytest.mark.parametrize("scores", [
    [0.2, 0.5, 0.4, 0.45, 0.3, 0.2, 0.1, 0.48, 0.49, 0.2],   # stops: 6 epochs without beating 0.5
    [0.2, 0.3, 0.4, 0.5, 0.6, 0.7],                           # runs out of epochs: the best is kept
    [0.3, 0.1, 0.2, 0.25, 0.28, 0.29, 0.2, 0.9],              # stops at the 7th epoch, just before 0.9
    [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5],                      # a tie is no improvement
])
def test_a_scripted_validation_curve_gives_the_published_stop_and_kept_model(published, default, scores):
    spec = published.stage("stage1").select
    assert (spec.metric, spec.patience) == ("pearson_v", 5)
    epochs_run, saved = _published_selection(scores, early_stop=5)
    es = core.EarlyStopping.from_spec(spec)
    run = 0
    for epoch, value in enumerate(scores):   # the loop core.fit runs
        if es.should_stop:
            break
        es.step(value, epoch)
        run += 1
    assert (run, es.selected_epoch) == (epochs_run, saved)
    # The project's rule keeps the best and stops after 5 bad epochs, not 6.
    ours = core.EarlyStopping.from_spec(default.stage("stage1").select)
    for epoch, value in enumerate(scores):
        if ours.should_stop:
            break
        ours.step(value, epoch)
    assert ours.selected_epoch == ours.best_epoch


def test_a_model_never_above_zero_is_not_better_than_nothing(published):
    """``best_v = 0``: a validation Pearson at or below 0 is never an improvement (the published code then
    has no saved model; the project keeps the last epoch rather than crash)."""
    es = core.EarlyStopping.from_spec(published.stage("stage1").select)
    for epoch, value in enumerate([-0.2, 0.0, -0.1]):
        assert not es.step(value, epoch)
    assert es.best_epoch == -1 and es.selected_epoch == 2 and not es.should_stop


def test_fit_stops_and_keeps_as_published_on_a_scripted_curve(published):
    """The same rule through ``core.fit``: a stand-in objective whose validation Pearson(V) follows a script."""
    scores = [0.2, 0.5, 0.4, 0.45, 0.3, 0.2, 0.1, 0.48, 0.49, 0.2]
    epochs_run, saved = _published_selection(scores, early_stop=5)

    class Scripted:
        def inputs(self, batch):
            return (batch["image"],), {}

        def loss(self, outputs, batch):
            loss = outputs["logits"].square().mean()
            return loss, {"loss": loss.item()}

        def collect(self, acc, outputs, batch):
            acc.add(n=torch.ones(1))

        def metrics(self, arrays):
            return {"pearson_v": scores[len(state.history)]}

    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    state = core.TrainState(model, optimizer, core.Schedule(optimizer, core.ScheduleSpec(name="constant"), 10),
                            core.EarlyStopping.from_spec(published.stage("stage1").select))
    batch = [{"image": torch.rand(2, 3, 1, 1)}]
    core.fit(state, Scripted(), core.Precision.for_device("cpu"), train_batches=lambda e: batch,
             val_batches=lambda e: batch, epochs=len(scores), monitor="pearson_v", log=lambda *_: None)
    assert state.epoch == epochs_run and state.early_stopping.selected_epoch == saved


def test_one_stage_multi_selects_on_emotion6s_validation_split(published, default):
    """train.py 431-432: one_stage multi's ``val_coef`` comes from ``val_va_loader`` (Emotion6)."""
    assert published.stage("stage1", "stage1_multi").val == "dimensional"
    assert published.stage("stage1", "stage1_single").val == "own"       # train.py 421: val_cat_loader
    assert default.stage("stage1", "stage1_multi").val == "categorical"


# ----------------------------------------------------------------------------- stage two

def _published_frozen_names() -> set[str]:
    """train.py 50-58 with ``feature_extract=4`` on model.py's layout: freeze every parameter before the
    first whose name contains 'resnet.7', the names mapped from the published nn.Sequential to timm's."""
    import torchvision

    class Published(nn.Module):
        def __init__(self):
            super().__init__()
            self.resnet = nn.Sequential(*list(torchvision.models.resnet101(weights=None).children())[:-1])
            self.FC_cat = nn.Linear(2048, 8)
            self.FC_va = nn.Linear(2048, 2)

    frozen = []
    for name, _ in Published().named_parameters():
        if "resnet.7" in name:
            break
        frozen.append(name)
    to_timm = {"resnet.0.": "backbone.conv1.", "resnet.1.": "backbone.bn1.", "resnet.4.": "backbone.layer1.",
               "resnet.5.": "backbone.layer2.", "resnet.6.": "backbone.layer3."}
    return {next(v + n[len(k):] for k, v in to_timm.items() if n.startswith(k)) for n in frozen}


def test_stage_two_freezes_the_published_prefix_of_resnet101(published, default):
    from emotion_models.va import build_va

    expected = _published_frozen_names()
    assert any(n.startswith("backbone.layer3.") for n in expected)   # the design note had this wrong once
    for recipe in (published, default):
        stage = recipe.stage("stage2")
        assert stage.freeze == "published" and stage.freeze_bn is False
        model = build_va("resnet101", task="multi", num_classes=8, weights="none").freeze(stage.freeze)
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert frozen == expected
    assert published.stage("dimensional").freeze is None


def test_stage_two_weights_its_loss_90_10_and_the_terms_are_the_published_ones(published):
    """train.py 85-97, 436: ``ce * (1 - 0.9) + mse * 0.9`` with VA on the SAM 1..9 scale (stage one: 0.5)."""
    from pipelines.objectives import build_objective

    assert published.stage("stage1").loss.va_weight == 0.5
    stage = published.stage("stage2", "stage2_multi", classes=["anger", "joy"], head_classes=["a", "b", "c"],
                            anchors=[[-0.5, 0.6], [0.9, 0.6]], model={"options": {"task": "multi", "num_classes": 3}})
    objective = build_objective(stage)
    torch.manual_seed(1)
    logits, va_sam = torch.randn(4, 3), torch.rand(4, 2) * 8 + 1
    target_sam = torch.rand(4, 2) * 8 + 1
    batch = {"label": torch.tensor([2, 0, -1, -1]), "has_label": torch.tensor([True, True, False, False]),
             "valence": (target_sam[:, 0] - 5) / 4, "arousal": (target_sam[:, 1] - 5) / 4,
             "has_va": torch.tensor([False, False, True, True]), "label_dist": torch.zeros(4, 3),
             "has_dist": torch.zeros(4, dtype=torch.bool)}
    total, _ = objective.loss({"va": (va_sam - 5) / 4, "logits": logits}, batch)
    published_loss = F.cross_entropy(logits[:2], batch["label"][:2]) * 0.1 + F.mse_loss(va_sam[2:], target_sam[2:]) * 0.9
    torch.testing.assert_close(total, published_loss, rtol=1e-5, atol=1e-6)


def _pool_shard(n: int, kind: str, batch_size: int):
    """A stand-in for a Ray Data shard: ``iter_torch_batches`` over ``n`` rows of one kind."""
    class Shard:
        def iter_torch_batches(self, batch_size, drop_last, **_):
            rows = torch.arange(n)
            for start in range(0, n, batch_size):
                idx = rows[start:start + batch_size]
                if drop_last and len(idx) < batch_size:
                    return
                k = len(idx)
                yield {"image": torch.zeros(k, 3, 2, 2), "valence": torch.zeros(k), "arousal": torch.zeros(k),
                       "has_va": torch.full((k,), kind == "dim"), "label": torch.full((k,), 0 if kind == "cat" else -1),
                       "has_label": torch.full((k,), kind == "cat"), "label_dist": torch.zeros(k, 3),
                       "has_dist": torch.zeros(k, dtype=torch.bool), "row": idx}

    return Shard()


def test_pool_batching_draws_rows_as_one_shuffled_pool(published, default):
    """dataset.py 312-313: ``DataLoader(ConcatDataset([categorical train, Emotion6 train]), batch_size=10,
    shuffle=True, drop_last=True)``. An epoch is one pass over the pool; each batch's share of Emotion6
    rows is that of 10 rows drawn without replacement from what is left (hypergeometric), so the row
    ratio over the epoch is the pool's (about 14:1 on FI), and some batches have no Emotion6 row."""
    from pipelines.batches import PoolBatches

    assert published.stage("stage2", "stage2_multi").batching == "pool"
    assert published.stage("stage2", "stage2_single").batching == "plain"
    assert default.stage("stage2", "stage2_multi").batching == "joined"
    n_dim, n_cat, size = 70, 980, 10
    counts = []
    for epoch in range(20):
        batches = list(PoolBatches(_pool_shard(n_dim, "dim", size), _pool_shard(n_cat, "cat", size), size, seed=1,
                                   epoch=epoch, n_dim=n_dim, n_cat=n_cat))
        assert len(batches) == (n_dim + n_cat) // size                     # one pass over the pool, drop_last
        assert all(b["image"].shape[0] == size for b in batches)
        dims = [int(b["has_va"].sum()) for b in batches]
        assert sum(dims) == n_dim                                          # every Emotion6 row, once
        cat_rows = torch.cat([b["row"][~b["has_va"]] for b in batches])
        assert sorted(cat_rows.tolist()) == list(range(n_cat))            # every categorical row, once
        counts += dims
    # The published draw, simulated: consecutive batches of a uniformly shuffled pool.
    rng = np.random.default_rng(0)
    simulated = []
    for _ in range(2000):
        pool = rng.permutation(np.r_[np.ones(n_dim), np.zeros(n_cat)])
        simulated += pool[:(n_dim + n_cat) // size * size].reshape(-1, size).sum(1).tolist()
    assert np.mean(counts) == pytest.approx(np.mean(simulated), abs=0.02)
    assert np.var(counts) == pytest.approx(np.var(simulated), rel=0.15)
    assert np.mean(np.asarray(counts) == 0) == pytest.approx(np.mean(np.asarray(simulated) == 0), abs=0.05)
    assert 0.4 < np.mean(np.asarray(counts) == 0) < 0.6     # about half the steps are category-only


def test_a_category_only_step_has_the_published_gradient():
    """A pool batch with no Emotion6 row: the published ``mse_loss`` of an empty selection is NaN, but its
    input is empty, so it passes no gradient; the step's gradient is that of ``(1 - alpha) * CE`` alone.
    The project's masked loss gives the same gradient with a finite loss."""
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    va = torch.randn(5, 2, requires_grad=True)
    labels = torch.tensor([0, 2, 1, 1, 0])
    index = torch.ones(5)                                    # every row categorical
    published = F.cross_entropy(logits[index == 1.0], labels[index == 1.0]) * (1 - 0.9) + \
        F.mse_loss(va[index == 0.0], torch.zeros(0, 2)) * 0.9
    assert torch.isnan(published)
    published.backward()
    g_logits, g_va = logits.grad.clone(), va.grad.clone()
    assert torch.isfinite(g_logits).all() and torch.count_nonzero(g_va) == 0
    logits.grad, va.grad = None, None
    batch = {"label": labels, "has_label": torch.ones(5, dtype=torch.bool), "valence": torch.zeros(5),
             "arousal": torch.zeros(5), "has_va": torch.zeros(5, dtype=torch.bool),
             "label_dist": torch.zeros(5, 3), "has_dist": torch.zeros(5, dtype=torch.bool)}
    ours, _ = losses.multitask_loss({"va": va, "logits": logits}, batch, alpha=0.9, va_scale=1.0)
    assert torch.isfinite(ours)
    ours.backward()
    torch.testing.assert_close(logits.grad, g_logits)
    torch.testing.assert_close(va.grad, g_va)


def _pool_rank(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    from pipelines.objectives import global_counts

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        logits, va, batch = _global_batch()
        rows = slice(0, 4) if rank == 0 else slice(4, 10)     # the ranks' shares mix the kinds differently
        part = {k: v[rows] for k, v in batch.items()}
        lg, v = logits[rows].clone().requires_grad_(), va[rows].clone().requires_grad_()
        loss, _ = losses.multitask_loss({"va": v, "logits": lg}, part, alpha=0.9, va_scale=16.0,
                                        global_counts=global_counts(part))
        loss.backward()
        torch.save({"logits": lg.grad, "va": v.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _global_batch():
    g = torch.Generator().manual_seed(5)
    logits, va = torch.randn(10, 3, generator=g), torch.rand(10, 2, generator=g) * 2 - 1
    has_va = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    label = torch.where(has_va, torch.tensor(-1), torch.randint(0, 3, (10,), generator=g))
    return logits, va, {"label": label, "has_label": ~has_va, "valence": torch.rand(10, generator=g),
                        "arousal": torch.rand(10, generator=g), "has_va": has_va, "label_dist": torch.zeros(10, 3),
                        "has_dist": torch.zeros(10, dtype=torch.bool)}


def test_pool_loss_under_ddp_equals_the_published_per_batch_means(tmp_path):
    """The published loss is the mean over the batch's categorical rows and the mean over its Emotion6 rows.
    Split over two DDP ranks with different mixes, each rank's share of the sums over the *global* counts
    (DDP then averages the ranks' gradients) gives exactly the published gradient of the whole batch."""
    import torch.multiprocessing as mp

    mp.spawn(_pool_rank, args=(2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2, join=True)
    logits, va, batch = _global_batch()
    lg, v = logits.clone().requires_grad_(), va.clone().requires_grad_()
    target = torch.stack([batch["valence"], batch["arousal"]], 1)
    cat, dim = ~batch["has_va"], batch["has_va"]
    published = F.cross_entropy(lg[cat], batch["label"][cat]) * 0.1 + F.mse_loss(v[dim] * 4 + 5, target[dim] * 4 + 5) * 0.9
    published.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    world = 2   # DDP's all-reduce averages: the published gradient of a row is its rank's gradient / world
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]) / world, lg.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.cat([r["va"] for r in ranks]) / world, v.grad, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- LDL sets and decoding

def _lexicon_sam(names):
    """The published conversion: the NRC-VAD value (0..1) * 8 + 1, the lexicon read from a file."""
    from datasets_io.lexicon import ANCHORS_NRC

    return np.array([[ANCHORS_NRC[n][0] * 8 + 1, ANCHORS_NRC[n][1] * 8 + 1] for n in names])


def test_ldl_va_target_is_the_mean_of_the_top_voted_emotions(published, default):
    """dataset.py 191-204: labels = every emotion with the maximum vote; VA = their anchors' mean."""
    assert published.stage().loss.ldl_va_target == "top_votes"
    assert default.stage().loss.ldl_va_target == "distribution"
    votes = np.array([[3, 0, 5, 5, 1, 0, 0, 2], [0, 9, 1, 0, 0, 0, 0, 0]], dtype=np.float64)
    anchors_sam = _lexicon_sam(FI_EMO_CTG)
    expected_sam = np.stack([anchors_sam[np.where(row == row.max())[0]].mean(0) for row in votes])
    dist = torch.tensor(votes / votes.sum(1, keepdims=True), dtype=torch.float32)
    batch = {"valence": torch.zeros(2), "arousal": torch.zeros(2), "label_dist": dist,
             "has_dist": torch.ones(2, dtype=torch.bool), "va_lexicon": torch.ones(2, dtype=torch.bool)}
    canonical = torch.tensor((anchors_sam - 5) / 4, dtype=torch.float32)
    got = losses.va_targets(batch, "top_votes", canonical)
    np.testing.assert_allclose(got.numpy() * 4 + 5, expected_sam, rtol=1e-5)
    # Measured VA (Emotion6 carries a distribution too) is never replaced.
    measured = {**batch, "va_lexicon": torch.zeros(2, dtype=torch.bool)}
    assert torch.equal(losses.va_targets(measured, "top_votes", canonical), torch.zeros(2, 2))


def test_ldl_category_loss_is_bce_on_the_top_vote_multi_hot(published, default):
    """train.py 93, 316-318: ``BCELoss()(sigmoid(logits), labels)`` with the multi-hot labels."""
    assert published.stage().loss.ldl_category_loss == "bce_top_votes"
    assert default.stage().loss.ldl_category_loss == "kl"
    torch.manual_seed(2)
    logits = torch.randn(3, 8)
    votes = torch.tensor([[3, 0, 5, 5, 1, 0, 0, 2], [0, 9, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1.0]])
    multi_hot = (votes == votes.max(1, keepdim=True).values).float()
    published_bce = nn.BCELoss()(torch.sigmoid(logits), multi_hot)
    ours = losses.multilabel_loss(logits, votes / votes.sum(1, keepdim=True))
    torch.testing.assert_close(ours, published_bce, rtol=1e-5, atol=1e-6)


def test_ldl_predictions_decode_with_sigmoid_above_one_half():
    """train.py 223-226: ``where(sigmoid(logits) > 0.5, 1, 0)`` against the top-vote multi-hot, scored with
    sklearn's weighted Jaccard (train.py 114)."""
    skm = pytest.importorskip("sklearn.metrics")
    from emotion_models.losses import LossSpec
    from pipelines.objectives import VAObjective

    rng = np.random.default_rng(4)
    logits = rng.normal(size=(30, 8)).astype(np.float32)
    dist = rng.dirichlet(np.ones(8), 30).astype(np.float32)
    arrays = {"va_pred": np.zeros((30, 2), np.float32), "va_true": np.zeros((30, 2), np.float32),
              "has_va": np.zeros(30, bool), "label": dist.argmax(1), "has_dist": np.ones(30, bool),
              "label_dist": dist, "logit": logits}
    spec = LossSpec(ldl_category_loss="bce_top_votes")
    out = VAObjective(spec, num_classes=8, accuracy_from="logits").metrics(arrays)
    truth = (dist == dist.max(1, keepdims=True)).astype(int)
    predicted = np.where(1 / (1 + np.exp(-logits)) > 0.5, 1, 0)
    assert out["ldl_jaccard"] == pytest.approx(skm.jaccard_score(truth, predicted, average="weighted",
                                                                 zero_division=0))


def _published_cosine_decode(va_sam: np.ndarray, names, multi_label: bool):
    """utils.py ConvertLogitsToClasses: cosine similarity of each (v, a) on the 1..9 scale to every
    category's lexicon (v, a) on the same scale; argmax, or every category above 0.5 for LDL sets."""
    anchors = _lexicon_sam(names)
    out = []
    for row in va_sam:
        cos = np.array([row @ a / max(np.linalg.norm(row) * np.linalg.norm(a), 1e-6) for a in anchors])
        out.append((cos > 0.5).astype(int) if multi_label else int(np.argmax(cos)))
    return np.array(out)


@pytest.mark.parametrize("multi_label", [False, True])
def test_single_task_accuracy_decodes_va_by_cosine_on_the_sam_scale(published, default, multi_label):
    assert published.stage().loss.anchor_decode == "cosine_sam"
    assert default.stage().loss.anchor_decode == "nearest"
    rng = np.random.default_rng(7)
    va_sam = rng.uniform(1, 9, (50, 2))
    canonical_anchors = (_lexicon_sam(FI_EMO_CTG) - 5) / 4
    ours = losses.cosine_anchor((va_sam - 5) / 4, canonical_anchors, multi_label=multi_label)
    np.testing.assert_array_equal(ours, _published_cosine_decode(va_sam, FI_EMO_CTG, multi_label))
    if not multi_label:   # the nearest anchor (the project's) decodes differently on some rows
        nearest = np.asarray(losses.nearest_anchor((va_sam - 5) / 4, canonical_anchors))
        assert (nearest != ours).any()


def test_ldl_test_split_is_the_training_images_in_the_published_recipe(published, default):
    """dataset.py 177-185: ``DimensionalDataset`` reads ``train/`` in its test mode too."""
    assert published.stage().data.ldl_test == "training_images"
    assert default.stage().data.ldl_test == "own_split"


def test_precision_is_fp32_published_and_bf16_on_gpus_by_default(published, default):
    """No autocast anywhere in the published code; the project's default is bf16 on GPUs only."""
    assert published.stage().precision == "fp32" and default.stage().precision == "auto"
    assert core.Precision.for_device(torch.device("cuda"), "fp32").amp_dtype is None
    assert core.Precision.for_device(torch.device("cuda"), "auto").amp_dtype == torch.bfloat16
    assert core.Precision.for_device("cpu", "auto").amp_dtype is None


# ----------------------------------------------------------------------------- the two files

def test_default_names_each_correction_and_changes_nothing_else(published, default):
    """default.yaml extends published.yaml: every field it changes is a line of its own in the file (with
    its reason), and every field it does not name is the published value."""
    import yaml

    from pipelines.recipe import RECIPES_DIR

    own = yaml.safe_load((RECIPES_DIR / "two_stage" / "default.yaml").read_text())
    assert own.pop("extends") == "published"
    text = (RECIPES_DIR / "two_stage" / "default.yaml").read_text()
    changed = []

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}.{key}")
            else:
                changed.append(f"{path}.{key}")
                line = next(l for l in text.splitlines() if l.strip().startswith(f"{key}:"))
                assert "#" in line or key in ("std", "interpolation", "crop_pct", "floor", "stop", "keep",
                                              "warmup_epochs", "ldl_category_loss"), f"{path}.{key} has no reason"

    for section, fields in own.items():
        if isinstance(fields, dict):
            walk(fields, section)
    for section in SECTIONS:
        a, b = published.raw(section), default.raw(section)
        flat_a, flat_b = _flatten(a), _flatten(b)
        for key in set(flat_a) | set(flat_b):
            if flat_a.get(key) != flat_b.get(key):
                assert any(f"{s}.{key}" in changed for s in ("stage", section)), (section, key)


def _flatten(node, prefix=""):
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_published_field_is_what_a_flag_sets_alone():
    """Each published behaviour is a named field a flag sets on its own (the interface of the recipe)."""
    from pipelines import cli, two_stage

    argv = ["--schedule", "multistep_per_batch", "--select", "val_pearson_v_last_on_stop",
            "--stage2-batching", "pool", "--ldl-va-target", "top_votes", "--ldl-category-loss", "bce_top_votes",
            "--anchor-decode", "cosine_sam", "--head", "relu_linear", "--precision", "fp32", "--max-side", "0",
            "--val-augment", "emotion6", "ldl", "--crop-scale", "0.08", "1.0", "--ldl-test", "training_images",
            "--stage1-multi-val", "dimensional", "--freeze-until", "published"]
    plan = two_stage.configure(cli.parse_args(two_stage.build_parser(), argv))
    stage2 = plan.recipe.stage("stage2", "stage2_multi")
    stage1 = plan.recipe.stage("stage1", "stage1_multi")
    assert stage2.schedule.name == "multistep_per_batch" and stage2.select.keep == "last_on_stop"
    assert stage2.select.floor == 0.0 and stage2.select.stop == "patience_exceeded"
    assert stage2.batching == "pool" and stage2.loss.ldl_va_target == "top_votes"
    assert stage2.loss.ldl_category_loss == "bce_top_votes" and stage2.loss.anchor_decode == "cosine_sam"
    assert stage2.model.head == "relu_linear" and stage2.precision == "fp32" and stage2.prep.max_side == 0
    assert stage2.prep.val_augment == ("emotion6", "ldl") and stage2.prep.scale == (0.08, 1.0)
    assert stage2.data.ldl_test == "training_images" and stage1.val == "dimensional"
    assert math.isclose(stage2.loss.va_weight, 0.9)
