#!/usr/bin/env python
"""Generate the synthetic shapes dataset (COCO format) under $DETECTRON2_DATASETS/shapes (default
datasets/shapes). A split that is already complete with the same settings is left as it is."""
import argparse
import os

from gn_detection.shapes import ShapesSplitSpec, generate_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    default_root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "shapes")
    parser.add_argument("--root", default=default_root, help="output directory (default: %(default)s)")
    parser.add_argument("--num-train", type=int, default=1000, help="training images")
    parser.add_argument("--num-val", type=int, default=200, help="validation images")
    parser.add_argument("--image-size", type=int, default=192, help="side of the square images, pixels")
    parser.add_argument("--max-objects", type=int, default=5, help="most objects per image")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = parser.parse_args()
    for split, count in (("train", args.num_train), ("val", args.num_val)):
        spec = ShapesSplitSpec(split, count, args.image_size, args.max_objects, args.seed)
        print(generate_split(args.root, spec, force=args.force))


if __name__ == "__main__":
    main()
