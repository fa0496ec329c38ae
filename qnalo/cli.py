"""The `qnalo` command line. Subcommands: classify (and classify --demo), convert, info, bench.

Every subcommand registers itself in `_SUBCOMMANDS` with a function adding its arguments and one running it.
Every error is one line on stderr, `qnalo: error: <message>`: bad input (a missing or damaged file, weights of
another model) exits with status 1, a wrong command line (an unknown option, a missing argument, options that
do not go together) with status 2. Output into a pipe that closes early (`| head`) ends quietly.
"""
import argparse
import json
import os
import re
import sys
import warnings

from qnalo import __version__
from qnalo.errors import InputError, QnaloError, VariantMismatchError

_HANDLED_ERRORS = (QnaloError, OSError)  # OSError covers FileExistsError and FileNotFoundError
_USAGE_STATUS = 2
_BROKEN_PIPE_STATUS = 128 + 13   # what a shell reports for a process ended by SIGPIPE


class UsageError(InputError):
    """A command line that asks for something impossible: exit status 2, as argparse's own errors."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other error of the command."""

    def error(self, message):
        print(f"qnalo: error: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(_USAGE_STATUS)


def main(argv=None):
    parser = _Parser(prog="qnalo", description="CPU inference for LITv2 and QnA-ViT, without PyTorch.")
    parser.add_argument("--version", action="version", version=f"qnalo {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in _SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run)
    return _run(parser, argv)


def convert_main(argv=None, prog="python -m qnalo.weights_converter"):
    """`qnalo convert` as a program of its own (python -m qnalo.weights_converter)."""
    parser = _Parser(prog=prog, description=_CONVERT_HELP)
    _add_convert_arguments(parser)
    parser.set_defaults(run=_run_convert)
    return _run(parser, argv)


def _run(parser, argv):
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warning
    try:
        status = args.run(args)
        sys.stdout.flush()   # here, not at exit, so that a closed pipe is seen below
        return status
    except BrokenPipeError:
        # the reader went away (`| head`): stop quietly, and keep Python's exit-time flush from reporting it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return _BROKEN_PIPE_STATUS
    except UsageError as exc:
        _print_error(exc)
        return _USAGE_STATUS
    except VariantMismatchError as exc:
        _print_error(f"{exc.what}; drop --model to use the file as it is")
        return 1
    except _HANDLED_ERRORS as exc:
        _print_error(exc)
        return 1


def _print_error(error):
    message = " ".join(str(error).split()) or type(error).__name__   # one line, whatever the message holds
    print(f"qnalo: error: {_in_cli_words(message)}", file=sys.stderr)


# The library names its keyword arguments as Python spells them (force=True, device='cuda'); the command line
# names the options that set them.
_OPTION_SPELLINGS = {"force=True": "--force", "head_dim=N": "--head-dim N",
                     "window_sizes=(W0, W1, W2, W3)": "--window-sizes W0,W1,W2,W3"}
_KEYWORDS = re.compile("|".join(map(re.escape, _OPTION_SPELLINGS)) + r"|\b(device|dtype)='([^']*)'")


def _in_cli_words(message):
    return _KEYWORDS.sub(lambda m: f"--{m[1]} {m[2]}" if m[1] else _OPTION_SPELLINGS[m[0]], message)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split()).removeprefix("qnalo: ")   # the library's warnings name it already
    print(f"qnalo: warning: {_in_cli_words(text)}", file=sys.stderr)


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
    parser.add_argument("--head-dim", type=_positive_int, metavar="N",
                        help="LITv2 width per head (default: 32, that of every released LITv2)")
    parser.add_argument("--labels", metavar="FILE",
                        help="class names to record, one per line, as many as the head has classes "
                             "(default: ImageNet's for 1000 classes, else the class numbers)")


def _run_convert(args):
    from qnalo.weights_converter.convert import CONVERT_STEPS, convert

    labels = _read_labels(args.labels) if args.labels else None
    big = os.path.isfile(args.src) and os.path.getsize(args.src) > PROGRESS_FROM_BYTES
    with _progress(total=len(CONVERT_STEPS), unit="step", enabled=big, desc="convert") as bar:
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


_CLASSIFY_HELP = ("Classify images: the top-k class names with probabilities. IMAGE may be files, folders (searched "
                  "recursively) or globs. --demo instead runs the embedded demo models on held-out digits.")


def _add_classify_arguments(parser):
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files, folders or glob patterns")
    which = parser.add_argument_group("model (one of --weights, --model or --demo)")
    which.add_argument("--weights", metavar="FILE", help="a qnalo weights file (written by `qnalo convert`)")
    which.add_argument("--model", metavar="NAME",
                       help="an embedded demo model (litv2_digits, qna_vit_digits) or a variant name, whose "
                            "converted file is looked up as $QNALO_WEIGHTS/NAME.safetensors "
                            "(default folder ~/.cache/qnalo); with --weights: check the file is that variant")
    which.add_argument("--demo", action="store_true",
                       help="run both embedded demo models on the held-out digits: accuracy, speed, and agreement "
                            "with the PyTorch predictions recorded at training time")
    parser.add_argument("--top", type=_positive_int, metavar="K",
                        help=f"classes to show (default: {DEFAULT_TOP}, or every class of a smaller head)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--batch", type=_positive_int, default=8, metavar="N", help="images per batch (default: 8)")
    _add_target_arguments(parser)


def _add_target_arguments(parser):
    parser.add_argument("--threads", type=_positive_int, metavar="N",
                        help="kernel threads (default: QNALO_NUM_THREADS, else every CPU this process may use)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs (default: cpu; cuda needs CuPy and an NVIDIA GPU)")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="storage type of weights and activations (default: float32; float16: --device cuda)")


