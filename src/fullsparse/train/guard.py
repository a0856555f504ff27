"""The non-finite guard every training step goes through: check the loss, run backward,
check the gradients, then clip and step — or skip the step (``--skip-nonfinite``), or stop
with one line that says where the NaN/Inf appeared and which checkpoint is still good.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from fullsparse.errors import UserError
from fullsparse.masked_decay import masked_grad_decay_
from fullsparse.sparse_state import end_optimizer_step, sparse_modules
from fullsparse.train.distributed import any_rank
from fullsparse.train.protocol import TrainerView

__all__ = ["NonFiniteLossError", "StepGuard", "diagnose_nonfinite", "first_nonfinite_gradient"]


class NonFiniteLossError(UserError):
    """The loss or a gradient became NaN/Inf; the message names the step and the first bad
    layer (the name predates the gradient check)."""


def clip_gradients(model: nn.Module, grad_clip: float) -> float | None:
    """Clip the global gradient norm to ``grad_clip`` (0: off); returns the norm before
    clipping, or None when clipping is off."""
    if not grad_clip:
        return None
    return float(nn.utils.clip_grad_norm_(model.parameters(), grad_clip))


def diagnose_nonfinite(
    model: nn.Module, compute_loss: Callable[[], Tensor], distributed: bool
) -> str:
    """Where non-finite values first appear: the weights, else the first layer (in call
    order) whose output is non-finite, else the first parameter with a non-finite gradient.

    Runs ``model`` (unwrapped: no DDP/compile) once more on the failing batch; the run is
    stopping, so the extra forward's side effects (BN statistics) do not matter.
    """
    bad_weights = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_weights:
        more = f" (+{len(bad_weights) - 1} more)" if len(bad_weights) > 1 else ""
        return f"non-finite weights in {bad_weights[0]}{more}"
    found: list[str] = []

    def make_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if found or not isinstance(output, Tensor) or not output.is_floating_point():
                return
            if not torch.isfinite(output.detach()).all():
                found.append(f"{name} ({type(module).__name__})")

        return hook

    hooks = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if name and not list(module.children())  # leaves; the hooks see them in call order
    ]
    loss = None
    try:
        model.zero_grad(set_to_none=True)
        loss = compute_loss()  # under the step's autocast: the caller's
    except Exception:  # diagnosis is best effort; the caller still reports the step
        pass
    finally:
        for h in hooks:
            h.remove()
    if found:
        return f"first non-finite activation: output of {found[0]}"
    if loss is None or distributed:  # a backward outside DDP's forward confuses its reducer
        return ""
    try:
        loss.backward()
    except Exception:
        return ""
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            return f"first non-finite gradient: {name}"
    return ""


def first_nonfinite_gradient(model: nn.Module) -> str:
    """``""`` when every gradient of ``model`` is finite; else where the first non-finite
    one is, in backward order (the reverse of registration order): the layer nearest the
    loss, where the NaN/Inf most likely arose before flowing into earlier layers.

    One fused norm per step and one host sync; the per-parameter scan runs only when that
    norm is not finite (a huge but finite gradient can overflow the norm: the scan then
    finds nothing and the step goes on).
    """
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    if not named:
        return ""
    grads = [g for _, g in named]
    try:
        norms = torch._foreach_norm(grads)  # what clip_grad_norm_ uses: few kernels
    except (AttributeError, RuntimeError):
        norms = [torch.linalg.vector_norm(g) for g in grads]
    if bool(torch.isfinite(torch.stack([n.float() for n in norms])).all()):
        return ""
    bad = [name for name, g in reversed(named) if not bool(torch.isfinite(g).all())]
    if not bad:
        return ""
    layer, _, param = bad[0].rpartition(".")
    kind = type(model.get_submodule(layer)).__name__
    return (
        f"first non-finite gradient (backward order): {layer or '<model>'} ({kind}) {param}; "
        f"{len(bad)} of {len(named)} gradients non-finite"
    )


class StepGuard:
    """The non-finite handling every training loop shares (classification, LM, detection).

    One instance per epoch. Each step calls :meth:`snapshot` before its forward, then
    :meth:`forward_backward`, which runs each micro-batch's forward and :meth:`backward`
    (``""``, ``"loss"`` or ``"gradient"``). On a problem the
    step either :meth:`skip` s (``--skip-nonfinite``: buffers restored, schedule advanced)
    or :meth:`fail` s with one line naming the step, the cause and the checkpoint kept;
    otherwise :meth:`step` clips, applies the optimizer and advances the schedule.

    Every rank agrees on a problem before acting (``any_rank``), so none waits in DDP's
    gradient all-reduce for a rank that skipped.
    """

    def __init__(self, trainer: TrainerView, epoch: int, steps: int) -> None:
        self.trainer, self.config = trainer, trainer.config
        self.raw_model, self.optimizer = trainer.raw_model, trainer.optimizer
        self.dist_info, self.device, self.run = trainer.dist, trainer.device, trainer.state
        self.epoch, self.steps = epoch, steps
        self.skipped = 0
        self.bad_grad = ""
        self.norm_sum, self.norms = 0.0, 0  # pre-clip gradient norms of the steps taken
        # Only --skip-nonfinite needs the buffers; the list is the same for every step.
        self._buffers = list(self.raw_model.buffers()) if self.config.skip_nonfinite else []
        self._saved: list[Tensor] = []
        # layers with 2by4's masked decay, applied in step() on the unscaled, clipped gradients
        self.masked_decay = any(
            m.config.decay_kind == "masked_grad"  # type: ignore[attr-defined]
            for _, m in sparse_modules(self.raw_model)
        )

    def snapshot(self) -> None:
        """Keep the buffers (BatchNorm statistics, the TSM clock): a bad forward has
        already moved them, and skipping the step must undo that too."""
        if self._buffers:
            self._saved = [b.detach().clone() for b in self._buffers]

    def backward(
        self, loss: Tensor, value: float, *, first: bool = True, last: bool = True,
        weight: float = 1.0,
    ) -> str:  # fmt: skip
        """Check the loss (``value``, already on the host), run backward, check the
        gradients. fp16's GradScaler skips inf/NaN gradients itself, so with a scaler only
        the loss is checked. Under gradient accumulation each micro-batch comes here:
        ``first`` zeroes the gradients, ``weight`` is its share of the batch (the loss is
        scaled by it) and ``last`` checks the accumulated gradients."""
        self.bad_grad = ""
        if any_rank(not math.isfinite(value), self.dist_info, self.device):
            return "loss"
        if first:
            self.optimizer.zero_grad(set_to_none=True)
        if weight != 1.0:
            loss = loss * weight
        if self.trainer.scaler is not None:
            self.trainer.scaler.scale(loss).backward()
            return ""
        loss.backward()
        if not last:
            return ""
        self.bad_grad = first_nonfinite_gradient(self.raw_model)
        return "gradient" if any_rank(bool(self.bad_grad), self.dist_info, self.device) else ""

    def forward_backward(self, batch: Any, step: int) -> dict[str, float] | None:
        """Forward and guarded backward of one optimizer step's ``batch``, as
        ``grad_accum_steps`` micro-batches (each loss weighted by its share, so the
        gradients add up to the batch's); the step's sums (``loss_sum``, the task's count
        and sums), or None when the step was skipped (a non-finite value under
        ``--skip-nonfinite``; otherwise that raises). Under DDP only the last micro-batch's
        backward all-reduces."""
        trainer = self.trainer
        task, model = trainer.task, trainer.model
        parts = task.micro_batches(batch, self.config.grad_accum_steps)
        sums: dict[str, float] = {"loss_sum": 0.0, task.count_key: 0.0}
        for index, (micro, weight) in enumerate(parts):
            last = index == len(parts) - 1
            no_sync = getattr(model, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            with sync:
                with trainer.amp():
                    out = task.forward(model, micro)
                values = torch.stack(
                    [out.loss.detach().float(), *(v.float() for v in out.sums.values())]
                ).tolist()
                problem = self.backward(
                    out.loss, values[0], first=index == 0, last=last, weight=weight
                )
            if problem:
                detail = task.explain_nonfinite(trainer, micro, out, values)
                self.resolve(problem, step, values[0], detail)
                return None
            sums["loss_sum"] += values[0] * out.count
            sums[task.count_key] += out.count
            for key, value in zip(out.sums, values[1:], strict=True):
                sums[key] = sums.get(key, 0.0) + value
        return sums

    def where(self, step: int) -> str:
        global_step = self.epoch * self.steps + step + 1
        return f"epoch {self.epoch + 1} step {step + 1}/{self.steps} (global step {global_step})"

    def skip(self, problem: str, step: int) -> bool:
        """Skip the step when ``--skip-nonfinite`` is on (and say so); False otherwise."""
        if not self.config.skip_nonfinite:
            return False
        with torch.no_grad():
            for b, v in zip(self._buffers, self._saved, strict=True):
                b.copy_(v)
        self.optimizer.zero_grad(set_to_none=True)
        end_optimizer_step(self.raw_model)
        with warnings.catch_warnings():
            # A skipped step still uses up its place in the schedule, on purpose; when it
            # is the run's first step PyTorch warns that the optimizer has not stepped yet.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step")
            self.trainer.scheduler.step()
        self.skipped += 1
        self.run.skipped_steps += 1
        where = self.where(step)
        self.trainer.log.info(f"non-finite {problem} at {where}: step skipped (--skip-nonfinite)")
        return True

    def resolve(
        self, problem: str, step: int, value: float, loss_detail: Callable[[], str]
    ) -> None:
        """Skip the bad step (``--skip-nonfinite``) or raise (see :meth:`fail`)."""
        if not self.skip(problem, step):
            self.fail(problem, step, value, loss_detail)

    def fail(
        self, problem: str, step: int, value: float, loss_detail: Callable[[], str]
    ) -> NoReturn:
        """Raise :class:`NonFiniteLossError`. ``loss_detail`` says where a non-finite loss
        came from (called only for one: it may run the model again)."""
        where = self.where(step)
        if problem == "loss":
            head, detail = f"non-finite loss ({value}) at {where}", loss_detail()
        else:
            head = f"non-finite gradient at {where} (the loss, {value:.4g}, is finite)"
            detail = self.bad_grad or "in another process"
        # last.pt holds (run.epoch, run.step): an epoch end, or a --checkpoint-every step
        step = self.run.step
        epoch = self.run.epoch
        at = f"after epoch {epoch + 1} step {step}" if step else f"epoch {epoch}"
        kept = (
            f"the last good checkpoint {self.config.run_dir / 'last.pt'} ({at}) is untouched"
            if self.run.epoch > 0 or step
            else "no checkpoint was written"
        )
        amp = ", try without --amp," if self.config.amp != "none" else ""
        raise NonFiniteLossError(
            head
            + (f"; {detail}" if detail else "")
            + f"; {kept}; lower --lr{amp} or pass --skip-nonfinite"
        )

    def step(self) -> float | None:
        """Clip, step the optimizer and the schedule; the pre-clip norm (None: no clip)."""
        masked = self.masked_decay
        if self.trainer.scaler is not None:
            if self.config.grad_clip or masked:
                self.trainer.scaler.unscale_(self.optimizer)  # clip / decay the true gradients
            norm = clip_gradients(self.raw_model, self.config.grad_clip)
            if masked:  # 2by4's masked decay: after clipping, once per optimizer step
                masked_grad_decay_(self.raw_model)
            self.trainer.scaler.step(self.optimizer)
            self.trainer.scaler.update()
        else:
            norm = clip_gradients(self.raw_model, self.config.grad_clip)
            if masked:
                masked_grad_decay_(self.raw_model)
            self.optimizer.step()
        end_optimizer_step(self.raw_model)  # the sparse layers' next forward opens a step
        self.trainer.scheduler.step()
        if norm is not None and math.isfinite(norm):
            self.norm_sum += norm
            self.norms += 1
        return norm

    @property
    def mean_norm(self) -> float | None:
        """Mean pre-clip gradient norm of the steps taken (None without --grad-clip)."""
        return self.norm_sum / self.norms if self.norms else None
