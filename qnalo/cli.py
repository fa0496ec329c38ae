"""The `qnalo` command line. Subcommands: classify (and classify --demo), convert, info, bench.

Every subcommand registers itself in `_SUBCOMMANDS` with a function adding its arguments and one running it;
`convert`'s are the converter's own (qnalo.weights_converter.command). Errors, exit statuses and closed pipes
follow qnalo._command.
"""
import json
import sys
import warnings

from qnalo import __version__
from qnalo._command import Parser, UsageError, positive_int, progress, report, run
from qnalo.errors import InputError, QnaloError
from qnalo.weights_converter.command import CONVERT_HELP, add_convert_arguments, run_convert


def main(argv=None):
    parser = Parser(prog="qnalo", description="CPU inference for LITv2 and QnA-ViT, without PyTorch.")
    parser.add_argument("--version", action="version", version=f"qnalo {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run_command) in _SUBCOMMANDS.items():
        subparser = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(subparser)
        subparser.set_defaults(run=run_command)
    return run(parser, argv)


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
    parser.add_argument("--top", type=positive_int, metavar="K",
                        help=f"classes to show (default: {DEFAULT_TOP}, or every class of a smaller head)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON document")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N", help="images per batch (default: 8)")
    _add_target_arguments(parser)


def _add_target_arguments(parser):
    parser.add_argument("--threads", type=positive_int, metavar="N",
                        help="kernel threads (default: QNALO_NUM_THREADS, else every CPU this process may use)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model runs (default: cpu; cuda needs CuPy and an NVIDIA GPU)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="default: float32; bfloat16 (CPUs with AVX512_BF16): weights and GEMM inputs rounded to "
                             "bfloat16, float32 accumulation; float16 (--device cuda): weights and activations "
                             "stored in half precision")


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
        report(f"{item}: {message}")
    results = []
    with progress(total=len(files), unit="image", enabled=len(files) > 1 and not args.json) as bar:
        for result in classify_files(model, files, top=top, batch=args.batch, progress=bar.update):
            results.append(result)
            if "error" in result:
                report(f"{result['image']}: {result['error']}", bar)
            elif not args.json:
                bar.write(_format_result(result))
    if args.json:
        print(json.dumps({"model": _model_summary(model), "results": results,
                          "not_found": [{"item": i, "error": m} for i, m in problems]}, indent=2))
    failed = len(problems) + sum("error" in r for r in results)
    if failed:
        report(f"{failed} of {len(problems) + len(results)} inputs could not be classified")
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


def _check_model_names(args, alternatives="--weights FILE (from `qnalo convert`), --model NAME, or --demo"):
    """Usage errors (status 2) for a command line that names no model, or a model name that does not exist."""
    import qnalo
    from qnalo import demo

    if not args.weights and not args.model:
        raise UsageError(f"no model given; pass {alternatives}")
    if args.model and not args.weights and args.model not in demo.DEMO_MODELS + tuple(qnalo.list_models()):
        raise UsageError(f"unknown model {args.model!r}; the demo models are {', '.join(demo.DEMO_MODELS)}, "
                         f"the variants {', '.join(qnalo.list_models())}")


def _model_for(args):
    """The model that --weights / --model name (with real weights: never random ones)."""
    from qnalo.classify import named_model

    _check_model_names(args)
    return named_model(args.model, args.weights, **_target(args))


def _run_demo(args):
    from qnalo import demo

    manifest = demo.manifest()
    if not args.json:   # --json: stdout is the JSON document alone
        print(f"qnalo classify --demo: two small models trained in PyTorch on scikit-learn's handwritten digits "
              f"(seed {manifest['seed']}), converted with `qnalo convert`; {manifest['heldout_count']} held-out "
              f"digits, each through its family's official preprocessing at {demo.IMG_SIZE}x{demo.IMG_SIZE}"
              + ("" if (args.device, args.dtype) == ("cpu", "float32") else f"; on {args.device}, {args.dtype}"))
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
    parser.add_argument("--batch", type=positive_int, default=1, metavar="N", help="images per call (default: 1)")
    parser.add_argument("--calls", type=positive_int, default=10, metavar="N", help="timed calls (default: 10)")
    parser.add_argument("--size", type=positive_int, metavar="PX", help="image side (default: the model's)")
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
        def finish():
            pass
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


_PREDICT_HELP = ("Predict over a whole image collection on Ray Data and write a Parquet dataset, one file per shard "
                 "of --rows-per-file inputs; rerunning the same command resumes, skipping the shards written. "
                 "SOURCE may be image files, folders, globs, a .txt/.lst list of paths or a .parquet/.csv table "
                 "with a path column, local or any URI pyarrow.fs opens. Needs pip install 'qnalo[ray]'.")


def _add_predict_arguments(parser):
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="images, folders, globs, lists or tables")
    parser.add_argument("--out", required=True, metavar="DIR", help="the output folder (local or a URI)")
    which = parser.add_argument_group("model (one of --weights or --model)")
    which.add_argument("--weights", metavar="FILE", help="a qnalo weights file (written by `qnalo convert`)")
    which.add_argument("--model", metavar="NAME",
                       help="an embedded demo model (litv2_digits, qna_vit_digits) or a variant name, as in classify")
    parser.add_argument("--top", type=positive_int, default=DEFAULT_TOP, metavar="K",
                        help=f"classes per row (default: {DEFAULT_TOP}, or every class of a smaller head)")
    parser.add_argument("--features", action="store_true", help="add the pooled embedding as a `features` column")
    parser.add_argument("--logits", action="store_true", help="add the logits as a `logits` column")
    parser.add_argument("--rows-per-file", type=positive_int, default=1000, metavar="N",
                        help="inputs per output file, the unit of resume (default: 1000)")
    parser.add_argument("--workers", type=positive_int, metavar="N",
                        help="model actors (default: the cluster's CPUs / --threads)")
    parser.add_argument("--threads", type=positive_int, default=1, metavar="N",
                        help="kernel threads per actor, and the CPUs Ray gives it (default: 1)")
    parser.add_argument("--batch", type=positive_int, default=8, metavar="N", help="images per model call (default: 8)")
    parser.add_argument("--address", metavar="ADDR",
                        help="a running Ray cluster (auto, ray://HOST:10001); default: a local Ray for this run")
    parser.add_argument("--path-column", default="path", metavar="NAME",
                        help="the column of a .parquet/.csv SOURCE that holds the paths (default: path)")


