"""Files shipped inside the package: the trained demo checkpoint (``dsv32 train-demo``'s output, issue 25).

``demo`` names it wherever a model is given (``dsv32 serve``, ``LLM()``: the default); ``checkpoint_path`` turns that
name into its folder, so everything below the configs reads it as any Hugging Face checkpoint folder.
"""

from __future__ import annotations

from pathlib import Path

DEMO_PRESET = "demo"
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "demo"


def checkpoint_path(model: str) -> str:
    """The folder to read ``model`` from: the packaged demo checkpoint for ``demo``, else ``model`` itself."""
    if model != DEMO_PRESET:
        return model
    if not (DEMO_CHECKPOINT / "model.safetensors").is_file():
        raise FileNotFoundError(f"the demo model's weights are missing from {DEMO_CHECKPOINT} (a broken install: "
                                f"reinstall dsv32, or pass a checkpoint folder or 'tiny')")
    return str(DEMO_CHECKPOINT)
