"""vit_flax: Vision Transformers with TokenLearner / TokenFuser in JAX + Flax (scenic-faithful)."""

from vit_flax.config import build_model, load_config_file, resolve
from vit_flax.tokenlearner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11
from vit_flax.vit import ViT, decode_variant

__all__ = [
    'TokenFuser',
    'TokenLearnerModule',
    'TokenLearnerModuleV11',
    'ViT',
    'build_model',
    'decode_variant',
    'load_config_file',
    'resolve',
]
