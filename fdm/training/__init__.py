"""Training FDM: phase 2 (sampler-free qe loss, FDM WACV 2025 sec. 3.3), phase 3 (joint fine-tuning with the
decoder) and the reusable pieces of the trainers (image sources, training views, feature cache, the paper's
optimiser schedule, checkpoints, data parallelism)."""

from fdm.training.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fdm.training.data import IMAGE_EXTENSIONS, ImageFolderViews, SeededViews, TensorViews, list_images
from fdm.training.distributed import DistContext, init_distributed, shutdown_distributed
from fdm.training.feature_cache import CACHE_DTYPES, CACHE_MODES, FeatureCache, encode_views
from fdm.training.holdout import HeldOutCheck, HeldOutResult, split_heldout
from fdm.training.loop import TrainingLoop
from fdm.training.phase2 import Phase2Config, Phase2Trainer, train_phase2
from fdm.training.phase3 import Phase3Config, Phase3Trainer, finetune
from fdm.training.schedule import WarmupCosineLR, paper_optimizer
from fdm.training.shards import ShardedBatches
from fdm.training.sources import FolderSource, HFDatasetSource, ImageSource, TarShardSource, open_source
from fdm.training.sources.base import ImageSubset

__all__ = [
    "CACHE_DTYPES",
    "CACHE_MODES",
    "IMAGE_EXTENSIONS",
    "DistContext",
    "FeatureCache",
    "FolderSource",
    "HeldOutCheck",
    "HeldOutResult",
    "HFDatasetSource",
    "ImageFolderViews",
    "ImageSource",
    "ImageSubset",
    "Phase2Config",
    "Phase2Trainer",
    "Phase3Config",
    "Phase3Trainer",
    "ShardedBatches",
    "SeededViews",
    "TarShardSource",
    "TensorViews",
    "TrainingLoop",
    "WarmupCosineLR",
    "encode_views",
    "finetune",
    "init_distributed",
    "latest_checkpoint",
    "list_images",
    "load_checkpoint",
    "open_source",
    "paper_optimizer",
    "save_checkpoint",
    "shutdown_distributed",
    "split_heldout",
    "train_phase2",
]
