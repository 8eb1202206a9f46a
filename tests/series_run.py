"""A real short training run of a tiny Llama, saved as a checkpoint series in mixed name formats: a 2-layer
Llama with GQA (hidden 64, 4 query / 2 kv heads) trained from scratch on `pydoc_data.topics` with byte-level
tokens (vocab 256), saved with `save_pretrained` (safetensors) at steps 0, 10, 20, 30 and 40 (seconds on one
CPU core). `build_series(root)` reuses a finished run under root (its recipe stamp matches)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RECIPE = "series-run/1"
SEQ, BATCH = 64, 8
# step → folder name, in the formats real runs use (tokens = step × BATCH × SEQ, rounded as runs name them)
NAMES = {0: "step-0", 10: "checkpoint-10", 20: "stage1-step20-tokens10K", 30: "global_step30",
         40: "run-step40-20K"}
TOKENS = {0: None, 10: None, 20: 10_000, 30: None, 40: 20_000}


@dataclass(frozen=True)
class SeriesRun:
    """The run's folder and its checkpoints by step."""

    root: Path
    paths: dict[int, Path]


def shared_root() -> Path:
    """The run's folder in the system temp dir, named by the recipe (reused across test sessions)."""
    import tempfile

    return Path(tempfile.gettempdir()) / f"diffract-series-run-{RECIPE.replace('/', '-')}"


def build_series(root: Path | None = None) -> SeriesRun:
    """Train (or reuse) the run under `root`; built in a temp sibling folder and renamed into place."""
    import os
    import shutil

    root = Path(root) if root is not None else shared_root()
    run = SeriesRun(root=root, paths={s: root / n for s, n in NAMES.items()})
    stamp = root / "recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == RECIPE:
        return run
    work = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    _train(work)
    (work / "recipe.json").write_text(json.dumps({"recipe": RECIPE}))
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(work, root)
    except OSError:  # another session finished first: use theirs
        shutil.rmtree(work, ignore_errors=True)
    return run


def _train(folder: Path) -> None:
    """AdamW next-token training on one thread, saving at every step in NAMES."""
    import torch
    import transformers
    from pydoc_data.topics import topics

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ids = torch.tensor(list("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.long)
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ * 2,
                                       tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
        g = torch.Generator().manual_seed(1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        for step in range(max(NAMES) + 1):
            if step in NAMES:
                model.save_pretrained(folder / NAMES[step])
            if step == max(NAMES):
                break
            starts = torch.randint(0, ids.numel() - SEQ - 1, (BATCH,), generator=g)
            x = torch.stack([ids[s:s + SEQ] for s in starts.tolist()])
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)


try:  # the fixture, for the test modules that import it
    import pytest

    @pytest.fixture(scope="session")
    def series_run() -> SeriesRun:
        """The tiny training run's checkpoint series (trained once on one thread, then reused from temp)."""
        return build_series()
except ImportError:  # pragma: no cover - build_series works without pytest
    pass
