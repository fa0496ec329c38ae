"""The registry of named model variants: name -> (model class, config)."""
from ..errors import CheckpointError
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
