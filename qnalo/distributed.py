"""Corpus-scale inference on Ray Data: `qnalo predict SOURCE... --out DIR` and predict(...).

    from qnalo.distributed import predict
    summary = predict(["photos/", "more.txt"], "predictions/", model="litv2_s", top=5, workers=4)

The inputs (image files, folders, globs, text files of paths, Parquet/CSV tables with a path column; local or
anything pyarrow.fs opens) are listed in the driver in a fixed order and cut into shards of rows_per_file
rows. Each shard is one item of a Ray dataset; `map_batches` runs _ShardWriter, a callable class (one model
load per actor), which reads and preprocesses the shard's images, runs the model, and writes the shard's
Parquet file atomically (a temporary name, then a rename). The output folder holds part-NNNNNN.parquet, one
per shard, and _qnalo_predict.json, which records what the run was asked (inputs, model, options).

Resume: a run over an output folder whose record matches skips the shards already written; a shard's file
either exists complete or not at all, so a killed driver and a second run give exactly the rows of one
uninterrupted run. An actor that dies is restarted by Ray Data and its shard retried; a retried shard writes
the same file again, so no row is lost or duplicated.

Output columns, one row per input, in input order within each shard:
    path       string                the path as given (as `qnalo classify` prints it)
    top_index  list<int64>           the k most probable classes, most probable first (empty on error)
    top_label  list<string>          their labels
    top_prob   list<float32>         their probabilities
    error      string, null if none  why the image could not be read
    features   fixed_size_list<float32>[C]   (features=True) the pooled embedding: final LayerNorm, token mean
    logits     fixed_size_list<float32>[K]   (logits=True)
Rows with an error hold zeros in features and logits.
"""
import hashlib
import io
import json
import os
import time
import uuid

import numpy as np

from .classify import IMAGE_EXTENSIONS, expand_paths, named_model, softmax
from .errors import InputError, QnaloError
from .preprocess import official_eval

OUTPUT_COLUMNS = ("path", "top_index", "top_label", "top_prob", "error", "features", "logits")
RECORD_NAME = "_qnalo_predict.json"
RECORD_FORMAT = 1
TABLE_EXTENSIONS = (".parquet", ".csv")
LIST_EXTENSIONS = (".txt", ".lst")


def _is_uri(path):
    return "://" in path


def _filesystem(path):
    """(pyarrow filesystem, path inside it) for a local path or a URI: the schemes pyarrow.fs knows (file, s3,
    gs, hdfs, ...), else any fsspec knows (where fsspec and its implementation are installed)."""
    from pyarrow import fs
    if not _is_uri(path):
        return fs.LocalFileSystem(), os.path.abspath(path)
    try:
        return fs.FileSystem.from_uri(path)
    except ValueError as exc:   # pyarrow's ArrowInvalid for a scheme it does not know is one
        try:
            import fsspec
            from fsspec.core import split_protocol
            protocol, inner = split_protocol(path)
            return fs.PyFileSystem(fs.FSSpecHandler(fsspec.filesystem(protocol))), inner
        except (ImportError, ValueError) as fsspec_error:
            raise InputError(f"{path}: no filesystem for this URI in pyarrow.fs ({exc}) or fsspec "
                             f"({fsspec_error})") from None


def _read_table_paths(source, column):
    """The `column` of a Parquet or CSV table, as strings."""
    import pyarrow.csv
    import pyarrow.parquet
    filesystem, inner = _filesystem(source)
    if source.lower().endswith(".parquet"):
        table = pyarrow.parquet.read_table(inner, filesystem=filesystem)
    else:
        with filesystem.open_input_stream(inner) as stream:
            table = pyarrow.csv.read_csv(stream)
    if column not in table.column_names:
        raise InputError(f"{source}: the table has no {column!r} column (columns: {', '.join(table.column_names)}); "
                         f"name the path column with --path-column")
    return [str(p) for p in table.column(column).to_pylist() if p is not None]


