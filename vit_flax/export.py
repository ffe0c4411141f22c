"""Writes a trained run's ViT as a vit_jax `.npz`: `python -m vit_flax.export`.

  python -m vit_flax.export --workdir=runs/fashion_mnist_vit --output=fashion_vit.npz \\
      [--checkpoint=best|last|STEP]

The file has the layout of google-research/vision_transformer's own checkpoints (pre-Linen block
names, `head`; see `pretrained.export_vit_jax`), so vit_jax, timm's npz loader, big_vision and
`init_from` with `checkpoint_format='vit_jax'` read it. A model vit_jax cannot hold (a TokenLearner,
sin-cos position embeddings, another family) is a one-line error before anything is written.
"""

import os
from typing import Any, Sequence

from absl import flags

from vit_flax import checkpoints
from vit_flax import cli
from vit_flax import config as config_lib
from vit_flax import inference
from vit_flax import pretrained


def check_output(output: str | None) -> str:
  """Checks the `.npz` path to write; returns it."""
  if not output:
    raise cli.FlagError('--output is required: the .npz file to write.')
  if not output.endswith('.npz'):
    raise cli.FlagError(f'--output must name a .npz file, got {output!r}.')
  parent = os.path.dirname(os.path.abspath(output))
  if not os.path.isdir(parent):
    raise cli.FlagError(f'--output: directory {parent} does not exist.')
  return output


def export_run(workdir: str | None, output: str | None, *,
               checkpoint: str = 'last') -> dict[str, Any]:
  """Exports `checkpoint` of the run in `workdir` to `output`; returns what was written.

  Every flag is checked from the directory listing before the parameters load.
  """
  inference.check_run(workdir, checkpoint)
  output = check_output(output)
  trained = inference.load(workdir, checkpoint)
  pretrained.export_vit_jax(trained.variables['params'], trained.config.model, output)
  return dict(output=output, workdir=workdir, checkpoint=trained.checkpoint, step=trained.step,
              num_classes=trained.num_classes)


# What stops the command with one line: bad flags, a run that cannot be read, a model vit_jax's
# layout cannot hold, an unwritable output.
USER_ERRORS = (cli.FlagError, config_lib.ConfigError, checkpoints.CheckpointMismatchError,
               checkpoints.CheckpointError, pretrained.PretrainedError, OSError)


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  with cli.errors_in_one_line(*USER_ERRORS):
    if len(argv) > 1:
      raise cli.FlagError(f'Unexpected arguments: {" ".join(argv[1:])}')
    result = export_run(f.workdir, f.output, checkpoint=f.checkpoint)
  print(f'Wrote {result["output"]}: {result["workdir"]} checkpoint {result["checkpoint"]} '
        f'(step {result["step"]}, {result["num_classes"]} classes) in vit_jax\'s layout.')


def _define_flags() -> None:
  """The command-line flags; defined only when run as a script, so importing defines none."""
  flags.DEFINE_string('workdir', None, 'Run directory (config.json, checkpoints/, best/); '
                      'required.')
  flags.DEFINE_string('checkpoint', 'last', 'best | last | a step number in WORKDIR/checkpoints.')
  flags.DEFINE_string('output', None, 'The .npz file to write; required.')


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
