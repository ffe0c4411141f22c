"""Look inside a trained ViT, as arrays: attention rollout, position-embedding similarity,
patch-embedding filters, and the attention weights and token maps a model sows.

Pure numpy (plus one jitted forward pass in `collect_intermediates`); `visualize` draws them.
"""

from collections.abc import Sequence
import re

import flax
import jax
import numpy as np

HEAD_FUSIONS = ('mean', 'max', 'min')


def attention_rollout(attentions: Sequence[np.ndarray], head_fusion: str = 'mean',
                      discard_ratio: float = 0.0, keep_first: bool = False) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020) through consecutive blocks.

  Per block: fuse the heads, optionally zero the lowest `discard_ratio` fraction of each row (never
  the diagonal, nor column 0 when `keep_first`, i.e. the CLS token), add the identity for the
  residual, renormalise the rows; then multiply the blocks, last block on the left.

  Args:
    attentions: per block, attention weights [B, heads, N, N] (rows sum to 1), first block first.
    head_fusion: 'mean', 'max' or 'min' over heads.
    discard_ratio: fraction in [0, 1) of the weakest weights to drop in each row.
    keep_first: never discard column 0 (the CLS token).

  Returns:
    [B, N, N] float64; row i is how much output token i draws on each input token; rows sum to 1.
  """
  if not attentions:
    raise ValueError('attention_rollout needs at least one block of attention weights.')
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f'head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}.')
  if not 0.0 <= discard_ratio < 1.0:
    raise ValueError(f'discard_ratio must be in [0, 1), got {discard_ratio}.')
  b, _, n, _ = np.shape(attentions[0])
  eye = np.eye(n)
  rollout = np.broadcast_to(eye, (b, n, n))
  for i, att in enumerate(attentions):
    att = np.asarray(att, np.float64)
    if att.ndim != 4 or att.shape[0] != b or att.shape[2:] != (n, n):
      raise ValueError(f'block {i}: expected attention [{b}, heads, {n}, {n}], got {att.shape}.')
    a = getattr(np, head_fusion)(att, axis=1)  # [B, N, N]
    if discard_ratio > 0:
      a = discard_lowest(a, discard_ratio, keep_first)
    a = a + eye
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a @ rollout  # [B, N, N]
  return rollout


def discard_lowest(a: np.ndarray, ratio: float, keep_first: bool) -> np.ndarray:
  """Zeroes the lowest `ratio` of the unprotected entries in each row of a [B, N, N] matrix."""
  n = a.shape[-1]
  protected = np.eye(n, dtype=bool)  # [N, N]
  if keep_first:
    protected[:, 0] = True
  num_drop = np.floor(ratio * (n - protected.sum(-1))).astype(int)  # [N], per row
  order = np.argsort(np.where(protected, np.inf, a), axis=-1, kind='stable')  # [B, N, N]
  rank = np.argsort(order, axis=-1)  # [B, N, N]: rank of each entry within its row
  return np.where(rank < num_drop[None, :, None], 0.0, a)


def rollout_maps(attentions: Sequence[np.ndarray], grid_hw: tuple[int, int], *,
                 has_cls: bool = False, token_maps: np.ndarray | None = None,
                 learner_loc: int = 0, fused: bool = False, head_fusion: str = 'mean',
                 discard_ratio: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
  """Rollout heat maps over the patch grid, for a plain ViT or a TokenLearner ViT.

  Plain model: the rollout through all blocks, averaged over output tokens (the CLS row when
  `has_cls`). TokenLearner model (`token_maps` given): each learned token's spatial map, propagated
  through the rollout of the `learner_loc` blocks before the learner; and the whole-model map,
  which also rolls out through the blocks after the learner (the learner acting as an [S, N]
  attention). With a TokenFuser (`fused`) the fused layers are not rolled out: the whole-model map
  is the rollout through the blocks before the first learner. Column 0 (CLS) is dropped and each
  map renormalised.

  Args:
    attentions: per block [B, heads, N_i, N_i], as returned by `collect_intermediates`.
    grid_hw: (h, w) patch grid.
    has_cls: token 0 is a CLS token (classifier='token'); learners never see it.
    token_maps: the first learner's maps [B, S, h, w] (V1.1 softmax, V1 sigmoid weights).
    learner_loc: number of blocks before the (first) learner.
    fused: the model uses TokenFuser (a learner and fuser in every block from `learner_loc` on).
    head_fusion: 'mean', 'max' or 'min'.
    discard_ratio: see `attention_rollout`.

  Returns:
    heat [B, h, w] and, for a TokenLearner model, per-token maps [B, S, h, w] (else None); every map
    sums to 1.
  """
  h, w = grid_hw
  c = int(has_cls)
  n = h * w + c
  kwargs = dict(head_fusion=head_fusion, discard_ratio=discard_ratio, keep_first=has_cls)
  b = np.shape(attentions[0])[0] if attentions else np.shape(token_maps)[0]

  def rollout(blocks, size):
    if not blocks:
      return np.broadcast_to(np.eye(size), (b, size, size))
    return attention_rollout(blocks, **kwargs)

  def pool(r):  # [B, M, N] -> [B, h, w]
    rows = r[:, 0] if has_cls else r.mean(axis=1)  # [B, N]
    return _normalise(rows[:, c:]).reshape(b, h, w)

  if token_maps is None:
    return pool(rollout(list(attentions), n)), None
  if not 0 <= learner_loc <= len(attentions):
    raise ValueError(f'learner_loc={learner_loc} outside [0, {len(attentions)}].')
  pre, post = list(attentions[:learner_loc]), list(attentions[learner_loc:])
  for i, att in enumerate(pre):
    if np.shape(att)[-1] != n:
      raise ValueError(f'block {i} precedes the learner so needs {n} tokens, got {np.shape(att)}.')
  s = np.shape(token_maps)[1]
  weights = _normalise(np.asarray(token_maps, np.float64).reshape(b, s, h * w))  # [B, S, hw]
  r_pre = rollout(pre, n)  # [B, N, N]
  per_token = weights @ r_pre[:, c:, :]  # [B, S, N]
  per_token = _normalise(per_token[..., c:]).reshape(b, s, h, w)
  if fused:
    return pool(r_pre), per_token
  learner = np.zeros((b, s + c, n))  # [B, S', N]: the learner as one attention step.
  if has_cls:
    learner[:, 0, 0] = 1.0  # The CLS token bypasses the learner.
  learner[:, c:, c:] = weights
  r_post = rollout(post, s + c)  # [B, S', S']
  return pool(r_post @ learner @ r_pre), per_token


def _normalise(x: np.ndarray) -> np.ndarray:
  """Scales the last axis to sum to 1."""
  return x / np.maximum(x.sum(axis=-1, keepdims=True), 1e-30)


def position_embedding_similarity(pos_embedding: np.ndarray, grid_hw: tuple[int, int],
                                  has_cls: bool = False) -> np.ndarray:
  """Cosine similarity between the position embeddings of every pair of patches.

  Args:
    pos_embedding: [N, D] or [1, N, D]; N = h*w (+1 for a leading CLS entry when `has_cls`).
    grid_hw: (h, w) patch grid.
    has_cls: drop entry 0 (the CLS token's embedding).

  Returns:
    [h, w, h, w]: [i, j] is the map of similarities of patch (i, j) with every patch.
  """
  pe = np.asarray(pos_embedding, np.float64)
  if pe.ndim == 3:
    pe = pe[0]  # [N, D]
  if has_cls:
    pe = pe[1:]
  h, w = grid_hw
  if pe.ndim != 2 or pe.shape[0] != h * w:
    raise ValueError(f'expected {h * w} patch embeddings for grid {grid_hw}, got {pe.shape}.')
  pe = pe / np.maximum(np.linalg.norm(pe, axis=-1, keepdims=True), 1e-12)
  return (pe @ pe.T).reshape(h, w, h, w)  # [hw, hw] -> [h, w, h, w]


def patch_embedding_pcs(kernel: np.ndarray, n: int = 28) -> np.ndarray:
  """Principal components of the patch-embedding filters (ViT paper, fig. 7 left).

  Each of the D filters is a point in patch space (ph*pw*C); the components are the directions of
  largest variance among them, largest first, each signed so that its largest entry is positive.

  Args:
    kernel: the `embedding` Conv kernel [ph, pw, C, D].
    n: how many components (at most min(ph*pw*C, D)).

  Returns:
    [n', ph, pw, C] unit-norm components, n' = min(n, ph*pw*C, D).
  """
  ph, pw, ch, d = np.shape(kernel)
  filters = np.asarray(kernel, np.float64).reshape(ph * pw * ch, d).T  # [D, P]
  filters = filters - filters.mean(axis=0, keepdims=True)
  _, _, vt = np.linalg.svd(filters, full_matrices=False)  # vt: [min(D, P), P]
  pcs = vt[:min(n, ph * pw * ch, d)]  # [n', P]
  peak = pcs[np.arange(len(pcs)), np.abs(pcs).argmax(axis=1)]  # [n']
  pcs = pcs * np.where(peak < 0, -1.0, 1.0)[:, None]
  return pcs.reshape(-1, ph, pw, ch)  # [n', P] -> [n', ph, pw, C]


def collect_intermediates(model, params, images) -> tuple[np.ndarray, list[np.ndarray],
                                                          list[np.ndarray]]:
  """Runs the model in eval mode and reads what it sows.

  Args:
    model: a `vit_flax` ViT (from `build_model`).
    params: its parameter tree (the contents of variables['params']).
    images: preprocessed float images [B, H, W, C].

  Returns:
    (logits [B, classes], attention weights per block [B, heads, N, N] in block order, token maps
    per learner [B, S, h, w] in learner order, empty without TokenLearner), as numpy arrays.
  """
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False,
                                           mutable=['intermediates']))
  logits, state = apply(params, images)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state.get('intermediates', {})))
  attentions, token_maps = {}, {}
  for path, value in flat.items():
    if path[-1] == 'attention_weights':
      index = _module_index(path, r'encoderblock_(\d+)')
      attentions[index] = np.asarray(value[0])
    elif path[-1] == 'token_maps':
      index = _module_index(path, r'TokenLearnerModule(?:V11)?_(\d+)')
      token_maps[index] = np.asarray(value[0])
  return (np.asarray(logits), [attentions[k] for k in sorted(attentions)],
          [token_maps[k] for k in sorted(token_maps)])


def _module_index(path: tuple[str, ...], pattern: str) -> int:
  """The number in the last module name of `path` that matches `pattern`."""
  for name in reversed(path):
    if match := re.fullmatch(pattern, name):
      return int(match.group(1))
  raise ValueError(f'no module matching {pattern!r} in sown path {"/".join(path)}.')
