"""Figures of a trained ViT: TokenLearner maps, attention rollout, position embeddings, filters.

The arrays come from `analysis`; the `plot_*` functions here return
`matplotlib.figure.Figure`s made without pyplot: `savefig` renders them with Agg, headless, and a
notebook shows them inline; importing this module leaves pyplot's backend alone.

  python -m vit_flax.visualize --workdir=DIR [--checkpoint=last] [--num_images=8] [--split=test]

loads the run's config.json and a checkpoint (best, last or a step), and writes PNGs to DIR/plots/.
"""

from collections.abc import Sequence
import os
import textwrap

from absl import flags
from absl import logging
import jax
import matplotlib
from matplotlib import figure as mpl_figure
import ml_collections
import numpy as np

from vit_flax import analysis
from vit_flax import augment
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import inference
from vit_flax import config as config_lib
from vit_flax import input_pipeline
from vit_flax import layers
from vit_flax import models
from vit_flax import rundir
from vit_flax import vit

SPLITS = ('train', 'valid', 'test')


def _show_image(ax, image: np.ndarray) -> None:
  """Draws an [H, W, C] image (uint8, or float scaled per image) without ticks."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    lo, hi = image.min(), image.max()
    image = (image - lo) / max(hi - lo, 1e-12)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=255 if image.dtype == np.uint8 else 1)
  else:
    ax.imshow(image)
  ax.set_xticks([])
  ax.set_yticks([])


def _overlay(ax, image: np.ndarray, heat: np.ndarray) -> None:
  """Draws `image` under the [h, w] map `heat`, upsampled (bilinear) and scaled to [0, 1]."""
  _show_image(ax, image)
  up = np.asarray(jax.image.resize(np.asarray(heat, np.float32), image.shape[:2], 'bilinear'))
  up = (up - up.min()) / max(float(up.max() - up.min()), 1e-12)  # Each map to its own range.
  ax.imshow(up, cmap='jet', alpha=0.5, vmin=0, vmax=1)


def _label_text(i: int, labels, predictions, class_names) -> tuple[str, str]:
  """('pred x / true y', colour) for image i; colour is green when right, red when wrong."""
  name = (lambda k: class_names[k]) if class_names is not None else str
  parts, colour = [], 'black'
  if predictions is not None:
    parts.append(f'pred {name(int(predictions[i]))}')
  if labels is not None:
    parts.append(f'true {name(int(labels[i]))}')
  if predictions is not None and labels is not None:
    colour = 'green' if int(predictions[i]) == int(labels[i]) else 'red'
  return ' / '.join(parts), colour


def _grid(rows: int, cols: int, cell: float = 1.6) -> tuple[mpl_figure.Figure, np.ndarray]:
  fig = mpl_figure.Figure(figsize=(max(cell * cols, 5.0), cell * rows + 0.8), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False)
  return fig, axes


def _suptitle(fig: mpl_figure.Figure, text: str, fontsize: float = 9) -> None:
  """A figure title, each line wrapped to the figure's width."""
  chars = int(fig.get_figwidth() * 72 / (0.6 * fontsize))  # ~0.6 em per character.
  fig.suptitle('\n'.join(textwrap.fill(line, chars) for line in text.split('\n')),
               fontsize=fontsize)


def plot_token_maps(images: np.ndarray, token_maps: np.ndarray, labels=None, predictions=None,
                    class_names=None, title: str | None = None) -> mpl_figure.Figure:
  """Images x tokens grid: each learned token's spatial map upsampled and overlaid on the image.

  Args:
    images: [B, H, W, C] images to draw (uint8, or float scaled per image).
    token_maps: [B, S, h, w] learner weights.
    labels, predictions: optional [B] ints, shown in the first column.
    class_names: optional names indexed by class.
    title: figure title (a default says what is shown).
  """
  b, s = np.shape(token_maps)[:2]
  fig, axes = _grid(b, s + 1)
  for i in range(b):
    _show_image(axes[i, 0], images[i])
    text, colour = _label_text(i, labels, predictions, class_names)
    axes[i, 0].set_title(text, fontsize=7, color=colour)
    for k in range(s):
      _overlay(axes[i, k + 1], images[i], token_maps[i, k])
      if i == 0:
        axes[i, k + 1].set_title(f'token {k}', fontsize=8)
  _suptitle(fig, title or 'TokenLearner spatial maps: where each learned token pools from (each '
            'map scaled to its own range)')
  return fig


