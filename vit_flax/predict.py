"""Classifies image files with a trained run: the top-k classes of each, with probabilities.

  python -m vit_flax.predict --workdir=DIR [--checkpoint=best|last|STEP] [--top_k=5] [--invert]
      [--json] IMAGE...

Each IMAGE (PNG or JPEG, any size and colour mode; anything PIL reads) is turned upright by its
EXIF orientation, converted to the model's channels (grey for 1-channel models, RGB for 3;
transparent pixels become white, as a viewer shows them), resized to the model's input size with
PIL's bilinear filter and normalised as in training and evaluation (`augment.preprocess`). The
probabilities are the softmax of the logits (for DeiT, of the two heads' mean, which the model
returns at inference).

MNIST and Fashion-MNIST images are light on a black background: a photographed or scanned dark
digit on white paper needs `--invert`, or the model sees a negative.

Prints one line per image, `PATH: label p | label p | ...`, or with `--json` one JSON object
{'workdir', 'checkpoint': {'kind', 'step'}, 'dataset', 'results': [{'image', 'top_k': [{'label',
'name', 'probability'}, ...]}, ...]}.
"""

from collections.abc import Sequence
import json
import os
from typing import Any

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

from vit_flax import augment
from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import config as config_lib
from vit_flax import inference
from vit_flax import input_pipeline
from vit_flax import loops

MAX_BATCH_SIZE = 32  # Images per forward pass; fewer images make a smaller batch.
_SIXTEEN_BIT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')  # 16-bit PNGs open in these.


def check_images(paths: Sequence[str]) -> None:
  """Raises cli.FlagError (one line, naming the file) unless every path is an image PIL reads."""
  if not paths:
    raise cli.FlagError('No images given: name one or more image files after the flags.')
  for path in paths:
    if not os.path.isfile(path):
      raise cli.FlagError(f'Image {path} not found.')
    try:
      with Image.open(path) as image:
        image.load()  # Decodes the pixels: a truncated file fails here, not later.
    except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds on bad files)
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise cli.FlagError(f'Cannot read image {path}: {first}.') from None


def load_image(path: str, image_shape: Sequence[int], *, invert: bool = False) -> np.ndarray:
  """An image file as uint8 [H, W, C] for a model input of `image_shape` (H, W, C in {1, 3})."""
  h, w, c = image_shape
  with Image.open(path) as image:
    image = ImageOps.exif_transpose(image)  # Upright, as a viewer shows a rotated phone photo.
    image = _to_mode(image, 'L' if c == 1 else 'RGB')
  if image.size != (w, h):
    image = image.resize((w, h), Image.Resampling.BILINEAR)
  x = np.asarray(image, np.uint8).reshape(h, w, c)  # 'L' images are [H, W].
  return 255 - x if invert else x


def _to_mode(image: Image.Image, mode: str) -> Image.Image:
  """`image` as 8-bit 'L' or 'RGB': transparency over white, 16-bit grey scaled to 8 bits."""
  if image.mode in _SIXTEEN_BIT_MODES:  # PIL's convert would clip these to 255, not scale them.
    grey = np.asarray(image, np.float64) / 65535.0 * 255.0
    image = Image.fromarray(np.round(np.clip(grey, 0, 255)).astype(np.uint8), 'L')
  if image.mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
    rgba = image.convert('RGBA')
    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(white, rgba)
  return image.convert(mode)


def _normalisation(config) -> tuple[str | input_pipeline.Dataset, tuple[int, int, int]]:
  """(dataset for `augment.preprocess`, image shape): by name when `DATASETS` knows the dataset;
  otherwise its mean, std and shape come from its train images, so the data is loaded."""
  name = config.dataset_name.split(':')[0]
  if name in input_pipeline.DATASETS:
    return name, input_pipeline.image_shape(config.dataset_name, config.dataset_configs)
  ds = input_pipeline.load_dataset(config)
  return ds, ds.image_shape


