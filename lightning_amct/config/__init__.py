"""The retrain config (``.cfg``, AMCT's protobuf text format): loading, validation, positions.

Example:
    >>> from lightning_amct.config import ConfigError, load_config
    >>> try:
    ...     load_config("retrain_weight_quant_config {\\n  arq_retrain { dst_type: INT9 }\\n}")
    ... except ConfigError as error:
    ...     print(error)
    <text>:2:27: retrain_weight_quant_config.arq_retrain.dst_type: unknown value "INT9" (expected INT4, INT8)
"""

from lightning_amct.config.errors import ConfigError, ConfigWarning, FieldPath
from lightning_amct.config.loader import (
    ConfigSource,
    TextOrigin,
    config_source_text,
    load_config,
    load_config_with_locations,
)
from lightning_amct.config.locations import SourceMap

__all__ = [
    "ConfigError",
    "ConfigSource",
    "ConfigWarning",
    "FieldPath",
    "SourceMap",
    "TextOrigin",
    "config_source_text",
    "load_config",
    "load_config_with_locations",
]
