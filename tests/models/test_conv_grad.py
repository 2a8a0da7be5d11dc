"""`layers.conv_general_dilated`: the decoder's convolutions, whose kernel gradient XLA:CPU sums
over slices of the batch. Values and both gradients against float64 numpy; the slices are in
the CPU program and not in a TPU or GPU one."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from triplane3d.models import layers

DN = ('NHWC', 'HWIO', 'NHWC')


def _np_conv3x3(x, k):
  """'SAME' 3×3 conv in float64: x (N, H, W, C), k (3, 3, C, O)."""
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i : i + h, j : j + w] @ k[i, j] for i in range(3) for j in range(3))


def _np_grads(x, k, g):
  """(dx, dk) of sum(g * conv(x, k)) in float64."""
  _, h, w, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dk = np.stack([
    np.stack([np.einsum('nhwc,nhwo->co', xp[:, i : i + h, j : j + w], g) for j in range(3)])
    for i in range(3)
  ])  # fmt: skip
  # dx[p] = Σ_ij g[p - (i - 1), ...] k[i, j]ᵀ: the conv of g with the flipped, transposed kernel.
  dx = _np_conv3x3(g, k[::-1, ::-1].transpose(0, 1, 3, 2))
  return dx, dk


def _conv(x, k):
  return layers.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=DN)


def _convolutions(text: str) -> int:
  return len(re.findall(r'stablehlo\.convolution| convolution\(', text))


@pytest.mark.parametrize('slice_bytes', [2**62, 1])  # One kernel-gradient conv; one per image.
def test_values_and_gradients_match_float64(monkeypatch, slice_bytes):
  monkeypatch.setattr(layers, 'CPU_FILTER_GRAD_BYTES', slice_bytes)
  rng = np.random.default_rng(0)
  x, g = rng.standard_normal((5, 6, 7, 4)), rng.standard_normal((5, 6, 7, 3))
  k = rng.standard_normal((3, 3, 4, 3))
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  y, vjp = jax.vjp(_conv, f32(x), f32(k))
  dx, dk = jax.jit(vjp)(f32(g))
  want_dx, want_dk = _np_grads(x, k, g)
  np.testing.assert_allclose(y, _np_conv3x3(x, k), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dk, want_dk, rtol=1e-5, atol=1e-4)


def test_cpu_program_slices_the_kernel_gradient_and_others_do_not(monkeypatch):
  x = jnp.zeros((6, 8, 8, 16), jnp.float32)  # 4 KiB per image.
  k = jnp.zeros((3, 3, 16, 8), jnp.float32)
  monkeypatch.setattr(layers, 'CPU_FILTER_GRAD_BYTES', 8 * 2**10)  # 2 images per slice.

  def loss(x, k):
    return jnp.sum(_conv(x, k) ** 2)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
  cpu = grads.lower(x, k).compile().as_text()
  # Forward, input gradient, and the kernel gradient as 3 slices of 2 images.
  assert _convolutions(cpu) == 5, cpu
  for platform in ('tpu', 'cuda'):
    text = jax.export.export(grads, platforms=(platform,))(x, k).mlir_module()
    assert _convolutions(text) == 3, platform  # Forward, input and kernel gradients.
  # At most MAX_SLICES slices, whatever the image size.
  monkeypatch.setattr(layers, 'CPU_FILTER_GRAD_BYTES', 1)
  monkeypatch.setattr(layers, 'MAX_SLICES', 4)
  cpu = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, k).compile().as_text()
  assert _convolutions(cpu) == 2 + 3, cpu  # 6 images in slices of ceil(6 / 4) = 2.


def test_decoder_convs_use_it_and_train_the_same(monkeypatch):
  """`layers.conv` (the decoder's convolutions) takes the sliced path; its parameter tree and
  gradients are those of a plain `nn.Conv`."""
  block = layers.UpsampleBlock(8, mode='shuffle')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 6, 6, 5)), jnp.float32)
  variables = block.init(jax.random.key(0), x)
  plain = nn.Conv(32, (3, 3), padding='SAME', name='conv')
  assert jax.tree.map(jnp.shape, nn.unbox(variables)['params']['conv']) == jax.tree.map(
    jnp.shape, nn.unbox(plain.init(jax.random.key(0), x))['params']
  )

  def grads(variables):
    return jax.grad(lambda v: jnp.sum(block.apply(v, x) ** 2))(variables)

  monkeypatch.setattr(layers, 'CPU_FILTER_GRAD_BYTES', 2**62)
  whole = grads(variables)
  monkeypatch.setattr(layers, 'CPU_FILTER_GRAD_BYTES', 1)
  sliced = jax.jit(grads)(variables)
  text = jax.jit(grads).lower(variables).compile().as_text()
  # The forward and a kernel gradient per image (the input, a constant here, needs none).
  assert _convolutions(text) == 1 + 4, text
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), whole, sliced)
