"""The project's own copy of the catalog: every mechanism attnzoo ships or plans to ship.

One taxonomy: the catalog's sections ARE the registry's families (:data:`attnzoo.registry.FAMILIES`),
each titled by :data:`FAMILY_TITLES` and kept in a folder by :data:`FAMILY_FOLDERS`. A built
mechanism takes its section from its registered family; a planned one from the family listed here.
The README's catalog table is generated from this list and the registry
(``python scripts/gen_catalog.py``); tests check that the README is current and that folders,
families and sections agree (``tests/test_readme.py``, ``tests/test_layout.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from attnzoo.registry import FAMILIES

__all__ = [
    "CATALOG",
    "FAMILY_FOLDERS",
    "FAMILY_TITLES",
    "CatalogEntry",
    "render_catalog_table",
    "update_readme",
]

#: The catalog section (and README heading) of each registry family.
FAMILY_TITLES: dict[str, str] = {
    "sequence": "Sequence attention",
    "gating": "Channel and spatial gating",
    "non_local": "Pairwise attention over positions: non-local family",
    "conv_attention": "Attention as convolution",
    "graph": "Graph attention",
}

#: The sub-package of ``attnzoo`` that holds each family's files. Sequence modules take (B, N, D)
#: channels-last inputs; vision modules (B, C, ...) channels-first maps; graph modules node features.
FAMILY_FOLDERS: dict[str, str] = {
    "sequence": "sequence",
    "gating": "vision",
    "non_local": "vision",
    "conv_attention": "vision",
    "graph": "graph",
}


class CatalogEntry(NamedTuple):
    name: str
    family: str
    mechanism: str

    @property
    def section(self) -> str:
        """The catalog section: the title of the family."""
        return FAMILY_TITLES[self.family]


# Each family's rows in catalog order. A built mechanism must be listed under its registered family
# (tests/test_layout.py checks it); a planned one is listed where it will be registered.
_ROWS: dict[str, list[tuple[str, str]]] = {
    "sequence": [
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
        ("bilinear_attention", "bilinear attention networks"),
        ("feature_bank", "long-term feature bank operator"),
    ],
    "gating": [
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
    "non_local": [
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
        ("co_attention", "co-attention between two feature maps (COSNet)"),
        ("cross_attention_module", "cross attention module for few-shot classification (CAN)"),
        ("dgmn", "dynamic graph message passing"),
        ("spygr", "spatial pyramid graph reasoning"),
    ],
    "conv_attention": [
        ("aa_conv", "attention-augmented convolution"),
        ("sasa", "stand-alone local self-attention"),
        ("san", "SAN pairwise and patchwise self-attention"),
        ("local_relation", "local relation layer"),
        ("carafe", "content-aware reassembly of features"),
        ("conv_as_attention", "self-attention that reproduces a convolution"),
    ],
    "graph": [
        ("graph_self_attention", "graph self-attention (BP-Transformer)"),
    ],
}

assert tuple(_ROWS) == FAMILIES == tuple(FAMILY_TITLES) == tuple(FAMILY_FOLDERS), "one taxonomy"

CATALOG: tuple[CatalogEntry, ...] = tuple(
    CatalogEntry(name, family, mechanism) for family, rows in _ROWS.items() for name, mechanism in rows
)


def render_catalog_table(docs_prefix: str = "docs/") -> str:
    """The catalog table: one section per registry family, every catalog name in it.

    A registered mechanism is listed under its registered family, whatever the catalog says (the
    layout test holds the two equal); a planned one under its catalog family.

    Args:
        docs_prefix: the path from the page holding the table to ``docs/`` (``"docs/"`` in the
            README, ``""`` in ``docs/catalog.md``).
    """
    from attnzoo.registry import specs

    registered = specs()
    lines = [
        "| name | mechanism | paper | status |",
        "|---|---|---|---|",
    ]
    for family in FAMILIES:
        entries = [
            e for e in CATALOG if (registered[e.name].family if e.name in registered else e.family) == family
        ]
        if not entries:
            continue
        lines.append(f"| **{FAMILY_TITLES[family]}** | | | |")
        for entry in entries:
            spec = registered.get(entry.name)
            if spec is None:
                lines.append(f"| `{entry.name}` | {entry.mechanism} | | planned |")
                continue
            paper = f"[{spec.paper.cite()}]({spec.paper.url})" if spec.paper.url else spec.paper.cite()
            docs = f"[implemented]({docs_prefix}mechanisms/{entry.name}.md)"
            lines.append(f"| `{entry.name}` | {entry.mechanism} | {paper} | {docs} |")
    return "\n".join(lines)


START_MARKER = "<!-- catalog:start (generated by scripts/gen_catalog.py; do not edit) -->"
END_MARKER = "<!-- catalog:end -->"


def update_readme(text: str, docs_prefix: str = "docs/") -> str:
    """``text`` with the part between the catalog markers replaced by the current table.

    The README passes the default; ``docs/catalog.md`` (the site's copy) passes ``docs_prefix=""``.
    """
    start, end = text.index(START_MARKER), text.index(END_MARKER)
    table = render_catalog_table(docs_prefix)
    return text[: start + len(START_MARKER)] + "\n" + table + "\n" + text[end:]
