"""What the tiny NaViL's encoder *can* learn about each object when told directly — no language model involved.

The encoder (ViT + pixel shuffle + connector ``mlp1``) of a freshly initialised tiny NaViL is trained with the
auxiliary token heads alone (:class:`~navil_utils.tiny.objectives.TokenHeads`: each visual token predicts the kind,
colour and glyph of the object whose centre it covers, :mod:`navil_utils.tiny.token_targets`), on the synthetic
task's images. Held-out accuracy per target after a fixed budget measures the capacity and learning speed of an
encoder shape (patch size, merge size, width) for what the task asks, at a fraction of a full run's cost: a
choice between encoders is made here before a full training run is spent on one.

    python -m navil_utils.tiny.encoder_capacity --model '{"patch_size": 8, "merge_size": 4}' \\
        --steps 300 --out runs/encoder_capacity/p8m4.jsonl

Each evaluation is one JSON line (step, images seen, minutes, accuracy per target over the held-out tokens that
have a target — ``acc_<target>`` over every scale, ``acc_<target>_full`` over the full-resolution scale only,
``acc_{kind,color}_full_{small,medium,large}`` by shape size, :data:`SIZE_BUCKETS`);
the file is appended to as the run goes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from navil_utils.errors import ConfigError, NaViLError
from navil_utils.paths import repo_root
from navil_utils.tiny.token_targets import TOKEN_TARGETS


#: Shape-size buckets of the full-resolution evaluation (longer box side in px, half-open ranges).
SIZE_BUCKETS = {"small": (1, 24), "medium": (24, 33), "large": (33, 10_000)}


def _encoder_batches(model: Any, tokenizer: Any, data: Any, seed_offset: int, batch_size: int, *,
                     spread: bool = False):
    """``k → (pixel_values, image_grid_thw, targets, sizes)`` of images ``offset + k·B …``, both per visual token
    in visual-token (window) order: targets (:func:`~navil_utils.tiny.token_targets.token_targets`, ``spread`` as
    there) and sizes: -1 off the full-resolution scale, else the size (longer box side, px) of the shape centred
    in the token, 0 for none."""
    from navil_utils.models.vision import window_layout
    from navil_utils.tiny.data import TinyCollator
    from navil_utils.tiny.token_targets import longer_side, shape_tokens, target_classes, token_targets

    classes = target_classes(data.config)
    collator = TinyCollator.from_model_config(model.config, tokenizer)
    merge, window = model.config.merge_size, model.config.vision_config.window_size

    def batch(k: int):
        samples = [data.sample(seed_offset + k * batch_size + j) for j in range(batch_size)]
        pixel_values, grids_of, targets, sizes = [], [], [], []
        for sample in samples:                         # the images only: the encoder never reads the text
            _, patches, grids = collator.image_inputs(sample.image)
            pixel_values.append(patches)
            grids_of.append(grids)
            targets.append(token_targets(sample, grids, classes, merge_size=merge, spread=spread))
            for scale, (t, h, w) in enumerate(grids.tolist()):
                size = torch.full((t, h // merge, w // merge), -1, dtype=torch.long)
                if scale == len(grids) - 1:               # each image's last, largest scale: full resolution
                    size[:] = 0
                    for obj, row, col in shape_tokens(sample, h // merge, w // merge):
                        size[:, row, col] = longer_side(obj)
                sizes.append(size.reshape(-1))
        image_grid_thw = torch.cat(grids_of)
        order = window_layout(image_grid_thw, merge, window).window_index
        return torch.cat(pixel_values), image_grid_thw, torch.cat(targets)[order], torch.cat(sizes)[order]

    return batch


class _BatchesByIndex(torch.utils.data.Dataset):
    """``dataset[k]`` = ``make_batch(k)`` for ``k < length``: the training batches, rendered by data-loader workers."""

    def __init__(self, make_batch: Callable[[int], tuple[torch.Tensor, ...]], length: int) -> None:
        self.make_batch, self.length = make_batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        return self.make_batch(k)


def encoder_capacity(model_options: dict[str, Any] | None = None, *, steps: int = 300, batch_size: int = 32,
                     lr: float = 1e-3, warmup_steps: int = 30, seed: int = 0, data_seed: int = 1,
                     eval_seed: int = 7, eval_images: int = 256, eval_every: int = 100,
                     data: dict[str, Any] | None = None, train_data: dict[str, Any] | None = None,
                     spread_targets: bool = False, train_targets: tuple[str, ...] = TOKEN_TARGETS,
                     target_weights: dict[str, float] | None = None, save: str | Path | None = None,
                     device: str = "cpu", num_workers: int = 0, time_limit_minutes: float | None = None,
                     on_eval: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train a fresh encoder (``model_options``: overrides of
    :func:`~navil_utils.models.presets.tiny_model_config`) with the token heads alone for ``steps`` steps of
    ``batch_size`` images (AdamW, linear warm-up then cosine to 5 %); evaluate on ``eval_images`` images of
    ``eval_seed`` every ``eval_every`` steps and at the end. Returns the evaluation records (also passed to
    ``on_eval`` as they come). ``data`` overrides :class:`~navil_utils.tiny.synthetic.SyntheticConfig` for
    training and evaluation, ``train_data`` further overrides it for training only (e.g. simpler scenes, with
    the same classes). ``spread_targets`` trains on the spread targets (every token inside a shape's box
    is labelled); evaluation always reads the token at each object's centre. ``train_targets``: the targets whose
    loss trains the encoder (the others' heads are still evaluated, untrained); ``target_weights`` weight the
    trained targets' losses (``TrainConfig.token_loss_weights``; None = equal). ``save``: a directory the trained
    model is exported to at the end (:func:`~navil_utils.tiny.train.export_model`: the trained encoder with the
    language model as initialised, no token heads) — a training run's ``init_from``, i.e. encoder pretraining.
    ``device``: where the encoder trains (bf16 autocast on CUDA, as a training run); ``num_workers``: processes
    rendering the training batches (batch ``k`` is a pure function of ``k``, so the result does not depend on
    them); ``time_limit_minutes``: stop training after this much wall time (then evaluate and save as at the end).
    Deterministic for given arguments, device and thread count (and no time limit)."""
    import math

    from navil_utils.tiny.objectives import attach_token_heads
    from navil_utils.tiny.synthetic import SyntheticVQA
    from navil_utils.tiny.train import (TrainConfig, _autocast, _tokenizer_for, _worker_init, build_model,
                                        export_model, lr_factor, main_process_threads)

    if steps < 1 or batch_size < 1 or eval_images < 1 or eval_every < 1:
        raise ConfigError("steps, batch_size, eval_images and eval_every must be positive")
    unknown = set(train_targets) - set(TOKEN_TARGETS)
    if unknown or not train_targets:
        raise ConfigError(f"train_targets must be a non-empty subset of {TOKEN_TARGETS}, got {tuple(train_targets)}")
    # one mechanism for both: a target left out of train_targets has weight 0
    untrained = {target: 0.0 for target in TOKEN_TARGETS if target not in train_targets}
    weights = {**(target_weights or {}), **untrained} if target_weights or untrained else None
    data = dict(data or {})
    config = TrainConfig(tokenizer=str(repo_root() / "data/models/navil-tiny"), model=dict(model_options or {}),
                         data=data, seed=seed, total_steps=steps, warmup_steps=warmup_steps, min_lr_ratio=0.05,
                         token_loss_weights=weights, device=device, num_workers=num_workers)
    config.validate()  # the weights follow a training run's rule
    tokenizer, tokenizer_dir = _tokenizer_for(config)
    model = build_model(config, tokenizer)
    attach_token_heads(model, data, seed + 1)
    torch_device = torch.device(device)
    threads = main_process_threads(torch_device, num_workers, None)
    if threads:   # never more than the workers leave free; an explicit smaller --threads stays
        torch.set_num_threads(min(threads, torch.get_num_threads()))
    model = model.to(torch_device)
    encoder = torch.nn.ModuleDict({"vision_model": model.vision_model, "mlp1": model.mlp1,
                                   "token_heads": model.token_heads})
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(config, step))
    train_set = SyntheticVQA(data_seed, **{**data, **(train_data or {})})
    train_batch = _encoder_batches(model, tokenizer, train_set, 0, batch_size, spread=spread_targets)
    eval_batch = _encoder_batches(model, tokenizer, SyntheticVQA(eval_seed, **data), 0, min(batch_size, eval_images))
    eval_batches = [tuple(x.to(torch_device) for x in eval_batch(k))
                    for k in range(math.ceil(eval_images / min(batch_size, eval_images)))]
    loader = torch.utils.data.DataLoader(_BatchesByIndex(train_batch, steps), batch_size=None, num_workers=num_workers,
                                         worker_init_fn=_worker_init, prefetch_factor=4 if num_workers else None)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()

    def evaluate(step: int) -> None:
        model.eval()
        parts = {"": lambda size: size >= -1, "_full": lambda size: size >= 0}
        parts.update({f"_full_{name}": (lambda size, lo=lo, hi=hi: (size >= lo) & (size < hi))
                      for name, (lo, hi) in SIZE_BUCKETS.items()})
        correct = {(t, part): 0 for t in TOKEN_TARGETS for part in parts
                   if t != "glyph" or part in ("", "_full")}
        count = dict.fromkeys(correct, 0)
        with torch.no_grad(), _autocast(torch_device):
            for pixel_values, grid, targets, sizes in eval_batches:
                tokens = model.get_vision_outputs(pixel_values, grid).features
                for k, target in enumerate(TOKEN_TARGETS):
                    keep = targets[:, k] >= 0
                    hit = model.token_heads.logits(tokens[keep], target).argmax(-1) == targets[keep, k]
                    for part in (p for t, p in correct if t == target):
                        mask = parts[part](sizes[keep])
                        correct[target, part] += int((hit & mask).sum())
                        count[target, part] += int(mask.sum())
        record = {"step": step, "images": step * batch_size, "minutes": (time.perf_counter() - start) / 60,
                  "eval_tokens": {t + part: n for (t, part), n in count.items()},
                  **{f"acc_{t}{part}": correct[t, part] / max(1, n) for (t, part), n in count.items()}}
        records.append(record)
        if on_eval is not None:
            on_eval(record)
        model.train()

    model.train()
    for step, batch in enumerate(loader):
        pixel_values, grid, targets, _ = (x.to(torch_device) for x in batch)
        with _autocast(torch_device):
            loss, _ = model.token_heads(model.get_vision_outputs(pixel_values, grid).features, targets, weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        late = time_limit_minutes is not None and time.perf_counter() - start > 60 * time_limit_minutes
        if (step + 1) % eval_every == 0 or step + 1 == steps or late:
            evaluate(step + 1)
        if late:
            break
    if save is not None:
        export_model(model.to("cpu").eval(), tokenizer_dir, save)
        (Path(save) / "encoder_pretraining.json").write_text(json.dumps(
            {"model": dict(model_options or {}), "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
             "data_seed": data_seed, "data": data, "train_data": train_data or {}, "spread_targets": spread_targets,
             "train_targets": list(train_targets), "target_weights": target_weights, "last_eval": records[-1]},
            indent=1) + "\n", encoding="utf-8")
    return records


def crop_cnn_reference(*, train_images: int = 4000, eval_images: int = 400, epochs: int = 6, batch_size: int = 64,
                       lr: float = 1e-3, token_side: int = 32, seed: int = 0, data_seed: int = 1, eval_seed: int = 7,
                       data: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The reference point of :func:`encoder_capacity`: a small CNN (three 3 × 3 conv layers, 32–64 channels,
    ReLU, two max-pools, global average pool, linear) trained to name the kind of each shape from the pixels of
    the ``token_side``-px full-resolution token at its centre — the very crop an LLM token of the tiny NaViL
    shows. Adam, ``epochs`` passes over the shapes of ``train_images`` images; held-out accuracy (overall and
    by :data:`SIZE_BUCKETS`) after each epoch."""
    import numpy as np

    from navil_utils.tiny.synthetic import SyntheticVQA
    from navil_utils.tiny.token_targets import longer_side, shape_tokens, target_classes

    data = dict(data or {})
    kinds = target_classes(SyntheticVQA(data_seed, **data).config)["kind"]

    def crops(data_seed_: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dataset, pixels, labels, sizes = SyntheticVQA(data_seed_, **data), [], [], []
        for index in range(n):
            sample = dataset.sample(index)
            width, height = sample.size
            image = np.asarray(sample.image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
            for obj, row, col in shape_tokens(sample, height // token_side, width // token_side):
                crop = image[row * token_side:(row + 1) * token_side, col * token_side:(col + 1) * token_side]
                pixels.append(crop.transpose(2, 0, 1))
                labels.append(kinds.index(obj.kind))
                sizes.append(longer_side(obj))
        return torch.from_numpy(np.stack(pixels)), torch.tensor(labels), torch.tensor(sizes)

    train_x, train_y, _ = crops(data_seed, train_images)
    test_x, test_y, test_size = crops(eval_seed, eval_images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(64, len(kinds)))
        generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    records = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            loss = torch.nn.functional.cross_entropy(net(train_x[chosen]), train_y[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            hit = (net(test_x).argmax(-1) == test_y).float()
        record = {"epoch": epoch, "shapes_seen": epoch * len(train_y), "test_shapes": len(test_y),
                  "acc_kind": float(hit.mean())}
        for name, (lo, hi) in SIZE_BUCKETS.items():
            mask = (test_size >= lo) & (test_size < hi)
            record[f"acc_kind_{name}"] = float(hit[mask].mean()) if bool(mask.any()) else None
        records.append(record)
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m navil_utils.tiny.encoder_capacity",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="{}", help="JSON overrides of tiny_model_config (e.g. patch_size)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default="{}", help="JSON SyntheticConfig overrides for training and evaluation")
    parser.add_argument("--train-data", default="{}", help="JSON SyntheticConfig overrides for training only")
    parser.add_argument("--train-targets", default=",".join(TOKEN_TARGETS),
                        help="comma-separated targets whose loss trains the encoder (default: all)")
    parser.add_argument("--target-weights", default=None,
                        help='JSON {target: weight} for the trained targets\' losses, e.g. \'{"color": 0.1}\'')
    parser.add_argument("--spread-targets", action="store_true", help="train on every token inside a shape's box")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (bf16 autocast)")
    parser.add_argument("--workers", type=int, default=0, help="data-loader processes rendering the training batches")
    parser.add_argument("--time-limit", type=float, default=None, help="minutes of training before evaluate-and-stop")
    parser.add_argument("--crop-cnn", action="store_true",
                        help="run crop_cnn_reference instead (a small CNN on each shape's 32-px token crop)")
    parser.add_argument("--save", default=None,
                        help="export the trained model here (a training run's init_from: encoder pretraining)")
    parser.add_argument("--out", required=True, help="JSON-lines file the evaluations are appended to")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        options, data, train_data = json.loads(args.model), json.loads(args.data), json.loads(args.train_data)
        train_targets = tuple(t.strip() for t in args.train_targets.split(",") if t.strip())
        target_weights = json.loads(args.target_weights) if args.target_weights else None
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(record: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
            line = {**(settings if settings is not None else {
                "model": options, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                "spread_targets": args.spread_targets, **({"data": data} if data else {}), "train_data": train_data,
                "train_targets": train_targets, **({"target_weights": target_weights} if target_weights else {})}),
                **record}
            with out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)

        if args.crop_cnn:
            for record in crop_cnn_reference(seed=args.seed, lr=args.lr, data=data):
                write(record, {"reference": "crop_cnn", "lr": args.lr, "seed": args.seed})
            return 0
        encoder_capacity(options, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         eval_images=args.eval_images, eval_every=args.eval_every, seed=args.seed,
                         data=data, train_data=train_data, spread_targets=args.spread_targets, train_targets=train_targets,
                         target_weights=target_weights, save=args.save, device=args.device,
                         num_workers=args.workers, time_limit_minutes=args.time_limit, on_eval=write)
    except (NaViLError, json.JSONDecodeError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
