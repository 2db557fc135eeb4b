"""Can the data pipeline feed a GPU?  Images per second of the training-batch pipeline, measured four ways.

    python benchmarks/data_feed.py --config configs/tiny_gen3_stage1.json [--workers 14] [--seconds 10]
        [--device cuda]

1. one process rendering + collating batches (images/s per core),
2. ``--workers`` processes doing the same side by side, returning nothing (the CPUs' aggregate),
3. a ``torch.utils.data.DataLoader`` with ``--workers`` workers, as training uses it (the aggregate after the
   batches are handed to the main process through shared memory),
4. with ``--device``: training steps (forward, backward, AdamW) on one cached batch — the model's own limit,
5. with ``--device``: the training loop itself, steps on the batches the ``--workers`` workers deliver, once with
   torch's default thread count in the main process and once with ``main_process_threads`` (the cores the workers
   leave) — what a run gets, and whether the main process's threads fighting the workers for cores slow it.
Each part runs for about ``--seconds``; one JSON line per part.  Where 3 falls far below 2, the hand-over is the
bottleneck; where 2 is far below ``workers ×`` 1, the CPUs are (or are shared); where 5 falls far below both 3
and 4, the two starve each other.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time

import torch


def _batches(config_path: str, batch_size: int):
    from navil_utils.tiny.train import StepBatches, TrainConfig, _tokenizer_for

    values = json.loads(open(config_path, encoding="utf-8").read())
    values.update(out="/tmp/data_feed", init_from=None, batch_size=batch_size, total_steps=100_000)
    config = TrainConfig.from_dict(values)
    tokenizer, _ = _tokenizer_for(config)
    return config, tokenizer, StepBatches(config, tokenizer)


def _render_for(args: tuple[str, int, float, int]) -> int:
    config_path, batch_size, seconds, offset = args
    torch.set_num_threads(1)
    _, _, batches = _batches(config_path, batch_size)
    batches[offset + 99_999]                       # warm-up (fonts, tokenizer caches) outside the timing
    start, images, step = time.perf_counter(), 0, offset
    while time.perf_counter() - start < seconds:
        batches[step]
        images += batch_size
        step += 1
    return images


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch, device: torch.device) -> float:
    """One forward, backward and AdamW step on a batch already on ``device``; waits for the device (returns the loss)."""
    from navil_utils.tiny.train import _autocast

    with _autocast(device):
        loss = model(**batch.model_inputs()).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny_gen3_stage1.json")
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    report = lambda **k: print(json.dumps(k), flush=True)  # noqa: E731
    start = time.perf_counter()
    images = _render_for((args.config, args.batch_size, args.seconds, 0))
    report(part="one process", images_per_s=round(images / (time.perf_counter() - start), 1))
    with multiprocessing.get_context("fork").Pool(args.workers) as pool:
        start = time.perf_counter()
        counts = pool.map(_render_for, [(args.config, args.batch_size, args.seconds, 1000 * i)
                                        for i in range(args.workers)])
        wall = time.perf_counter() - start
    report(part=f"{args.workers} processes", images_per_s=round(sum(counts) / wall, 1), wall_s=round(wall, 1))
    from navil_utils.tiny.train import _worker_init

    config, tokenizer, batches = _batches(args.config, args.batch_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                         sampler=range(100_000), worker_init_fn=_worker_init, prefetch_factor=4)
    start, images, first = time.perf_counter(), 0, None
    for batch in loader:
        images += args.batch_size
        first = first or time.perf_counter() - start
        if time.perf_counter() - start > args.seconds + first:
            break
    wall = time.perf_counter() - start
    report(part=f"DataLoader, {args.workers} workers", images_per_s=round((images - args.batch_size) / (wall - first), 1),
           first_batch_s=round(first, 1), batch_mb=round(sum(t.numel() * t.element_size() for t in (
               batch.pixel_values, batch.input_ids, batch.labels, batch.attention_mask)) / 1e6, 1))
    del loader
    if args.device:
        from navil_utils.tiny.train import build_model

        device = torch.device(args.device)
        model = build_model(config, tokenizer).to(device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = batches[0].to(device)
        times = []
        for i in range(12):
            tick = time.perf_counter()
            _train_step(model, optimizer, batch, device)
            times.append(time.perf_counter() - tick)
        step_s = sorted(times[2:])[len(times[2:]) // 2]
        report(part=f"training step on {args.device}", median_step_s=round(step_s, 4),
               images_per_s=round(args.batch_size / step_s, 1))
        from navil_utils.tiny.train import main_process_threads

        default_threads = torch.get_num_threads()
        for threads in (default_threads, main_process_threads(device, args.workers, None) or default_threads):
            torch.set_num_threads(threads)
            loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=args.workers,
                                                 sampler=range(1, 100_000), worker_init_fn=_worker_init,
                                                 prefetch_factor=4)
            start, steps, first = time.perf_counter(), 0, None
            for batch in loader:
                _train_step(model, optimizer, batch.to(device), device)
                if first is None:
                    first, start = time.perf_counter() - start, time.perf_counter()
                    continue
                steps += 1
                if time.perf_counter() - start > args.seconds:
                    break
            wall = time.perf_counter() - start
            report(part=f"training loop, {args.workers} workers, {threads} main-process threads",
                   images_per_s=round(steps * args.batch_size / wall, 1), step_s=round(wall / max(1, steps), 4))
            del loader
        torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()
