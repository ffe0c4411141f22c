"""Tests for vit_flax.compare: the tiny config with and without TokenLearner, a list of configs,
the labels of every family, and the table and plot helpers (comparison_report)."""

import json

import ml_collections
import pytest

from helpers import tiny_config
from vit_flax import compare
from vit_flax import comparison_report
from vit_flax import config as config_lib
from vit_flax import models

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _tiny_config():
  """configs/tiny.py cut to 4 steps (evaluations at steps 2 and 4)."""
  config = tiny_config()
  config.num_training_steps = 4
  config.log_summary_steps = config.log_eval_steps = 2
  config.checkpoint_steps = 4
  config.lr_configs.warmup_steps = 1
  return config


def test_compare_tiny_writes_table_json_and_plot(tmp_path):
  result = compare.run_comparison(_tiny_config(), tmp_path, target_accuracy=0.0, name='tiny')

  rows = json.loads((tmp_path / 'comparison.json').read_text())['rows']
  assert [r['name'] for r in rows] == ['vit', 'tl']
  assert [r['tokenizer'] for r in rows] == ['patch', 'dynamic']
  assert [r['label'] for r in rows] == ['ViT', 'ViT + TokenLearner (S=4, loc=1)']
  for r in rows:
    assert r['steps'] == 4 and 0.0 <= r['test_accuracy'] <= 1.0
    assert r['num_params'] > 0 and r['gflops_per_image'] > 0 and r['wall_time_s'] > 0
    assert r['train_images_per_s'] > 0 and r['eval_images_per_s'] > 0
    assert r['time_to_target_s'] is not None and r['step_to_target'] == 2  # Target 0: first eval.
    assert [p['step'] for p in r['curve']] == [2, 4, 4]  # valid, valid, test
  # Same data, seed and steps, so the only difference is the model.
  assert rows[1]['gflops_per_image'] < rows[0]['gflops_per_image']

  table = (tmp_path / 'comparison.md').read_text()
  assert '| ViT |' in table and '| ViT + TokenLearner (S=4, loc=1) |' in table
  assert 'test accuracy' in table and 'time to 0.00% (s)' in table
  png = (tmp_path / 'accuracy_vs_time.png').read_bytes()
  assert png.startswith(PNG_MAGIC) and len(png) > 5000
  assert not (tmp_path / 'accuracy_vs_gflops.png').exists()  # Only for sweeps.
  assert set(result['files']) == {'markdown', 'json', 'accuracy_vs_time'}

  # Finished runs are reused, not retrained: the metrics logs are left as they were.
  before = {n: (tmp_path / n / 'metrics.jsonl').read_text() for n in ('vit', 'tl')}
  again = compare.run_comparison(_tiny_config(), tmp_path, target_accuracy=0.0, name='tiny')
  assert {n: (tmp_path / n / 'metrics.jsonl').read_text() for n in ('vit', 'tl')} == before
  assert [r['test_accuracy'] for r in again['rows']] == [r['test_accuracy'] for r in rows]


def test_sweep_variants_are_named_by_size_and_location():
  config = _tiny_config()
  names = [(n, c.model.tokenizer.type, c.model.tokenizer.num_tokens,
            c.model.tokenizer.tokenlearner_loc)
           for n, c in compare.variants(config, num_tokens=[2, 4], tokenlearner_locs=[0, 1])]
  assert names == [('vit', 'patch', 4, 1), ('tl_S2_L0', 'dynamic', 2, 0),
                   ('tl_S2_L1', 'dynamic', 2, 1), ('tl_S4_L0', 'dynamic', 4, 0),
                   ('tl_S4_L1', 'dynamic', 4, 1)]
  only_loc = [n for n, _ in compare.variants(config, tokenlearner_locs=[0])]
  assert only_loc == ['vit', 'tl_S4_L0']


