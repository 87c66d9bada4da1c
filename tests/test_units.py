"""The systemd units in systemd/: valid to systemd's own tools, hardened, consistent with the code.

systemd's checkers run on the files as shipped wherever they can. `systemd-analyze verify` is
the exception: it rejects a unit whose ExecStart= binary does not exist, and the shipped unit
names /usr/bin/token-broker, where a distribution package puts it. So verify runs on copies in
which that one line points at the entry point of the environment under test (and the copy is
checked to differ in nothing else). The machine does not need systemd as init: nothing here
starts a unit. Without systemd's tools those tests skip, unless TOKEN_BROKER_REQUIRE_TOOLS=1.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from broker.config import CONFIG_ENV, DEFAULT_CONFIG_PATH, ServerConfig, StoreConfig
from broker.crypto import CREDENTIAL_NAME, CREDENTIALS_ENV, keyring_path
from broker.daemon import API_FD_NAME

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICE = UNITS / "token-broker.service"
SOCKET = UNITS / "token-broker.socket"
SYSUSERS = UNITS / "sysusers.d" / "token-broker.conf"
TMPFILES = UNITS / "tmpfiles.d" / "token-broker.conf"
SHIPPED_EXECUTABLE = "/usr/bin/token-broker"
MAX_EXPOSURE = 2.0  # systemd-analyze security: 0 is locked down, 10 is unprotected
REQUIRE_TOOLS_ENV = "TOKEN_BROKER_REQUIRE_TOOLS"
TOOL_TIMEOUT = 60.0
EXPOSURE_RE = re.compile(r"Overall exposure level for token-broker\.service: (\d+\.\d+)")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """The unit file as section -> key -> every value assigned, in order."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} comes before any [section]"
        assert "=" in line, f"{path.name}: {line!r} is not KEY=VALUE"
        assert not line.endswith("\\"), f"{path.name}: continuation lines are not parsed here"
        key, _, value = line.partition("=")
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def one(section: dict[str, list[str]], key: str) -> str:
    """The single value of `key` in a unit's section."""
    values = section.get(key, [])
    assert len(values) == 1, f"{key}= is set {len(values)} times, expected once"
    return values[0]


def sysusers_entries() -> list[list[str]]:
    """The sysusers.d lines as fields (quoted GECOS kept whole)."""
    lines = SYSUSERS.read_text().splitlines()
    return [shlex.split(line) for line in lines if line.strip() and not line.startswith("#")]


def tool(name: str) -> str:
    """The path of one of systemd's tools; skip (or fail, when required) without it."""
    path = shutil.which(name)
    if path is None:
        reason = f"{name} is not installed (it ships with systemd)"
        if os.environ.get(REQUIRE_TOOLS_ENV) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_TOOLS_ENV}=1 makes that a failure")
        pytest.skip(reason)
    return path


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run a tool without a pager or colours and capture what it says."""
    env = os.environ | {"SYSTEMD_PAGER": "cat", "SYSTEMD_COLORS": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(
        argv, check=False, capture_output=True, encoding="utf-8", env=env, timeout=TOOL_TIMEOUT
    )


def entry_point() -> Path:
    """The `token-broker` command of the environment running the tests."""
    beside = Path(sys.executable).with_name("token-broker")
    found = shutil.which("token-broker")
    for candidate in (beside, Path(found) if found else None):
        if candidate is not None and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("the token-broker command is not installed in this environment (pip install -e .)")


def installable_copies(directory: Path, executable: Path) -> list[Path]:
    """The service and socket in `directory`, ExecStart= pointing at `executable`."""
    shipped = SERVICE.read_text()
    patched = shipped.replace(f"ExecStart={SHIPPED_EXECUTABLE} ", f"ExecStart={executable} ")
    changed = [
        (old, new)
        for old, new in zip(shipped.splitlines(), patched.splitlines(), strict=True)
        if old != new
    ]
    assert len(changed) == 1, f"expected to change exactly the ExecStart= line, changed {changed}"
    (directory / SERVICE.name).write_text(patched)
    shutil.copy(SOCKET, directory / SOCKET.name)
    return [directory / SERVICE.name, directory / SOCKET.name]


def verify(*units: Path) -> str:
    """Everything `systemd-analyze verify` says about `units`; empty means no finding."""
    analyze = tool("systemd-analyze")
    result = run(analyze, "--no-pager", "verify", "--man=no", "--generators=no", *map(str, units))
    # verify exits 0 on unknown settings and many other warnings, so its output is the verdict.
    findings = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        findings = f"exit status {result.returncode}\n{findings}"
    return findings


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify has nothing to say about the service and socket units."""
    assert verify(*installable_copies(tmp_path, entry_point())) == ""


