"""The optimiser from `config.optim`: Adam(W), schedule, clipping and parameter groups.

Parameter groups: `optim.lr_mults` is an ordered list of `(regex, multiplier)`; a parameter's
'/'-joined path (e.g. 'backbone/blocks_3/attn/qkv/kernel') takes the multiplier of the first
regex that matches it in full (`re.fullmatch`), and every parameter must match one. A
multiplier of 0 freezes the group (no update, and no Adam statistics are kept for it).
"""

from __future__ import annotations

import re

import jax
import ml_collections as mlc
import optax
from absl import logging


def schedule(optim_cfg: mlc.ConfigDict, num_steps: int) -> optax.Schedule:
  """Learning rate per step: constant (paper) or cosine to 0, after an optional linear warm-up."""
  lr, warm = float(optim_cfg.lr), int(optim_cfg.warmup_steps)
  if optim_cfg.schedule == 'constant':
    main = optax.constant_schedule(lr)
  elif optim_cfg.schedule == 'cosine':
    main = optax.cosine_decay_schedule(lr, max(num_steps - warm, 1))
  else:
    raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {optim_cfg.schedule!r}.")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def group_labels(params, lr_mults) -> tuple[dict, dict[str, float]]:
  """Labels every parameter with its group; returns (label tree, label → multiplier)."""
  rules = [(re.compile(pat), float(mult)) for pat, mult in lr_mults]
  names, unmatched = [], []

  def label(path, _):
    name = jax.tree_util.keystr(path, simple=True, separator='/')
    names.append(name)
    for i, (pat, mult) in enumerate(rules):
      if pat.fullmatch(name):
        return 'frozen' if mult == 0 else f'group{i}'
    unmatched.append(name)
    return 'unmatched'

  labels = jax.tree_util.tree_map_with_path(label, params)
  for pat, _ in rules:
    if any(pat.fullmatch(n) for n in names):
      continue
    prefix_of = [n for n in names if pat.match(n)]
    if prefix_of:  # The usual slip: 'backbone' for 'backbone/.*'.
      raise ValueError(
        f'optim.lr_mults rule {pat.pattern!r} matches no whole parameter name, only the start '
        f'of {len(prefix_of)} (e.g. {prefix_of[0]!r}); rules match whole names: write '
        f'{pat.pattern + "/.*"!r}.'
      )
    # A rule for a part this model lacks (e.g. the demo's embeddings rule with the conv
    # decoder ablation) is allowed, but said.
    logging.warning('optim.lr_mults rule %r matches no parameter of this model.', pat.pattern)
  if unmatched:
    raise ValueError(
      f'{len(unmatched)} parameters match no rule of optim.lr_mults, e.g. {unmatched[:5]}; '
      "add a rule for them (a final ('.*', 1.0) catches the rest)."
    )
  mults = {f'group{i}': m for i, (_, m) in enumerate(rules) if m != 0}
  return labels, mults


def trainable_mask(optim_cfg: mlc.ConfigDict):
  """A function zeroing the frozen (multiplier 0) leaves of a params-shaped tree."""

  def apply(tree):
    labels, _ = group_labels(tree, optim_cfg.lr_mults)
    return jax.tree.map(lambda x, lab: x * 0 if lab == 'frozen' else x, tree, labels)

  return apply


def create(
  optim_cfg: mlc.ConfigDict, params, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser for `params` (a pytree or its abstract shapes) and its base lr schedule."""
  sched = schedule(optim_cfg, num_steps)
  labels, mults = group_labels(params, optim_cfg.lr_mults)
  if optim_cfg.name not in ('adam', 'adamw'):
    raise ValueError(f"optim.name must be 'adam' or 'adamw', got {optim_cfg.name!r}.")
  if optim_cfg.name == 'adam' and optim_cfg.weight_decay:
    raise ValueError(
      f'optim.weight_decay={optim_cfg.weight_decay} has no effect with Adam; use '
      "optim.name='adamw' (decoupled decay) or set it to 0."
    )

  def group(mult: float) -> optax.GradientTransformation:
    parts = [optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2)]
    if optim_cfg.name == 'adamw' and optim_cfg.weight_decay:
      parts.append(optax.add_decayed_weights(optim_cfg.weight_decay))
    parts.append(optax.scale_by_learning_rate(lambda step: sched(step) * mult))
    return optax.chain(*parts)

  transforms = {name: group(m) for name, m in mults.items()}
  transforms['frozen'] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, labels)
  if optim_cfg.grad_clip_norm:
    # Clip on the trainable gradients only: frozen ones would shrink the others' updates.
    freeze = optax.multi_transform(
      {'frozen': optax.set_to_zero(), **{g: optax.identity() for g in mults}}, labels
    )
    tx = optax.chain(freeze, optax.clip_by_global_norm(optim_cfg.grad_clip_norm), tx)
  return tx, sched
