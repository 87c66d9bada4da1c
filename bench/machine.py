"""What the numbers were measured on: cores, CPU model, disk, Python, and the load meanwhile.

The development machine is shared, so every table names the load average at its start and end:
a figure taken under load says so itself.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Machine:
    """The facts a reader needs to compare a figure with one taken elsewhere."""

    cores: int
    cpu: str
    disk: str
    python: str
    kernel: str

    def describe(self) -> str:
        """One line for a table's heading."""
        return f"{self.cores} cores ({self.cpu}), {self.disk}, Python {self.python}"

    def as_dict(self) -> dict[str, object]:
        """For --json output."""
        return asdict(self)


def machine(directory: Path) -> Machine:
    """The machine, with the disk that holds `directory` (where the stores live)."""
    return Machine(
        cores=os.cpu_count() or 0,
        cpu=_cpu_model(),
        disk=_disk(directory),
        python=platform.python_version(),
        kernel=platform.release(),
    )


def loadavg() -> float:
    """The one-minute load average."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (user, system, interrupts, steal).

    The difference over a run, less the CPU of the benchmark's own processes, is what the
    rest of the machine took meanwhile: the noise in that run's figures.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _disk(directory: Path) -> str:
    """The device and file system under `directory`, and whether the kernel calls it rotational."""
    target = directory.resolve()
    best: tuple[str, str, str] = ("unknown device", "", "")
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return best[0]
    for line in mounts:
        device, mount_point, fs_type = line.split()[:3]
        if target.is_relative_to(mount_point) and len(mount_point) >= len(best[1]):
            best = (device, mount_point, fs_type)
    device, _mount_point, fs_type = best
    kind = ""
    rotational = Path("/sys/block") / Path(device).name / "queue" / "rotational"
    if rotational.exists():
        kind = ", rotational" if rotational.read_text().strip() == "1" else ", non-rotational"
    return f"{device} ({fs_type}{kind})"
