"""qnalo predict on Ray Data (qnalo.distributed, qnalo.ray): input listing, the Predictor, the run record, and
real runs on a local two-node Ray cluster (ray.cluster_utils.Cluster, two 1-CPU nodes on this machine) over a
few hundred generated images with the demo models, checked row for row against `qnalo classify --json`:
uninterrupted, after a killed driver and a resume, and with a worker actor killed mid-run."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from qnalo.distributed import Predictor, list_inputs, predict
from qnalo.errors import InputError

ray = pytest.importorskip("ray", reason="qnalo predict needs Ray Data: pip install 'qnalo[ray]'")
pq = pytest.importorskip("pyarrow.parquet")

MODEL = "qna_vit_digits"
IMAGES = 240
BAD = ("broken.png", "empty.jpg", "text.png")


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "qnalo.cli", *args], capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """IMAGES generated pictures of varied sizes and formats in two folders, plus BAD unreadable files."""
    from PIL import Image
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(7)
    for i in range(IMAGES):
        folder = root / ("a" if i % 3 else "b")
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (20 + i % 23, 18 + i % 17, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.{'png' if i % 2 else 'jpg'}")
    (root / "b" / BAD[0]).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "b" / BAD[1]).write_bytes(b"")
    (root / "b" / BAD[2]).write_text("not an image")
    return root


@pytest.fixture(scope="module")
def classified(corpus):
    """path -> what `qnalo classify --json --top 3` gives for it (its "top" list, or its "error")."""
    proc = _cli("classify", "--json", "--model", MODEL, "--top", "3", str(corpus))
    assert proc.returncode == 1, proc.stderr          # 1: the BAD files could not be read
    return {r["image"]: r for r in json.loads(proc.stdout)["results"]}


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of two 1-CPU nodes; this process is its driver."""
    from ray.cluster_utils import Cluster
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False, logging_level="warning")
    yield c
    ray.shutdown()
    c.shutdown()


def _read_rows(out):
    rows = pq.read_table(out).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate paths in the output"
    return {r["path"]: r for r in rows}


def _assert_rows_match(rows, classified):
    assert set(rows) == set(classified)
    for path, expected in classified.items():
        row = rows[path]
        if "error" in expected:
            assert row["error"] and row["top_index"] == [], (path, row)
            continue
        assert row["error"] is None, (path, row["error"])
        assert row["top_index"] == [t["index"] for t in expected["top"]], path
        assert row["top_label"] == [t["label"] for t in expected["top"]], path
        np.testing.assert_allclose(row["top_prob"], [t["probability"] for t in expected["top"]],
                                   rtol=2e-6, atol=1e-7, err_msg=path)


def _run(corpus, out, **options):
    return predict([str(corpus)], str(out), model=MODEL, top=3, report=lambda line: None, **options)


# -- without Ray: listing, the Predictor, the run record ------------------------------------------------------

def test_list_inputs_reads_lists_tables_folders_and_globs(tmp_path, corpus):
    import pyarrow as pa
    import pyarrow.csv
    one, two = str(corpus / "a" / "img0001.png"), str(corpus / "b" / "img0000.jpg")
    (tmp_path / "list.txt").write_text(f"# a comment\n{one}\n\nimg0000.jpg\n")
    os.symlink(corpus / "b" / "img0000.jpg", tmp_path / "img0000.jpg")
    pq.write_table(pa.table({"file": [one, two]}), tmp_path / "table.parquet")
    pyarrow.csv.write_csv(pa.table({"path": [two]}), tmp_path / "table.csv")
    paths, problems = list_inputs([str(tmp_path / "list.txt"), str(tmp_path / "table.csv"),
                                   str(corpus / "a" / "img000*.png"), str(tmp_path / "missing")])
    assert paths == [one, str(tmp_path / "img0000.jpg"), two,
                     *(str(corpus / "a" / f"img000{i}.png") for i in (1, 5, 7))]
    assert problems == [(str(tmp_path / "missing"), "no such file or directory")]
    assert list_inputs([str(tmp_path / "table.parquet")], path_column="file")[0] == [one, two]
    with pytest.raises(InputError, match="no 'path' column .* --path-column"):
        list_inputs([str(tmp_path / "table.parquet")])


