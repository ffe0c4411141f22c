"""PyTorch eager ViT / ViT + TokenLearner V1.1, the same-run speed reference for vit_flax.

The same network as `vit_flax.build_model` for the configurations the benchmark uses: a patch conv
`embedding`, learned 1-D position embedding, pre-LN blocks (separate query/key/value/out
projections with biases, tanh-GELU MLP, LayerNorm eps 1e-6), TokenLearner V1.1 (LayerNorm ->
Dense(C, 64) -> GELU -> Dense(64, S) -> softmax over space -> weighted sum) inserted before block
`tokenlearner_loc`, final LayerNorm, GAP (or CLS token) and a zero-initialised head. It trains with
softmax cross-entropy, optional global-norm clipping and AdamW, as eager PyTorch on all CPU cores
(`torch.set_num_threads(os.cpu_count())`).

Standalone (defaults are the benchmark's `mnist` preset with TokenLearner):

  python benchmarks/torch_vit.py --num_tokens=8 --tokenlearner_loc=1 --min_time_s=10

prints one JSON line `{"images_per_s": ..., "step_s": ..., ...}`. `vit_flax.benchmark --torch`
runs this file in a subprocess (so PyTorch's threads never share a process with XLA's).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F


class EncoderBlock(nn.Module):
  """Pre-LN block: x + MHSA(LN(x)), then x + MLP(LN(x)); [B, N, D] -> [B, N, D]."""

  def __init__(self, width: int, mlp_dim: int, num_heads: int, dropout_rate: float):
    super().__init__()
    self.num_heads = num_heads
    self.norm1 = nn.LayerNorm(width, eps=1e-6)
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(width, width)
    self.value = nn.Linear(width, width)
    self.out = nn.Linear(width, width)
    self.norm2 = nn.LayerNorm(width, eps=1e-6)
    self.mlp_in = nn.Linear(width, mlp_dim)
    self.mlp_out = nn.Linear(mlp_dim, width)
    self.dropout = nn.Dropout(dropout_rate)

  def forward(self, x):
    b, n, d = x.shape
    y = self.norm1(x)
    heads = lambda t: t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)
    q, k, v = heads(self.query(y)), heads(self.key(y)), heads(self.value(y))  # [B, H, N, D/H]
    y = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D/H]
    y = self.out(y.transpose(1, 2).reshape(b, n, d))  # [B, N, D]
    x = x + self.dropout(y)
    y = self.mlp_out(self.dropout(F.gelu(self.mlp_in(self.norm2(x)), approximate='tanh')))
    return x + self.dropout(y)


class TokenLearnerV11(nn.Module):
  """LN -> MLP(C, 64, S) -> softmax over N -> weighted sum; [B, N, C] -> [B, S, C]."""

  def __init__(self, width: int, num_tokens: int, bottleneck_dim: int = 64):
    super().__init__()
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.dense0 = nn.Linear(width, bottleneck_dim)
    self.dense1 = nn.Linear(bottleneck_dim, num_tokens)

  def forward(self, x):
    a = self.dense1(F.gelu(self.dense0(self.norm(x)), approximate='tanh'))  # [B, N, S]
    weights = a.transpose(1, 2).softmax(dim=-1)  # [B, S, N]
    return weights @ x  # [B, S, C]


class ViT(nn.Module):
  """Patch ViT with an optional TokenLearner V1.1; [B, C, H, W] -> logits [B, num_classes]."""

  def __init__(self, *, image_shape, patch, width, num_layers, num_heads, mlp_dim, num_classes,
               num_tokens=None, tokenlearner_loc=None, classifier='gap', dropout_rate=0.0):
    super().__init__()
    h, w, c = image_shape
    self.classifier = classifier
    self.tokenlearner_loc = tokenlearner_loc if num_tokens else None
    self.embedding = nn.Conv2d(c, width, kernel_size=patch, stride=patch)
    num_patches = (h // patch[0]) * (w // patch[1])
    self.pos_embedding = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
    self.cls = nn.Parameter(torch.zeros(1, 1, width)) if classifier == 'token' else None
    self.dropout = nn.Dropout(dropout_rate)
    self.blocks = nn.ModuleList(
        EncoderBlock(width, mlp_dim, num_heads, dropout_rate) for _ in range(num_layers))
    self.tokenlearner = TokenLearnerV11(width, num_tokens) if self.tokenlearner_loc is not None \
        else None
    self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, num_classes)
    nn.init.zeros_(self.head.weight)
    nn.init.zeros_(self.head.bias)

  def forward(self, images):
    x = self.embedding(images)  # [B, D, h, w]
    x = x.flatten(2).transpose(1, 2) + self.pos_embedding  # [B, hw, D]
    if self.cls is not None:
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)  # [B, 1 + hw, D]
    x = self.dropout(x)
    for i, block in enumerate(self.blocks):
      if i == self.tokenlearner_loc:
        if self.cls is not None:  # The CLS token bypasses the learner.
          x = torch.cat([x[:, :1], self.tokenlearner(x[:, 1:])], dim=1)  # [B, 1 + S, D]
        else:
          x = self.tokenlearner(x)  # [B, S, D]
      x = block(x)
    x = self.encoder_norm(x)
    x = x[:, 0] if self.cls is not None else x.mean(dim=1)  # [B, D]
    return self.head(x)


def time_training(model, *, batch_size, image_shape, num_classes, min_time_s=10.0, windows=5,
                  max_grad_norm=None, learning_rate=1e-3, weight_decay=1e-4, seed=0):
  """Times AdamW train steps on one synthetic batch; returns the median of `windows` windows."""
  torch.manual_seed(seed)
  h, w, c = image_shape
  images = torch.randn(batch_size, c, h, w)
  labels = torch.randint(0, num_classes, (batch_size,))
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
  model.train()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    if max_grad_norm:
      nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return loss

  step()  # Warm-up: allocator, oneDNN primitive caches.
  start = time.perf_counter()
  step()  # Calibrates the steps per window.
  steps_per_window = max(1, round(min_time_s / windows / (time.perf_counter() - start)))
  step_times = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(steps_per_window):
      loss = step()
    step_times.append((time.perf_counter() - start) / steps_per_window)
  step_s = statistics.median(step_times)
  return dict(images_per_s=batch_size / step_s, step_s=step_s, steps_per_window=steps_per_window,
              windows=windows, window_step_s=step_times, final_loss=loss.item(),
              num_params=sum(p.numel() for p in model.parameters()),
              threads=torch.get_num_threads(), torch_version=torch.__version__)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_shape', default='28,28,1', help='H,W,C')
  parser.add_argument('--patch', default='2,2', help='ph,pw')
  parser.add_argument('--hidden_size', type=int, default=64)
  parser.add_argument('--num_layers', type=int, default=4)
  parser.add_argument('--num_heads', type=int, default=4)
  parser.add_argument('--mlp_dim', type=int, default=128)
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--num_tokens', type=int, default=0, help='0: no TokenLearner')
  parser.add_argument('--tokenlearner_loc', type=int, default=1)
  parser.add_argument('--classifier', default='gap', choices=['gap', 'token'])
  parser.add_argument('--dropout_rate', type=float, default=0.0)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--max_grad_norm', type=float, default=None)
  parser.add_argument('--min_time_s', type=float, default=10.0, help='total timed seconds')
  parser.add_argument('--windows', type=int, default=5)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  args = parser.parse_args(argv)

  torch.set_num_threads(args.threads)
  image_shape = tuple(int(v) for v in args.image_shape.split(','))
  model = ViT(image_shape=image_shape, patch=tuple(int(v) for v in args.patch.split(',')),
              width=args.hidden_size, num_layers=args.num_layers, num_heads=args.num_heads,
              mlp_dim=args.mlp_dim, num_classes=args.num_classes,
              num_tokens=args.num_tokens or None, tokenlearner_loc=args.tokenlearner_loc,
              classifier=args.classifier, dropout_rate=args.dropout_rate)
  result = time_training(model, batch_size=args.batch_size, image_shape=image_shape,
                         num_classes=args.num_classes, min_time_s=args.min_time_s,
                         windows=args.windows, max_grad_norm=args.max_grad_norm)
  print(json.dumps(result))
  return 0


if __name__ == '__main__':
  sys.exit(main())