def plot_frame_token_maps(clip: np.ndarray, token_maps: np.ndarray, frames_per_map: int = 1,
                          title: str | None = None) -> mpl_figure.Figure:
  """Frames x tokens grid of one clip: each frame's learned tokens' maps over that frame.

  Args:
    clip: [T, H, W, C] frames to draw.
    token_maps: [t, S, h, w] learner weights, one set per tubelet slice of `frames_per_map`
      frames (drawn over the slice's first frame).
    frames_per_map: frames per tubelet slice (1 for sampled frames).
    title: figure title.
  """
  frames = np.asarray(clip)[::frames_per_map][:len(token_maps)]
  fig = plot_token_maps(frames, token_maps, title=title or 'TokenLearner maps, frame by frame')
  for i, ax in enumerate(fig.axes[::token_maps.shape[1] + 1]):
    first = i * frames_per_map
    ax.set_title(f'frame {first}' if frames_per_map == 1 else
                 f'frames {first}-{first + frames_per_map - 1}', fontsize=7)
  return fig


def plot_attention_rollout(images: np.ndarray, heat: np.ndarray, token_heat=None, labels=None,
                           predictions=None, class_names=None,
                           title: str | None = None) -> mpl_figure.Figure:
  """Rollout heat maps over each image; with `token_heat`, one more column per learned token.

  Args:
    images: [B, H, W, C].
    heat: [B, h, w] whole-model rollout maps (from `rollout_maps`).
    token_heat: optional [B, S, h, w] per-learned-token rollout maps.
    labels, predictions, class_names: as in `plot_token_maps`.
    title: figure title; say what is shown (see `write_plots`).
  """
  b = np.shape(heat)[0]
  s = 0 if token_heat is None else np.shape(token_heat)[1]
  fig, axes = _grid(b, s + 2)
  for i in range(b):
    _show_image(axes[i, 0], images[i])
    text, colour = _label_text(i, labels, predictions, class_names)
    axes[i, 0].set_title(text, fontsize=7, color=colour)
    _overlay(axes[i, 1], images[i], heat[i])
    for k in range(s):
      _overlay(axes[i, k + 2], images[i], token_heat[i, k])
  axes[0, 1].set_title('rollout', fontsize=8)
  for k in range(s):
    axes[0, k + 2].set_title(f'token {k}', fontsize=8)
  _suptitle(fig, title or 'Attention rollout (each map scaled to its own range)')
  return fig


def plot_position_embedding_similarity(similarity: np.ndarray,
                                       title: str | None = None) -> mpl_figure.Figure:
  """The h x w grid of h x w cosine-similarity maps (ViT paper, fig. 7 centre)."""
  h, w = np.shape(similarity)[:2]
  padded = np.pad(np.asarray(similarity, np.float64), ((0, 0), (0, 0), (0, 1), (0, 1)),
                  constant_values=np.nan)  # [h, w, h+1, w+1]
  mosaic = padded.transpose(0, 2, 1, 3).reshape(h * (h + 1), w * (w + 1))[:-1, :-1]
  fig = mpl_figure.Figure(figsize=(6.4, 5.6), layout='constrained')
  ax = fig.subplots()
  cmap = matplotlib.colormaps['viridis'].with_extremes(bad='white')
  im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation='nearest')
  ax.set_xticks(np.arange(w) * (w + 1) + (w - 1) / 2, [str(j + 1) for j in range(w)], fontsize=6)
  ax.set_yticks(np.arange(h) * (h + 1) + (h - 1) / 2, [str(i + 1) for i in range(h)], fontsize=6)
  ax.set_xlabel('input patch column')
  ax.set_ylabel('input patch row')
  fig.colorbar(im, ax=ax, label='cosine similarity')
  ax.set_title(title or 'Position embedding similarity', fontsize=9)
  return fig


