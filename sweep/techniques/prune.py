"""Magnitude pruning: weights (l1) or whole output rows (l2) zeroed, per layer or globally; 2:4
semi-structured sparsity on CUDA."""

from __future__ import annotations

from .base import TARGETS, LAYER_TYPES, Param, RecipeError, Requires, Storage, Technique, technique


@technique("prune")
class PruneConfig(Technique):
    PARAMS = {
        "prune.rate": Param("float", 0.0, 0.0, 1.0, hi_open=True,
                            help="share of weights zeroed in the targeted layers; 0 = off"),
        # Single weights rank alike by |w| and w^2, so l2 means whole rows (torch ln_structured).
        "prune.norm": Param("choice", "l1", choices=("l1", "l2"), help="l1: single weights by "
                            "|w|; l2: whole output rows by L2 norm (ln_structured n=2, dim=0)"),
        "prune.scope": Param("choice", "layer", choices=("global", "layer"), help="layer: the "
                             "rate in each layer; global: one threshold (l2: rows by RMS)"),
        "prune.targets": Param("choice", "all", choices=TARGETS, help="all or a '+'-joined "
                               "subset of layer types; head is tied to the embeddings"),
        "prune.pattern": Param("choice", "unstructured", choices=("unstructured", "2:4"),
                               help="2:4 keeps the 2 largest of every 4 weights (rate 0.5)",
                               requires=(Requires(("2:4",), why="sparse kernels are CUDA-only"),)),
    }
    # Re-pruning 2:4 weights picks the same zeros again; it restores the sparse (CUDA) storage.
    STORAGE = Storage(True, lambda cfg: cfg.pattern == "2:4", "zeros saved in the weights"
                      " (2:4: also re-applied at load for the semi-structured sparse storage)")

    def _normalize(self):
        parts = set(self.targets.split("+")) if isinstance(self.targets, str) else set()
        if len(parts) > 1 and parts <= set(LAYER_TYPES):
            canon = "+".join(t for t in LAYER_TYPES if t in parts)
            object.__setattr__(self, "targets", "all" if canon == "+".join(LAYER_TYPES) else canon)

    def _check(self):
        got = (self.rate, self.norm, self.scope)
        if self.pattern == "2:4" and self.rate and got != (0.5, "l1", "layer"):
            raise RecipeError("`prune.rate`/`prune.norm`/`prune.scope` must be 0.5/l1/layer with "
                              f"prune.pattern='2:4' (2 of every 4 weights go), got {got}")

    def canonical(self):  # how to prune means nothing while nothing is pruned
        return self if self.rate > 0 else type(self)()

    layer_types = property(lambda self: LAYER_TYPES if self.targets == "all"
                           else tuple(self.targets.split("+")))

    def apply(self, model, ctx) -> None:
        from ..measure import structured
        from ..measure.compress import linear_sparsity, linears_of

        linears = linears_of(model, self.layer_types)
        structured.magnitude_prune(list(linears.values()), rate=self.rate, norm=self.norm,
                                   scope=self.scope, pattern=self.pattern)
        ctx.sparsity = linear_sparsity(model)  # before sparse storage or quantization hide zeros
        ctx.notes.append(f"{self.describe()}: {len(linears)} Linear layers")
        if "head" in self.layer_types:
            ctx.notes.append("prune: head is tied to the token embeddings; both are pruned")
        if self.pattern == "2:4":
            _semi_structured(linears, ctx)

    def describe(self) -> str:
        what = "2:4" if self.pattern == "2:4" else f"{self.norm} {self.rate:.2f}"
        return (f"prune {what}" + (" global" if self.scope == "global" else "")
                + ("" if self.targets == "all" else f" ({self.targets})"))


def _semi_structured(linears: dict, ctx) -> None:
    """Store 2:4-pruned weights in the sparse format (CUDA); layers quantized later stay dense."""
    import torch
    from torch import nn

    from ..measure.compress import layer_type_of

    plan = ctx.recipe.quant.by_layer_type()
    for name, lin in linears.items():
        if plan[layer_type_of(name)] != "none":
            continue
        try:
            sparse = torch.sparse.to_sparse_semi_structured(lin.weight.detach())
            lin.weight = nn.Parameter(sparse, requires_grad=False)
            ctx.kernels[layer_type_of(name)] = "semi-structured 2:4"
        except Exception as e:  # shape/dtype limits of the sparse kernels: keep dense zeros
            ctx.notes.append(f"prune 2:4: {name} kept dense ({type(e).__name__}: {e})")