def test_time_to_target_uses_the_first_evaluation_at_or_above_it():
  records = [
      {'step': 10, 'wall_time_s': 1.0, 'train_loss': 2.0},
      {'step': 10, 'wall_time_s': 1.5, 'valid_loss': 1.0, 'valid_accuracy': 0.5},
      {'step': 20, 'wall_time_s': 3.0, 'valid_loss': 0.5, 'valid_accuracy': 0.9},
      {'step': 30, 'wall_time_s': 4.5, 'valid_loss': 0.4, 'valid_accuracy': 0.95},
      {'step': 30, 'wall_time_s': 5.0, 'test_loss': 0.4, 'test_accuracy': 0.97},
  ]
  curve = compare.accuracy_curve(records)
  assert [p['split'] for p in curve] == ['valid', 'valid', 'valid', 'test']
  assert compare.time_to_target(curve, 0.9) == (3.0, 20)
  assert compare.time_to_target(curve, 0.96) == (5.0, 30)  # Only the final test eval reached it.
  assert compare.time_to_target(curve, 0.99) is None


def test_sweep_plot_and_benchmark_only_table(tmp_path):
  rows = [dict(name='vit', family='vit', label='ViT', tokenizer='patch', num_tokens=None,
               tokenlearner_loc=None,
               num_params=1000, gflops_per_image=0.5, train_images_per_s=100.0,
               eval_images_per_s=400.0, test_accuracy=0.9, peak_fraction=0.2),
          dict(name='tl_S8_L1', family='vit', label='ViT + TokenLearner (S=8, loc=1)',
               tokenizer='dynamic', num_tokens=8, tokenlearner_loc=1,
               num_params=1100, gflops_per_image=0.2, train_images_per_s=250.0,
               eval_images_per_s=900.0, test_accuracy=0.88, peak_fraction=0.15)]
  comparison_report.plot_accuracy_vs_gflops(rows, tmp_path / 'p.png')
  assert (tmp_path / 'p.png').read_bytes().startswith(PNG_MAGIC)
  result = dict(kind='sweep', config_name='x', benchmark_only=True, target_accuracy=None,
                rows=rows,
                matmul_peak_gflops=150.0, machine=dict(backend='cpu', devices=1, cpu_count=2,
                                                       processor='x86_64', jax='0'))
  table = comparison_report.markdown_table(result)
  assert '| ViT + TokenLearner (S=8, loc=1) | 1,100 | 0.2 | 250 | 900 | 2.50× | 15.0% |' in table
  assert 'test accuracy' not in table


def test_a_bad_sweep_point_fails_before_anything_trains(tmp_path):
  with pytest.raises(config_lib.ConfigError, match='tokenlearner_loc must be in'):
    compare.run_comparison(_tiny_config(), tmp_path, tokenlearner_locs=[1, 5])
  assert not (tmp_path / 'vit').exists()


# ---- --configs: any list of configs, as shipped -------------------------------------------------

_TINY_VARIANT = """
from vit_flax import config_files


def get_config():
  config = config_files.load_config_file('tiny.py')  # The shipped configs/tiny.py.
  config.num_training_steps = 4
  config.log_summary_steps = config.log_eval_steps = 2
  config.checkpoint_steps = 4
  config.lr_configs.warmup_steps = 1
  config.model.tokenizer.type = {tokenizer!r}
  return config
"""


