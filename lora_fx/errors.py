"""Exception types. Every error names its culprit (module, key, file, shape)."""


class LoraFxError(ValueError):
    """Base class for lora_fx errors caused by bad input."""


class ConfigError(LoraFxError):
    """A config field has an invalid value."""


class UnsupportedFeatureError(LoraFxError, NotImplementedError):
    """A config asks for a feature lora_fx does not implement yet."""


class TargetNotFoundError(LoraFxError):
    """The target rules matched no module of the model."""


class AdapterFileError(LoraFxError):
    """An adapter directory or file is missing, truncated, or does not fit the model."""
