"""The `qnalo` command line. Subcommands: convert, demo (more to come: classify, info, bench).

Every subcommand registers itself in `_SUBCOMMANDS` with a function adding its arguments and one running it.
An error on bad input prints one line, `qnalo: error: <message>`, to stderr and exits with status 1; usage
errors exit with status 2 (argparse).
"""
import argparse
import sys

from qnalo.errors import QnaloError

_HANDLED_ERRORS = (QnaloError, OSError)  # OSError covers FileExistsError and FileNotFoundError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qnalo", description="CPU inference for LITv2 and QnA-ViT, without PyTorch.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in _SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return _run(parser, argv)


def convert_main(argv=None, prog="python -m qnalo.weights_converter"):
    """`qnalo convert` as a program of its own (python -m qnalo.weights_converter)."""
    parser = argparse.ArgumentParser(prog=prog, description=_CONVERT_HELP)
    _add_convert_arguments(parser)
    parser.set_defaults(run=_run_convert)
    return _run(parser, argv)


def _run(parser, argv):
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except _HANDLED_ERRORS as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__  # one line, whatever the message holds
        print(f"qnalo: error: {message}", file=sys.stderr)
        return 1


_CONVERT_HELP = ("Convert an official checkpoint (.pth or .safetensors state dict, or a Flax checkpoint_<step> file or "
                 "folder) into a qnalo weights file.")


def _add_convert_arguments(parser):
    parser.add_argument("src", metavar="SRC",
                        help="official checkpoint: .pth, .safetensors state dict, Flax checkpoint_<step> or its folder")
    parser.add_argument("dst", metavar="DST", help="qnalo weights file to write (.safetensors)")
    parser.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    parser.add_argument("--img-size", type=_positive_int, metavar="N",
                        help="evaluation resolution to record (default: from the file name or config, else 224)")
    parser.add_argument("--window-sizes", type=_window_sizes, metavar="W0,W1,W2,W3",
                        help="HiLo window size per stage (default: from the config or file name, else 0,0,2,1)")


def _run_convert(args):
    from qnalo.weights_converter.convert import convert

    info = convert(args.src, args.dst, force=args.force, img_size=args.img_size, window_sizes=args.window_sizes)
    print(f"wrote {info['architecture']} ({info['variant'] or 'custom configuration'}, "
          f"{info['params']:,} parameters) to {info['path']}")
    return 0


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value}")
    return value


def _window_sizes(text):
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 4 or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"expected 4 comma-separated integers >= 0, like 0,0,2,1; got {text!r}")
    return sizes


_DEMO_HELP = ("Build a model with seeded random weights, round-trip it through a qnalo weights file, run it with "
              "the Numba kernels and the NumPy reference ops, and report their agreement and the latency.")


def _add_demo_arguments(parser):
    from qnalo import list_models

    parser.add_argument("--model", default="litv2_s", choices=list_models(), help="variant (default: litv2_s)")
    parser.add_argument("--batch", type=_positive_int, default=1, metavar="N", help="images per batch (default: 1)")
    parser.add_argument("--size", type=_positive_int, default=None, metavar="PX",
                        help="image side (default: the variant's official resolution)")


def _run_demo(args):
    import os
    import tempfile
    import time

    import numpy as np

    import qnalo
    from qnalo.models import MODEL_REGISTRY
    from qnalo.weights import save_weights

    model_cls, _, config = MODEL_REGISTRY[args.model]
    size = args.size or config.img_size
    print(f"{args.model}: seeded random weights (no trained weights ship yet), {size}x{size}, batch {args.batch}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"{args.model}.safetensors")
        save_weights(path, model_cls.random_tensors(config, seed=0), model_cls.architecture, config.to_dict(),
                     source={"variant": args.model})
        start = time.perf_counter()
        fast = qnalo.load(path)                      # loads the kernels (compiles them on a first run)
        loaded = time.perf_counter() - start
        reference = qnalo.load(path, backend="numpy")
        rng = np.random.default_rng(0)
        images = rng.standard_normal((args.batch, 3, size, size)).astype(np.float32)
        start = time.perf_counter()
        logits = fast(images)
        first = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fast(images)
            times.append(time.perf_counter() - start)
        expected = reference(images)
        parameters = fast.num_parameters
        del fast, reference   # release the memory-mapped file before the folder goes
    error = float(np.abs(logits - expected).max())
    bound = 1e-4 * max(1.0, float(np.abs(expected).max()))
    same_top1 = bool((logits.argmax(1) == expected.argmax(1)).all())
    print(f"weights file round trip: {parameters:,} parameters written and memory-mapped back")
    print(f"Numba kernels vs NumPy reference: max |dlogit| {error:.2e} (bound {bound:.2e}), "
          f"top-1 {'identical' if same_top1 else 'DIFFERENT'}")
    print(f"load {loaded:.2f} s (loads the kernels; compiles them on a machine's first run), "
          f"first call {first * 1e3:.0f} ms, then median {sorted(times)[2] * 1e3:.1f} ms for {args.batch} image(s)")
    if error > bound or not same_top1:
        raise QnaloError("the Numba kernels disagree with the NumPy reference beyond the parity bound")
    return 0


_SUBCOMMANDS = {
    "convert": (_CONVERT_HELP, _add_convert_arguments, _run_convert),
    "demo": (_DEMO_HELP, _add_demo_arguments, _run_demo),
}


if __name__ == "__main__":
    sys.exit(main())
