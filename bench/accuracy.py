"""How much test accuracy does each recipe cost? The demo classifier on the digits, with Lightning.

1. Float pre-training: ``DemoClassifier`` on ``DigitsDataModule`` for ``--pretrain-epochs``.
2. From those weights, ``--finetune-epochs`` more epochs for each contender, all alike (a fresh
   AdamW at ``--finetune-lr``, the same seed, so the same batches):

   * ``float fine-tuned``: no callback; the baseline, trained as long as the others;
   * one run per recipe in ``recipes/``: ``CompressionCallback(recipe)``, which compresses the
     pre-trained model in ``setup`` (channel pruning picks channels from the pre-trained weights,
     IFMR calibrates the clips on the first batch) and trains it; ``quant+outputs`` is
     ``quant.cfg`` with ``quantize_outputs=True``.

Each model is then tested on the digits' test split (20%, 360 images: one image is 0.28 points).
The table gives the test accuracy and the drop from the float baseline, in points, against the
recipe's target (where there is one). The split is fixed; ``--seed`` fixes the initial weights and
the batch order.

Usage (from the repository root)::

    python bench/accuracy.py [--pretrain-epochs 15] [--finetune-epochs 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from lightning_amct import CompressionCallback
from lightning_amct.demo import DemoClassifier, DigitsDataModule

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
BASELINE = "float fine-tuned"

#: recipe -> largest accepted drop from the float baseline, in accuracy points (None: reported only).
#: ``+outputs``: the same recipe with ``quantize_outputs=True`` (the all-integer deploy model).
TARGETS: dict[str, float | None] = {
    "quant": 0.5,
    "quant+outputs": 0.5,
    "a8w4": 1.5,
    "prune": 1.0,
    "selective_prune": 1.0,
    "compressed1": None,
    "compressed2": None,
}


def train(
    module: DemoClassifier, data: DigitsDataModule, epochs: int, seed: int, callbacks: list[pl.Callback]
) -> DemoClassifier:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    return module


def test_accuracy(module: DemoClassifier, data: DigitsDataModule) -> float:
    """Test-split accuracy in percent."""
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    return 100 * trainer.test(module, datamodule=data, verbose=False)[0]["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--finetune-lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipes", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    start = time.perf_counter()

    data = DigitsDataModule(batch_size=64, seed=0)
    pl.seed_everything(args.seed, verbose=False)
    pretrained_module = train(DemoClassifier(), data, args.pretrain_epochs, args.seed, [])
    pretrained = pretrained_module.state_dict()

    def finetuned(callbacks: list[pl.Callback]) -> DemoClassifier:
        module = DemoClassifier(lr=args.finetune_lr)
        module.load_state_dict(pretrained)
        return train(module, data, args.finetune_epochs, args.seed, callbacks)

    results = {"float pre-trained": test_accuracy(pretrained_module, data)}
    results[BASELINE] = test_accuracy(finetuned([]), data)
    for name in args.recipes:
        recipe, _, outputs = name.partition("+")
        callback = CompressionCallback(RECIPES / f"{recipe}.cfg", export=False, quantize_outputs=bool(outputs))
        results[name] = test_accuracy(finetuned([callback]), data)

    print(
        f"demo classifier on the digits: {args.pretrain_epochs} float epochs, then {args.finetune_epochs} "
        f"epochs (AdamW, lr {args.finetune_lr}) with each recipe; baseline: the float model fine-tuned "
        f"the same {args.finetune_epochs} epochs; seed {args.seed}; test split of {len(data.splits['test'])} images"
    )
    print(f"{'recipe':<19}{'test acc %':>11}{'drop (pts)':>12}{'target':>9}  result")
    for name in ("float pre-trained", BASELINE):
        print(f"{name:<19}{results[name]:>11.2f}")
    for name in args.recipes:
        drop = results[BASELINE] - results[name]
        target = TARGETS[name]
        verdict = "reported" if target is None else ("pass" if drop <= target else "FAIL")
        target_text = "-" if target is None else f"<= {target}"
        print(f"{name:<19}{results[name]:>11.2f}{drop:>12.2f}{target_text:>9}  {verdict}")
    print(f"total time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
