"""The embedded demo (qnalo/demo): its files are what tests/reference/train_demo.py makes from scikit-learn's
digits, training is deterministic from the seed, and the class names and labels machinery around it."""
import numpy as np
import pytest

from qnalo import demo
from qnalo.labels import imagenet_classes, imagenet_labels
from qnalo.weights import read_weights

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
from reference import train_demo  # noqa: E402


def test_heldout_digits_are_the_seeded_split_of_sklearn_digits():
    manifest = demo.manifest()
    _, _, test_images, test_labels = train_demo.split(manifest["seed"])
    shipped = demo.heldout()
    assert np.array_equal(shipped["images"], test_images) and np.array_equal(shipped["labels"], test_labels)
    assert len(test_labels) == manifest["heldout_count"] == train_demo.HELDOUT_COUNT


def test_recorded_torch_accuracy_matches_the_recorded_predictions():
    shipped, manifest = demo.heldout(), demo.manifest()
    for name in demo.DEMO_MODELS:
        accuracy = float((shipped[f"torch_{name}"] == shipped["labels"]).mean())
        assert accuracy == manifest["models"][name]["torch_heldout_accuracy"] >= 0.95


def test_shipped_files_hold_the_trained_architectures_and_digit_labels():
    for name in demo.DEMO_MODELS:
        _, architecture, config, source = read_weights(demo.demo_path(name))
        assert architecture == train_demo.MODELS[name][0] and config["num_classes"] == 10
        assert config["img_size"] == demo.IMG_SIZE and source["labels"] == list(demo.DIGIT_LABELS)


@pytest.mark.parametrize("name", demo.DEMO_MODELS)
def test_training_is_deterministic_from_the_seed(monkeypatch, name):
    """Two short runs with one seed give bit-identical weights (the full run is the same loop, longer)."""
    monkeypatch.setitem(train_demo.TRAINING, "epochs", 1)
    monkeypatch.setitem(train_demo.TRAINING, "warmup_epochs", 0)
    images, labels, _, _ = train_demo.split(0)
    architecture, build = train_demo.MODELS[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [train_demo.train(name, architecture, build, images[:96], labels[:96], seed=5, log=lambda _: None)
                .state_dict() for _ in range(2)]
    finally:
        torch.set_num_threads(threads)
    assert runs[0].keys() == runs[1].keys()
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_augmentation_shifts_move_the_digit_and_bring_zeros_in():
    digits = np.arange(2 * 64, dtype=np.uint8).reshape(2, 8, 8)
    moved = train_demo.shifted(digits, 1, -1)
    assert np.array_equal(moved[:, 1:, :7], digits[:, :7, 1:])
    assert not moved[:, 0, :].any() and not moved[:, :, 7].any()


def test_imagenet_names_ship_with_the_package():
    classes = imagenet_classes()
    assert len(classes) == 1000 and len({synset for synset, _ in classes}) == 1000
    assert classes[0][0] == "n01440764" and imagenet_labels()[0] == "tench"   # index 0 of ILSVRC-2012
    assert imagenet_labels()[207] == "golden retriever" and imagenet_labels()[999] == "toilet tissue"
