"""Every substrate driver, one line each: its name, where its class lives, and whether a
production host offers it. Drivers are imported only when used, so a host without QEMU (or
without Linux) loads none of the code it cannot run."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from coppice.config import Settings
from coppice.errors import SubstrateError
from coppice.substrates.base import Substrate


@dataclass(frozen=True)
class Driver:
    name: str
    #: "module:Class", the class taking the host's Settings
    where: str
    #: False: only tests construct it (the in-memory fake)
    production: bool = True


DRIVERS: dict[str, Driver] = {
    d.name: d
    for d in (
        Driver("jail", "coppice.substrates.jail:JailSubstrate"),
        Driver("vm", "coppice.substrates.vm:VmSubstrate"),
        Driver("fake", "coppice.substrates.fake:FakeSubstrate", production=False),
    )
}


def production_names() -> list[str]:
    return [d.name for d in DRIVERS.values() if d.production]


def load(name: str, settings: Settings) -> Substrate:
    try:
        driver = DRIVERS[name]
    except KeyError:
        raise SubstrateError(
            f"no substrate named {name!r}; known: {', '.join(production_names())}"
        ) from None
    module, _, cls = driver.where.partition(":")
    substrate: Substrate = getattr(importlib.import_module(module), cls)(settings)
    return substrate


def production_substrates(settings: Settings) -> dict[str, Substrate]:
    return {name: load(name, settings) for name in production_names()}