def _read_list_paths(source):
    """Paths listed one per line (blank lines and lines starting with # skipped); relative paths are taken
    from the list file's folder."""
    filesystem, inner = _filesystem(source)
    with filesystem.open_input_stream(inner) as stream:
        lines = stream.read().decode("utf-8").splitlines()
    base = os.path.dirname(source)
    paths = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        paths.append(line if _is_uri(line) or os.path.isabs(line) or not base else os.path.join(base, line))
    return paths


def _remote_images(source):
    """A URI: the image files under it when it is a folder, else the file itself."""
    from pyarrow import fs
    filesystem, inner = _filesystem(source)
    info = filesystem.get_file_info(inner)
    if info.type == fs.FileType.NotFound:
        return None
    if info.type == fs.FileType.Directory:
        scheme = source.split("://", 1)[0]
        found = filesystem.get_file_info(fs.FileSelector(inner, recursive=True))
        return sorted(f"{scheme}://{f.path}" for f in found
                      if f.type == fs.FileType.File and f.path.lower().endswith(IMAGE_EXTENSIONS))
    return [source]


def list_inputs(sources, path_column="path"):
    """SOURCE arguments -> (paths in order, problems [(source, message)]). A .parquet / .csv source is a table
    whose `path_column` names the images, a .txt / .lst source a list of paths; anything else is an image
    file, a folder (searched recursively) or a glob, as in `qnalo classify`."""
    paths, problems = [], []
    for source in sources:
        source = os.fspath(source)
        lower = source.lower()
        try:
            if lower.endswith(TABLE_EXTENSIONS):
                paths.extend(_read_table_paths(source, path_column))
            elif lower.endswith(LIST_EXTENSIONS):
                paths.extend(_read_list_paths(source))
            elif _is_uri(source):
                found = _remote_images(source)
                if found is None:
                    problems.append((source, "no such file or folder"))
                else:
                    paths.extend(found)
            else:
                found, missing = expand_paths([source])
                paths.extend(found)
                problems.extend(missing)
        except FileNotFoundError:
            problems.append((source, "no such file"))
        except InputError:
            raise
        except (OSError, ValueError) as exc:
            problems.append((source, f"cannot be read as a {lower.rsplit('.', 1)[-1]} file: "
                                     f"{' '.join(str(exc).split())}"))
    return paths, problems