def test_uris_are_listed_and_read_through_pyarrow_fs_and_fsspec(corpus):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    png = (corpus / "a" / "img0001.png").read_bytes()
    memory.pipe("/qnalo-test/x/one.png", png)
    memory.pipe("/qnalo-test/x/notes.md", b"not listed: not an image extension")
    memory.pipe("/qnalo-test/list.txt", b"memory://qnalo-test/x/one.png\n")
    paths, problems = list_inputs(["memory://qnalo-test/x", "memory://qnalo-test/list.txt",
                                   "memory://qnalo-test/none", f"file://{corpus}/b/img0000.jpg"])
    assert paths == ["memory:///qnalo-test/x/one.png", "memory://qnalo-test/x/one.png",
                     f"file://{corpus}/b/img0000.jpg"]
    assert problems == [("memory://qnalo-test/none", "no such file or folder")]
    rows = Predictor(model=MODEL, top=2).predict(paths + [str(corpus / "a" / "img0001.png")], paths + [
        str(corpus / "a" / "img0001.png")]).to_pylist()
    assert all(r["error"] is None for r in rows) and rows[0]["top_prob"] == rows[3]["top_prob"]
    with pytest.raises(InputError, match="no filesystem for this URI"):
        list_inputs(["nosuchscheme://x"])


def test_predictor_matches_the_model_and_gives_error_rows(corpus):
    import qnalo
    from qnalo import demo
    from qnalo.classify import load_image, softmax
    predictor = Predictor(model=MODEL, top=4, features=True, logits=True, batch=3)
    good = [str(corpus / "a" / f"img{i:04d}.png") for i in (1, 5, 7, 11)]
    table = predictor({"path": np.array(good + [str(corpus / "b" / BAD[2])], dtype=object)})
    assert table.column_names == ["path", "top_index", "top_label", "top_prob", "error", "features", "logits"]
    rows = table.to_pylist()
    model = qnalo.load(demo.demo_path(MODEL))
    x = np.concatenate([load_image(model, p) for p in good])
    features, logits = model.forward_pooled(x)
    np.testing.assert_allclose([r["logits"] for r in rows[:4]], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose([r["features"] for r in rows[:4]], features, rtol=1e-5, atol=1e-5)
    expected = softmax(logits)
    for row, probs in zip(rows, expected):
        order = np.argsort(-probs, kind="stable")[:4]
        assert row["top_index"] == order.tolist() and row["error"] is None
        np.testing.assert_allclose(row["top_prob"], probs[order], rtol=2e-6)
    assert rows[4]["error"].startswith("cannot read as an image") and rows[4]["top_prob"] == []
    assert rows[4]["logits"] == [0.0] * 10


def test_predictor_takes_decoded_pixels_as_read_images_gives_them(corpus):
    from PIL import Image
    predictor = Predictor(model=MODEL, top=2)
    path = str(corpus / "a" / "img0002.jpg")
    pixels = np.asarray(Image.open(path).convert("RGB"))
    images = np.empty(2, dtype=object)
    images[0], images[1] = pixels, np.zeros(5, np.uint8)
    rows = predictor({"image": images, "path": np.array([path, "x"], dtype=object)}).to_pylist()
    by_path = predictor({"path": np.array([path], dtype=object)}).to_pylist()[0]
    assert rows[0]["top_index"] == by_path["top_index"] and rows[0]["error"] is None
    assert "expected decoded pixels" in rows[1]["error"]


def test_an_output_folder_of_another_run_is_refused(tmp_path, corpus):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "part-000000.parquet").write_bytes(b"x")
    with pytest.raises(InputError, match="not a qnalo predict folder"):
        _run(corpus, tmp_path / "out")
    with pytest.raises(InputError, match="no model given"):
        predict([str(corpus)], str(tmp_path / "other"), report=lambda line: None)
    with pytest.raises(InputError, match="name no images"):
        predict([str(tmp_path / "nothing*.png")], str(tmp_path / "other"), model=MODEL, report=lambda line: None)


