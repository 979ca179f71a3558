"""Settings, read once from ``.env`` (python-dotenv) and then the environment.

The environment wins over ``.env``; ``.env.example`` lists every setting with its default.
Nothing reads the environment at import: call :meth:`Settings.load` in a composition root.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from dotenv import dotenv_values

__all__ = ["Settings"]


@dataclass(frozen=True)
class Settings:
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    redis_url: str = "redis://localhost:6379/0"
    eda_data_dir: str = "data"
    webhook_secret: str = field(default="", repr=False)  # never in logs
    eda_log_level: str = "INFO"
    eda_log_format: str = "text"

    @property
    def data_dir(self) -> Path:
        return Path(self.eda_data_dir)

    @classmethod
    def load(
        cls,
        env_file: str | os.PathLike[str] | None = ".env",
        environ: Mapping[str, str] | None = None,
    ) -> Settings:
        """Defaults, overridden by ``env_file`` (if it exists), overridden by ``environ``."""
        values: dict[str, str] = {}
        if env_file is not None and Path(env_file).is_file():
            values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        chosen = {}
        for name in known:
            key = name.upper()
            if key in env:
                chosen[name] = env[key]
            elif key in values:
                chosen[name] = values[key]
        settings = cls(**chosen)
        if settings.eda_log_format.lower() not in ("text", "json"):
            raise ValueError(
                f"EDA_LOG_FORMAT must be 'text' or 'json', got {settings.eda_log_format!r}"
            )
        return settings
