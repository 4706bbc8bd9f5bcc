"""The exceptions keypulse raises on purpose.

    KeypulseError
    ├── ConfigError          settings missing, malformed or unsafe
    ├── DependencyError      a required program (java, mvn) is not installed
    └── ServiceError         Kafka or ClickHouse unreachable or refusing
"""


class KeypulseError(Exception):
    """Base of every error keypulse raises deliberately; the CLI prints it as one line."""


class ConfigError(KeypulseError):
    """A setting is missing, malformed or unsafe."""


class DependencyError(KeypulseError):
    """A program keypulse needs (Java, Maven) is missing."""


class ServiceError(KeypulseError):
    """Kafka or ClickHouse did not answer, or refused what we asked."""
