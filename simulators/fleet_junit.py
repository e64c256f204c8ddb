"""A fleet report as JUnit XML, the test-result format CI systems read (GitHub Actions
test reporters, GitLab's `artifacts:reports:junit`, Jenkins).

One <testsuite> per phase (fleet.provision, fleet.first_boot, fleet.renewal,
fleet.revocation, fleet.readmission, load.enroll) plus fleet.invariants; one <testcase>
per device and phase, named after the device's index ("device-0007", stable for a given
--seed, so CI tracks a case across runs) with the device id in <system-out>. A failure
carries the refusal code as its type and the code and device id in its message:

    <failure type="ek.untrusted" message="ek.untrusted (device 9f2c...): first boot: ...">

The shape is the common JUnit one (testsuites > testsuite > testcase > failure | error |
skipped, system-out; counts and times as attributes) that junitparser and the CI systems
above parse.
"""

from __future__ import annotations

import datetime as dt
import socket
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from .fleet_report import PHASES


def _seconds(ms: float | None) -> str:
    return f"{(ms or 0) / 1000:.3f}"


def _case(suite: ET.Element, classname: str, name: str, outcome: dict[str, Any],
          device_id: str | None, role: str | None = None) -> None:
    case = ET.SubElement(suite, "testcase", classname=classname, name=name,
                         time=_seconds(outcome.get("ms")))
    kind = outcome["outcome"]
    message = outcome.get("message", "")
    code = outcome.get("code", "")
    if kind in ("failed", "error"):
        tag = "failure" if kind == "failed" else "error"
        element = ET.SubElement(case, tag, type=code or tag,
                                message=f"{code} (device {device_id or 'unknown'}): {message}")
        element.text = message
    elif kind == "skipped":
        ET.SubElement(case, "skipped", message=message)
    out = f"device_id={device_id or ''}" + (f"\nrole={role}" if role else "")
    if code:
        out += f"\ncode={code}"
    if kind == "passed" and message:
        out += f"\n{message}"
    ET.SubElement(case, "system-out").text = out


def _finish(suite: ET.Element) -> tuple[int, int, int, int, float]:
    cases = suite.findall("testcase")
    counts = (len(cases), sum(c.find("failure") is not None for c in cases),
              sum(c.find("error") is not None for c in cases),
              sum(c.find("skipped") is not None for c in cases),
              sum(float(c.get("time", "0")) for c in cases))
    for attribute, value in zip(("tests", "failures", "errors", "skipped"), counts,
                                strict=False):
        suite.set(attribute, str(value))
    suite.set("time", f"{counts[4]:.3f}")
    return counts


def junit_tree(report: dict[str, Any], name: str = "enroll-sim fleet") -> ET.ElementTree:
    """The JUnit XML tree of a fleet (or load) report."""
    root = ET.Element("testsuites", name=name)
    stamp = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    host = socket.gethostname()
    properties = {"server": report.get("server", "private instance"),
                  "group": report.get("group", ""), "seed": report.get("seed")}
    prefix = "load" if report.get("benchmark") == "fleet.load" else "fleet"
    suites: dict[str, ET.Element] = {}
    phases = ("enroll",) if prefix == "load" else PHASES

    def suite_for(phase: str) -> ET.Element:
        if phase not in suites:
            suite = ET.SubElement(root, "testsuite", name=f"{prefix}.{phase}",
                                  timestamp=stamp, hostname=host)
            props = ET.SubElement(suite, "properties")
            for key, value in properties.items():
                ET.SubElement(props, "property", name=key,
                              value="" if value is None else str(value))
            suites[phase] = suite
        return suites[phase]

    for phase in phases:
        for record in report["devices"]:
            if phase in record["phases"]:
                _case(suite_for(phase), f"{prefix}.{phase}", record["name"],
                      record["phases"][phase], record.get("device_id"), record.get("role"))
    if report.get("setup_error"):
        _case(suite_for("setup"), f"{prefix}.setup", "setup",
              {"outcome": "error", "code": "setup", "message": report["setup_error"]}, None)
    invariants = ET.SubElement(root, "testsuite", name=f"{prefix}.invariants",
                               timestamp=stamp, hostname=host)
    for check, (held, detail) in report.get("checks", {}).items():
        _case(invariants, f"{prefix}.invariants", check,
              {"outcome": "passed" if held else "failed", "code": None if held else check,
               "message": detail}, None)
    totals = [0, 0, 0, 0, 0.0]
    for suite in [*suites.values(), invariants]:
        for index, value in enumerate(_finish(suite)):
            totals[index] += value
    for attribute, value in zip(("tests", "failures", "errors", "skipped"), totals,
                                strict=False):
        root.set(attribute, str(value))
    root.set("time", f"{totals[4]:.3f}")
    ET.indent(root)
    return ET.ElementTree(root)


def write_junit(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    junit_tree(report).write(path, encoding="utf-8", xml_declaration=True)