def predict_images(workdir: str | None, paths: Sequence[str], *, checkpoint: str = 'last',
                   top_k: int = 5, invert: bool = False) -> dict[str, Any]:
  """The top-k classes of each image under `checkpoint` of the run in `workdir` (see the module
  docstring for the result). Raises cli.FlagError for bad arguments before loading."""
  checkpoint = str(checkpoint)
  config_json = inference.check_run(workdir, checkpoint)
  num_classes = inference.known_num_classes(config_json)
  _check_top_k(top_k, num_classes)
  check_images(paths)
  trained = inference.load(workdir, checkpoint)
  _check_top_k(top_k, trained.num_classes)  # For datasets DATASETS does not know.
  dataset, image_shape = _normalisation(trained.config)
  images = np.stack([load_image(p, image_shape, invert=invert) for p in paths])  # [N, H, W, C]
  probabilities = _probabilities(trained, dataset, images)  # [N, K]
  results = []
  for path, p in zip(paths, probabilities):
    best = np.argsort(-p, kind='stable')[:top_k]
    results.append({'image': path, 'top_k': [
        {'label': int(k), 'name': trained.class_names[k], 'probability': float(p[k])}
        for k in best]})
  kind = checkpoint if checkpoint in inference.CHECKPOINT_NAMES else 'step'
  return {'workdir': os.path.abspath(workdir), 'checkpoint': {'kind': kind, 'step': trained.step},
          'dataset': trained.config.dataset_name, 'results': results}


def _check_top_k(top_k: int, num_classes: int | None) -> None:
  if top_k < 1 or (num_classes is not None and top_k > num_classes):
    limit = f'[1, {num_classes}] (the classes of this run)' if num_classes else '>= 1'
    raise cli.FlagError(f'--top_k must be in {limit}, got {top_k}.')


def _probabilities(trained: inference.TrainedModel, dataset: str | input_pipeline.Dataset,
                   images: np.ndarray) -> np.ndarray:
  """Softmax of the model's logits, float32 [N, K], for uint8 images [N, H, W, C].

  The images go through in batches of one size (the last padded), so one program compiles.
  """
  model = trained.model

  @jax.jit
  def forward(variables, x):
    x = augment.preprocess(x, None, train=False, dataset=dataset)
    return jax.nn.softmax(model.apply(variables, x, train=False).astype(jnp.float32), axis=-1)

  n = len(images)
  batch_size = min(n, MAX_BATCH_SIZE)
  padded = np.concatenate([images, np.zeros((-n % batch_size, *images.shape[1:]), np.uint8)])
  out = [forward(trained.variables, padded[i:i + batch_size])
         for i in range(0, len(padded), batch_size)]
  return np.concatenate(jax.device_get(out))[:n]


def format_results(result: dict[str, Any]) -> str:
  """One line per image: 'PATH: name 0.912 | name 0.031 | ...'."""
  return '\n'.join(
      f'{r["image"]}: ' + ' | '.join(f'{t["name"]} {t["probability"]:.3f}' for t in r['top_k'])
      for r in result['results'])


# ------------------------------------------------------------------------------------------------
# Command line.

# What stops the command with one line: bad flags or images, and a run that cannot be loaded
# (config.json edited to another model or to bad values, missing data for an unknown dataset).
USER_ERRORS = (cli.FlagError, config_lib.ConfigError, checkpoints.CheckpointMismatchError,
               checkpoints.CheckpointError, input_pipeline.DataError, OSError)


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  with cli.errors_in_one_line(*USER_ERRORS):
    loops.use_one_device_per_cpu_core()  # As the other commands do.
    result = predict_images(f.workdir, argv[1:], checkpoint=f.checkpoint, top_k=f.top_k,
                            invert=f.invert)
  print(json.dumps(result, indent=2) if f.json else format_results(result))


def _define_flags() -> None:
  """The command-line flags; defined only when run as a script, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/, best/); '
                      'required.')
  flags.DEFINE_string('checkpoint', 'last', 'best | last | a step number in WORKDIR/checkpoints.')
  flags.DEFINE_integer('top_k', 5, 'Classes to print per image, most probable first: 1 to the '
                       'number of classes.')
  flags.DEFINE_bool('invert', False, 'Invert the images (255 - x) after the grey / RGB '
                    'conversion: MNIST-style datasets are light on black.')
  flags.DEFINE_bool('json', False, 'Print the results as one JSON object.')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
