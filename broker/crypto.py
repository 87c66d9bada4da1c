"""The keyring and the AES-256-GCM envelopes every stored token is sealed in.

Envelope layout (version 1):

    0x01 | len(key_id) | key_id (ASCII) | nonce (12 bytes) | ciphertext + GCM tag (16 bytes)

The associated data is the envelope header plus the table, row id and column the value belongs
to, so a ciphertext copied to another row or column, or relabelled with another key id, fails
to open.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from broker.errors import DecryptError, KeyringError

ENVELOPE_VERSION = 1
NONCE_BYTES = 12
KEY_BYTES = 32
KEYRING_FORMAT = "token-broker-keyring/1"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
CREDENTIAL_NAME = "token-broker-keys"
KEY_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


def _aad(header: bytes, table: str, row_id: str, column: str) -> bytes:
    return b"\x00".join([b"token-broker", header, table.encode(), row_id.encode(), column.encode()])


def envelope_key_id(envelope: bytes) -> str:
    """The key id an envelope names, without opening it."""
    if len(envelope) < 2 or envelope[0] != ENVELOPE_VERSION:
        raise DecryptError("sealed value has an unknown envelope version")
    end = 2 + envelope[1]
    if len(envelope) < end + NONCE_BYTES + 16:
        raise DecryptError("sealed value is truncated")
    try:
        return envelope[2:end].decode("ascii")
    except UnicodeDecodeError:  # a tampered header must fail like any other tampering
        raise DecryptError("sealed value has a malformed key id") from None


@dataclass(frozen=True, slots=True)
class Keyring:
    """Named 256-bit keys, one of them primary: new values are sealed with the primary."""

    primary: str
    keys: Mapping[str, bytes] = field(repr=False)
    # One cipher object per key, made once: building one costs more than a decryption.
    _ciphers: Mapping[str, AESGCM] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.primary not in self.keys:
            raise KeyringError(f"primary key {self.primary!r} is not in the keyring")
        for key_id, key in self.keys.items():
            if not KEY_ID_RE.fullmatch(key_id):
                raise KeyringError(f"key id {key_id!r} is not of the form [A-Za-z0-9._-]{{1,64}}")
            if len(key) != KEY_BYTES:
                raise KeyringError(f"key {key_id!r} is not {KEY_BYTES} bytes long")
        object.__setattr__(self, "keys", MappingProxyType(dict(self.keys)))
        ciphers = {key_id: AESGCM(key) for key_id, key in self.keys.items()}
        object.__setattr__(self, "_ciphers", MappingProxyType(ciphers))

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary!r}, key_ids={sorted(self.keys)!r})"

    @classmethod
    def generate(cls, now: datetime) -> Keyring:
        """A keyring holding one fresh random primary key."""
        key_id = _new_key_id(now)
        return cls(primary=key_id, keys={key_id: AESGCM.generate_key(bit_length=256)})

    def with_new_primary(self, now: datetime) -> Keyring:
        """This keyring plus a fresh primary key; old keys stay to open old values."""
        key_id = _new_key_id(now)
        while key_id in self.keys:
            key_id = _new_key_id(now)
        keys = dict(self.keys)
        keys[key_id] = AESGCM.generate_key(bit_length=256)
        return Keyring(primary=key_id, keys=keys)

    def seal(self, plaintext: str, *, table: str, row_id: str, column: str) -> bytes:
        """Encrypt `plaintext` with the primary key, bound to its table, row and column."""
        key_id = self.primary.encode("ascii")
        header = bytes([ENVELOPE_VERSION, len(key_id)]) + key_id
        nonce = os.urandom(NONCE_BYTES)
        aad = _aad(header, table, row_id, column)
        ciphertext = self._ciphers[self.primary].encrypt(nonce, plaintext.encode(), aad)
        return header + nonce + ciphertext

    def open(self, envelope: bytes, *, table: str, row_id: str, column: str) -> str:
        """Decrypt an envelope sealed for exactly this table, row and column."""
        key_id = envelope_key_id(envelope)
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptError(
                f"{table}.{column} of row {row_id} is sealed with key {key_id!r}, "
                "which is not in the keyring"
            )
        header_end = 2 + len(key_id)
        header = envelope[:header_end]
        nonce = envelope[header_end : header_end + NONCE_BYTES]
        ciphertext = envelope[header_end + NONCE_BYTES :]
        try:
            plaintext = cipher.decrypt(nonce, ciphertext, _aad(header, table, row_id, column))
        except InvalidTag:
            raise DecryptError(
                f"{table}.{column} of row {row_id} does not open with key {key_id!r}: "
                "the key is wrong or the value was moved from another row"
            ) from None
        return plaintext.decode()


def _new_key_id(now: datetime) -> str:
    return f"k{now:%Y%m%d}-{secrets.token_hex(3)}"


def keyring_path(configured: Path, environ: Mapping[str, str]) -> Path:
    """$CREDENTIALS_DIRECTORY/token-broker-keys under systemd credentials, else `configured`."""
    creds = environ.get(CREDENTIALS_ENV)
    if creds:
        return Path(creds) / CREDENTIAL_NAME
    return configured


def load_keyring(path: Path) -> Keyring:
    """Read and check a keyring file; refuse one that group or others can read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyringError(
            f"keyring {path} does not exist; create one with `token-broker keys generate`"
        ) from None
    except OSError as exc:
        raise KeyringError(f"keyring {path} cannot be opened: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise KeyringError(
                f"keyring {path} is readable by group or others (mode {mode:04o}); "
                f"run `chmod 600 {path}`"
            )
        raw = handle.read()
    return parse_keyring(raw, source=str(path))


def parse_keyring(raw: bytes, *, source: str) -> Keyring:
    """Parse the JSON keyring format; errors name the file but never a key."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeyringError(f"keyring {source} is not valid JSON") from None
    if not isinstance(data, dict) or data.get("format") != KEYRING_FORMAT:
        raise KeyringError(f"keyring {source} is not a {KEYRING_FORMAT} file")
    primary, encoded = data.get("primary"), data.get("keys")
    if not isinstance(primary, str) or not isinstance(encoded, dict) or not encoded:
        raise KeyringError(f"keyring {source} needs a `primary` key id and a `keys` table")
    keys: dict[str, bytes] = {}
    for key_id, value in encoded.items():
        try:
            keys[key_id] = base64.urlsafe_b64decode(str(value).encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raise KeyringError(f"keyring {source}: key {key_id!r} is not base64") from None
    try:
        return Keyring(primary=primary, keys=keys)
    except KeyringError as exc:
        raise KeyringError(f"keyring {source}: {exc}") from None


def dump_keyring(keyring: Keyring) -> bytes:
    """The file form of a keyring."""
    data = {
        "format": KEYRING_FORMAT,
        "primary": keyring.primary,
        "keys": {k: base64.urlsafe_b64encode(v).decode("ascii") for k, v in keyring.keys.items()},
    }
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_keyring(path: Path, keyring: Keyring, *, replace: bool) -> None:
    """Write a keyring atomically with mode 0600; without `replace`, refuse an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(dump_keyring(keyring))
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            tmp.replace(path)
        else:
            try:
                os.link(tmp, path)  # fails if the target exists: no race with another writer
            except FileExistsError:
                raise KeyringError(
                    f"keyring {path} already exists; refusing to overwrite it "
                    "(use `token-broker keys rotate` to add a key)"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
