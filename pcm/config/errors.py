"""The error type of every config problem, and the check that raises it."""


class ConfigError(ValueError):
    """A params file or override that cannot be turned into a valid Config."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)
