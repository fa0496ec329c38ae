"""Tensor tables: the expected name -> shape of a model's tensors, the one-error check against them, seeded
random tensors, and the dict round trip of a model config."""
import dataclasses

import numpy as np

from ..errors import CheckpointError, key_mismatches


def head_shapes(features, num_classes):
    """The classifier's tensors (final LayerNorm and Linear) in engine layout; none for a backbone."""
    if not num_classes:
        return {}
    return {"norm.weight": (features,), "norm.bias": (features,),
            "head.weight": (features, num_classes), "head.bias": (num_classes,)}


def check_tensor_shapes(tensors, expected, model_name, where="weights"):
    """Missing, unexpected or mis-shaped tensors are one error that names them."""
    problems = key_mismatches({k: tuple(v.shape) for k, v in tensors.items()}, expected)
    if problems:
        raise CheckpointError(f"{where} do not fit this {model_name} config: " + "; ".join(problems))


def draw_tensors(shapes, draw, seed):
    """name -> float32 array for every name -> shape, in order, from draw(rng, name, leaf, shape) with one
    seeded generator (leaf = the name's last dotted part)."""
    rng = np.random.default_rng(seed)
    return {name: np.asarray(draw(rng, name, name.rsplit(".", 1)[1], shape)).astype(np.float32)
            for name, shape in shapes.items()}


class ConfigDict:
    """to_dict / from_dict of a model config dataclass (tuples as JSON lists); NAME names it in errors."""

    NAME = "model"

    def to_dict(self):
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.NAME} config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path, d):
        """from_dict of the config a weights file carries: anything wrong with it is a CheckpointError."""
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged {cls.NAME} config ({' '.join(str(exc).split())}); "
                                  "re-convert the checkpoint") from None
