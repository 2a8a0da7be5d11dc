"""Linear probe grid: one SGD run against numpy, a planted rule recovered, lr chosen on val."""

import numpy as np
import pytest

from triplane3d.evaluate import linear

D, C = 8, 4


def _planted(rng, w_true, n):
  """Gaussian features labelled by argmax(x @ w_true), keeping points with a margin of 0.5."""
  x = rng.normal(size=(4 * n, w_true.shape[0])).astype(np.float32)
  z = np.sort(x @ w_true, axis=1)
  x = x[z[:, -1] - z[:, -2] > 0.5][:n]
  return x, np.argmax(x @ w_true, axis=1)


@pytest.fixture(scope='module')
def planted():
  rng = np.random.default_rng(0)
  w_true = rng.normal(size=(D, C))
  return (*_planted(rng, w_true, 2000), *_planted(rng, w_true, 500))


def test_grid_matches_numpy_sgd_momentum_cosine():
  """Three full-batch steps of PyTorch-style SGD (momentum 0.9, cosine to 0) in float64."""
  rng = np.random.default_rng(1)
  n, lrs, steps = 16, [0.5, 2.0], 3
  x = rng.normal(size=(n, D)).astype(np.float32)
  y = rng.integers(0, C, size=n)
  w, b = linear.train_heads(x, y, C, lrs, epochs=steps, batch_size=n, seed=3)
  w0, b0 = linear.init_heads(len(lrs), D, C, seed=3)
  for h, lr in enumerate(lrs):
    wr, br = np.asarray(w0[h], np.float64), np.asarray(b0[h], np.float64)
    mw, mb = np.zeros_like(wr), np.zeros_like(br)
    for t in range(steps):  # One batch of all n rows: the shuffle does not change the gradient.
      logits = x @ wr + br
      p = np.exp(logits - logits.max(1, keepdims=True))
      p /= p.sum(1, keepdims=True)
      g = (p - np.eye(C)[y]) / n
      mw, mb = 0.9 * mw + x.T @ g, 0.9 * mb + g.sum(0)
      lr_t = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
      wr, br = wr - lr_t * mw, br - lr_t * mb
    np.testing.assert_allclose(w[h], wr, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b[h], br, rtol=1e-4, atol=1e-5)


def test_planted_rule_recovered_and_lr_chosen_on_val(planted):
  x_tr, y_tr, x_va, y_va = planted
  r = linear.fit_and_score(x_tr, y_tr, x_va, y_va, C, epochs=15, batch_size=256, seed=0)
  assert r['accuracy'] >= 0.95
  accs = r['val_accuracy_per_lr']
  assert tuple(accs) == linear.LEARNING_RATES
  assert accs[1e-5] < 0.4  # The tiniest lr barely moves from the random init (chance 0.25).
  assert r['lr'] != 1e-5
  assert r['lr'] == linear.LEARNING_RATES[int(np.argmax(list(accs.values())))]
  assert r['accuracy'] == max(accs.values())
  assert r['scaled_lr'] == pytest.approx(r['lr'] * 256 / 256)
  assert r['steps'] == 15 * (len(x_tr) // 256)
  # The returned head is the chosen one: scoring it again gives the validation accuracy.
  assert linear.score(r['head'], x_va, y_va) == r['accuracy']
  # Deterministic given the seed.
  again = linear.fit_and_score(x_tr, y_tr, x_va, y_va, C, epochs=15, batch_size=256, seed=0)
  np.testing.assert_array_equal(again['head']['w'], r['head']['w'])


def test_variants_pick_the_informative_features(planted):
  x_tr, y_tr, x_va, y_va = planted
  rng = np.random.default_rng(2)
  noise = (rng.normal(size=(len(x_tr), 5)), rng.normal(size=(len(x_va), 5)))
  r = linear.fit_and_score_variants(
    {'noise': noise, 'planted': (x_tr, x_va)},
    y_tr,
    y_va,
    C,
    lrs=[1e-4, 1e-2, 0.1],
    epochs=5,
    batch_size=256,
  )
  assert r['variant'] == 'planted'
  assert set(r['table']) == {'noise', 'planted'} and list(r['table']['noise']) == [1e-4, 1e-2, 0.1]
  assert max(r['table']['noise'].values()) < 0.5
  assert r['accuracy'] == max(r['table']['planted'].values())
  assert r['head']['w'].shape == (D, C)


def test_class_subset_scores_best_logit_within_subset():
  head = {'w': np.eye(3, dtype=np.float32), 'b': np.zeros(3, np.float32)}  # logits = x.
  x = np.array([[5.0, 3.0, 1.0], [0.0, 1.0, 4.0], [9.0, 1.0, 2.0]], np.float32)
  y = np.array([1, 2, 2])
  assert linear.score(head, x, y) == pytest.approx(1 / 3)  # Argmax over all: 0, 2, 0.
  # Within {1, 2}: row 0 → 1 (class 0's 5.0 is outside), row 1 → 2, row 2 → 2.
  assert linear.score(head, x, y, class_subset=[1, 2]) == 1.0
  np.testing.assert_array_equal(
    linear.predict(head['w'][None], head['b'][None], x, class_subset=[2, 1]), [[1, 2, 2]]
  )


def test_errors_name_the_fix(planted):
  x_tr, y_tr, x_va, y_va = planted
  head = {'w': np.eye(3, dtype=np.float32), 'b': np.zeros(3, np.float32)}
  with pytest.raises(ValueError, match='not in class_subset'):
    linear.score(head, np.eye(3), [0, 1, 2], class_subset=[1, 2])
  with pytest.raises(ValueError, match='outside'):
    linear.score(head, np.eye(3), [1, 1, 2], class_subset=[1, 5])
  with pytest.raises(ValueError, match='batch_size'):
    linear.fit_and_score(x_tr[:10], y_tr[:10], x_va, y_va, C, batch_size=1024)
  with pytest.raises(ValueError, match=r'labels must be integers in \[0, 4\)'):
    linear.fit_and_score(x_tr, y_tr + 4, x_va, y_va, C)


def test_per_epoch_features_stream_into_the_same_training():
  """A callable epoch -> features trains exactly as the array when it returns the array, is
  asked for epochs in order (each variant's epoch e before e + 1), and its views matter."""
  rng = np.random.default_rng(4)
  x, y = rng.normal(size=(64, D)).astype(np.float32), rng.integers(0, C, 64)
  kw = {'epochs': 3, 'batch_size': 16, 'seed': 1}
  w, b = linear.train_heads(x, y, C, [0.1, 1.0], **kw)
  asked = []
  views = {e: x + rng.normal(scale=0.5, size=x.shape).astype(np.float32) for e in range(3)}

  def same(e):
    asked.append(e)
    return x

  w2, b2 = linear.train_heads(same, y, C, [0.1, 1.0], **kw)
  np.testing.assert_array_equal(w, w2)
  np.testing.assert_array_equal(b, b2)
  assert asked == [0, 0, 1, 2]  # The first call checks shapes and labels.
  w3, _ = linear.train_heads(views.__getitem__, y, C, [0.1, 1.0], **kw)
  assert not np.allclose(w, w3)
