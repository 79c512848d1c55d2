"""A tiny conditional denoiser and data shared by the FedDDPM tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_diff import federation

NUM_CLASSES = 4


class TinyEps(nn.Module):
  """ε_θ(x_t, t, y): two convolutions plus a per-class, per-time bias."""

  @nn.compact
  def __call__(self, x, t, y):
    h = nn.relu(nn.Conv(4, (3, 3))(x))
    out = nn.Conv(x.shape[-1], (3, 3))(h)
    emb = nn.Embed(NUM_CLASSES + 1, x.shape[-1])(y)
    scale = self.param('t_scale', nn.initializers.zeros, ())
    return out + emb[:, None, None, :] + scale * (t / 100.0)[:, None, None,
                                                             None]


MODEL = TinyEps()


def eps_fn(params, x_t, t, labels, *, train, rng):
  del train, rng
  if labels is None:
    labels = jnp.full((x_t.shape[0],), NUM_CLASSES, jnp.int32)
  return MODEL.apply({'params': params}, x_t, t, labels)


def init_params(seed=1):
  return MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 8, 8, 1)),
                    jnp.zeros((1,), jnp.int32),
                    jnp.zeros((1,), jnp.int32))['params']


def make_data(num_clients=5, seed=0):
  """Clients of 2 classes each with uneven sizes, uint8 8×8×1 images."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(4, 11, size=num_clients)
  images, labels, parts, start = [], [], [], 0
  for k, n in enumerate(counts):
    cls = np.array([k % NUM_CLASSES, (k + 1) % NUM_CLASSES])
    labels.append(cls[rng.integers(0, 2, size=n)])
    images.append(rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8))
    parts.append(np.arange(start, start + n))
    start += n
  return federation.stack_clients(np.concatenate(images),
                                  np.concatenate(labels).astype(np.int32),
                                  parts)
