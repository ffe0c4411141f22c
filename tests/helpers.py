"""Helpers shared by the test files: configs, random parameters, numpy references."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict


def random_variables(module, *args, scale=0.5, seed=0, **kwargs):
  """Random variables with `module.init`'s tree, built in numpy (no slow init compile)."""
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(scale * rng.standard_normal(a.shape), a.dtype),
                      abstract)


def param_shapes(params):
  """{'a/b/kernel': shape} for a parameter tree."""
  return {k: v.shape for k, v in flatten_dict(params, sep='/').items()}


CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'


def tiny_config():
  """configs/tiny.py's config, loaded by path as config_flags does (not yet resolved)."""
  from vit_flax import config_files  # pylint: disable=g-import-not-at-top
  return config_files.load_config_file(CONFIG_DIR / 'tiny.py')


def layer_norm(x, p, eps=1e-6):
  """numpy LayerNorm with flax's defaults."""
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def gelu(x):
  """numpy GELU, tanh approximation, as flax's nn.gelu."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
