"""Class names: ImageNet-1k's (shipped, qnalo/data/imagenet_classes.tsv) or those a weights file records.

imagenet_classes.tsv holds the 1,000 ILSVRC-2012 classes in training-index order, one per line:
`<WordNet synset id>\t<comma-separated WordNet lemmas>`, as distributed with timm (Apache-2.0).
"""
import functools
import os

IMAGENET_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_classes.tsv")
IMAGENET_CLASSES = 1000


@functools.lru_cache(maxsize=1)
def imagenet_classes():
    """((synset, names), ...) for the 1000 classes, index order."""
    with open(IMAGENET_FILE, encoding="utf-8") as f:
        rows = tuple(tuple(line.rstrip("\n").split("\t", 1)) for line in f if line.strip())
    if len(rows) != IMAGENET_CLASSES:
        raise RuntimeError(f"{IMAGENET_FILE} holds {len(rows)} classes, not {IMAGENET_CLASSES}; reinstall qnalo")
    return rows


def imagenet_labels():
    """The first name of each ImageNet class, e.g. 'tench', 'goldfish', ..."""
    return [names.split(",")[0] for _, names in imagenet_classes()]


def model_labels(model):
    """A model's class names: those its weights file records, ImageNet's for a 1000-class head, else '0', '1'..."""
    recorded = model.source.get("labels")
    if recorded:
        return list(recorded)
    classes = model.config.num_classes
    return imagenet_labels() if classes == IMAGENET_CLASSES else [str(i) for i in range(classes)]
