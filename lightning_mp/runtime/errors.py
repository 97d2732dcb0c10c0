"""Exception types of lightning-mp: each names the problem, the setting involved and the fix."""


class ConfigError(ValueError):
    """A setting lightning-mp cannot use; the message names the key, the value and what is allowed."""


class LayoutError(ConfigError):
    """The parallel layout (dp × pp × tp) does not fit the world size, or a size is invalid."""


class ModelSplitError(ValueError):
    """The model cannot be split into pipeline stages as configured."""


class PipelineError(RuntimeError):
    """A pipeline step could not run: a peer failed, or the model behaved unlike at set-up."""
