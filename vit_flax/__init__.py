"""vit_flax: Vision Transformers with TokenLearner / TokenFuser in JAX + Flax (scenic-faithful),
and the ViT family (DeiT, CaiT, MLP-Mixer, XCiT, Swin) on the same trainer."""

from vit_flax.config import resolve
from vit_flax.config_files import load_config_file
from vit_flax.models import MODELS, build_model, reference_config
from vit_flax.pretrained import export_vit_jax, load_pretrained
from vit_flax.tokenlearner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11
from vit_flax.vit import ViT, decode_variant

__all__ = [
    'MODELS',
    'TokenFuser',
    'TokenLearnerModule',
    'TokenLearnerModuleV11',
    'ViT',
    'build_model',
    'decode_variant',
    'export_vit_jax',
    'load_config_file',
    'load_pretrained',
    'reference_config',
    'resolve',
]
