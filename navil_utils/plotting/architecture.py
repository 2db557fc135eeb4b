"""A schematic of NaViL's architecture drawn from a config (notebook 01; the paper's Fig. 8 in our drawing).

:func:`architecture_labels` reads every number from a :class:`~navil_utils.models.NaViLChatConfig`
(and the multi-scale plan of an example image); :func:`plot_architecture` draws them as boxes and
arrows with matplotlib patches only, so a tiny model draws its own numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

#: Fill colours of the schematic's boxes (vision side, connector, language side, the two experts).
ARCHITECTURE_COLOURS = {
    "image": "#f2f2f2",
    "vision": "#fde0c5",
    "connector": "#e5d8f0",
    "llm": "#dbe9f6",
    "text": "#6baed6",
    "visual": "#fb6a4a",
    "edge": "#333333",
}


@dataclass(frozen=True)
class ArchitectureLabels:
    """The numbers of one NaViL config, as drawn by :func:`plot_architecture`."""

    image_hw: tuple[int, int]
    scales: list  # ScaleInfo, smallest first
    patch_size: int
    merge_size: int
    vit_layers: int
    vit_width: int
    vit_heads: int
    vit_mlp: int
    window_attention: bool
    llm_name: str
    llm_layers: int
    llm_width: int
    llm_heads: int
    llm_kv_heads: int
    llm_mlp: int
    vocab_size: int
    visual_experts: bool

    @property
    def num_patches(self) -> int:
        return sum(s.num_patches for s in self.scales)

    @property
    def visual_tokens(self) -> int:
        return sum(s.visual_tokens for s in self.scales)


def architecture_labels(config, image_size: tuple[int, int] = (768, 1024)) -> ArchitectureLabels:
    """Collect the drawn numbers of ``config`` (a NaViL config or a model with ``.config``).

    ``image_size`` is ``(H, W)`` of the example image whose multi-scale plan
    (:func:`navil_utils.processing.multiscale.plan_multiscale` with the config's pixel budget) is drawn.
    """
    from navil_utils.plotting.preprocessing import has_window_attention
    from navil_utils.processing.multiscale import plan_multiscale
    from navil_utils.processing.processor import pixel_budget

    config = getattr(config, "config", config)
    vision, llm = config.vision_config, config.llm_config
    height, width = (int(v) for v in image_size)
    scales = plan_multiscale(height, width, **pixel_budget(config))
    arch = config.llm_architecture
    name = {"Qwen3VEForCausalLM": "Qwen3-VE", "InternLM2VEForCausalLM": "InternLM2-VE"}.get(arch, arch)
    kv_heads = getattr(llm, "num_key_value_heads", None) or llm.num_attention_heads
    return ArchitectureLabels(
        image_hw=(height, width), scales=list(scales), patch_size=int(vision.patch_size),
        merge_size=int(config.merge_size), vit_layers=int(vision.num_hidden_layers),
        vit_width=int(vision.hidden_size), vit_heads=int(vision.num_attention_heads),
        vit_mlp=int(vision.intermediate_size), window_attention=has_window_attention(vision),
        llm_name=name, llm_layers=int(llm.num_hidden_layers), llm_width=int(llm.hidden_size),
        llm_heads=int(llm.num_attention_heads), llm_kv_heads=int(kv_heads), llm_mlp=int(llm.intermediate_size),
        vocab_size=int(llm.vocab_size), visual_experts=bool(getattr(llm, "visual_experts", True)))


def _box(ax, x, y, w, h, colour, title, body="", *, title_size=9.0, body_size=7.5, rounding=0.08):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={rounding}",
                                facecolor=colour, edgecolor=ARCHITECTURE_COLOURS["edge"], linewidth=1.0))
    if body:
        ax.text(x + w / 2, y + h - 0.12, title, ha="center", va="top", fontsize=title_size, fontweight="bold")
        lines = title.count("\n") + 1
        ax.text(x + w / 2, y + h - 0.2 - 0.2 * lines * title_size / 9.0, body, ha="center", va="top",
                fontsize=body_size, linespacing=1.35)
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=title_size, fontweight="bold")


def _arrow(ax, start, end, label=None, *, colour=None, offset=0.12, size=7.0, style="-|>"):
    from matplotlib.patches import FancyArrowPatch

    colour = colour or ARCHITECTURE_COLOURS["edge"]
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=11, color=colour, linewidth=1.2,
                                 shrinkA=0, shrinkB=0))
    if label:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + offset, label, ha="center", va="bottom",
                fontsize=size, color="0.25")


def plot_architecture(config, image_size: tuple[int, int] = (768, 1024), ax=None, title: str | None = None):
    """Draw NaViL's architecture with the numbers of ``config`` for an ``image_size = (H, W)`` image.

    Left to right: the input image → its multi-scale pyramid (one nested box per scale, sizes and
    patch grids from :func:`~navil_utils.processing.multiscale.plan_multiscale`) → patch embedding
    (``p × p`` conv) → ViT (depth × width, heads, 2-D RoPE) → ``m × m`` pixel shuffle → MLP connector →
    the LLM with modality experts (depth × width; text expert / visual expert per layer).  Below, the
    token sequence: text tokens take the text expert, visual tokens the visual expert.  ``config`` is a
    :class:`~navil_utils.models.NaViLChatConfig` or a model; returns the axes.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    labels = architecture_labels(config, image_size)
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 5))
    colours = ARCHITECTURE_COLOURS
    p, m = labels.patch_size, labels.merge_size
    height, width = labels.image_hw
    mid = 3.35  # height of the main flow

    # 1. input image and 2. the multi-scale pyramid (nested boxes at relative size)
    _box(ax, 0.05, mid - 0.55, 1.05, 1.1, colours["image"], "image", f"{height}×{width} px")
    _arrow(ax, (1.1, mid), (1.4, mid))
    largest = labels.scales[-1].padded_hw
    unit = 1.45 / max(largest)
    for k, scale in enumerate(reversed(labels.scales)):
        hp, wp = scale.padded_hw
        shade = plt.get_cmap("Reds")(0.25 + 0.6 * (len(labels.scales) - 1 - k) / max(len(labels.scales) - 1, 1))
        ax.add_patch(Rectangle((1.45, mid + 0.75 - hp * unit), wp * unit, hp * unit, facecolor=shade,
                               edgecolor=colours["edge"], linewidth=0.8))
    noun = "scale" if len(labels.scales) == 1 else "scales"
    ax.text(1.45 + 0.725, mid + 0.85, f"pyramid: {len(labels.scales)} {noun}", ha="center", va="bottom",
            fontsize=9, fontweight="bold")
    rows = [f"{s.scale_index + 1}: {s.padded_hw[0]}×{s.padded_hw[1]} → {s.grid_thw[1]}×{s.grid_thw[2]}"
            for s in labels.scales]
    ax.text(1.45, mid - 0.8, "padded px → patches\n" + "\n".join(rows), ha="left", va="top", fontsize=7,
            family="monospace", linespacing=1.3)

    # 3. patch embedding, 4. ViT, 5. pixel shuffle, 6. connector
    _arrow(ax, (3.0, mid), (3.3, mid))
    _box(ax, 3.3, mid - 0.75, 1.25, 1.5, colours["vision"], "patch\nembedding",
         f"Conv2d {p}×{p}\n3 → {labels.vit_width}\n{labels.num_patches} patches", body_size=7.5)
    _arrow(ax, (4.55, mid), (4.85, mid))
    vit_body = (f"{labels.vit_layers} layers × {labels.vit_width}\n{labels.vit_heads} heads, 2-D RoPE\n"
                f"MLP {labels.vit_mlp}\n" + ("window + global attn" if labels.window_attention
                                            else "global attn per scale"))
    _box(ax, 4.85, mid - 1.0, 1.5, 2.0, colours["vision"], "ViT encoder", vit_body)
    _arrow(ax, (6.35, mid), (6.65, mid))
    _box(ax, 6.65, mid - 0.75, 1.2, 1.5, colours["connector"], f"{m}×{m} pixel\nshuffle",
         f"{labels.vit_width} → {labels.vit_width * m * m} ch\n"
         f"{labels.num_patches} → {labels.visual_tokens}\ntokens")
    _arrow(ax, (7.85, mid), (8.15, mid))
    _box(ax, 8.15, mid - 0.75, 1.2, 1.5, colours["connector"], "MLP\nconnector",
         f"LN, Linear\n{labels.vit_width * m * m} → {labels.llm_width}\nGELU, Linear")
    _arrow(ax, (9.35, mid), (9.6, mid))

    # 7. the LLM with modality experts
    x0, w = 9.6, 2.35
    _box(ax, x0, 1.05, w, 3.75, colours["llm"], f"LLM: {labels.llm_name}", rounding=0.1)
    ax.texts[-1].set_position((x0 + w / 2, 4.6))
    ax.texts[-1].set_va("top")
    ax.text(x0 + w / 2, 4.3, f"{labels.llm_layers} layers × {labels.llm_width}\n"
            f"{labels.llm_heads} heads ({labels.llm_kv_heads} KV)", ha="center", va="top", fontsize=7.5)
    _box(ax, x0 + 0.15, 2.75, w - 0.3, 0.7, "white", "self-attention",
         "q,k,v,o: text / visual" if labels.visual_experts else "shared q,k,v,o", title_size=7.5, body_size=7)
    if labels.visual_experts:
        half = (w - 0.4) / 2
        _box(ax, x0 + 0.15, 1.55, half, 0.95, colours["text"], "text\nexpert", f"FFN {labels.llm_mlp}",
             title_size=7.5, body_size=7)
        _box(ax, x0 + 0.25 + half, 1.55, half, 0.95, colours["visual"], "visual\nexpert", f"FFN {labels.llm_mlp}",
             title_size=7.5, body_size=7)
    else:
        _box(ax, x0 + 0.15, 1.55, w - 0.3, 0.95, colours["text"], "dense FFN", f"FFN {labels.llm_mlp}",
             title_size=7.5, body_size=7)
    ax.text(x0 + w / 2, 1.12, f"× {labels.llm_layers} layers", ha="center", va="bottom", fontsize=7.5,
            style="italic")
    _arrow(ax, (x0 + w / 2, 4.8), (x0 + w / 2, 5.15))
    ax.text(x0 + w / 2, 5.2, f"next token (vocab {labels.vocab_size:,})", ha="center", va="bottom", fontsize=7.5,
            color="0.25")

    # 8. tokens flowing into the LLM: text | <img> visual tokens </img> | text
    y = 0.25
    sequence = [("text", 5), ("tag", 1), ("visual", 10), ("tag", 1), ("text", 6)]
    cell, x = 0.22, 3.3
    for kind, count in sequence:
        for _ in range(count):
            face = {"text": colours["text"], "visual": colours["visual"], "tag": "#222222"}[kind]
            ax.add_patch(Rectangle((x, y), cell * 0.9, 0.3, facecolor=face, edgecolor="white", linewidth=0.5))
            x += cell
    ax.text(3.3 + 5 * cell + 11 * cell / 2 + cell, y + 0.38,
            f"<img> {labels.visual_tokens} visual tokens </img>", ha="center", va="bottom", fontsize=7.5)
    ax.text(3.3 - 0.1, y + 0.15, "token sequence", ha="right", va="center", fontsize=8, fontweight="bold")
    _arrow(ax, (8.75, mid - 0.75), (3.3 + 9 * cell, y + 0.3), colour=colours["visual"])
    _arrow(ax, (x + 0.05, y + 0.15), (x0 + 0.15 + (w - 0.4) / 4, 1.55), colour=colours["text"])
    _arrow(ax, (3.3 + 13 * cell, y + 0.3), (x0 + w - 0.15 - (w - 0.4) / 4, 1.55), colour=colours["visual"])
    ax.text(7.1, 1.25, "text → text expert\nvisual → visual expert" if labels.visual_experts
            else "every token → one FFN", ha="left", va="bottom", fontsize=7.5, color="0.25")

    ax.set_xlim(-0.05, 12.05)
    ax.set_ylim(0.0, 5.55)
    ax.set_aspect("auto")
    ax.axis("off")
    scales = f"{len(labels.scales)} {noun}"
    ax.set_title(title or f"NaViL architecture ({labels.llm_name} LLM): a {height}×{width} image → {scales}, "
                 f"{labels.visual_tokens} visual tokens", fontsize=11)
    return ax