def _run_predict(args):
    _check_model_names(args, "--model NAME (e.g. qna_vit_digits) or --weights FILE")
    from qnalo.distributed import predict

    def note(line):
        report(line.removeprefix("qnalo predict: "))
    summary = predict(args.sources, args.out, model=args.model, weights=args.weights, top=args.top,
                      features=args.features, logits=args.logits, rows_per_file=args.rows_per_file,
                      workers=args.workers, threads_per_worker=args.threads, batch=args.batch,
                      address=args.address, path_column=args.path_column, report=note)
    print(f"qnalo predict: {summary['images']} images ({summary['errors']} unreadable), "
          f"{summary['images_per_s']:.1f} images/s, {summary['seconds']:.1f} s wall; shard files: "
          f"{summary['shards_written']} written, {summary['shards_skipped']} already there, in {args.out}")
    failed = summary["errors"] + summary["not_found"]
    if failed:
        report(f"{failed} inputs could not be read (see the `error` column)" if summary["errors"] else
               f"{failed} sources named nothing")
    return 1 if failed else 0


_SUBCOMMANDS = {
    "classify": (_CLASSIFY_HELP, _add_classify_arguments, _run_classify),
    "predict": (_PREDICT_HELP, _add_predict_arguments, _run_predict),
    "convert": (CONVERT_HELP, add_convert_arguments, run_convert),
    "info": (_INFO_HELP, _add_info_arguments, _run_info),
    "bench": (_BENCH_HELP, _add_bench_arguments, _run_bench),
}


if __name__ == "__main__":
    sys.exit(main())
