"""The tunnel token that keeps a gateway's public URL stable across restarts.

With no token configured, the gateway makes one and saves it in `mcpr.toml`
under `[tunnel]`: tomlkit keeps every other line and comment as the user wrote
them, and the file is written whole to a temporary file and renamed, with
mode 0600 since it now holds a secret.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import tomlkit

from mcpr.common.settings import CONFIG_NAME, ConfigError


def new_token() -> str:
    return "mcpr_" + secrets.token_hex(32)


def save_token(path: Path, token: str) -> None:
    """Write `[tunnel] token = ...` into `path` (created if missing), keeping everything else."""
    try:
        text = path.read_text(encoding="utf-8") if path.exists() else ""
    except OSError as e:
        raise ConfigError(f"{path}: cannot read to save the tunnel token: {e.strerror}") from None
    try:
        document = tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as e:
        raise ConfigError(f"{path}: invalid TOML, cannot save the tunnel token: {e}") from None
    table = document.get("tunnel")
    if table is None:
        table = tomlkit.table()
        document.add("tunnel", table)
    elif not isinstance(table, dict):
        raise ConfigError(f"{path}: key 'tunnel': expected a table, cannot save the tunnel token")
    table["token"] = token
    try:
        fd, temporary = tempfile.mkstemp(prefix=".mcpr.toml.", dir=str(path.parent))
    except OSError as e:
        raise _cannot_save(path, e) from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(tomlkit.dumps(document))
        os.replace(temporary, path)
    except BaseException as e:
        os.unlink(temporary)
        if isinstance(e, OSError):
            raise _cannot_save(path, e) from None
        raise


def _cannot_save(path: Path, error: OSError) -> ConfigError:
    """A folder the gateway may not write (the `mcpr@` unit's read-only /etc/mcpr, a read-only
    checkout): the token must then come from the configuration."""
    return ConfigError(
        f"[tunnel] token: none is configured, and a new one cannot be saved in {path} "
        f"({error.strerror}): set token = \"mcpr_...\" under [tunnel] in {path}, or MCPR_TUNNEL_TOKEN "
        "(a new one: python3 -c 'import secrets; print(\"mcpr_\" + secrets.token_hex(32))')")


def ensure_token(token: str | None, config_path: Path | None, cwd: Path) -> tuple[str, Path | None]:
    """The token to register with, and the file it was just saved to (None if it was configured)."""
    if token:
        return token, None
    path = config_path or cwd / CONFIG_NAME
    token = new_token()
    save_token(path, token)
    return token, path
