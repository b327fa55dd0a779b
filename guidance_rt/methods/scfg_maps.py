"""S-CFG's runtime: the semantic maps, collected inside the packed forward without N x N attention maps.

For every UNet transformer block on the latent/R and latent/(2R) grids, the uncond and cond rows'
head-averaged cross-attention probabilities C (N x T, small) are completed with the self-attention
map A: ``A @ X`` is an attention whose values are X, so ``(A + 3 A^2) C / 4`` (the published code)
or ``(A + A^2 + A^3 + A^4) C / 4`` (the paper) costs a few attentions with T-wide values and never
materialises A (methods.md section 7).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..combine import per_sample
from ..ops import sdpa

# the published code's 3x3 smoothing: taps exp(-((x - 1) / (2 * 0.5))^2), x = 0, 1, 2, normalised
_TAPS = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) ** 2)
_TAPS = _TAPS / _TAPS.sum()


def smooth3x3(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w): the 3x3 Gaussian of S-CFG on every channel, reflect padding 1."""
    b, c, h, w = x.shape
    k = (_TAPS[:, None] * _TAPS[None, :]).to(x)
    y = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="reflect")
    return F.conv2d(y, k.view(1, 1, 3, 3)).reshape(b, c, h, w)


def head_mean_attention(q: torch.Tensor, k: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mean over heads of softmax(q k^T / sqrt(d)) @ x, for x (rows, N, T): flash attentions whose
    values are x in head-dim-wide slices (fused kernels want v as wide as q, and a fallback to the
    unfused path would materialise the N x N map this exists to avoid)."""
    heads, d = q.shape[1], q.shape[-1]
    outs = []
    for lo in range(0, x.shape[-1], d):
        part = x[..., lo:lo + d]
        width = part.shape[-1]
        if width < d:
            part = F.pad(part, (0, d - width))
        v = part.unsqueeze(1).expand(-1, heads, -1, -1)
        outs.append(sdpa(q, k, v).mean(1)[..., :width])
    return torch.cat(outs, -1)


class SemanticMaps:
    """Accumulates the region maps of one step (rows: uncond then cond, 2B of them)."""

    EXPLICIT_UP_TO = 256   # tokens: below this the (N x N) map is smaller than the text maps' work

    def __init__(self, R: int, completion: str, latent: tuple[int, int], batch: int):
        self.R, self.completion, self.latent, self.batch = R, completion, latent, batch
        self.ca = self.fore = None
        self.layers = 0
        self.grid_R: tuple[int, int] | None = None

    def level(self, grid: tuple[int, int]) -> int | None:
        """R or 2R if this token grid is latent/R or latent/(2R), else None."""
        H, W = self.latent
        for r in (self.R, 2 * self.R):
            if grid[0] * r == H and grid[1] * r == W:
                return r
        return None

    def add(self, q: torch.Tensor, k: torch.Tensor, cross: torch.Tensor, grid: tuple[int, int]):
        """q, k: attn1's (2B, heads, N, d); cross: attn2's head-mean probabilities (2B, N, T)."""
        r = self.level(grid)
        q, k, cross = q.float(), k.float(), cross.float()
        n = q.shape[2]
        if n <= self.EXPLICIT_UP_TO:   # a small map is cheaper to form than many narrow attentions
            a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1)
            attend = lambda x: a @ x
        else:
            attend = lambda x: head_mean_attention(q, k, x)   # A @ x without forming A
        m = attend(cross)
        if self.completion == "code":
            m = (m + 3 * attend(m)) / 4
        else:
            total, cur = m, m
            for _ in range(3):
                cur = attend(cur)
                total = total + cur
            m = total / 4
        h, w = grid
        ca = m.transpose(1, 2).reshape(m.shape[0], -1, h, w)
        target = (self.latent[0] // self.R, self.latent[1] // self.R)
        if r != self.R:
            ca = F.interpolate(ca, size=target, mode="bilinear", align_corners=False)
        ca = smooth3x3(ca)
        ca_norm = ca / (ca.mean(dim=(2, 3), keepdim=True) + 1e-8)
        fore = torch.stack([ca[:, 0], ca[:, 1:].sum(1)], 1)
        fore = fore / fore.mean(dim=(2, 3), keepdim=True)
        self.ca = ca_norm if self.ca is None else self.ca + ca_norm
        self.fore = fore if self.fore is None else self.fore + fore
        self.layers += 1

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Region one-hots of the cond rows (B, T, H, W) and the foreground of the uncond rows
        (B, 1, H, W), at the latent size."""
        if self.layers == 0:
            raise ValueError(f"S-CFG: the model has no attention on the latent/{self.R} or latent/{2 * self.R} "
                             f"grid of a {self.latent[0]}x{self.latent[1]} latent; choose another R")
        B = self.batch
        ca, fore = self.ca / self.layers, self.fore / self.layers
        cond = ca[B:]
        region = (cond == cond.max(dim=1, keepdim=True).values).to(cond.dtype)
        unc = fore[:B]
        background = (unc == unc.max(dim=1, keepdim=True).values).to(unc.dtype)[:, :1]
        up = lambda x: F.interpolate(x, size=self.latent, mode="nearest")
        return up(region), up(1.0 - background)


def scfg_rate(u: torch.Tensor, c: torch.Tensor, region: torch.Tensor, foreground: torch.Tensor,
              scale, clamp: tuple[float, float], max_product: float) -> torch.Tensor:
    """S-CFG's rate map (B, 1, H, W) (methods.md section 7, step 5): every region's guidance norm
    brought to the foreground's mean norm. `scale`: w, or one w per sample."""
    n = (c - u).norm(dim=1, keepdim=True)
    dims = (2, 3)
    region_norm = (n * region).sum(dims) / (region.sum(dims) + 1e-8)          # (B, T)
    fore_norm = (n * foreground).sum(dims) / (foreground.sum(dims) + 1e-8)    # (B, 1)
    present = (region.sum(dims) > 0).to(n.dtype)
    rate_k = fore_norm * present / (region_norm + 1e-8)
    rate = (rate_k[:, :, None, None] * region).sum(1, keepdim=True)
    rate = rate.clamp(clamp[0], clamp[1])
    if isinstance(scale, (list, tuple)):
        w = per_sample(scale, rate)
        rate = torch.where(w > 0, torch.minimum(rate, max_product / torch.where(w > 0, w, 1.0)), rate)
    elif scale > 0:
        rate = rate.clamp(max=max_product / scale)
    return smooth3x3(rate)
