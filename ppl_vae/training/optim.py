"""One ``torch.optim.Adam`` over every trainable parameter of a model/guide pair, kept consistent with Pyro's
param store.

Pyro's ``pyro.optim.Adam`` runs one optimiser per parameter tensor and ``SVI`` zeroes gradients by allocating
fresh ones; the training loop uses this class instead: the parameters are the ``nn.Module``'s (a ``PyroModule``'s
parameters *are* the param store's tensors, ``pyro.module`` registers the very same tensors) plus any
``pyro.param`` of the store that no module owns, found again after every step (a parameter first created by a
step joins the optimiser in that step). Adam works element-wise, so one optimiser over all tensors makes the same
updates as one per tensor. ``clip_norm`` clips each tensor's gradient norm separately, as Pyro's ``clip_args``
does. Parameters without a gradient in a step (unused, or frozen with ``requires_grad=False``) are not updated.

The state is saved keyed by parameter *names* (the param store's, else ``module.<name>``), so it survives another
order of registration; :meth:`load_state` also reads the per-parameter format of ``pyro.optim.PyroOptim``
(checkpoints written before this class).
"""

from __future__ import annotations

import pyro
import torch

from .checkpoint import renamed

__all__ = ["ParamOptimizer"]

_FORMAT = "ppl_vae.ParamOptimizer/1"


def _fused_kernel_for(module: torch.nn.Module | None) -> bool:
    """Whether this torch has Adam's fused kernel for the module's devices (CPU: torch ≥ 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        devices = set(_get_fused_kernels_supported_devices())
    except ImportError:
        return False
    wanted = {p.device.type for p in module.parameters()} if module is not None else {"cpu"}
    return wanted <= devices


class ParamOptimizer:
    def __init__(
        self,
        module: torch.nn.Module | None,
        lr: float,
        clip_norm: float | None = None,
        scaler=None,
        fused: bool = False,
    ):
        """``scaler``: the ``torch.amp.GradScaler`` of float16 training (``train.precision: 16-mixed``): the
        gradients arrive scaled; each step unscales them (before clipping), skips a step whose gradients overflowed
        and updates the scale, as ``GradScaler.step`` does. ``fused``: Adam's fused kernel (one pass per tensor;
        the same updates to float rounding, not bit for bit; ``train.compile`` uses it), else the per-tensor loop
        whose updates equal ``pyro.optim.Adam``'s exactly."""
        self.module, self.clip_norm, self.scaler = module, clip_norm, scaler
        self.fused = bool(fused) and _fused_kernel_for(module)
        self.params: list[torch.Tensor] = []
        self._ids: set[int] = set()
        self.optim = torch.optim.Adam([{"params": []}], lr=lr, fused=self.fused or None)
        self._store_size = -1
        self.sync()

    # -- which tensors ------------------------------------------------------------------------------------
    def _live(self):
        if self.module is not None:
            yield from self.module.parameters()
        yield from pyro.get_param_store()._params.values()

    def sync(self) -> None:
        """Add trainable tensors not yet optimised (new ``pyro.param`` s, new module parameters)."""
        store_size = len(pyro.get_param_store()._params)
        if store_size == self._store_size and self.params:
            return
        self._store_size = store_size
        for p in self._live():
            if p.requires_grad and id(p) not in self._ids:
                self._ids.add(id(p))
                self.params.append(p)
                self.optim.param_groups[0]["params"].append(p)

    # -- one step -----------------------------------------------------------------------------------------
    def step(self) -> None:
        self.sync()
        if self.scaler is not None:
            self.scaler.unscale_(self.optim)
        if self.clip_norm:
            for p in self.params:
                if p.grad is not None:
                    torch.nn.utils.clip_grad_norm_(p, self.clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optim)
            self.scaler.update()
        else:
            self.optim.step()
        self.optim.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for group in self.optim.param_groups:
            group["lr"] = lr

    # -- state --------------------------------------------------------------------------------------------
    def _names(self) -> dict[int, str]:
        names = {}
        if self.module is not None:
            names.update({id(p): f"module.{n}" for n, p in self.module.named_parameters()})
        names.update({id(p): n for n, p in pyro.get_param_store()._params.items()})  # the store's name first
        return names

    def state(self) -> dict:
        names = self._names()
        out = {
            "format": _FORMAT,
            "state": {
                names[id(p)]: self.optim.state[p] for p in self.params if p in self.optim.state and id(p) in names
            },
        }
        if self.scaler is not None:  # the loss scale goes on from where it was
            out["grad_scaler"] = self.scaler.state_dict()
        return out

    def load_state(self, saved: dict, device=None) -> None:
        """Restore the per-parameter Adam state (``step``, ``exp_avg``, ``exp_avg_sq``) by name."""
        self.sync()
        names = self._names()
        by_name = {names[id(p)]: p for p in self.params if id(p) in names}
        if self.scaler is not None and saved.get("grad_scaler"):
            self.scaler.load_state_dict(saved["grad_scaler"])
        if saved.get("format") == _FORMAT:
            per_param = renamed(saved["state"], self.module)
        else:  # pyro.optim.PyroOptim.get_state(): {store name: state_dict of a one-tensor torch optimiser}
            per_param = {name: sd["state"][0] for name, sd in saved.items() if sd.get("state")}
        for name, st in per_param.items():
            p = by_name.get(name)
            if p is None:
                continue
            self.optim.state[p] = {
                k: (v.to(p.device) if isinstance(v, torch.Tensor) and (k != "step" or self.fused) else v)
                for k, v in st.items()
            }
