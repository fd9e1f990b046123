"""The PyTorch reference of bench_model.py: Hugging Face's VanForImageClassification on CPU.

Runs inside the side environment `.bench-venv/` (Python 3.11, torch, transformers; created by
benchmarks/workers.py), never in the project's venv, and imports nothing from the project.
It reads one JSON command per line on stdin and answers one JSON line on stdout, so the parent can
alternate its rounds with TensorFlow's:

    {"cmd": "setup", "embed_dims": [...], "depths": [...], "mlp_ratios": [...], "batch": 16,
     "image_size": 224, "drop_path_rate": 0.1}            -> parameters, torch facts
    {"cmd": "train" | "infer", "layout": "nchw" | "channels_last", "steps": 2}  -> images/s
    {"cmd": "quit"}

The implementation: transformers 4.57.6, `transformers.models.deprecated.van` (VAN was moved there
and later removed; pinned in workers.py). Its b0 has 4,106,312 parameters: the official
4,105,800 plus a 256-wide `VanModel.layernorm` that is built but never called in `forward()`.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from protocol import serve  # this folder is sys.path[0]: the script runs in the side env
from transformers.models.deprecated.van import VanConfig, VanForImageClassification

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def build(cmd: dict) -> dict:
    """One model per memory layout (same seed), AdamW as the official recipe runs it, data."""
    config = VanConfig(
        hidden_sizes=cmd["embed_dims"],
        depths=cmd["depths"],
        mlp_ratios=cmd["mlp_ratios"],
        drop_path_rate=cmd["drop_path_rate"],
        num_labels=cmd.get("num_classes", 1000),
    )
    batch, size = cmd["batch"], cmd["image_size"]
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, config.num_labels, (batch,))
    runners = {}
    for name, layout in LAYOUTS.items():
        torch.manual_seed(0)
        model = VanForImageClassification(config).to(memory_format=layout)
        # timm's param_groups_weight_decay: no decay on 1-D parameters (norms, biases, scales).
        decay = [p for p in model.parameters() if p.ndim > 1]
        no_decay = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-3,
        )
        runners[name] = (model, optimizer, images.contiguous(memory_format=layout), labels)
    return runners


def train_steps(model, optimizer, images, labels, steps: int) -> float:
    """Seconds per AdamW step on cross-entropy (forward, backward, update)."""
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images).logits, labels)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def infer_steps(model, images, steps: int) -> float:
    """Seconds per eval-mode forward pass under inference_mode."""
    model.eval()
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(steps):
            model(images).logits.sum().item()
    return (time.perf_counter() - start) / steps


def facts(runners: dict) -> dict:
    """What the parent prints about this side."""
    model = next(iter(runners.values()))[0]
    return {
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "parameters_used": sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("van.layernorm.")
        ),
    }


def main() -> int:
    """Answer commands until 'quit' or end of input."""
    runners: dict = {}

    def answer(cmd: dict) -> dict:
        if cmd["cmd"] == "setup":
            runners.update(build(cmd))
            for model, optimizer, images, labels in runners.values():  # warm-up
                train_steps(model, optimizer, images, labels, 2)
                infer_steps(model, images, 2)
            return facts(runners)
        model, optimizer, images, labels = runners[cmd["layout"]]
        if cmd["cmd"] == "train":
            seconds = train_steps(model, optimizer, images, labels, cmd["steps"])
        else:
            seconds = infer_steps(model, images, cmd["steps"])
        return {"images_per_second": images.shape[0] / seconds}

    return serve(answer)


if __name__ == "__main__":
    raise SystemExit(main())
