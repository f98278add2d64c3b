"""Optimizer-aware targets: precondition gradients by an Adam/AdamW second moment (as in LESS).

Implementations: [`AdamPreconditioner`][gradalign.preconditioning.AdamPreconditioner], built from a ``torch.optim`` state with
[`AdamPreconditioner.from_optimizer`][gradalign.preconditioning.AdamPreconditioner.from_optimizer]. Passed to [`gradalign.GradAlign`][gradalign.selector.GradAlign] as
``preconditioner=``, it divides the validation gradient by ``sqrt(v_hat) + eps`` parameter by
parameter before the target is formed, so candidates are scored against the direction Adam would
actually move the weights in.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gradalign.errors import GradAlignError

__all__ = ["AdamPreconditioner"]


@dataclass(frozen=True, eq=False)
class AdamPreconditioner(Mapping[str, torch.Tensor]):
    """Per-parameter scales ``1 / (sqrt(v_hat) + eps)``, keyed by ``model.named_parameters()`` names.

    Parameters the optimizer has not stepped yet (no second moment) get no entry and are left
    unscaled.

    Attributes:
        scales: parameter name -> float32 tensor shaped like the parameter.

    Examples:
        >>> import torch, gradalign as ga
        >>> ro = ga.Rollouts.from_token_ids([[5, 6], [5, 6], [7, 8], [7, 8]],
        ...     [[9, 1], [10, 1], [11, 1], [12, 1]], [1.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
        >>> from gradalign.testing import tiny_model
        >>> model = tiny_model()
        >>> opt = torch.optim.Adam(model.parameters())
        >>> model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
        >>> opt.step()
        >>> from gradalign.preconditioning import AdamPreconditioner
        >>> pre = AdamPreconditioner.from_optimizer(opt, model)  # g / (sqrt(v_hat) + eps)
        >>> selector = ga.GradAlign(ga.FullGradient(target_modules=["lm_head"]), preconditioner=pre)
    """

    scales: Mapping[str, torch.Tensor]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.scales[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.scales)

    def __len__(self) -> int:
        return len(self.scales)

    @classmethod
    def from_optimizer(
        cls, optimizer: torch.optim.Optimizer, model: nn.Module, *, bias_correction: bool = True
    ) -> AdamPreconditioner:
        """Read ``exp_avg_sq`` (and ``step``, ``betas``, ``eps``) from an Adam-family optimizer.

        Args:
            optimizer: a ``torch.optim.Adam``/``AdamW`` (or any optimizer keeping ``exp_avg_sq``).
            model: the model whose parameters the optimizer updates (for the names).
            bias_correction: divide ``exp_avg_sq`` by ``1 - beta2**step`` like Adam does.

        Examples:
            >>> opt = torch.optim.AdamW(model.parameters())
            >>> model(torch.tensor([[5, 6, 7]])).logits.sum().backward()
            >>> opt.step()  # the optimizer holds exp_avg_sq from its first step on
            >>> pre = AdamPreconditioner.from_optimizer(opt, model)
            >>> sorted(pre.scales)[:2]
            ['lm_head.weight', 'model.embed_tokens.weight']
        """
        call = "AdamPreconditioner.from_optimizer"
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise GradAlignError(
                f"{call}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        names = {id(p): n for n, p in model.named_parameters()}
        scales: dict[str, torch.Tensor] = {}
        for group in optimizer.param_groups:
            betas, eps = group.get("betas"), group.get("eps")
            if betas is None or eps is None:
                raise GradAlignError(
                    f"{call}: param group has no betas/eps; got keys {sorted(group)} "
                    "(an Adam-family optimizer is needed)"
                )
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if "exp_avg_sq" not in state or id(p) not in names:
                    continue
                v = state["exp_avg_sq"].detach().float()
                if bias_correction:
                    step = float(torch.as_tensor(state.get("step", 1)).item())
                    v = v / (1.0 - float(betas[1]) ** max(step, 1.0))
                scales[names[id(p)]] = 1.0 / (v.sqrt() + float(eps))
        if not scales:
            raise GradAlignError(
                f"{call}: the optimizer holds no exp_avg_sq for any parameter of the model; "
                "take at least one optimizer step first"
            )
        return cls(scales)
