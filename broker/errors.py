"""Every error the broker raises on purpose, in one tree.

    BrokerError                      retryable=False unless stated
    ├── ConfigError                  the config file is missing or wrong; carries every problem
    ├── KeyringError                 the keyring is missing, unreadable, too open, or malformed
    │   └── DecryptError             a sealed value does not open (wrong key, value moved)
    ├── StartupError                 the daemon cannot start (a listener is taken, a path is wrong)
    ├── StoreError                   the database is in an unexpected shape, or refused a write
    │   ├── StoreUnavailable         it cannot be reached or timed out right now  retryable=True
    │   └── ConflictError            a compare-and-swap lost: someone else changed the row first
    ├── IdpError                     a call to the identity provider failed; `outcome` names how
    │   ├── IdpRejected              it answered with an OAuth error: `terminal` (invalid_grant:
    │   │                            the grant is over) or `client_error` (the registration)
    │   ├── IdpUnreachable           the request never left: refused, DNS, TLS   retryable=True
    │   ├── IdpNotProcessed          it said it did not act: 429, 503, 4xx        retryable=True
    │   ├── IdpAmbiguous             it may have been processed: read timeout, reset, 500, 502,
    │   │                            504, a 200 that cannot be used
    │   └── IdTokenInvalid           the ID token failed a check; the message names which
    ├── LoginError                   a login cannot start or complete; the message says why
    └── GrantError                   a request about one grant cannot be satisfied
        ├── BadRequest               the caller's input is malformed
        ├── Forbidden                the caller may not do this
        ├── GrantNotFound            no such PROVIDER/USER
        ├── ReauthRequired           a person must log in again
        ├── TokenUnavailable         no valid access token right now   retryable=True
        └── TooManyHeld              the caller holds as many waiting requests as allowed

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


class StoreUnavailable(StoreError):
    """The database cannot be reached, dropped the connection, or did not answer in time.

    Whether a write in flight when this happened landed is unknown: a retry must recognise its
    own write (the refresher stamps each write with a write id for that).
    """

    retryable = True


class ConflictError(StoreError):
    """A compare-and-swap on a grant's generation lost."""

    retryable = True


class IdpError(BrokerError):
    """A call to the identity provider failed.

    `outcome` is the refresh outcome it stands for (`invalid_grant`, `transient_error`,
    `ambiguous`); `retry_after` is the IdP's Retry-After in seconds, when it sent one.
    """

    outcome = "transient_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdpRejected(IdpError):
    """The IdP answered with an OAuth error; it did not issue tokens.

    Only `invalid_grant` ends a grant (ROTATION.md invariant 5). `invalid_client` and
    `unauthorized_client` are about the client's registration, not the user: they pause
    refreshing for the provider and leave every grant as it is.
    """

    TERMINAL_ERRORS = frozenset({"invalid_grant"})
    CLIENT_ERRORS = frozenset({"invalid_client", "unauthorized_client"})

    def __init__(
        self, error: str, description: str | None, status: int, retry_after: float | None = None
    ) -> None:
        detail = f": {description}" if description else ""
        super().__init__(f"the IdP refused ({status} {error}){detail}", retry_after=retry_after)
        self.error = error
        self.description = description
        self.status = status

    @property
    def terminal(self) -> bool:
        """Whether this error ends the grant (a person must log in again)."""
        return self.error in self.TERMINAL_ERRORS

    @property
    def client_error(self) -> bool:
        """Whether the provider refuses this client (its registration), not the user's grant."""
        return self.error in self.CLIENT_ERRORS

    @property
    def outcome(self) -> str:  # type: ignore[override]
        return "invalid_grant" if self.terminal else "transient_error"


class IdpUnreachable(IdpError):
    """The request never reached the IdP; retrying cannot have side effects."""

    retryable = True


class IdpNotProcessed(IdpError):
    """The IdP answered that it did not act on the request (429, 503, another 4xx): the
    refresh token it carried is unspent; back off and retry with the same token."""

    retryable = True


class IdpAmbiguous(IdpError):
    """The request may have reached the IdP: it may have rotated the refresh token."""

    outcome = "ambiguous"


class IdTokenInvalid(IdpError):
    """The ID token failed validation; the message names the check."""

    outcome = "invalid_grant"


class LoginError(BrokerError):
    """A login cannot start or complete."""


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


class TooManyHeld(GrantError):
    """The caller already holds as many waiting token requests as allowed; try again later."""

    retryable = True

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
