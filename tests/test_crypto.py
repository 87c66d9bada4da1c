"""The keyring file and the AES-256-GCM envelopes that seal every stored token."""

from __future__ import annotations

import base64
import json
import os
import stat
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from broker.crypto import (
    KEYRING_FORMAT,
    Keyring,
    dump_keyring,
    envelope_key_id,
    keyring_path,
    load_keyring,
    write_keyring,
)
from broker.errors import DecryptError, KeyringError

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
PLACE = {"table": "grants", "row_id": "row-1", "column": "refresh_token"}
HEADER_END = 2 + len("k20261121-abcdef")  # version byte, length byte, a generated key id


def _two_key_keyring(old: bytes, new: bytes) -> Keyring:
    """A keyring with key ids of equal length, `new` primary."""
    return Keyring(primary="new", keys={"old": old, "new": new})


def _flip(envelope: bytes, index: int, mask: int) -> bytes:
    tampered = bytearray(envelope)
    tampered[index] ^= mask
    return bytes(tampered)


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def _key_material(keyring: Keyring) -> list[str]:
    """Every way a key could show up in a message: raw bytes' repr, hex, and its base64."""
    forms: list[str] = []
    for key in keyring.keys.values():
        encoded = base64.urlsafe_b64encode(key).decode()
        forms += [repr(key), key.hex(), encoded, encoded[:40]]
    return forms


def _rendered(exc: BaseException) -> str:
    """The message and the traceback as a log line would show them."""
    return str(exc) + "".join(traceback.format_exception(exc))


# -- envelopes ------------------------------------------------------------------------------