def _target(args):
    """The device and dtype keywords of create_model / load that --device and --dtype name."""
    return dict(device=args.device, dtype=args.dtype)


def _set_threads(args):
    if args.threads:
        import qnalo
        qnalo.set_num_threads(args.threads)


DEFAULT_TOP = 5


def _run_classify(args):
    _set_threads(args)
    if args.demo:
        if args.images or args.weights or args.model or args.top:
            raise UsageError("--demo runs the embedded models on their own images; give it no IMAGE, --weights, "
                             "--model or --top")
        return _run_demo(args)
    if not args.images:
        raise UsageError("no IMAGE given; name image files, folders or globs (or run `qnalo classify --demo`)")
    model = _model_for(args)
    top = _top_for(args, model)
    from qnalo.classify import classify_files, expand_paths

    files, problems = expand_paths(args.images)
    for item, message in problems:
        _report(f"{item}: {message}")
    results = []
    with _progress(total=len(files), unit="image", enabled=len(files) > 1 and not args.json) as bar:
        for result in classify_files(model, files, top=top, batch=args.batch, progress=bar.update):
            results.append(result)
            if "error" in result:
                _report(f"{result['image']}: {result['error']}", bar)
            elif not args.json:
                bar.write(_format_result(result))
    if args.json:
        print(json.dumps({"model": _model_summary(model), "results": results,
                          "not_found": [{"item": i, "error": m} for i, m in problems]}, indent=2))
    failed = len(problems) + sum("error" in r for r in results)
    if failed:
        _report(f"{failed} of {len(problems) + len(results)} inputs could not be classified")
    return 1 if failed else 0


def _top_for(args, model):
    """How many classes to show: --top, which the head must have, else the default or all of a smaller head."""
    classes = model.config.num_classes
    if not classes:
        raise InputError(f"{args.weights or args.model} is a backbone without a classifier head "
                         "(forward_features only); classify needs a classification model")
    if args.top is None:
        return min(DEFAULT_TOP, classes)
    if args.top > classes:
        raise UsageError(f"--top {args.top} asks for more classes than the model has ({classes}); "
                         f"pass --top {classes} or less")
    return args.top


def _format_result(result):
    lines = [result["image"]]
    lines += [f"  {t['rank']:>2}  {t['probability']:7.2%}  {t['label']}" for t in result["top"]]
    return "\n".join(lines)


def _model_summary(model):
    return {"architecture": model.architecture, "variant": model.source.get("variant"),
            "img_size": model.config.img_size, "classes": model.config.num_classes}


def _model_for(args):
    """The model that --weights / --model name (with real weights: never random ones)."""
    import qnalo
    from qnalo import demo

    target = _target(args)
    if args.weights and args.model:
        return qnalo.create_model(args.model, weights=args.weights, **target)
    if args.weights:
        return qnalo.load(args.weights, **target)
    if not args.model:
        raise UsageError("no model given; pass --weights FILE (from `qnalo convert`), --model NAME, or --demo")
    if args.model in demo.DEMO_MODELS:
        return qnalo.load(demo.demo_path(args.model), **target)
    if args.model not in qnalo.list_models():
        raise UsageError(f"unknown model {args.model!r}; the demo models are {', '.join(demo.DEMO_MODELS)}, "
                         f"the variants {', '.join(qnalo.list_models())}")
    path = os.path.join(_weights_folder(), f"{args.model}.safetensors")
    if not os.path.exists(path):
        raise InputError(f"no converted weights for {args.model} at {path}; convert the official checkpoint "
                         f"there (`qnalo convert {args.model}.pth {path}`) or pass --weights FILE")
    return qnalo.create_model(args.model, weights=path, **target)


