"""The attention pieces every family's reference processors are built from (families/), written
from shared/methods.md sections 2, 3 and 5.

Nothing here is shared with the packed runtime. Every function is plain PyTorch and favours
being obviously right over being fast.

- SEG: ``seg_kernel_size`` / ``gaussian_taps`` / ``blur_grid`` blur a query seen as a
  (h, w) image of C channels; ``mean_queries`` is the infinite blur.
- PAG / SoftPAG: ``PAGProcessor`` holds the per-head weights that replace the attention map of
  the selected heads by ``(1 - beta) A + beta A_pag``; ``mmdit_pag_image_rows`` is the MM-DiT
  A_pag (image queries see only their own image key and every text key).
- NAG: ``nag_combine``, the per-token formula, and ``joint_attention``, a joint attention that
  absorbs a PAG processor already installed on the layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------- SEG


def seg_kernel_size(sigma: float, extent: int) -> int:
    """Odd Gaussian kernel size ``ceil(6 sigma) + 1 - (ceil(6 sigma) mod 2)``, clamped to one axis
    of the token grid: ``k <= extent - (extent mod 2 - 1)``."""
    six = math.ceil(6.0 * sigma)
    k = six + 1 - six % 2
    return min(k, extent - (extent % 2 - 1))


def gaussian_taps(sigma: float, size: int) -> torch.Tensor:
    """float64 taps ``exp(-0.5 (x / sigma)^2)``, x = -(size-1)/2 .. (size-1)/2, summing to 1."""
    half = (size - 1) / 2.0
    x = torch.linspace(-half, half, steps=size, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def blur_grid(tokens: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur ``tokens`` (B, height*width, C), row-major on a (height, width) grid: every channel with
    the same 2-D Gaussian (outer product of the per-axis taps), reflect padding k//2 per axis."""
    batch, n, channels = tokens.shape
    if n != height * width:
        raise ValueError(f"SEG: {n} tokens do not fill a {height}x{width} grid")
    k_h, k_w = seg_kernel_size(sigma, height), seg_kernel_size(sigma, width)
    kernel = torch.outer(gaussian_taps(sigma, k_h), gaussian_taps(sigma, k_w))
    kernel = kernel.to(device=tokens.device, dtype=tokens.dtype)
    kernel = kernel.expand(channels, 1, k_h, k_w)
    image = tokens.transpose(1, 2).reshape(batch, channels, height, width)
    pad_h, pad_w = k_h // 2, k_w // 2
    if pad_h or pad_w:
        image = F.pad(image, (pad_w, pad_w, pad_h, pad_h), mode="reflect")
    image = F.conv2d(image, kernel, groups=channels)
    return image.reshape(batch, channels, n).transpose(1, 2)


def mean_queries(tokens: torch.Tensor) -> torch.Tensor:
    """Infinite blur: every token replaced by the per-channel mean over the tokens."""
    return tokens.mean(dim=1, keepdim=True).expand_as(tokens).clone()


# ------------------------------------------------------------------------------------- PAG


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, heads*d) -> (B, heads, L, d)."""
    batch, length, inner = x.shape
    return x.view(batch, length, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, L, d) -> (B, L, heads*d)."""
    batch, heads, length, dim = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * dim)


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)


def mmdit_pag_image_rows(q, k, v, image: slice, text: slice) -> torch.Tensor:
    """PAG's MM-DiT map for the image query rows: each image query attends to its own image key
    and to every text key, nothing else. q, k, v: (B, H, L, d). Returns (B, H, n_image, d).

    Written out explicitly (softmax over [own key, text keys]), computed in float32 or better."""
    dtype = q.dtype
    work = torch.promote_types(dtype, torch.float32)
    q_img, k_img, v_img = (t[:, :, image].to(work) for t in (q, k, v))
    k_txt, v_txt = k[:, :, text].to(work), v[:, :, text].to(work)
    scale = q.shape[-1] ** -0.5
    self_logit = (q_img * k_img).sum(dim=-1, keepdim=True) * scale      # (B, H, N, 1)
    text_logit = (q_img @ k_txt.transpose(-1, -2)) * scale              # (B, H, N, T)
    probs = torch.softmax(torch.cat([self_logit, text_logit], dim=-1), dim=-1)
    out = probs[..., :1] * v_img + probs[..., 1:] @ v_txt
    return out.to(dtype)


class PAGProcessor:
    """What every family's PAG processor shares: per-head weights of the PAG map (beta on the
    selected heads, 0 elsewhere)."""

    def __init__(self, beta: float, heads: tuple | None, num_heads: int):
        if heads is not None and max(heads) >= num_heads:
            raise ValueError(f"PAG.heads {heads} out of range: the layer has {num_heads} heads")
        weights = torch.zeros(num_heads, dtype=torch.float64)
        weights[list(range(num_heads)) if heads is None else list(heads)] = beta
        self.weights = weights
        self.pure = bool((weights == 1.0).all())   # plain PAG: A is not needed at all

    def mix(self, normal: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
        """Per head (1 - w) normal + w perturbed; lerp is exact at w = 0 and w = 1."""
        if self.pure:
            return perturbed
        w = self.weights.to(device=normal.device, dtype=normal.dtype).view(1, -1, 1, 1)
        return torch.lerp(normal, perturbed, w)


# ------------------------------------------------------------------------------------- NAG


@dataclass(frozen=True)
class NAGSetting:
    """NAG's numbers for one step: phi (code convention, != 1 when active), tau, alpha (the
    family default resolved), p-norm."""

    phi: float
    tau: float
    alpha: float
    norm: int


def nag_combine(zp: torch.Tensor, zn: torch.Tensor, setting: NAGSetting) -> torch.Tensor:
    """``alpha Zh + (1 - alpha) Zp`` per token (last dim = all heads' channels), computed in
    float32 or better and returned in zp's dtype. The clip factor ``min(r, tau) / r`` is 1 where
    r = |Zt| / |Zp| is 0 or not finite (|Zt| = 0 or |Zp| = 0), so the result stays finite."""
    work = torch.promote_types(zp.dtype, torch.float32)
    p, n = zp.to(work), zn.to(work)
    phi = setting.phi
    zt = phi * p - (phi - 1.0) * n
    norm_p = torch.linalg.vector_norm(p, ord=setting.norm, dim=-1, keepdim=True)
    norm_t = torch.linalg.vector_norm(zt, ord=setting.norm, dim=-1, keepdim=True)
    r = norm_t / norm_p
    usable = torch.isfinite(r) & (r > 0)
    factor = torch.where(usable, torch.clamp(r, max=setting.tau) / r, torch.ones_like(r))
    zh = zt * factor
    z = setting.alpha * zh + (1.0 - setting.alpha) * p
    return z.to(zp.dtype)


def joint_attention(q, k, v, image: slice, text: slice, pag: PAGProcessor | None) -> torch.Tensor:
    """Joint attention of (R, H, L, d) rows; with a reference PAG processor, its MM-DiT map is
    mixed into the image query rows (text part = the row's own text)."""
    out = attention(q, k, v)
    if pag is None:
        return out
    out = out.clone()
    out[:, :, image] = pag.mix(out[:, :, image], mmdit_pag_image_rows(q, k, v, image, text))
    return out