def test_sealed_value_opens_to_its_plaintext(
    keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """A value sealed for a place opens there to the same plaintext."""
    value = new_secret("rt")
    assert keyring.open(keyring.seal(value, **PLACE), **PLACE) == value


def test_empty_and_unicode_values_round_trip(keyring: Keyring) -> None:
    """Empty strings and non-ASCII text survive sealing unchanged."""
    for value in ("", "ünïcødé ✓ 🔑"):
        assert keyring.open(keyring.seal(value, **PLACE), **PLACE) == value


@pytest.mark.parametrize(
    "moved",
    [{"row_id": "row-2"}, {"column": "access_token"}, {"table": "logins"}],
    ids=["other-row", "other-column", "other-table"],
)
def test_sealed_value_moved_elsewhere_does_not_open(
    keyring: Keyring, new_secret: Callable[[str], str], moved: dict[str, str]
) -> None:
    """A ciphertext copied to another row id, column or table fails to open."""
    sealed = keyring.seal(new_secret("rt"), **PLACE)
    with pytest.raises(DecryptError):
        keyring.open(sealed, **{**PLACE, **moved})


@pytest.mark.parametrize(
    ("index", "mask"),
    [
        (0, 0x01),  # version
        (1, 0x01),  # key id length
        (2, 0x01),  # key id, still ASCII
        (2, 0x80),  # key id, no longer ASCII
        (HEADER_END, 0x01),  # nonce
        (HEADER_END + 12, 0x01),  # ciphertext
        (-1, 0x01),  # GCM tag
    ],
    ids=["version", "length", "key-id", "key-id-non-ascii", "nonce", "ciphertext", "tag"],
)
def test_tampered_byte_does_not_open(
    keyring: Keyring, new_secret: Callable[[str], str], index: int, mask: int
) -> None:
    """Changing any one byte of the header, nonce, ciphertext or tag raises DecryptError."""
    sealed = keyring.seal(new_secret("rt"), **PLACE)
    assert len(keyring.primary) + 2 == HEADER_END
    with pytest.raises(DecryptError):
        keyring.open(_flip(sealed, index, mask), **PLACE)


def test_relabelled_key_id_does_not_open(new_secret: Callable[[str], str]) -> None:
    """Renaming the key id in the header fails even when both ids hold the same key bytes."""
    same = os.urandom(32)
    keyring = _two_key_keyring(old=same, new=same)
    sealed = keyring.seal(new_secret("rt"), **PLACE)
    relabelled = sealed.replace(b"new", b"old", 1)
    assert envelope_key_id(relabelled) == "old"
    with pytest.raises(DecryptError):
        keyring.open(relabelled, **PLACE)


def test_envelope_starts_with_version_one_and_names_its_key(keyring: Keyring) -> None:
    """An envelope's first byte is 1 and its header names the primary key id."""
    sealed = keyring.seal("value", **PLACE)
    assert sealed[0] == 1
    assert envelope_key_id(sealed) == keyring.primary


def test_sealing_twice_gives_different_envelopes(keyring: Keyring) -> None:
    """Each seal draws a fresh nonce, so equal plaintexts never give equal ciphertexts."""
    first, second = (keyring.seal("same value", **PLACE) for _ in range(2))
    assert first != second
    assert first[HEADER_END : HEADER_END + 12] != second[HEADER_END : HEADER_END + 12]


@pytest.mark.parametrize(
    "envelope", [b"", b"\x01", b"\x02\x03abc" + bytes(28), b"\x01\x03abc" + bytes(27)]
)
def test_malformed_envelope_key_id_raises_decrypt_error(envelope: bytes) -> None:
    """Empty, unknown-version or truncated envelopes raise DecryptError, not IndexError."""
    with pytest.raises(DecryptError):
        envelope_key_id(envelope)


def test_wrong_key_bytes_fail_without_showing_plaintext(
    keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """A keyring with the same key id but other bytes fails, and says nothing of the value."""
    value = new_secret("rt")
    sealed = keyring.seal(value, **PLACE)
    impostor = Keyring(primary=keyring.primary, keys={keyring.primary: os.urandom(32)})
    with pytest.raises(DecryptError) as caught:
        impostor.open(sealed, **PLACE)
    assert value not in _rendered(caught.value)
    assert keyring.primary in str(caught.value)


def test_unknown_key_id_is_named_in_the_error(keyring: Keyring) -> None:
    """Opening with a keyring that lacks the envelope's key says which key id is missing."""
    sealed = keyring.seal("value", **PLACE)
    with pytest.raises(DecryptError, match=keyring.primary):
        Keyring.generate(NOW).open(sealed, **PLACE)


# -- keyrings -------------------------------------------------------------------------------


def test_generate_makes_one_random_32_byte_primary_key() -> None:
    """A generated keyring holds exactly its primary, 32 random bytes long."""
    first, second = Keyring.generate(NOW), Keyring.generate(NOW)
    assert list(first.keys) == [first.primary]
    assert len(first.keys[first.primary]) == 32
    assert first.keys[first.primary] != second.keys[second.primary]


def test_new_primary_keeps_old_keys_and_opens_old_values(
    keyring: Keyring, new_secret: Callable[[str], str]
) -> None:
    """After adding a primary, old values still open and new values use the new key."""
    value = new_secret("rt")
    old_sealed = keyring.seal(value, **PLACE)
    rotated = keyring.with_new_primary(NOW)
    assert rotated.primary != keyring.primary
    assert rotated.keys[keyring.primary] == keyring.keys[keyring.primary]
    assert len(rotated.keys[rotated.primary]) == 32
    assert rotated.open(old_sealed, **PLACE) == value
    assert envelope_key_id(rotated.seal(value, **PLACE)) == rotated.primary


def test_keyring_repr_shows_key_ids_only(keyring: Keyring) -> None:
    """A keyring's repr lists its key ids and none of its key material."""
    shown = repr(keyring)
    assert keyring.primary in shown
    assert not any(form in shown for form in _key_material(keyring))


@pytest.mark.parametrize(
    "keys",
    [{"k1": bytes(16)}, {"bad id!": bytes(32)}],
    ids=["short-key", "bad-key-id"],
)
def test_keyring_refuses_bad_keys(keys: dict[str, bytes]) -> None:
    """A key of the wrong length or a malformed key id is refused when the keyring is built."""
    with pytest.raises(KeyringError):
        Keyring(primary=next(iter(keys)), keys=keys)


def test_keyring_refuses_a_primary_it_does_not_hold() -> None:
    """The primary key id must be one of the keyring's keys."""
    with pytest.raises(KeyringError, match="k2"):
        Keyring(primary="k2", keys={"k1": bytes(32)})


# -- the keyring file -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_a_file_group_or_others_can_read(
    tmp_path: Path, keyring: Keyring, mode: int
) -> None:
    """A keyring readable beyond its owner is refused with the chmod that fixes it."""
    path = _write(tmp_path / "keys", dump_keyring(keyring), mode)
    with pytest.raises(KeyringError, match="chmod 600") as caught:
        load_keyring(path)
    assert not any(form in _rendered(caught.value) for form in _key_material(keyring))


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_load_accepts_an_owner_only_file(tmp_path: Path, keyring: Keyring, mode: int) -> None:
    """Modes 0600 and 0400 load back the keyring that was written."""
    loaded = load_keyring(_write(tmp_path / "keys", dump_keyring(keyring), mode))
    assert loaded.primary == keyring.primary
    assert dict(loaded.keys) == dict(keyring.keys)


def test_load_of_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    """A missing keyring file points at `token-broker keys generate`."""
    with pytest.raises(KeyringError, match="token-broker keys generate"):
        load_keyring(tmp_path / "absent")


def _truncated(keyring: Keyring) -> bytes:
    return dump_keyring(keyring)[:-4]


def _wrong_format(keyring: Keyring) -> bytes:
    data = json.loads(dump_keyring(keyring))
    return json.dumps({**data, "format": "some-other-keyring/2"}).encode()


def _not_an_object(keyring: Keyring) -> bytes:
    return json.dumps(list(json.loads(dump_keyring(keyring))["keys"].values())).encode()


def _bad_base64(keyring: Keyring) -> bytes:
    data = json.loads(dump_keyring(keyring))
    data["keys"][keyring.primary] = data["keys"][keyring.primary][:-2]  # breaks the padding
    return json.dumps(data).encode()


def _short_key(keyring: Keyring) -> bytes:
    data = json.loads(dump_keyring(keyring))
    short = keyring.keys[keyring.primary][:16]
    data["keys"][keyring.primary] = base64.urlsafe_b64encode(short).decode()
    return json.dumps(data).encode()


def _no_keys(keyring: Keyring) -> bytes:
    return json.dumps({"format": KEYRING_FORMAT, "primary": keyring.primary, "keys": {}}).encode()


@pytest.mark.parametrize(
    "corrupt", [_truncated, _wrong_format, _not_an_object, _bad_base64, _short_key, _no_keys]
)
def test_malformed_keyring_file_fails_without_showing_key_material(
    tmp_path: Path, keyring: Keyring, corrupt: Callable[[Keyring], bytes]
) -> None:
    """Bad JSON, a wrong format, bad base64 or a wrong key length raise a KeyringError without
    any key material in its message or traceback."""
    path = _write(tmp_path / "keys", corrupt(keyring), 0o600)
    with pytest.raises(KeyringError) as caught:
        load_keyring(path)
    assert str(path) in str(caught.value)
    assert not any(form in _rendered(caught.value) for form in _key_material(keyring))


def test_write_creates_an_owner_only_file_that_loads(tmp_path: Path, keyring: Keyring) -> None:
    """A new keyring file has mode 0600 and loads back to the same keys."""
    path = tmp_path / "etc" / "keys"
    write_keyring(path, keyring, replace=False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert dict(load_keyring(path).keys) == dict(keyring.keys)
    assert sorted(p.name for p in path.parent.iterdir()) == ["keys"]


def test_write_refuses_to_overwrite_and_leaves_the_file_alone(
    tmp_path: Path, keyring: Keyring
) -> None:
    """Without replace=True an existing keyring is refused and stays byte for byte the same."""
    path = tmp_path / "keys"
    write_keyring(path, keyring, replace=False)
    before = path.read_bytes()
    with pytest.raises(KeyringError, match="already exists"):
        write_keyring(path, Keyring.generate(NOW), replace=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_write_with_replace_swaps_the_file_atomically(tmp_path: Path, keyring: Keyring) -> None:
    """replace=True puts a new file in place by rename: a reader of the old one sees it whole."""
    path = tmp_path / "keys"
    write_keyring(path, keyring, replace=False)
    rotated = keyring.with_new_primary(NOW)
    with path.open("rb") as old_reader:
        write_keyring(path, rotated, replace=True)
        assert old_reader.read() == dump_keyring(keyring)
    assert load_keyring(path).primary == rotated.primary
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys"]


def test_keyring_path_prefers_systemd_credentials() -> None:
    """$CREDENTIALS_DIRECTORY/token-broker-keys wins over the configured path when set."""
    configured = Path("/etc/token-broker/keys")
    creds = {"CREDENTIALS_DIRECTORY": "/run/credentials/token-broker.service"}
    expected = Path("/run/credentials/token-broker.service/token-broker-keys")
    assert keyring_path(configured, creds) == expected
    assert keyring_path(configured, {}) == configured
    assert keyring_path(configured, {"CREDENTIALS_DIRECTORY": ""}) == configured
