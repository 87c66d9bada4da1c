"""Every error the broker raises on purpose, in one tree.

    BrokerError                      retryable=False unless stated
    ├── ConfigError                  the config file is missing or wrong; carries every problem
    ├── KeyringError                 the keyring is missing, unreadable, too open, or malformed
    │   └── DecryptError             a sealed value does not open (wrong key, value moved)
    ├── StartupError                 the daemon cannot start (a listener is taken, a path is wrong)
    ├── StoreError                   the database cannot be reached or is in an unexpected shape
    │   └── ConflictError            a compare-and-swap lost: someone else changed the row first
    └── GrantError                   a request about one grant cannot be satisfied
        ├── BadRequest               the caller's input is malformed
        ├── Forbidden                the caller may not do this
        ├── GrantNotFound            no such PROVIDER/USER
        ├── ReauthRequired           a person must log in again
        └── TokenUnavailable         no valid access token right now   retryable=True

HTTP statuses are chosen in `broker.api` only; messages here never carry a secret.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every deliberate broker error."""

    retryable: bool = False


class ConfigError(BrokerError):
    """The configuration is invalid; `problems` lists every `key: reason` at once."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s):\n{lines}")


class KeyringError(BrokerError):
    """The keyring cannot be used."""


class DecryptError(KeyringError):
    """A sealed value does not open: wrong key, unknown key id, or copied from another row."""


class StartupError(BrokerError):
    """The daemon cannot start; the message says what to fix."""


class StoreError(BrokerError):
    """The store cannot be used."""


class ConflictError(StoreError):
    """A compare-and-swap on a grant's generation lost."""

    retryable = True


class GrantError(BrokerError):
    """A request about one grant cannot be satisfied."""


class BadRequest(GrantError):
    """Malformed input; the message says what."""


class Forbidden(GrantError):
    """The caller may not have this grant or action."""


class GrantNotFound(GrantError):
    """No grant exists at this PROVIDER/USER."""


class ReauthRequired(GrantError):
    """A person must log in again; the message says why."""


class TokenUnavailable(GrantError):
    """No valid access token right now; try again after `retry_after` seconds."""

    retryable = True

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after
