"""Pruning that changes shapes (FFN neurons really removed) and the masks of magnitude pruning."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as tprune


def ffn_importance(fc1: nn.Linear, fc2: nn.Linear) -> torch.Tensor:
    """Per hidden neuron: L2 norm of its fc1 row (with bias) and fc2 column together."""
    rows = torch.cat([fc1.weight, fc1.bias[:, None]], 1) if fc1.bias is not None else fc1.weight
    return (rows.float().pow(2).sum(1) + fc2.weight.float().pow(2).sum(0)).sqrt()


@torch.no_grad()
def _slice_linear(lin: nn.Linear, keep: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) `keep`."""
    w = lin.weight.index_select(dim, keep)
    new = nn.Linear(w.shape[1], w.shape[0], lin.bias is not None, device="meta")
    new.weight = nn.Parameter(w.clone())
    if lin.bias is not None:
        new.bias = nn.Parameter((lin.bias[keep] if dim == 0 else lin.bias).clone())
    return new


@torch.no_grad()
def shrink_ffn(model, rate: float, stacks=("encoder", "decoder")) -> list[str]:
    """Remove `rate` of the FFN neurons of every layer (lowest `ffn_importance`), the same count
    in each layer of a stack, and record the new widths in the config so that the result saves
    and loads with plain `from_pretrained`. Returns notes."""
    notes = []
    for stack_name in stacks:
        layers = getattr(model.model, stack_name).layers
        width = layers[0].fc1.out_features
        keep_n = width - int(round(rate * width))
        for layer in layers:
            keep = ffn_importance(layer.fc1, layer.fc2).topk(keep_n).indices.sort().values
            layer.fc1 = _slice_linear(layer.fc1, keep, 0)
            layer.fc2 = _slice_linear(layer.fc2, keep, 1)
        setattr(model.config, f"{stack_name}_ffn_dim", keep_n)
        notes.append(f"struct: {stack_name} FFN {width} -> {keep_n} neurons per layer")
    return notes


def mask_2_4(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 consecutive inputs (the semi-structured pattern)."""
    groups = weight.detach().abs().reshape(weight.shape[0], -1, 4)
    keep = groups.topk(2, dim=-1).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(weight.shape)


def global_row_masks(linears: list[nn.Linear], rate: float) -> list[torch.Tensor]:
    """Zero the `rate` share of all rows with the lowest RMS (L2 / sqrt(length)), compared
    across layers: raw L2 would favour removing the short rows of narrow layers."""
    scores = [lin.weight.detach().float().pow(2).mean(1).sqrt() for lin in linears]
    flat = torch.cat(scores)
    n_prune = int(round(rate * flat.numel()))
    if n_prune == 0:
        return [torch.ones_like(lin.weight, dtype=torch.bool) for lin in linears]
    cut = torch.zeros_like(flat, dtype=torch.bool)
    cut[flat.topk(n_prune, largest=False).indices] = True
    masks, start = [], 0
    for lin, s in zip(linears, scores):
        rows = ~cut[start:start + s.numel()]
        masks.append(rows[:, None].expand_as(lin.weight).clone())
        start += s.numel()
    return masks


def _each(prune_one):
    def run(linears, rate):
        for lin in linears:
            prune_one(lin, rate)
    return run


def _global_rows(linears, rate):
    for lin, mask in zip(linears, global_row_masks(linears, rate)):
        tprune.custom_from_mask(lin, "weight", mask)


# (pattern, norm, scope) -> pruner; the recipe refuses every other combination.
PRUNERS = {
    ("unstructured", "l1", "layer"): _each(lambda lin, r: tprune.l1_unstructured(lin, "weight", r)),
    ("unstructured", "l1", "global"): lambda linears, rate: tprune.global_unstructured(
        [(lin, "weight") for lin in linears], pruning_method=tprune.L1Unstructured, amount=rate),
    ("unstructured", "l2", "layer"): _each(
        lambda lin, r: tprune.ln_structured(lin, "weight", amount=r, n=2, dim=0)),
    ("unstructured", "l2", "global"): _global_rows,
    ("2:4", "l1", "layer"): _each(
        lambda lin, r: tprune.custom_from_mask(lin, "weight", mask_2_4(lin.weight))),
}


def magnitude_prune(linears: list[nn.Linear], *, rate: float, norm: str, scope: str,
                    pattern: str) -> None:
    """Zero weights in place via torch.nn.utils.prune, then make it permanent (prune.remove):
    weights are plain tensors with zeros afterwards, and tied weights stay tied."""
    PRUNERS[pattern, norm, scope](linears, rate)
    for lin in linears:
        tprune.remove(lin, "weight")