def _weights_folder():
    return os.environ.get("QNALO_WEIGHTS") or os.path.join(os.path.expanduser("~"), ".cache", "qnalo")


def _run_demo(args):
    from qnalo import demo

    manifest = demo.manifest()
    if not args.json:   # --json: stdout is the JSON document alone
        print(f"qnalo classify --demo: two small models trained in PyTorch on scikit-learn's handwritten digits "
              f"(seed {manifest['seed']}), converted with `qnalo convert`; {manifest['heldout_count']} held-out "
              f"digits, each through its family's official preprocessing at {demo.IMG_SIZE}x{demo.IMG_SIZE}"
              + ("" if args.device == "cpu" else f"; on {args.device}, {args.dtype}"))
    failed = False
    reports = []
    for name in demo.DEMO_MODELS:
        r = demo.evaluate(name, batch=args.batch, device=args.device, dtype=args.dtype)
        reports.append(r)
        failed |= r["agreement"] < 1.0
        if not args.json:
            print(f"{name:<15} {r['params']:>8,} params  accuracy {r['accuracy']:7.2%}  "
                  f"agreement with PyTorch {r['agreement']:7.2%} ({r['count'] - len(r['disagreements'])}/"
                  f"{r['count']})  {r['images_per_s']:6.0f} images/s at batch {args.batch}, "
                  f"{r['latency_ms']:.1f} ms at batch 1  (load {r['load_s']:.2f} s)")
    if args.json:
        print(json.dumps(reports, indent=2))
    if failed:
        raise QnaloError("qnalo's predictions differ from the recorded PyTorch ones (see agreement above)")
    return 0


_INFO_HELP = "Describe a qnalo weights file: architecture, parameters, MACs, config and source checkpoint."


def _add_info_arguments(parser):
    parser.add_argument("file", metavar="FILE", help="a qnalo weights file (written by `qnalo convert`)")
    parser.add_argument("--json", action="store_true", help="print it as JSON")


def _run_info(args):
    from qnalo.models import read_model_file
    from qnalo.weights import FORMAT_VERSION
    from qnalo.weights_converter.convert import parameter_count

    model_cls, cfg, tensors, source = read_model_file(args.file)
    architecture = model_cls.architecture
    params = parameter_count(tensors)
    macs = cfg.macs(cfg.img_size, cfg.img_size)
    labels = source.get("labels")
    names = "names recorded in the file" if labels else "ImageNet-1k names" if cfg.num_classes == 1000 else "numbered"
    classes = f"{cfg.num_classes} ({names})" if cfg.num_classes else "none (backbone: forward_features only)"
    if args.json:
        print(json.dumps({"file": args.file, "format_version": FORMAT_VERSION, "architecture": architecture,
                          "params": params, "macs": macs, "img_size": cfg.img_size, "config": cfg.to_dict(),
                          "source": source}, indent=2))
        return 0
    first = ("file", "format", "variant", "sha256")
    shown_source = {**{k: source[k] for k in first if k in source},
                    **{k: v for k, v in source.items() if k not in first and k not in ("labels", "ignored_keys")}}
    if "ignored_keys" in source:
        shown_source["ignored_keys"] = f"{len(source['ignored_keys'])} (--json lists them)"
    rows = [("file", f"{args.file} (qnalo weights, format {FORMAT_VERSION})"),
            ("architecture", f"{architecture} ({source.get('variant') or 'custom configuration'})"),
            ("parameters", f"{params:,} in {len(tensors)} tensors"),
            ("MACs", f"{_si(macs)} per image at {cfg.img_size}x{cfg.img_size}"),
            ("classes", classes),
            ("config", " ".join(f"{k}={v}" for k, v in cfg.to_dict().items())),
            ("source", " ".join(f"{k}={v}" for k, v in shown_source.items()) or "not recorded")]
    for key, value in rows:
        print(f"{key:<13} {value}")
    return 0


def _si(count):
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.2f} {prefix}"
    return str(count)


_BENCH_HELP = ("Time a model on this machine: kernel load (compile on a first run) apart, then the first call and "
               "the median latency and throughput over repeated calls, on seeded random weights and inputs.")


DEFAULT_BENCH_MODEL = "litv2_s"


