"""COCO instance detection and segmentation transfer: detectron2's ViTDet Mask R-CNN, natively.

* ``coco``: COCO 2017 instances (dataset, results format, COCOeval);
* ``transforms``: ViTDet's large-scale jitter and test resize;
* ``boxes``, ``masks``: box arithmetic (deltas, matching, sampling, anchors) and instance masks
  (polygons through augmentation, per-RoI targets, pasting);
* ``rpn``, ``roi_heads``, ``model``: the Mask R-CNN, with detectron2's parameter names;
* ``task``: training and evaluation in the engine, detector weights in and out.
"""
