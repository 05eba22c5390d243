"""Side by side: our MAE + UperNet segmenter against mmsegmentation 1.2.2's own code (ADE20K setup).

Both models carry the weights of ``<shared>/reference/mmseg_upernet/checkpoint.pth``: mmsegmentation
builds its model from that folder's ``config.py`` (its registry, ``MAE`` backbone, ``Feature2Pyramid``,
``UPerHead``, ``FCNHead``, ``EncoderDecoder``) and loads the state dict as it is; ours is built the
way ``mae-transfer ade20k --eval-only --weights checkpoint.pth`` builds it (``read_segmenter_weights``,
``build_config``, ``SegmentationTask``, ``build_segmenter``, ``load_segmenter_weights``), as
``tests/test_mmseg_parity.py`` does. Workloads, each on the same tensors for both sides:

* ``slide``: sliding-window logits of the three reference inputs (``input/*.png``, normalised
  once), no resize: ``EncoderDecoder.inference`` against our ``slide_inference``.
* ``predict``: the same normalised images to label maps at the original size (slide, bilinear
  resize, argmax): ``EncoderDecoder.predict`` against ``task.predict_logits`` + ``task.prediction``.
* ``evaluate``: the whole evaluation from the JPEG files: each side's own dataset (decode, test
  resize, annotation), normaliser, prediction and IoU metric (mmseg's ``ADE20KDataset`` with the
  config's test pipeline, ``SegDataPreProcessor``, ``predict``, ``IoUMetric``; our ``val_set``,
  ``predict_batch``-equivalent calls and ``SegmentationEvaluator``).
* ``train_step``: forward + backward of a batch of two 256 x 256 crops (normalised images and
  label maps with ``reduce_zero_label``) with the decode loss + 0.4 x auxiliary loss
  (``EncoderDecoder.loss`` + ``parse_losses`` against ``task.training_step``). BatchNorm is in
  training mode on both sides; dropout and drop path are switched off on both (their random draws
  cannot be the same in two implementations, and the losses are compared); ``--dropout`` keeps
  them on, and then the losses and gradients are not compared.

mmsegmentation is not a dependency: it is imported from ``--site`` (a ``pip install --target``
folder, see README.md). mmcv-lite has no compiled ops; ``mmcv.ops`` is replaced by a
stub module whose names raise when used (none is used by this model).

    python benchmarks/side_by_side/upernet.py [--ours-src ../before] [--pairs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import types
import warnings
from pathlib import Path

from common import Result, alternate, print_ops, print_table, top_ops, use_source_tree, write_json

DEFAULT_SITE = os.environ.get("MMSEG_SITE", str(Path(__file__).resolve().parents[3] / "refs" / "mmseg_site"))
DEFAULT_SHARED = Path(os.environ.get("MAE_TRANSFER_SHARED", Path(__file__).resolve().parents[3] / "shared"))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--site", default=DEFAULT_SITE, help="folder with mmsegmentation, mmengine, mmcv-lite (env MMSEG_SITE)"
    )
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder (reference/, data/)")
    p.add_argument("--ours-src", default=None, help="import mae_transfer from this checkout (before numbers)")
    p.add_argument("--pairs", type=int, default=3, help="alternating (reference, ours) pairs per workload")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--workloads", default="slide,predict,evaluate,train_step", help="comma-separated subset")
    p.add_argument("--dropout", action="store_true", help="train_step with dropout / drop path on (no comparison)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler pass of our side")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------- helpers
def stub_mmcv_ops() -> None:
    """``mmcv.ops`` for mmcv-lite, which ships none of its compiled ops: any name (mmseg imports
    ``point_sample``, ``sigmoid_focal_loss``, ... at import time) is a class that raises when it is
    called or instantiated, so that an op that were used would fail loudly."""
    mod = types.ModuleType("mmcv.ops")

    def missing(name: str):
        def fail(*args, **kwargs):
            raise NotImplementedError(f"mmcv.ops.{name}: compiled mmcv op, not available in mmcv-lite")

        return type(name, (), {"__init__": fail, "__call__": fail, "__module__": "mmcv.ops"})

    def module_getattr(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        op = missing(name)
        setattr(mod, name, op)
        return op

    mod.__getattr__ = module_getattr  # PEP 562
    sys.modules["mmcv.ops"] = mod


def import_mmseg(site: str):
    if not (Path(site) / "mmseg").is_dir():
        sys.exit(f"mmsegmentation not found in --site {site} (see README.md for the install)")
    sys.path.append(str(Path(site).resolve()))  # after the venv: only what the venv lacks comes from there
    stub_mmcv_ops()
    import mmcv
    import mmseg
    from mmseg.utils import register_all_modules

    mmcv.ops = sys.modules["mmcv.ops"]
    register_all_modules()
    return mmseg


def quiet_dropout(model) -> None:
    """Dropout and drop path of ``model`` to eval mode (the rest, BatchNorm included, untouched)."""
    import torch.nn as nn

    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ == "DropPath":
            m.eval()


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    use_source_tree(args.ours_src)
    import numpy as np
    import torch
    from PIL import Image

    torch.set_num_threads(args.threads)
    import_mmseg(args.site)
    warnings.filterwarnings("ignore")  # mmseg's deprecation notices, torch.meshgrid, ...
    from mmengine.logging import MMLogger

    MMLogger.get_instance("mmengine", log_level="WARNING")  # no per-class IoU table from IoUMetric
    from mmengine.config import Config
    from mmengine.evaluator import Evaluator
    from mmengine.structures import PixelData
    from mmseg.registry import DATASETS, MODELS
    from mmseg.structures import SegDataSample

    import mae_transfer
    from mae_transfer.segmentation.config import build_config
    from mae_transfer.segmentation.model import slide_inference
    from mae_transfer.segmentation.task import (
        SegmentationTask,
        build_segmenter,
        load_segmenter_weights,
        read_segmenter_weights,
    )

    ref_dir = args.shared / "reference" / "mmseg_upernet"
    sample = args.shared / "data" / "ade20k_sample"
    print(f"mae_transfer from {Path(mae_transfer.__file__).parent}")
    print(
        f"mmseg from {Path(sys.modules['mmseg'].__file__).parent}, torch {torch.__version__}, {args.threads} thread(s)"
    )

    # --- reference: mmsegmentation's config, registry and checkpoint
    cfg = Config.fromfile(str(ref_dir / "config.py"))
    ref_model = MODELS.build(cfg.model)
    ck = torch.load(ref_dir / "checkpoint.pth", weights_only=True)
    ref_model.load_state_dict(ck["state_dict"], strict=True)
    ref_model.eval()

    # --- ours: what `mae-transfer ade20k --eval-only --weights checkpoint.pth --data SAMPLE` builds
    state, saved = read_segmenter_weights(ref_dir / "checkpoint.pth")
    our_cfg = build_config(None, {**saved, "data": {**saved["data"], "path": str(sample)}, "train": {"num_workers": 0}})
    task = SegmentationTask(our_cfg, train=False)
    model = build_segmenter(our_cfg)
    load_segmenter_weights(model, state, ref_dir / "checkpoint.pth")
    model.eval()
    num_classes = our_cfg.data.num_classes
    crop, stride = our_cfg.model.img_size, our_cfg.test.stride
    assert (crop, stride) == (cfg.model.test_cfg.crop_size[0], cfg.model.test_cfg.stride[0])

    meta = torch.load(ref_dir / "reference.pt", weights_only=True)["images"]
    names = [m["name"] for m in meta]
    rgb = [
        torch.from_numpy(np.asarray(Image.open(ref_dir / "input" / f"{n}.png")).copy()).permute(2, 0, 1) for n in names
    ]
    # mmseg's SegDataPreProcessor normalises BGR input (bgr_to_rgb) and ours RGB: the same image.
    prep = ref_model.data_preprocessor
    ref_inputs = [prep({"inputs": [x.flip(0)], "data_samples": None}, False)["inputs"] for x in rgb]
    our_inputs = [task.val_set.transform.normalise(x)[None] for x in rgb]
    pre_diff = max(float((a - b).abs().max()) for a, b in zip(ref_inputs, our_inputs))
    print(f"normalised inputs: max |mmseg - ours| = {pre_diff:.2e}")
    inputs = our_inputs  # one tensor per image, fed to both sides

    def metas(i: int) -> dict:
        h, w = inputs[i].shape[-2:]
        return dict(
            img_shape=(h, w),
            ori_shape=tuple(int(v) for v in meta[i]["ori_shape"]),
            pad_shape=(h, w),
            padding_size=[0] * 4,
        )

    wanted = set(args.workloads.split(","))
    no_autocast = contextlib.nullcontext  # fp32 on both sides, as mmseg's test loop
    results: list[Result] = []
    profiles: dict[str, list[dict]] = {}

    def run(name: str, reference, ours, check) -> None:
        print(f"\n{name}", flush=True)
        equal, text = check(reference(), ours())
        print(f"  check: {text}")
        r = alternate(name, reference, ours, pairs=args.pairs, warmup=0)  # the check calls were the warm-up
        r.outputs_equal, r.check = equal, text
        results.append(r)
        if not args.no_profile:
            profiles[name] = top_ops(ours)
            print_ops(name, profiles[name])

    # --- slide: sliding-window logits at the resized size
    if "slide" in wanted:

        @torch.no_grad()
        def ref_slide():
            return [ref_model.inference(x, [metas(i)]) for i, x in enumerate(inputs)]

        @torch.no_grad()
        def our_slide():
            return [slide_inference(model, x, num_classes, crop, stride) for x in inputs]

        def check_slide(a, b):
            diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
            labels = sum(int((x.argmax(1) != y.argmax(1)).sum()) for x, y in zip(a, b))
            return diff <= 1e-3 and labels == 0, f"logits max abs diff {diff:.2e}, argmax differs at {labels} px"

        run("slide (3 images)", ref_slide, our_slide, check_slide)

    # --- predict: label maps at the original size
    if "predict" in wanted:

        @torch.no_grad()
        def ref_predict():
            samples = [SegDataSample(metainfo=metas(i)) for i in range(len(inputs))]
            out = [ref_model.predict(x, [s])[0] for x, s in zip(inputs, samples)]
            return [(o.seg_logits.data, o.pred_sem_seg.data[0]) for o in out]

        @torch.no_grad()
        def our_predict():
            out = []
            for i, x in enumerate(inputs):
                scores = task.predict_logits(model, x[0], metas(i)["ori_shape"], no_autocast)
                out.append((scores, task.prediction(scores)))
            return out

        def check_predict(a, b):
            diff = max(float((x[0] - y[0]).abs().max()) for x, y in zip(a, b))
            labels = sum(int((x[1] != y[1]).sum()) for x, y in zip(a, b))
            pixels = sum(x[1].numel() for x in a)
            return labels == 0 and diff <= 1e-3, (
                f"label maps differ at {labels} of {pixels} px, logits max abs diff {diff:.2e}"
            )

        run("predict (3 images)", ref_predict, our_predict, check_predict)

    # --- evaluate: JPEG -> label maps -> IoU metric
    if "evaluate" in wanted:
        ds_cfg = cfg.test_dataloader.dataset.copy()
        ds_cfg.data_root = str(sample)
        ref_ds = DATASETS.build(ds_cfg)
        ref_metric = Evaluator(dict(type="IoUMetric", iou_metrics=["mIoU"]))
        ref_metric.dataset_meta = ref_ds.metainfo
        our_ds = task.val_set
        assert len(ref_ds) == len(our_ds) == 3
        evaluator = task.build_evaluator()

        @torch.no_grad()
        def ref_evaluate():
            labels = []
            for i in range(len(ref_ds)):
                batch = {k: [v] for k, v in ref_ds[i].items()}  # pseudo_collate of one item
                out = ref_model.test_step(batch)
                ref_metric.process(data_samples=out, data_batch=batch)
                labels.append(out[0].pred_sem_seg.data[0])
            with contextlib.redirect_stdout(None):
                metrics = ref_metric.evaluate(len(ref_ds))
            return labels, {k.split("/")[-1]: v for k, v in metrics.items()}

        @torch.no_grad()
        def our_evaluate():
            evaluator.reset()
            labels = []
            for i in range(len(our_ds)):
                image, target = our_ds[i]
                pred = task.prediction(task.predict_logits(model, image, target["label"].shape[-2:], no_autocast))
                evaluator.process(None, (pred, target["label"]))
                labels.append(pred)
            m = evaluator.evaluate()
            return labels, {k: 100 * m[k] for k in ("aAcc", "mIoU", "mAcc")}

        def check_evaluate(a, b):
            labels = sum(int((x != y).sum()) for x, y in zip(a[0], b[0]))
            diffs = {k: abs(float(a[1][k]) - b[1][k]) for k in ("aAcc", "mIoU", "mAcc")}
            # mmseg's IoUMetric returns percent rounded to 2 decimals
            text = (
                f"label maps differ at {labels} px; metrics mmseg {a[1]['mIoU']:.2f}/{a[1]['mAcc']:.2f}/"
                f"{a[1]['aAcc']:.2f}, ours {b[1]['mIoU']:.4f}/{b[1]['mAcc']:.4f}/{b[1]['aAcc']:.4f} (mIoU/mAcc/aAcc)"
            )
            return labels == 0 and all(d <= 0.005 + 1e-9 for d in diffs.values()), text

        run("evaluate (3 JPEGs + metric)", ref_evaluate, our_evaluate, check_evaluate)

    # --- train_step: forward + backward, decode + auxiliary losses
    if "train_step" in wanted:
        import cv2

        xs, ys = [], []
        for i, n in enumerate(names[:2]):
            ann = np.asarray(Image.open(sample / "annotations" / "validation" / f"{n}.png"))
            h, w = inputs[i].shape[-2:]
            ann = cv2.resize(ann, (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int64)
            ann = np.where(ann == 0, 255, ann - 1)  # reduce_zero_label
            x0 = (w - crop) // 2
            xs.append(inputs[i][0, :, :crop, x0 : x0 + crop])
            ys.append(torch.from_numpy(ann[:crop, x0 : x0 + crop].copy()))
        x, y = torch.stack(xs).contiguous(), torch.stack(ys)
        samples = []
        for lab in y:
            s = SegDataSample(metainfo=dict(img_shape=(crop, crop), ori_shape=(crop, crop), pad_shape=(crop, crop)))
            s.gt_sem_seg = PixelData(data=lab[None])
            samples.append(s)
        for m in (ref_model, model):
            m.train()
            if not args.dropout:
                quiet_dropout(m)

        def ref_step():
            ref_model.zero_grad(set_to_none=True)
            losses = ref_model.loss(x, samples)
            loss, log_vars = ref_model.parse_losses(losses)
            loss.backward()
            # mmseg's aux.loss_ce carries its loss_weight 0.4; ours reports the raw auxiliary loss
            aux = losses["aux.loss_ce"].item() / cfg.model.auxiliary_head.loss_decode.loss_weight
            return loss.item(), losses["decode.loss_ce"].item(), aux

        def our_step():
            model.zero_grad(set_to_none=True)
            loss, extra = task.training_step(model, (x, {"label": y}), torch.device("cpu"))
            loss.backward()
            return loss.item(), extra["loss_decode"].item(), extra["loss_aux"].item()

        # mmseg parameter -> ours, through the checkpoint mapping (a rename: the same tensors)
        from mae_transfer.checkpoint.mmseg import to_segmenter_state_dict

        by_ptr = {v.data_ptr(): k for k, v in to_segmenter_state_dict(ref_model.state_dict()).items()}
        ours_params = dict(model.named_parameters())
        pairs = [(ours_params[by_ptr[p.data_ptr()]], p) for _, p in ref_model.named_parameters()]
        assert len(pairs) == len(ours_params), "every parameter of ours has an mmseg counterpart"

        def check_train(a, b):
            if args.dropout:
                return None, "dropout on: losses not compared"
            diff = max(abs(u - v) for u, v in zip(a, b))
            grad = max(float((po.grad - pr.grad).abs().max()) for po, pr in pairs)
            scale = max(float(pr.grad.abs().max()) for _, pr in pairs)
            text = (
                f"loss (total, decode, aux) mmseg {a[0]:.6f}, {a[1]:.6f}, {a[2]:.6f}; ours {b[0]:.6f}, {b[1]:.6f}, "
                f"{b[2]:.6f}: max abs diff {diff:.1e}; "
                f"grads of {len(pairs)} tensors max abs diff {grad:.1e} (largest grad {scale:.1e})"
            )
            return diff <= 1e-5 and grad <= 1e-4 * max(scale, 1.0), text

        run("train_step (2 x 256 px)", ref_step, our_step, check_train)

    print_table(results, f"UperNet: mmsegmentation 1.2.2 (reference) vs mae_transfer (ours), {args.threads} thread(s)")
    write_json(
        results,
        args.json,
        {
            "mae_transfer": str(Path(mae_transfer.__file__).parent),
            "threads": args.threads,
            "torch": torch.__version__,
            "normalised_input_max_diff": pre_diff,
            "profiles": profiles,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
