"""The one error type users see: a single line naming the file, the field and what was expected."""


class ConfigError(ValueError):
    """Bad user input (config, CLI value, data path). The CLI prints it as one line, no traceback."""

    def __init__(self, source: str, field: str, message: str):
        self.source, self.field = source, field
        super().__init__(f"{source}: {field}: {message}")


class DataError(RuntimeError):
    """The data cannot be used (too many bad samples, no shards); names the shard or folder."""