# -- on the local two-node cluster ----------------------------------------------------------------------------

def test_predict_rows_equal_classify(tmp_path, corpus, classified, cluster):
    summary = _run(corpus, tmp_path / "out", rows_per_file=50, workers=2, features=True)
    assert summary["images"] == IMAGES + len(BAD) and summary["errors"] == len(BAD)
    assert summary["shards_written"] == -(-(IMAGES + len(BAD)) // 50)
    _assert_rows_match(_read_rows(tmp_path / "out"), classified)
    features = pq.read_table(tmp_path / "out", columns=["features"]).column("features")
    assert features.type.list_size == 128
    again = _run(corpus, tmp_path / "out", rows_per_file=50, workers=2, features=True)
    assert again["shards_written"] == 0 and again["shards_skipped"] == summary["shards_written"]
    with pytest.raises(InputError, match="different run .*rows_per_file"):
        _run(corpus, tmp_path / "out", rows_per_file=40, workers=2, features=True)


def test_killed_driver_then_resume_gives_the_same_rows(tmp_path, corpus, classified, cluster):
    out = tmp_path / "out"
    driver = subprocess.Popen([sys.executable, "-m", "qnalo.cli", "predict", str(corpus), "--out", str(out),
                               "--model", MODEL, "--top", "3", "--rows-per-file", "5", "--workers", "2",
                               "--address", cluster.address], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        if len(list(out.glob("part-*.parquet"))) >= 4:
            break
        time.sleep(0.05)
    assert driver.poll() is None, "the driver ended before it could be killed: " + driver.stderr.read().decode()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    written = len(list(out.glob("part-*.parquet")))
    assert 4 <= written < -(-(IMAGES + len(BAD)) // 5), "the kill did not land mid-run"
    for part in out.glob("part-*.parquet"):
        pq.read_table(part)                  # every finished file is whole
    resumed = _run(corpus, out, rows_per_file=5, workers=2)
    assert resumed["shards_skipped"] >= written
    assert not list(out.glob(".*.tmp"))
    _assert_rows_match(_read_rows(out), classified)


def _writer_pids():
    """Process ids of the running model actors (Ray titles them ray::MapWorker(MapBatches(_ShardWriter)))."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"MapBatches(_ShardWriter)" in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the actor's process in /proc")
def test_a_killed_worker_actor_loses_nothing(tmp_path, corpus, classified, cluster):
    out = tmp_path / "out"
    killed = []

    def kill_one_writer():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if len(list(out.glob("part-*.parquet"))) >= 3:
                pids = _writer_pids()
                if pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_writer, daemon=True)
    killer.start()
    summary = _run(corpus, out, rows_per_file=5, workers=2)
    killer.join(timeout=60)
    assert killed, "no worker actor was killed"
    assert summary["images"] == IMAGES + len(BAD) and summary["shards_written"] == -(-(IMAGES + len(BAD)) // 5)
    _assert_rows_match(_read_rows(out), classified)


def test_cli_errors_are_one_line_with_the_usual_statuses(tmp_path, corpus):
    proc = _cli("predict", str(corpus), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "qnalo: error: no model given; pass --model NAME (e.g. qna_vit_digits) or --weights FILE"]
    proc = _cli("predict", str(tmp_path / "none*.png"), "--out", str(tmp_path / "out"), "--model", MODEL)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
        "qnalo: error: the sources name no images")
    proc = _cli("predict", str(corpus), "--out", str(tmp_path / "o"), "--model", "nope")
    assert proc.returncode == 2 and proc.stderr.startswith("qnalo: error: unknown model 'nope'")
    proc = _cli("predict", str(corpus), "--out", str(tmp_path / "o"), "--weights", str(corpus / "b" / BAD[2]))
    assert proc.returncode == 1 and proc.stderr.startswith("qnalo: error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()