def test_configs_trains_each_config_as_shipped_in_its_own_run(tmp_path):
  """Two config files (tiny with its TokenLearner, and as a plain ViT), each in WORKDIR/<name>."""
  for name, tokenizer in (('tiny_tl', 'dynamic'), ('tiny_patch', 'patch')):
    (tmp_path / f'{name}.py').write_text(_TINY_VARIANT.format(tokenizer=tokenizer))
  named = compare.load_configs([str(tmp_path / 'tiny_tl.py'), str(tmp_path / 'tiny_patch.py')])
  assert [n for n, _ in named] == ['tiny_tl', 'tiny_patch']
  out = tmp_path / 'out'
  result = compare.run_configs(named, out, target_accuracy=0.0)

  rows = json.loads((out / 'comparison.json').read_text())['rows']
  assert [(r['name'], r['family'], r['label']) for r in rows] == [
      ('tiny_tl', 'vit', 'ViT + TokenLearner (S=4, loc=1)'), ('tiny_patch', 'vit', 'ViT')]
  for r in rows:
    assert r['steps'] == 4 and r['workdir'] == str(out / r['name'])
    assert r['num_params'] > 0 and r['gflops_per_image'] > 0 and r['train_images_per_s'] > 0
    assert r['time_to_target_s'] is not None and r['time_to_accuracy']
  table = (out / 'comparison.md').read_text()
  assert table.startswith('# Model comparison: tiny_tl, tiny_patch')
  assert '| config | model | parameters |' in table
  first, second = [line for line in table.splitlines() if line.startswith('| tiny_')]
  assert first.startswith('| tiny_tl | ViT + TokenLearner (S=4, loc=1) |')
  assert second.startswith('| tiny_patch | ViT |')
  assert 'vs ViT + TokenLearner (S=4, loc=1) (points)' in table  # The first config is the base.
  assert '| 1.00× | ' in first and '| +0.00 |' in first
  assert (out / 'accuracy_vs_time.png').read_bytes().startswith(PNG_MAGIC)
  assert set(result['files']) == {'markdown', 'json', 'accuracy_vs_time'}

  before = {n: (out / n / 'metrics.jsonl').read_text() for n, _ in named}
  again = compare.run_configs(named, out, target_accuracy=0.0)  # Finished: reused, not retrained.
  assert {n: (out / n / 'metrics.jsonl').read_text() for n, _ in named} == before
  assert [r['test_accuracy'] for r in again['rows']] == [r['test_accuracy'] for r in rows]


def test_configs_checks_every_config_before_the_first_trains(tmp_path):
  good, bad = tiny_config(), tiny_config()
  bad.model.num_heads = 3
  with pytest.raises(config_lib.ConfigError, match='not divisible by num_heads'):
    compare.run_configs([('good', good), ('bad', bad)], tmp_path)
  assert not (tmp_path / 'good').exists()


def _with_model(model: ml_collections.ConfigDict, **top) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(model=model.to_dict(), **top))


@pytest.mark.parametrize('reference, label', [
    ('vit_tiny_patch16_224', 'ViT'),
    ('deit_tiny_distilled_patch16_224', 'DeiT'),
    ('cait_xxs24_224', 'CaiT'),
    ('mixer_b16_224', 'Mixer'),
    ('xcit_tiny_12_p16_224', 'XCiT'),
    ('swin_tiny_patch4_window7_224', 'Swin'),
])
def test_every_family_is_labelled(reference, label):
  fields = comparison_report.model_fields(_with_model(models.reference_config(reference)))
  assert (fields['label'], fields['tokenizer'], fields['tokenlearner_loc']) == (label, 'patch',
                                                                                None)
  assert comparison_report.FAMILY_NAMES[fields['family']] == label



def test_video_models_are_labelled_with_and_without_their_learner():
  from vit_flax.configs import moving_fashion_mnist_tl, moving_fashion_mnist_vit  # pylint: disable=g-import-not-at-top
  with_learner = comparison_report.model_fields(moving_fashion_mnist_tl.get_config())
  assert (with_learner['label'], with_learner['tokenizer']) == (
      'ViViT + TokenLearner (S=8, loc=1)', 'dynamic')
  plain = comparison_report.model_fields(moving_fashion_mnist_vit.get_config())
  assert (plain['label'], plain['tokenizer'], plain['num_tokens']) == ('ViViT', 'patch', None)

def test_labels_name_the_tokenlearner_and_distillation():
  deit = models.reference_config('deit_tiny_distilled_patch16_224')
  deit.tokenlearner_loc, deit.num_tokens = 4, 16
  fields = comparison_report.model_fields(_with_model(deit, distillation={'teacher_workdir': 'x'}))
  assert fields['label'] == 'DeiT (distilled) + TokenLearner (S=16, loc=4)'
  assert (fields['tokenizer'], fields['num_tokens'], fields['tokenlearner_loc']) == ('dynamic',
                                                                                    16, 4)
  config = tiny_config()
  config.model.tokenizer.use_v11, config.model.tokenizer.use_tokenfuse = False, True
  assert comparison_report.model_fields(config)['label'] == (
      'ViT + TokenLearner V1 + TokenFuser (S=4, loc=1)')
  rows = [dict(name='a', label='ViT'), dict(name='b', label='ViT')]
  assert comparison_report.legend_labels(rows) == ['ViT [a]', 'ViT [b]']
