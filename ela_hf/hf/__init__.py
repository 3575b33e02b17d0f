"""transformers front door: config, models and image processor, registered with the Auto classes.

Importing this package (``import ela_hf`` does) registers ``model_type="ela"`` with ``AutoConfig``,
``AutoModel``, ``AutoModelForImageClassification``, ``AutoBackbone`` and ``AutoImageProcessor``, and a checkpoint conversion
mapping so that ``model.safetensors`` holds timm's key names.
"""
from transformers import AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification

from .configuration_ela import ElaConfig
from .image_processing_ela import ElaImageProcessor
from .modeling_ela import ElaBackbone, ElaForImageClassification, ElaModel, ElaPreTrainedModel

__all__ = [
    "ElaConfig",
    "ElaImageProcessor",
    "ElaModel",
    "ElaForImageClassification",
    "ElaBackbone",
    "ElaPreTrainedModel",
]


def _register_auto_classes() -> None:
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    AutoConfig.register(ElaConfig.model_type, ElaConfig, exist_ok=True)
    AutoModel.register(ElaConfig, ElaModel, exist_ok=True)
    AutoModelForImageClassification.register(ElaConfig, ElaForImageClassification, exist_ok=True)
    AutoBackbone.register(ElaConfig, ElaBackbone, exist_ok=True)
    AutoImageProcessor.register(
        ElaConfig, image_processor_classes={"pil": ElaImageProcessor, "torchvision": ElaImageProcessor}, exist_ok=True
    )
    # weights are stored with timm's names: add the `timm_model.` prefix on load, drop it on save
    register_checkpoint_conversion_mapping(
        ElaConfig.model_type, [PrefixChange(prefix_to_add="timm_model")], overwrite=True
    )


_register_auto_classes()
