"""The bench's standard configurations and implementation names: plain data, torch-free, so that
`guidance-rt bench --help` lists them without importing torch (guidance_rt.bench runs them)."""
from __future__ import annotations

# family -> the tiny preset bench runs its standard configurations on (in this order)
FAMILY_PRESET = {"unet": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux", "flux2": "tiny-flux2",
                 "qwenimage": "tiny-qwenimage", "wan": "tiny-wan"}

# (family, name, spec)
STANDARD: list[tuple[str, str, str]] = [
    ("unet", "CFG", "cfg=5"),
    ("unet", "CFG+PAG(mid)", "cfg=5 pag=3@mid"),
    ("unet", "CFG+SEG(mid,inf)", "cfg=5 seg=3@mid:sigma=inf"),
    ("unet", "CFG+SEG(mid,sigma2)", "cfg=5 seg=3@mid:sigma=2"),
    ("unet", "CFG+TPG(d6-d23)", "cfg=5 tpg=3@d6-d23"),
    ("sd3", "CFG", "cfg=4"),
    ("sd3", "CFG+SLG[7,8,9]", "cfg=4 slg=2.8@7,8,9:0-1"),
    ("sd3", "CFG+NAG", "cfg=4 nag=5"),
    ("flux", "plain", ""),
    ("flux", "NAG", "nag=5"),
    ("flux", "CSLG[3,8,6,10,14]", "slg=2@3,8,6,10,14:0-1:form=cslg"),   # published FLUX text layers
    ("flux2", "plain", ""),   # FLUX.2-dev is guidance-distilled: no CFG
    ("flux2", "NAG", "nag=5"),
    ("flux2", "PAG(1)", "pag=3@1"),
    ("flux2", "SLG[3,4]", "slg=2.8@3,4:0-1"),
    ("qwenimage", "CFG", "cfg=4"),
    ("qwenimage", "CFG+PAG(1)", "cfg=4 pag=3@1"),
    ("qwenimage", "CFG+SLG[18-23]", "cfg=4 slg=2.8@18-23:0-1"),
    ("qwenimage", "CFG+NAG", "cfg=4 nag=5"),
    ("wan", "CFG", "cfg=5"),
    ("wan", "CFG+SLG[10]", "cfg=5 slg=3@10:0.1-1"),   # the community's Wan SLG (block 10, from 10%)
    ("wan", "CFG+PAG[10]", "cfg=5 pag=3@10"),
    ("wan", "CFG+NAG", "cfg=5 nag=5"),
]
IMPLEMENTATIONS = ("guidance-rt", "reference", "diffusers-pipelines", "diffusers-guiders")


def standard_names() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for fam, name, _ in STANDARD:
        out.setdefault(fam, []).append(name)
    return out
