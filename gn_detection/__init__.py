"""Group Normalization for Mask R-CNN in Detectron2."""
