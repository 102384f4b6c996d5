"""The supervised warm start: the loss of a right-padded batch, and the learning-rate schedule's ends."""

from __future__ import annotations

import pytest
import torch

from m2flow.training.sft import collate, sft_loss, sft_train, tokenize_pairs


def test_sft_loss_without_mask_equals_masked_attention_loss(tokenizer, make_micro_model):
    model = make_micro_model(seed=3)
    pairs = [("<|user|>Compute 1+2.<|end|><|assistant|>", "\\boxed{3}"),
             ("<|user|>Ann has 12 cards and buys 4 more. How many now?<|end|><|assistant|>", "Steps:\n12+4=16\n\\boxed{16}")]
    input_ids, mask, labels = collate(tokenize_pairs(tokenizer, pairs), tokenizer.pad_token_id)
    assert mask[0].sum() < mask[1].sum()  # the first row is padded on the right
    logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    assert sft_loss(model, input_ids, mask, labels).item() == pytest.approx(reference.item(), abs=1e-6)
    with pytest.raises(AssertionError, match="right-padded"):
        sft_loss(model, input_ids, mask.flip(1), labels)


def test_sft_schedule_decays_to_final_fraction(tokenizer, make_micro_model):
    model = make_micro_model(seed=0)
    lrs = []
    pairs = [("<|user|>Compute 1+2.<|end|><|assistant|>", "\\boxed{3}")] * 4
    steps = 20
    original = torch.optim.lr_scheduler.LambdaLR.step

    def record(self, *args, **kwargs):
        lrs.append(self.optimizer.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.lr_scheduler.LambdaLR.step = record
    try:
        losses = sft_train(model, tokenizer, pairs, steps=steps, batch_size=2, lr=1e-2, warmup=5,
                           final_lr_fraction=0.0, progress=False)
    finally:
        torch.optim.lr_scheduler.LambdaLR.step = original
    assert len(losses) == steps
    lrs = lrs[1:]  # the first call is LambdaLR's own, at construction; then lrs[s] is the lr of step s
    assert len(lrs) == steps
    assert lrs[4] == pytest.approx(1e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / steps)).item()), rel=1e-5)
    assert lrs[-1] == pytest.approx(1e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 19 / steps)).item()), rel=1e-5)
    assert lrs[0] == pytest.approx(1e-2 / 5, rel=1e-5)  # warmup: (0 + 1) / 5