def read_image(architecture, img_size, image):
    """A path (local or URI), a PIL image or decoded (H, W, C) uint8 pixels -> (1, 3, S, S) float32 by the
    family's official preprocessing; ValueError saying why when it cannot be read as an image."""
    from PIL import Image
    try:
        if isinstance(image, np.ndarray):
            if image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (1, 3, 4)):
                image = Image.fromarray(np.ascontiguousarray(image.squeeze(-1) if image.ndim == 3 and
                                                             image.shape[2] == 1 else image))
            else:
                raise ValueError(f"expected decoded pixels (H, W) or (H, W, 1|3|4), got shape {image.shape}")
        elif isinstance(image, str) and _is_uri(image):
            filesystem, inner = _filesystem(image)
            with filesystem.open_input_stream(inner) as stream:
                image = Image.open(io.BytesIO(stream.read()))
                image.load()
        return official_eval(architecture, img_size, image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read as an image: {' '.join(str(exc).split()) or type(exc).__name__}") from None


def load_model(model=None, weights=None, threads=None, backend="numba"):
    """The model `--model NAME | --weights FILE` names (qnalo.classify.named_model), with `threads` kernel
    threads when given. backend="numpy" builds it without loading the kernels: the driver's check that the
    model can be built before any worker tries."""
    if threads:
        import qnalo
        qnalo.set_num_threads(threads)
    return named_model(model, weights, backend=backend)


def _check_classifier(model, name):
    if not model.config.num_classes:
        raise InputError(f"{name} is a backbone without a classifier head; predict needs a classification model")


class Predictor:
    """Rows of images -> rows of predictions (see the module docstring for the columns); a Ray Data
    `map_batches` callable class (qnalo.ray). model / weights as in load_model; top: classes per row (at most
    the head's); features, logits: add those columns; threads: kernel threads (give it the actor's num_cpus);
    batch: images per model call."""

    def __init__(self, model=None, weights=None, top=5, features=False, logits=False, threads=None, batch=8):
        from .labels import model_labels

        self.model = load_model(model, weights, threads)
        _check_classifier(self.model, weights or model)
        classes = self.model.config.num_classes
        if top < 1:
            raise InputError(f"top must be at least 1, got {top}")
        self.top = min(top, classes)
        self.features, self.logits, self.batch = features, logits, batch
        self.labels = model_labels(self.model)

    def __call__(self, batch):
        """batch: {"image": decoded pixels, optional "path"} or {"path": paths} -> a pyarrow.Table of the output
        columns (what map_batches may return, with the list and float32 types kept)."""
        if "image" in batch:
            images = list(batch["image"])
            paths = [str(p) for p in batch["path"]] if "path" in batch else [""] * len(images)
        elif "path" in batch:
            paths = [str(p) for p in batch["path"]]
            images = paths
        else:
            raise InputError(f"a batch needs an 'image' or a 'path' column; it has {', '.join(batch)}")
        return self.predict(paths, images)

    def predict(self, paths, images):
        """paths (as reported), images (what read_image takes) -> pyarrow.Table of the output columns, a row
        each."""
        arch, size = self.model.architecture, self.model.config.img_size
        arrays, errors = [], []
        for image in images:
            try:
                arrays.append(read_image(arch, size, image))
                errors.append(None)
            except ValueError as exc:
                arrays.append(None)
                errors.append(str(exc))
        good = [i for i, a in enumerate(arrays) if a is not None]
        n, classes = len(paths), self.model.config.num_classes
        logits = np.zeros((n, classes), np.float32)
        feats = None
        for start in range(0, len(good), self.batch):
            rows = good[start:start + self.batch]
            pooled, out = self.model.forward_pooled(np.concatenate([arrays[i] for i in rows]))
            logits[rows] = out
            if self.features:
                if feats is None:
                    feats = np.zeros((n, pooled.shape[1]), np.float32)
                feats[rows] = pooled
        probabilities = softmax(logits).astype(np.float32)
        order = np.argsort(-probabilities, axis=1, kind="stable")[:, :self.top]
        columns = {
            "path": np.array(paths, dtype=object),
            "top_index": [order[i].astype(np.int64) if errors[i] is None else np.zeros(0, np.int64)
                          for i in range(n)],
            "top_label": [[self.labels[j] for j in order[i]] if errors[i] is None else [] for i in range(n)],
            "top_prob": [probabilities[i, order[i]] if errors[i] is None else np.zeros(0, np.float32)
                         for i in range(n)],
            "error": np.array(errors, dtype=object),
        }
        if self.features:
            if feats is None:
                feats = np.zeros((n, self.model.config.stage_dim(3)), np.float32)
            columns["features"] = feats
        if self.logits:
            columns["logits"] = logits
        return _arrow_table(columns)


def _arrow_table(columns):
    """The output columns as a pyarrow table with the documented types."""
    import pyarrow as pa
    arrays = {
        "path": pa.array(list(columns["path"]), pa.string()),
        "top_index": pa.array([list(map(int, r)) for r in columns["top_index"]], pa.list_(pa.int64())),
        "top_label": pa.array(columns["top_label"], pa.list_(pa.string())),
        "top_prob": pa.array([np.asarray(r, np.float32) for r in columns["top_prob"]], pa.list_(pa.float32())),
        "error": pa.array(list(columns["error"]), pa.string()),
    }
    for name in ("features", "logits"):
        if name in columns:
            values = np.ascontiguousarray(columns[name], np.float32)
            arrays[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])
    return pa.table(arrays)


def shard_name(index):
    return f"part-{index:06d}.parquet"