def test_verify_check_catches_a_misspelled_setting(tmp_path: Path) -> None:
    """The verify check is not blind: a misspelled setting is reported as an unknown key."""
    service, socket_unit = installable_copies(tmp_path, entry_point())
    text = service.read_text()
    assert "\nProtectSystem=strict\n" in text
    service.write_text(text.replace("\nProtectSystem=strict\n", "\nProtectSystm=strict\n"))
    findings = verify(service, socket_unit)
    assert "Unknown key" in findings
    assert "ProtectSystm" in findings


@pytest.mark.skipif(
    Path(SHIPPED_EXECUTABLE).exists(), reason=f"{SHIPPED_EXECUTABLE} exists on this machine"
)
def test_verify_rejects_the_shipped_path_where_it_is_absent() -> None:
    """Unpatched, verify reports the missing /usr/bin/token-broker: why the test copies exist."""
    findings = verify(SERVICE, SOCKET)
    assert SHIPPED_EXECUTABLE in findings
    assert "not executable" in findings


def test_service_exposure_is_at_most_two() -> None:
    """systemd-analyze security rates the shipped service's exposure 2.0 or better."""
    analyze = tool("systemd-analyze")
    result = run(analyze, "--no-pager", "security", "--offline=yes", str(SERVICE))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    match = EXPOSURE_RE.search(result.stdout)
    assert match is not None, result.stdout
    score = float(match.group(1))
    exposed = [line for line in result.stdout.splitlines() if line.startswith("✗")]
    print(f"\noverall exposure {score} (at most {MAX_EXPOSURE}); still exposed:")
    print("\n".join(exposed))
    assert score <= MAX_EXPOSURE


def test_service_keeps_callers_uids_visible() -> None:
    """No user namespace: the daemon must see each caller's real uid through SO_PEERCRED."""
    service = parse_unit(SERVICE)["Service"]
    assert service.get("PrivateUsers", ["no"])[-1] in ("no", "false", "0", "off")
    assert "DynamicUser" not in service  # the socket is owned by the static user


def test_sysusers_creates_the_user_and_groups_the_units_name(tmp_path: Path) -> None:
    """systemd-sysusers accepts the file and creates every user and group the units name."""
    sysusers = tool("systemd-sysusers")
    (tmp_path / "etc").mkdir()
    result = run(sysusers, f"--root={tmp_path}", str(SYSUSERS))
    assert result.returncode == 0, result.stderr
    complaints = [line for line in result.stderr.splitlines() if not line.startswith("Creating ")]
    assert complaints == []
    users = {line.split(":")[0] for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}

    service, socket_unit = parse_unit(SERVICE)["Service"], parse_unit(SOCKET)["Socket"]
    assert {service["User"][-1], socket_unit["SocketUser"][-1]} <= users
    assert {service["Group"][-1], socket_unit["SocketGroup"][-1]} <= groups
    assert socket_unit["SocketGroup"][-1] != service["Group"][-1]  # clients are not the daemon


def test_tmpfiles_creates_the_config_directory_for_the_daemon_group(tmp_path: Path) -> None:
    """systemd-tmpfiles makes /etc/token-broker root-owned, readable by the daemon's group only."""
    sysusers, tmpfiles = tool("systemd-sysusers"), tool("systemd-tmpfiles")
    if os.geteuid() != 0:
        pytest.skip("creating a directory owned by root and another group needs root")
    (tmp_path / "etc").mkdir()
    assert run(sysusers, f"--root={tmp_path}", str(SYSUSERS)).returncode == 0
    result = run(tmpfiles, "--create", f"--root={tmp_path}", str(TMPFILES))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    service = parse_unit(SERVICE)["Service"]
    config_dir = Path("/etc") / service["ConfigurationDirectory"][-1]
    assert config_dir == DEFAULT_CONFIG_PATH.parent
    made = (tmp_path / config_dir.relative_to("/")).stat()
    group_line = next(
        line.split(":")
        for line in (tmp_path / "etc/group").read_text().splitlines()
        if line.startswith(f"{service['Group'][-1]}:")
    )
    assert made.st_uid == 0
    assert made.st_gid == int(group_line[2])
    assert f"{made.st_mode & 0o7777:04o}" == service["ConfigurationDirectoryMode"][-1] == "0750"


