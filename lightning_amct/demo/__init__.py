"""The bundled demo: a small CNN, its LightningModule and the digits data (no download).

``DemoNet`` is plain torch; ``DemoClassifier`` and ``DigitsDataModule`` need Lightning, which is
imported only when one of them is first used.
"""

from lightning_amct.lazy import lazy_exports

_EXPORTS = {
    "DemoClassifier": "lightning_amct.demo.module",
    "DemoNet": "lightning_amct.demo.model",
    "DigitsDataModule": "lightning_amct.demo.data",
    "digits_tensors": "lightning_amct.demo.data",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
