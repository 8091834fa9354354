"""The bundled demo: a small CNN, its LightningModule and the digits data (no download).

``DemoNet`` is plain torch; ``DemoClassifier`` and ``DigitsDataModule`` need Lightning, which is
imported only when one of them is first used.
"""

from lightning_amct.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "lightning_amct.demo.data": ("DigitsDataModule", "digits_tensors"),
        "lightning_amct.demo.model": ("DemoNet",),
        "lightning_amct.demo.module": ("DemoClassifier",),
    },
    globals(),
)