def write_shard_atomically(table, out, index):
    """Writes table as out/part-NNNNNN.parquet under a temporary name first, then renames it, so that the
    file is never seen half-written (a crash leaves only a .tmp file, removed by the next run)."""
    import pyarrow.parquet
    filesystem, folder = _filesystem(out)
    final = f"{folder}/{shard_name(index)}"
    temporary = f"{folder}/.{shard_name(index)}.{uuid.uuid4().hex}.tmp"
    pyarrow.parquet.write_table(table, temporary, filesystem=filesystem)
    filesystem.move(temporary, final)
    return final


class _ShardWriter:
    """map_batches callable: items {"shard", "paths": JSON [paths as given, paths to read]} -> each shard
    predicted and written; returns one summary row per shard (shard, rows, errors, and the wall-clock times
    its work started and finished)."""

    def __init__(self, out, **predictor_options):
        self.out = out
        self.predictor = Predictor(**predictor_options)

    def __call__(self, batch):
        shards, rows, errors, started, finished = [], [], [], [], []
        for index, encoded in zip(batch["shard"], batch["paths"]):
            started.append(time.time())
            shown, resolved = json.loads(encoded)
            table = self.predictor.predict(shown, resolved)
            write_shard_atomically(table, self.out, int(index))
            shards.append(int(index))
            rows.append(table.num_rows)
            errors.append(table.num_rows - table.column("error").null_count)
            finished.append(time.time())
        return {"shard": np.array(shards, np.int64), "rows": np.array(rows, np.int64),
                "errors": np.array(errors, np.int64), "started": np.array(started, np.float64),
                "finished": np.array(finished, np.float64)}


