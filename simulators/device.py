"""A simulated device's TPM as a device has it: a swtpm, factory-provisioned by a
simulated manufacturer (EK certificates in NV), behind a resource manager (tpm2-abrmd on
a private D-Bus, as /dev/tpmrm0 on hardware) so that several TPM users can share it:
the device SDK, the agent, and the tpm2-openssl provider inside its TLS stack.

    with SimulatedDevice(workdir, manufacturer) as device:
        subprocess.run(["enroll-device", "enroll", "--tcti", device.tcti, ...],
                       env={**os.environ, **device.env})
        with device.environ():              # in this process: TpmDevice(device.tcti)
            ...

``state_dir`` is where `enroll-device enroll` (or the app) keeps the enrollment.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from .abrmd import TabrmdInstance
from .swtpm import SwtpmInstance

if TYPE_CHECKING:
    from .manufacturer import Manufacturer, ProvisionedTpm


class SimulatedDevice:
    """``manufacturer=None`` boots a TPM whose state (``tpm_dir``, default workdir/tpm)
    was provisioned before: a device booting again."""

    def __init__(self, workdir: Path, manufacturer: Manufacturer | None = None, *,
                 tpm_dir: Path | None = None) -> None:
        self.workdir = workdir
        self.state_dir = workdir / "state"
        self.swtpm = SwtpmInstance(tpm_dir or workdir / "tpm")
        self.rm: TabrmdInstance | None = None
        self.provisioned: ProvisionedTpm | None = None
        self._manufacturer = manufacturer

    def start(self) -> Self:
        try:
            self.swtpm.start()
            if self._manufacturer is not None:  # before tpm2-abrmd takes the swtpm
                self.provisioned = self._manufacturer.provision(self.swtpm.tcti)
            self.rm = TabrmdInstance(self.swtpm.tcti)
            self.rm.start()
        except BaseException:
            self.close()
            raise
        return self

    @property
    def tcti(self) -> str:
        """The resource manager's TCTI (needs ``env``)."""
        if self.rm is None:
            raise RuntimeError("the device is not started")
        return self.rm.tcti

    @property
    def env(self) -> dict[str, str]:
        """What a process using the TPM needs in its environment."""
        if self.rm is None:
            raise RuntimeError("the device is not started")
        return dict(self.rm.env)

    @contextlib.contextmanager
    def environ(self) -> Iterator[None]:
        """This process's environment points at the device's TPM while inside."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def close(self) -> None:
        """Power off: tpm2-abrmd and swtpm stop; the TPM state in workdir/tpm stays."""
        try:
            if self.rm is not None:
                self.rm.close()
                self.rm = None
        finally:
            self.swtpm.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
