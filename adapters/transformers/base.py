"""What the Janus and Emu3 adapters share: transformers' VQ tokenizers are recognised by their class name (without
importing transformers) and give their factor and channel count in their config."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from fdm.adapter import VQAdapter
from fdm.adapters.transformers.loading import is_transformers_class

__all__ = ["TransformersVQAdapter"]


class TransformersVQAdapter(VQAdapter):
    """Base of the transformers tokenizer adapters: ``class_name`` is the transformers class it handles; the factor is
    ``2 ** (len(channel_multiplier) - 1)`` and the channel count ``embed_dim``, both from the model's config."""

    #: The transformers class the adapter handles (``"JanusVQVAE"``...).
    class_name: ClassVar[str]

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return is_transformers_class(model, cls.class_name)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.model.config.channel_multiplier) - 1)

    @property
    def channels(self) -> int:
        return self.model.config.embed_dim
