"""The registry of named model variants: name -> (model class, config)."""
import dataclasses

from ..errors import CheckpointError, VariantMismatchError
from ..weights import read_weights
from .litv2 import LITv2
from .litv2_config import LITV2_VARIANTS, LITv2Config
from .qna_vit import QnAViT
from .qna_vit_config import QNA_VIT_VARIANTS, QnAViTConfig

# name -> (model class, config class, default config)
MODEL_REGISTRY = {name: (LITv2, LITv2Config, cfg) for name, cfg in LITV2_VARIANTS.items()}
MODEL_REGISTRY.update({name: (QnAViT, QnAViTConfig, cfg) for name, cfg in QNA_VIT_VARIANTS.items()})

# architecture tag in a weights file -> (model class, config class)
ARCHITECTURES = {"litv2": (LITv2, LITv2Config), "qna_vit": (QnAViT, QnAViTConfig)}


def read_model_file(path):
    """(model class, config, tensors, source) of a qnalo weights file; a CheckpointError for an architecture
    this qnalo does not know or a damaged config."""
    tensors, architecture, config, source = read_weights(path)
    if architecture not in ARCHITECTURES:
        raise CheckpointError(f"{path}: unknown architecture {architecture!r}; this qnalo knows "
                              f"{sorted(ARCHITECTURES)}")
    model_cls, config_cls = ARCHITECTURES[architecture]
    return model_cls, config_cls.from_file(path, config), tensors, source


def read_variant_file(name, path):
    """read_model_file for a file that must hold variant `name` (a registered variant, or an embedded demo model):
    a VariantMismatchError when its architecture or an architecture field differs. The file's own config wins
    for what the variant leaves open: classes, dense norms, resolution."""
    from .. import demo
    if name in demo.DEMO_MODELS:
        model_cls, expected = read_model_file(demo.demo_path(name))[:2]
    else:
        model_cls, _, expected = MODEL_REGISTRY[name]
    held_cls, config, tensors, source = read_model_file(path)
    if held_cls is not model_cls:
        raise VariantMismatchError(f"{path} holds a {held_cls.architecture} model, not {name}")
    different = [f.name for f in dataclasses.fields(config) if f.name in config.ARCHITECTURE_FIELDS
                 and getattr(config, f.name) != getattr(expected, f.name)]
    if different:
        held = f"the weights of {source['variant']}" if source.get("variant") else "weights of another configuration"
        raise VariantMismatchError(f"{path} holds {held}, not of {name} (they differ in {', '.join(different)})")
    return model_cls, config, tensors, source
