"""`load_dinov2` refuses bad weight files with messages that name the problem, and the export
round trip is lossless."""

import dinov2_reference as ref
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from triplane3d import convert

OVERRIDES = dict(width=ref.WIDTH, num_heads=ref.HEADS)


@pytest.fixture(scope='module')
def official():
  return ref.official_state_dict(ref.make_model(registers=False))


def _save(state, path):
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
  return str(path)


def test_missing_key(official, tmp_path):
  state = dict(official)
  del state['blocks.3.norm1.weight']
  with pytest.raises(convert.WeightFileError, match=r'missing keys \[.blocks_3/norm1/scale.\]'):
    convert.load_dinov2(_save(state, tmp_path / 'm.safetensors'), 'vits14', **OVERRIDES)


def test_unexpected_key(official, tmp_path):
  state = dict(official, **{'head.weight': np.zeros((10, ref.WIDTH), np.float32)})
  with pytest.raises(convert.WeightFileError, match=r'unexpected keys \[.head.weight.\]'):
    convert.load_dinov2(_save(state, tmp_path / 'u.safetensors'), 'vits14', **OVERRIDES)


def test_wrong_variant_names_key_and_shapes(official, tmp_path):
  path = _save(official, tmp_path / 'w.safetensors')
  with pytest.raises(convert.WeightFileError) as e:
    convert.load_dinov2(path, 'vitb14')
  msg = str(e.value)
  assert 'cls_token: expected shape (1, 1, 768) for vitb14, found (1, 1, 48)' in msg


def test_unknown_architecture_needs_variant(official, tmp_path):
  with pytest.raises(convert.WeightFileError, match='pass variant= explicitly'):
    convert.load_dinov2(_save(official, tmp_path / 'x.safetensors'))


def test_variant_is_inferred_for_a_real_architecture(tmp_path):
  # A vits14-shaped state dict (zeros are enough to check inference, no forward pass).
  from triplane3d.convert import load as load_lib
  from triplane3d.models import vit

  shapes = load_lib.expected_shapes(vit.create('vits14_reg'))
  flat = {'/'.join(k.split('/')): np.zeros(s, np.float32) for k, s in shapes.items()}
  nested: dict = {}
  for k, v in flat.items():
    node = nested
    *parents, leaf = k.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  path = tmp_path / 's.safetensors'
  convert.save_dinov2(nested, str(path))
  assert convert.infer_variant(load_lib.read_official_state(str(path))) == 'vits14_reg'
  assert convert.load_dinov2(str(path))['pos_embed'].shape == (1, 1 + 37 * 37, 384)


def test_unreadable_files(tmp_path):
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'not a safetensors file at all')
  with pytest.raises(convert.WeightFileError, match=r'could not read .*bad\.safetensors'):
    convert.load_dinov2(str(bad))
  badpth = tmp_path / 'bad.pth'
  badpth.write_bytes(b'\x00garbage')
  with pytest.raises(convert.WeightFileError, match='weights_only=True'):
    convert.load_dinov2(str(badpth))
  with pytest.raises(convert.WeightFileError, match='no checkpoint at'):
    convert.load_dinov2(str(tmp_path / 'nothing.pth'))
  with pytest.raises(convert.WeightFileError, match='unknown checkpoint format'):
    (tmp_path / 'w.npz').write_bytes(b'')
    convert.load_dinov2(str(tmp_path / 'w.npz'))


class _Evil:
  def __reduce__(self):
    import os

    return (os.system, ('echo pwned > /tmp/triplane3d_pwned',))


def test_pickled_code_is_never_executed(tmp_path):
  path = tmp_path / 'evil.pth'
  torch.save({'cls_token': _Evil()}, path)
  with pytest.raises(convert.WeightFileError, match=r'weights_only'):
    convert.load_dinov2(str(path))
  import os

  assert not os.path.exists('/tmp/triplane3d_pwned')


def test_hub_name_offline_error(monkeypatch):
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  with pytest.raises(convert.WeightFileError, match=r'could not download .facebook/dinov2-small.'):
    convert.load_dinov2('facebook/dinov2-small')


@pytest.mark.parametrize('ext', ['.safetensors', '.pth'])
def test_export_round_trip_is_lossless(official, tmp_path, ext):
  params = convert.load_dinov2(_save(official, tmp_path / 'a.safetensors'), 'vits14', **OVERRIDES)
  out = tmp_path / f'exported{ext}'
  convert.save_dinov2(params, str(out))
  if ext == '.pth':  # Loads into a PyTorch state dict with exactly the official keys.
    sd = torch.load(out, weights_only=True)
    assert set(sd) == set(official)
    for k, v in official.items():
      np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)
  again = convert.load_dinov2(str(out), 'vits14', **OVERRIDES)
  flat_a = convert.to_dinov2_state_dict(params)
  flat_b = convert.to_dinov2_state_dict(again)
  assert set(flat_a) == set(flat_b) == set(official)
  for k in official:
    np.testing.assert_array_equal(flat_a[k], official[k], err_msg=k)
    np.testing.assert_array_equal(flat_b[k], official[k], err_msg=k)
