"""Classification metrics, feature extraction, weighted k-NN and the batched linear-probe sweep."""

from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from mae_transfer.classification.knn import extract_features, knn_classify, knn_evaluate
from mae_transfer.classification.linear_sweep import linear_probe_sweep
from mae_transfer.classification.metrics import ClassificationMeter, evaluate_classifier
from mae_transfer.engine.sampler import ShardSampler
from mae_transfer.models.vit import VisionTransformer


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: with several intra-op threads on a loaded 2-core machine, OpenMP spinning
    # makes each op ~1000x slower than running it on one thread.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- helpers
class DictDataset(Dataset):
    """Items ``{"image", "label"[, "index"]}`` like the toolkit's datasets."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, with_index: bool = True):
        self.images, self.labels, self.with_index = images, labels, with_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "label": int(self.labels[i])}
        if self.with_index:
            item["index"] = i
        return item


class PermutedSampler(Sampler[int]):
    def __init__(self, order):
        self.order = list(order)

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def simulated_all_reduce(meters: list[ClassificationMeter]) -> ClassificationMeter:
    """What all_reduce computes over ranks: the element-wise sum of every raw count."""
    out = ClassificationMeter(meters[0].num_classes)
    out.correct_per_class = sum(m.correct_per_class for m in meters)
    out.total_per_class = sum(m.total_per_class for m in meters)
    out.correct_topk = sum(m.correct_topk for m in meters)
    out.num_samples = sum(m.num_samples for m in meters)
    return out


def toy_images(n: int = 7, num_classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % num_classes


def toy_classifier(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, num_classes), nn.Dropout(0.5))


def toy_vit() -> VisionTransformer:
    torch.manual_seed(2)
    return VisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0, global_pool="token"
    )


def gaussian_clusters(n: int, num_classes: int, dim: int, seed: int, spread: float = 0.3, centers=None):
    g = torch.Generator().manual_seed(seed)
    if centers is None:
        centers = torch.randn(num_classes, dim, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[y] + spread * torch.randn(n, dim, generator=g)
    return x, y, centers


# ---------------------------------------------------------------------- meter
def test_meter_hand_computed_with_ties_and_missing_classes():
    c = 7
    ramp = [0.0, 1, 2, 3, 4, 5, 6]
    logits = torch.tensor(
        [
            [0, 3, 3, 0, 0, 0, 0],  # target 1 ties class 2: lower index wins -> top-1 hit
            [0, 3, 3, 0, 0, 0, 0],  # target 2 ties class 1, which ranks ahead -> miss, top-5 hit
            ramp,  # target 0: rank 6 -> miss, top-5 miss
            ramp,  # target 6: rank 0 -> hit
            [5.0] * 7,  # target 0, all tied: rank 0 -> hit
            [5.0] * 7,  # target 6, all tied: 6 classes ahead -> miss, top-5 miss
            ramp,  # target 3: 3 classes ahead -> miss, top-5 hit
        ]
    )
    targets = torch.tensor([1, 2, 0, 6, 0, 6, 3])
    m = ClassificationMeter(c)
    m.update(logits, targets)
    r = m.compute()
    assert r["num_samples"] == 7
    assert r["top1"] == pytest.approx(100 * 3 / 7)
    assert r["top5"] == pytest.approx(100 * 5 / 7)
    # Classes 4 and 5 have no sample and are left out: recalls 1/2, 1, 0, 0, 1/2 over 5 classes.
    assert r["num_classes_evaluated"] == 5
    assert r["mean_per_class"] == pytest.approx(100 * (0.5 + 1 + 0 + 0 + 0.5) / 5)
    # Top-1 follows torch.argmax's tie rule (first maximal index).
    assert int(m.correct_per_class.sum()) == int((logits.argmax(1) == targets).sum())
    assert m.correct_per_class.tolist() == [1, 1, 0, 0, 0, 0, 1]
    assert m.total_per_class.tolist() == [2, 1, 1, 1, 0, 0, 2]

    # Batch boundaries do not matter.
    m2 = ClassificationMeter(c)
    for s in range(0, 7, 3):
        m2.update(logits[s : s + 3], targets[s : s + 3])
    assert m2.compute() == r


def test_meter_top5_with_fewer_than_five_classes_and_nan_rows():
    logits = torch.tensor([[0.1, 0.5, 0.2], [2.0, 1.0, 0.0], [float("nan"), 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = torch.tensor([1, 2, 1, 2])
    m = ClassificationMeter(3)
    assert m.topk == 3
    m.update(logits, targets)
    r = m.compute()
    assert r["top1"] == pytest.approx(50.0)  # rows 0 and 3
    # Top-k with k = C covers every class, except the NaN row, which never counts as correct.
    assert r["top5"] == pytest.approx(75.0)
    assert r["mean_per_class"] == pytest.approx(100 * (1 / 2 + 1 / 2) / 2)
    assert r["num_classes_evaluated"] == 2


def test_meter_rejects_soft_and_bad_targets():
    m = ClassificationMeter(4)
    logits = torch.randn(3, 4)
    soft = torch.softmax(torch.randn(3, 4), 1)
    with pytest.raises(ValueError, match="soft"):
        m.update(logits, soft)
    with pytest.raises(ValueError, match="integer"):
        m.update(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        m.update(logits, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="shape"):
        m.update(torch.randn(3, 5), torch.tensor([0, 1, 2]))
    assert m.compute()["num_samples"] == 0
    assert math.isnan(m.compute()["top1"])


def test_meter_split_over_two_processes_equals_one():
    g = torch.Generator().manual_seed(0)
    c, b = 10, 200
    logits = torch.randn(b, c, generator=g)
    targets = torch.randint(0, c, (b,), generator=g)
    targets[targets == 7] = 3  # class 7 without samples
    whole = ClassificationMeter(c)
    whole.update(logits, targets)
    a, bm = ClassificationMeter(c), ClassificationMeter(c)
    a.update(logits[:83], targets[:83])  # unequal shards, as with real sharding
    bm.update(logits[83:], targets[83:])
    assert simulated_all_reduce([a, bm]).compute() == whole.compute()
    assert a.merge(bm).compute() == whole.compute()
    assert whole.all_reduce() is whole  # no process group: a no-op

    # Independent numpy reference.
    lg, t = logits.numpy(), targets.numpy()
    order = np.argsort(-lg, axis=1, kind="stable")
    top1 = order[:, 0] == t
    top5 = (order[:, :5] == t[:, None]).any(1)
    recalls = [top1[t == k].mean() for k in range(c) if (t == k).any()]
    r = whole.compute()
    assert r["top1"] == pytest.approx(100 * top1.mean())
    assert r["top5"] == pytest.approx(100 * top5.mean())
    assert r["mean_per_class"] == pytest.approx(100 * np.mean(recalls))
    assert r["num_classes_evaluated"] == c - 1


def test_evaluate_classifier_matches_direct_and_restores_modes(capsys):
    images, labels = toy_images(11)
    model = toy_classifier()
    model.train()
    model[2].eval()  # a submodule in another mode must come back as it was
    loader = DataLoader(DictDataset(images, labels), batch_size=4)
    r = evaluate_classifier(
        model, loader, "cpu", 3, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=False)
    )
    assert model.training and model[1].training and not model[2].training
    model.eval()
    with torch.no_grad():
        ref = ClassificationMeter(3)
        ref.update(model(images), labels)
    assert r == ref.compute()
    assert r["num_samples"] == 11
    # A progress bar while it runs, as the COCO and ADE20K evaluations show (issue 23, 9b).
    assert "evaluating" in capsys.readouterr().err
    evaluate_classifier(model, loader, "cpu", 3, desc=None)
    assert "evaluating" not in capsys.readouterr().err  # desc=None: no bar (log lines of other handlers may appear)


# ---------------------------------------------------------------------- feature extraction
def test_extract_features_orders_by_index_and_restores_modes(capsys):
    images, labels = toy_images(9)
    vit = toy_vit()
    vit.train()
    order = [4, 8, 0, 2, 7, 1, 3, 6, 5]
    loader = DataLoader(DictDataset(images, labels), batch_size=4, sampler=PermutedSampler(order))
    f, y, idx = extract_features(vit, loader, "cpu")
    assert "extracting features" in capsys.readouterr().err  # the progress bar of a k-NN run's extraction
    assert vit.training
    assert idx.tolist() == list(range(9))
    assert torch.equal(y, labels)
    vit.eval()
    with torch.no_grad():
        ref = vit.forward_head(vit.forward_features(images), pre_logits=True)
    assert f.dtype == torch.float32 and f.shape == (9, 32)
    torch.testing.assert_close(f, ref, rtol=1e-5, atol=1e-6)

    # Custom feature function, no "index" key: loader positions.
    loader = DataLoader(DictDataset(images, labels, with_index=False), batch_size=4)
    f2, _, idx2 = extract_features(vit, loader, "cpu", feature_fn=lambda m, x: m.forward_features(x)[:, 0])
    assert idx2.tolist() == list(range(9))
    torch.testing.assert_close(f2, ref, rtol=1e-5, atol=1e-6)  # token pooling == class token


def test_knn_on_the_toy_data_defaults_to_the_micro_vit_of_the_other_toy_runs():
    from mae_transfer.classification.config import build_config
    from mae_transfer.classification.frozen import frozen_model

    toy = build_config("toy_finetune").model
    assert frozen_model({}, None, None, toy=True) == (toy.name, toy.img_size) == ("vit_micro_patch8", 64)
    assert frozen_model({}, None, 96, toy=True) == ("vit_micro_patch8", 96)
    assert frozen_model({}, None, None, toy=False) == ("vit_base_patch16", 224)  # real data: the paper's ViT-B
    assert frozen_model({"name": "vit_large_patch16", "img_size": 224}, None, None, toy=True) == (
        "vit_large_patch16",
        224,
    )
    assert frozen_model({}, "vit_small_patch16", None, toy=True) == ("vit_small_patch16", 224)


# ---------------------------------------------------------------------- k-NN
def test_knn_separated_clusters_are_classified_perfectly():
    xtr, ytr, centers = gaussian_clusters(400, 6, 24, seed=0, spread=0.1)
    xte, yte, _ = gaussian_clusters(150, 6, 24, seed=1, spread=0.1, centers=centers)
    res = knn_evaluate(xtr, ytr, xte, yte, 6, ks=(1, 10, 20, 100), device="cpu")
    assert list(res) == [1, 10, 20, 100]
    for k, r in res.items():
        assert r["top1"] == 100.0 and r["mean_per_class"] == 100.0 and r["num_samples"] == 150, k
    scores = knn_classify(xtr, ytr, xte, 6, k=20, device="cpu")
    assert torch.equal(scores.argmax(1), yte)


def test_knn_k1_is_cosine_nearest_neighbour_and_matches_naive_weighted_vote():
    g = torch.Generator().manual_seed(3)
    c, t = 5, 0.07
    xtr, ytr = torch.randn(300, 16, generator=g), torch.randint(0, c, (300,), generator=g)
    xte, yte = torch.randn(80, 16, generator=g), torch.randint(0, c, (80,), generator=g)
    a = xtr.numpy().astype(np.float64)
    q = xte.numpy().astype(np.float64)
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (a / np.linalg.norm(a, axis=1, keepdims=True)).T
    nn_idx = sims.argmax(1)

    s1 = knn_classify(xtr, ytr, xte, c, k=1, temperature=t, device="cpu")
    assert s1.argmax(1).tolist() == ytr.numpy()[nn_idx].tolist()
    np.testing.assert_allclose(s1.max(1).values.numpy(), np.exp(sims.max(1) / t), rtol=1e-4)
    r1 = knn_evaluate(xtr, ytr, xte, yte, c, ks=(1,), temperature=t, device="cpu")[1]
    assert r1["top1"] == pytest.approx(100 * np.mean(ytr.numpy()[nn_idx] == yte.numpy()))

    # Weighted vote for k=7, naively.
    k = 7
    top = np.argsort(-sims, axis=1)[:, :k]
    ref = np.zeros((80, c))
    for i in range(80):
        for j in top[i]:
            ref[i, ytr[j]] += np.exp(sims[i, j] / t)
    s7 = knn_classify(xtr, ytr, xte, c, k=k, temperature=t, device="cpu")
    np.testing.assert_allclose(s7.numpy(), ref, rtol=1e-4)


def test_knn_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(4)
    c = 9
    xtr, ytr = torch.randn(257, 12, generator=g), torch.randint(0, c, (257,), generator=g)
    xte, yte = torch.randn(61, 12, generator=g), torch.randint(0, c, (61,), generator=g)
    full = knn_classify(xtr, ytr, xte, c, k=20, batch_size=10_000, train_chunk_size=10**6, device="cpu")
    chunked = knn_classify(xtr, ytr, xte, c, k=20, batch_size=7, train_chunk_size=13, device="cpu")
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=0.0)
    ks = (1, 5, 20, 1000)  # 1000 > N: all 257 vote
    a = knn_evaluate(xtr, ytr, xte, yte, c, ks=ks, batch_size=10_000, train_chunk_size=10**6, device="cpu")
    b = knn_evaluate(xtr, ytr, xte, yte, c, ks=ks, batch_size=5, train_chunk_size=11, device="cpu")
    assert a == b
    everyone = knn_classify(xtr, ytr, xte, c, k=257, device="cpu")
    m = ClassificationMeter(c)
    m.update(everyone, yte)
    assert a[1000] == m.compute()


# ---------------------------------------------------------------------- linear sweep
def _separable(n: int, seed: int, centers=None):
    return gaussian_clusters(n, 4, 16, seed=seed, spread=0.5, centers=centers)


def test_sweep_learns_separable_data():
    xtr, ytr, centers = _separable(1200, 0)
    xva, yva, _ = _separable(400, 1, centers)
    xtr, xva = 5 * xtr + 3, 5 * xva + 3  # scale/offset that the BatchNorm must undo
    out = linear_probe_sweep(xtr, ytr, xva, yva, 4, lrs=(0.001, 0.01, 0.1), epochs=5, batch_size=64, device="cpu")
    assert [r["lr"] for r in out["results"]] == [0.001, 0.01, 0.1]
    assert out["best"]["top1"] > 95.0
    assert out["best_lr"] == out["best"]["lr"]
    assert out["best"]["top1"] == max(r["top1"] for r in out["results"])
    assert all(not r["failed"] and r["num_samples"] == 400 for r in out["results"])


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_sweep_heads_equal_separate_runs(optimizer):
    # Overlapping clusters, so heads keep learning and differ per lr.
    xtr, ytr, centers = gaussian_clusters(500, 5, 12, seed=5, spread=1.0)
    xva, yva, _ = gaussian_clusters(200, 5, 12, seed=6, spread=1.0, centers=centers)
    lrs = (0.003, 0.03, 0.3, 3.0)
    kw = dict(
        epochs=4,
        batch_size=32,
        weight_decay=1e-3,
        device="cpu",
        seed=11,
        optimizer=optimizer,
        warmup_epochs=1,
        return_weights=True,
    )
    together = linear_probe_sweep(xtr, ytr, xva, yva, 5, lrs=lrs, **kw)
    for i, lr in enumerate(lrs):
        alone = linear_probe_sweep(xtr, ytr, xva, yva, 5, lrs=(lr,), **kw)
        torch.testing.assert_close(together["weight"][i], alone["weight"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(together["bias"][i], alone["bias"][0], rtol=0, atol=1e-5)
        for key in ("top1", "top5", "mean_per_class"):
            assert together["results"][i][key] == pytest.approx(alone["results"][0][key]), (lr, key)
    # The lrs really trained different heads.
    assert not torch.allclose(together["weight"][0], together["weight"][-1])


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_sweep_matches_torch_reference_training(optimizer):
    """The hand-written batched update equals BN(affine=False) + nn.Linear + torch.optim.SGD, or the
    engine's LARS (the one the linprobe command trains with), under the engine's warm-up + cosine."""
    from mae_transfer.engine.optim import Schedule, build_lars

    xtr, ytr, centers = gaussian_clusters(300, 3, 8, seed=7, spread=1.0)
    xva, yva, _ = gaussian_clusters(50, 3, 8, seed=8, spread=1.0, centers=centers)
    lr, wd, epochs, bs, seed = 0.2, 1e-2, 3, 40, 5
    out = linear_probe_sweep(
        xtr,
        ytr,
        xva,
        yva,
        3,
        lrs=(lr,),
        epochs=epochs,
        batch_size=bs,
        weight_decay=wd,
        device="cpu",
        seed=seed,
        optimizer=optimizer,
        warmup_epochs=1,
        return_weights=True,
    )

    x64 = xtr.double()
    mean, var = x64.mean(0), x64.var(0, unbiased=False)
    torch.testing.assert_close(out["mean"], mean.float())
    torch.testing.assert_close(out["std"], (var + 1e-6).sqrt().float())
    xn = ((x64 - mean) / (var + 1e-6).sqrt()).float()
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.empty(8, 3)
    nn.init.trunc_normal_(w0, std=0.01, generator=gen)
    head = nn.Linear(8, 3)
    with torch.no_grad():
        head.weight.copy_(w0.T)
        head.bias.zero_()
    groups = [{"params": [head.weight], "weight_decay": wd}, {"params": [head.bias], "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=lr, momentum=0.9) if optimizer == "sgd" else build_lars(groups, lr)
    steps = len(xtr) // bs
    schedule = Schedule(total_steps=epochs * steps, warmup_steps=steps, peak_lr=lr)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(len(xtr), generator=gen)
        for it in range(steps):
            idx = perm[it * bs : (it + 1) * bs]
            schedule.apply(opt, step)
            loss = nn.functional.cross_entropy(head(xn[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    torch.testing.assert_close(out["weight"][0], head.weight.detach().T, rtol=0, atol=1e-5)
    torch.testing.assert_close(out["bias"][0], head.bias.detach(), rtol=0, atol=1e-5)


def test_sweep_survives_a_diverging_head_and_is_deterministic():
    xtr, ytr, centers = _separable(400, 2)
    xva, yva, _ = _separable(100, 3, centers)
    lrs = (0.05, 1e38, float("inf"))
    out = linear_probe_sweep(xtr, ytr, xva, yva, 4, lrs=lrs, epochs=3, batch_size=50, device="cpu", return_weights=True)
    good, huge, inf = out["results"]
    assert not good["failed"] and good["top1"] > 95.0
    for r in (huge, inf):
        assert r["failed"] and math.isnan(r["top1"]) and math.isnan(r["mean_per_class"])
    assert out["best_lr"] == 0.05 and not out["best"]["failed"]
    assert torch.isfinite(out["weight"]).all()  # dead heads are zeroed, never NaN

    # Same seed, same result; the diverging heads do not change the surviving one.
    again = linear_probe_sweep(
        xtr, ytr, xva, yva, 4, lrs=(0.05,), epochs=3, batch_size=50, device="cpu", return_weights=True
    )
    assert torch.equal(again["weight"][0], out["weight"][0])
    other = linear_probe_sweep(
        xtr, ytr, xva, yva, 4, lrs=(0.05,), epochs=3, batch_size=50, device="cpu", seed=1, return_weights=True
    )
    assert not torch.equal(other["weight"][0], out["weight"][0])

    everything_dies = linear_probe_sweep(
        xtr, ytr, xva, yva, 4, lrs=(float("inf"),), epochs=1, batch_size=50, device="cpu"
    )
    assert everything_dies["best"] is None and everything_dies["best_lr"] is None


# ---------------------------------------------------------------------- two real processes (gloo)
def _knn_inputs():
    xtr, ytr, centers = gaussian_clusters(90, 4, 8, seed=9, spread=1.0)
    xte, yte, _ = gaussian_clusters(31, 4, 8, seed=10, spread=1.0, centers=centers)
    return xtr, ytr, xte, yte


def _gloo_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60)
    )
    try:
        images, labels = toy_images(7)
        out = {}
        # DistributedSampler pads 7 samples to 8: the repeat must not be counted.
        ds = DictDataset(images, labels)
        loader = DataLoader(
            ds, batch_size=3, sampler=DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False)
        )
        out["eval"] = evaluate_classifier(toy_classifier(), loader, "cpu", 3)

        logits = torch.randn(13, 3, generator=torch.Generator().manual_seed(0))
        targets = torch.arange(13) % 3
        m = ClassificationMeter(3)
        m.update(logits[rank::world], targets[rank::world])
        out["meter"] = m.all_reduce().compute()

        vit = toy_vit()
        shard = DataLoader(ds, batch_size=2, sampler=ShardSampler(len(ds), rank, world))  # 4 and 3 samples
        out["shard"] = extract_features(vit, shard, "cpu")
        no_index = DictDataset(images, labels, with_index=False)
        padded = DataLoader(
            no_index,
            batch_size=2,
            sampler=DistributedSampler(no_index, num_replicas=world, rank=rank, shuffle=True, seed=3),
        )
        out["padded"] = extract_features(vit, padded, "cpu")

        xtr, ytr, xte, yte = _knn_inputs()
        out["knn"] = knn_evaluate(xtr, ytr, xte, yte, 4, ks=(1, 5), device="cpu")
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_single_process_numbers(tmp_path):
    images, labels = toy_images(7)
    single_eval = evaluate_classifier(toy_classifier(), DataLoader(DictDataset(images, labels), batch_size=3), "cpu", 3)
    logits = torch.randn(13, 3, generator=torch.Generator().manual_seed(0))
    m = ClassificationMeter(3)
    m.update(logits, torch.arange(13) % 3)
    single_meter = m.compute()
    vit = toy_vit()
    f, y, idx = extract_features(vit, DataLoader(DictDataset(images, labels), batch_size=7), "cpu")
    single_knn = knn_evaluate(*_knn_inputs(), 4, ks=(1, 5), device="cpu")

    mp.spawn(_gloo_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        assert out["eval"] == single_eval and out["eval"]["num_samples"] == 7
        assert out["meter"] == single_meter
        for key in ("shard", "padded"):
            f2, y2, idx2 = out[key]
            assert idx2.tolist() == list(range(7)), key
            assert torch.equal(y2, y), key
            torch.testing.assert_close(f2, f, rtol=1e-5, atol=1e-6)
        assert out["knn"] == single_knn
