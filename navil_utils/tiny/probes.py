"""What the tiny model's visual tokens encode: linear and small-MLP probes on frozen features.

For held-out :class:`~navil_utils.tiny.synthetic.SyntheticVQA` images, every shape and every character of a
rendered text is matched to the visual token of the full-resolution scale that covers its centre (a merged
token covers ``patch × merge`` = 32 × 32 px there). Its features are read at four places:

* ``pixels`` — the raw pixels of that token's 32 × 32 region (what any encoder starts from);
* ``vit`` — the ViT's output for the token's 2 × 2 patch block, pixel-shuffled (the connector's input);
* ``llm_input`` — the connector's output: the visual token the LLM reads;
* ``random_vit`` — ``vit`` of a randomly initialised model of the same configuration (the control: what
  architecture alone, without training, makes readable).

Probed targets: a shape's ``kind`` and ``color``, and a character's ``glyph``. A probe is fitted on the objects
of the first images and scored on the others (split by image), so a probe cannot memorise an image.

    records = probe_records(model, tokenizer, SyntheticVQA(11), range(600))
    table = probe_table(records)           # accuracy per (target, feature, probe) with chance and counts
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from navil_utils.analysis.attention import TokenLayout
from navil_utils.errors import ConfigError
from navil_utils.tiny.synthetic import SyntheticVQA
from navil_utils.tiny.token_targets import TOKEN_TARGETS, object_points, target_classes, token_at

#: Where features are read (see the module docstring).
FEATURE_SITES = ("pixels", "vit", "llm_input", "random_vit")
#: What is probed (shapes: kind and colour; characters: glyph).
PROBE_TARGETS = TOKEN_TARGETS


@dataclass
class ProbeRecords:
    """Features and labels of probed objects: ``features[site]`` ``(N, D_site)`` float32, ``labels[target]``
    ``(N,)`` class index or -1 where the target does not apply (a character has no kind), ``image`` ``(N,)``
    the sample index of each object, ``classes[target]`` the class names."""

    features: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    image: torch.Tensor
    classes: dict[str, tuple[str, ...]]


def _random_twin(model: Any, seed: int) -> Any:
    """A model of the same configuration with freshly initialised weights (``seed``)."""
    torch.manual_seed(seed)
    twin = type(model)(copy.deepcopy(model.config))
    twin.set_special_token_ids(dict(model.special_token_ids))
    return twin.eval()


@torch.no_grad()
def probe_records(model: Any, tokenizer: Any, data: SyntheticVQA, indices: Iterable[int], *,
                  random_seed: int = 0) -> ProbeRecords:
    """Features at :data:`FEATURE_SITES` and labels of every shape and character of ``data[i]`` for ``i`` in
    ``indices`` (see the module docstring). ``random_seed`` initialises the ``random_vit`` control."""
    from navil_utils.tiny.data import TinyCollator

    collator = TinyCollator.from_model_config(model.config, tokenizer)
    patch, merge = model.config.vision_config.patch_size, collator.merge_size
    window = model.config.vision_config.window_size
    twin = _random_twin(model, random_seed)
    model.eval()
    classes = target_classes(data.config)
    features: dict[str, list[torch.Tensor]] = {site: [] for site in FEATURE_SITES}
    labels: dict[str, list[int]] = {target: [] for target in PROBE_TARGETS}
    images: list[int] = []
    for index in indices:
        sample = data.sample(int(index))
        encoded = collator.encode(sample, with_answers=False)
        grid = encoded.image_grid_thw
        if grid.shape[0] == 0:
            raise ConfigError(f"sample {index} has no image scale")
        _, grid_h, grid_w = (int(v) for v in grid[-1])
        width, height = sample.size
        if (grid_h * patch, grid_w * patch) != (height, width):
            raise ConfigError(f"the full-resolution scale of sample {index} is resized ({grid_w * patch}x"
                              f"{grid_h * patch} for a {width}x{height} image): raise the model's max_pixels")
        layout = TokenLayout.build(torch.tensor(encoded.input_ids), grid, dict(model.special_token_ids),
                                   merge_size=merge, window_size=window)
        last = (layout.scale == grid.shape[0] - 1) & (layout.visual_index >= 0)
        token_index = {(int(r), int(c)): int(v) for r, c, v in zip(layout.row[last], layout.col[last],
                                                                     layout.visual_index[last], strict=True)}
        trained = model.get_vision_outputs(encoded.pixel_values.to(model.dtype), grid)
        control = twin.get_vision_outputs(encoded.pixel_values.to(twin.dtype), grid)
        pixels = torch.from_numpy(np.asarray(sample.image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0)
        rows, cols = grid_h // merge, grid_w // merge
        side = patch * merge
        for targets, x, y in object_points(sample.objects):
            row, col = token_at(x, y, width, height, rows, cols)
            visual = token_index[(row, col)]
            features["pixels"].append(pixels[row * side:(row + 1) * side, col * side:(col + 1) * side].reshape(-1))
            features["vit"].append(trained.pixel_shuffled[visual].float())
            features["llm_input"].append(trained.features[visual].float())
            features["random_vit"].append(control.pixel_shuffled[visual].float())
            for target in PROBE_TARGETS:
                value = targets[target]
                labels[target].append(-1 if value is None else classes[target].index(value))
            images.append(int(index))
    if not images:
        raise ConfigError("the samples hold no object to probe")
    return ProbeRecords(features={site: torch.stack(rows) for site, rows in features.items()},
                        labels={target: torch.tensor(values) for target, values in labels.items()},
                        image=torch.tensor(images), classes=classes)


def fit_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
              n_classes: int, *, hidden: int = 0, epochs: int = 300, weight_decay: float = 1e-3,
              seed: int = 0) -> float:
    """Held-out accuracy of a probe fitted on standardised ``train_x`` ``(N, D)``: linear (``hidden=0``) or one
    hidden ReLU layer of ``hidden`` units; full-batch Adam for ``epochs`` steps, deterministic for ``seed``."""
    if len(train_y) == 0 or len(test_y) == 0:
        raise ConfigError("a probe needs training and test objects")
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        dim = train_x.shape[1]
        probe = nn.Linear(dim, n_classes) if hidden == 0 else nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
    optimizer = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            nn.functional.cross_entropy(probe(train_x), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe(test_x).argmax(-1) == test_y).float().mean())


def probe_table(records: ProbeRecords, *, sites: Sequence[str] = FEATURE_SITES, hidden: Sequence[int] = (0, 256),
                train_fraction: float = 0.7, epochs: int = 300, seed: int = 0):
    """Held-out probe accuracy per target × feature site × probe (``linear`` or ``mlp{hidden}``), with chance
    (the most frequent training class) and the object counts — a ``pandas.DataFrame``."""
    import pandas as pd

    unknown = set(sites) - set(records.features)
    if unknown:
        raise ConfigError(f"unknown feature sites {sorted(unknown)}; known: {sorted(records.features)}")
    images = torch.unique(records.image)
    cut = images[int(train_fraction * len(images))] if len(images) > 1 else images[0] + 1
    rows = []
    for target in PROBE_TARGETS:
        labels = records.labels[target]
        keep = labels >= 0
        train, test = keep & (records.image < cut), keep & (records.image >= cut)
        if int(train.sum()) == 0 or int(test.sum()) == 0:
            continue
        counts = torch.bincount(labels[train], minlength=len(records.classes[target]))
        chance = float((labels[test] == counts.argmax()).float().mean())
        for site in sites:
            x = records.features[site]
            for width in hidden:
                accuracy = fit_probe(x[train], labels[train], x[test], labels[test], len(records.classes[target]),
                                     hidden=width, epochs=epochs, seed=seed)
                rows.append({"target": target, "features": site, "probe": "linear" if width == 0 else f"mlp{width}",
                             "accuracy": accuracy, "chance": chance, "train": int(train.sum()),
                             "test": int(test.sum())})
    return pd.DataFrame(rows)


@torch.no_grad()
def position_readout(model: Any, tokenizer: Any, data: SyntheticVQA, indices: Iterable[int], *,
                     train_fraction: float = 0.7, ridge: float = 10.0):
    """How well a linear (ridge) probe reads a visual token's absolute place — its row and column as fractions of
    the full-resolution grid — from the LLM's hidden state of that token: at the LLM input and after every
    decoder layer. Held-out R² per (``site``, ``axis``), split by image — a ``pandas.DataFrame``.

    Neither position encoding hands a token its place: the ViT's 2-D RoPE is relative, the LLM's 1-D RoPE numbers
    the row-major sequence (so a row is a *run* of positions and a column is a position modulo the row length).
    Whatever a probe reads here the model computed itself."""
    import pandas as pd

    from navil_utils.tiny.data import TinyCollator

    collator = TinyCollator.from_model_config(model.config, tokenizer)
    window = model.config.vision_config.window_size
    model.eval()
    states: dict[int, list[torch.Tensor]] = {}
    places, images = [], []
    for index in indices:
        encoded = collator.encode(data.sample(int(index)), with_answers=False)
        grid = encoded.image_grid_thw
        layout = TokenLayout.build(torch.tensor(encoded.input_ids), grid, dict(model.special_token_ids),
                                   merge_size=collator.merge_size, window_size=window)
        last = ((layout.scale == grid.shape[0] - 1) & (layout.visual_index >= 0)).nonzero().squeeze(1)
        out = model(input_ids=torch.tensor([encoded.input_ids]), pixel_values=encoded.pixel_values.to(model.dtype),
                    image_grid_thw=grid, output_hidden_states=True)
        for depth, hidden in enumerate(out.hidden_states):
            states.setdefault(depth, []).append(hidden[0, last].float())
        rows, cols = (int(v) // collator.merge_size for v in grid[-1, 1:])
        places.append(torch.stack([(layout.row[last] + 0.5) / rows, (layout.col[last] + 0.5) / cols], -1))
        images += [int(index)] * len(last)
    if not images:
        raise ConfigError("position_readout needs at least one image")
    image = torch.tensor(images)
    distinct = torch.unique(image)
    train = image < distinct[min(int(train_fraction * len(distinct)), len(distinct) - 1)]
    target = torch.cat(places).double()
    rows = []
    for depth, chunks in states.items():
        x = torch.cat(chunks).double()
        x = (x - x[train].mean(0)) / x[train].std(0).clamp(min=1e-6)
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        gram = x[train].T @ x[train] + ridge * torch.eye(x.shape[1], dtype=x.dtype)
        weights = torch.linalg.solve(gram, x[train].T @ target[train])
        predicted = x[~train] @ weights
        for k, axis in enumerate(("row", "col")):
            truth = target[~train, k]
            r2 = 1 - float(((predicted[:, k] - truth) ** 2).mean() / truth.var(unbiased=False))
            rows.append({"site": "llm_input" if depth == 0 else f"after_layer_{depth}", "axis": axis, "r2": r2,
                         "train_tokens": int(train.sum()), "test_tokens": int((~train).sum())})
    return pd.DataFrame(rows)


@torch.no_grad()
def visual_token_geometry(model: Any, tokenizer: Any, data: SyntheticVQA, indices: Iterable[int]) -> dict[str, float]:
    """Scale and spread of the visual tokens the LLM receives (the connector's outputs) over the images
    ``indices`` of ``data``, next to the text tokens' input embeddings of the same prompts:

    * ``visual_norm`` / ``text_norm`` — mean L2 norm per token, and ``norm_ratio`` = visual / text;
    * ``mean_cosine`` — mean cosine similarity of all pairs of visual tokens (1 = every token points one way);
    * ``effective_rank`` — ``exp`` of the entropy of the normalised eigenvalues of the visual tokens' covariance
      (1 = all variance along one direction; at most the width; 0 if the tokens are all identical).

    A connector that inflates its outputs and collapses them onto one direction — the suspected cause of
    training stalls at high learning rates — shows as a large ``norm_ratio``, ``mean_cosine`` near 1 and a small
    ``effective_rank``."""
    from navil_utils.tiny.data import TinyCollator

    collator = TinyCollator.from_model_config(model.config, tokenizer)
    model.eval()
    embed = model.language_model.get_input_embeddings()
    image_ids = set(int(v) for v in model.special_token_ids.values())
    visual, text = [], []
    for index in indices:
        encoded = collator.encode(data.sample(int(index)), with_answers=False)
        visual.append(model.get_vision_outputs(encoded.pixel_values.to(model.dtype), encoded.image_grid_thw)
                      .features.float())
        ids = torch.tensor([i for i in encoded.input_ids if i not in image_ids])
        text.append(embed(ids).float())
    if not visual:
        raise ConfigError("visual_token_geometry needs at least one image")
    v, t = torch.cat(visual).double(), torch.cat(text).double()
    unit = v / v.norm(dim=1, keepdim=True).clamp(min=1e-12)
    n = len(unit)
    mean_cosine = float(((unit.sum(0) ** 2).sum() - n) / max(1, n * (n - 1)))
    eigenvalues = torch.linalg.eigvalsh(torch.cov(v.T)).clamp(min=0)
    if float(eigenvalues.sum()) > 0:
        p = eigenvalues / eigenvalues.sum()
        effective_rank = float(np.exp(-float((p[p > 0] * p[p > 0].log()).sum())))
    else:                                      # every visual token identical: no spread at all
        effective_rank = 0.0
    visual_norm, text_norm = float(v.norm(dim=1).mean()), float(t.norm(dim=1).mean())
    return {"visual_norm": visual_norm, "text_norm": text_norm, "norm_ratio": visual_norm / text_norm,
            "mean_cosine": mean_cosine, "effective_rank": effective_rank, "visual_tokens": n,
            "text_tokens": len(t)}


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m navil_utils.tiny.probes --model DIR --out FILE.csv [--positions | --geometry]``: the probe table
    of a checkpoint (or, with ``--positions``, its :func:`position_readout`; with ``--geometry``, its
    :func:`visual_token_geometry` appended to ``--out`` as a JSON line)."""
    import argparse

    import navil_utils

    parser = argparse.ArgumentParser(prog="python -m navil_utils.tiny.probes", description=main.__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--out", required=True, help="CSV file to write")
    parser.add_argument("--data-seed", type=int, default=11, help="SyntheticVQA seed of the probed images")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--positions", action="store_true",
                        help="instead: R² of reading each visual token's row and column (position_readout)")
    parser.add_argument("--geometry", action="store_true",
                        help="instead: norm, spread and effective rank of the visual tokens (visual_token_geometry); "
                             "--out gets one JSON line appended")
    args = parser.parse_args(argv)
    navil_utils.setup_notebook(seed=0, threads=args.threads)
    model, tokenizer = navil_utils.load_chat_model(args.model)
    if args.geometry:
        import json

        record = {"model": args.model, "images": args.images, "data_seed": args.data_seed,
                  **visual_token_geometry(model, tokenizer, SyntheticVQA(args.data_seed), range(args.images))}
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record))
        return
    if args.positions:
        table = position_readout(model, tokenizer, SyntheticVQA(args.data_seed), range(args.images))
        table.insert(0, "model", args.model)
        table.to_csv(args.out, index=False, float_format="%.4f")
        print(table.pivot_table(index="site", columns="axis", values="r2", sort=False).round(3).to_string())
        return
    records = probe_records(model, tokenizer, SyntheticVQA(args.data_seed), range(args.images))
    table = probe_table(records, epochs=args.epochs)
    table.insert(0, "model", args.model)
    table.to_csv(args.out, index=False, float_format="%.4f")
    print(table.pivot_table(index=["target", "probe"], columns="features", values="accuracy").round(3).to_string())


if __name__ == "__main__":
    main()
