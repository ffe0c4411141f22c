"""Helpers shared by the model tests (test_layers, test_tokenlearner, test_vit)."""

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
