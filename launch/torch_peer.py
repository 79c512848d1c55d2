"""The PyTorch way, for launch/bench.py: clients one after another.

What the public code of the papers this project reproduces does (FedPhD's
`standalone/fedphd_ddim`, FedDM's and FedDDPM's trainers): one process, the
global model deep-copied for each client in turn, the client's optimizer
run for its local steps, then the clients' state dicts averaged with their
example counts as weights. The model is diffusers' `UNet2DModel` with the
widths, blocks and norm groups of `config.model` (for configs/mnist_fedavg.py
it has exactly the project UNet's 267,313 parameters), the loss DDPM's
ε-prediction MSE on the config's noise schedule, the optimizer Adam (or SGD)
with the config's learning rate and gradient clipping, and the data the same
uint8 client arrays the JAX modes read.

torch and diffusers come with the `test` extra; `available()` says whether
they import.
"""

import copy
from typing import Any, Optional

import numpy as np


def available() -> Optional[str]:
  """None when torch and diffusers import, else why not."""
  try:
    import diffusers  # pylint: disable=g-import-not-at-top,unused-import
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    return (f'{e.name} is not installed (pip install -e ".[test]" brings '
            'torch and diffusers)')
  return None


def _unet(config, image_shape):
  """diffusers' UNet2DModel with `config.model`'s architecture."""
  # diffusers imports torchvision when it finds it; the CPU torch wheel
  # these machines use has no matching torchvision build, and the UNet needs
  # none of it.
  import diffusers.utils.import_utils as import_utils  # pylint: disable=g-import-not-at-top
  import_utils._torchvision_available = False  # pylint: disable=protected-access
  from diffusers import UNet2DModel  # pylint: disable=g-import-not-at-top
  m = config.model
  h, _, c = image_shape
  widths = tuple(int(m.ch) * int(k) for k in m.ch_mult)
  res = [h // 2 ** i for i in range(len(widths))]
  attn = set(int(r) for r in m.attn_resolutions)
  down = tuple('AttnDownBlock2D' if r in attn else 'DownBlock2D' for r in res)
  up = tuple('AttnUpBlock2D' if r in attn else 'UpBlock2D'
             for r in reversed(res))
  num_classes = m.get('num_classes')
  return UNet2DModel(
      sample_size=h, in_channels=c, out_channels=c,
      block_out_channels=widths, layers_per_block=int(m.num_res_blocks),
      down_block_types=down, up_block_types=up,
      norm_num_groups=int(m.get('num_groups', 32)),
      num_class_embeds=None if num_classes is None else int(num_classes) + 1)


class TorchLoop:
  """A federated round the PyTorch way (see the module docstring)."""

  def __init__(self, config, data, image_shape, alphas_cumprod, seed: int):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    torch.manual_seed(seed)
    self.config = config
    self.model = _unet(config, image_shape)
    self.num_params = sum(p.numel() for p in self.model.parameters())
    # NCHW float tensors of every client, built once as a simulator would.
    self.images = [torch.from_numpy(np.array(
        np.asarray(x).transpose(0, 3, 1, 2))) for x in data.images]
    self.labels = [torch.from_numpy(np.asarray(y, np.int64))
                   for y in data.labels]
    self.counts = [int(n) for n in np.asarray(data.counts)]
    self.ab = torch.from_numpy(np.asarray(alphas_cumprod, np.float32))
    self.rng = np.random.default_rng(seed)
    fed = config.federation
    self.local_steps = int(fed.local_steps)
    self.batch_size = int(fed.batch_size)

  def _optimizer(self, params):
    cfg = self.config.client_optimizer
    if cfg.get('name', 'adam') == 'adam':
      return self.torch.optim.Adam(
          params, lr=float(cfg.learning_rate),
          betas=(cfg.get('b1', 0.9), cfg.get('b2', 0.999)),
          eps=cfg.get('eps', 1e-8))
    return self.torch.optim.SGD(params, lr=float(cfg.learning_rate),
                                momentum=cfg.get('momentum', 0.0) or 0.0)

  def _train_client(self, k: int) -> tuple[dict[str, Any], float]:
    torch = self.torch
    local = copy.deepcopy(self.model)
    opt = self._optimizer(local.parameters())
    clip = float(self.config.client_optimizer.get('grad_clip', 0.0) or 0.0)
    conditional = self.config.model.get('num_classes') is not None
    n = self.counts[k]
    order = self.rng.permutation(n)
    losses = []
    for s in range(self.local_steps):
      idx = torch.from_numpy(order[(s * self.batch_size +
                                    np.arange(self.batch_size)) % n])
      x0 = self.images[k][idx].float() / 127.5 - 1.0
      t = torch.randint(0, self.ab.shape[0], (self.batch_size,))
      noise = torch.randn_like(x0)
      ab = self.ab[t].view(-1, 1, 1, 1)
      xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
      labels = self.labels[k][idx] if conditional else None
      pred = local(xt, t, class_labels=labels).sample
      loss = torch.mean((pred - noise) ** 2)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      if clip:
        torch.nn.utils.clip_grad_norm_(local.parameters(), clip)
      opt.step()
      losses.append(float(loss.detach()))
    return local.state_dict(), float(np.mean(losses))

  def round(self, client_ids) -> float:
    """One round over `client_ids`; returns the example-weighted loss."""
    total, weights, losses = None, [], []
    for k in client_ids:
      state, loss = self._train_client(int(k))
      w = float(self.counts[int(k)])
      if total is None:
        total = {name: w * v.float() for name, v in state.items()}
      else:
        for name, v in state.items():
          total[name] += w * v.float()
      weights.append(w)
      losses.append(loss)
    mean = {name: v / sum(weights) for name, v in total.items()}
    self.model.load_state_dict(mean)
    return float(np.average(losses, weights=weights))
