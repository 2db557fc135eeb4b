"""A text-only pretrained LLM for the initialisation ablation (paper Fig. 2, in miniature).

NaViL starts its LLM from a text-pretrained checkpoint (InternLM2-Base) and the paper shows that a model
trained from scratch needs far more image–caption data to reach the same loss.  The miniature of that
choice: before the multimodal run, the decoder alone is trained as a language model on caption *text*
(no image, no visual token) from a data seed disjoint from the multimodal training and evaluation seeds;
then its weights initialise the NaViL's LLM, and every visual expert starts as a copy of its text expert
(as Mono-InternVL, whose MoE recipe NaViL follows, initialises the visual experts).  The ViT and the
connector stay randomly initialised.

    model = build_model(config, tokenizer)                      # a fresh NaViL
    seconds = pretrain_language_model(model, collator, samples=65536, seed=0)
    copy_text_experts_to_visual(model)
"""
from __future__ import annotations

import time
from typing import Any

import torch

#: Data seed of the caption text (multimodal training uses 1, periodic evaluation 7).
TEXT_DATA_SEED = 11


def caption_token_ids(collator: Any, samples: int, seed: int = TEXT_DATA_SEED, start: int = 0) -> list[list[int]]:
    """Token ids of ``samples`` text-only caption turns: the chat prompt without the image, then the caption.

    The sequence is what a NaViL sees around the image span: ``collator.prefix_ids`` + the question
    ``Describe the image.`` + the caption and ``<|im_end|>``.
    """
    from navil_utils.tiny.synthetic import TEMPLATES, SyntheticVQA

    data = SyntheticVQA(seed=seed, question_types=("caption",))
    question = collator.prefix_ids + collator.question_ids(TEMPLATES["caption"])
    return [question + collator.answer_ids(data.sample(start + i).caption) for i in range(samples)]


def language_model_loss(model: Any, batch: list[list[int]]) -> torch.Tensor:
    """Mean next-token cross-entropy of the NaViL's decoder on right-padded text ``batch`` (no image)."""
    length = max(len(ids) for ids in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for row, seq in enumerate(batch):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    llm = model.language_model
    out = llm(inputs_embeds=llm.get_input_embeddings()(ids), attention_mask=mask)
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels.flatten())


def pretrain_language_model(model: Any, collator: Any, *, samples: int, seed: int = 0, batch_size: int = 64,
                            lr: float = 2e-3, warmup_steps: int = 16) -> dict[str, float]:
    """Train ``model.language_model`` (text path only) on ``samples`` caption texts, in place.

    AdamW (β = 0.9/0.98, weight decay 0.01 on matrices), linear warm-up then constant ``lr``, gradient
    clipping at 1; seeded by ``seed`` on a forked RNG.  Returns ``{"text_loss_first", "text_loss_last",
    "seconds"}`` (mean loss of the first and last 10 steps, wall time).
    """
    from navil_utils.tiny.train import no_weight_decay

    texts = caption_token_ids(collator, samples)
    llm = model.language_model
    params = [(n, p) for n, p in llm.named_parameters()]
    exempt = no_weight_decay(llm)
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params if n not in exempt], "weight_decay": 0.01},
                                   {"params": [p for n, p in params if n in exempt], "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))
    losses: list[float] = []
    start = time.perf_counter()
    llm.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for first in range(0, samples - batch_size + 1, batch_size):
            loss = language_model_loss(model, texts[first:first + batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    if not losses:
        raise ValueError(f"samples={samples} is less than one batch of {batch_size}")
    tail = max(1, min(10, len(losses) // 2))
    return {"text_loss_first": sum(losses[:tail]) / tail, "text_loss_last": sum(losses[-tail:]) / tail,
            "seconds": time.perf_counter() - start}


@torch.no_grad()
def copy_text_experts_to_visual(model: Any) -> int:
    """Set every visual-expert weight (``*_ve``) of the LLM to its text expert's; return how many tensors.

    For InternLM2-VE the visual output projection ``wo_ve`` is applied *after* ``wo`` (see
    :mod:`navil_utils.models.internlm2_ve`), so there it starts as the identity instead of a copy.
    """
    state = model.language_model.state_dict()
    copied = 0
    for name, tensor in state.items():
        if "_ve." not in name:
            continue
        if name.endswith("wo_ve.weight"):
            tensor.copy_(torch.eye(*tensor.shape, dtype=tensor.dtype))
        elif name.endswith("wo_ve.bias"):
            tensor.zero_()
        else:
            tensor.copy_(state[name.replace("_ve.", ".")])
        copied += 1
    return copied
