"""Training FDM: phase 2 (sampler-free qe loss, FDM WACV 2025 sec. 3.3), phase 3 (joint fine-tuning with the
decoder) and the reusable pieces of the trainers (training views, feature cache, the paper's optimiser
schedule, checkpoints, data parallelism)."""

from fdm.training.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from fdm.training.data import IMAGE_EXTENSIONS, ImageFolderViews, TensorViews, list_images
from fdm.training.distributed import DistContext, init_distributed, shutdown_distributed
from fdm.training.feature_cache import CACHE_MODES, FeatureCache, encode_views
from fdm.training.phase2 import Phase2Config, Phase2Trainer, train_phase2
from fdm.training.phase3 import Phase3Config, Phase3Trainer, finetune
from fdm.training.schedule import WarmupCosineLR, paper_optimizer

__all__ = [
    "CACHE_MODES",
    "IMAGE_EXTENSIONS",
    "DistContext",
    "FeatureCache",
    "ImageFolderViews",
    "Phase2Config",
    "Phase2Trainer",
    "Phase3Config",
    "Phase3Trainer",
    "TensorViews",
    "WarmupCosineLR",
    "encode_views",
    "finetune",
    "init_distributed",
    "latest_checkpoint",
    "list_images",
    "load_checkpoint",
    "paper_optimizer",
    "save_checkpoint",
    "shutdown_distributed",
    "train_phase2",
]