def _add_bench_arguments(parser):
    from qnalo import demo, list_models

    parser.add_argument("--model", choices=list_models() + list(demo.DEMO_MODELS), metavar="NAME",
                        help=f"a variant, on random weights (default: {DEFAULT_BENCH_MODEL}), or an embedded demo "
                             "model; with --weights: check the file is that variant")
    parser.add_argument("--weights", metavar="FILE", help="time this weights file instead of random weights")
    parser.add_argument("--batch", type=_positive_int, default=1, metavar="N", help="images per call (default: 1)")
    parser.add_argument("--calls", type=_positive_int, default=10, metavar="N", help="timed calls (default: 10)")
    parser.add_argument("--size", type=_positive_int, metavar="PX", help="image side (default: the model's)")
    _add_target_arguments(parser)


def _run_bench(args):
    import time

    import numpy as np

    import qnalo
    from qnalo import demo
    from qnalo.kernels import threads
    from qnalo.models import MODEL_REGISTRY
    from qnalo.models.warmup import warm_up

    _set_threads(args)
    qnalo.check_dtype(args.device, args.dtype)
    target = _target(args)
    weights = args.weights or (demo.demo_path(args.model) if args.model in demo.DEMO_MODELS else None)
    if weights:
        from qnalo.models import read_model_file, read_variant_file

        # with --model too, the file must hold that variant
        model_cls, config = (read_variant_file(args.model, weights) if args.model else read_model_file(weights))[:2]
    else:
        model_cls, _, config = MODEL_REGISTRY[args.model or DEFAULT_BENCH_MODEL]
    start = time.perf_counter()
    if args.device == "cpu":
        warm_up(model_cls, config)   # what every first model of a process pays: the kernels load or compile
    kernels_s = time.perf_counter() - start
    start = time.perf_counter()
    if weights:
        model = qnalo.load(weights, **target)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # random weights are the point here
            model = qnalo.create_model(args.model or DEFAULT_BENCH_MODEL, **target)
    build_s = time.perf_counter() - start
    size = args.size or model.config.img_size
    x = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
    if args.device == "cpu":
        finish = _nothing
    else:   # device arrays in and out, and each call waits for the GPU: kernel time, not copies
        import cupy
        x, finish = cupy.asarray(x), cupy.cuda.Device().synchronize

    def call():
        start = time.perf_counter()
        model(x)
        finish()
        return time.perf_counter() - start
    first_s = call()
    times = [call() for _ in range(args.calls)]
    median = float(np.median(times))
    name = weights or f"{args.model or DEFAULT_BENCH_MODEL} (random weights)"
    where = f"{threads.NUM_THREADS} kernel thread(s)" if args.device == "cpu" else f"{args.device}, {args.dtype}"
    print(f"{name}: {size}x{size}, batch {args.batch}, {where}")
    if args.device == "cpu":
        print(f"kernels loaded in {kernels_s:.2f} s (from the cache; a machine's first run compiles them)")
    else:
        print("CUDA kernels compiled in the first call (CuPy keeps the binaries for the next run)")
    print(f"model built in {build_s:.2f} s, first call {first_s * 1e3:.1f} ms")
    print(f"median of {args.calls} calls: {median * 1e3:.1f} ms per batch, {args.batch / median:.1f} images/s "
          f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f} ms)")
    return 0


def _nothing():
    pass


class _NoBar:
    """What _progress gives when no bar is wanted: the same methods, doing nothing but writing."""
    def update(self, n=1):
        pass

    def set_description(self, text):
        pass

    def write(self, text):
        print(text)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total, unit, enabled, desc=None):
    """A tqdm bar on stderr (only where stderr is a terminal) when enabled, else a stand-in."""
    if not enabled:
        return _NoBar()
    import shutil

    from tqdm import tqdm
    # a terminal that reports no size (a bare pty: 0 x 0) makes tqdm hide the bar; shutil falls back to 80 x 24
    size = shutil.get_terminal_size()
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=None, leave=False,
                ncols=size.columns, nrows=size.lines)


def _report(message, bar=None):
    line = f"qnalo: error: {message}"
    if bar is not None and not isinstance(bar, _NoBar):
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)


_SUBCOMMANDS = {
    "classify": (_CLASSIFY_HELP, _add_classify_arguments, _run_classify),
    "convert": (_CONVERT_HELP, _add_convert_arguments, _run_convert),
    "info": (_INFO_HELP, _add_info_arguments, _run_info),
    "bench": (_BENCH_HELP, _add_bench_arguments, _run_bench),
}


if __name__ == "__main__":
    sys.exit(main())
