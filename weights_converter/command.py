"""`qnalo convert`, the converter's own command line: its arguments and what it runs. `qnalo` (qnalo/cli.py) and
`python -m qnalo.weights_converter` both take it from here."""
import argparse
import os

from qnalo._command import positive_int, progress
from qnalo.errors import InputError

CONVERT_HELP = ("Convert an official checkpoint (.pth or .safetensors state dict, or a Flax checkpoint_<step> file or "
                 "folder) into a qnalo weights file.")


def add_convert_arguments(parser):
    parser.add_argument("src", metavar="SRC",
                        help="official checkpoint: .pth, .safetensors state dict, Flax checkpoint_<step> or its folder")
    parser.add_argument("dst", metavar="DST", help="qnalo weights file to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    parser.add_argument("--img-size", type=positive_int, metavar="N",
                        help="evaluation resolution to record (default: from the file name or config, else 224)")
    parser.add_argument("--window-sizes", type=_window_sizes, metavar="W0,W1,W2,W3",
                        help="HiLo window size per stage (default: from the config or file name, else 0,0,2,1)")
    parser.add_argument("--head-dim", type=positive_int, metavar="N",
                        help="LITv2 width per head (default: 32, that of every released LITv2)")
    parser.add_argument("--labels", metavar="FILE",
                        help="class names to record, one per line, as many as the head has classes "
                             "(default: ImageNet's for 1000 classes, else the class numbers)")


def run_convert(args):
    from qnalo.weights_converter.convert import CONVERT_STEPS, convert

    labels = _read_labels(args.labels) if args.labels else None
    big = os.path.isfile(args.src) and os.path.getsize(args.src) > PROGRESS_FROM_BYTES
    with progress(total=len(CONVERT_STEPS), unit="step", enabled=big, desc="convert") as bar:
        def step(name):
            bar.set_description(f"convert: {name}")
            bar.update(0 if name == CONVERT_STEPS[0] else 1)

        info = convert(args.src, args.dst, force=args.force, img_size=args.img_size, window_sizes=args.window_sizes,
                       labels=labels, head_dim=args.head_dim, progress=step if big else None)
        bar.update(1)
    print(f"wrote {info['architecture']} ({info['variant'] or 'custom configuration'}, "
          f"{info['params']:,} parameters) to {info['path']}")
    return 0


PROGRESS_FROM_BYTES = 32 * 2**20   # a bar for checkpoints that take a noticeable while


def _read_labels(path):
    with open(path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    if not labels:
        raise InputError(f"{path}: no class names in it (one per line)")
    return labels


def _window_sizes(text):
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"expected 4 comma-separated integers >= 0, like 0,0,2,1; got {text!r}")
    return sizes
