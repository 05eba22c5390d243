"""ViTDet Mask R-CNN: our detector against detectron2's own code, side by side in one process.

Both models are built from the same checkpoint (``shared/reference/vitdet/model_final.pth``):
detectron2's from its LazyConfig (``lazyconfig.yaml``) with ``DetectionCheckpointer``, ours the way
``mae-transfer coco --eval-only --weights`` builds it (``read_detector_weights``, ``build_config``,
``build_detector``, ``load_detector_weights``). Every workload feeds the same tensors to both and
runs them alternately (``common.alternate``); the outputs are compared before timing.

Workloads:

* ``inference``: coco_tiny val images (test resize to 320 px done once, outside the timing; both
  sides get the same uint8 tensors), one image per call, to detections with masks pasted at the
  original size; then per stage: preprocess + backbone + pyramid, RPN, RoI heads (box and mask
  heads, before post-processing), post-processing (box rescale, clip, mask paste).
* ``train``: one training step (forward + backward, no optimizer step) on a batch of 2 LSJ
  images (ViTDet's jitter: flip, scale 0.1-2.0, 320 px crop) with their boxes, classes and
  polygons. Randomness (drop path, RPN anchor and RoI sampling) is seeded identically right before
  each call on both sides; the loss dicts and gradients are compared.

detectron2 runs from a source tree without its compiled ``_C`` (RoIAlign and NMS are
torchvision's; nothing else this model uses needs ``_C``), with its pure-Python dependencies in a
separate ``--site`` folder; see ``README.md`` for the setup.

    python benchmarks/side_by_side/vitdet.py --images 8 --json vitdet.json
    python benchmarks/side_by_side/vitdet.py --ours-src ../before --images 8   # another revision
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from common import Result, alternate, print_ops, print_table, top_ops, use_source_tree, write_json

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MAE_TRANSFER_SHARED", REPO.parent / "shared"))
D2_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"

# Tolerances of shared/reference/vitdet/README.md ("What an implementation must reproduce").
BOX_TOL, SCORE_TOL, FEATURE_TOL, MASK_IOU_MIN = 0.01, 1e-4, 1e-4, 0.99


# ----------------------------------------------------------------------------- setup


def import_detectron2(d2_dir: str, site: str):
    """Put the detectron2 source tree and its dependency folder first on ``sys.path``."""
    for p in (site, d2_dir):
        if not Path(p).is_dir():
            raise SystemExit(f"{p} not found: set up detectron2 as README.md says (or pass --detectron2/--site)")
        sys.path.insert(0, str(Path(p).resolve()))
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.script, timm.models.layers
    warnings.filterwarnings("ignore", category=UserWarning)
    import detectron2

    return detectron2


def build_reference(ref_dir: Path) -> torch.nn.Module:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate

    cfg = LazyConfig.load(str(ref_dir / "lazyconfig.yaml"))
    model = instantiate(cfg.model)
    DetectionCheckpointer(model).load(str(ref_dir / "model_final.pth"))
    return model.eval()


def build_ours(ref_dir: Path, overrides: dict | None = None) -> torch.nn.Module:
    """Our detector as ``coco --eval-only --weights model_final.pth`` builds it, with ``overrides``
    of ``model.*`` settings (as ``model.KEY=VALUE`` on the command line)."""
    from mae_transfer.detection.config import build_config
    from mae_transfer.detection.task import build_detector, load_detector_weights, read_detector_weights

    path = ref_dir / "model_final.pth"
    state, saved = read_detector_weights(path)
    cfg = build_config(None, {"model": {**saved["model"], **(overrides or {})}})
    model = build_detector(cfg, saved["num_classes"])
    load_detector_weights(model, state, path)
    return model.eval()


def reference_overrides(ref: torch.nn.Module) -> dict:
    """Settings the checkpoint does not hold, taken from detectron2's config: the reference was
    trained with 128 sampled RoIs an image, our default (ViTDet's) is 512."""
    return {"box_batch_size_per_image": int(ref.roi_heads.batch_size_per_image)}


def setting_differences(ref: torch.nn.Module, ours: torch.nn.Module) -> list[str]:
    """Training and test settings of the two built models that differ (should be none)."""
    rpn_r, rpn_o, rh_r, rh_o = ref.proposal_generator, ours.proposal_generator, ref.roi_heads, ours.roi_heads
    pairs = {
        "rpn pre_nms_topk (train, test)": ((rpn_r.pre_nms_topk[True], rpn_r.pre_nms_topk[False]), rpn_o.pre_nms_topk),
        "rpn post_nms_topk (train, test)": (
            (rpn_r.post_nms_topk[True], rpn_r.post_nms_topk[False]),
            rpn_o.post_nms_topk,
        ),
        "rpn nms_thresh": (rpn_r.nms_thresh, rpn_o.nms_thresh),
        "rpn batch_size_per_image": (rpn_r.batch_size_per_image, rpn_o.batch_size_per_image),
        "rpn positive_fraction": (rpn_r.positive_fraction, rpn_o.positive_fraction),
        "roi batch_size_per_image": (rh_r.batch_size_per_image, rh_o.batch_size_per_image),
        "roi positive_fraction": (rh_r.positive_fraction, rh_o.positive_fraction),
        "score_thresh": (rh_r.box_predictor.test_score_thresh, rh_o.score_thresh),
        "nms_thresh": (rh_r.box_predictor.test_nms_thresh, rh_o.nms_thresh),
        "detections_per_img": (rh_r.box_predictor.test_topk_per_image, rh_o.detections_per_img),
        "drop path per block": (
            [round(float(getattr(b.drop_path, "drop_prob", 0.0)), 6) for b in ref.backbone.net.blocks],
            [round(float(getattr(b.drop_path, "drop_prob", 0.0)), 6) for b in ours.vit.blocks],
        ),
    }
    return [f"{k}: reference {a}, ours {b}" for k, (a, b) in pairs.items() if tuple(np.ravel(a)) != tuple(np.ravel(b))]


def source_revision(path: Path) -> str:
    """``<short commit>`` of the checkout holding ``mae_transfer`` (``+dirty`` with local changes)."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--", "mae_transfer"], capture_output=True, text=True
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- comparisons


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


class DetCheck:
    """Accumulates the comparison of per-image detections (d2 ``Instances`` vs our dicts)."""

    def __init__(self):
        self.images = self.count_mismatch = self.class_mismatch = 0
        self.box = self.score = self.mask_prob = 0.0
        self.mask_pixels = 0
        self.mask_iou = 1.0
        self.dets = 0

    def add(self, boxes_r, scores_r, classes_r, boxes_o, scores_o, classes_o, masks_r=None, masks_o=None, probs=False):
        self.images += 1
        if len(boxes_r) != len(boxes_o):
            self.count_mismatch += 1
            return
        self.dets += len(boxes_r)
        if not torch.equal(classes_r.long(), classes_o.long()):
            self.class_mismatch += 1
            return
        self.box = max(self.box, _maxdiff(boxes_r, boxes_o))
        self.score = max(self.score, _maxdiff(scores_r, scores_o))
        if masks_r is None or not len(masks_r):
            return
        if probs:
            self.mask_prob = max(self.mask_prob, _maxdiff(masks_r, masks_o))
            return
        a = masks_r.bool()
        b = masks_o.bool().to(a.device)
        self.mask_pixels += int((a ^ b).sum())
        inter = (a & b).flatten(1).sum(1).float()
        union = (a | b).flatten(1).sum(1).float()
        iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
        self.mask_iou = min(self.mask_iou, float(iou.min()))

    def add_detections(self, r, o: dict) -> None:
        """One image's final detections: detectron2's ``Instances`` ``r`` and our dict ``o``."""
        self.add(
            r.pred_boxes.tensor,
            r.scores,
            r.pred_classes,
            o["boxes"],
            o["scores"],
            o["labels"],
            r.pred_masks,
            o["masks"],
        )

    def ok(self) -> bool:
        return (
            self.count_mismatch == 0
            and self.class_mismatch == 0
            and self.box < BOX_TOL
            and self.score < SCORE_TOL
            and self.mask_prob < FEATURE_TOL
            and self.mask_iou >= MASK_IOU_MIN
        )

    def describe(self, masks: str = "pasted") -> str:
        s = (
            f"{self.images} images, {self.dets} detections; count mismatches {self.count_mismatch}, "
            f"class mismatches {self.class_mismatch}; max |d box| {self.box:.2e} px, max |d score| {self.score:.2e}"
        )
        if masks == "pasted":
            s += f"; mask pixels differing {self.mask_pixels}, min mask IoU {self.mask_iou:.4f}"
        elif masks == "probs":
            s += f"; max |d mask prob| {self.mask_prob:.2e}"
        return s


# ----------------------------------------------------------------------------- inference


def load_val_images(data: Path, n: int, img_size: int, check_d2_resize: bool = True):
    """The first ``n`` val images as (resized uint8 (3, h', w'), original (h, w)), and the largest
    grey-level difference between our test resize and detectron2's ``ResizeShortestEdge``."""
    from mae_transfer.detection.coco import CocoDetection
    from mae_transfer.detection.transforms import resize_for_test

    val = CocoDetection(data, "val2017")
    out, worst = [], 0
    for i in range(min(n, len(val))):
        image, _ = val[i]
        resized = resize_for_test(image, img_size)
        if check_d2_resize:
            from detectron2.data import transforms as T

            hwc = image.permute(1, 2, 0).numpy()
            theirs = T.ResizeShortestEdge(img_size, img_size).get_transform(hwc).apply_image(hwc)
            theirs = torch.from_numpy(np.ascontiguousarray(theirs)).permute(2, 0, 1)
            if theirs.shape != resized.shape:
                worst = 10**9
            else:
                worst = max(worst, int((theirs.int() - resized.int()).abs().max()))
        out.append((resized, (int(image.shape[-2]), int(image.shape[-1]))))
    return out, worst


def ours_postprocess(det: dict, size: tuple[int, int], out_size: tuple[int, int]) -> dict:
    """What ``MaskRCNN.inference`` does after the RoI heads (rescale, clip, drop empty, paste),
    through the same public functions, for the per-stage timing."""
    from mae_transfer.detection.boxes import clip_boxes, nonempty
    from mae_transfer.detection.masks import paste_masks

    (h, w), (oh, ow) = size, out_size
    boxes = det["boxes"].clone()
    boxes[:, 0::2] *= ow / w
    boxes[:, 1::2] *= oh / h
    boxes = clip_boxes(boxes, (oh, ow))
    keep = nonempty(boxes)
    res = {
        "boxes": boxes[keep],
        "scores": det["scores"][keep],
        "labels": det["classes"][keep],
        "mask_probs": det["mask_probs"][keep],
    }
    res["masks"] = paste_masks(res["mask_probs"], res["boxes"], (oh, ow))
    return res


def inference_workloads(ref, ours, images, pairs: int) -> list[Result]:
    from detectron2.modeling import GeneralizedRCNN
    from detectron2.structures import Boxes, Instances

    batches = [[{"image": im, "height": hw[0], "width": hw[1]}] for im, hw in images]
    results = []

    def whole_ref():
        return [ref.inference(b)[0]["instances"] for b in batches]

    def whole_ours():
        return [ours.inference([im], [hw])[0] for im, hw in images]

    with torch.no_grad():
        r_out, o_out = whole_ref(), whole_ours()
        chk = DetCheck()
        for r, o in zip(r_out, o_out):
            chk.add_detections(r, o)
        res = alternate(f"inference, whole pipeline ({len(images)} images)", whole_ref, whole_ours, pairs)
        res.outputs_equal, res.check = chk.ok(), chk.describe("pasted")
        results.append(res)

        # ---- per stage; each stage's inputs are its own side's outputs of the previous stage.
        try:
            results += stage_workloads(ref, ours, images, batches, pairs, GeneralizedRCNN, Boxes, Instances)
        except Exception as e:  # a working tree whose stage API changed: say so, keep the whole-pipeline row
            print(f"  per-stage split not available for this revision: {type(e).__name__}: {e}", flush=True)
    return results


def stage_workloads(ref, ours, images, batches, pairs, GeneralizedRCNN, Boxes, Instances) -> list[Result]:
    results = []
    feats_names = [f"p{i}" for i in range(2, 7)]

    # 1. preprocess + backbone + pyramid
    def s1_ref():
        out = []
        for b in batches:
            il = ref.preprocess_image(b)
            out.append((il, ref.backbone(il.tensor)))
        return out

    def s1_ours():
        out = []
        for im, _ in images:
            x, sizes = ours.preprocess([im])
            out.append((sizes, ours.backbone(x)))
        return out

    r1, o1 = s1_ref(), s1_ours()
    diff = max(_maxdiff(r[1][k], o[1][k]) for r, o in zip(r1, o1) for k in feats_names)
    res = alternate("  stage: preprocess + backbone + pyramid", s1_ref, s1_ours, pairs)
    res.outputs_equal, res.check = diff < FEATURE_TOL, f"max |d feature| over p2-p6 {diff:.2e}"
    results.append(res)

    # 2. RPN
    def s2_ref():
        return [ref.proposal_generator(il, f, None)[0] for il, f in r1]

    def s2_ours():
        return [ours.proposal_generator(f, sizes)[0] for sizes, f in o1]

    r2, o2 = s2_ref(), s2_ours()
    count_ok, logit_d, moved, set_d = True, 0.0, 0, 0.0
    for r, o in zip(r2, o2):
        pr, (ob, ol) = r[0], o[0]
        if len(pr) != len(ob):
            count_ok = False
            continue
        rb = pr.proposal_boxes.tensor
        logit_d = max(logit_d, _maxdiff(pr.objectness_logits, ol))
        moved += int(((rb - ob).abs().amax(1) > 1e-3).sum()) if len(ob) else 0
        # Proposals whose logits tie up to float noise may trade places: compare the sets too.
        if len(ob):
            dist = torch.cdist(rb.double(), ob.double(), p=float("inf"))
            set_d = max(set_d, float(dist.min(1).values.max()), float(dist.min(0).values.max()))
    res = alternate("  stage: RPN", s2_ref, s2_ours, pairs)
    res.outputs_equal = count_ok and logit_d < 1e-4 and set_d < 1e-3
    res.check = (
        f"same proposal counts: {count_ok}; logits in order: max |d| {logit_d:.2e}; boxes as sets: max |d| "
        f"{set_d:.2e} px; {moved} proposals in another place (near-tied logits swapped)"
    )
    results.append(res)

    # 3. RoI heads (box head, predictor, per-class NMS, mask head), before post-processing
    def s3_ref():
        return [ref.roi_heads(il, f, p, None)[0] for (il, f), p in zip(r1, r2)]

    def s3_ours():
        rh = ours.roi_heads
        return [rh.detect([f[k] for k in rh.in_features], [p[0][0]], sizes)[0] for (sizes, f), p in zip(o1, o2)]

    r3, o3 = s3_ref(), s3_ours()
    chk = DetCheck()
    for r, o in zip(r3, o3):
        inst = r[0]
        chk.add(
            inst.pred_boxes.tensor,
            inst.scores,
            inst.pred_classes,
            o["boxes"],
            o["scores"],
            o["classes"],
            inst.pred_masks[:, 0],
            o["mask_probs"],
            probs=True,
        )
    res = alternate("  stage: RoI heads (boxes + mask probs)", s3_ref, s3_ours, pairs)
    res.outputs_equal, res.check = chk.ok(), chk.describe("probs")
    results.append(res)

    # 4. post-processing: rescale, clip, paste masks at the original size
    def fresh(inst):  # detectron2 scales pred_boxes in place: give every call its own copy
        f = inst.get_fields()
        return Instances(
            inst.image_size,
            pred_boxes=Boxes(f["pred_boxes"].tensor.clone()),
            scores=f["scores"],
            pred_classes=f["pred_classes"],
            pred_masks=f["pred_masks"],
        )

    def s4_ref():
        return [
            GeneralizedRCNN._postprocess([fresh(r[0])], b, il.image_sizes)[0]["instances"]
            for r, b, (il, _) in zip(r3, batches, r1)
        ]

    def s4_ours():
        return [ours_postprocess(d, sizes[0], hw) for d, (sizes, _), (_, hw) in zip(o3, o1, images)]

    r4, o4 = s4_ref(), s4_ours()
    chk = DetCheck()
    for r, o in zip(r4, o4):
        chk.add_detections(r, o)
    res = alternate("  stage: post-process + mask paste", s4_ref, s4_ours, pairs)
    res.outputs_equal, res.check = chk.ok(), chk.describe("pasted")
    results.append(res)
    return results


# ----------------------------------------------------------------------------- training


def load_train_batch(data: Path, img_size: int, seed: int, batch: int = 2):
    """``batch`` train images through ViTDet's LSJ (our ``LargeScaleJitter``, seeded), crowds
    dropped, each with at least one polygon instance."""
    from mae_transfer.detection.coco import CocoDetection, drop_crowd
    from mae_transfer.detection.transforms import LargeScaleJitter

    train = CocoDetection(data, "train2017", keep_empty=False)
    lsj = LargeScaleJitter(img_size)
    gen_state = torch.get_rng_state()
    torch.manual_seed(seed)
    images, targets = [], []
    for i in range(len(train)):
        image, target = train[i]
        image, target = lsj(image, drop_crowd(target))
        if len(target["boxes"]) == 0 or any(torch.is_tensor(s) for s in target["segments"]):
            continue  # no instance left, or an RLE bitmask (detectron2's polygon pipeline refuses those)
        images.append(image)
        targets.append(target)
        if len(images) == batch:
            break
    torch.set_rng_state(gen_state)
    return images, targets


def train_workload(ref, ours, images, targets, pairs: int, seed: int) -> Result:
    from detectron2.structures import Boxes, Instances, PolygonMasks
    from detectron2.utils.events import EventStorage

    batched = []
    for im, t in zip(images, targets):
        inst = Instances(tuple(im.shape[-2:]))
        inst.gt_boxes = Boxes(t["boxes"].clone())
        inst.gt_classes = t["labels"].clone()
        inst.gt_masks = PolygonMasks([[np.asarray(p, dtype=np.float64) for p in seg] for seg in t["segments"]])
        batched.append({"image": im, "instances": inst, "height": im.shape[-2], "width": im.shape[-1]})

    def step(model, call):
        torch.manual_seed(seed)  # drop path, RPN anchor and RoI sampling: the same draws on both sides
        model.zero_grad(set_to_none=True)
        losses = call()
        sum(v.float() for v in losses.values()).backward()
        return {k: float(v.detach()) for k, v in losses.items()}

    def step_ref():
        def call():
            with EventStorage(0):
                return ref(batched)

        return step(ref, call)

    def step_ours():
        return step(ours, lambda: ours(images, targets))

    def compare() -> tuple[dict, dict, dict]:
        lr, lo = step_ref(), step_ours()
        grads_r = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        grads_o = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
        names = sorted(set(grads_r) & set(grads_o))
        return (
            lr,
            lo,
            {
                "tensors": f"{len(names)}/{len(grads_r)}",
                "max_diff": max((_maxdiff(grads_r[n], grads_o[n]) for n in names), default=float("nan")),
                "largest": max((float(grads_r[n].abs().max()) for n in names), default=float("nan")),
            },
        )

    def loss_text(lr: dict, lo: dict) -> tuple[str, float]:
        worst = max((abs(lr[k] - lo[k]) for k in lr if k in lo), default=float("nan"))
        if set(lr) != set(lo):
            worst = float("inf")
        return ", ".join(f"{k} {lr[k]:.5f}/{lo.get(k, float('nan')):.5f}" for k in sorted(lr)), worst

    ref.train()
    ours.train()
    saved = (ref.roi_heads.batch_size_per_image, ours.roi_heads.batch_size_per_image)
    try:
        # The check: every RoI sampled on both sides (a 10**6 budget), so that the losses do not
        # depend on the order of proposals whose logits tie up to float noise (see the RPN stage).
        ref.roi_heads.batch_size_per_image = ours.roi_heads.batch_size_per_image = 10**6
        lr_all, lo_all, g_all = compare()
        ref.roi_heads.batch_size_per_image, ours.roi_heads.batch_size_per_image = saved
        # The timed step: the config's 128 RoIs an image, drawn with the same seed on both sides.
        lr, lo, _ = compare()
        res = alternate(f"train step, batch {len(images)} (fwd + bwd)", step_ref, step_ours, pairs)
    finally:
        ref.roi_heads.batch_size_per_image, ours.roi_heads.batch_size_per_image = saved
        ref.eval()
        ours.eval()
    text_all, worst_all = loss_text(lr_all, lo_all)
    text, worst = loss_text(lr, lo)
    res.outputs_equal = worst_all < 1e-4 and g_all["max_diff"] < 1e-4 * max(g_all["largest"], 1.0)
    res.check = (
        f"all RoIs sampled: losses ref/ours {text_all}; max |d loss| {worst_all:.2e}; gradients of "
        f"{g_all['tensors']} tensors: max |d grad| {g_all['max_diff']:.2e} (largest grad {g_all['largest']:.2e}). "
        f"Timed setting (128 RoIs an image, same seed): losses ref/ours {text}; max |d loss| {worst:.2e}"
    )
    return res


# ----------------------------------------------------------------------------- profile


def profile_ours(ours, images, top: int) -> list[dict]:
    def run():
        with torch.no_grad():
            for im, hw in images:
                ours.inference([im], [hw])

    ops = top_ops(run, top)
    print_ops(f"inference ({len(images)} images, profiler on)", ops)
    return ops


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--detectron2",
        default=os.environ.get("DETECTRON2_SRC", str(REPO.parent / "refs" / "detectron2")),
        help="detectron2 source tree (env DETECTRON2_SRC)",
    )
    p.add_argument(
        "--site",
        default=os.environ.get("DETECTRON2_SITE", str(REPO.parent / "refs" / "d2_site")),
        help="folder with detectron2's pure-Python dependencies (env DETECTRON2_SITE)",
    )
    p.add_argument("--ours-src", default=None, help="import mae_transfer from this checkout (e.g. ../before)")
    p.add_argument("--reference", default=str(SHARED / "reference" / "vitdet"), help="the ViTDet reference folder")
    p.add_argument("--data", default=str(SHARED / "data" / "coco_tiny"), help="the coco_tiny folder")
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--images", type=int, default=8, help="val images for the inference workloads (80 in all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default="inference,train", help="comma-separated: inference, train")
    p.add_argument("--profile", type=int, default=5, help="top-N ops of our inference by self CPU time (0: off)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    only = {w.strip() for w in args.only.split(",") if w.strip()}
    unknown = only - {"inference", "train"}
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; use inference, train")

    use_source_tree(args.ours_src)
    import_detectron2(args.detectron2, args.site)
    import detectron2

    import mae_transfer

    torch.set_num_threads(args.threads)
    ref_dir, data = Path(args.reference), Path(args.data)
    ours_root = Path(mae_transfer.__file__).resolve().parents[1]
    meta = {
        "threads": args.threads,
        "torch": torch.__version__,
        "detectron2": str(Path(detectron2.__file__).resolve().parents[1]),
        "detectron2_commit": D2_COMMIT,
        "ours": str(ours_root),
        "ours_revision": source_revision(ours_root),
    }
    print(
        f"ours: mae_transfer from {ours_root} ({meta['ours_revision']}); detectron2 from {meta['detectron2']}; "
        f"torch {torch.__version__}, {args.threads} thread(s)",
        flush=True,
    )
    ref = build_reference(ref_dir)
    overrides = reference_overrides(ref)
    ours = build_ours(ref_dir, overrides)
    meta["ours_overrides"] = overrides
    meta["setting_differences"] = setting_differences(ref, ours)
    settings = ", ".join(f"model.{k}={v}" for k, v in overrides.items())
    print(f"ours built with {settings} (as the reference config)")
    for line in meta["setting_differences"]:
        print(f"  SETTING DIFFERS: {line}", flush=True)
    img_size = int(ours.img_size)
    results: list[Result] = []

    if "inference" in only:
        images, resize_diff = load_val_images(data, args.images, img_size)
        meta["images"] = len(images)
        meta["resize_grey_levels_vs_detectron2"] = resize_diff
        print(f"{len(images)} val images; our test resize vs detectron2's: max {resize_diff} grey level(s)")
        results += inference_workloads(ref, ours, images, args.pairs)
        if args.profile:
            meta["profile_top_ops"] = profile_ours(ours, images, args.profile)

    if "train" in only:
        images_t, targets = load_train_batch(data, img_size, args.seed)
        meta["train_images"] = [list(im.shape[-2:]) for im in images_t]
        meta["train_instances"] = [len(t["boxes"]) for t in targets]
        print(f"train batch: sizes {meta['train_images']}, instances {meta['train_instances']}", flush=True)
        results.append(train_workload(ref, ours, images_t, targets, args.pairs, args.seed))

    title = (
        f"ViTDet Mask R-CNN, detectron2 {D2_COMMIT[:7]} (reference) vs mae_transfer {meta['ours_revision']} (ours), "
        f"{args.threads} thread(s); ratio = reference s / ours s"
    )
    print_table(results, title)
    write_json(results, args.json, {"meta": meta})
    return 0 if all(r.outputs_equal is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