def test_tmpfiles_and_sysusers_name_the_same_group() -> None:
    """The config directory's group is the daemon's group as sysusers.d creates it."""
    entries = [line.split() for line in TMPFILES.read_text().splitlines() if line[:1] == "d"]
    assert entries == [["d", str(DEFAULT_CONFIG_PATH.parent), "0750", "root", "token-broker", "-"]]
    created = {(fields[0], fields[1]) for fields in sysusers_entries()}
    assert ("u", entries[0][4]) in created  # a "u" line also creates the user's own group
    assert parse_unit(SERVICE)["Service"]["Group"] == [entries[0][4]]


def test_socket_unit_matches_the_daemons_defaults() -> None:
    """The socket is the config's default path and mode, and is passed under the fd name "api"."""
    socket_unit = parse_unit(SOCKET)
    default = ServerConfig()
    assert one(socket_unit["Socket"], "ListenStream") == str(default.socket)
    assert int(one(socket_unit["Socket"], "SocketMode"), 8) == default.socket_mode
    assert one(socket_unit["Socket"], "FileDescriptorName") == API_FD_NAME == "api"
    assert one(socket_unit["Socket"], "Service") == SERVICE.name
    assert one(socket_unit["Socket"], "RemoveOnStop") == "yes"
    assert ["g", one(socket_unit["Socket"], "SocketGroup")] in [e[:2] for e in sysusers_entries()]

    service = parse_unit(SERVICE)
    assert SOCKET.name in service["Unit"]["Requires"]
    assert SOCKET.name in service["Unit"]["After"]
    # RuntimeDirectory= would be removed when the service stops, taking the socket file with it.
    assert "RuntimeDirectory" not in service["Service"]


def test_keyring_credential_is_the_one_the_daemon_reads(tmp_path: Path) -> None:
    """LoadCredential= passes store.key_file's default under the name broker.crypto looks for."""
    name, _, source = one(parse_unit(SERVICE)["Service"], "LoadCredential").partition(":")
    assert name == CREDENTIAL_NAME
    assert Path(source) == StoreConfig().key_file
    environ = {CREDENTIALS_ENV: str(tmp_path)}
    assert keyring_path(Path(source), environ) == tmp_path / name


def test_reload_sends_sighup_to_the_main_process() -> None:
    """systemctl reload sends SIGHUP to the daemon itself, which re-reads its config."""
    service = parse_unit(SERVICE)["Service"]
    argv = shlex.split(one(service, "ExecReload"))
    assert Path(argv[0]).name == "kill"
    assert argv[-1] == "$MAINPID"
    flag = argv[1].removeprefix("-").removeprefix("SIG")
    assert flag in ("HUP", str(int(signal.SIGHUP)))
    assert len(argv) == 3


def test_service_speaks_the_notify_protocol_with_a_watchdog() -> None:
    """Type=notify from the main process only, a watchdog, and a restart when it fires."""
    service = parse_unit(SERVICE)["Service"]
    # systemd 252 lacks Type=notify-reload (253+); ExecReload= covers reloads instead.
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert re.fullmatch(r"[1-9][0-9]*s", service["WatchdogSec"][-1])
    assert service["Restart"] == ["on-failure"]
    argv = shlex.split(one(service, "ExecStart"))
    assert argv == [SHIPPED_EXECUTABLE, "serve"]


def test_defaults_live_in_the_directories_systemd_manages() -> None:
    """The default config, store and keyring paths sit in the unit's managed directories."""
    service = parse_unit(SERVICE)["Service"]
    assert service["Environment"] == [f"{CONFIG_ENV}={DEFAULT_CONFIG_PATH}"]
    assert DEFAULT_CONFIG_PATH.parent == Path("/etc") / service["ConfigurationDirectory"][-1]
    assert StoreConfig().key_file.parent == DEFAULT_CONFIG_PATH.parent
    store = Path(StoreConfig().url.removeprefix("sqlite:///"))
    assert store.parent == Path("/var/lib") / service["StateDirectory"][-1]
    assert service["StateDirectoryMode"] == ["0700"]
    assert service["UMask"] == ["0077"]
