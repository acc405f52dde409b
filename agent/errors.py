"""Error classes. Each carries a one-line message meant for the user."""


class VoiceAgentError(Exception):
    """Base class of every error the agent raises on purpose."""


class ConfigError(VoiceAgentError):
    """A settings file, environment variable or option is unknown or has a bad value."""


class InputError(VoiceAgentError):
    """Bad input from a user or caller: empty text, an unknown voice, a corrupt file."""


class ModelInitializationError(VoiceAgentError):
    """A model could not be loaded (missing weights, no network, wrong format)."""


class InsufficientVRAMError(ModelInitializationError):
    """The GPU has too little free memory for a model."""


class AudioGenerationError(VoiceAgentError):
    """Speech generation failed (after retries, where those apply)."""


class TokenProcessingError(VoiceAgentError):
    """Generated tokens could not be turned into audio codes."""
