"""Networks of ZoomLDM (DESIGN.md §5): presets, modules, official-checkpoint converters, our checkpoint format.

    from zoomldm.models import UNET_PRESETS, UNet, read_checkpoint, load_component
"""

from zoomldm.models.cdm import CDM_PRESETS, CDMConfig, ConditionDiT, cdm_from_official
from zoomldm.models.checkpoint import (
    Checkpoint,
    CheckpointFormatError,
    load_component,
    read_checkpoint,
    save_checkpoint,
)
from zoomldm.models.errors import CheckpointKeyError, check_state_dict
from zoomldm.models.official import (
    load_compvis_cin256_unet,
    load_compvis_vq_f4,
    load_latent_diffusion,
    load_official_cdm,
    read_official_state_dict,
    to_official_state_dict,
)
from zoomldm.models.summarizer import SUMMARIZER_PRESETS, Summarizer, SummarizerConfig, summarizer_from_official
from zoomldm.models.unet import UNET_PRESETS, UNet, UNetConfig, unet_from_official
from zoomldm.models.vq import VQ_PRESETS, VQConfig, VQModel, vq_from_official

__all__ = [
    "CDM_PRESETS", "SUMMARIZER_PRESETS", "UNET_PRESETS", "VQ_PRESETS",
    "CDMConfig", "Checkpoint", "CheckpointFormatError", "CheckpointKeyError", "ConditionDiT", "Summarizer",
    "SummarizerConfig", "UNet", "UNetConfig", "VQConfig", "VQModel",
    "cdm_from_official", "check_state_dict", "load_component", "load_compvis_cin256_unet", "load_compvis_vq_f4",
    "load_latent_diffusion", "load_official_cdm", "read_checkpoint", "read_official_state_dict",
    "save_checkpoint", "summarizer_from_official", "to_official_state_dict", "unet_from_official",
    "vq_from_official",
]  # fmt: skip
