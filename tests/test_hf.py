"""Hugging Face models: Conv1D as a transposed Linear, tiny Llama / GPT-2 / BERT / ViT trained
with a recipe, save_pretrained / from_pretrained, and transformers.Trainer.

Needs the ``hf`` extra (transformers, safetensors, accelerate): ``pytest -m hf``. Models are
built from small configs with random weights; nothing is downloaded. transformers is
imported inside the tests, so that the default run collects this file without it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fullsparse
from fullsparse import SparseLinear, densify_, sparsify_
from fullsparse.masks import is_2to4
from fullsparse.nn import load_sparse_state_, pruned_state_dict, sparse_modules, sparse_state_dict
from reference import DRAW_SEED, module_reference_name, ref_linear, same_draws

pytestmark = pytest.mark.hf

TOL64 = dict(rtol=1e-9, atol=1e-9)


def _conv1d_and_linear(nf: int, nx: int, seed: int) -> tuple[nn.Module, nn.Linear]:
    """A float64 HF Conv1D and the nn.Linear it equals (the transposed weight)."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(seed)
    conv = Conv1D(nf, nx).double()
    with torch.no_grad():
        conv.weight.normal_()  # unit scale: no ties between magnitudes in a group of 4
        conv.bias.normal_()
    lin = nn.Linear(nx, nf).double()
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
        lin.bias.copy_(conv.bias)
    return conv, lin


def _step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(DRAW_SEED)  # both layers (and the reference) draw the same (fst_mvue)
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad


@pytest.mark.parametrize("name", fullsparse.RECIPES)
def test_conv1d_equals_linear_with_transposed_weight(name: str) -> None:
    from fullsparse.hf import SparseConv1D

    conv, lin = _conv1d_and_linear(nf=12, nx=16, seed=3)
    sconv = SparseConv1D.from_dense(conv, name)
    slin = SparseLinear.from_dense(lin, name)
    assert sconv.weight is conv.weight and sconv.weight.shape == (16, 12)  # HF layout kept
    gen = torch.Generator().manual_seed(4)
    for step in range(2):  # the second step reuses (TSM) or recomputes the masks
        x = torch.randn(2, 5, 16, generator=gen, dtype=torch.float64)  # odd token count
        gy = torch.randn(2, 5, 12, generator=gen, dtype=torch.float64)
        w_before = slin.weight.detach().clone()
        y_c, dx_c = _step(sconv, x, gy)
        y_l, dx_l = _step(slin, x, gy)
        torch.testing.assert_close(y_c, y_l, **TOL64)
        torch.testing.assert_close(dx_c, dx_l, **TOL64)
        torch.testing.assert_close(sconv.weight.grad, slin.weight.grad.t(), **TOL64)
        torch.testing.assert_close(sconv.bias.grad, slin.bias.grad, **TOL64)
        if step == 0:  # ...and the float64 reference of the spec (which has no TSM cache)
            ref_name = module_reference_name(name)  # a module's first step (is_adaptive)
            want = same_draws(ref_linear)(x, w_before, lin.bias.detach(), gy, ref_name)
            got = (y_c, dx_c, sconv.weight.grad.t(), sconv.bias.grad)
            for a, b in zip(got, want, strict=True):
                torch.testing.assert_close(a, b, **TOL64)
        torch.testing.assert_close(sconv.pruned_weight(), slin.pruned_weight().t(), rtol=0, atol=0)
        with torch.no_grad():  # move the weights so the next step's masks differ
            for m in (sconv, slin):
                m.weight.sub_(0.5 * m.weight.grad)
                m.weight.grad = m.bias.grad = None
    if sconv.config.uses_transposable_mask:
        assert torch.equal(sconv.tsm_mask, slin.tsm_mask)  # cached in the Linear layout


