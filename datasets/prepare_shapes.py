#!/usr/bin/env python
"""Generate the synthetic shapes dataset (COCO format) under $DETECTRON2_DATASETS/shapes (default
datasets/shapes). A split that is already complete with the same settings is left as it is."""
import argparse
import os
import sys

from gn_detection.atomic_write import not_writable
from gn_detection.datasets import datasets_root
from gn_detection.shapes import MIN_SETTINGS, ShapesSplitSpec, generate_split


def at_least(least: int):
    """An argparse type: an integer of at least ``least`` (argparse names the flag when it is not)."""
    def integer(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return integer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    default_root = os.path.join(datasets_root(), "shapes")  # where gn_detection registers it: ~ expanded too
    num_images = at_least(MIN_SETTINGS["num_images"])
    parser.add_argument("--root", default=default_root, help="output directory (default: %(default)s)")
    parser.add_argument("--num-train", type=num_images, default=1000, help="training images")
    parser.add_argument("--num-val", type=num_images, default=200, help="validation images")
    parser.add_argument("--image-size", type=at_least(MIN_SETTINGS["image_size"]), default=192,
                        help="side of the square images, pixels")
    parser.add_argument("--max-objects", type=at_least(MIN_SETTINGS["max_objects"]), default=5,
                        help="most objects per image")
    parser.add_argument("--seed", type=at_least(MIN_SETTINGS["seed"]), default=0, help="dataset seed")
    parser.add_argument("--force", action="store_true", help="regenerate even if complete (a split missing an "
                        "image is regenerated anyway)")
    args = parser.parse_args()
    if why := not_writable(args.root):
        parser.error(f"--root {args.root}: cannot write there ({why}); give a writable folder")
    try:
        for split, count in (("train", args.num_train), ("val", args.num_val)):
            spec = ShapesSplitSpec(split, count, args.image_size, args.max_objects, args.seed)
            print(generate_split(args.root, spec, force=args.force))
    except KeyboardInterrupt:
        print("interrupted: a split being drawn is left as it was before (its new images are discarded); run the "
              "same command again to generate it", file=sys.stderr)
        sys.exit(130)  # the shells' status for a command stopped by Ctrl-C
    except MemoryError:
        sys.exit(f"error: --image-size {args.image_size}: not enough memory to draw one image; give a smaller size "
                 "(the split that was there is left as it was)")
    except OSError as e:  # a file where a folder goes, a full disk: the error names the path
        sys.exit(f"error: {e}; the split that was there is left as it was")


if __name__ == "__main__":
    main()
