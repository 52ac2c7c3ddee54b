"""API keys for the OpenAI server: where they come from and how a request is checked.

Keys come from ``ServeArgs.api_keys_file`` (one key per line; blank lines and ``#`` comments
skipped) and/or the environment variable named by ``ServeArgs.api_keys_env`` (comma-separated),
read where the replica runs. When either is configured, every ``/v1`` request needs
``Authorization: Bearer <key>``. Keys are never logged nor put in error messages.

Example:
    >>> keys = frozenset({"sk-test"})
    >>> bearer_ok("Bearer sk-test", keys), bearer_ok("Bearer nope", keys), bearer_ok(None, keys)
    (True, False, False)
"""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from serve.args import ServeArgs


class ApiKeyConfigError(RuntimeError):
    """API keys are configured but none can be read (the server refuses to start open)."""


def load_api_keys(args: ServeArgs) -> frozenset[str] | None:
    """The accepted keys, or None when the server is open (no key source configured).

    Raises:
        ApiKeyConfigError: the file is unreadable, the variable is unset, or no key is found.
    """
    if args.api_keys_file is None and args.api_keys_env is None:
        return None
    keys: set[str] = set()
    if args.api_keys_file is not None:
        try:
            lines = Path(args.api_keys_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ApiKeyConfigError(
                f"api_keys_file {args.api_keys_file!r} cannot be read ({exc.strerror}): "
                "point it at a file with one API key per line"
            ) from exc
        keys.update(s for line in lines if (s := line.strip()) and not s.startswith("#"))
    if args.api_keys_env is not None:
        value = os.environ.get(args.api_keys_env)
        if value is None:
            raise ApiKeyConfigError(
                f"api_keys_env names ${args.api_keys_env}, which is not set where the server "
                "runs: set it (comma-separated keys) in the replica's environment"
            )
        keys.update(s for part in value.split(",") if (s := part.strip()))
    if not keys:
        raise ApiKeyConfigError(
            "API keys are configured (api_keys_file / api_keys_env) but none was found: add a "
            "key, or remove both settings to serve without authentication"
        )
    return frozenset(keys)


def bearer_ok(authorization: str | None, keys: frozenset[str]) -> bool:
    """Whether an ``Authorization`` header carries one of `keys` (compared in constant time)."""
    if not authorization:
        return False
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    token = token.strip().encode()
    # Check every key (no early exit), so timing does not tell which prefix matched.
    return sum(hmac.compare_digest(token, key.encode()) for key in keys) > 0
