"""The served base model's linear layers, reordered once for oneDNN, give the
outputs of plain ones; the model thread loads the model it runs."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from tunewire.services.inference.engine import BatchEngine
from tunewire.services.inference.lora import SlottedLoRALinear
from tunewire.services.inference.packed import PackedLinear, pack_linears

from conftest import write_lora_adapter

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN")


def skip_unless_packs(dtype) -> None:
    # oneDNN's bfloat16 reorder needs AVX512 (or AVX-NE-CONVERT); pack_linears
    # then serves plain layers (test_packing_falls_back_where_onednn_cannot).
    try:
        PackedLinear(nn.Linear(4, 4).to(dtype), batch_size_hint=1)
    except RuntimeError as exc:
        pytest.skip(f"this CPU's oneDNN cannot pack {dtype}: {exc}")


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_linear_equals_the_plain_one(dtype, bias):
    skip_unless_packs(dtype)
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).to(dtype)
    packed = PackedLinear(linear, batch_size_hint=8)
    assert isinstance(packed, nn.Linear) and (packed.in_features, packed.out_features) == (48, 80)
    # Decoding rows, one token each, and prefill batches of many tokens.
    for shape in [(1, 48), (8, 1, 48), (3, 7, 48)]:
        x = torch.randn(shape, dtype=dtype)
        with torch.inference_mode():
            got, expected = packed(x), linear(x)
        assert got.shape == expected.shape and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_a_model_keeps_its_logits(tiny_model_dir, dtype):
    skip_unless_packs(dtype)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype).eval()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    input_ids = torch.tensor([[5, 9, 2, 31, 7], [1, 1, 4, 8, 3]])
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
        assert pack_linears(model, batch_size_hint=2) == linears > 0
        got = model(input_ids=input_ids).logits
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert pack_linears(model, batch_size_hint=2) == 0  # nothing plain left
    torch.testing.assert_close(got.float(), expected.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@needs_onednn
def test_packing_falls_back_where_onednn_cannot(tiny_model_dir):
    # On any CPU: packed where oneDNN can (every layer), plain where it cannot (none), the same logits.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).eval()
    linears = sum(type(m) is nn.Linear for m in model.modules())
    input_ids = torch.tensor([[5, 9, 2, 31, 7]])
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits
        assert pack_linears(model, batch_size_hint=1) in (0, linears)
        torch.testing.assert_close(model(input_ids=input_ids).logits.float(), expected.float(), atol=1e-2, rtol=1e-2)


def test_the_model_thread_loads_the_model_and_adapters_wrap_packed_layers(tiny_model_dir, tmp_path):
    engine = BatchEngine(str(tiny_model_dir), tmp_path / "cache")
    loaded_on = []
    load = engine.load
    engine.load = lambda: (loaded_on.append(threading.current_thread().name), load())
    engine.start()
    try:
        assert loaded_on == ["model"]
        adapter = write_lora_adapter(tiny_model_dir, tmp_path / "adapter")
        engine.add_adapter("a1", str(adapter), adapter, engine.read_adapter(adapter))
        wrapped = [m for m in engine.runner.model.modules() if isinstance(m, SlottedLoRALinear)]
        assert wrapped and all(isinstance(m.base, PackedLinear) for m in wrapped)
    finally:
        engine.stop()


def test_a_model_that_cannot_load_fails_start(tmp_path):
    engine = BatchEngine(str(tmp_path / "no-such-model"), tmp_path / "cache")
    with pytest.raises(Exception, match="no-such-model"):
        engine.start()
    engine.stop()
