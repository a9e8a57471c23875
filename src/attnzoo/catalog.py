"""The project's own copy of the catalog: every mechanism attnzoo ships or plans to ship.

The README's catalog table is generated from this list and the registry
(``python scripts/gen_catalog.py``); a test checks that the two agree.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["CATALOG", "CatalogEntry"]


class CatalogEntry(NamedTuple):
    name: str
    section: str
    mechanism: str


_SECTIONS: dict[str, list[tuple[str, str]]] = {
    "Sequence attention": [
        ("attention", "generic soft addressing: dot, scaled_dot, cosine, general, additive, concat"),
        ("mha", "multi-head scaled dot-product attention"),
        ("bahdanau", "additive attention (RNNsearch)"),
        ("luong", "Luong global attention: dot, general, concat, location"),
        ("luong_local", "Luong local-m and local-p attention"),
        ("show_attend_tell", "soft and hard visual attention for captioning"),
        ("sha", "single-headed attention (SHA-RNN)"),
        ("linformer", "multi-head linear attention"),
        ("synthesizer", "dense and random synthesized attention"),
        ("gated_mha", "multi-head attention with hard-concrete head gates (prunable)"),
        ("graph_self_attention", "graph self-attention (BP-Transformer)"),
        ("bilinear_attention", "bilinear attention networks"),
        ("co_attention", "co-attention between two feature maps (COSNet)"),
        ("cross_attention_module", "cross attention module for few-shot classification (CAN)"),
    ],
    "Channel and spatial gating": [
        ("se", "squeeze-and-excitation"),
        ("eca", "efficient channel attention"),
        ("cbam_channel", "CBAM channel attention"),
        ("cbam_spatial", "CBAM spatial attention"),
        ("cbam", "CBAM: channel then spatial"),
        ("bam", "bottleneck attention module"),
        ("sk", "selective kernel"),
        ("split_attention", "ResNeSt split attention"),
        ("gc", "global context block"),
        ("scconv", "self-calibrated convolution (SCNet)"),
        ("sag_mask", "spatial attention-guided mask head (CenterMask)"),
    ],
    "Non-local family": [
        ("non_local", "non-local block, 1D/2D/3D"),
        ("sagan", "SAGAN self-attention"),
        ("dnl", "disentangled non-local"),
        ("double_attention", "A2-Nets double attention"),
        ("glore", "global reasoning unit"),
        ("criss_cross", "criss-cross attention (CCNet)"),
        ("danet", "dual attention: position and channel"),
        ("asymmetric_non_local", "asymmetric pyramid non-local (APNB, AFNB)"),
        ("cgnl", "compact generalized non-local"),
        ("psa", "point-wise spatial attention (PSANet)"),
        ("adaptive_context", "APCNet adaptive context module"),
        ("generalized_attention", "generalized attention, terms E1..E4"),
        ("feature_bank", "long-term feature bank operator"),
        ("dgmn", "dynamic graph message passing"),
        ("spygr", "spatial pyramid graph reasoning"),
    ],
    "Attention as convolution": [
        ("aa_conv", "attention-augmented convolution"),
        ("sasa", "stand-alone local self-attention"),
        ("san", "SAN pairwise and patchwise self-attention"),
        ("local_relation", "local relation layer"),
        ("carafe", "content-aware reassembly of features"),
        ("conv_as_attention", "self-attention that reproduces a convolution"),
    ],
}

CATALOG: tuple[CatalogEntry, ...] = tuple(
    CatalogEntry(name, section, mechanism) for section, rows in _SECTIONS.items() for name, mechanism in rows
)
