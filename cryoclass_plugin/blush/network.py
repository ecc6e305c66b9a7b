"""The Blush denoiser: a small residual 3D U-Net (about 0.28 M parameters).

Input: a standardised map ``x`` (B, 1, D, H, W) on the network's voxel grid
(:data:`NETWORK_APIX`).  Two channels enter the network, as in RELION's Blush: the map and
its local standard deviation (over a ``LOCAL_STD_WINDOW``^3 voxel window), which tells the
network where density is and how noisy it is there.  Output: ``x - n``, the map minus the
predicted noise ``n`` (a residual denoiser).

Layout (chosen for CPU speed; measured in benchmarks/bench_blush.py):
- space-to-depth by 2 (each 2x2x2 voxel cell becomes 8 channels, lossless), so the
  U-Net runs on 1/8 of the voxels with channel counts that are multiples of 8, which the
  CPU convolution kernels (oneDNN) handle several times faster per operation than 1-2
  channels at full size (the FFDNet design);
- three levels of widths ``widths`` (two 3x3x3 convolutions with LeakyReLU each), 2x
  max-pooling down, 2x transposed convolutions up, skip connections;
- depth-to-space of 8 channels back to the full grid gives ``n``.
Spatial sizes must be multiples of :data:`SIZE_MULTIPLE`.  No batch statistics
(no BatchNorm): a block's output depends on that block only.  Receptive field about
40 voxels (120 A at 3 A/voxel).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

#: Voxel size (A) the network was trained at; maps are resampled to it.
NETWORK_APIX = 3.0
#: Spatial sizes fed to the network must be multiples of this (space-to-depth by 2, then
#: two 2x poolings).
SIZE_MULTIPLE = 8
#: Window (voxels) of the local standard deviation input.
LOCAL_STD_WINDOW = 5
#: Channel widths of the three levels.
DEFAULT_WIDTHS = (16, 32, 48)


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` whose inference on the CPU always takes oneDNN's kernel.

    torch picks its native (im2col) kernel instead for a single map whose channels x
    first two spatial sizes are small (below 20,480: this network's lower levels), which
    runs about 7x slower there; inference (no gradient) of float32 CPU tensors therefore
    calls ``torch.mkldnn_convolution`` directly (same result to float32 rounding).
    Training keeps torch's own choice (and its deterministic algorithms)."""

    def forward(self, x):
        if (not torch.is_grad_enabled() and x.device.type == "cpu"
                and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            return torch.mkldnn_convolution(x.contiguous(), self.weight, self.bias,
                                            self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


def _block(c_in, c_out):
    return nn.Sequential(
        Conv3d(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.1, inplace=True),
        Conv3d(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.1, inplace=True))


def _box_mean(x, window):
    """Mean over a ``window``^3 neighbourhood (edges replicated), as running sums along
    each axis (cost independent of the window)."""
    pad = window // 2
    x = F.pad(x, (pad,) * 6, mode="replicate")
    for dim in (2, 3, 4):
        c = torch.cumsum(x, dim=dim)
        c = torch.cat([torch.zeros_like(c.narrow(dim, 0, 1)), c], dim=dim)
        n = c.shape[dim] - window
        x = c.narrow(dim, window, n) - c.narrow(dim, 0, n)
    return x / float(window ** 3)


def local_std(x, window=LOCAL_STD_WINDOW):
    """Standard deviation of ``x`` (B, 1, D, H, W) over ``window``^3 neighbourhoods."""
    mean = _box_mean(x, window)
    mean_sq = _box_mean(x * x, window)
    return torch.sqrt(torch.clamp(mean_sq - mean * mean, min=1e-8))


def space_to_depth(x):
    """(B, C, 2D, 2H, 2W) -> (B, 8C, D, H, W)."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2)
    return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * 8, d // 2, h // 2, w // 2)


def depth_to_space(x):
    """(B, 8C, D, H, W) -> (B, C, 2D, 2H, 2W), the inverse of :func:`space_to_depth`."""
    b, c8, d, h, w = x.shape
    c = c8 // 8
    x = x.reshape(b, c, 2, 2, 2, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, 2 * d, 2 * h, 2 * w)


class BlushUNet(nn.Module):
    """Residual 3D U-Net denoiser with ``widths`` channels on its three levels."""

    def __init__(self, widths=DEFAULT_WIDTHS):
        super().__init__()
        w1, w2, w3 = (int(v) for v in widths)
        self.widths = (w1, w2, w3)
        self.enc1 = _block(16, w1)
        self.enc2 = _block(w1, w2)
        self.mid = _block(w2, w3)
        self.up2 = nn.ConvTranspose3d(w3, w2, 2, stride=2)
        self.dec2 = _block(2 * w2, w2)
        self.up1 = nn.ConvTranspose3d(w2, w1, 2, stride=2)
        self.dec1 = _block(2 * w1, w1)
        self.out = Conv3d(w1, 8, 1)
        # The noise estimate starts at zero: an untrained network is the identity, and
        # training improves on it rather than first unlearning a random output.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x):
        h = space_to_depth(torch.cat([x, local_std(x)], dim=1))
        e1 = self.enc1(h)
        e2 = self.enc2(F.max_pool3d(e1, 2))
        m = self.mid(F.max_pool3d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return x - depth_to_space(self.out(d1))


def n_parameters(model):
    return sum(p.numel() for p in model.parameters())