def plot_patch_embedding_pcs(components: np.ndarray,
                             title: str | None = None) -> mpl_figure.Figure:
  """Principal components of the embedding filters drawn as patches (each scaled to [0, 1])."""
  n = len(components)
  cols = min(7, n)
  rows = -(-n // cols)
  fig, axes = _grid(rows, cols, cell=0.9)
  for k, ax in enumerate(axes.flat):
    ax.set_axis_off()
    if k >= n:
      continue
    pc = np.asarray(components[k], np.float64)
    pc = (pc - pc.min()) / max(pc.max() - pc.min(), 1e-12)
    if pc.shape[-1] == 3:
      ax.imshow(pc, interpolation='nearest')
    else:  # Grey (C = 1), or the channel mean for other channel counts.
      ax.imshow(pc.mean(axis=-1), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
  _suptitle(fig, title or f'Patch embedding filters: first {n} principal components')
  return fig


def plot_training_curves(records: Sequence[dict], title: str | None = None) -> mpl_figure.Figure:
  """Loss and accuracy against step (train, valid, final test) and the learning rate."""
  fig = mpl_figure.Figure(figsize=(12, 3.6), layout='constrained')
  ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)

  def series(key):  # -> (steps, values), sorted by step; a repeated step keeps its last value.
    points = dict((r['step'], r[key]) for r in records if r.get(key) is not None)
    steps = np.array(sorted(points))
    return steps, np.array([points[k] for k in steps])

  for ax, metric in ((ax_loss, 'loss'), (ax_acc, 'accuracy')):
    for split, style in (('train', '-'), ('valid', 'o-')):
      steps, values = series(f'{split}_{metric}')
      if len(steps):
        ax.plot(steps, values, style, markersize=3, label=split)
    steps, values = series(f'test_{metric}')
    if len(steps):
      ax.plot(steps, values, 'r*', markersize=9, label='test')
    ax.set_xlabel('step')
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  steps, values = series('learning_rate')
  if len(steps):
    ax_lr.plot(steps, values)
  else:
    ax_lr.text(0.5, 0.5, 'no learning rate logged', ha='center', transform=ax_lr.transAxes)
  ax_lr.set_xlabel('step')
  ax_lr.set_ylabel('learning rate')
  ax_lr.grid(alpha=0.3)
  _suptitle(fig, title or 'Training curves', fontsize=10)
  return fig


# ------------------------------------------------------------------------------------------------
# Command line.


def write_plots(workdir: str, *, checkpoint: str = 'last', num_images: int = 8,
                split: str = 'test', head_fusion: str = 'mean', discard_ratio: float = 0.0
                ) -> list[str]:
  """Loads a run's config and a checkpoint (best | last | a step) and writes its figures to
  WORKDIR/plots/.

  Returns:
    The paths of the PNGs written.
  """
  config, params, step, _ = checkpoints.load_run(workdir, checkpoint)
  plots_dir = os.path.join(workdir, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  written = []

  def save(fig, name):
    path = os.path.join(plots_dir, name)
    fig.savefig(path, dpi=100)
    written.append(path)
    logging.info('Wrote %s', path)

  images, labels, dataset = _load_images(config, split, num_images)
  model = models.build_model(config.model, dataset.num_classes)
  records = rundir.read_metrics(workdir)
  run = f'{os.path.basename(os.path.normpath(workdir))}, step {step}'
  if records:
    save(plot_training_curves(records, title=f'Training curves ({run})'), 'training_curves.png')
  if not isinstance(model, vit.ViT):
    logging.info('%s is a %r model: only the training curves are drawn.', workdir,
                 config.model.name)
    return written
  logits, attentions, token_maps = analysis.collect_intermediates(model, params, images['inputs'])
  if model.temporal_encoding is not None:
    info = input_pipeline.DATASETS.get(dataset.name)
    _write_clip_plots(save, model, images['raw'], logits, labels, token_maps,
                      info.class_names if info else None, run)
    return written
  predictions = logits.argmax(axis=-1)
  raw = images['raw']
  grid_hw = (raw.shape[1] // model.patch_size[0], raw.shape[2] // model.patch_size[1])
  has_cls = model.classifier == 'token'

  if token_maps:
    save(plot_token_maps(raw, token_maps[0], labels, predictions,
                         title=f'TokenLearner spatial maps ({run}): where each of the '
                         f'{token_maps[0].shape[1]} learned tokens pools from, overlaid on the '
                         'image (each map scaled to its own range)'), 'token_maps.png')
  loc = model.tokenlearner_loc or 0
  heat, token_heat = analysis.rollout_maps(
      attentions, grid_hw, has_cls=has_cls, token_maps=token_maps[0] if token_maps else None,
      learner_loc=loc, fused=model.use_tokenfuse, head_fusion=head_fusion,
      discard_ratio=discard_ratio)
  pooled = 'CLS row' if has_cls else 'mean over output tokens'
  how = (f'heads fused by {head_fusion}, discard ratio {discard_ratio:g}, each map scaled to its '
         'own range')
  blocks = lambda k: f'{k} block' + ('' if k == 1 else 's')
  if not token_maps:
    what = f'rollout through all {blocks(len(attentions))} ({pooled})'
  elif model.use_tokenfuse:
    what = (f'col 2: rollout through the {blocks(loc)} before the first TokenLearner ({pooled}; '
            "fused layers not rolled out); token k: learner 0's map propagated through it")
  else:
    what = (f'col 2: whole model (rollout of the {blocks(loc)} before the TokenLearner, its maps, '
            f'then the {blocks(len(attentions) - loc)} on the learned tokens; {pooled})\n'
            'token k: its map propagated through the rollout of the blocks before the learner')
  save(plot_attention_rollout(raw, heat, token_heat, labels, predictions,
                              title=f'Attention rollout ({run}; {how})\n{what}'),
       'attention_rollout.png')

  kind = model.positional_embedding
  if kind == 'learned_1d':
    pos = params['Transformer']['posembed_input']['pos_embedding']
    pe_cls = has_cls and pos.shape[-2] == grid_hw[0] * grid_hw[1] + 1
    save(plot_position_embedding_similarity(
        analysis.position_embedding_similarity(pos, grid_hw, has_cls=pe_cls),
        title=f'Learned position embedding similarity ({run})'),
         'position_embedding_similarity.png')
  elif kind == 'sinusoidal_2d':
    pos = layers.posemb_sincos_2d(*grid_hw, model.hidden_size)
    save(plot_position_embedding_similarity(
        analysis.position_embedding_similarity(pos, grid_hw),
        title='Fixed 2-D sin-cos position embedding similarity (not learned)'),
         'position_embedding_similarity.png')
  else:
    logging.info('positional_embedding=%r: no position embedding to plot.', kind)

  pcs = analysis.patch_embedding_pcs(params['embedding']['kernel'])
  save(plot_patch_embedding_pcs(
      pcs, title=f'Patch embedding filters ({run}): first {len(pcs)} principal components'),
       'patch_embedding_filters.png')

  if not records:
    logging.info('No metrics.jsonl in %s: no training curves.', workdir)
  return written


def _write_clip_plots(save, model: vit.ViT, clips: np.ndarray, logits: np.ndarray,
                      labels: np.ndarray, token_maps: list[np.ndarray], class_names,
                      run: str) -> None:
  """A video run's figures: each of the first (up to 4) clips' token maps, frame by frame."""
  if not token_maps:
    logging.info('No TokenLearner in this video model: no token maps to draw.')
    return
  frames = model.tubelet_frames if model.temporal_encoding == '3d_conv' else 1
  maps = token_maps[0].reshape(len(clips), -1, *token_maps[0].shape[1:])  # [B, t, S, h, w]
  names = (lambda k: class_names[k]) if class_names is not None else str
  for i in range(min(len(clips), 4)):
    title = (f'TokenLearner maps per frame ({run}), clip {i}: predicted '
             f'{names(int(logits[i].argmax()))}, true {names(int(labels[i]))}')
    save(plot_frame_token_maps(clips[i], maps[i], frames, title), f'token_maps_clip{i}.png')


def _load_images(config, split: str, num_images: int):
  """The first `num_images` of `split`, from offline sources only: for display, and preprocessed."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset_configs.allow_download = False
  dataset = input_pipeline.load_dataset(config)
  if dataset.in_memory:
    raw = np.asarray(getattr(dataset, f'{split}_images')[:num_images])
    labels = np.asarray(getattr(dataset, f'{split}_labels')[:num_images])
    inputs = augment.preprocess(raw, None, train=False, dataset=dataset)
  else:  # Streamed (already normalised): un-normalise for display.
    batch = next(dataset.eval_iter(split, num_images))
    keep = batch['mask'] > 0
    inputs, labels = batch['inputs'][keep], batch['label'][keep]
    raw = np.clip(inputs * np.asarray(dataset.std) + np.asarray(dataset.mean), 0, 1)
  if not len(raw):
    raise input_pipeline.DataError(f'{dataset.name} has no {split!r} images.')
  return {'raw': raw, 'inputs': np.asarray(inputs)}, labels, dataset


def check_flags(workdir: str | None, *, checkpoint: str = 'last', num_images: int = 8,
                split: str = 'test', head_fusion: str = 'mean', discard_ratio: float = 0.0) -> None:
  """Raises cli.FlagError (one line) unless the flags name a trained run and valid figure options.

  Reads only the file system: nothing is loaded or compiled.
  """
  inference.check_run(workdir, checkpoint)
  if num_images < 1:
    raise cli.FlagError(f'--num_images must be >= 1, got {num_images}.')
  if split not in SPLITS:
    raise cli.FlagError(f'--split must be one of {", ".join(SPLITS)}, got {split!r}.')
  if head_fusion not in analysis.HEAD_FUSIONS:
    raise cli.FlagError(f'--head_fusion must be one of {", ".join(analysis.HEAD_FUSIONS)}, got '
                        f'{head_fusion!r}.')
  if not 0.0 <= discard_ratio < 1.0:
    raise cli.FlagError(f'--discard_ratio must be in [0, 1), got {discard_ratio:g}.')


# What stops the command with one line: bad flags, and a run that cannot be drawn (config.json
# edited to another model or to bad values, a missing checkpoint, missing data).
USER_ERRORS = (cli.FlagError, config_lib.ConfigError, checkpoints.CheckpointMismatchError,
               checkpoints.CheckpointError, input_pipeline.DataError, FileNotFoundError)


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  with cli.errors_in_one_line(*USER_ERRORS):
    if len(argv) > 1:
      raise cli.FlagError(f'Unexpected arguments: {" ".join(argv[1:])}')
    options = dict(checkpoint=f.checkpoint, num_images=f.num_images, split=f.split,
                   head_fusion=f.head_fusion, discard_ratio=f.discard_ratio)
    check_flags(f.workdir, **options)
    paths = write_plots(f.workdir, **options)
  for path in paths:
    print(path)


def _define_flags() -> None:
  """The command-line flags; defined only when run as a script, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/); required.')
  flags.DEFINE_string('checkpoint', 'last', 'best | last | a step number.')
  flags.DEFINE_integer('num_images', 8, 'How many images to draw (>= 1).')
  flags.DEFINE_string('split', 'test', f'Which images to draw: {" | ".join(SPLITS)}.')
  flags.DEFINE_string('head_fusion', 'mean',
                      f'Rollout: how heads are fused: {" | ".join(analysis.HEAD_FUSIONS)}.')
  flags.DEFINE_float('discard_ratio', 0.0,
                     'Rollout: fraction in [0, 1) of the weakest weights dropped.')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
