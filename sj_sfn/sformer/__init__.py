"""SFormer: one-timestep ANN-to-SNN conversion of timm Vision Transformers with SFN sites.

    from sj_sfn import sformer
    snn = sformer.convert(vit, calib_loader, lam=0.25)      # timm ViT / DeiT / DINOv2-style / EVA-02
    for s in sformer.sites(snn, val_loader): print(s.name, s.kind, s.threshold, s.rate)
    sformer.set_lambda(snn, 0.2, kinds=["attn"])           # per-kind control, no recalibration
"""

from . import variants_more  # noqa: F401  (registers the hierarchical and hybrid attention families)
from .core import SITE_KINDS, Site, convert, is_sformer, prepare, set_lambda, set_max_spikes, site_modules, sites
from .modules import FIRE_PATHS, HeadSite, SFormerAttention, SFormerMlp, set_fire_path

__all__ = [
    "SITE_KINDS",
    "Site",
    "convert",
    "prepare",
    "sites",
    "site_modules",
    "set_lambda",
    "set_max_spikes",
    "is_sformer",
    "SFormerAttention",
    "SFormerMlp",
    "HeadSite",
    "FIRE_PATHS",
    "set_fire_path",
]