def _weights_identity(weights):
    """What the run record keeps of a weights file: its absolute path, size and modification time."""
    if not weights:
        return None
    stat = os.stat(weights)
    return {"path": os.path.abspath(weights), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _run_record(paths, rows_per_file, options):
    digest = hashlib.sha256("\n".join(paths).encode("utf-8")).hexdigest()
    return {"format": RECORD_FORMAT, "inputs": len(paths), "inputs_sha256": digest, "rows_per_file": rows_per_file,
            **options}


def _prepare_output(out, record):
    """Creates the output folder (or checks that its record matches this run) and removes stale temporary
    files; returns the set of shard indices already written."""
    from pyarrow import fs
    filesystem, folder = _filesystem(out)
    filesystem.create_dir(folder, recursive=True)
    record_path = f"{folder}/{RECORD_NAME}"
    info = filesystem.get_file_info(record_path)
    entries = filesystem.get_file_info(fs.FileSelector(folder))
    if info.type == fs.FileType.File:
        with filesystem.open_input_stream(record_path) as stream:
            previous = json.loads(stream.read().decode("utf-8"))
        if previous != record:
            changed = sorted(k for k in set(previous) | set(record) if previous.get(k) != record.get(k))
            raise InputError(f"{out} holds the output of a different run ({', '.join(changed)} differ); "
                             "rerun with the same inputs and options to resume it, or use a new --out folder")
    elif any(e.base_name.startswith("part-") for e in entries):
        raise InputError(f"{out} holds part files but no {RECORD_NAME}; it is not a qnalo predict folder, "
                         "use a new --out folder")
    else:
        temporary = f"{folder}/.{RECORD_NAME}.{uuid.uuid4().hex}.tmp"
        with filesystem.open_output_stream(temporary) as stream:
            stream.write(json.dumps(record, indent=1, sort_keys=True).encode("utf-8"))
        filesystem.move(temporary, record_path)
    done = set()
    for entry in entries:
        name = entry.base_name
        if name.startswith(".part-") and name.endswith(".tmp"):
            filesystem.delete_file(entry.path)
        elif name.startswith("part-") and name.endswith(".parquet"):
            done.add(int(name[len("part-"):-len(".parquet")]))
    return done


def predict(sources, out, model=None, weights=None, top=5, features=False, logits=False, rows_per_file=1000,
            workers=None, threads_per_worker=1, batch=8, address=None, path_column="path", report=print,
            ray_init_options=None):
    """Runs the model over every input with Ray Data and writes the Parquet dataset to `out` (see the module
    docstring). address: a Ray cluster ("auto", "ray://host:10001", ...), else a local Ray is started for the
    run (and stopped after it); where Ray is already initialised, that one is used. workers: model actors (default: the cluster's CPUs / threads_per_worker). Returns a summary dict:
    images, errors (error rows) and shards_written by this run, shards_skipped (written before), inputs,
    not_found (sources naming nothing), seconds and images_per_s (the whole call), working_seconds and
    working_images_per_s (from the first shard's start to the last one's end: without Ray's and the actors'
    start-up)."""
    if rows_per_file < 1 or threads_per_worker < 1 or batch < 1 or top < 1 or (workers is not None and workers < 1):
        raise InputError("rows_per_file, threads_per_worker, batch, top and workers must each be at least 1")
    started = time.perf_counter()
    paths, problems = list_inputs(sources, path_column)
    for source, message in problems:
        report(f"qnalo predict: {source}: {message}")
    if not paths:
        raise InputError("the sources name no images; give image files, folders, globs, a list file or a table")
    if model is None and weights is None:
        raise InputError("no model given; pass --model NAME or --weights FILE")
    _check_classifier(load_model(model, weights, backend="numpy"), weights or model)   # errors here, not in actors
    options = {"model": model, "weights": _weights_identity(weights), "top": top, "features": bool(features),
               "logits": bool(logits)}
    done = _prepare_output(out, _run_record(paths, rows_per_file, options))
    shards = [(i, paths[start:start + rows_per_file])
              for i, start in enumerate(range(0, len(paths), rows_per_file)) if i not in done]
    summary = {"images": 0, "errors": 0, "shards_written": 0, "shards_skipped": len(done), "inputs": len(paths),
               "not_found": len(problems)}
    if shards:
        _run_on_ray(shards, out, dict(model=model, weights=weights, top=top, features=features, logits=logits,
                                      threads=threads_per_worker, batch=batch),
                    workers, threads_per_worker, address, summary, ray_init_options or {})
    summary["seconds"] = time.perf_counter() - started
    summary["images_per_s"] = summary["images"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
    working = summary.get("working_seconds", 0.0)
    summary["working_images_per_s"] = summary["images"] / working if working > 0 else 0.0
    return summary


def _run_on_ray(shards, out, predictor_options, workers, threads, address, summary, init_options):
    try:
        import ray
    except ImportError:
        raise QnaloError("qnalo predict runs on Ray Data, which is not installed; pip install 'qnalo[ray]'") \
            from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 logging_level="warning", **init_options)
    try:
        _run_shards(ray, shards, out, predictor_options, workers, threads, summary)
    except Exception as exc:   # Ray wraps a worker's error in its own types, with the remote traceback
        raise _worker_error(exc) from exc
    finally:
        if started_here:
            ray.shutdown()


def _worker_error(exc):
    """The error a worker raised, as qnalo reports errors: qnalo's own or an OSError (a file that cannot be
    written, say) as it was raised, anything else as a QnaloError naming it."""
    seen, todo = set(), [exc]
    while todo:
        error = todo.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, (QnaloError, OSError)) and error is not exc:
            return error
        todo += [getattr(error, "cause", None), error.__cause__, error.__context__]
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return QnaloError(f"a Ray worker failed: {type(exc).__name__}: {lines[-1] if lines else ''}; rerun the same "
                      "command to resume from the shards written")


def _run_shards(ray, shards, out, predictor_options, workers, threads, summary):
    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    # relative paths are read as absolute ones: an actor's working folder is not the driver's
    items = [{"shard": i, "paths": json.dumps([p, [q if _is_uri(q) else os.path.abspath(q) for q in p]])}
             for i, p in shards]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ShardWriter, fn_constructor_kwargs={"out": out, **predictor_options}, batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))), num_cpus=threads)
    first, last = float("inf"), float("-inf")
    for row in dataset.iter_rows():
        summary["images"] += int(row["rows"])
        summary["errors"] += int(row["errors"])
        summary["shards_written"] += 1
        first, last = min(first, float(row["started"])), max(last, float(row["finished"]))
    summary["working_seconds"] = last - first