@pytest.mark.parametrize(("nf", "nx", "interval"), [(16, 16, 1), (16, 16, 3), (12, 16, 1)])
def test_conv1d_masked_decay_is_the_linears_transposed(nf: int, nx: int, interval: int) -> None:
    """2by4's masked decay lands on a Conv1D's gradient in the Parameter's layout, also for
    a square weight (whose shape cannot tell the two layouts apart: GPT-2's attention
    projection), masks every step (one pass over W) and cached (mask and term)."""
    from fullsparse.hf import SparseConv1D
    from fullsparse.nn import masked_grad_decay_

    config = fullsparse.recipe("fst", decay=1e-2, decay_kind="masked_grad", mask_interval=interval)
    conv, lin = _conv1d_and_linear(nf=nf, nx=nx, seed=5)
    sconv, slin = SparseConv1D.from_dense(conv, config), SparseLinear.from_dense(lin, config)
    x = torch.randn(2, 6, nx, dtype=torch.float64)
    gy = torch.randn(2, 6, nf, dtype=torch.float64)
    for m in (sconv, slin):
        _step(m, x, gy)
    before = slin.weight.grad.clone()
    for m in (sconv, slin):
        assert masked_grad_decay_(nn.Sequential(m)) == 1
    w = slin.weight.detach()
    want = before + 1e-2 * w * ~slin.forward_weight_mask()  # float64, the Linear layout
    torch.testing.assert_close(slin.weight.grad, want, **TOL64)
    torch.testing.assert_close(sconv.weight.grad, want.t(), **TOL64)


def _gpt2(**overrides: Any) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    return GPT2LMHeadModel(GPT2Config(**{**cfg, **overrides}))


def test_sparsify_gpt2_keeps_parameters_and_keys_and_densify_gives_conv1d() -> None:
    from transformers.pytorch_utils import Conv1D

    from fullsparse.hf import SparseConv1D

    model = _gpt2()
    params = list(model.parameters())
    keys = list(model.state_dict())
    report = sparsify_(model, "fst")
    conv1d_names = [f"transformer.h.{i}.{n}" for i in range(2) for n in _GPT2_CONV1D]
    assert report.sparse_names == conv1d_names and report.dense_names == ["lm_head"]
    assert {r.kind for r in report if r.sparse} == {"Conv1D"}
    assert report["transformer.h.0.mlp.c_fc"].shape == (64, 256)  # the Parameter's [in, out]
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, SparseConv1D) and isinstance(layer, Conv1D)
    assert "recipe=fst" in repr(layer)
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))
    assert list(model.state_dict()) == keys
    back = densify_(model)
    assert [r.name for r in back] == conv1d_names
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    assert all(a is b for a, b in zip(params, model.parameters(), strict=True))


_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def test_gpt2_sparse_state_and_pruned_weights_load_into_the_dense_model() -> None:
    model = _gpt2()
    sparsify_(model, "tsm")
    tokens = torch.randint(0, 128, (2, 16))
    model(tokens, labels=tokens).loss.backward()
    state = sparse_state_dict(model)
    assert state["transformer.h.0.attn.c_attn.tsm_mask"].shape == (192, 64)  # Linear layout
    masks = {n: m.tsm_mask.clone() for n, m in sparse_modules(model)}
    for _, m in sparse_modules(model):
        m.tsm_mask = None
    load_sparse_state_(model, state)
    assert all(torch.equal(m.tsm_mask, masks[n]) for n, m in sparse_modules(model))
    pruned = pruned_state_dict(model)
    w = pruned["transformer.h.1.mlp.c_proj.weight"]  # Conv1D layout [d_in, d_out]
    assert w.shape == (256, 64) and is_2to4(w, dim=0) and is_2to4(w, dim=1)  # transposable
    model.eval()
    with torch.no_grad():
        want = model(tokens).logits
    densify_(model)
    model.load_state_dict(pruned)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- tiny models, a few steps


def _llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    tokens = torch.randint(0, 128, (2, 16))
    return LlamaForCausalLM(cfg), {"input_ids": tokens, "labels": tokens}


def _gpt2_batch() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    tokens = torch.randint(0, 128, (2, 16))
    return _gpt2(), {"input_ids": tokens, "labels": tokens}


def _bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=128,
        max_position_embeddings=64,
        num_labels=3,
    )
    batch = {"input_ids": torch.randint(0, 128, (2, 16)), "labels": torch.tensor([0, 2])}
    return BertForSequenceClassification(cfg), batch


