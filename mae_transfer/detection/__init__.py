"""Object detection and instance segmentation transfer: COCO data, result conversion and evaluation.

``mae_transfer.detection.coco`` reads COCO 2017 instance annotations into torchvision Mask R-CNN
targets, turns model predictions into the COCO results format and scores them with COCOeval.
"""
