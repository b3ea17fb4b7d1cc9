import math

import pytest
import torch
from rpsft.core.losses import dft_loss, iw_loss, iw_weights, sft_loss, token_logprobs

# one sequence, vocab of 3, 4 positions -> 3 next-token predictions; the first is a prompt token (-100)
LOGITS = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0], [0.0, 0.0, 3.0], [9.0, 9.0, 9.0]]
LABELS = [0, -100, 1, 2]  # predictions: pos0 -> label -100 (masked), pos1 -> 1, pos2 -> 2
REF_LOGITS = [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def _p(row, target):
    return math.exp(row[target]) / sum(math.exp(x) for x in row)


def _inputs():
    return torch.tensor([LOGITS]), torch.tensor([LABELS]), torch.tensor([REF_LOGITS])


def test_sft_and_dft_match_hand_computation():
    logits, labels, _ = _inputs()
    logp, mask = token_logprobs(logits, labels)
    assert mask.tolist() == [[False, True, True]]
    p1, p2 = _p(LOGITS[1], 1), _p(LOGITS[2], 2)
    assert sft_loss(logp, mask).item() == pytest.approx(-(math.log(p1) + math.log(p2)) / 2, rel=1e-6)
    assert dft_loss(logp, mask).item() == pytest.approx(
        -(p1 * math.log(p1) + p2 * math.log(p2)) / 2, rel=1e-6
    )


def test_dft_gradient_treats_probability_as_constant():
    logits, labels, _ = _inputs()
    logits.requires_grad_(True)
    logp, mask = token_logprobs(logits, labels)
    dft_loss(logp, mask).backward()
    g_dft = logits.grad.clone()
    logits.grad = None
    logp, mask = token_logprobs(logits, labels)
    weights = logp.detach().exp()
    (-(weights * logp * mask).sum() / 2).backward()
    assert torch.allclose(g_dft, logits.grad)


def test_iw_weight_and_loss_match_hand_computation():
    logits, labels, ref_logits = _inputs()
    logp, mask = token_logprobs(logits, labels)
    ref_logp, _ = token_logprobs(ref_logits, labels)
    p1, p2 = _p(LOGITS[1], 1), _p(LOGITS[2], 2)
    r1, r2 = _p(REF_LOGITS[1], 1), _p(REF_LOGITS[2], 2)
    tau = 0.7
    w = math.exp(tau * ((math.log(p1) - math.log(r1)) + (math.log(p2) - math.log(r2))) / 2)
    assert iw_weights(logp, ref_logp, mask, tau=tau).item() == pytest.approx(w, rel=1e-6)
    expected = -w * (math.log(p1) + math.log(p2)) / 2
    assert iw_loss(logp, ref_logp, mask, tau=tau).item() == pytest.approx(expected, rel=1e-6)
    # the weight is clamped at 16
    assert iw_weights(logp, ref_logp - 100.0, mask, tau=1.0).item() == 16.0


def test_num_items_normalizes_across_microbatches():
    logits, labels, _ = _inputs()
    logp, mask = token_logprobs(logits, labels)
    assert sft_loss(logp, mask, num_items=4).item() == pytest.approx(
        sft_loss(logp, mask).item() / 2, rel=1e-6
    )


# ----------------------------------------------------------------------------- the label window of the loss


def test_label_window_starts_at_the_position_that_predicts_the_first_label():
    from rpsft.core.losses import label_window

    labels = torch.tensor([[-100, -100, -100, 5, 6], [-100, -100, 7, 8, -100]])
    assert label_window(labels) == 4  # row 1 scores position 2, predicted by position 1: keep 1..4
    assert label_window(torch.full((2, 5), -100)) == 5  # nothing scored: the whole sequence
    assert label_window(torch.tensor([[-100, 3, 4]])) == 3  # the first label predicted by position 0


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_windowed_logits_give_the_full_sequence_loss_and_gradient(arch):
    from rpsft.core.losses import causal_lm_logits
    from rpsft.core.models import tiny_model

    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=97, seed=1)
    input_ids = torch.randint(0, 97, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0  # a right-padded row
    labels = input_ids.clone()
    labels[0, :7] = -100
    labels[1, :5] = -100  # the earliest label: position 5, predicted by position 4
    labels[2, :8] = -100
    labels[2, 9:] = -100
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def loss_and_grad(windowed):
        model.zero_grad()
        if windowed:
            logits, window_labels = causal_lm_logits(model, batch)
            assert logits.shape[1] == window_labels.shape[1] == 12 - 4
        else:
            logits, window_labels = model(input_ids=input_ids, attention_mask=attention_mask).logits, labels
        logp, mask = token_logprobs(logits, window_labels)
        per_row = logp.sum(dim=1).detach().double()
        loss = sft_loss(logp, mask)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return per_row, int(mask.sum()), loss.item(), grads

    full, windowed = loss_and_grad(False), loss_and_grad(True)
    assert full[1] == windowed[1] == 5 + 7 + 1  # the same scored tokens
    assert torch.allclose(full[0], windowed[0], atol=1e-5)
    assert windowed[2] == pytest.approx(full[2], rel=1e-5)
    assert torch.allclose(full[3], windowed[3], atol=1e-6, rtol=1e-4)