def _vit() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=5,
    )
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.tensor([1, 4])}
    return ViTForImageClassification(cfg), batch


#: (builder, the number of layers sparsify_ makes sparse, the dense head)
TINY_MODELS = {
    "llama": (_llama, 14, "lm_head"),  # q, k, v, o, gate, up, down per block
    "gpt2": (_gpt2_batch, 8, "lm_head"),  # four Conv1D per block
    "bert": (_bert, 13, "classifier"),  # q, k, v, o, intermediate, output per block + pooler
    "vit": (_vit, 13, "classifier"),  # the patch-embedding conv + six Linear per block
}


def _forward_is_2to4(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
    """Forward hook: the layer's output is that of its pruned weight, which is 2:4 along K."""
    from fullsparse.hf import SparseConv1D

    w = module._gemm_weight().detach()
    pruned = module.pruned_weight()  # in the Parameter's layout: Conv1D's is [d_in, d_out]
    gemm = pruned.t() if isinstance(module, SparseConv1D) else pruned
    assert is_2to4(gemm.reshape(gemm.shape[0], -1), dim=1)
    assert (gemm != 0).sum() < w.numel() * 0.55  # about half, not all, of the weight kept
    x = args[0].detach()
    if isinstance(module, nn.Conv2d):
        geometry = (module.stride, module.padding, module.dilation, module.groups)
        want = F.conv2d(x, gemm, module.bias, *geometry)
    else:
        want = F.linear(x, gemm, module.bias)
    torch.testing.assert_close(out.detach(), want.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", list(TINY_MODELS))
def test_tiny_hf_model_trains_a_few_steps_with_fst(arch: str) -> None:
    build, n_sparse, head = TINY_MODELS[arch]
    torch.manual_seed(0)
    model, batch = build()
    model.train()
    report = sparsify_(model, "fst")
    assert len(report.sparse_names) == n_sparse and head in report.dense_names
    assert all(len(line) <= 100 for line in str(report).splitlines())
    checked: list[nn.Module] = []

    def hook(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        _forward_is_2to4(module, args, out)
        checked.append(module)

    hooks = [m.register_forward_hook(hook) for _, m in sparse_modules(model)]
    name, first = next(iter(sparse_modules(model)))
    before = first.weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    for h in hooks:
        h.remove()
    assert len(checked) == 3 * n_sparse  # every sparse layer ran 2:4 at every step
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert not torch.equal(before, first.weight), f"{name} did not change"


# ---------------------------------------------------------------- saving and Trainer


def test_save_pretrained_round_trips_latent_and_pruned_weights(tmp_path) -> None:
    from transformers import GPT2LMHeadModel

    model = _gpt2()
    sparsify_(model, "fst")
    tokens = torch.randint(0, 128, (2, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(tokens, labels=tokens).loss.backward()
    opt.step()
    # To go on training later: the latent (unpruned) weights, under the usual keys.
    model.save_pretrained(tmp_path / "latent")
    latent = GPT2LMHeadModel.from_pretrained(tmp_path / "latent")
    for (k, a), b in zip(model.state_dict().items(), latent.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
    # For inference: the pruned weights in a plain model, which gives the sparse model's output.
    model.eval()
    with torch.no_grad():
        want = model(tokens).logits
    pruned = pruned_state_dict(model)
    densify_(model)
    model.load_state_dict(pruned)
    model.save_pretrained(tmp_path / "pruned")
    loaded = GPT2LMHeadModel.from_pretrained(tmp_path / "pruned").eval()
    w = loaded.transformer.h[0].attn.c_attn.weight
    assert is_2to4(w, dim=0)  # Conv1D [d_in, d_out]: 2:4 along d_in, the GEMM's K
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_transformers_trainer_trains_a_sparsified_model(tmp_path) -> None:
    from transformers import Trainer, TrainingArguments

    from fullsparse.hf import SparseConv1D

    model = _gpt2()
    sparsify_(model, "fst")
    data = [{"input_ids": t, "labels": t} for t in torch.randint(0, 128, (8, 16))]
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    layer = trainer.model.transformer.h[0].attn.c_attn
    assert isinstance(layer, SparseConv1D)  # Trainer kept the sparse modules
    assert not torch.equal(before, layer.weight)


def test_docs_huggingface_md_runs(tmp_path, monkeypatch) -> None:
    """Every python block of docs/huggingface.md, in order, in one namespace."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "huggingface.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    assert len(blocks) == 5
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(doc), "exec"), namespace)
    assert (tmp_path / "gpt2-fst-2to4" / "model.safetensors").is_file()


def _trainer_run(
    tmp_path, name: str, batch: int, accumulation: int, count: bool, **kw: Any
) -> nn.Module:
    """3 SGD steps of transformers.Trainer over 12 sequences: batches of ``batch``,
    ``accumulation`` of them per step; ``count``: ``count_optimizer_steps`` first.
    ``decay_kind`` (default srste), ``masked_hook`` (``masked_decay_on_step`` first) and
    ``max_grad_norm`` (the Trainer's default 1.0) as given."""
    from transformers import Trainer, TrainingArguments

    nodrop = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # the same maths per split
    model = _gpt2(**nodrop)
    kind = kw.get("decay_kind", "srste")
    sparsify_(model, fullsparse.recipe("srste", mask_interval=2, decay=0.05, decay_kind=kind))
    handle = fullsparse.count_optimizer_steps(model) if count else None  # before the Trainer
    if kw.get("masked_hook"):
        handle_md = fullsparse.nn.masked_decay_on_step(model)  # every optimizer holding it
    tokens = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(2))
    args = TrainingArguments(
        output_dir=str(tmp_path / name),
        max_steps=3,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        max_grad_norm=kw.get("max_grad_norm", 1.0),
    )
    data = [{"input_ids": t, "labels": t} for t in tokens]
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    if handle is not None:
        handle.remove()
    if kw.get("masked_hook"):
        handle_md.remove()
    return model


def test_trainer_adds_the_masked_decay_through_the_step_hook(tmp_path) -> None:
    """Under transformers.Trainer, ``masked_decay_on_step`` adds 2by4's decay once per
    optimizer step: with no clipping and one backward per step it equals the SR-STE decay
    in the backward; without the hook a masked_grad config gets no decay at all."""
    plain = dict(max_grad_norm=0.0)
    srste = _trainer_run(tmp_path, "srste", 4, 1, False, **plain)
    hooked = _trainer_run(tmp_path, "hook", 4, 1, False, decay_kind="masked_grad",
                          masked_hook=True, **plain)  # fmt: skip
    bare = _trainer_run(tmp_path, "bare", 4, 1, False, decay_kind="masked_grad", **plain)
    for (name, p), q in zip(srste.named_parameters(), hooked.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    pairs = zip(srste.parameters(), bare.parameters(), strict=True)
    assert max((p - q).abs().max().item() for p, q in pairs) > 1e-4  # the decay shows
    with torch.no_grad():  # the hook is gone: a later step of any optimizer adds nothing
        for p in hooked.parameters():
            p.grad = torch.zeros_like(p)
        torch.optim.SGD(hooked.parameters(), lr=0.0).step()
        assert all(not p.grad.any() for p in hooked.parameters())


def test_trainer_gradient_accumulation_equals_the_whole_batch(tmp_path) -> None:
    """gradient_accumulation_steps=2 of batches of 2 under ``count_optimizer_steps``: the
    weights of batches of 4 (SR-STE decay once per step), and the cached-mask clock at the
    Trainer's 3 optimizer steps; without it, the clock counts the 6 forwards."""
    whole = _trainer_run(tmp_path, "whole", 4, 1, count=True)
    micro = _trainer_run(tmp_path, "micro", 2, 2, count=True)
    naive = _trainer_run(tmp_path, "naive", 2, 2, count=False)
    for (name, p), q in zip(whole.named_parameters(), micro.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    assert {int(m.tsm_step) for _, m in sparse_modules(micro)} == {3}
    assert {int(m.tsm_step) for _, m in sparse_modules(naive)} == {6}
    pairs = zip(whole.parameters(), naive.parameters(), strict=True)
    gap = max((p - q).abs().max().item() for p, q in pairs)
    assert gap > 1e-4  # the decay added per micro-batch shows
